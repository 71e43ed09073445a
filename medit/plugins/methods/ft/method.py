"""FT-L and FT-M: fine-tune one MLP projection on the edit targets.

FT-L (Zhu et al. 2020, as used in the ROME paper) bounds the change of every weight by an L∞
norm constraint. FT-M (EasyEdit) drops the bound and trains on the target tokens only. Both are
the same code with different defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

import medit
from medit.core.edit import WeightEdit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer
from medit.toolkit.norm_anchor import NormAnchorHParams, NormAnchors, anchor_weights

HPARAMS = Path(medit.__file__).parent / "hparams"


@dataclass
class FTHParams(NormAnchorHParams, HParams):
    """Hyperparameters of FT-L / FT-M."""

    #: layer indices to tune, or ``auto`` (one layer at 70% of the depth).
    layers: list[int] | str = "auto"
    #: standard module name whose weight is tuned (``mlp_out`` or ``mlp_in``).
    module: str = "mlp_out"
    #: Adam learning rate.
    lr: float = 5e-3
    #: optimisation steps (stops earlier when the loss falls below ``early_stop_loss``).
    steps: int = 40
    #: L∞ bound on the change of each weight; ``null`` for none (FT-M).
    norm_constraint: float | None = 7.5e-3
    #: ``target``: teacher-forced NLL of all target tokens; ``prompt_last``: every target token
    #: predicted from the last prompt position (the ROME paper's FT-L objective).
    objective: Literal["target", "prompt_last"] = "target"
    weight_decay: float = 0.0
    early_stop_loss: float = 0.01

    def __post_init__(self) -> None:
        self.check_norm_anchor()
        if self.lr <= 0:
            raise HParamsError(f"hparam 'lr' must be > 0, got {self.lr}")
        if self.steps < 1:
            raise HParamsError(f"hparam 'steps' must be >= 1, got {self.steps}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise HParamsError(f"hparam 'norm_constraint' must be > 0 or null, got {self.norm_constraint}")
        if self.module not in ("mlp_out", "mlp_in"):
            raise HParamsError(f"hparam 'module' must be 'mlp_out' or 'mlp_in', got {self.module!r}")
        if self.weight_decay < 0:
            raise HParamsError(f"hparam 'weight_decay' must be >= 0, got {self.weight_decay}")


class FineTune(Method[FTHParams]):
    """Constrained fine-tuning of one MLP projection per chosen layer."""

    hparams_class = FTHParams
    modes = ("single", "batch", "sequential")

    def __init__(self, name: str, description: str) -> None:
        self.name = name  # type: ignore[misc]
        self.description = description  # type: ignore[misc]
        self.hparams_dir = HPARAMS / name  # type: ignore[misc]

    def start_run(self, handle: ModelHandle) -> None:
        handle.reset_state(NormAnchors)

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: FTHParams) -> WeightEdit:
        layers = resolve_layers(handle, hparams.layers, auto=(0.7,))
        names = [handle.param_name(hparams.module, layer) for layer in layers]
        scorer = Scorer(handle)
        last_only = hparams.objective == "prompt_last"
        batch = [scorer.encode_pair(r.prompt, r.target_new) for r in requests]
        params = dict(handle.model.named_parameters())
        tuned = [params[n] for n in names]
        with WeightEdit.recording(handle, names, self.name, requests, hparams.to_dict()) as edit:
            for p in tuned:
                p.requires_grad_(True)
            try:
                opt = torch.optim.Adam(tuned, lr=hparams.lr, weight_decay=hparams.weight_decay)
                for step in range(hparams.steps):
                    opt.zero_grad(set_to_none=True)
                    loss = scorer.target_nll(batch, last_only=last_only)
                    if loss.item() < hparams.early_stop_loss:
                        break
                    loss.backward()
                    opt.step()
                    if hparams.norm_constraint is not None:
                        eps = hparams.norm_constraint
                        with torch.no_grad():
                            for n, p in zip(names, tuned):
                                orig = edit.originals[n]
                                p.copy_(torch.clamp(p, orig - eps, orig + eps))
                edit.info["steps"] = step + 1
                edit.info["final_loss"] = float(loss.item())
            finally:
                for p in tuned:
                    p.requires_grad_(False)
                    p.grad = None
            anchor_weights(handle, edit, hparams)
        return edit
