"""Integrated-gradients attribution of FFN intermediate neurons (Knowledge Neurons, Dai et al. 2022).

The attributed function is ``F`` = the summed probability of the answer's first
``target_tokens`` tokens, each predicted (teacher-forced) at its own position. A neuron's
activation is the input of ``mlp_out`` at that position. Integrated gradients scale the clean
activations ``a`` by ``alpha`` in (0, 1] along ``steps`` midpoints and average the gradients:
``attr = a * mean_alpha dF/da(alpha a)``, so ``sum(attr) ~= F(a) - F(0)`` (completeness).

All interpolation steps go through the model as one batch. ``scope`` decides which activations
follow the path together: ``joint`` (default) replaces every attributed layer's activations at
once, so one batched forward/backward attributes every neuron of every layer; ``layer`` runs
one pass per layer with only that layer scaled and the others computed normally (the KN
paper's per-layer attribution; cost grows with the number of layers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from medit.scoring.engine import Scorer
from medit.model.tracing import capture

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle

SCOPES = ("joint", "layer")


@dataclass
class _Rows:
    """One row per attributed target token: model inputs, the predicting position and the token."""

    ids: torch.Tensor
    mask: torch.Tensor
    dec: torch.Tensor | None
    dmask: torch.Tensor | None
    pos: torch.Tensor
    tok: torch.Tensor

    def repeat(self, k: int) -> "_Rows":
        rep = (lambda t: None if t is None else t.repeat(k, 1))  # noqa: E731
        return _Rows(rep(self.ids), rep(self.mask), rep(self.dec), rep(self.dmask),
                     self.pos.repeat(k), self.tok.repeat(k))


def _rows(handle: "ModelHandle", prompt: str, target: str, target_tokens: int) -> _Rows:
    scorer = Scorer(handle)
    ctx, tgt = scorer.encode_pair(prompt, target)
    tgt = tgt[:max(1, target_tokens)]
    dev = handle.device
    if handle.is_encoder_decoder:
        start = handle.config.decoder_start_token_id
        start = scorer.pad_id if start is None else start
        ids, mask = scorer.pad([ctx] * len(tgt))
        dec, dmask = scorer.pad([[start] + tgt[:i] for i in range(len(tgt))])
        pos = torch.arange(len(tgt))
        return _Rows(ids.to(dev), mask.to(dev), dec.to(dev), dmask.to(dev), pos.to(dev), torch.tensor(tgt, device=dev))
    seqs = [ctx + tgt[:i] for i in range(len(tgt))]
    ids, mask = scorer.pad(seqs)
    pos = torch.tensor([len(s) - 1 for s in seqs])
    return _Rows(ids.to(dev), mask.to(dev), None, None, pos.to(dev), torch.tensor(tgt, device=dev))


def _prob(handle: "ModelHandle", r: _Rows) -> torch.Tensor:
    """Probability of each row's token at its position: [rows]."""
    if r.dec is not None:
        logits = handle.model(input_ids=r.ids, attention_mask=r.mask, decoder_input_ids=r.dec,
                              decoder_attention_mask=r.dmask).logits
    else:
        logits = handle.model(input_ids=r.ids, attention_mask=r.mask, use_cache=False).logits
    rows = torch.arange(len(r.pos), device=logits.device)
    return logits[rows, r.pos].float().softmax(-1).gather(1, r.tok[:, None])[:, 0]


@torch.no_grad()
def _clean(handle: "ModelHandle", r: _Rows, layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], float]:
    rows = torch.arange(len(r.pos), device=handle.device)
    with capture(handle, "mlp_out", layers, what="input") as store:
        f = float(_prob(handle, r).sum())
    return {layer: store[layer][rows, r.pos].detach().float() for layer in layers}, f


def neuron_activations(handle: "ModelHandle", prompt: str, target: str, layers: Sequence[int],
                       target_tokens: int = 1) -> dict[int, torch.Tensor]:
    """Activations (``mlp_out`` inputs) [target_tokens, d_ff] at the positions that predict the
    first ``target_tokens`` tokens of ``target`` after ``prompt``."""
    return _clean(handle, _rows(handle, prompt, target, target_tokens), layers)[0]


@contextlib.contextmanager
def replace_inputs(handle: "ModelHandle", values: dict[int, torch.Tensor], pos: torch.Tensor) -> Iterator[None]:
    """Within the block, ``mlp_out``'s input at layer ``l``, row ``i``, position ``pos[i]`` is
    ``values[l][i]`` (differentiable; other positions and layers are untouched)."""
    hooks = []

    def make(layer: int) -> Any:
        def pre(mod: nn.Module, args: tuple) -> tuple:
            x = args[0]
            rows = torch.arange(x.shape[0], device=x.device)
            return (x.index_put((rows, pos), values[layer].to(x.dtype)),) + tuple(args[1:])
        return pre

    try:
        for layer in values:
            hooks.append(handle.module("mlp_out", layer).register_forward_pre_hook(make(layer)))
        yield
    finally:
        for h in hooks:
            h.remove()


def integrated_gradients(handle: "ModelHandle", prompt: str, target: str, layers: Sequence[int],
                         steps: int = 20, scope: str = "joint", target_tokens: int = 1
                         ) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """Attribution [d_ff] of every neuron of each layer in ``layers`` to ``target`` after ``prompt``.

    Returns (layer -> attributions, info) where info holds ``f_full`` (F with clean activations),
    ``f_base`` (F with the scaled activations at 0; for ``layer`` scope, the sum over layers of
    each layer's own baseline gap is ``sum_gap``) and ``attr_sum``.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    r = _rows(handle, prompt, target, target_tokens)
    n = len(r.pos)
    clean, f_full = _clean(handle, r, layers)
    alphas = (torch.arange(steps, device=handle.device, dtype=torch.float32) + 0.5) / steps
    batch = r.repeat(steps)  # row k*n + i: step k, target token i
    groups = [list(layers)] if scope == "joint" else [[layer] for layer in layers]
    attr: dict[int, torch.Tensor] = {}
    gap = 0.0
    for group in groups:
        scaled = {layer: (alphas[:, None, None] * clean[layer][None]).reshape(steps * n, -1).requires_grad_(True)
                  for layer in group}
        with replace_inputs(handle, scaled, batch.pos):
            f = _prob(handle, batch).sum()
        grads = torch.autograd.grad(f, [scaled[layer] for layer in group])
        for layer, g in zip(group, grads):
            attr[layer] = (clean[layer] * g.reshape(steps, n, -1).mean(0)).sum(0).cpu()
        with torch.no_grad(), replace_inputs(handle, {layer: torch.zeros_like(clean[layer]) for layer in group}, r.pos):
            gap += f_full - float(_prob(handle, r).sum())
    info = {"f_full": f_full, "sum_gap": gap, "attr_sum": float(sum(a.sum() for a in attr.values()))}
    if scope == "joint":
        info["f_base"] = f_full - gap
    return attr, info
