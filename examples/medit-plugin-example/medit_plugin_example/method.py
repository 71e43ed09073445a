"""An example medit plugin: a rank-one gradient editor (``rank-one-example``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from medit import hookimpl
from medit.core.edit import WeightEdit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer


@dataclass
class RankOneHParams(HParams):
    """Hyperparameters of the rank-one example editor."""

    #: layer whose MLP output projection is edited (``auto``: the middle layer).
    layer: list[int] | str = "auto"
    #: step size, relative to the weight matrix's Frobenius norm.
    scale: float = 0.05
    #: maximum number of rank-one steps.
    steps: int = 20

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise HParamsError(f"hparam 'scale' must be > 0, got {self.scale}")
        if self.steps < 1:
            raise HParamsError(f"hparam 'steps' must be >= 1, got {self.steps}")


class RankOneExample(Method):
    name = "rank-one-example"
    description = "example plugin: rank-one gradient steps on one MLP output weight"
    hparams_class = RankOneHParams
    modes = ("single", "batch", "sequential")

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: RankOneHParams) -> WeightEdit:  # type: ignore[override]
        layer = resolve_layers(handle, hparams.layer, auto=(0.5,), what="layer")[0]
        name = handle.param_name("mlp_out", layer)
        weight = dict(handle.model.named_parameters())[name]
        scorer = Scorer(handle)
        batch = [scorer.encode_pair(r.prompt, r.target_new) for r in requests]
        us, vs = [], []
        step_size = hparams.scale * float(weight.detach().norm())
        with WeightEdit.recording(handle, [name], self.name, requests, hparams.to_dict()) as edit:
            weight.requires_grad_(True)
            try:
                for _ in range(hparams.steps):
                    weight.grad = None
                    loss = scorer.target_nll(batch)
                    with torch.no_grad():
                        done = all(r.exact == 1.0 for r in scorer._tf_batch(batch))
                    if done:
                        break
                    loss.backward()
                    u, s, vh = torch.linalg.svd(weight.grad.float(), full_matrices=False)
                    a, b = -step_size * u[:, :1], vh[:1].T  # descend along the top singular pair
                    with torch.no_grad():
                        weight.add_((a @ b.T).to(weight.dtype))
                    us.append(a)
                    vs.append(b)
            finally:
                weight.requires_grad_(False)
                weight.grad = None
            if us:
                edit.factors = {name: (torch.cat(us, 1).cpu(), torch.cat(vs, 1).cpu())}
        return edit


@hookimpl
def register_methods(register):  # type: ignore[no-untyped-def]
    register(RankOneExample())
