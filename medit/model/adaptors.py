"""Adaptors: forward hooks that may rewrite one module's output, for methods that keep the
weights (GRACE's codebook, WISE's side memory, ...), and :class:`LayerwiseLM`, the teacher-forced
target loss recomputed only from one layer upwards (what such methods train against).

An adaptor is shared by every active edit of one method at one layer: it is installed by the
first edit (:func:`attach`) and removed when the last one leaves (:func:`release`), so a model
with no active edit carries no hook at all. The installed adaptors are the model's
:class:`Adaptors` state, keyed by adaptor class and layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

import torch
from torch import nn


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


A = TypeVar("A", bound=Adaptor)


@dataclass
class Adaptors:
    """Run state: the adaptors installed on one model, by (adaptor class, layer)."""

    installed: dict[tuple[type[Adaptor], int], Adaptor] = field(default_factory=dict)


def attach(handle: "ModelHandle", cls: type[A], layer: int, factory: Callable[[], A]) -> A:
    """The ``cls`` adaptor installed at ``layer`` of ``handle``'s model, installed with ``factory``
    if there is none."""
    installed = handle.state(Adaptors).installed
    if (cls, layer) not in installed:
        installed[cls, layer] = factory()
    return cast(A, installed[cls, layer])  # stored under its own class


def installed(handle: "ModelHandle", cls: type[A], layer: int) -> A | None:
    """The ``cls`` adaptor installed at ``layer``, or None."""
    return cast("A | None", handle.state(Adaptors).installed.get((cls, layer)))


def release(handle: "ModelHandle", cls: type[Adaptor], layer: int) -> None:
    """Remove the ``cls`` adaptor at ``layer`` (and its hooks) once it holds nothing."""
    ad = installed(handle, cls, layer)
    if ad is not None and ad.empty():
        ad.remove()
        del handle.state(Adaptors).installed[cls, layer]
