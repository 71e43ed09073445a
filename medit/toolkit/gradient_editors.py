"""Shared maths of gradient-based learned editors (MEND, KE).

For a linear layer ``y = W x`` the gradient of a loss is a sum of rank-one terms
``dL/dW = Σ_t δ_t x_tᵀ`` over token positions t, with ``x_t`` the layer input and ``δ_t = dL/dy_t``.
:func:`token_grads` captures the factors (``U = [x_t]``, ``D = [δ_t]``) at chosen layers in one
backward pass; editors transform them into an update. :func:`swapped_params` runs the model with
replacement weights (differentiable, for training through an edit) and :func:`factor_edit` applies
a low-rank update as a revertable :class:`~medit.core.edit.WeightEdit`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from medit.core.edit import WeightEdit
from medit.errors import HParamsError
from medit.scoring.engine import Scorer
from medit.core.queries import kl_per_row

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest

Pairs = list[tuple[list[int], list[int]]]


#: standard module names a gradient-based editor may change (``mlp_gate``: LLaMA-layout families only).
EDITABLE = ("mlp_in", "mlp_out", "mlp_gate")


@dataclass
class EditedWeights:
    """Which weights a gradient-based learned editor changes (mixed into MEND's and KE's hparams)."""

    #: edited layers (indices, negative from the end) or ``auto``: the last three.
    layers: list[int] | str = "auto"
    #: standard module names edited at each layer.
    modules: list[str] = field(default_factory=lambda: ["mlp_out"])

    def check_edited_weights(self) -> None:
        if isinstance(self.layers, str) and self.layers != "auto":
            raise HParamsError(f"hparam 'layers' must be a list of layer indices or 'auto', got {self.layers!r}")
        if not self.modules or any(m not in EDITABLE for m in self.modules):
            raise HParamsError(f"hparam 'modules' must list some of {', '.join(EDITABLE)}, got {self.modules!r}")


def edited_params(handle: "ModelHandle", modules: Sequence[str], layers: Sequence[int] | str,
                  last: int = 3) -> list[str]:
    """Parameter names of the standard ``modules`` at ``layers`` (``auto``: the last ``last`` layers)."""
    from medit.model.layers import resolve_layers

    n = handle.n_layers
    idx = list(range(max(0, n - last), n)) if layers == "auto" else resolve_layers(handle, layers, auto=())
    for m in modules:
        if m not in EDITABLE:
            raise HParamsError(f"hparam 'modules': {m!r} is not one of {', '.join(EDITABLE)}")
        if m not in handle.adapter.paths:
            raise HParamsError(f"hparam 'modules': {handle.adapter.name} models have no {m!r} (a gated MLP's gate "
                               "projection); edit mlp_in / mlp_out")
    return [handle.param_name(m, layer) for layer in idx for m in modules]


def out_in_shape(handle: "ModelHandle", name: str) -> tuple[int, int]:
    """(out, in) of a weight whatever its storage (GPT-2's Conv1D stores (in, out))."""
    shape = tuple(dict(handle.model.named_parameters())[name].shape)
    return (shape[1], shape[0]) if handle.adapter.transposed else (shape[0], shape[1])


def _module_of(handle: "ModelHandle", name: str) -> torch.nn.Module:
    return handle.model.get_submodule(name.rsplit(".", 1)[0])


def target_positions(handle: "ModelHandle", pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions that predict each target token in the batch
    :meth:`~medit.scoring.engine.Scorer.target_nll` runs (right-padded; decoder positions for T5)."""
    cols = [torch.arange(len(t)) if handle.is_encoder_decoder else torch.arange(len(c) - 1, len(c) - 1 + len(t))
            for c, t in pairs]
    rows = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(cols)])
    return rows, torch.cat(cols)


#: prompts per forward and backward pass of :func:`token_grads`. The factors are per position and
#: each prompt's loss is its own, so passes of a few prompts give the rows one pass over all would;
#: one pass over a turn of 100 CounterFact edits held ~0.6 GB of activations on SmolLM2.
GRAD_BATCH = 16


def token_grads(handle: "ModelHandle", names: Sequence[str], pairs: Pairs,
                weights: dict[str, torch.Tensor] | None = None,
                at_targets: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token gradient factors of ``len(pairs)`` × the mean target-token NLL of ``pairs``:
    name -> (U [T, in], D [T, out]), rows in the order of the pairs and their positions.

    Positions whose output gradient is exactly zero (padding, tokens after the last target) are
    dropped; with ``at_targets`` only the positions that predict a target token are kept (the
    prompt's other positions also get gradient, through attention). ``weights`` optionally
    replaces parameters while tracing (see :func:`swapped_params`). The factors are detached
    float32 tensors, computed :data:`GRAD_BATCH` prompts at a time.
    """
    if not pairs:
        raise ValueError("token_grads needs at least one (context, target) pair")
    total = sum(len(t) for _, t in pairs)
    parts = []
    for i in range(0, len(pairs), GRAD_BATCH):
        part = pairs[i:i + GRAD_BATCH]
        scale = len(pairs) * sum(len(t) for _, t in part) / total  # this part's share of the whole loss
        parts.append(_token_grads(handle, names, part, scale, weights, at_targets))
    if len(parts) == 1:
        return parts[0]
    return {n: (torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts])) for n in names}


