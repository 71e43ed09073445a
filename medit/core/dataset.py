"""Dataset formats and :func:`load_dataset`.

A dataset format is a plugin object (``register_datasets`` hook) that turns a file into
:class:`~medit.core.requests.EditRequest` objects. :func:`load_dataset` takes ``PATH`` (the format
is detected from the first record's fields) or ``FORMAT:PATH`` (named format), selects a slice
(``offset``/``n``, optionally after a deterministic shuffle with ``seed``) and returns the requests
plus a :class:`DatasetInfo` describing exactly what was read (path, format, content fingerprint).

The JSON / JSONL reading helpers (:mod:`medit.core.records`, re-exported here) give every format
the same error messages: each names the file and, where there is one, the line.
"""
from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InputFileError, UnknownNameError, ValidationError
from .records import (MalformedFileError, RawRecord, check_file, file_fingerprint, first_record,
                      read_records)
from .requests import EditRequest, PromptAnswer

__all__ = [
    "DatasetFormat", "DatasetInfo", "MalformedFileError", "RawRecord", "ReadResult", "load_dataset",
    "parse_spec", "select",
    "read_records", "first_record", "file_fingerprint", "get_format", "format_names",
    "str_list", "item_list", "prompt_answer_items", "target_str", "require", "first_str",
    "is_category_dict",
]

_FORMAT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


# --------------------------------------------------------------------------------------------
# objects


@dataclass
class ReadResult:
    """What a format read: the requests and how many records it skipped (with a warning)."""

    requests: list[EditRequest]
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DatasetFormat:
    """Base class of dataset formats. Subclasses set ``name``/``description`` and implement
    :meth:`detect` and :meth:`read` (or :meth:`load`, when records may be skipped)."""

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
        """Like :meth:`read`, also reporting skipped records. Override one of the two."""
        if type(self).read is DatasetFormat.read:
            raise NotImplementedError(f"dataset format {self.name!r} implements neither read() nor load()")
        return ReadResult(self.read(path))

    def __repr__(self) -> str:
        return f"<dataset format {self.name!r}>"


# --------------------------------------------------------------------------------------------
# field helpers shared by formats


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


def _registry() -> Any:
    from .plugins import get_plugins  # late import: plugins imports hookspecs only, but keep it lazy

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


#: the CounterFact train split next to a checkout: IKE's demonstration pool, WISE's negative subjects.
COUNTERFACT_TRAIN = "counterfact:../shared/data/counterfact/train.json"


def resolve_packaged_spec(spec: str, what: str, hparam: str, optional: bool = False) -> str:
    """``FORMAT:PATH`` with a relative PATH tried from the working directory, then from the medit
    checkout (so method defaults such as ``counterfact:../shared/data/...`` work from either).
    A missing file is a one-line MethodError naming ``what`` and the hparam that sets it (and,
    when ``optional``, that null turns it off)."""
    from .errors import MethodError

    fmt, sep, path = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else ("", "", spec)
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute():
        alt = Path(__file__).resolve().parents[2] / path
        if alt.exists():
            p = alt
    if not p.exists():
        alt_fix = f", or --set {hparam}=null to go without" if optional else ""
        raise MethodError(f"{what} {path!r} does not exist; pass --set {hparam}=FORMAT:PATH "
                          f"(e.g. {COUNTERFACT_TRAIN}){alt_fix}")
    return f"{fmt}{sep}{p}"


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
                 seed: int | None = None) -> tuple[list[EditRequest], DatasetInfo]:
    """Read ``PATH`` (format auto-detected) or ``FORMAT:PATH`` and select cases.

    With ``seed`` the cases are shuffled deterministically (``random.Random(seed)``) before the
    ``offset``/``n`` slice is taken. ``n`` larger than what remains yields what remains
    (``DatasetInfo.n`` says how many). Raises :class:`InputFileError`, :class:`ValidationError`
    or :class:`UnknownNameError` with messages naming the file, line, case id and field.
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValidationError(f"the number of cases n must be a positive integer (or unset for all), "
                              f"got {n!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValidationError(f"offset must be an integer >= 0, got {offset!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValidationError(f"seed must be an integer (or unset for file order), got {seed!r}")

    name, path = parse_spec(spec)
    check_file(path)
    if name is None:
        name = _detect(path)
    fmt = get_format(name)
    result = fmt.load(path)
    requests = list(result.requests)
    if not requests:
        raise InputFileError(f"dataset file '{path}' yielded no edit requests as format {name!r}"
                             + (f" ({result.skipped} records skipped)" if result.skipped else "")
                             + "; check that the file holds records of that format")
    _check_unique_ids(path, requests)
    if offset >= len(requests):
        raise ValidationError(f"offset {offset} is past the end of dataset file '{path}' "
                              f"({len(requests)} cases); use an offset below {len(requests)}")
    chosen = select(requests, n=n, offset=offset, seed=seed)
    info = DatasetInfo(path=str(path.resolve()), format=name, fingerprint=file_fingerprint(path),
                       n_total=len(requests), n=len(chosen), offset=offset, seed=seed,
                       skipped=result.skipped)
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
