"""The model handle: a loaded model with its tokenizer, family adapter, device and dtype."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, TypeVar

import torch
from torch import nn

from medit.core.adapter import ModelAdapter
from medit.core.state import RunState
from medit.errors import MethodError

S = TypeVar("S")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer and family adapter. Methods address modules by standard
    name through :meth:`module`, never by hard-coded paths.

    What methods and toolkit helpers keep about this model (statistics, context templates,
    projections, the hooks of edits that keep the weights, per-run caches) lives in typed state
    objects: ``handle.state(MyState)`` is the one instance of the dataclass ``MyState`` for this
    handle, created on first use, never shared with another handle; ``handle.reset_state(MyState)``
    drops it (see :mod:`medit.core.state`).
    """

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    model_id: str = "model"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _base_fingerprint: str = field(default="", repr=False)
    _state: RunState = field(default_factory=RunState, repr=False)

    def state(self, cls: type[S]) -> S:
        """The one instance of state class ``cls`` (a dataclass with defaults) for this model,
        created on first use (see :mod:`medit.core.state`)."""
        return self._state.get(cls)

    def reset_state(self, cls: type[Any]) -> None:
        """Drop this model's instance of ``cls``; the next :meth:`state` call creates a fresh one."""
        self._state.reset(cls)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.config)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.adapter.encoder_decoder

    @property
    def lm_head_tied(self) -> bool:
        """True when the LM head shares its weight with the input embedding (not a separate parameter)."""
        head = self.module("lm_head").weight
        return head is self.module("embed").weight

    def check_layer(self, layer: int, what: str = "layer") -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise MethodError(f"{what} {layer!r} is out of range for {self.model_id} "
                              f"({self.n_layers} layers: use 0..{self.n_layers - 1})")
        return layer

    def module(self, std: str, layer: int | None = None) -> nn.Module:
        """The module for a standard name (and layer index for per-layer names); ``("layers", i)``
        is the i-th transformer block."""
        if layer is not None:
            self.check_layer(layer)
            if std == "layers":
                return self.model.get_submodule(f"{self.adapter.path('layers')}.{layer}")
        return self.model.get_submodule(self.adapter.path(std, layer))

    def param_name(self, std: str, layer: int | None = None, what: str = "weight") -> str:
        return f"{self.adapter.path(std, layer)}.{what}"

    def weight_out_in(self, std: str, layer: int | None = None) -> torch.Tensor:
        """The module weight as an (out, in) view regardless of storage (GPT-2 Conv1D is (in, out))."""
        w = self.module(std, layer).weight
        assert isinstance(w, torch.Tensor), f"{self.adapter.path(std, layer)} has no weight tensor"
        return w.T if self.adapter.transposed else w

    def fingerprint(self, param_names: Iterable[str] | None = None) -> str:
        """Stable id: model type + names, shapes and checksums of the given parameters' current values.

        With no names it covers every parameter and is computed once, on first use, so call it
        before editing (the evaluation engine does) to get the fingerprint of the base model.
        """
        if param_names is None and self._base_fingerprint:
            return self._base_fingerprint
        params = dict(self.model.named_parameters())
        fp = self.fingerprint_of({n: params[n] for n in (param_names if param_names is not None else params)})
        if param_names is None:
            self._base_fingerprint = fp
        return fp

    def fingerprint_of(self, tensors: dict[str, torch.Tensor]) -> str:
        """:meth:`fingerprint` of these values for these parameter names (e.g. an edit's originals)."""
        h = hashlib.sha256()
        # Names, shapes and values define the model; the config object is not hashed because
        # transformers mutates it at run time (attention implementation, cache flags).
        h.update(str(self.config.model_type).encode())
        with torch.no_grad():
            for n in sorted(tensors):
                flat = tensors[n].detach().reshape(-1)
                h.update(f"{n}{tuple(flat.shape)}{tuple(tensors[n].shape)}".encode())
                # A strided sample plus the exact sum is cheap and still tells weights apart.
                step = max(1, flat.numel() // 4096)
                h.update(flat[::step].float().cpu().numpy().tobytes())
                h.update(repr(float(flat.double().sum())).encode())
        return h.hexdigest()[:16]
