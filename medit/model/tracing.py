"""Tracing: capture module inputs/outputs, add vectors to outputs, stop a forward pass early, and
run the layers above a given layer from cached hidden states. Every hook lives inside a context
manager that removes it, whatever happens."""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle


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


def cache_kwarg(forward: Any) -> str:
    """The name ``forward`` takes its key/value cache under: ``cache`` from transformers 5,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class Above:
    """Runs the layers above an edit layer from hidden states (see :func:`layers_above`)."""

    def __init__(self, handle: "ModelHandle") -> None:
        self.base = handle.model.base_model
        pos_path = handle.adapter.paths.get("pos_embed")
        self.pos = handle.model.get_submodule(pos_path) if pos_path else None
        self.cache_kw = cache_kwarg(self.base.forward)

    def _embeds(self, hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # The model adds learned position embeddings to inputs_embeds; pre-subtract them.
        return hidden - self.pos(pos) if self.pos is not None else hidden

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (after ln_f) for the whole sequence."""
        if pos is None:
            pos = (mask.cumsum(1) - 1).clamp_min(0)
        return self.base(inputs_embeds=self._embeds(hidden, pos), attention_mask=mask, position_ids=pos,
                         use_cache=False).last_hidden_state

    @torch.no_grad()
    def prefix(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> Any:
        """Key/value cache of the prefix columns (which a later change cannot affect)."""
        out = self.base(inputs_embeds=self._embeds(hidden, pos), attention_mask=mask, position_ids=pos, use_cache=True)
        return getattr(out, "cache", None) if self.cache_kw == "cache" else out.past_key_values

    @staticmethod
    def select(cache: Any, rows: torch.Tensor) -> Any:
        """The prefix ``cache`` of some of its rows (a new cache; None when the cache type cannot
        select rows, so the caller computes the prefix again)."""
        if not hasattr(cache, "batch_select_indices"):
            return None
        out = copy.deepcopy(cache)
        out.batch_select_indices(rows)
        return out

    def suffix(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        """Final hidden states of the suffix columns given the prefix ``cache`` (left unchanged)."""
        kw = {self.cache_kw: copy.deepcopy(cache)} if cache is not None else {}
        return self.base(inputs_embeds=self._embeds(hidden, pos), attention_mask=mask, position_ids=pos,
                         use_cache=cache is not None, **kw).last_hidden_state


_HEAD_BLOCK = 2048


class _WideHead(torch.autograd.Function):
    """``x Wᵀ`` for a frozen, wide ``W`` [vocab, d] and few rows ``x`` [m, d], computed as
    ``(W xᵀ)ᵀ``: on CPU, BLAS packs the huge weight on every ``x Wᵀ`` call with a small ``m`` and
    runs several times slower than with the product in this orientation."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return torch.mm(weight, x.t()).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        # Summed over vocabulary blocks that stay in cache: ``grad @ W`` in one call repacks all of
        # W and takes about twice as long for a few rows.
        out = grad.new_zeros(grad.shape[0], weight.shape[1])
        for g, w in zip(grad.split(_HEAD_BLOCK, 1), weight.split(_HEAD_BLOCK, 0)):
            out.addmm_(g, w)
        return out, None


def head_logits(handle: "ModelHandle", final: torch.Tensor) -> torch.Tensor:
    """The LM head on a few final hidden states [m, d] (differentiable w.r.t. ``final``); the
    same values as calling the head module, faster on CPU for small ``m``."""
    head = handle.module("lm_head")
    weight = getattr(head, "weight", None)
    plain = (final.device.type != "cpu" or final.dim() != 2 or final.shape[0] > 64 or not isinstance(head, nn.Linear)
             or weight is None or weight.requires_grad or weight.dtype != final.dtype
             or head._forward_hooks or head._forward_pre_hooks or torch.is_autocast_enabled("cpu"))
    if plain:
        return head(final)
    out = _WideHead.apply(final, weight)
    return out + head.bias if head.bias is not None else out


@contextlib.contextmanager
def layers_above(handle: "ModelHandle", layer: int) -> Iterator[Above]:
    """Yield an :class:`Above` that starts from the residual stream *after* ``layer`` and runs
    only the layers above it (whole sequences, or a suffix over a cached prefix).

    Implemented by temporarily truncating the layer list (renumbering the index each attention
    module keeps into the key/value cache, named by the adapter's ``layer_index_attrs``, so caches
    index the truncated list) and feeding the hidden states as input embeddings. A config that
    lists each layer's kind (``layer_types``: sliding-window or full attention, which picks the
    mask, the rotary base and the cache layer) is cut the same way. Everything is restored.
    """
    layers_path = handle.adapter.path("layers")
    parent_path, _, attr = layers_path.rpartition(".")
    parent = handle.model.get_submodule(parent_path) if parent_path else handle.model
    full = getattr(parent, attr)
    kept = list(full)[layer + 1:]
    names = handle.adapter.layer_index_attrs
    renumbered = [(m, name, getattr(m, name)) for blk in kept for m in blk.modules() for name in names
                  if isinstance(getattr(m, name, None), int)]
    text = handle.config.get_text_config(decoder=True) if hasattr(handle.config, "get_text_config") \
        else handle.config
    types = getattr(text, "layer_types", None)
    cut_types = isinstance(types, list) and len(types) == len(full)
    try:
        for i, blk in enumerate(kept):
            for m in blk.modules():
                for name in names:
                    if isinstance(getattr(m, name, None), int):
                        setattr(m, name, i)
        setattr(parent, attr, nn.ModuleList(kept))
        if cut_types:
            text.layer_types = types[layer + 1:]
        yield Above(handle)
    finally:
        setattr(parent, attr, full)
        if cut_types:
            text.layer_types = types
        for m, name, idx in renumbered:
            setattr(m, name, idx)


@contextlib.contextmanager
def low_precision_above(handle: "ModelHandle", layer: int, dtype: str | None) -> Iterator[None]:
    """Run what follows with matrix products in ``dtype`` (``bfloat16``/``float16``) through
    ``torch.autocast``, for the layers above ``layer`` and the LM head: the residual stream, norms
    and softmaxes stay in float32. Meanwhile those layers' and the head's weight matrices are
    held as ``dtype`` copies (autocast would otherwise cast each weight again on every call), and on
    CPU attention runs eager (the fused attention kernel's half-precision backward is about ten
    times slower there than its float32 one). Weights and attention setting are restored on exit.
    ``dtype`` None: a no-op."""
    if dtype is None:
        yield
        return
    target = getattr(torch, dtype)
    layers = list(handle.model.get_submodule(handle.adapter.path("layers")).children())[layer + 1:]
    # the matrices of linear maps (nn.Linear, GPT-2's Conv1D); embeddings are looked up, not multiplied
    weights = [m.weight for blk in [*layers, handle.module("lm_head")] for m in blk.modules()
               if not isinstance(m, nn.Embedding) and isinstance(getattr(m, "weight", None), nn.Parameter)
               and m.weight.dim() == 2]
    swapped: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    text = handle.config.get_text_config(decoder=True) if hasattr(handle.config, "get_text_config") \
        else handle.config
    attn = getattr(text, "_attn_implementation", None)
    try:
        for w in weights:
            if id(w) not in swapped and w.is_floating_point() and w.dtype != target:
                swapped[id(w)] = (w, w.data)
                w.data = w.data.to(target)
        if handle.device.type == "cpu" and attn is not None:
            text._attn_implementation = "eager"
        with torch.autocast(handle.device.type, dtype=target):
            yield
    finally:
        for w, data in swapped.values():
            w.data = data
        if handle.device.type == "cpu" and attn is not None:
            text._attn_implementation = attn


def foreign_hooks(module: torch.nn.Module) -> list[Callable[..., Any]]:
    """The forward (pre-)hooks on ``module`` other than transformers' own (it installs
    output-capturing hooks the first time hidden states are requested, keeps them, and they
    change nothing)."""
    return [f for f in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
            if not getattr(f, "__module__", "").startswith("transformers")]


def mlp_post_norm(handle: "ModelHandle", layer: int) -> nn.Module | None:
    """The norm between ``mlp_out``'s output and the residual stream at ``layer`` (Gemma 2/3's
    ``post_feedforward_layernorm``), or None when the family adds that output to the residual
    stream as it is. A change ``d`` of ``mlp_out``'s output ``m`` then moves the residual stream by
    ``norm(m + d) - norm(m)``, not by ``d``."""
    path = handle.adapter.paths.get("mlp_post_norm")
    if not path:
        return None
    try:
        return handle.model.get_submodule(path.format(layer))
    except AttributeError:  # a family member without one (Gemma 1)
        return None
