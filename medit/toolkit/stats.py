"""Covariance statistics: the second moment E[k kᵀ] of a rewrite module's input keys.

One implementation for every method that needs it. All requested layers are collected in one
streamed pass over the corpus; the forward pass stops once the deepest requested layer has been
traced. Results are cached on disk keyed by model fingerprint, corpus fingerprint, layer,
sample count, max length and dtype; an entry for other settings is never reused and a corrupt
one is recomputed.

On CUDA the corpus pass uses TF32 matrix products unless ``tf32=False`` (about 4x faster on
fp32 weights; its rounding, ~1e-3 relative per product with fp32 accumulation, is far below the
sampling error of a 1,000-paragraph estimate). Such entries are cached under their own tag
(``float32-tf32``). Cache files are written by a background thread so the caller can edit at
once; a later read of the same file waits for its write.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from medit.core import distributed
from medit.errors import InputFileError, MeditError
from medit.core.timing import setup_phase
from medit.model.tracing import capture, run_until

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle

STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: The default statistics corpus: WikiText-2's validation text, shipped in the package
#: (medit/datasets/DATA.md), so that statistics never need the network. A relative path, tried
#: from the working directory and then from the folder holding the medit package. A Hugging Face
#: dataset is used only when named (e.g. --stats-corpus wikitext:wikitext-103-raw-v1).
PACKAGED_CORPUS = "medit/datasets/wikitext-2-valid.txt"


@dataclass(frozen=True)
class Corpus:
    """A text corpus: a local .txt (one paragraph per line) or .jsonl (``text`` field) file, or a
    Hugging Face dataset ``name[:config]`` (online only). A relative path that does not exist from
    the working directory is tried from the folder holding the medit package (:data:`PACKAGED_CORPUS`)."""

    spec: str

    @property
    def is_local(self) -> bool:
        return self.resolved().exists() or self.spec.endswith((".txt", ".jsonl", ".json"))

    def resolved(self) -> Path:
        """The file this corpus names (which may not exist)."""
        from medit.core.dataset import packaged_path
        return packaged_path(self.spec)

    def check(self) -> None:
        """Raise the one-line error of a local corpus file that does not exist (a hub name is
        checked only when it is streamed)."""
        if self.is_local:
            self._path()

    def fingerprint(self) -> str:
        if self.is_local:
            p = self._path()
            return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        return hashlib.sha256(self.spec.encode()).hexdigest()[:16]

    def _path(self) -> Path:
        p = self.resolved()
        if not p.is_file():
            raise InputFileError(f"statistics corpus {self.spec!r} does not exist; pass a text or JSONL file "
                                 f"with --stats-corpus, or leave the option out to use the WikiText-2 text "
                                 f"medit ships ({PACKAGED_CORPUS})")
        return p

    def paragraphs(self, n: int) -> list[str]:
        """The first ``n`` non-empty paragraphs (WikiText headings skipped)."""
        out: list[str] = []
        for text in self._iter():
            text = text.strip()
            if not text or (text.startswith("=") and text.endswith("=")):
                continue
            out.append(text)
            if len(out) >= n:
                break
        if not out:
            raise InputFileError(f"statistics corpus {self.spec!r} holds no text; pass a non-empty corpus")
        return out

    def _iter(self) -> Iterator[str]:
        if self.is_local:
            p = self._path()
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if p.suffix in (".jsonl", ".json") and line.lstrip().startswith("{"):
                        try:
                            yield str(json.loads(line).get("text", ""))
                        except json.JSONDecodeError:
                            raise InputFileError(f"statistics corpus {self.spec!r} has a malformed JSON line; "
                                                 "fix it or use a plain text file") from None
                    else:
                        yield line
            return
        try:
            import datasets  # type: ignore[import-not-found]
        except ImportError:
            raise MeditError(f"statistics corpus {self.spec!r} is not a local file and the `datasets` package is "
                             "not installed; pass a local text file with --stats-corpus") from None
        name, _, config = self.spec.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        except Exception as exc:  # offline or unknown name
            raise MeditError(f"cannot load statistics corpus {self.spec!r} from the hub ({type(exc).__name__}); "
                             "pass a local text file with --stats-corpus") from None
        for row in ds:
            yield str(row.get("text", ""))


def corpus_record(spec: str) -> dict[str, str | None]:
    """Which statistics corpus ``spec`` names, for run manifests: the spec, the file it resolves to
    (None for a hub dataset) and the fingerprint that keys the statistics cache (None when the
    file is missing)."""
    c = Corpus(spec)
    path = str(c.resolved().resolve()) if c.is_local else None
    try:
        fp: str | None = c.fingerprint()
    except MeditError:
        fp = None
    return {"spec": spec, "path": path, "fingerprint": fp}


def _cache_path(handle: "ModelHandle", corpus_fp: str, layer: int, n: int, max_len: int, dtype: str) -> Path:
    from medit.core.io import cache_dir
    name = f"{handle.adapter.name}-mlp_out-L{layer}-n{n}-len{max_len}-{dtype}.safetensors"
    return cache_dir("stats") / handle.fingerprint() / corpus_fp / name


_writes: dict[Path, threading.Thread] = {}


def _save_later(path: Path, mat: torch.Tensor, meta: dict[str, str]) -> None:
    """Write ``mat`` to ``path`` atomically in a (non-daemon, so never cut off at exit) thread."""
    from safetensors.torch import save_file

    def write() -> None:  # ``mat`` is safe to read meanwhile: statistics are never modified in place
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes computing the same entry never share it
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"mom2": mat.contiguous().cpu()}, str(tmp), metadata=meta)
            tmp.replace(path)
        except OSError as exc:  # the statistics are in memory; only the cache entry is lost
            tmp.unlink(missing_ok=True)
            sys.stderr.write(f"medit: statistics not cached at {path} ({exc}); free space or set MEDIT_CACHE\n")

    wait_for_writes(path)
    t = _writes[path] = threading.Thread(target=write, name=f"medit-stats-write-{path.name}")
    t.start()


def wait_for_writes(path: Path | None = None) -> None:
    """Block until the background write of ``path`` (or of every statistics file) has finished."""
    for p in ([path] if path is not None else list(_writes)):
        t = _writes.pop(p, None)
        if t is not None:
            t.join()


def effective_dtype(handle: "ModelHandle", dtype: str, tf32: bool) -> str:
    """The cache tag for these settings: TF32 only changes results on CUDA."""
    return f"{dtype}-tf32" if tf32 and handle.device.type == "cuda" else dtype


@contextlib.contextmanager
def _matmul_precision(level: str) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _load_cached(path: Path, expect: dict[str, str]) -> torch.Tensor | None:
    from safetensors import safe_open
    wait_for_writes(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in expect.items()):
                return None
            return f.get_tensor("mom2")
    except Exception:  # corrupt or truncated: recompute
        return None


def second_moments(handle: "ModelHandle", layers: Sequence[int], corpus: str, n_samples: int = 1000,
                   max_len: int = 128, dtype: str = "float32", batch_size: int = 16,
                   progress: bool = True, tf32: bool = True) -> tuple[dict[int, torch.Tensor], float]:
    """E[k kᵀ] of the ``mlp_out`` input at each layer, from ``n_samples`` corpus paragraphs.

    Returns ({layer: matrix on the model's device}, seconds spent computing; 0 when all cached).
    The time, cache reads included, counts as setup (``stats_s``), not as edit time.
    """
    with setup_phase("stats"):
        return _second_moments(handle, layers, corpus, n_samples, max_len, dtype, batch_size, progress, tf32)


@dataclass
class SecondMoments:
    """Run state: one model's statistics on its device, by (layer, corpus fingerprint, samples,
    max length, dtype), so a run reads each cache file once."""

    by_key: dict[tuple[int, str, int, int, str], torch.Tensor] = field(default_factory=dict)


def _second_moments(handle: "ModelHandle", layers: Sequence[int], corpus: str, n_samples: int,
                    max_len: int, dtype: str, batch_size: int, progress: bool,
                    tf32: bool) -> tuple[dict[int, torch.Tensor], float]:
    if dtype not in STATS_DTYPES:
        raise MeditError(f"statistics dtype {dtype!r} is not supported; use one of {', '.join(STATS_DTYPES)}")
    acc_dtype = STATS_DTYPES[dtype]
    dtype = effective_dtype(handle, dtype, tf32)
    for layer in layers:
        handle.check_layer(layer, what="statistics layer")
    c = Corpus(corpus)
    cfp = c.fingerprint()
    kept = handle.state(SecondMoments).by_key
    result: dict[int, torch.Tensor] = {}
    missing: list[int] = []
    for layer in sorted(set(layers)):
        if (layer, cfp, n_samples, max_len, dtype) in kept:
            result[layer] = kept[layer, cfp, n_samples, max_len, dtype]
            continue
        expect = {"model": handle.fingerprint(), "corpus": cfp, "layer": str(layer), "n_samples": str(n_samples),
                  "max_len": str(max_len), "dtype": dtype}
        cached = _load_cached(_cache_path(handle, cfp, layer, n_samples, max_len, dtype), expect)
        if cached is not None:
            result[layer] = kept[layer, cfp, n_samples, max_len, dtype] = cached.to(handle.device)
        else:
            missing.append(layer)
    if distributed.collective_world() > 1:  # torchrun ranks sharing the pass: compute what any rank lacks
        missing = sorted(set().union(*distributed.all_gather_objects(missing)))
    if not missing:
        return result, 0.0
    t0 = time.perf_counter()
    with _matmul_precision("high" if dtype.endswith("-tf32") else "highest"):
        computed, count = _compute(handle, missing, c.paragraphs(n_samples), max_len, acc_dtype, batch_size, progress)
    seconds = time.perf_counter() - t0
    ranks = distributed.collective_world()
    for layer, mat in computed.items():
        meta = {"model": handle.fingerprint(), "corpus": cfp, "corpus_spec": corpus, "layer": str(layer),
                "n_samples": str(n_samples), "max_len": str(max_len), "dtype": dtype, "tokens": str(count),
                "seconds": f"{seconds:.3f}"}
        path = _cache_path(handle, cfp, layer, n_samples, max_len, dtype)
        if ranks == 1 or distributed.rank() == 0:  # rank 0 writes the cache entry; the others wait for it
            _save_later(path, mat, meta)
            if ranks > 1:
                wait_for_writes(path)
        result[layer] = kept[layer, cfp, n_samples, max_len, dtype] = mat
    if ranks > 1:
        distributed.barrier()
    return result, seconds


def cache_file(handle: "ModelHandle", layer: int, corpus: str, n_samples: int, max_len: int, dtype: str,
               tf32: bool = True) -> Path:
    """Where the statistics for these settings are (or would be) cached (once written)."""
    path = _cache_path(handle, Corpus(corpus).fingerprint(), layer, n_samples, max_len,
                       effective_dtype(handle, dtype, tf32))
    wait_for_writes(path)
    return path


@torch.no_grad()
def _compute(handle: "ModelHandle", layers: list[int], texts: list[str], max_len: int, dtype: torch.dtype,
             batch_size: int, progress: bool) -> tuple[dict[int, torch.Tensor], int]:
    from medit.core.progress import progress_bar

    tok = handle.tokenizer
    encoded = [tok(t, truncation=True, max_length=max_len).input_ids for t in texts]
    encoded = [e for e in encoded if e]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding per batch
    d = handle.weight_out_in("mlp_out", layers[0]).shape[1]
    acc = {layer: torch.zeros(d, d, dtype=dtype, device=handle.device) for layer in layers}
    count = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # torchrun ranks sharing the pass (medit.core.distributed.shared): batch b on rank b mod world,
    # the sums and the token count added up over the ranks at the end
    ranks, me = distributed.collective_world(), distributed.rank()
    starts = distributed.shard(range(0, len(order), batch_size), ranks, me if ranks > 1 else 0)
    bar = progress_bar(sum(len(encoded[i]) for b in starts for i in order[b:b + batch_size]),
                       f"statistics L{','.join(map(str, layers))}", "tok", progress, unit_scale=True)
    try:
        for start in starts:
            batch = [encoded[i] for i in order[start:start + batch_size]]
            width = max(len(b) for b in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, b in enumerate(batch):
                ids[i, :len(b)] = torch.tensor(b)
                mask[i, :len(b)] = 1
            ids, mask = ids.to(handle.device), mask.to(handle.device)
            with capture(handle, "mlp_out", layers, what="input", stop=True) as store:
                run_until(handle, lambda: handle.model(input_ids=ids, attention_mask=mask, use_cache=False))
            sel = mask.bool()
            for layer in layers:
                k = store[layer][sel].to(dtype)
                acc[layer].addmm_(k.T, k)
            n_tok = int(sel.sum())
            count += n_tok
            bar.update(n_tok)
    finally:
        bar.close()
    if ranks > 1:
        for layer in layers:
            distributed.all_reduce_sum(acc[layer])
        total = distributed.all_reduce_sum(torch.tensor([count], dtype=torch.float64, device=handle.device))
        count = int(total.item())
    return {layer: (m / count).to(torch.float32) for layer, m in acc.items()}, count