def _token_grads(handle: "ModelHandle", names: Sequence[str], pairs: Pairs, scale: float,
                 weights: dict[str, torch.Tensor] | None, at_targets: bool
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`token_grads` of one pass: the gradient of ``scale`` × the mean target NLL of ``pairs``."""
    inputs: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}
    hooks = []

    def make(name: str) -> tuple[Any, Any]:
        def pre(mod: torch.nn.Module, args: tuple) -> None:
            inputs[name] = args[0].detach()

        def post(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            # Adding a zero leaf makes d loss / d out available without requiring grad on weights.
            z = torch.zeros_like(out, requires_grad=True)
            zeros[name] = z
            return out + z
        return pre, post

    scorer = Scorer(handle)
    try:
        for n in names:
            pre, post = make(n)
            mod = _module_of(handle, n)
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        with torch.enable_grad(), swapped_params(handle, weights or {}):
            loss = scorer.target_nll(pairs) * scale
            grads = torch.autograd.grad(loss, [zeros[n] for n in names])
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    where = target_positions(handle, pairs) if at_targets else None
    for n, g in zip(names, grads):
        if where is not None:
            rows, cols = (w.to(g.device) for w in where)
            out[n] = (inputs[n][rows, cols].float().detach(), g[rows, cols].float().detach())
            continue
        d = g.reshape(-1, g.shape[-1]).float()
        u = inputs[n].reshape(-1, inputs[n].shape[-1]).float()
        keep = d.abs().sum(-1) > 0
        out[n] = (u[keep].detach(), d[keep].detach())
    return out


@contextlib.contextmanager
def swapped_params(handle: "ModelHandle", tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the model with ``tensors`` in place of the named parameters (plain tensors, so
    gradients flow into whatever computed them). The original Parameters are always restored."""
    saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for name, t in tensors.items():
            mod = _module_of(handle, name)
            attr = name.rsplit(".", 1)[1]
            orig = mod._parameters[attr]
            saved.append((mod, attr, orig))  # type: ignore[arg-type]
            del mod._parameters[attr]
            setattr(mod, attr, t)
        yield
    finally:
        for mod, attr, orig in reversed(saved):
            if attr in mod.__dict__:
                delattr(mod, attr)
            mod._parameters[attr] = orig


def dense_update(handle: "ModelHandle", left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``Σ_t left_t right_tᵀ`` ((out, in) from left [T, out], right [T, in]) in storage orientation."""
    return right.T @ left if handle.adapter.transposed else left.T @ right


def factor_edit(handle: "ModelHandle", method: str, requests: Sequence["EditRequest"], hparams: dict[str, Any],
                updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> WeightEdit:
    """Add ``Σ_t left_t right_tᵀ`` to each named weight; ``updates``: name -> (left [T, out], right [T, in]).
    Stored as low-rank factors, so patches stay small."""
    factors = {}
    for name, (left, right) in updates.items():
        left, right = left.detach().float(), right.detach().float()
        factors[name] = (right.T, left.T) if handle.adapter.transposed else (left.T, right.T)
    return WeightEdit.from_deltas(handle, method, requests, hparams, factors=factors)


# ---------------------------------------------------------------------------------- training losses

def edit_pairs(scorer: Scorer, requests: Sequence["EditRequest"]) -> Pairs:
    return [scorer.encode_pair(r.prompt, r.target_new) for r in requests]


def outer_pairs(scorer: Scorer, requests: Sequence["EditRequest"]) -> Pairs:
    """What an edit must change: the edit prompt and its rephrasings, each with the new target."""
    return [scorer.encode_pair(p, r.target_new) for r in requests for p in (r.prompt, *r.rephrase)]


def locality_pairs(scorer: Scorer, requests: Sequence["EditRequest"]) -> Pairs:
    """What an edit must keep: locality prompts with their answers (cases without one are skipped)."""
    return [scorer.encode_pair(x.prompt, x.answer) for r in requests for x in r.locality if x.answer]


def kl_logits(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(pre ‖ post) of next-token distributions."""
    return kl_per_row(pre.float().log_softmax(-1), post.float().log_softmax(-1)).mean()


def post_edit_losses(handle: "ModelHandle", requests: Sequence["EditRequest"],
                     weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(edit NLL on prompts + rephrasings, locality KL) of the model with ``weights`` swapped in."""
    scorer = Scorer(handle)
    outer = outer_pairs(scorer, requests)
    loc = locality_pairs(scorer, requests)
    pre_loc = None
    if loc:
        with torch.no_grad():
            pre_loc = scorer.selected_logits(loc)
    with swapped_params(handle, weights):
        nll = scorer.target_nll(outer)
        kl = kl_logits(pre_loc, scorer.selected_logits(loc)) if loc else nll.new_zeros(())
    return nll, kl
