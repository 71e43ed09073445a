"""Guards that refuse heavy work before it starts, in one sentence instead of an OOM kill.

- :func:`check_model_memory` (called by :func:`~medit.model.loading.load_model` unless
  ``memory_check=False`` / ``--no-memory-check``): estimates the memory a model needs before any
  weight is allocated and refuses one that will not fit.
- :func:`check_lengths` (called by :func:`medit.api.run` and :func:`medit.toolkit.training.train`
  before any editing or scoring): refuses edit cases whose prompts or targets are longer than
  the model's context.

Memory estimate. The parameter count comes from the model's config, by building the model on
torch's ``meta`` device (no memory is allocated; shared weights are counted once); for a GGUF
file not yet converted, from the tensor shapes in the GGUF header; for a folder whose config
cannot be read, from its safetensors headers. Weights take ``parameters × bytes of the dtype``;
a GGUF file is de-quantised to float32 on its first load, so it takes at least 4 bytes per
parameter then. On top of the weights, :data:`WORKING_MARGIN` (a fixed fraction) covers the
working set of editing and scoring: activations, key statistics, saved original weights, edit
deltas. The need is compared with the free memory where the weights go: host memory (the
smaller of ``psutil``'s available memory and the cgroup limit) on CPU, ``torch.cuda.mem_get_info``
on a GPU (a pretrained model passes through host memory first, so that must hold the weights
too), the sum over GPUs and host with ``--device-map auto``. When no estimate can be made (a hub
id that is not reachable), nothing is refused here and the loader reports what went wrong.
"""
from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from medit.errors import ModelError, ValidationError
from medit.model.sources import adapter_for_model_type, gguf_cache, hub_kwargs, model_class

if TYPE_CHECKING:
    from medit.core.adapter import ModelAlias
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest

#: memory needed beyond the weights, as a fraction of the weights (working set of a method).
WORKING_MARGIN = 0.2
#: a text longer than this many characters per context token is refused without tokenising it.
CHARS_PER_TOKEN = 8
#: context length assumed when neither the config nor the tokenizer gives a sane one.
DEFAULT_CONTEXT = 8192
#: a tokenizer ``model_max_length`` above this is transformers' "unknown" placeholder.
_SANE_CONTEXT = 10_000_000
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                      "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ---------------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class MemoryEstimate:
    """What a model needs: ``params`` parameters at ``bytes_per_param`` each, plus the margin."""

    params: int
    bytes_per_param: int
    source: str  # "config", "GGUF header" or "safetensors headers"

    @property
    def weights(self) -> int:
        return self.params * self.bytes_per_param

    @property
    def needed(self) -> int:
        return int(self.weights * (1.0 + WORKING_MARGIN))


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def count_parameters(config: Any) -> int:
    """Parameters (and buffers) of the model ``config`` describes, counted on the meta device."""

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = model_class(config).from_config(config)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def _gguf_parameters(path: Path) -> int:
    import numpy as np
    from gguf import GGUFReader

    return sum(int(np.prod(t.shape)) for t in GGUFReader(str(path)).tensors)


def _safetensors_parameters(folder: Path) -> int:
    """Parameters in the safetensors files of ``folder``, from their JSON headers only."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= int(d)
                total += count
    return total


def estimate_model(spec: str, *, alias: "ModelAlias | None", src: str, gguf: str, dtype: torch.dtype,
                   random_init: bool, trust_remote_code: bool = False) -> MemoryEstimate | None:
    """The memory estimate of a model :func:`~medit.model.loading.load_model` is about to load, or
    None when none can be made without loading it. Raises ModelError for an unsupported family."""
    from transformers import AutoConfig


    width = torch.empty((), dtype=dtype).element_size()
    gguf_path = Path(src) / gguf if gguf else None
    if gguf_path is not None and gguf_cache(gguf_path) is not None:
        gguf_path = None  # the float32 conversion is cached: loaded straight into ``dtype``
    per_param = max(width, 4) if gguf_path is not None else width
    config = None
    if alias is not None:
        cfg = dict(alias.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    elif gguf_path is None:
        try:
            config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code, **hub_kwargs(src))
        except Exception:  # unreachable hub id, broken folder: the loader says what is wrong
            config = None
    if config is not None:
        adapter_for_model_type(config.model_type)  # unsupported family: say so before anything else
        try:
            return MemoryEstimate(count_parameters(config), per_param, "config")
        except Exception:
            pass
    if gguf_path is not None and not random_init:
        try:
            return MemoryEstimate(_gguf_parameters(gguf_path), per_param, "GGUF header")
        except Exception:
            return None
    if not random_init and Path(src).is_dir():
        try:
            n = _safetensors_parameters(Path(src))
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            n = 0
        if n:
            return MemoryEstimate(n, per_param, "safetensors headers")
    return None


def _cgroup_available() -> int | None:
    """Memory left under this process's cgroup limit (v2, else v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def host_available() -> int:
    """Free host memory in bytes: psutil's ``available``, capped by a cgroup limit."""
    import psutil

    free = int(psutil.virtual_memory().available)
    capped = _cgroup_available()
    return min(free, capped) if capped is not None else free


def available_memory(device: torch.device | None, device_map: str | None) -> list[tuple[str, int]]:
    """Where the weights go and how much memory is free there: ``[(place, bytes), ...]``, the
    first entry the place the model runs (tests monkeypatch this)."""
    host = host_available()
    if device_map is not None:
        gpus = ([int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]
                if torch.cuda.is_available() else [])
        return [("GPU + CPU" if gpus else "CPU", sum(gpus) + host)]
    if device is not None and device.type == "cuda":
        return [(str(device), int(torch.cuda.mem_get_info(device)[0])), ("CPU", host)]
    return [("CPU" if device is None or device.type == "cpu" else str(device), host)]


