"""zsRE question-answer edits in the MEND / EasyEdit layout.

A JSON list of ``{"subject", "src" (question = prompt), "alt" (new answer = target_new),
"answers" (old answers; answers[0] = target_true), "rephrase" (a rephrased question),
"loc" (an unrelated question, e.g. "nq question: ..."), "loc_ans" (its answer)}``; extra fields
(MEND's ``pred``, ``cond``) are ignored. An optional ``portability`` is read in EasyEdit's layout,
``{"New Question": ..., "New Answer": ...}`` or a list of those (``{"prompt", "answer"}`` too).
``case_id`` is the record's index in the file unless the record has one.

The question must contain the subject. When it does only up to letter case (e.g. "Lyon" in
"... lyon ..."), the subject is taken as it occurs in the question. A record whose subject does not
occur at all is skipped; one warning line on stderr says how many were skipped and why, and
:class:`~medit.core.dataset.DatasetInfo` records the count. Every other invalid record raises.
Targets are stripped of surrounding whitespace (MEND's ``alt`` sometimes starts with a space).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from medit import hookimpl
from medit.core.dataset import (DatasetFormat, RawRecord, ReadResult, SkipRecord, convert_records,
                                prompt_answer_items, read_records, require, str_list, target_str)
from medit.errors import ValidationError
from medit.core.requests import EditRequest, PromptAnswer

REQUIRED = ("subject", "src", "alt")


class Zsre(DatasetFormat):
    name = "zsre"
    description = ("zsRE question-answer edits, MEND/EasyEdit layout (subject, src, alt, answers, rephrase, "
                   "loc, loc_ans)")

    def detect(self, path: Path, first_record: dict[str, Any] | None) -> bool:
        return first_record is not None and all(k in first_record for k in REQUIRED)

    def load_each(self, path: Path) -> ReadResult:
        records = read_records(path, lenient=True)
        out, skipped = convert_records(records, self._one)
        if skipped and not out:
            raise ValidationError(f"no record of zsRE file '{path}' has its subject in its question "
                                  f"(first: {skipped[0]}); put each subject verbatim into 'src'")
        if skipped:
            print(f"medit: warning: zsRE file '{path}': skipped {len(skipped)} of {len(records)} records "
                  f"whose subject does not occur in the question 'src' (first: {skipped[0]})",
                  file=sys.stderr)
        return ReadResult(out, skipped=len(skipped))

    def _one(self, rec: RawRecord) -> EditRequest:
        d = rec.data
        case_id = str(d.get("case_id", rec.index))
        origin = f"case {case_id!r} ({rec.where})"
        require(rec, REQUIRED, origin, "zsRE")
        prompt, subject = d["src"], d["subject"]
        for name, value in (("src", prompt), ("subject", subject)):
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"{origin}: field {name!r} must be a non-empty string, got {value!r}")
        if subject not in prompt:
            at = prompt.lower().find(subject.lower())
            if at < 0:
                raise SkipRecord(f"{origin}: subject {subject!r} not in {prompt!r}")
            subject = prompt[at:at + len(subject)]
        answers = d.get("answers")
        target_true = target_str(answers, origin, "answers", required=False) if answers else None
        locality: list[PromptAnswer] = []
        if d.get("loc") is not None:
            loc = str_list(d["loc"], origin, "loc")
            loc_ans = str_list(d.get("loc_ans"), origin, "loc_ans")
            if loc_ans and len(loc_ans) != len(loc):
                raise ValidationError(f"{origin}: 'loc' has {len(loc)} question(s) but 'loc_ans' "
                                      f"{len(loc_ans)} answer(s); give one answer per question")
            locality = [PromptAnswer(q, loc_ans[i].strip() if loc_ans else "") for i, q in enumerate(loc)]
        return EditRequest(
            prompt=prompt, subject=subject,
            target_new=target_str(d["alt"], origin, "alt"),  # type: ignore[arg-type]
            target_true=target_true,
            rephrase=tuple(str_list(d.get("rephrase"), origin, "rephrase")),
            locality=tuple(locality),
            portability=tuple(prompt_answer_items(d.get("portability"), origin, "portability")),
            case_id=case_id, where=rec.where, questions=(prompt,))


@hookimpl
def register_datasets(register):  # type: ignore[no-untyped-def]
    register(Zsre())
