"""The files of a learned editor's checkpoint that hold tensors: ``editor.safetensors`` (the
editor weights) and the resume state ``last.safetensors`` + ``last.json`` (see
:mod:`medit.toolkit.training` for the folder). Only safetensors and JSON: loading never runs code
from a file. Each file is written atomically (temporary file, fsync, rename).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medit.core.io import atomic_write_text, atomic_write_with, sha256_file
from medit.errors import CheckpointError

#: 2: the resume state is safetensors + JSON (``last.safetensors``, ``last.json``), not ``torch.save``.
CHECKPOINT_VERSION = 2
LAST = "last.safetensors"
LAST_JSON = "last.json"
STATE_FORMAT = "medit-training-state"


def save_editor(path: Path, editor: nn.Module) -> None:
    """Write ``editor``'s weights to ``path`` (safetensors), atomically."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu().clone() for k, v in editor.state_dict().items()}

    def write(tmp: str) -> None:
        save_file(state, tmp)
    atomic_write_with(path, write)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Training state as JSON + named tensors. Tensors become {"__tensor__": name} (stored in the
# safetensors file), tuples {"__tuple__": [...]}, dicts with non-string keys (the optimiser's
# per-parameter state) {"__items__": [[key, value], ...]}; plain JSON values stay as they are.
# Decoding builds only tensors, lists, tuples, dicts and JSON scalars: nothing is executed.
_TAGS = ("__tensor__", "__tuple__", "__items__")


def _join(name: str, key: Any) -> str:
    return f"{name}/{key}" if name else str(key)


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = name if name not in tensors else f"{name}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(name, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(name, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, _join(name, k), tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, _join(name, f"key{i}"), tensors), _encode(v, _join(name, k), tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the training state ({name})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and next(iter(obj)) in _TAGS:
            tag, value = next(iter(obj.items()))
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__tuple__":
                return tuple(_decode(v, tensors) for v in value)
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_training_state(folder: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (nested dicts, lists, tuples, tensors and JSON scalars) as
    ``folder/last.safetensors`` + ``folder/last.json``, each atomically, the tensors first."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(payload, "", tensors)
    digest: list[str] = []

    def write(tmp: str) -> None:
        save_file(tensors, tmp)
        digest.append(sha256_file(tmp))
    atomic_write_with(folder / LAST, write)
    meta = {"format": STATE_FORMAT, "version": CHECKPOINT_VERSION, "tensors": LAST, "sha256": digest[0],
            "payload": doc}
    atomic_write_text(folder / LAST_JSON, json.dumps(meta) + "\n")


def load_training_state(folder: Path) -> dict[str, Any]:
    """The payload written by :func:`save_training_state`; a one-line CheckpointError naming the
    file when one is missing, damaged or does not match the other. Never runs code from them."""
    from safetensors.torch import load_file

    jpath, tpath = folder / LAST_JSON, folder / LAST
    for p in (jpath, tpath):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {str(folder)!r} has no {p.name}, so it cannot be resumed; "
                                  "train again into a new --out (its editor.safetensors, if any, still edits)")
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"training state {str(jpath)!r} is unreadable ({first_line(exc)}); it cannot be "
                              "resumed: train again into a new --out") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or "payload" not in meta:
        raise CheckpointError(f"{str(jpath)!r} is not a medit training state; it cannot be resumed: train again "
                              "into a new --out")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"training state {str(jpath)!r} has version {meta.get('version')!r}, this medit "
                              f"resumes version {CHECKPOINT_VERSION}; resume it with the medit that wrote it or "
                              "train again")
    if sha256_file(tpath) != meta.get("sha256"):
        raise CheckpointError(f"training state {str(tpath)!r} does not match the SHA-256 recorded in "
                              f"{LAST_JSON} (damaged, altered or cut short by an interrupted save); it cannot "
                              "be resumed: train again into a new --out")
    try:
        tensors = load_file(str(tpath))
    except Exception as exc:  # SafetensorError, OSError...: the file is not a safetensors file
        raise CheckpointError(f"training state {str(tpath)!r} is not a readable safetensors file "
                              f"({first_line(exc)}); it cannot be resumed: train again into a new --out") from None
    try:
        payload = _decode(meta["payload"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"training state {str(jpath)!r} is inconsistent ({first_line(exc)}); it cannot "
                              "be resumed: train again into a new --out") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{str(jpath)!r} is not a medit training state; it cannot be resumed: train again "
                              "into a new --out")
    return payload