def check_model_memory(spec: str, *, alias: "ModelAlias | None", src: str, gguf: str, dtype: torch.dtype,
                       device: torch.device | None, device_map: str | None, random_init: bool,
                       trust_remote_code: bool = False) -> MemoryEstimate | None:
    """Refuse (ModelError) a model that will not fit in the memory free where it is loaded."""
    est = estimate_model(spec, alias=alias, src=src, gguf=gguf, dtype=dtype, random_init=random_init,
                         trust_remote_code=trust_remote_code)
    if est is None:
        return None
    places = available_memory(device, device_map)
    checks = [(places[0][0], places[0][1], est.needed)]
    if len(places) > 1 and not random_init:  # a pretrained model is read into host memory first
        checks.append((places[1][0], places[1][1], est.weights))
    dname = str(dtype).replace("torch.", "")
    fixes = ["--dtype bfloat16"] if torch.empty((), dtype=dtype).element_size() > 2 else []
    fixes += [] if device_map is not None else ["--device-map auto"]
    fixes += ["a smaller model"]
    for place, free, needed in checks:
        if needed > free:
            margin = f" + {WORKING_MARGIN:.0%} working margin" if needed > est.weights else ""
            raise ModelError(
                f"model {spec!r} needs about {gb(needed)} ({est.params / 1e9:.2f}B parameters at "
                f"{est.bytes_per_param} bytes{margin}, dtype {dname}) but only {gb(free)} of {place} memory "
                f"is available; use {', '.join(fixes[:-1]) + ' or ' if len(fixes) > 1 else ''}{fixes[-1]}, "
                "or pass --no-memory-check to load it anyway")
    return est


# ---------------------------------------------------------------------------------- lengths

def context_limit(handle: "ModelHandle") -> int:
    """The longest input in tokens the model takes: its config's position limit, else the
    tokenizer's ``model_max_length`` when sane, else :data:`DEFAULT_CONTEXT`."""
    limit = getattr(handle.adapter, "context_length", None)
    if isinstance(limit, int) and limit > 0:
        return limit
    cfg = handle.config
    found = [v for v in (getattr(cfg, a, None) for a in ("max_position_embeddings", "n_positions", "n_ctx"))
             if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    if found:
        return min(found)
    m = getattr(handle.tokenizer, "model_max_length", None)
    if isinstance(m, int) and 0 < m <= _SANE_CONTEXT:
        return m
    return DEFAULT_CONTEXT


def _fields(r: "EditRequest") -> Iterator[tuple[str, str, str | None]]:
    """(field name, prompt or text, the answer read after it or None) of every text in ``r``."""
    yield "prompt", r.prompt, r.target_new
    if r.target_true:
        yield "prompt", r.prompt, r.target_true
    yield "target_new", r.target_new, None
    if r.target_true:
        yield "target_true", r.target_true, None
    for i, p in enumerate(r.rephrase):
        yield f"rephrase[{i}]", p, r.target_new
    for name in ("locality", "portability", "attribute"):
        for i, pa in enumerate(getattr(r, name)):
            yield f"{name}[{i}].prompt", pa.prompt, pa.answer or None
            if pa.answer:
                yield f"{name}[{i}].answer", pa.answer, None
    for i, p in enumerate(r.generation_prompts):
        yield f"generation_prompts[{i}]", p, None


def check_lengths(handle: "ModelHandle", requests: Iterable["EditRequest"], limit: int | None = None) -> int:
    """Refuse (ValidationError, naming the case, field and limit) any prompt or target longer than
    ``limit`` tokens (default, and at most, :func:`context_limit`); for a decoder-only model also
    a prompt whose answer, read after it, takes it past the limit. A text longer than
    ``limit × CHARS_PER_TOKEN`` characters is refused without tokenising it. Returns the limit."""
    context = context_limit(handle)
    limit = min(limit, context) if limit is not None else context
    what = f"the model's context of {limit:,} tokens" if limit == context else f"the limit of {limit:,} tokens"
    reqs: Sequence["EditRequest"] = list(requests)
    max_chars = limit * CHARS_PER_TOKEN
    texts: dict[str, int] = {}
    for r in reqs:
        for name, text, _ in _fields(r):  # every answer is also a field of its own
            if len(text) > max_chars:
                raise ValidationError(f"case {r.case_id!r}: {name} is {len(text):,} characters long, far beyond "
                                      f"{what}; shorten it (or drop the case)")
            texts[text] = 0
    if not texts:
        return limit
    tok = handle.tokenizer
    unique = list(texts)
    ids = tok(unique, add_special_tokens=False, verbose=False)["input_ids"]
    for t, i in zip(unique, ids):
        texts[t] = len(i)
    try:
        extra = int(tok.num_special_tokens_to_add())
    except Exception:
        extra = 0
    for r in reqs:  # each text on its own first, so the message names the long one
        for name, text, _ in _fields(r):
            n = texts[text] + extra
            if n > limit:
                raise ValidationError(f"case {r.case_id!r}: {name} is {n:,} tokens long, longer than {what}; "
                                      "shorten it (or drop the case)")
    if handle.is_encoder_decoder:  # the answer goes to the decoder, not after the prompt
        return limit
    for r in reqs:
        for name, text, answer in _fields(r):
            n = texts[text] + extra
            if answer is not None and n + texts[answer] > limit:
                raise ValidationError(f"case {r.case_id!r}: {name} followed by its answer is "
                                      f"{n + texts[answer]:,} tokens long, longer than {what}; shorten them "
                                      "(or drop the case)")
    return limit
