"""Shared pieces of locate-then-edit methods: their common hyperparameters, and the multi-layer
least-squares spreading of target residuals used by MEMIT-style methods (MEMIT, AlphaEdit...).
A method composes these; it never carries its own copy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from medit.core.state import IdentityCache
from medit.model.tracing import mlp_post_norm
from medit.toolkit.context import context_templates
from medit.errors import HParamsError
from medit.toolkit.norm_anchor import NormAnchorHParams, anchor_values
from medit.toolkit.layer_keys import LayerKeys
from medit.toolkit.target_vectors import DeltaSpec, optimise_deltas, rewrite_change, subject_outputs
from medit.toolkit.stats import PACKAGED_CORPUS, second_moments

if TYPE_CHECKING:
    from medit.core.edit import WeightEdit
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest

#: (d_in x d_in covariance-like matrix, keys [d_in, n]) -> X [d_in, n]; the update is R Xᵀ.
Solver = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LocateHParams(NormAnchorHParams):
    """Hyperparameters every locate-then-edit method shares (mixed into each method's dataclass),
    norm anchoring (:mod:`medit.toolkit.norm_anchor`) included."""

    #: statistics corpus: local .txt/.jsonl file or Hugging Face dataset ``name[:config]``; by
    #: default the WikiText-2 validation text the package ships (offline; medit/datasets/DATA.md).
    stats_corpus: str = PACKAGED_CORPUS
    #: corpus paragraphs used for the key covariance.
    stats_samples: int = 1000
    stats_max_len: int = 128
    stats_dtype: str = "float32"
    #: on CUDA, TF32 matrix products for the statistics' corpus pass (see medit.toolkit.stats).
    stats_tf32: bool = True
    #: context templates: (new tokens, count) pairs, plus the bare prompt.
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    #: which subject token the key is read at: ``last`` or ``first``.
    fact_token: str = "last"
    v_steps: int = 25
    v_lr: float = 0.5
    v_kl_factor: float = 0.0625
    v_weight_decay: float = 1e-3
    v_clamp_norm_factor: float = 4.0
    #: an edit whose own prompt misses its target within ``v_steps`` at that clamp gets up to
    #: ``v_max_clamp_steps`` more with the clamp raised to this factor; edits that converge keep the
    #: tighter clamp (None: off).
    v_clamp_norm_factor_max: float | None = None
    v_max_clamp_steps: int = 25
    v_early_stop_nll: float = 0.05
    v_chunk: int = 8
    #: dtype of the matrix products while the target vectors are optimised (``bfloat16``:
    #: ``torch.autocast``, several times faster on GPUs and on CPUs with AMX); None: the model's.
    v_autocast: str | None = None
    #: extra prompts (``{}`` marks the subject) that should also produce target_new while δ is
    #: optimised, e.g. ``"{} is associated with"``; they ask for the new fact beyond one wording.
    v_extra_prompts: list[str] = field(default_factory=list)

    def check_locate(self) -> None:
        self.check_norm_anchor()
        for name in ("stats_samples", "stats_max_len", "v_steps", "v_chunk", "v_max_clamp_steps"):
            if getattr(self, name) < 1:
                raise HParamsError(f"hparam {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("v_lr", "v_clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparam {name!r} must be > 0, got {getattr(self, name)}")
        if self.v_clamp_norm_factor_max is not None and self.v_clamp_norm_factor_max < self.v_clamp_norm_factor:
            raise HParamsError(f"hparam 'v_clamp_norm_factor_max' must be >= v_clamp_norm_factor "
                               f"({self.v_clamp_norm_factor}), got {self.v_clamp_norm_factor_max}")
        if self.fact_token not in ("last", "first"):
            raise HParamsError(f"hparam 'fact_token' must be 'last' or 'first', got {self.fact_token!r}")
        if self.v_autocast not in (None, "bfloat16", "float16"):
            raise HParamsError(f"hparam 'v_autocast' must be bfloat16, float16 or null (the model's own dtype), "
                               f"got {self.v_autocast!r}")
        if self.stats_dtype not in ("float32", "float64"):
            raise HParamsError(f"hparam 'stats_dtype' must be float32 or float64, got {self.stats_dtype!r}")
        bad = [p for p in self.v_extra_prompts if not isinstance(p, str) or p.count("{}") != 1]
        if bad:
            raise HParamsError(f"hparam 'v_extra_prompts' entries must contain '{{}}' once (for the subject), "
                               f"got {bad[0]!r}")
        if any(len(x) != 2 or x[0] < 1 or x[1] < 0 for x in self.context_templates):
            raise HParamsError("hparam 'context_templates' must be a list of [new_tokens, count] pairs, "
                               f"got {self.context_templates!r}")

    def delta_spec(self) -> DeltaSpec:
        return DeltaSpec(steps=self.v_steps, lr=self.v_lr, kl_factor=self.v_kl_factor,
                         weight_decay=self.v_weight_decay, clamp_norm_factor=self.v_clamp_norm_factor,
                         clamp_norm_factor_max=self.v_clamp_norm_factor_max, max_clamp_steps=self.v_max_clamp_steps,
                         early_stop_nll=self.v_early_stop_nll, chunk=self.v_chunk,
                         extra_prompts=tuple(self.v_extra_prompts), autocast=self.v_autocast)

    def templates(self, handle: "ModelHandle") -> list[str]:
        return context_templates(handle, [tuple(x) for x in self.context_templates])  # type: ignore[misc]

    def stats(self, handle: "ModelHandle", layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], float]:
        return second_moments(handle, layers, self.stats_corpus, self.stats_samples, self.stats_max_len,
                              self.stats_dtype, tf32=self.stats_tf32)


@dataclass
class SpreadHParams(LocateHParams):
    """Shared hyperparameters of the MEMIT-style methods that spread an edit over several layers."""

    #: passes of the layer-by-layer solve. The ridge (and AlphaEdit's null-space projection) make
    #: each layer realise only part of its share, so one pass can leave the edit short of the
    #: optimised target; each further pass solves again for the remaining gap (same targets).
    spread_passes: int = 1
    #: a further pass runs only while some edit realises less than this share of its optimised
    #: change (measured after the last edited layer), and solves only for those edits: in a batch,
    #: the edits that already took get a zero residual, so the pass holds their outputs.
    spread_min_realised: float = 1.0

    def check_locate(self) -> None:
        super().check_locate()
        if self.spread_passes < 1:
            raise HParamsError(f"hparam 'spread_passes' must be >= 1, got {self.spread_passes}")
        if not 0 < self.spread_min_realised <= 1:
            raise HParamsError(f"hparam 'spread_min_realised' must be in (0, 1], got {self.spread_min_realised}")


class CovarianceSolver:
    """``B -> A⁻¹ B`` for ``A = scale·C + ridge·mean(diag C)·I``, in float64. ``A`` is factorised
    (Cholesky) once; ``factored`` is False when it is not numerically positive definite, and calls
    then fall back to a direct solve of ``matrix``."""

    def __init__(self, C: torch.Tensor, scale: float, ridge: float) -> None:
        A = scale * C.double()
        if ridge:
            A.diagonal().add_(ridge * A.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(A)
        ok = int(info) == 0
        self.factor: torch.Tensor | None = L if ok else None
        self.matrix: torch.Tensor | None = None if ok else A

    @property
    def factored(self) -> bool:
        return self.factor is not None

    def __call__(self, B: torch.Tensor) -> torch.Tensor:
        if self.factor is not None:
            return torch.cholesky_solve(B.double(), self.factor)
        return torch.linalg.solve(self.matrix, B.double())


@dataclass
class CovarianceSolvers:
    """Run state: the solvers built from one model's statistics, by (scale, ridge)."""

    cache: IdentityCache[tuple[float, float], CovarianceSolver] = field(default_factory=IdentityCache)


def covariance_solver(handle: "ModelHandle", C: torch.Tensor, scale: float = 1.0, ridge: float = 0.0
                      ) -> CovarianceSolver:
    """The :class:`CovarianceSolver` for these statistics, kept on the handle: every later edit
    against the same statistics costs a triangular solve (O(d²) per column) instead of a fresh
    O(d³) factorisation. The factor costs d²·8 bytes per layer for the handle's life (about 1 GB
    per layer of LLaMA-2-7B)."""
    return handle.state(CovarianceSolvers).cache.get(C, (float(scale), float(ridge)),
                                                     lambda: CovarianceSolver(C, scale, ridge))


def storage_factors(handle: "ModelHandle", out_vecs: torch.Tensor, in_vecs: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) with ``u @ v.T`` equal to the update ``out_vecs @ in_vecs.T`` in the
    weight's storage orientation ((out, in) for Linear, (in, out) for GPT-2's Conv1D)."""
    return (in_vecs, out_vecs) if handle.adapter.transposed else (out_vecs, in_vecs)


def spread_update(handle: "ModelHandle", reqs: Sequence["EditRequest"], layers: Sequence[int],
                  hp: SpreadHParams, solver: Solver, on_keys: Callable[[int, torch.Tensor], None] | None = None
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """MEMIT's algorithm: optimise target residuals at the last layer, then for each layer (lowest
    first) solve for the update that moves the keys towards an equal share of what remains (in a
    family with a post-MLP norm, the rewrite-module change that moves the residual by that share).

    Applies the updates in place (the caller records originals) and returns per-parameter
    low-rank factors and info. ``solver(layer, K)`` returns X with the update ``R Xᵀ``.
    """
    templates = hp.templates(handle)
    z_layer = layers[-1]
    deltas, infos = optimise_deltas(handle, reqs, z_layer, templates, hp.delta_spec(), "resid", hp.fact_token)
    deltas = anchor_values(handle, reqs, z_layer, deltas, hp, hp.fact_token)
    # keys and the residual after the last edited layer, measured again after each layer's update
    # (running only the layers from the one just edited up)
    measure = LayerKeys(handle, reqs, templates, hp.fact_token, z_layer)
    targets = measure(layers[0])[1] + deltas.float()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    params = dict(handle.model.named_parameters())
    first_keys: dict[int, torch.Tensor] = {}
    done = 0
    # edits a further pass still pushes; the others keep their outputs (zero residual) there
    active = torch.ones(len(reqs), dtype=torch.bool, device=targets.device)
    while True:
        for i, layer in enumerate(layers):
            keys, cur = measure(layer)
            K = keys.T  # [d_in, n]
            first_keys.setdefault(layer, K)
            R = (targets - cur) * active[:, None] / (len(layers) - i)  # [n, d_out]
            if mlp_post_norm(handle, layer) is not None:  # residual-stream change -> rewrite-module change
                R = rewrite_change(handle, layer, subject_outputs(handle, reqs, layer, hp.fact_token), R)
            R = R.T  # [d_out, n]
            X = solver(layer, K)
            u, v = storage_factors(handle, R, X)
            name = handle.param_name("mlp_out", layer)
            p = params[name]
            with torch.no_grad():
                p.add_((u @ v.T).to(p.dtype))
            measure.edited(layer)
            u, v = u.detach().cpu(), v.detach().cpu()
            if name in factors:  # a later pass: the patch holds the columns of every pass
                u, v = torch.cat([factors[name][0], u], 1), torch.cat([factors[name][1], v], 1)
            factors[name] = (u, v)
        done += 1
        final = measure(layers[0])[1]
        # the share of the optimised residual change the update realises at the last edited layer
        realised = 1 - (targets - final).norm(dim=1) / deltas.float().norm(dim=1).clamp_min(1e-12)
        active = realised < hp.spread_min_realised
        if done >= hp.spread_passes or not bool(active.any()):
            break
    # after all passes, so that a later pass's solve does not count this edit's keys twice
    if on_keys is not None:
        for layer, K in first_keys.items():
            on_keys(layer, K)
    return factors, {"delta_steps": [x["steps"] for x in infos], "delta_nll": [x["nll"] for x in infos],
                     "realised": [round(float(x), 4) for x in realised], "spread_passes": done}


def apply_spread(handle: "ModelHandle", requests: Sequence["EditRequest"], hp: SpreadHParams, method: str,
                 layers: Sequence[int], stats_s: float, solver: Solver, edit_cls: type | None = None,
                 on_keys: Callable[[int, torch.Tensor], None] | None = None) -> "WeightEdit":
    """Record the edited projections, run :func:`spread_update`, and return the Edit holding the
    per-layer factors (the part MEMIT-style methods share; they differ in ``solver``)."""
    from medit.core.edit import WeightEdit
    cls = edit_cls or WeightEdit
    names = [handle.param_name("mlp_out", layer) for layer in layers]
    with cls.recording(handle, names, method, requests, hp.to_dict()) as edit:  # type: ignore[attr-defined]
        edit.factors, info = spread_update(handle, requests, layers, hp, solver, on_keys=on_keys)
    edit.info.update(stats_s=stats_s, layers=list(layers), **info)
    return edit
