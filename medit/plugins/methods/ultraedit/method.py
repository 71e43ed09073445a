"""UltraEdit (Gu et al. 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing").

One forward and backward pass of the target NLL gives, at every edited linear layer ``y = W k``
and every position t that predicts a target token, the key ``k_t`` and the output gradient ``g_t = dL/dy_t``
(:func:`~medit.toolkit.gradient_editors.token_grads`). The pair ``z_t = [k_t; g_t]`` is added to
the layer's running moments (lifelong normalisation, :mod:`medit.toolkit.lifelong`) and
normalised by them (``k̂_t``, ``ĝ_t``); the pseudo-value is ``v_t = -lr ‖k̂_t‖² ĝ_t`` and the shift
is the ridge least-squares map from the raw keys to the pseudo-values,

    ΔWᵀ = (KᵀK + ridge·I)⁻¹ Kᵀ V = Kᵀ (K Kᵀ + ridge·I)⁻¹ V      (K [T, d_in], V [T, d_out]),

computed on the right-hand side (a T×T solve, T = target tokens of the turn). Nothing is trained
and no covariance corpus is read; what persists is the running moments, which
:meth:`UltraEdit.start_run` resets and a reverted edit restores.

Differences from the reference implementation: moments are kept per edited parameter (the
reference shares them between parameters of the same shape), and the layers are medit's standard
``mlp_in`` / ``mlp_out`` modules (the reference edits gate and up projections of LLaMA-style MLPs;
``mlp_in`` is the up projection).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

import medit
from medit.core.edit import WeightEdit
from medit.core.hparams import HParams
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.plugins.methods.ultraedit import DESCRIPTION
from medit.scoring.engine import Scorer
from medit.toolkit.gradient_editors import EditedWeights, edit_pairs, edited_params, token_grads
from medit.toolkit.lifelong import LifelongMoments, RunningMoments
from medit.toolkit.norm_anchor import NormAnchorHParams, NormAnchors, anchor_weights
from medit.toolkit.spread import CovarianceSolver, covariance_solver, storage_factors
from medit.toolkit.stats import PACKAGED_CORPUS, second_moments


@dataclass
class UltraEditHParams(EditedWeights, NormAnchorHParams, HParams):
    """Hyperparameters of UltraEdit. ``layers`` / ``modules`` name the edited weights
    (``auto``: the last three layers)."""

    #: the MLP input projections by default, as the reference edits the MLPs' input side.
    modules: list[str] = field(default_factory=lambda: ["mlp_in"])

    #: step size of the pseudo-values ``v = -lr ‖k̂‖² ĝ`` (the paper's ``lr``): how far each edit
    #: moves the layer outputs along the normalised negative gradient.
    lr: float = 1e-3
    #: ridge of the key least squares (1 in the paper): larger keeps the shift smaller and smoother.
    ridge: float = 1.0
    #: normalise keys and gradients by the run's running moments (the paper's lifelong
    #: normalisation); False uses the raw key and gradient (an ablation).
    normalise: bool = True
    #: not in the paper: weigh the key solve by the edited layer's key second moment ``C`` over
    #: ordinary text (ROME/MEMIT's statistics), ``(KᵀK + ridge·I + preserve·C)⁻¹KᵀV``, so the
    #: shift stays off keys that unrelated prompts share; ``preserve`` counts corpus tokens like
    #: MEMIT's ``mom2_update_weight`` (0: off, the paper's identity ridge). ``mlp_out`` only.
    preserve: float = 0.0
    #: corpus paragraphs of those statistics (the packaged WikiText-2 sample).
    stats_samples: int = 1000

    def __post_init__(self) -> None:
        self.check_edited_weights()
        self.check_norm_anchor()
        if self.lr <= 0:
            raise HParamsError(f"hparam 'lr' must be > 0, got {self.lr}")
        if self.ridge <= 0:
            raise HParamsError(f"hparam 'ridge' must be > 0 (the key solve needs it), got {self.ridge}")
        if self.preserve < 0:
            raise HParamsError(f"hparam 'preserve' must be >= 0, got {self.preserve}")
        if self.preserve and list(self.modules) != ["mlp_out"]:
            raise HParamsError("hparam 'preserve' needs modules: [mlp_out] (the statistics are of the MLP output "
                               f"projection's input), got modules {self.modules!r}")
        if self.stats_samples < 1:
            raise HParamsError(f"hparam 'stats_samples' must be >= 1, got {self.stats_samples}")


class UltraEditEdit(WeightEdit):
    """A WeightEdit that also restores the run's moments of its weights on revert.

    It keeps the moments as they were before it (their tensors, which :class:`RunningMoments`
    never changes in place, so this costs no copy). In a sequence only the first edit of each
    weight keeps them (:meth:`share`): reverting the sequence restores them, and a long run holds
    no per-edit rows."""

    before: dict[str, RunningMoments]

    def share(self, names: Iterable[str]) -> None:
        names = list(names)
        super().share(names)
        for name in names:
            getattr(self, "before", {}).pop(name, None)

    def revert(self) -> None:
        if self.active:
            self._whole_only("revert")  # before touching the moments: a refused revert changes nothing
            moments = self.handle.state(LifelongMoments)
            for name, m in getattr(self, "before", {}).items():
                moments.by_param[name] = m
        super().revert()


def pseudo_values(keys: torch.Tensor, grads: torch.Tensor, norm_keys: torch.Tensor, norm_grads: torch.Tensor,
                  lr: float) -> torch.Tensor:
    """UltraEdit's value targets ``-lr ‖k̂_t‖² ĝ_t`` [T, d_out] (float64)."""
    return -lr * (norm_keys * norm_keys).sum(-1, keepdim=True) * norm_grads


