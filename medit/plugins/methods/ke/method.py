"""KnowledgeEditor (De Cao et al. 2021, "Editing Factual Knowledge in Language Models").

A hyper-network reads the edit — the input, the old and the new output — and predicts, for each
edited weight ``W`` (out × in), a constrained update built from the fine-tuning gradient ``G``:

    ΔW = σ(η) · s_l · ( diag(α) Ĝ diag(γ) + β δᵀ ),     Ĝ = −G / ‖G‖_F

with ``α = out · softmax(a)`` and ``β = softmax(b)`` over the output units, ``γ``, ``δ`` over the
input units, ``η`` a gate and ``s_l`` a learned per-layer scale; ``a, b, γ, δ, η`` come from the
edit's condition vector (an MLP over the mean input embeddings of the prompt, the new and the old
target; the paper uses an LSTM over the same embeddings). Training minimises the edit loss on the
prompt and its rephrasings subject to ``KL(unedited ‖ edited) ≤ margin`` on unrelated prompts,
enforced with a Lagrange multiplier updated by gradient ascent, as in the paper. The gradient
normalisation makes the update independent of the loss scale (our addition). The update is
low-rank (edit tokens + 1), stored as factors. Optionally (``token_attention``, also ours) the
gradient's token terms are reweighted, ``G = Σ_t w_t δ_t x_tᵀ``, by a conditioned attention.
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
from medit.plugins.methods.ke import DESCRIPTION

HPARAMS = Path(medit.__file__).parent / "hparams"


@dataclass
class KEHParams(EditedWeights, LearnedHParams):
    """Hyperparameters of KnowledgeEditor."""

    #: width of the condition network.
    hidden: int = 128
    #: initial update size relative to ‖W‖_F (learned per layer).
    init_scale: float = 0.02
    #: bound on KL(unedited ‖ edited) over locality prompts (the constraint).
    kl_margin: float = 0.01
    #: learning rate of the Lagrange multiplier's gradient ascent.
    lagrange_lr: float = 0.01
    #: multiplier on the predicted update when editing (not in training): below 1 trades edit
    #: strength for locality without retraining.
    edit_scale: float = 1.0
    #: rank of a conditioned attention over the gradient's token positions (0: off, every token
    #: weighs the same, as in the paper). Each position's weight is a softmax of
    #: ⟨P x̂_t, Q h⟩ (x̂_t its normalised layer input, h the edit's condition), so the editor can
    #: put the update on the inputs that identify the edit rather than the ones every prompt of
    #: the relation shares. P starts at zero: the untrained editor equals the plain one.
    token_attention: int = 0

    def __post_init__(self) -> None:
        self.check_training()
        self.check_edited_weights()
        if self.hidden < 1:
            raise HParamsError(f"hparam 'hidden' must be >= 1, got {self.hidden}")
        for name in ("init_scale", "kl_margin", "lagrange_lr", "edit_scale"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparam {name!r} must be > 0, got {getattr(self, name)}")
        if self.token_attention < 0:
            raise HParamsError(f"hparam 'token_attention' must be >= 0 (0: off), got {self.token_attention}")


class KEEditor(nn.Module):
    """Condition MLP, one head per edited weight, per-layer scales and the Lagrange multiplier."""

    def __init__(self, emb_dim: int, hidden: int, shapes: dict[str, tuple[int, int]],
                 norms: dict[str, float], init_scale: float, token_attention: int = 0) -> None:
        super().__init__()
        self.names = list(shapes)
        self.shapes = dict(shapes)
        self.cond = nn.Sequential(nn.Linear(3 * emb_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleList()
        for n in self.names:
            o, i = shapes[n]
            head = nn.Linear(hidden, 2 * o + 2 * i + 1)
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
            with torch.no_grad():
                head.bias[2 * o:2 * o + i] = 1.0  # γ starts at 1: a (normalised) gradient step
            self.heads.append(head)
        self.log_scale = nn.Parameter(torch.tensor([float(torch.tensor(init_scale * norms[n]).log()) for n in self.names]))
        self.rho = nn.Parameter(torch.tensor(0.0))  # Lagrange multiplier λ = softplus(ρ)
        self.token_keys = nn.ModuleList()
        self.token_queries = nn.ModuleList()
        if token_attention:
            for n in self.names:
                key = nn.Linear(shapes[n][1], token_attention, bias=False)
                nn.init.zeros_(key.weight)
                self.token_keys.append(key)
                self.token_queries.append(nn.Linear(hidden, token_attention))

    def token_weights(self, k: int, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Weight of each token position [T] of weight ``k``'s gradient (mean 1; all 1 when off)."""
        if not len(self.token_keys):
            return u.new_ones(u.shape[0])
        x = u / u.norm(dim=1, keepdim=True).clamp_min(1e-6)
        scores = self.token_keys[k](x) @ self.token_queries[k](h)
        return torch.softmax(scores, 0) * u.shape[0]

    def updates(self, cond_in: torch.Tensor, grads: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (left [T+1, out], right [T+1, in]) with ΔW = Σ left_t right_tᵀ, for one edit."""
        h = self.cond(cond_in)
        out = {}
        for k, n in enumerate(self.names):
            o, i = self.shapes[n]
            v = self.heads[k](h)
            a, b, gamma, delta, eta = v[:o], v[o:2 * o], v[2 * o:2 * o + i], v[2 * o + i:2 * o + 2 * i], v[-1]
            u, d = grads[n]
            d = d * self.token_weights(k, h, u)[:, None]
            gnorm = ((d @ d.T) * (u @ u.T)).sum().clamp_min(1e-30).sqrt()  # ‖Σ d_t u_tᵀ‖_F
            coef = torch.sigmoid(eta) * self.log_scale[k].exp()
            alpha = torch.softmax(a, 0) * o
            left = torch.cat([-(d * alpha) / gnorm, torch.softmax(b, 0)[None]]) * coef
            right = torch.cat([u * gamma, delta[None]])
            out[n] = (left, right)
        return out


class KE(LearnedMethod[KEHParams, KEEditor]):
    name = "ke"
    description = DESCRIPTION
    hparams_class = KEHParams
    modes = ("single", "batch", "sequential")
    hparams_dir = HPARAMS / "ke"

    def init_editor(self, handle: ModelHandle, hparams: KEHParams) -> KEEditor:
        names = edited_params(handle, hparams.modules, hparams.layers)
        params = dict(handle.model.named_parameters())
        norms = {n: float(params[n].detach().float().norm()) for n in names}
        emb_dim = handle.module("embed").weight.shape[1]
        return KEEditor(emb_dim, hparams.hidden, {n: out_in_shape(handle, n) for n in names}, norms,
                        hparams.init_scale, hparams.token_attention)

    def param_groups(self, editor: nn.Module, hparams: KEHParams) -> list[dict[str, Any]]:
        rest = [p for n, p in editor.named_parameters() if n != "rho"]
        return [{"params": rest, "lr": hparams.lr}, {"params": [editor.rho], "lr": hparams.lagrange_lr}]

    def after_backward(self, editor: nn.Module, hparams: KEHParams) -> None:
        if editor.rho.grad is not None:
            editor.rho.grad.neg_()  # ascent on λ: it grows while the constraint is violated

    def _condition(self, handle: ModelHandle, req: EditRequest) -> torch.Tensor:
        emb = handle.module("embed").weight
        tok = handle.tokenizer

        def mean_emb(text: str) -> torch.Tensor:
            ids = tok(text, add_special_tokens=False).input_ids or [tok.eos_token_id or 0]
            return emb[torch.tensor(ids, device=emb.device)].float().mean(0)

        with torch.no_grad():
            return torch.cat([mean_emb(req.prompt), mean_emb(" " + req.target_new),
                              mean_emb(" " + (req.target_true or ""))])

    def _updates(self, handle: ModelHandle, editor: KEEditor,
                 requests: Sequence[EditRequest]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        scorer = Scorer(handle)
        dev = editor.rho.device
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for r in requests:  # one condition per edit; a batch sums the edits' updates
            grads = token_grads(handle, editor.names, edit_pairs(scorer, [r]))
            grads = {n: (u.to(dev), d.to(dev)) for n, (u, d) in grads.items()}
            for n, lr in editor.updates(self._condition(handle, r).to(dev), grads).items():
                parts.setdefault(n, []).append(lr)
        return {n: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for n, ps in parts.items()}

    def train_loss(self, handle: ModelHandle, editor: KEEditor, batch: Sequence[EditRequest],
                   hparams: KEHParams) -> tuple[torch.Tensor, dict[str, float]]:
        params = dict(handle.model.named_parameters())
        total = None
        nlls, kls = [], []
        for r in batch:  # KE is trained one edit at a time
            weights = {n: params[n] + dense_update(handle, left, right).to(params[n].dtype)
                       for n, (left, right) in self._updates(handle, editor, [r]).items()}
            nll, kl = post_edit_losses(handle, [r], weights)
            lam = nn.functional.softplus(editor.rho)
            loss = nll + lam * (kl - hparams.kl_margin)
            total = loss if total is None else total + loss
            nlls.append(float(nll.detach()))
            kls.append(float(kl.detach()))
        assert total is not None
        return total / len(batch), {"edit_nll": sum(nlls) / len(nlls), "loc_kl": sum(kls) / len(kls),
                                    "lambda": float(nn.functional.softplus(editor.rho.detach()))}

    def edit_with(self, handle: ModelHandle, editor: KEEditor, requests: Sequence[EditRequest],
                  hparams: KEHParams) -> WeightEdit:
        editor.eval()
        with torch.no_grad():
            updates = self._updates(handle, editor, requests)
        if hparams.edit_scale != 1.0:
            updates = {n: (left * hparams.edit_scale, right) for n, (left, right) in updates.items()}
        edit = factor_edit(handle, self.name, requests, hparams.to_dict(), updates)
        edit.info["checkpoint"] = hparams.checkpoint
        return edit
