"""Dataset formats and :func:`load_dataset`.

A dataset format is a plugin object (``register_datasets`` hook) that turns a file into
:class:`~medit.core.requests.EditRequest` objects. :func:`load_dataset` takes ``PATH`` (the format
is detected from the first record's fields) or ``FORMAT:PATH`` (named format), selects a slice
(``offset``/``n``, optionally after a deterministic shuffle with ``seed``) and returns the requests
plus a :class:`DatasetInfo` describing exactly what was read (path, format, content fingerprint).

Only the selected cases must be valid: a record that fails validation elsewhere in the file does not
stop the selection (``skip_invalid`` leaves every invalid record out, with one warning). Besides
files, a dataset may be a folder written by the ``datasets`` library (``Dataset.save_to_disk``) or,
with a format named, a Hugging Face hub id (``FORMAT:OWNER/NAME[:SPLIT]``, online, needs
``datasets``); see :mod:`medit.core.hfdata`.

The JSON / JSONL reading helpers (:mod:`medit.core.records`, re-exported here) give every format
the same error messages: each names the file and, where there is one, the line.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, TYPE_CHECKING

from medit.errors import InputFileError, MeditError, UnknownNameError, ValidationError
from medit.core.records import (MalformedFileError, RawRecord, check_file, file_fingerprint, first_record,
                      provided_records, read_records)
from medit.core.requests import EditRequest, PromptAnswer

if TYPE_CHECKING:
    from medit.plugin.manager import Registry

__all__ = [
    "DatasetFormat", "DatasetInfo", "InvalidRecord", "MalformedFileError", "RawRecord", "ReadResult",
    "SkipRecord", "convert_records", "load_dataset", "packaged_path", "parse_spec", "select",
    "read_records", "first_record", "file_fingerprint", "get_format", "format_names",
    "str_list", "item_list", "prompt_answer_items", "target_str", "require", "first_str",
    "is_category_dict",
]

_FORMAT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


# --------------------------------------------------------------------------------------------
# objects


@dataclass(frozen=True)
class InvalidRecord:
    """A record that failed validation, kept at its place among the requests so that a selection
    of other cases can pass over it; ``error`` is the one-line error it raises when selected."""

    error: MeditError
    where: str = ""


class SkipRecord(Exception):
    """Raised by a format's record conversion for a record the format leaves out by design (e.g.
    an MQuAKE case with several rewrites); not an error. Its message says which record and why."""


@dataclass
class ReadResult:
    """What a format read: the requests and how many records it skipped (with a warning).

    From :meth:`DatasetFormat.load_each`, ``requests`` may also hold :class:`InvalidRecord` entries.
    """

    requests: list[Any]
    skipped: int = 0


@dataclass
class DatasetInfo:
    """What :func:`load_dataset` read: recorded in run manifests."""

    path: str  # absolute path of the file
    format: str  # registered format name
    fingerprint: str  # sha256 of the file's bytes, first 16 hex characters
    n_total: int  # requests in the file (after any skipped records)
    n: int  # requests selected
    offset: int
    seed: int | None
    skipped: int = 0  # records the format skipped (a warning said how many and why)
    invalid: int = 0  # invalid records left out with skip_invalid (a warning said how many)
    source: str = "file"  # "file", "saved" (a folder written by `datasets`) or "hub" (a hub id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DatasetFormat:
    """Base class of dataset formats. Subclasses set ``name``/``description`` and implement
    :meth:`detect` and one of :meth:`load_each` (preferred: an invalid record then stops only a
    selection that includes it), :meth:`load` (when records may be skipped) or :meth:`read`."""

    name: str = ""
    description: str = ""

    def detect(self, path: Path, first_record: dict[str, Any] | None) -> bool:
        """Whether ``path`` looks like this format, judging by its first record's fields.

        ``first_record`` is None when the file is not a JSON list / JSONL of objects.
        """
        return False

    def read(self, path: Path) -> list[EditRequest]:
        """Read every request in ``path``; raise :class:`InputFileError` / :class:`ValidationError`."""
        return self.load(path).requests

    def load(self, path: Path) -> ReadResult:
        """Like :meth:`read`, also reporting skipped records; the first invalid record raises."""
        if type(self).load_each is not DatasetFormat.load_each:
            result = self.load_each(path)
            for r in result.requests:
                if isinstance(r, InvalidRecord):
                    raise r.error
            return result
        if type(self).read is DatasetFormat.read:
            raise NotImplementedError(f"dataset format {self.name!r} implements none of load_each(), "
                                      f"load() and read()")
        return ReadResult(self.read(path))

    def load_each(self, path: Path) -> ReadResult:
        """Like :meth:`load`, but an invalid record does not raise: it stays in ``requests``, at its
        place, as an :class:`InvalidRecord` (use :func:`convert_records`). Formats that only
        implement :meth:`load` or :meth:`read` raise at their first invalid record."""
        return self.load(path)

    def __repr__(self) -> str:
        return f"<dataset format {self.name!r}>"


# --------------------------------------------------------------------------------------------
# field helpers shared by formats


def convert_records(records: Sequence[RawRecord], convert: Any) -> tuple[list[Any], list[str]]:
    """``convert(record)`` for each record: (requests, in order, with an :class:`InvalidRecord` in
    place of each record that raised :class:`ValidationError` or was not a JSON object; the
    messages of the records that raised :class:`SkipRecord`)."""
    out: list[Any] = []
    skipped: list[str] = []
    for rec in records:
        if rec.error is not None:
            out.append(InvalidRecord(MalformedFileError(rec.error), rec.where))
            continue
        try:
            out.append(convert(rec))
        except SkipRecord as exc:
            skipped.append(str(exc))
        except ValidationError as exc:
            out.append(InvalidRecord(exc, rec.where))
    return out, skipped


def str_list(value: Any, origin: str, field_name: str) -> list[str]:
    """``None`` -> [], ``"x"`` -> ["x"], a list of strings -> itself; anything else is an error."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValidationError(f"{origin}: field {field_name!r} must be a string or a list of strings, "
                          f"got {value!r}")


