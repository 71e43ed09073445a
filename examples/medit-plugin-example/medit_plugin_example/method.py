"""The ``rank-one-example`` method: gradient steps on one MLP output weight, each kept to the top
singular direction of the gradient (a rank-one update), until the new targets are the model's
greedy answers. The edit is stored as rank-one factors, so its patch is tiny.

It uses medit's public names only (``from medit import ...``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from medit import EditRequest, HParams, HParamsError, Method, ModelHandle, WeightEdit


@dataclass
class RankOneHParams(HParams):
    """Hyperparameters of the rank-one example editor. Defaults per model family live in
    ``hparams/*.yaml`` beside this module (found without setting ``hparams_dir``)."""

    #: layer whose MLP output projection is edited (negative counts from the end; None: the middle
    #: one, the lower of two).
    layer: int | None = None
    #: step size, relative to the weight matrix's Frobenius norm.
    scale: float = 0.05
    #: maximum number of rank-one steps.
    steps: int = 20

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise HParamsError(f"hparam 'scale' must be > 0, got {self.scale}")
        if self.steps < 1:
            raise HParamsError(f"hparam 'steps' must be >= 1, got {self.steps}")


class RankOneExample(Method[RankOneHParams]):
    name = "rank-one-example"
    description = "example plugin: rank-one gradient steps on one MLP output weight"
    hparams_class = RankOneHParams
    modes = ("single", "batch", "sequential")

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: RankOneHParams) -> WeightEdit:
        n = handle.n_layers
        layer = (n - 1) // 2 if hparams.layer is None else hparams.layer + n if hparams.layer < 0 else hparams.layer
        name = handle.param_name("mlp_out", handle.check_layer(layer))
        weight = dict(handle.model.named_parameters())[name]
        step_size = hparams.scale * float(weight.detach().norm())
        us: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        # recording() keeps the original weight, so the edit reverts bit for bit (and the weight is
        # restored if this block raises).
        with WeightEdit.recording(handle, [name], self.name, requests, hparams.to_dict()) as edit:
            weight.requires_grad_(True)
            try:
                for _ in range(hparams.steps):
                    weight.grad = None
                    loss, done = target_loss(handle, requests)
                    if done:
                        break
                    loss.backward()
                    assert weight.grad is not None
                    u, _, vh = torch.linalg.svd(weight.grad.float(), full_matrices=False)
                    a, b = -step_size * u[:, :1], vh[:1].T  # descend along the top singular pair
                    with torch.no_grad():
                        weight.add_((a @ b.T).to(weight.dtype))
                    us.append(a)
                    vs.append(b)
            finally:
                weight.requires_grad_(False)
                weight.grad = None
            if us:  # delta = u @ v.T in the weight's storage orientation: the patch stores these
                edit.factors = {name: (torch.cat(us, 1).cpu(), torch.cat(vs, 1).cpu())}
        return edit


def target_loss(handle: ModelHandle, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, bool]:
    """(mean negative log-likelihood of each request's new target after its prompt, whether every
    target is already the greedy answer), from the model's own forward pass."""
    tok, dev = handle.tokenizer, handle.device
    losses, done = [], True
    for r in requests:
        prompt, target = handle.adapter.join(r.prompt, r.target_new)  # the family's separator
        if handle.is_encoder_decoder:  # the target goes to the decoder
            enc = tok(prompt, return_tensors="pt").to(dev)
            t_ids = tok(target).input_ids
            if len(t_ids) > 1 and t_ids[-1] == tok.eos_token_id:  # score the answer, not the end mark
                t_ids = t_ids[:-1]
            labels = torch.tensor([t_ids], device=dev)
            logits = handle.model(**enc, labels=labels).logits[0]
            labels = labels[0]
        else:  # the target follows the prompt; only its tokens are scored
            p_ids = tok(prompt).input_ids
            ids = tok(prompt + target).input_ids
            if tok.eos_token_id is not None and ids[-1] == tok.eos_token_id and p_ids[-1] == tok.eos_token_id:
                p_ids, ids = p_ids[:-1], ids[:-1]
            cut = next((i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), min(len(p_ids), len(ids)))
            x = torch.tensor([ids], device=dev)
            logits = handle.model(input_ids=x).logits[0, cut - 1:len(ids) - 1]
            labels = x[0, cut:]
        losses.append(torch.nn.functional.cross_entropy(logits.float(), labels))
        done = done and bool((logits.argmax(-1) == labels).all())
    return torch.stack(losses).mean(), done
