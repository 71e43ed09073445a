"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the preserved
keys' covariance, so what the model knew is (to first order) untouched, plus a running cache of
the keys edited earlier in the same sequential run.

ΔW = R Xᵀ with X = (P (K Kᵀ + w K_p K_pᵀ) + λ I)⁻¹ P K, where P projects onto the eigenvectors of
C = E[k kᵀ] whose eigenvalues are below ``nullspace_threshold`` × its largest and w is
``cache_weight`` (1 in the paper). The cache K_p K_pᵀ is the model's :class:`PreservedKeys` run
state, reset at the start of every run; an edit removes its keys on revert.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

import medit
from medit.core.edit import WeightEdit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.model.layers import spread_layers
from medit.core.hparams import HParams
from medit.toolkit.norm_anchor import NormAnchors
from medit.toolkit.spread import SpreadHParams, apply_spread
from medit.core.method import Method
from medit.core.state import IdentityCache
from medit.core.requests import EditRequest
from medit.plugins.methods.alphaedit import DESCRIPTION

@dataclass
class AlphaEditHParams(SpreadHParams, HParams):
    """Hyperparameters of AlphaEdit (plus the shared statistics / target-vector settings)."""

    layers: list[int] | str = "auto"
    #: eigenvalues of C below this (relative to the largest) span the protected null space.
    nullspace_threshold: float = 2e-2
    #: λ: ridge of the projected normal equations.
    L2: float = 10.0
    #: weight of the keys edited earlier in the run (K_p K_pᵀ) against λ: how firmly a later edit
    #: must leave an earlier one's output alone.
    cache_weight: float = 1.0

    def __post_init__(self) -> None:
        self.check_locate()
        if not 0 < self.nullspace_threshold < 1:
            raise HParamsError(f"hparam 'nullspace_threshold' must be in (0, 1), got {self.nullspace_threshold}")
        if self.L2 < 0:
            raise HParamsError(f"hparam 'L2' must be >= 0, got {self.L2}")
        if self.cache_weight < 0:
            raise HParamsError(f"hparam 'cache_weight' must be >= 0, got {self.cache_weight}")


@dataclass
class PreservedKeys:
    """Run state: K_p K_pᵀ of the keys edited earlier in this run, by layer."""

    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)


def restore_keys(keys: PreservedKeys, before: dict[int, torch.Tensor | None]) -> None:
    """Put back each layer's K_p K_pᵀ as an edit found it (None: the layer had none)."""
    for layer, kept in before.items():
        if kept is None:
            keys.by_layer.pop(layer, None)
        else:
            keys.by_layer[layer] = kept


class AlphaEditEdit(WeightEdit):
    """A WeightEdit that also restores the run's preserved-key cache on revert.

    It keeps each layer's K_p K_pᵀ as it was before it (the tensor itself: an edit replaces the
    cache's matrix instead of adding in place, so this costs no copy). In a sequence only the first
    edit of each layer keeps it (:meth:`share`), so a long run holds no per-edit keys."""

    before: dict[int, torch.Tensor | None]

    def share(self, names: Iterable[str]) -> None:
        names = set(names)
        super().share(names)
        for layer in [k for k in getattr(self, "before", {}) if self.handle.param_name("mlp_out", k) in names]:
            del self.before[layer]

    def revert(self) -> None:
        if self.active:
            self._whole_only("revert")  # before touching the cache: a refused revert changes nothing
            restore_keys(self.handle.state(PreservedKeys), getattr(self, "before", {}))
        super().revert()


#: a top eigenvalue above this share of tr(C) is a massive-activation direction (see NullSpace).
DOMINANT_SHARE = 0.5


@dataclass
class NullSpace:
    """The projector onto C's small-eigenvalue directions, and what it leaves protected.

    ``top_share`` is the largest eigenvalue's share of tr(C). Near 1, one massive-activation
    direction sets the threshold, and almost no direction stays protected. SmolLM2's layer 11 has
    top_share 0.999 and 1 of 1536 directions protected; layers 3-7 have about 0.05 and 310-490."""

    P: torch.Tensor
    protected: int
    top_share: float


def null_space_projector(C: torch.Tensor, threshold: float) -> NullSpace:
    """The :class:`NullSpace` of C below ``threshold`` × its largest eigenvalue."""
    evals, evecs = torch.linalg.eigh(C.double())
    small = evals < threshold * evals.max()
    keep = evecs[:, small]
    share = float(evals.max() / evals.sum().clamp_min(1e-30))
    return NullSpace((keep @ keep.T).float(), int((~small).sum()), share)


@dataclass
class NullSpaces:
    """Run state: the projectors built from one model's statistics, by (layer, threshold)."""

    cache: IdentityCache[tuple[int, float], NullSpace] = field(default_factory=IdentityCache)


def null_space(handle: ModelHandle, layer: int, C: torch.Tensor, threshold: float) -> NullSpace:
    """:func:`null_space_projector` of these statistics, kept on the handle, with a one-line
    warning (once per layer and statistics) when one direction dominates C."""
    def build() -> NullSpace:
        ns = null_space_projector(C, threshold)
        if ns.top_share > DOMINANT_SHARE:
            print(f"medit: warning: alphaedit layer {layer}: one direction holds {ns.top_share:.1%} of the key "
                  f"covariance (a massive activation), so nullspace_threshold={threshold} protects only "
                  f"{ns.protected} of {ns.P.shape[0]} directions; edit other layers.", file=sys.stderr)
        return ns

    # keyed on the statistics tensor itself, kept per corpus, samples, length and dtype (SecondMoments)
    return handle.state(NullSpaces).cache.get(C, (layer, threshold), build)


class AlphaEdit(Method[AlphaEditHParams]):
    name = "alphaedit"
    description = DESCRIPTION
    hparams_class = AlphaEditHParams
    modes = ("single", "batch", "sequential")
    unsupported_families = ("t5",)
    hparams_dir = Path(medit.__file__).parent / "hparams" / "alphaedit"

    def start_run(self, handle: ModelHandle) -> None:
        handle.reset_state(PreservedKeys)
        handle.reset_state(NormAnchors)

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: AlphaEditHParams) -> WeightEdit:
        layers = spread_layers(handle, hparams.layers)
        stats, stats_s = hparams.stats(handle, layers)
        spaces = {layer: null_space(handle, layer, stats[layer], hparams.nullspace_threshold) for layer in layers}
        cache = handle.state(PreservedKeys).by_layer
        before: dict[int, torch.Tensor | None] = {}

        def solve(layer: int, K: torch.Tensor) -> torch.Tensor:
            P = spaces[layer].P.double()
            Kd = K.double()
            prev = cache.get(layer)
            A = P @ (Kd @ Kd.T + (hparams.cache_weight * prev.double() if prev is not None else 0))
            A = A + hparams.L2 * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            return torch.linalg.solve(A, P @ Kd).float()

        def remember(layer: int, K: torch.Tensor) -> None:
            kk = K @ K.T
            before[layer] = cache.get(layer)
            cache[layer] = cache[layer] + kk if layer in cache else kk

        try:
            edit = apply_spread(handle, requests, hparams, self.name, layers, stats_s, solve, AlphaEditEdit, remember)
        except BaseException:  # the weights are restored by the edit's recording; the cache here
            restore_keys(handle.state(PreservedKeys), before)
            raise
        edit.before = before  # type: ignore[attr-defined]
        edit.info["nullspace_protected"] = {layer: ns.protected for layer, ns in spaces.items()}
        return edit
