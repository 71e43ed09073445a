"""CounterFact (Meng et al. 2022) edit cases.

Two layouts are read:

- EasyEdit / MEND (``counterfact-edit.json``, ``counterfact-train.json``): a JSON list of
  ``{"case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
  "locality_prompt", "locality_ground_truth"}``, optionally ``portability``. Mapped to
  ``target_true = ground_truth``, ``rephrase = [rephrase_prompt]``,
  ``locality = [(locality_prompt, locality_ground_truth)]``.
- ROME's original ``counterfact.json``: ``{"case_id", "requested_rewrite": {"prompt": "{} ...",
  "subject", "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts",
  "neighborhood_prompts", "attribute_prompts", "generation_prompts"}``. ``{}`` in the prompt is
  replaced by the subject; paraphrase prompts become ``rephrase``; neighborhood prompts become
  ``locality`` answered with the true target; generation prompts are kept as
  ``generation_prompts`` (the ``fluency`` metric generates from them). ROME's
  ``attribute_prompts`` (other subjects that truly have the new target) are not read: a request's
  ``attribute`` prompts are the edited subject's *other* facts, which the ``attribute`` metric
  takes from the other records of the same subject (``--attribute-pool``).

Required (EasyEdit layout): prompt, subject, target_new, ground_truth; the other fields are
optional, a missing ``case_id`` defaults to the record's index, unknown fields are ignored.
Each of rephrase_prompt / locality_prompt / locality_ground_truth may also be a list.
Targets are stripped of surrounding whitespace (the model adapter adds the separating space).
``questions`` holds the fact asked as a question where the relation is known
(:mod:`medit.plugins.datasets.cf_questions`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medit import hookimpl
from medit.core.dataset import (DatasetFormat, RawRecord, ReadResult, convert_records, is_category_dict,
                                prompt_answer_items, read_records, require, str_list, target_str)
from medit.errors import ValidationError
from medit.core.requests import EditRequest, PromptAnswer
from medit.plugins.datasets.cf_questions import question_for

REQUIRED = ("prompt", "subject", "target_new", "ground_truth")
MARKERS = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")


class CounterFact(DatasetFormat):
    name = "counterfact"
    description = ("CounterFact edit cases, EasyEdit/MEND layout (prompt, subject, target_new, "
                   "ground_truth, rephrase_prompt, locality_prompt, ...) or ROME's requested_rewrite layout")

    def detect(self, path: Path, first_record: dict[str, Any] | None) -> bool:
        if first_record is None:
            return False
        if isinstance(first_record.get("requested_rewrite"), dict):
            return True
        if any(is_category_dict(first_record.get(k)) for k in ("locality", "portability")):
            return False  # KnowEdit's {category: [...]} layout
        return (all(k in first_record for k in ("prompt", "subject", "target_new"))
                and any(k in first_record for k in MARKERS))

    def load_each(self, path: Path) -> ReadResult:
        return ReadResult(convert_records(read_records(path, lenient=True), self._one)[0])

    def _one(self, rec: RawRecord) -> EditRequest:
        d = rec.data
        case_id = str(d.get("case_id", rec.index))
        origin = f"case {case_id!r} ({rec.where})"
        if "requested_rewrite" in d:
            return self._rome(rec, case_id, origin)
        require(rec, REQUIRED, origin, "CounterFact")
        loc_prompts = str_list(d.get("locality_prompt"), origin, "locality_prompt")
        loc_answers = str_list(d.get("locality_ground_truth"), origin, "locality_ground_truth")
        if loc_answers and len(loc_answers) != len(loc_prompts):
            raise ValidationError(f"{origin}: 'locality_prompt' has {len(loc_prompts)} prompt(s) but "
                                  f"'locality_ground_truth' {len(loc_answers)} answer(s); give one "
                                  f"answer per prompt")
        locality = [PromptAnswer(p, (loc_answers[i].strip() if loc_answers else ""))
                    for i, p in enumerate(loc_prompts)]
        return EditRequest(
            prompt=d["prompt"], subject=d["subject"],
            target_new=target_str(d["target_new"], origin, "target_new"),
            target_true=target_str(d["ground_truth"], origin, "ground_truth"),
            rephrase=tuple(str_list(d.get("rephrase_prompt"), origin, "rephrase_prompt")),
            locality=tuple(locality),
            portability=tuple(prompt_answer_items(d.get("portability"), origin, "portability")),
            case_id=case_id, where=rec.where,
            generation_prompts=tuple(str_list(d.get("generation_prompts"), origin, "generation_prompts")),
            questions=_question(d["prompt"], d["subject"], d.get("relation_id")))

    def _rome(self, rec: RawRecord, case_id: str, origin: str) -> EditRequest:
        rr = rec.data["requested_rewrite"]
        if not isinstance(rr, dict):
            raise ValidationError(f"{origin}: field 'requested_rewrite' must be an object, got {rr!r}")
        for f in ("prompt", "subject", "target_new"):
            if f not in rr:
                raise ValidationError(f"{origin}: missing required CounterFact field "
                                      f"'requested_rewrite.{f}'; fields found: {', '.join(sorted(rr))}")

        def obj_str(v: Any, name: str, required: bool) -> str | None:
            if isinstance(v, dict):
                v = v.get("str")
            return target_str(v, origin, f"requested_rewrite.{name}", required=required)

        subject, template = rr["subject"], rr["prompt"]
        if not isinstance(template, str) or not isinstance(subject, str):
            raise ValidationError(f"{origin}: fields 'requested_rewrite.prompt' and "
                                  f"'requested_rewrite.subject' must be strings")
        prompt = template.replace("{}", subject) if "{}" in template else template
        target_true = obj_str(rr.get("target_true"), "target_true", False)
        target_new: str = obj_str(rr["target_new"], "target_new", True)  # type: ignore[assignment]
        neighborhood = str_list(rec.data.get("neighborhood_prompts"), origin, "neighborhood_prompts")
        return EditRequest(
            prompt=prompt, subject=subject, target_new=target_new, target_true=target_true,
            rephrase=tuple(str_list(rec.data.get("paraphrase_prompts"), origin, "paraphrase_prompts")),
            locality=tuple(PromptAnswer(p, target_true or "") for p in neighborhood),
            case_id=case_id, where=rec.where,
            generation_prompts=tuple(str_list(rec.data.get("generation_prompts"), origin, "generation_prompts")),
            questions=_question(template.replace("{}", subject) if "{}" in template else template, subject,
                                rr.get("relation_id")))


def _question(prompt: Any, subject: Any, relation_id: Any) -> tuple[str, ...]:
    if not isinstance(prompt, str) or not isinstance(subject, str) or subject not in prompt:
        return ()  # the request's own validation names the problem
    q = question_for(prompt, subject, relation_id if isinstance(relation_id, str) else None)
    return (q,) if q else ()


@hookimpl
def register_datasets(register):  # type: ignore[no-untyped-def]
    register(CounterFact())
