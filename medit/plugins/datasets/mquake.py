"""MQuAKE (Zhong et al. 2023) multi-hop edit cases, as in ``MQuAKE-CF-3k.json`` / ``MQuAKE-T.json``.

A JSON list of ``{"case_id", "requested_rewrite": [{"prompt": "{} is a citizen of", "subject",
"target_new": {"str"}, "target_true": {"str"}, "question"}, ...], "questions": [...],
"answer", "new_answer", "new_answer_alias", "single_hops", "new_single_hops", "orig"}``.

A case with one requested rewrite becomes one request: the rewrite's cloze prompt (``{}``
replaced by the subject), its targets, its ``question`` as a rephrase, and the multi-hop
``questions`` as ``portability`` answered with ``new_answer`` (the answer that should follow from
the edit; ``answer`` is the pre-edit one). There is no locality in MQuAKE.

A case with several rewrites cannot be one request: its multi-hop answer follows only when all of
its edits are applied together, and medit evaluates each request on its own in ``single`` mode.
Such cases are skipped; one warning line on stderr says how many, and
:class:`~medit.core.dataset.DatasetInfo` records the count.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from medit import hookimpl
from medit.core.dataset import (DatasetFormat, RawRecord, ReadResult, SkipRecord, convert_records, read_records,
                                require, str_list, target_str)
from medit.errors import ValidationError
from medit.core.requests import EditRequest, PromptAnswer

REQUIRED = ("requested_rewrite", "questions", "new_answer")


class MQuAKE(DatasetFormat):
    name = "mquake"
    description = ("MQuAKE multi-hop cases (requested_rewrite list, questions, new_answer); the questions "
                   "are portability prompts; cases with several rewrites are skipped")

    def detect(self, path: Path, first_record: dict[str, Any] | None) -> bool:
        return (first_record is not None and isinstance(first_record.get("requested_rewrite"), list)
                and "questions" in first_record)

    def load_each(self, path: Path) -> ReadResult:
        records = read_records(path, lenient=True)
        out, multi = convert_records(records, self._one)
        if multi and not out:
            raise ValidationError(f"every case of MQuAKE file '{path}' has several requested rewrites "
                                  f"(first: case {multi[0]}); medit evaluates one rewrite per case, so "
                                  f"select the cases with a single rewrite or write them as medit JSONL")
        if multi:
            print(f"medit: warning: MQuAKE file '{path}': skipped {len(multi)} of {len(records)} cases with "
                  f"several requested rewrites (first: case {multi[0]}); their multi-hop answers need all "
                  f"their edits applied together", file=sys.stderr)
        return ReadResult(out, skipped=len(multi))

    def _one(self, rec: RawRecord) -> EditRequest:
        """The request; :class:`SkipRecord` with the case id (as ``repr``) when the case has several
        rewrites."""
        d = rec.data
        case_id = str(d.get("case_id", rec.index))
        origin = f"case {case_id!r} ({rec.where})"
        require(rec, REQUIRED, origin, "MQuAKE")
        rewrites = d["requested_rewrite"]
        if not isinstance(rewrites, list) or not rewrites or not all(isinstance(r, dict) for r in rewrites):
            raise ValidationError(f"{origin}: field 'requested_rewrite' must be a non-empty list of "
                                  f"{{'prompt', 'subject', 'target_new', ...}} objects, got {rewrites!r}")
        if len(rewrites) > 1:
            raise SkipRecord(repr(case_id))
        rr = rewrites[0]
        for f in ("prompt", "subject", "target_new"):
            if f not in rr:
                raise ValidationError(f"{origin}: missing required MQuAKE field 'requested_rewrite[0].{f}'; "
                                      f"fields found: {', '.join(sorted(rr)) or '(none)'}")
        template, subject = rr["prompt"], rr["subject"]
        if not isinstance(template, str) or not isinstance(subject, str) or not subject.strip():
            raise ValidationError(f"{origin}: fields 'requested_rewrite[0].prompt' and "
                                  f"'requested_rewrite[0].subject' must be non-empty strings")
        prompt = template.replace("{}", subject) if "{}" in template else template

        def obj_str(v: Any, name: str, required: bool) -> str | None:
            if isinstance(v, dict):
                v = v.get("str")
            return target_str(v, origin, name, required=required)

        new_answer = obj_str(d["new_answer"], "new_answer", True)
        questions = str_list(d["questions"], origin, "questions")
        rephrase = str_list(rr.get("question"), origin, "requested_rewrite[0].question")
        return EditRequest(
            prompt=prompt, subject=subject,
            target_new=obj_str(rr["target_new"], "requested_rewrite[0].target_new", True),  # type: ignore[arg-type]
            target_true=obj_str(rr.get("target_true"), "requested_rewrite[0].target_true", False),
            rephrase=tuple(rephrase),
            portability=tuple(PromptAnswer(q, new_answer or "") for q in questions),
            case_id=case_id, where=rec.where)


@hookimpl
def register_datasets(register):  # type: ignore[no-untyped-def]
    register(MQuAKE())
