"""KnowEdit (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for LLMs") edit cases.

A JSON list of records as in EasyEdit's KnowEdit files (``ZsRE-test-all.json``,
``wiki_counterfact/test_cf.json``, ``wiki_recent/recent_test.json``, ``WikiBio/wikibio-test-all.json``):

``{"subject", "prompt", "target_new", "ground_truth"?, "rephrase_prompt"?,
"portability": {CATEGORY: [{"prompt", "ground_truth"}, ...]},
"locality": {CATEGORY: [{"prompt", "ground_truth"}, ...]}}``

with categories such as ``Reasoning``, ``Subject_Aliasing``, ``Logical_Generalization``
(portability) and ``Relation_Specificity``, ``Forgetfulness`` (locality). Every category's items
are kept, in file order, as ``portability`` / ``locality`` prompt-answer pairs (the category names
are not kept). A ``ground_truth`` may be a string, a list of aliases or a list of alias lists; the
first string is the answer. WikiBio's ``text`` / ``labels`` / ``concept`` stand for ``prompt`` /
``target_new`` / ``subject``. ``ground_truth`` of the record (first alias) becomes ``target_true``.

The ``Relation_Specificity`` locality items (prompts about the edited subject's other relations)
are also the request's ``attribute`` prompts (the ``attribute`` metric); they stay in ``locality``.

The subject must occur in the prompt; when it does only up to letter case, it is taken as it occurs
there. ``case_id`` is the record's index unless the record has one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medit import hookimpl
from medit.core.dataset import (DatasetFormat, RawRecord, ReadResult, convert_records, is_category_dict,
                                prompt_answer_items, read_records, str_list, target_str)
from medit.errors import ValidationError
from medit.core.requests import EditRequest, PromptAnswer

#: (field, WikiBio's name for it)
REQUIRED = (("subject", "concept"), ("prompt", "text"), ("target_new", "labels"))
#: the locality category whose prompts ask about the edited subject's other relations
ATTRIBUTE_CATEGORY = "Relation_Specificity"


class KnowEdit(DatasetFormat):
    name = "knowedit"
    description = ("KnowEdit edit cases (EasyEdit layout): subject, prompt, target_new, ground_truth and "
                   "portability / locality as {category: [{prompt, ground_truth}]}")

    def detect(self, path: Path, first_record: dict[str, Any] | None) -> bool:
        if first_record is None:
            return False
        has_fields = all(a in first_record or b in first_record for a, b in REQUIRED)
        return has_fields and any(is_category_dict(first_record.get(k)) for k in ("locality", "portability"))

    def load_each(self, path: Path) -> ReadResult:
        return ReadResult(convert_records(read_records(path, lenient=True), self._one)[0])

    def _one(self, rec: RawRecord) -> EditRequest:
        d = rec.data
        case_id = str(d.get("case_id", rec.index))
        origin = f"case {case_id!r} ({rec.where})"
        values: dict[str, Any] = {}
        for name, alt in REQUIRED:
            key = name if name in d else alt if alt in d else None
            if key is None:
                raise ValidationError(f"{origin}: missing required KnowEdit field {name!r} (or {alt!r}); "
                                      f"fields found: {', '.join(sorted(d)) or '(none)'}")
            values[name] = (d[key], key)
        (subject, subject_key), (prompt, prompt_key) = values["subject"], values["prompt"]
        for key, value in ((subject_key, subject), (prompt_key, prompt)):
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"{origin}: field {key!r} must be a non-empty string, got {value!r}")
        if subject not in prompt:
            at = prompt.lower().find(subject.lower())
            if at >= 0:
                subject = prompt[at:at + len(subject)]
        target_value, target_key = values["target_new"]
        rephrase_key = "rephrase_prompt" if "rephrase_prompt" in d else "rephrase"
        return EditRequest(
            prompt=prompt, subject=subject,
            target_new=target_str(target_value, origin, target_key),  # type: ignore[arg-type]
            target_true=target_str(d.get("ground_truth"), origin, "ground_truth", required=False)
            if d.get("ground_truth") else None,
            rephrase=tuple(str_list(d.get(rephrase_key), origin, rephrase_key)),
            locality=tuple(_categories(d.get("locality"), origin, "locality")),
            portability=tuple(_categories(d.get("portability"), origin, "portability")),
            case_id=case_id, where=rec.where,
            attribute=tuple(_categories(_only(d.get("locality"), ATTRIBUTE_CATEGORY), origin, "locality")))


def _only(value: Any, category: str) -> Any:
    """``{category: items}`` of a category dict that has it, else None."""
    return {category: value[category]} if is_category_dict(value) and category in value else None


def _categories(value: Any, origin: str, field_name: str) -> list[PromptAnswer]:
    """Prompt-answer pairs of every category of ``{category: [items]}``, in order."""
    if value is None:
        return []
    if not is_category_dict(value):
        if isinstance(value, dict) and not value:
            return []
        raise ValidationError(f"{origin}: field {field_name!r} must be an object of categories, each a list "
                              f"of {{'prompt': ..., 'ground_truth': ...}} items (e.g. {{'Reasoning': [...]}}), "
                              f"got {value!r}")
    out: list[PromptAnswer] = []
    for category, items in value.items():
        out.extend(prompt_answer_items(items, origin, f"{field_name}.{category}"))
    return out


@hookimpl
def register_datasets(register):  # type: ignore[no-untyped-def]
    register(KnowEdit())
