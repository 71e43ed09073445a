"""The medit JSONL edit format (DESIGN.md, "The medit JSONL edit format (a contract)").

One edit per line: ``{"case_id", "prompt", "subject", "target_new", "target_true", "rephrase",
"locality": [{"prompt", "answer"}], "portability": [{"prompt", "answer"}], "generation_prompts":
[...], "attribute": [{"prompt", "answer"}]}``. Only ``prompt``,
``subject`` and ``target_new`` are required; ``case_id`` defaults to the line number; blank lines
and lines starting with ``#`` are skipped; unknown fields are rejected. A ``.json`` file holding a
list of such records is read too (``case_id`` then defaults to the record's index).
Values are taken verbatim (targets are not stripped).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medit import hookimpl
from medit.core.dataset import (DatasetFormat, RawRecord, ReadResult, convert_records, is_category_dict, item_list,
                                read_records, str_list)
from medit.core.requests import FIELDS, EditRequest

REQUIRED = ("prompt", "subject", "target_new")
ALLOWED = frozenset(FIELDS)


class MeditJsonl(DatasetFormat):
    name = "medit-jsonl"
    description = ("medit's own edit format: one JSON object per line with prompt, subject, target_new "
                   "and optional case_id, target_true, rephrase, locality, portability, "
                   "generation_prompts, attribute")

    def detect(self, path: Path, first_record: dict[str, Any] | None) -> bool:
        if first_record is None or not all(k in first_record for k in REQUIRED):
            return False
        if any(is_category_dict(first_record.get(k)) for k in ("locality", "portability")):
            return False  # KnowEdit's {category: [...]} layout
        # A .jsonl file with the required fields is ours (an unknown field then gets a precise
        # error on reading); in any other file every field must be one of ours, so that layouts
        # that merely share prompt/subject/target_new (CounterFact) are not claimed.
        return path.suffix.lower() == ".jsonl" or set(first_record) <= ALLOWED

    def load_each(self, path: Path) -> ReadResult:
        return ReadResult(convert_records(read_records(path, lenient=True), self._one)[0])

    def _one(self, rec: RawRecord) -> EditRequest:
        d = dict(rec.data)
        default_id = str(rec.line) if rec.jsonl else str(rec.index)
        origin = f"case {str(d.get('case_id', default_id))!r} ({rec.where})"
        for key in ("rephrase", "generation_prompts"):
            if key in d:
                d[key] = str_list(d[key], origin, key)
        for key in ("locality", "portability", "attribute"):
            if key in d:
                d[key] = item_list(d[key], origin, key)
        return EditRequest.from_dict(d, default_id=default_id, where=rec.where)


@hookimpl
def register_datasets(register):  # type: ignore[no-untyped-def]
    register(MeditJsonl())