def item_list(value: Any, origin: str, field_name: str) -> list[Any]:
    """``None`` -> [], one item (object or string) -> [item], a list -> itself; else an error."""
    if value is None:
        return []
    if isinstance(value, (dict, str)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValidationError(f"{origin}: field {field_name!r} must be a list of "
                          f"{{'prompt': ..., 'answer': ...}} objects, got {value!r}")


# --------------------------------------------------------------------------------------------
# registry access and load_dataset


def _registry() -> "Registry[DatasetFormat]":
    from medit.plugin.manager import get_plugins  # late import: plugins imports hookspecs only, but keep it lazy

    return get_plugins().datasets


def format_names() -> list[str]:
    """Names of all registered dataset formats."""
    return _registry().names()


def get_format(name: str) -> DatasetFormat:
    """The registered format ``name``; :class:`UnknownNameError` listing the known ones otherwise."""
    return _registry().get(name)


def parse_spec(spec: str | os.PathLike[str]) -> tuple[str | None, Path]:
    """Split ``FORMAT:PATH`` / ``PATH`` into (format name or None, path).

    The prefix before the first ``:`` is a format name if it is registered. It is reported as an
    unknown format if it looks like one (lowercase name, two or more characters, so not a Windows
    drive letter) and ``spec`` is not itself an existing file. Otherwise ``spec`` is a path.
    """
    if not isinstance(spec, str):
        return None, Path(spec)
    if ":" in spec:
        prefix, rest = spec.split(":", 1)
        registry = _registry()
        if prefix in registry:
            if not rest:
                raise InputFileError(f"dataset spec {spec!r} names format {prefix!r} but no file; "
                                     f"write {prefix}:PATH")
            return prefix, Path(rest).expanduser()
        if len(prefix) > 1 and _FORMAT_NAME_RE.match(prefix) and not Path(spec).expanduser().exists():
            raise UnknownNameError("dataset format", prefix, registry.names(),
                                   hint=f"write FORMAT:PATH with a known format, or just PATH to "
                                        f"detect the format; {spec!r} is not an existing file either")
    return None, Path(spec).expanduser()


#: the folder above the ``medit`` package: relative paths of packaged files are tried from here
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]

#: the first 2,000 cases of the CounterFact train split, shipped in the package
#: (medit/datasets/DATA.md): IKE's demonstration pool, WISE's negative subjects.
COUNTERFACT_TRAIN = "counterfact:medit/datasets/counterfact-train-2000.json"


def packaged_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as given when it exists; otherwise, if relative, the same path under the folder
    that holds the ``medit`` package when that exists there (so a default such as
    ``medit/datasets/...`` works from any working directory, checkout or installed package)."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute():
        alt = _PACKAGE_ROOT / p
        if alt.exists():
            return alt
    return p


