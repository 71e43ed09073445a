"""MEMIT (Meng et al. 2023): many edits at once, spread over several MLP layers.

Target residuals are optimised at the last edit layer; each layer then takes an equal share of
what remains through a least-squares update weighted by the key covariance:
ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹. Stored as per-layer low-rank factors (rank = number of edits).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import medit
from medit.core.edit import WeightEdit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.model.layers import spread_layers
from medit.toolkit.norm_anchor import NormAnchors
from medit.toolkit.spread import SpreadHParams, apply_spread, covariance_solver
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.plugins.methods.memit import DESCRIPTION

#: ``layers: auto``: five consecutive layers ending at this fraction of the depth (LLaMA-7B's
#: 4-8 of 32 and GPT-J's 3-8 of 28 in the MEMIT/EasyEdit defaults).
@dataclass
class MEMITHParams(SpreadHParams, HParams):
    """Hyperparameters of MEMIT (plus the shared statistics / target-vector settings)."""

    #: edited layers (ascending), or ``auto``.
    layers: list[int] | str = "auto"
    #: λ: weight of the preserved-key covariance against the new keys.
    mom2_update_weight: float = 15000.0

    def __post_init__(self) -> None:
        self.check_locate()
        if self.mom2_update_weight < 0:
            raise HParamsError(f"hparam 'mom2_update_weight' must be >= 0, got {self.mom2_update_weight}")
        if isinstance(self.layers, list) and not self.layers:
            raise HParamsError("hparam 'layers' must name at least one layer (or be 'auto')")


def least_squares_keys(handle: ModelHandle, C: torch.Tensor, lam: float, K: torch.Tensor) -> torch.Tensor:
    """X = (λC + K Kᵀ)⁻¹ K [d_in, n], the right factor of MEMIT's update R Xᵀ.

    Computed as (λC)⁻¹K (I + Kᵀ(λC)⁻¹K)⁻¹ (Woodbury): with λC factorised once per run, an edit
    solves only an n×n system instead of factorising a d_in×d_in one."""
    inv = covariance_solver(handle, C, scale=lam)
    Kd = K.double()
    if not inv.factored:
        return torch.linalg.solve(inv.matrix + Kd @ Kd.T, Kd).float()
    AinvK = inv(K)
    small = torch.eye(K.shape[1], dtype=torch.float64, device=K.device) + Kd.T @ AinvK
    return torch.linalg.solve(small, AinvK.T).T.float()


class MEMIT(Method[MEMITHParams]):
    name = "memit"
    description = DESCRIPTION
    hparams_class = MEMITHParams
    modes = ("single", "batch", "sequential")
    unsupported_families = ("t5",)
    hparams_dir = Path(medit.__file__).parent / "hparams" / "memit"

    def start_run(self, handle: ModelHandle) -> None:
        handle.reset_state(NormAnchors)

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: MEMITHParams) -> WeightEdit:
        layers = spread_layers(handle, hparams.layers)
        stats, stats_s = hparams.stats(handle, layers)
        lam = hparams.mom2_update_weight

        def solve(layer: int, K: torch.Tensor) -> torch.Tensor:
            return least_squares_keys(handle, stats[layer], lam, K)

        return apply_spread(handle, requests, hparams, self.name, layers, stats_s, solve)
