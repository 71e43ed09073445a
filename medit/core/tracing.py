"""Tracing: capture module inputs/outputs, add vectors to outputs, stop a forward pass early, and
run the layers above a given layer from cached hidden states. Every hook lives inside a context
manager that removes it, whatever happens."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .handle import ModelHandle


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the traced layer has run."""


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@contextlib.contextmanager
def capture(handle: "ModelHandle", std: str, layers: Sequence[int], what: str = "input",
            stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input (``what="input"``) or output of module ``std`` at each layer.

    Yields a dict filled during forward passes: layer -> tensor [batch, seq, dim]. With ``stop``
    the forward pass ends (silently) after the deepest requested layer has been recorded.
    """
    store: dict[int, torch.Tensor] = {}
    last = max(layers) if layers else -1
    handles = []

    def make(layer: int) -> Callable[..., None]:
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            store[layer] = x
            if stop and layer == last:
                raise StopForward

        def post(mod: nn.Module, args: tuple, output: Any) -> None:
            store[layer] = _first(output)
            if stop and layer == last:
                raise StopForward
        return pre if what == "input" else post

    try:
        for layer in layers:
            mod = handle.module(std, layer)
            if what == "input":
                handles.append(mod.register_forward_pre_hook(make(layer), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(make(layer)))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add_to_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s (first) output ``y`` by ``fn(y)`` (e.g. adding a vector at positions)."""
    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def run_until(handle: "ModelHandle", fn: Callable[[], Any]) -> None:
    """Call ``fn`` (a forward pass), treating :class:`StopForward` as normal completion."""
    try:
        fn()
    except StopForward:
        pass


@contextlib.contextmanager
def layers_above(handle: "ModelHandle", layer: int) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Yield ``run(hidden, attention_mask) -> final hidden states (after ln_f)`` that starts from
    the residual stream *after* ``layer`` and runs only the layers above it.

    Implemented by temporarily truncating the layer list and feeding the hidden states as input
    embeddings (minus learned position embeddings, which the model adds back); the original
    layer list is always restored.
    """
    layers_path = handle.adapter.path("layers")
    parent_path, _, attr = layers_path.rpartition(".")
    parent = handle.model.get_submodule(parent_path) if parent_path else handle.model
    full = getattr(parent, attr)
    base = handle.model.base_model
    pos_path = handle.adapter.paths.get("pos_embed")
    pos = handle.model.get_submodule(pos_path) if pos_path else None

    def run(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = hidden
        if pos is not None:
            x = x - pos(torch.arange(hidden.shape[1], device=hidden.device))[None]
        return base(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state

    setattr(parent, attr, nn.ModuleList(list(full)[layer + 1:]))
    try:
        yield run
    finally:
        setattr(parent, attr, full)
