"""Adaptors: forward hooks that may rewrite one module's output, for methods that keep the
weights (GRACE's codebook, WISE's side memory, ...), and :class:`LayerwiseLM`, the teacher-forced
target loss recomputed only from one layer upwards (what such methods train against).

An adaptor is shared by every active edit of one method at one module: it is installed by the
first edit (:func:`attach`) and removed when the last one leaves (:func:`release`), so a model
with no active edit carries no hook at all.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from medit.scoring.engine import Scorer
from medit.model.tracing import capture, layers_above, run_until

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle


def call_cache(kwargs: dict) -> Any:
    """The key/value cache a model call was given (``cache`` from transformers 5, before that
    ``past_key_values``), or None."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple-of-tuples caches
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class Adaptor:
    """A hook on ``module`` whose output :meth:`rewrite` may change.

    It also watches the calls of the model's base module to know each row's attention mask
    (``self.mask``: [batch, seq] of the tokens passing through the hooked module, 1 = real token)
    and whether a call continues a cached generation (``self.continuing``), so that subclasses
    can route whole sequences and keep a routing decision across generation steps.
    """

    def __init__(self, handle: "ModelHandle", module: nn.Module) -> None:
        self.handle = handle
        self.module = module
        self.mask: torch.Tensor | None = None
        self.continuing = False
        self._hooks = [module.register_forward_hook(self._post, with_kwargs=True),
                       handle.model.base_model.register_forward_pre_hook(self._note, with_kwargs=True)]

    def _note(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        enc_dec = self.handle.is_encoder_decoder
        self.mask = kwargs.get("decoder_attention_mask" if enc_dec else "attention_mask")
        self.continuing = _cache_len(call_cache(kwargs)) > 0

    def _post(self, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        new = self.rewrite(x, y)
        if new is y:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def token_mask(self, y: torch.Tensor) -> torch.Tensor:
        """[batch, seq] float mask of the real tokens of the current call (all ones if unknown)."""
        b, t = y.shape[0], y.shape[1]
        m = self.mask
        if m is None or m.dim() != 2 or m.shape[0] != b or m.shape[1] < t:
            return torch.ones(b, t, device=y.device)
        return m[:, -t:].to(y.device, torch.float32)

    def rewrite(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return ``y`` itself to leave the output untouched, or a new tensor."""
        return y

    def empty(self) -> bool:
        return True

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def attach(handle: "ModelHandle", key: Any, factory: Callable[[], Adaptor]) -> Adaptor:
    """The adaptor stored under ``key`` in the handle's memo, created by ``factory`` if absent."""
    if key not in handle.memo:
        handle.memo[key] = factory()
    return handle.memo[key]


def release(handle: "ModelHandle", key: Any) -> None:
    """Remove the adaptor under ``key`` (and its hooks) once it holds nothing."""
    ad = handle.memo.get(key)
    if ad is not None and ad.empty():
        ad.remove()
        del handle.memo[key]


class LayerwiseLM:
    """Teacher-forced target logits of a fixed batch of (context ids, target ids) pairs, where
    only ``layer`` and the blocks above it are recomputed at each call (the layers below cannot
    change). Hooks on modules at or above ``layer`` act on every call.

    Causal models run from the cached input of block ``layer``; encoder-decoder models (and
    ``layer`` 0) run the whole model. ``first_pos[i]`` is the position (in row i) that predicts
    the first target token; ``mask`` is the [rows, seq] attention mask of the sequences fed.
    """

    def __init__(self, handle: "ModelHandle", pairs: Sequence[tuple[list[int], list[int]]], layer: int) -> None:
        self.handle, self.pairs, self.layer = handle, list(pairs), layer
        self.scorer = Scorer(handle)
        self.fast = not handle.is_encoder_decoder and layer > 0
        if handle.is_encoder_decoder:
            self.first_pos = [0] * len(self.pairs)
            self.mask = self.scorer._pad([[0] + t[:-1] for _, t in self.pairs])[1].to(handle.device)
        else:
            self.first_pos = [len(c) - 1 for c, _ in self.pairs]
            ids, mask = self.scorer._pad([(c + t)[:-1] for c, t in self.pairs])
            self.ids, self.mask = ids.to(handle.device), mask.to(handle.device)
        if self.fast:
            self.pos = (self.mask.cumsum(1) - 1).clamp_min(0)
            with torch.no_grad(), capture(handle, "layers", [layer], what="input", stop=True) as store:
                run_until(handle, lambda: handle.model(input_ids=self.ids, attention_mask=self.mask,
                                                       position_ids=self.pos, use_cache=False))
            self.hidden = store[layer].detach()
            rows = [torch.full((len(t),), i, dtype=torch.long) for i, (_, t) in enumerate(self.pairs)]
            cols = [torch.arange(len(c) - 1, len(c) - 1 + len(t)) for c, t in self.pairs]
            self.rows = torch.cat(rows).to(handle.device)
            self.cols = torch.cat(cols).to(handle.device)
        self.targets = torch.tensor([t for _, ts in self.pairs for t in ts], device=handle.device)
        self.owner = torch.tensor([i for i, (_, ts) in enumerate(self.pairs) for _ in ts], device=handle.device)
        self._above: Any = None

    @contextlib.contextmanager
    def session(self) -> Iterator["LayerwiseLM"]:
        """Keep the upper-layer runner open for many :meth:`logits` calls."""
        if not self.fast:
            yield self
            return
        with layers_above(self.handle, self.layer - 1) as above:
            self._above = above
            try:
                yield self
            finally:
                self._above = None

    def logits(self) -> torch.Tensor:
        """[sum of target lengths, vocab] logits (differentiable w.r.t. hooked parameters)."""
        if not self.fast:
            return self.scorer.selected_logits(self.pairs)
        if self._above is None:
            with self.session():
                return self.logits()
        final = self._above(self.hidden, self.mask, self.pos)
        return self.handle.module("lm_head")(final[self.rows, self.cols])

    def row_nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean target-token NLL per row, from :meth:`logits`."""
        lp = logits.float().log_softmax(-1).gather(1, self.targets[:, None])[:, 0]
        n = len(self.pairs)
        tot = torch.zeros(n, device=lp.device).index_add(0, self.owner, -lp)
        return tot / torch.bincount(self.owner, minlength=n).float()

    def row_correct(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row: True when every target token is the argmax."""
        ok = (logits.argmax(-1) == self.targets).float()
        n = len(self.pairs)
        tot = torch.zeros(n, device=ok.device).index_add(0, self.owner, ok)
        return tot == torch.bincount(self.owner, minlength=n).float()
