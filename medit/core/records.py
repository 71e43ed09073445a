"""Reading the records of a JSON-list or JSONL dataset file, with errors that name the file and,
where there is one, the line. Re-exported by :mod:`medit.core.dataset`, which formats import."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medit.errors import InputFileError


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a JSON list or a JSONL line, with where it came from."""

    data: dict[str, Any]
    index: int  # 0-based position among the file's records
    line: int  # 1-based line on which the record starts
    where: str  # "PATH:LINE" for JSONL, "PATH:LINE, record INDEX" for a JSON list
    jsonl: bool = False  # read from a JSON Lines file (else from a JSON list)
    #: set when reading leniently: why this line is not a record (``data`` is then empty)
    error: str | None = None


class MalformedFileError(InputFileError):
    """The file exists and is readable but is not valid JSON / JSONL / UTF-8."""


def check_file(path: Path) -> None:
    """Raise :class:`InputFileError` unless ``path`` is an existing regular file."""
    if not path.exists():
        raise InputFileError(f"dataset file '{path}' does not exist; check the path (relative paths "
                             f"are resolved from the current directory '{os.getcwd()}')")
    if path.is_dir():
        raise InputFileError(f"dataset path '{path}' is a directory, not a file; pass the path of a "
                             f".json or .jsonl file inside it")
    if not path.is_file():
        raise InputFileError(f"dataset path '{path}' is not a regular file; pass the path of a .json "
                             f"or .jsonl file")


def _read_bytes(path: Path) -> bytes:
    check_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"dataset file '{path}' cannot be read ({exc.strerror or exc}); check "
                             f"its permissions") from None


def _read_text(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise MalformedFileError(f"dataset file '{path}' line {line} is not valid UTF-8 ({exc.reason}); "
                             f"save the file as UTF-8") from None


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of the file's bytes, first 16 hex characters."""
    return hashlib.sha256(_read_bytes(Path(path))).hexdigest()[:16]


def _type_name(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(x), type(x).__name__)


def _parse_jsonl(path: Path, text: str, lenient: bool = False) -> list[RawRecord]:
    out: list[RawRecord] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        error = None
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            error = (f"dataset file '{path}' line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                     f"each non-blank line must hold one JSON object (lines starting with '#' are comments)")
        else:
            if not isinstance(obj, dict):
                error = (f"dataset file '{path}' line {lineno} holds {_type_name(obj)}, not a JSON object; "
                         f"each non-blank line must hold one edit record")
        if error is not None:
            if not lenient:
                raise MalformedFileError(error)
            obj = {}
        out.append(RawRecord(obj, len(out), lineno, f"{path}:{lineno}", jsonl=True, error=error))
    return out


def _record_lines(text: str) -> list[int] | None:
    """1-based start line of each element of the (valid) top-level JSON list in ``text``."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    try:
        i = 0
        while text[i] in ws:
            i += 1
        i += 1  # '['
        lines: list[int] = []
        line, pos = 1, 0
        while True:
            while text[i] in ws:
                i += 1
            if text[i] == "]":
                return lines
            line += text.count("\n", pos, i)
            pos = i
            lines.append(line)
            _, i = dec.raw_decode(text, i)
            while text[i] in ws:
                i += 1
            if text[i] == ",":
                i += 1
    except (IndexError, ValueError):
        return None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedFileError(f"dataset file '{path}' is not valid JSON: line {exc.lineno} column "
                             f"{exc.colno}: {exc.msg}; fix the file (a JSON list of records, or one "
                             f"JSON object per line in a .jsonl file)") from None


def _parse_json_list(path: Path, text: str, obj: list[Any]) -> list[RawRecord]:
    lines = _record_lines(text) or [0] * len(obj)
    out: list[RawRecord] = []
    for i, (item, line) in enumerate(zip(obj, lines)):
        where = f"{path}:{line}, record {i}" if line else f"{path}, record {i}"
        if not isinstance(item, dict):
            raise MalformedFileError(f"dataset file '{path}' record {i}" + (f" (line {line})" if line else "")
                                 + f" is {_type_name(item)}, not a JSON object; the file must be a "
                                   f"list of edit records")
        out.append(RawRecord(item, i, line, where))
    return out


#: records standing in for a file (a Hugging Face dataset being read), by path string
_PROVIDED: dict[str, list[RawRecord]] = {}


@contextlib.contextmanager
def provided_records(path: Path, records: list[RawRecord]) -> Iterator[None]:
    """While active, :func:`read_records` of ``path`` returns ``records`` instead of reading a file.

    This is how a dataset that is not a JSON file (a Hugging Face dataset) reaches the formats,
    which read their records with :func:`read_records`.
    """
    _PROVIDED[str(path)] = records
    try:
        yield
    finally:
        _PROVIDED.pop(str(path), None)


def read_records(path: str | os.PathLike[str], lenient: bool = False) -> list[RawRecord]:
    """Read the records of a JSON-list or JSONL file, with file/line-naming errors.

    A file whose content starts with ``[`` is a JSON list; a ``.json`` file holding one JSON value
    is read as JSON; anything else is read as JSONL (blank lines and ``#`` lines skipped).
    Raises :class:`InputFileError` for a missing, unreadable, malformed, empty or record-less file.
    With ``lenient``, a JSONL line that is not a JSON object does not raise: it is returned as a
    record whose ``error`` says why (so that a bad line outside the cases selected can be passed
    over); a JSON list that does not parse still raises, as its records cannot be told apart.
    """
    p = Path(path)
    if str(p) in _PROVIDED:
        return list(_PROVIDED[str(p)])
    text = _read_text(p)
    stripped = text.lstrip()
    if not stripped:
        raise InputFileError(f"dataset file '{p}' is empty; it must hold at least one edit record")
    if stripped.startswith("["):
        obj = _parse_json(p, text)
        records = _parse_json_list(p, text, obj)
    elif p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            records = _parse_jsonl(p, text, lenient)  # JSON Lines stored under a .json name
        else:
            if isinstance(obj, dict):
                raise MalformedFileError(f"dataset file '{p}' holds a single JSON object, not a list of "
                                     f"records; wrap the records in [ ... ] or write one per line "
                                     f"(JSONL)")
            raise MalformedFileError(f"dataset file '{p}' holds {_type_name(obj)}, not a list of records; "
                                 f"write a JSON list of edit records or one record per line (JSONL)")
    else:
        records = _parse_jsonl(p, text, lenient)
    if not records:
        raise InputFileError(f"dataset file '{p}' holds no records (only blank lines, comments or an "
                             f"empty list); it must hold at least one edit record")
    return records


def first_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The first record of a JSON-list or JSONL file (errors as :func:`read_records`); a bad JSONL
    line further on does not matter, a file whose first record is bad raises its error."""
    records = read_records(path, lenient=True)
    if records[0].error is not None:
        raise MalformedFileError(records[0].error)
    return records[0].data