def resolve_packaged_spec(spec: str, what: str, hparam: str, optional: bool = False) -> str:
    """``FORMAT:PATH`` with a relative PATH tried from the working directory, then from the folder
    holding the medit package (so method defaults such as :data:`COUNTERFACT_TRAIN` work from
    either). A saved ``datasets`` folder or a hub id (:mod:`medit.core.hfdata`) is returned as it
    is. A missing file is a one-line MethodError naming ``what`` and the hparam that sets it (and,
    when ``optional``, that null turns it off)."""
    from medit.errors import MethodError
    from medit.core.hfdata import looks_like_hub_id

    fmt, path = parse_spec(spec)
    prefix = f"{fmt}:" if fmt else ""
    p = packaged_path(path)
    if p.exists():
        return f"{prefix}{p}"
    if fmt is not None and looks_like_hub_id(str(path)):
        return spec
    alt_fix = f", or --set {hparam}=null to go without" if optional else ""
    raise MethodError(f"{what} {str(path)!r} does not exist; pass --set {hparam}=FORMAT:PATH "
                      f"(e.g. {COUNTERFACT_TRAIN}){alt_fix}")


def _detect(path: Path) -> str:
    registry = _registry()
    try:
        record: dict[str, Any] | None = first_record(path)
        parse_error: InputFileError | None = None
    except MalformedFileError as exc:
        record, parse_error = None, exc  # maybe a non-JSON format a plugin can detect by itself
    matches: list[str] = []
    for entry in registry:
        try:
            if entry.obj.detect(path, record):
                matches.append(entry.name)
        except Exception as exc:  # a broken detect() must not hide the other formats
            print(f"medit: warning: dataset format {entry.name!r} ({entry.dist}) failed in detect() "
                  f"and was skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(registry.names()) or "(none)"
    if len(matches) > 1:
        raise InputFileError(f"dataset file '{path}' matches several formats ({', '.join(matches)}); "
                             f"name one as FORMAT:PATH, e.g. {matches[0]}:{path}")
    if parse_error is not None:
        raise parse_error
    fields = ", ".join(sorted(record)) if record else "(none)"
    raise InputFileError(f"cannot detect the format of dataset file '{path}': its first record has "
                         f"the fields {fields}, which match none of the known formats ({known}); "
                         f"fix the fields or name the format as FORMAT:PATH")


def _check_unique_ids(path: Path, requests: Sequence[EditRequest]) -> None:
    seen: dict[str, EditRequest] = {}
    for r in requests:
        other = seen.get(r.case_id)
        if other is not None:
            raise ValidationError(f"case id {r.case_id!r} occurs twice in dataset file '{path}' "
                                  f"({other.where or '?'} and {r.where or '?'}); case ids must be "
                                  f"unique: change one, or drop the case_id fields of a medit JSONL "
                                  f"file to number the cases by line")
        seen[r.case_id] = r


def select(items: Sequence[Any], n: int | None = None, offset: int = 0,
           seed: int | None = None) -> list[Any]:
    """The ``offset``/``n`` slice of ``items``, after a ``random.Random(seed)`` shuffle if seeded."""
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    stop = None if n is None else offset + n
    return [items[i] for i in order[offset:stop]]


def load_dataset(spec: str | os.PathLike[str], n: int | None = None, offset: int = 0,
                 seed: int | None = None, skip_invalid: bool = False) -> tuple[list[EditRequest], DatasetInfo]:
    """Read ``PATH`` (format auto-detected) or ``FORMAT:PATH`` and select cases.

    With ``seed`` the cases are shuffled deterministically (``random.Random(seed)``) before the
    ``offset``/``n`` slice is taken. ``n`` larger than what remains yields what remains
    (``DatasetInfo.n`` says how many). Only the selected cases must be valid: an invalid record
    elsewhere does not stop the selection, and one inside it raises its one-line error. With
    ``skip_invalid``, every invalid record is left out before the slice is taken, with one warning
    on stderr that counts them and names the first (``DatasetInfo.invalid`` records how many).
    PATH may also be a folder saved by the ``datasets`` library, or, with FORMAT, a Hugging Face
    hub id (:mod:`medit.core.hfdata`). Raises :class:`InputFileError`, :class:`ValidationError`
    or :class:`UnknownNameError` with messages naming the file, line, case id and field.
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValidationError(f"the number of cases n must be a positive integer (or unset for all), "
                              f"got {n!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValidationError(f"offset must be an integer >= 0, got {offset!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValidationError(f"seed must be an integer (or unset for file order), got {seed!r}")

    from medit.core.hfdata import find_source

    name, path = parse_spec(spec)
    hf = None if path.is_file() else find_source(str(path), name)
    if hf is None:
        check_file(path)
        key, shown, source = path, str(path.resolve()), "file"
    else:
        key, shown, source = hf.key, hf.label, hf.kind
    with provided_records(key, hf.records) if hf is not None else contextlib.nullcontext():
        if name is None:
            name = _detect(key)
        fmt = get_format(name)
        result = fmt.load_each(key)
    entries = list(result.requests)
    if not entries:
        raise InputFileError(f"dataset file '{key}' yielded no edit requests as format {name!r}"
                             + (f" ({result.skipped} records skipped)" if result.skipped else "")
                             + "; check that the file holds records of that format")
    invalid = [r for r in entries if isinstance(r, InvalidRecord)]
    valid = [r for r in entries if not isinstance(r, InvalidRecord)]
    if skip_invalid and invalid:
        if not valid:
            raise ValidationError(f"every record of dataset file '{key}' is invalid (first: {invalid[0].error}); "
                                  f"fix the records")
        print(f"medit: warning: dataset file '{key}': skipped {len(invalid)} invalid record(s) of {len(entries)} "
              f"(first: {invalid[0].error})", file=sys.stderr)
        entries = valid
    _check_unique_ids(key, valid)
    if offset >= len(entries):
        raise ValidationError(f"offset {offset} is past the end of dataset file '{key}' "
                              f"({len(entries)} cases); use an offset below {len(entries)}")
    chosen = select(entries, n=n, offset=offset, seed=seed)
    bad = next((r for r in chosen if isinstance(r, InvalidRecord)), None)
    if bad is not None:
        cls = ValidationError if isinstance(bad.error, ValidationError) else InputFileError
        raise cls(f"{bad.error}; fix that record, or pass --skip-invalid (skip_invalid=True) to leave "
                  f"invalid records out")
    info = DatasetInfo(path=shown, format=name,
                       fingerprint=hf.fingerprint if hf is not None else file_fingerprint(path),
                       n_total=len(entries), n=len(chosen), offset=offset, seed=seed,
                       skipped=result.skipped, invalid=len(invalid) if skip_invalid else 0, source=source)
    return chosen, info


def prompt_answer_items(value: Any, origin: str, field_name: str) -> list[PromptAnswer]:
    """Prompt/answer pairs from the layouts edit datasets use.

    Accepts ``None``, one item or a list of items, each ``{"prompt": ..., "answer": ...}``,
    EasyEdit's ``{"New Question": ..., "New Answer": ...}``, ``{"prompt": ..., "ground_truth": ...}``
    or a bare prompt string. A list answer (aliases, or KnowEdit's list of alias lists) yields its
    first non-empty string; a list of prompts yields one pair per prompt with the same answer.
    """
    out: list[PromptAnswer] = []
    for item in item_list(value, origin, field_name):
        if isinstance(item, str):
            out.append(PromptAnswer(item, ""))
            continue
        if isinstance(item, dict):
            prompt = next((item[k] for k in ("prompt", "New Question", "question") if k in item), None)
            answer = next((item[k] for k in ("answer", "New Answer", "ground_truth", "target")
                           if k in item), "")
            if isinstance(answer, list):
                answer = first_str(answer) or ""
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if (isinstance(prompts, list) and prompts and isinstance(answer, str)
                    and all(isinstance(p, str) and p.strip() for p in prompts)):
                out.extend(PromptAnswer(p, answer.strip()) for p in prompts)
                continue
        raise ValidationError(f"{origin}: each {field_name!r} item must be {{'prompt': str, 'answer': "
                              f"str}} (or EasyEdit's {{'New Question': str, 'New Answer': str}}), "
                              f"got {item!r}")
    return out


def target_str(value: Any, origin: str, field_name: str, *, required: bool = True) -> str | None:
    """A target string, stripped of surrounding whitespace; a list of aliases yields its first.

    An absent (``None``) optional target yields None; an absent or empty required one, or a value
    of another type, raises :class:`ValidationError` naming ``field_name``.
    """
    if value is None and not required:
        return None
    if isinstance(value, list):
        value = first_str(value) or (value[0] if value else "")
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{origin}: field {field_name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def first_str(value: Any) -> str | None:
    """The first non-blank string in ``value`` (a string, or nested lists of them), else None."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (list, tuple)):
        for v in value:
            found = first_str(v)
            if found is not None:
                return found
    return None


def is_category_dict(value: Any) -> bool:
    """Whether ``value`` is KnowEdit's ``{category: [items...]}`` layout (e.g. ``{"Reasoning": [...]}``)."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, list) for v in value.values())


def require(record: RawRecord, fields: Iterable[str], origin: str, fmt: str) -> None:
    """Raise :class:`ValidationError` naming the first of ``fields`` missing from ``record``."""
    for f in fields:
        if f not in record.data:
            raise ValidationError(f"{origin}: missing required {fmt} field {f!r}; fields found: "
                                  f"{', '.join(sorted(record.data)) or '(none)'}")
