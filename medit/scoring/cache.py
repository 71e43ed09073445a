"""Disk cache of pre-edit scores.

Pre-edit scores depend only on the unedited model and the queries, not on the editing method, so
one computation serves every method evaluated on the same model and data. An entry is keyed by the
model's current weights (fingerprint), its tokenizer, dtype and device type, the exact queries,
the protocols, the generation length and the scoring batch size (padding changes the last bits of
a log-prob). It lives under ``$MEDIT_CACHE/scores/<model fingerprint>/``, is written atomically,
and an entry that cannot be read or whose key does not match is recomputed and overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from medit.core.queries import DistQuery, GenQuery, NextToken, Progress, TFQuery, TFResult
from medit.scoring.dists import ITEM, DistFile

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle
    from medit.scoring.engine import Scorer

FORMAT = 1  # the file is still a safetensors file, written row by row


def tokenizer_fingerprint(tok: Any) -> str:
    """A stable id of a tokenizer's behaviour (its serialised fast tokenizer, or its vocabulary)."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([str(getattr(tok, a, None)) for a in ("bos_token", "eos_token", "pad_token",
                                                               "add_bos_token", "add_eos_token")]).encode())
    return h.hexdigest()[:16]


def model_fingerprint(handle: "ModelHandle") -> str:
    """The fingerprint of the model's weights as they are now (never a memo taken before an edit)."""
    return handle.fingerprint([n for n, _ in handle.model.named_parameters()])


def _canon(q: Any) -> list[Any]:
    if isinstance(q, TFQuery):
        return ["tf", q.prompt, q.target]
    if isinstance(q, GenQuery):
        return ["gen", q.prompt, q.max_new_tokens]
    if isinstance(q, DistQuery):
        return ["dist", q.prompt]
    raise TypeError(f"cannot cache {q!r}")


def cache_key(handle: "ModelHandle", scorer: "Scorer", queries: Sequence[Any],
              settings: dict[str, Any], model_fp: str | None = None) -> dict[str, Any]:
    """Everything the cached results depend on (compared in full when an entry is read)."""
    canon = sorted({json.dumps(_canon(q)) for q in queries})
    return {"format": FORMAT, "model": model_fp or model_fingerprint(handle),
            "model_type": str(handle.config.model_type), "tokenizer": tokenizer_fingerprint(handle.tokenizer),
            "dtype": str(handle.dtype), "device": handle.device.type, "score_batch_size": scorer.batch_size,
            "engine": scorer.engine,
            "settings": {k: settings[k] for k in sorted(settings)},
            "queries": hashlib.sha256("\n".join(canon).encode()).hexdigest(), "n_queries": len(canon)}


def cache_path(key: dict[str, Any]) -> Path:
    from medit.core.io import cache_dir
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir("scores") / key["model"] / f"{digest}.safetensors"


def _entries(results: dict[Any, Any]) -> tuple[str, list[Any]]:
    """The results as JSON entries, and the distributions in the order the entries number them."""
    entries: list[list[Any]] = []
    dists: list[Any] = []
    for q, r in results.items():
        if isinstance(q, TFQuery):
            entries.append(_canon(q) + [list(r.target_ids), list(r.logprobs), list(r.argmax)])
        elif isinstance(q, GenQuery):
            entries.append(_canon(q) + [r])
        elif isinstance(q, DistQuery):
            entries.append(_canon(q) + [len(dists)])
            dists.append(r)
    return json.dumps(entries), dists


def _decode(text: str, table: DistFile) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for e in json.loads(text):
        kind = e[0]
        if kind == "tf":
            out[TFQuery(e[1], e[2])] = TFResult(tuple(e[3]), tuple(float(x) for x in e[4]), tuple(e[5]))
        elif kind == "gen":
            out[GenQuery(e[1], int(e[2]))] = str(e[3])
        elif kind == "dist":
            out[DistQuery(e[1])] = NextToken(source=table, row=int(e[2]))
        else:
            raise ValueError(f"unknown entry kind {kind!r}")
    return out


def load(path: Path, key: dict[str, Any], queries: Sequence[Any]) -> dict[Any, Any] | None:
    """The cached results for ``key`` when present, intact and complete; else None. Distributions
    stay in the file and are read when asked for (:mod:`medit.scoring.dists`)."""
    if not path.is_file():
        return None
    try:
        handle = open(path, "rb", buffering=0)
    except OSError:
        return None
    ok = False
    try:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        meta = header.get("__metadata__") or {}
        if json.loads(meta.get("key", "null")) != key:
            return None
        spec = header["dists"]
        rows, width = (int(x) for x in spec["shape"])
        start, end = (int(x) for x in spec["data_offsets"])
        if spec["dtype"] != "F16" or end - start != rows * width * ITEM:
            return None
        if os.fstat(handle.fileno()).st_size < 8 + size + end:  # truncated
            return None
        res = _decode(meta["results"], DistFile(handle, 8 + size + start, width, rows))
        ok = not any(q not in res for q in queries)
    except Exception:  # truncated, corrupt or from another version: recompute
        return None
    finally:
        if not ok:
            handle.close()
    return res if ok else None


def store(path: Path, key: dict[str, Any], results: dict[Any, Any]) -> None:
    """Write an entry atomically (temporary file in the same folder, then rename), one
    distribution at a time: a safetensors file whose tensor ``dists`` holds them as rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text, dists = _entries(results)
    width = dists[0].logprobs.numel() if dists else 1
    rows = max(1, len(dists))
    header = json.dumps({"__metadata__": {"key": json.dumps(key), "results": text},
                         "dists": {"dtype": "F16", "shape": [rows, width],
                                   "data_offsets": [0, rows * width * ITEM]}}).encode()
    header += b" " * (-len(header) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for d in dists:
                f.write(d.logprobs.to(torch.float16).contiguous().numpy().tobytes())
            if not dists:
                f.write(bytes(ITEM))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # the cache is an optimisation: a failed write costs a recompute


def cached_run(handle: "ModelHandle", scorer: "Scorer", queries: Sequence[Any], settings: dict[str, Any],
               progress: Progress | None = None, enabled: bool = True,
               model_fp: str | None = None) -> tuple[dict[Any, Any], bool]:
    """Score ``queries`` on the unedited model, through the disk cache when ``enabled``.

    Returns (query -> result, whether the results came from the cache). Next-token distributions
    are not held in memory but read from a file when asked for (:mod:`medit.scoring.dists`).
    """
    if enabled:
        key = cache_key(handle, scorer, queries, settings, model_fp)
        path = cache_path(key)
        hit = load(path, key, queries)
        if hit is not None:
            if progress is not None:
                progress(1.0, 1.0)
            return hit, True
    with scorer.dists_in(DistFile.temporary()):
        res = scorer.run(queries, progress=progress)
    if enabled:
        store(path, key, res)
    return res, False
