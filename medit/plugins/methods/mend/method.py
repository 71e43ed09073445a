"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale").

The fine-tuning gradient of a linear layer is a sum of rank-one terms ``δ_t x_tᵀ``. MEND trains a
small editor network per weight shape that maps each pair (x_t, δ_t), normalised by running
statistics, to a new pair (x̃_t, δ̃_t); the edit is ``W ← W − η_l Σ_t δ̃_t x̃_tᵀ`` with a learned
step size η_l per layer. The editor is a residual low-rank MLP, initialised to the identity, with
a per-layer scale and shift, trained (``medit train``) so that the edited model gives the new
target on the edit prompt and its rephrasings (edit loss) while keeping its predictions on
unrelated prompts (KL to the unedited model). Edits are low-rank (rank = edit tokens), so patches
are small; several requests are edited at once by summing their gradients (batch mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import medit
from medit.core.edit import WeightEdit
from medit.errors import HParamsError
from medit.toolkit.gradient_editors import (EditedWeights, dense_update, edit_pairs, edited_params, factor_edit, out_in_shape,
                                 post_edit_losses, token_grads)
from medit.model.handle import ModelHandle
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer
from medit.toolkit.training import LearnedHParams, LearnedMethod
from medit.plugins.methods.mend import DESCRIPTION

HPARAMS = Path(medit.__file__).parent / "hparams"


@dataclass
class MENDHParams(EditedWeights, LearnedHParams):
    """Hyperparameters of MEND (editor architecture, edit and training losses)."""

    #: hidden width of the editor's low-rank residual blocks.
    rank: int = 256
    #: residual blocks per editor network.
    n_blocks: int = 2
    #: initial per-layer edit step size η_l (learned).
    edit_lr: float = 1e-4
    #: Adam learning rate of the step sizes η_l.
    lr_lr: float = 1e-4
    #: weight of the edit loss (NLL of the new target after the edit).
    c_edit: float = 0.1
    #: weight of the locality loss (KL between unedited and edited predictions).
    c_loc: float = 1.0

    def __post_init__(self) -> None:
        self.check_training()
        self.check_edited_weights()
        for name in ("rank", "n_blocks"):
            if getattr(self, name) < 1:
                raise HParamsError(f"hparam {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("edit_lr", "lr_lr"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparam {name!r} must be > 0, got {getattr(self, name)}")
        if self.c_edit < 0 or self.c_loc < 0:
            raise HParamsError(f"hparams 'c_edit' and 'c_loc' must be >= 0, got {self.c_edit} and {self.c_loc}")


class GradNet(nn.Module):
    """Residual low-rank MLP on concatenated (x, δ), identity at initialisation, with a scale and
    shift per edited layer that shares this shape."""

    def __init__(self, dim: int, rank: int, n_blocks: int, n_layers: int) -> None:
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(dim, rank) for _ in range(n_blocks))
        self.up = nn.ModuleList(nn.Linear(rank, dim) for _ in range(n_blocks))
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.scale = nn.Parameter(torch.ones(n_blocks, n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_blocks, n_layers, dim))

    def forward(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        for b, (down, up) in enumerate(zip(self.down, self.up)):
            z = z + up(torch.relu(down(z))) * self.scale[b, layer] + self.shift[b, layer]
        return z


class MENDEditor(nn.Module):
    """One :class:`GradNet` per (out, in) weight shape, running input statistics per edited
    weight, and the learned step sizes."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, n_blocks: int, edit_lr: float) -> None:
        super().__init__()
        self.names = list(shapes)
        self.shapes = dict(shapes)
        groups: dict[tuple[int, int], list[str]] = {}
        for n, s in shapes.items():
            groups.setdefault(s, []).append(n)
        self.slot = {n: (self._key(s), ns.index(n)) for s, ns in groups.items() for n in ns}
        self.nets = nn.ModuleDict({self._key(s): GradNet(s[0] + s[1], rank, n_blocks, len(ns))
                                   for s, ns in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.names),), float(edit_lr)))
        for i, (n, (o, d_in)) in enumerate(shapes.items()):
            self.register_buffer(f"count_{i}", torch.zeros(()))
            self.register_buffer(f"mean_{i}", torch.zeros(o + d_in))
            self.register_buffer(f"m2_{i}", torch.zeros(o + d_in))

    @staticmethod
    def _key(shape: tuple[int, int]) -> str:
        return f"s{shape[0]}x{shape[1]}"

    def _update_stats(self, i: int, z: torch.Tensor) -> None:
        # Chan et al.'s parallel variant of Welford's algorithm: exact running mean and variance.
        count, mean, m2 = getattr(self, f"count_{i}"), getattr(self, f"mean_{i}"), getattr(self, f"m2_{i}")
        n_b = z.shape[0]
        mean_b = z.mean(0)
        m2_b = ((z - mean_b) ** 2).sum(0)
        total = count + n_b
        delta = mean_b - mean
        mean.add_(delta * n_b / total)
        m2.add_(m2_b + delta ** 2 * count * n_b / total)
        count.fill_(total)

    def transform(self, name: str, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̃ [T, in], η_l·δ̃ [T, out]) for the gradient factors of weight ``name``."""
        i = self.names.index(name)
        out_dim = self.shapes[name][0]
        z = torch.cat([d, u], dim=-1)
        if self.training:
            with torch.no_grad():
                self._update_stats(i, z)
        count = getattr(self, f"count_{i}")
        mean = getattr(self, f"mean_{i}")
        var = getattr(self, f"m2_{i}") / (count - 1).clamp_min(1)
        z = (z - mean) / var.sqrt().clamp_min(1e-8)
        key, slot = self.slot[name]
        z = self.nets[key](z, slot)
        return z[:, out_dim:], z[:, :out_dim] * self.edit_lrs[i]


class MEND(LearnedMethod[MENDHParams, MENDEditor]):
    name = "mend"
    description = DESCRIPTION
    hparams_class = MENDHParams
    modes = ("single", "batch", "sequential")
    hparams_dir = HPARAMS / "mend"

    def init_editor(self, handle: ModelHandle, hparams: MENDHParams) -> MENDEditor:
        names = edited_params(handle, hparams.modules, hparams.layers)
        return MENDEditor({n: out_in_shape(handle, n) for n in names}, hparams.rank, hparams.n_blocks,
                          hparams.edit_lr)

    def param_groups(self, editor: nn.Module, hparams: MENDHParams) -> list[dict[str, Any]]:
        rest = [p for n, p in editor.named_parameters() if n != "edit_lrs"]
        return [{"params": rest, "lr": hparams.lr}, {"params": [editor.edit_lrs], "lr": hparams.lr_lr}]

    def _updates(self, handle: ModelHandle, editor: MENDEditor,
                 requests: Sequence[EditRequest]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        grads = token_grads(handle, editor.names, edit_pairs(Scorer(handle), requests))
        dev = editor.edit_lrs.device
        out = {}
        for n, (u, d) in grads.items():
            u_t, d_t = editor.transform(n, u.to(dev), d.to(dev))
            out[n] = (-d_t, u_t)  # gradient descent: W - η Σ δ̃ x̃ᵀ
        return out

    def train_loss(self, handle: ModelHandle, editor: MENDEditor, batch: Sequence[EditRequest],
                   hparams: MENDHParams) -> tuple[torch.Tensor, dict[str, float]]:
        params = dict(handle.model.named_parameters())
        weights = {n: params[n] + dense_update(handle, left, right).to(params[n].dtype)
                   for n, (left, right) in self._updates(handle, editor, batch).items()}
        nll, kl = post_edit_losses(handle, batch, weights)
        loss = hparams.c_edit * nll + hparams.c_loc * kl
        return loss, {"edit_nll": float(nll.detach()), "loc_kl": float(kl.detach())}

    def edit_with(self, handle: ModelHandle, editor: MENDEditor, requests: Sequence[EditRequest],
                  hparams: MENDHParams) -> WeightEdit:
        editor.eval()
        with torch.no_grad():  # token_grads enables autograd for the model's own backward pass
            updates = self._updates(handle, editor, requests)
        edit = factor_edit(handle, self.name, requests, hparams.to_dict(), updates)
        edit.info["checkpoint"] = hparams.checkpoint
        return edit
