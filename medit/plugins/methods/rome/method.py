"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection.

The key k* (the projection's input at the subject's last token, averaged over context
templates) is mapped to W k* + δ, where δ is the optimised target vector. With covariance
adjustment the update direction is C⁻¹k* (C = E[k kᵀ] over a text corpus), so other keys move
as little as possible. The same k* is used to compute and to insert the update (the r-ROME
fix), which keeps long sequences of edits from collapsing the model. Stored as rank-one factors.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

import medit
from medit.core.edit import CompositeEdit, Edit, WeightEdit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.toolkit.spread import LocateHParams, covariance_solver, storage_factors
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.toolkit.norm_anchor import NormAnchors, anchor_values
from medit.toolkit.target_vectors import delta_row_keys, negative_rows, optimise_deltas
from medit.plugins.methods.rome import DESCRIPTION

#: ``layer: auto`` picks the layer at this fraction of the depth (GPT-2 XL's 17/48 and LLaMA-7B's
#: 5/32 in the ROME/EasyEdit defaults bracket it; early-middle MLPs recall subject attributes).
AUTO_DEPTH = 0.2


@dataclass
class ROMEHParams(LocateHParams, HParams):
    """Hyperparameters of ROME (plus the shared statistics / target-vector settings)."""

    #: the edited layer's index, or ``auto``.
    layer: int | str = "auto"
    #: weight the update direction by the inverse key covariance (ROME's default).
    mom2_adjustment: bool = True
    #: ridge added to C, relative to its mean diagonal, so that C is safely invertible.
    mom2_ridge: float = 1e-3
    #: optimise δ as the update will insert it: scaled per context by kᵀu (< 1 for contexts whose
    #: key points away from k*, often the bare prompt itself), instead of as if every context got δ.
    v_insert_scale: bool = True
    #: subjects swapped into the edit prompt to make prompts the edit must leave alone; the
    #: target-vector optimisation adds the KL of their next token under the finished update
    #: (empty: off). E.g. ``medit.toolkit.context.NEGATIVE_SUBJECTS``.
    v_negative_subjects: list[str] = field(default_factory=list)
    #: weight of that KL term.
    v_negative_kl_factor: float = 1.0

    def __post_init__(self) -> None:
        self.check_locate()
        if isinstance(self.layer, str) and self.layer != "auto":
            raise HParamsError(f"hparam 'layer' must be an integer or 'auto', got {self.layer!r}")
        if self.mom2_ridge < 0:
            raise HParamsError(f"hparam 'mom2_ridge' must be >= 0, got {self.mom2_ridge}")
        if self.v_negative_kl_factor < 0:
            raise HParamsError(f"hparam 'v_negative_kl_factor' must be >= 0, got {self.v_negative_kl_factor}")
        if not all(str(x).strip() for x in self.v_negative_subjects):
            raise HParamsError("hparam 'v_negative_subjects' must list non-empty subjects, "
                               f"got {self.v_negative_subjects!r}")


class ROME(Method[ROMEHParams]):
    name = "rome"
    description = DESCRIPTION
    hparams_class = ROMEHParams
    modes = ("single", "sequential")
    unsupported_families = ("t5",)
    hparams_dir = Path(medit.__file__).parent / "hparams" / "rome"

    def start_run(self, handle: ModelHandle) -> None:
        handle.reset_state(NormAnchors)

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: ROMEHParams) -> Edit:
        edits = [self._one(handle, r, hparams) for r in requests]
        return edits[0] if len(edits) == 1 else CompositeEdit(handle, edits)

    def _one(self, handle: ModelHandle, req: EditRequest, hp: ROMEHParams) -> WeightEdit:
        layer = resolve_layers(handle, [hp.layer] if isinstance(hp.layer, int) else hp.layer,
                               auto=(AUTO_DEPTH,), what="layer")[0]
        stats_s = 0.0
        C = None
        if hp.mom2_adjustment:
            stats, stats_s = hp.stats(handle, [layer])
            C = stats[layer]
        templates = hp.templates(handle)
        spec = replace(hp.delta_spec(), negative_kl_factor=hp.v_negative_kl_factor)
        rows = delta_row_keys(handle, req, layer, templates, spec, hp.fact_token)
        k = rows[:len(templates)].mean(0)  # k*: the key averaged over the templates
        # float64 and a ridge: covariances of real corpora are near-singular
        u = covariance_solver(handle, C, ridge=hp.mom2_ridge)(k[:, None])[:, 0].float() if C is not None else k
        left = u / torch.dot(u, k)  # so that ΔW k* = δ exactly
        scale = (rows @ left)[None] if hp.v_insert_scale else None
        negatives = negative_rows(handle, req, layer, left, hp.v_negative_subjects)  # None when the list is empty
        delta, info = optimise_deltas(handle, [req], layer, templates, spec, "mlp", hp.fact_token, scale, negatives)
        delta = anchor_values(handle, [req], layer, delta, hp, hp.fact_token)
        name = handle.param_name("mlp_out", layer)
        factors = storage_factors(handle, delta[0][:, None].float(), left[:, None])
        edit = WeightEdit.from_deltas(handle, self.name, [req], hp.to_dict(), factors={name: factors})
        edit.info.update(stats_s=stats_s, layer=layer, delta_steps=info[0]["steps"], delta_nll=info[0]["nll"])
        return edit