def key_least_squares(keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """``Kᵀ (K Kᵀ + ridge·I)⁻¹`` [d_in, T] in float64, equal to ``(KᵀK + ridge·I)⁻¹ Kᵀ``."""
    K = keys.double()
    gram = K @ K.T
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, K).T


def preserved_least_squares(keys: torch.Tensor, solve: CovarianceSolver) -> torch.Tensor:
    """``(A + KᵀK)⁻¹Kᵀ = A⁻¹Kᵀ(I + K A⁻¹Kᵀ)⁻¹`` [d_in, T] in float64, ``solve`` applying ``A⁻¹``
    (factorised once per run): a T×T solve per turn instead of a d_in×d_in one."""
    K = keys.double()
    a_kt = solve(K.T)
    inner = K @ a_kt
    inner.diagonal().add_(1.0)
    return torch.linalg.solve(inner, a_kt.T).T


class UltraEdit(Method[UltraEditHParams]):
    name = "ultraedit"
    description = DESCRIPTION
    hparams_class = UltraEditHParams
    modes = ("single", "batch", "sequential")
    hparams_dir = Path(medit.__file__).parent / "hparams" / "ultraedit"

    def start_run(self, handle: ModelHandle) -> None:
        handle.reset_state(LifelongMoments)
        handle.reset_state(NormAnchors)

    def _preserving(self, handle: ModelHandle, names: Sequence[str], hp: UltraEditHParams
                    ) -> tuple[dict[str, CovarianceSolver], float]:
        """Per edited weight, the solver of ``A = preserve·C + ridge·I``; and the statistics' seconds."""
        layer_of = {handle.param_name("mlp_out", layer): layer for layer in range(handle.n_layers)}
        layers = sorted({layer_of[n] for n in names})
        stats, stats_s = second_moments(handle, layers, PACKAGED_CORPUS, hp.stats_samples)
        out = {}
        for n in names:
            C = stats[layer_of[n]]
            scale = hp.preserve * float(C.diagonal().double().mean())
            out[n] = covariance_solver(handle, C, scale=hp.preserve, ridge=hp.ridge / scale if scale > 0 else 0.0)
        return out, stats_s

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: UltraEditHParams) -> WeightEdit:
        names = edited_params(handle, hparams.modules, hparams.layers)
        grads = token_grads(handle, names, edit_pairs(Scorer(handle), requests), at_targets=True)
        moments = handle.state(LifelongMoments)
        solvers, stats_s = self._preserving(handle, names, hparams) if hparams.preserve else ({}, 0.0)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        before: dict[str, RunningMoments] = {}
        for name in names:
            keys, out_grads = grads[name]
            if keys.shape[0] == 0:  # no target position reached this weight's gradient
                continue
            if hparams.normalise:
                rows = torch.cat([keys, out_grads], 1)
                before[name] = moments.of(name).copy()
                moments.of(name).add(rows)
                normed = moments.of(name).normalise(rows)
                kn, gn = normed[:, :keys.shape[1]], normed[:, keys.shape[1]:]
            else:
                kn, gn = keys.double(), out_grads.double()
            V = pseudo_values(keys, out_grads, kn.to(keys.device), gn.to(keys.device), hparams.lr)
            X = preserved_least_squares(keys, solvers[name]) if solvers else key_least_squares(keys, hparams.ridge)
            factors[name] = storage_factors(handle, V.T.float(), X.float())
        try:
            edit = UltraEditEdit.from_deltas(handle, self.name, requests, hparams.to_dict(), factors=factors)
        except BaseException:
            moments.by_param.update(before)
            raise
        assert isinstance(edit, UltraEditEdit)
        edit.before = before
        anchor_weights(handle, edit, hparams)
        edit.info.update(edited=list(factors), stats_s=stats_s, target_tokens={n: int(grads[n][0].shape[0]) for n in names})
        return edit
