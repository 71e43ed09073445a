"""Datasets the way users have them besides JSON files: a folder written by the ``datasets``
library (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``) or a Hugging Face hub id.

:func:`find_source` turns the PATH of a dataset spec into the records of such a dataset, which
:func:`~medit.core.dataset.load_dataset` then hands to the format as if read from a file (each
row is one record; fields whose value is null are left out, as ``datasets`` fills absent fields
with null). The spec forms:

- ``[FORMAT:]FOLDER`` or ``[FORMAT:]FOLDER:SPLIT``: a folder written by ``save_to_disk``. A
  ``DatasetDict`` with several splits needs ``:SPLIT``.
- ``FORMAT:OWNER/NAME`` or ``FORMAT:OWNER/NAME:SPLIT``: a dataset on the Hugging Face hub, loaded
  with ``datasets.load_dataset`` (online, or offline from the ``datasets`` cache). The format must
  be named, so that a mistyped relative path is never sent to the hub unasked.

Both need the optional ``datasets`` package; without it, or offline, the error is one line that
names the local-file alternative.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medit.errors import InputFileError
from medit.core.records import RawRecord

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
SPLIT_RE = re.compile(r"^[A-Za-z0-9_][\w.-]*$")
#: a PATH ending like this names a file, never a hub id
FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zip")
#: files ``save_to_disk`` writes into the folder of a Dataset / DatasetDict
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class HFSource:
    """A dataset read with the ``datasets`` library, as records."""

    label: str  # where it came from: "OWNER/NAME:SPLIT" or "/abs/folder[:SPLIT]"
    kind: str  # "saved" or "hub"
    records: list[RawRecord]
    fingerprint: str  # sha256 of the rows as canonical JSON, first 16 hex characters

    @property
    def key(self) -> Path:
        """The path under which the records are provided to the format."""
        return Path(self.label)


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return folder.is_dir() and any((folder / m).is_file() for m in SAVED_MARKERS)


def looks_like_hub_id(text: str) -> bool:
    """``OWNER/NAME`` or ``OWNER/NAME:SPLIT``, not a file name."""
    hub_id, _, split = text.partition(":")
    return (bool(HUB_ID_RE.match(hub_id)) and not hub_id.lower().endswith(FILE_SUFFIXES)
            and (not split or bool(SPLIT_RE.match(split))))


def find_source(text: str, fmt: str | None) -> HFSource | None:
    """The dataset ``text`` names when it is a saved ``datasets`` folder or (with ``fmt`` given) a
    hub id; None when it is anything else (a file, or a path that does not exist)."""
    p = Path(text).expanduser()
    if p.is_file():
        return None
    if is_saved_dataset(p):
        return _from_saved(p, None, fmt)
    if ":" in text:
        left, _, split = text.rpartition(":")
        folder = Path(left).expanduser()
        if SPLIT_RE.match(split) and is_saved_dataset(folder):
            return _from_saved(folder, split, fmt)
    if fmt is not None and not p.exists() and looks_like_hub_id(text):
        hub_id, _, split = text.partition(":")
        return _from_hub(hub_id, split or None, fmt)
    return None


def _local_hint(fmt: str | None) -> str:
    prefix = f"{fmt}:" if fmt else ""
    return (f"pass a local file instead (e.g. {prefix}path/to/cases.json) or a folder written by "
            f"the datasets library's save_to_disk")


def _import_datasets(what: str, fmt: str | None) -> Any:
    try:
        import datasets
    except ImportError:
        raise InputFileError(f"reading {what} needs the optional `datasets` package, which is not installed; "
                             f"install it (pip install datasets) or {_local_hint(fmt)}") from None
    return datasets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    msg = msg if len(msg) <= 160 else msg[:157] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _pick_split(obj: Any, split: str | None, what: str, spec: str) -> tuple[Any, str | None]:
    """The Dataset to read from ``obj`` (a Dataset or a DatasetDict) and its split name."""
    if isinstance(obj, dict):  # DatasetDict is a dict of split name -> Dataset
        names = list(obj)
        if split is None:
            if len(names) != 1:
                raise InputFileError(f"{what} has the splits {', '.join(names) or '(none)'}; name one as "
                                     f"{spec}:SPLIT, e.g. {spec}:{names[0] if names else 'train'}")
            split = names[0]
        if split not in obj:
            raise InputFileError(f"{what} has no split {split!r}; its splits are {', '.join(names)}")
        return obj[split], split
    if split is not None:
        raise InputFileError(f"{what} is a single dataset without splits; drop ':{split}' from the spec")
    return obj, None


def _as_source(ds: Any, label: str, kind: str) -> HFSource:
    rows = [{k: v for k, v in dict(row).items() if v is not None} for row in ds]
    if not rows:
        raise InputFileError(f"dataset {label!r} holds no rows; it must hold at least one edit record")
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode())
    records = [RawRecord(row, i, 0, f"{label}, record {i}") for i, row in enumerate(rows)]
    return HFSource(label, kind, records, digest.hexdigest()[:16])


def _from_saved(folder: Path, split: str | None, fmt: str | None) -> HFSource:
    what = f"the saved dataset folder '{folder}'"
    datasets = _import_datasets(what, fmt)
    try:
        obj = datasets.load_from_disk(str(folder))
    except Exception as exc:  # a damaged or foreign folder
        raise InputFileError(f"cannot read {what} with datasets.load_from_disk ({_first_line(exc)}); save it "
                             f"again with save_to_disk or {_local_hint(fmt)}") from None
    ds, split = _pick_split(obj, split, what, str(folder))
    label = str(folder.resolve()) + (f":{split}" if split else "")
    return _as_source(ds, label, "saved")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_resolvable() -> bool:
    """Whether the hub's host name resolves (a quick test for no network, instead of ``datasets``
    retrying for half a minute)."""
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _from_hub(hub_id: str, split: str | None, fmt: str) -> HFSource:
    what = f"the Hugging Face dataset {hub_id!r}"
    datasets = _import_datasets(what, fmt)
    if not _offline() and not _hub_resolvable():
        raise InputFileError(f"dataset {hub_id!r} is not a local file or folder, and the Hugging Face hub cannot be "
                             f"reached from here (no network; a dataset already in the datasets cache loads with "
                             f"HF_HUB_OFFLINE=1); {_local_hint(fmt)}")
    try:
        obj = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # offline, unknown id, no access, unknown split
        raise InputFileError(f"dataset {hub_id!r} is not a local file or folder, and loading it from the "
                             f"Hugging Face hub failed ({_first_line(exc)}); offline or without access, "
                             f"{_local_hint(fmt)}") from None
    # with a split named, load_dataset returns that split's Dataset
    ds, split = (obj, split) if split and not isinstance(obj, dict) else _pick_split(obj, split, what, f"{fmt}:{hub_id}")
    return _as_source(ds, f"{hub_id}:{split}" if split else hub_id, "hub")
