"""Small I/O helpers: atomic writes that honour the user's umask, and incrementally written JSONL."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | Path, directory: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have: ``tempfile`` creates
    files 0600 and folders 0700, which would keep others from reading a shared patch or run."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, fsync it, then rename it into place.
    The temporary file is removed if anything fails, so an interrupted write leaves no residue."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + fsync + rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write_with(path, write)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


class JsonlAppender:
    """Append one JSON object per line; each line is flushed and fsynced before returning."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, obj: Any) -> None:
        self._f.write(json.dumps(obj, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl_records(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, torn) of a JSONL file written by :class:`JsonlAppender`. A crash mid-write leaves
    a fragment as the last line: it is dropped and ``torn`` is True. A bad line with records after
    it is damage, not a crash: :class:`~medit.errors.InputFileError` naming the line."""
    from medit.errors import InputFileError

    p = Path(path)
    if not p.exists():
        return [], False
    raw = p.read_bytes()
    lines = raw.decode("utf-8", errors="replace").split("\n")
    out: list[dict[str, Any]] = []
    torn = bool(raw) and not raw.endswith(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == last:
                return out, True
            raise InputFileError(f"{str(p)!r} line {i + 1} is damaged (not a JSON object) and later lines "
                                 "follow it; repair or remove that line, then run again") from None
        out.append(rec)
    return out, torn


def read_jsonl_tolerant(path: str | Path) -> list[dict[str, Any]]:
    """The records of :func:`read_jsonl_records`, a torn last line dropped."""
    return read_jsonl_records(path)[0]


def cache_dir(sub: str) -> Path:
    """``$MEDIT_CACHE`` (default ``~/.cache/medit``) / sub, created on demand."""
    root = Path(os.environ.get("MEDIT_CACHE", Path.home() / ".cache" / "medit"))
    p = root / sub
    p.mkdir(parents=True, exist_ok=True)
    return p
