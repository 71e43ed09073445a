"""Norm anchoring (Liu et al. 2026, "Norm Anchors Make Model Edits Last", arXiv 2602.02543): a
shared option of the weight editors that accumulate updates over a sequential run.

The paper traces the collapse of long locate-then-edit runs to a feedback loop: each solved value
vector ``v* = v0 + δ`` (the rewrite module's output the edit asks for at the subject token) grows
with the edited weights, and the weights grow with the values written into them. Norm-Anchor
Scaling rescales every solved ``v*`` to a reference norm taken from the original model, which
breaks the loop. That is :func:`anchor_values`, used by ROME, MEMIT and AlphaEdit.

UltraEdit and FT-L solve no value vector; for them :func:`anchor_weights` anchors the quantity
the loop inflates directly: after each update, every edited matrix is rescaled to the Frobenius
norm it had before the first edit through this model handle.

Both references are kept in the model's run state (:class:`NormAnchors`, dropped by each
method's ``start_run``) and set by the run's first edits: the paper samples 1,000 CounterFact
value vectors on the original model for its reference; here it is the mean ``‖v*‖`` of the run's
first ``norm_anchor_samples`` edits (in a sequential run of batches of 100, exactly the first
batch, which is solved on the original model). The paper also drops an edit whose ``‖v*‖``
exceeds twice the reference; medit rescales it like any other. References describe the original
model, so a revert does not withdraw them. The weights themselves
change only inside the :class:`~medit.core.edit.WeightEdit` that records them, so every edit
still reverts bit for bit and saves as a patch (a weight-anchored matrix as a dense delta).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from medit.errors import HParamsError

if TYPE_CHECKING:
    from medit.core.edit import WeightEdit
    from medit.core.requests import EditRequest
    from medit.model.handle import ModelHandle

__all__ = ["NormAnchorHParams", "NormAnchors", "anchor_values", "anchor_weights"]


@dataclass
class NormAnchorHParams:
    """The norm-anchoring option (mixed into the hparams of rome, memit, alphaedit, ultraedit, ft)."""

    #: norm anchoring (NAS): rescale each solved value vector to the original model's mean
    #: value norm (rome, memit, alphaedit), or each edited matrix to its norm before the first
    #: edit (ultraedit, ft); it stops the norm growth that ends long sequential runs.
    norm_anchor: bool = False
    #: value-vector methods: how many edits' ``‖v*‖`` form the reference (the first ones made).
    norm_anchor_samples: int = 100

    def check_norm_anchor(self) -> None:
        if not isinstance(self.norm_anchor, bool):
            raise HParamsError(f"hparam 'norm_anchor' must be true or false, got {self.norm_anchor!r}")
        if isinstance(self.norm_anchor_samples, bool) or not isinstance(self.norm_anchor_samples, int) \
                or self.norm_anchor_samples < 1:
            raise HParamsError(f"hparam 'norm_anchor_samples' must be an integer >= 1, "
                               f"got {self.norm_anchor_samples!r}")


@dataclass
class NormAnchors:
    """Run state: the reference norms of one model handle."""

    #: layer -> (sum of ‖v*‖, count) of the edits that set the value reference.
    values: dict[int, tuple[float, int]] = field(default_factory=dict)
    #: parameter name -> its Frobenius norm before the first edit through the handle.
    weights: dict[str, float] = field(default_factory=dict)


def anchor_values(handle: "ModelHandle", reqs: Sequence["EditRequest"], layer: int, deltas: torch.Tensor,
                  hp: NormAnchorHParams, fact_token: str = "last") -> torch.Tensor:
    """The deltas [n, d] whose value vectors ``v0 + δ`` have the reference norm: ``s·(v0 + δ) - v0``
    with ``s = ref / ‖v0 + δ‖`` per edit, ``v0`` the rewrite module's current output at each
    subject token. The deltas unchanged when ``hp.norm_anchor`` is off."""
    if not hp.norm_anchor:
        return deltas
    from medit.toolkit.target_vectors import subject_outputs

    v0 = subject_outputs(handle, reqs, layer, fact_token).to(deltas.device, torch.float32)
    v_star = v0 + deltas.float()
    norms = v_star.norm(dim=1)
    state = handle.state(NormAnchors)
    total, count = state.values.get(layer, (0.0, 0))
    take = min(len(reqs), hp.norm_anchor_samples - count)
    if take > 0:
        total, count = total + float(norms[:take].double().sum()), count + take
        state.values[layer] = (total, count)
    ref = total / count
    scaled = v_star * (ref / norms.clamp_min(1e-12))[:, None]
    return (scaled - v0).to(deltas.dtype)


def anchor_weights(handle: "ModelHandle", edit: "WeightEdit", hp: NormAnchorHParams) -> None:
    """Rescale each parameter ``edit`` changed to its norm before the first edit through the
    handle, in place; those parameters then save as dense deltas. On error the edit is reverted.
    Nothing happens when ``hp.norm_anchor`` is off."""
    if not hp.norm_anchor:
        return
    state = handle.state(NormAnchors)
    params = dict(handle.model.named_parameters())
    try:
        with torch.no_grad():
            for name, orig in edit.originals.items():
                ref = state.weights.setdefault(name, float(orig.double().norm()))
                p = params[name]
                cur = float(p.double().norm())
                if cur > 0:
                    p.copy_((p.double() * (ref / cur)).to(p.dtype))
                edit.factors.pop(name, None)
    except BaseException:
        edit.revert()
        raise
    edit.info["norm_anchor"] = {n: round(state.weights[n], 4) for n in edit.originals}
