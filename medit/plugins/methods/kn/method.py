"""Knowledge Neurons (Dai et al. 2022): locate the FFN neurons that express a fact by integrated
gradients, then edit their value vectors.

Locating: each prompt (the edit prompt, plus its rephrasings with ``refine_with_rephrase``) gets
integrated-gradients attributions of every FFN intermediate neuron to the probability of the
current answer (``target_true``, or the model's own greedy first token when the request has
none). A neuron is a candidate for a prompt when its attribution exceeds ``threshold`` times that
prompt's largest one; the located neurons are the candidates shared by at least ``refine_p`` of
the prompts (the paper's refinement), strongest first, at most ``max_neurons``.

Editing (as the KN paper and EasyEdit): each located neuron's value vector (its column of
``mlp_out``) loses ``scale`` times the output embedding of the old answer's first token and
gains ``scale`` times the new answer's. The located neurons also fire on unrelated prompts, so
every unit of scale costs locality: with ``scale_search`` the scale is the smallest of
``edit_scale / 2**k`` (k = ``scale_steps - 1`` … 0) under which the edit prompt prefers the new
answer by ``scale_margin`` nats (mean token log-prob), and ``edit_scale`` only when none does.
A plain weight edit: reverts exactly, saves as a patch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

import medit
from medit.toolkit.attribution import integrated_gradients, neuron_activations
from medit.core.edit import CompositeEdit, Edit, WeightEdit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.toolkit.spread import storage_factors
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.core.queries import GenQuery, TFQuery
from medit.scoring.engine import Scorer
from medit.plugins.methods.kn import DESCRIPTION


@dataclass
class KNHParams(HParams):
    """Hyperparameters of Knowledge Neurons."""

    #: layers whose neurons are attributed (``all``, or a list; negative counts from the end).
    layers: list[int] | str = "all"
    #: integrated-gradients interpolation steps (batched in one pass).
    steps: int = 20
    #: ``joint``: all layers along one path, one pass; ``layer``: one pass per layer (the paper's).
    scope: Literal["joint", "layer"] = "joint"
    #: answer tokens attributed (their probabilities are summed).
    target_tokens: int = 1
    #: per-prompt candidate threshold, relative to the prompt's largest attribution.
    threshold: float = 0.2
    #: fraction of prompts a neuron must be a candidate in to be kept.
    refine_p: float = 0.5
    #: also attribute the request's rephrase prompts (refinement across prompts).
    refine_with_rephrase: bool = True
    max_neurons: int = 20
    #: multiple of the answers' output embeddings moved in each value vector (the largest tried
    #: with ``scale_search``).
    edit_scale: float = 2.0
    #: use the smallest scale that makes the edit take (see the module docstring).
    scale_search: bool = False
    scale_steps: int = 6
    #: nats by which the new answer's mean log-prob must beat the old one's on the edit prompt.
    scale_margin: float = 0.5
    #: ``edit``: remove the old answer, add the new one; ``erase``: remove the old answer only.
    mode: Literal["edit", "erase"] = "edit"

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers != "all":
            raise HParamsError(f"hparam 'layers' must be 'all' or a list of layer indices, got {self.layers!r}")
        for name in ("steps", "target_tokens", "max_neurons", "scale_steps"):
            if getattr(self, name) < 1:
                raise HParamsError(f"hparam {name!r} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.threshold < 1:
            raise HParamsError(f"hparam 'threshold' must be in [0, 1), got {self.threshold}")
        if not 0 < self.refine_p <= 1:
            raise HParamsError(f"hparam 'refine_p' must be in (0, 1], got {self.refine_p}")
        if self.edit_scale <= 0:
            raise HParamsError(f"hparam 'edit_scale' must be > 0, got {self.edit_scale}")


@dataclass(frozen=True)
class Neuron:
    layer: int
    index: int
    attribution: float


def _old_answer(handle: ModelHandle, req: EditRequest) -> str:
    if req.target_true:
        return req.target_true
    return Scorer(handle).generate([GenQuery(req.prompt, 1)])[0] or req.target_new


class KnowledgeNeurons(Method[KNHParams]):
    name = "kn"
    description = DESCRIPTION
    hparams_class = KNHParams
    modes = ("single", "batch", "sequential")
    hparams_dir = Path(medit.__file__).parent / "hparams" / "kn"

    def _layers(self, handle: ModelHandle, hp: KNHParams) -> list[int]:
        if hp.layers == "all":
            return list(range(handle.n_layers))
        return resolve_layers(handle, hp.layers, auto=())

    def locate(self, handle: ModelHandle, req: EditRequest, hp: KNHParams) -> list[Neuron]:
        """The knowledge neurons of ``req``'s current answer, strongest first."""
        layers = self._layers(handle, hp)
        answer = _old_answer(handle, req)
        prompts = [req.prompt] + (list(req.rephrase) if hp.refine_with_rephrase else [])
        votes: dict[tuple[int, int], int] = {}
        score: dict[tuple[int, int], float] = {}
        for p in prompts:
            attr, _ = integrated_gradients(handle, p, answer, layers, hp.steps, hp.scope, hp.target_tokens)
            top = max(float(a.max()) for a in attr.values())
            for layer, a in attr.items():
                for i in torch.nonzero(a > hp.threshold * top).flatten().tolist():
                    votes[(layer, i)] = votes.get((layer, i), 0) + 1
                    score[(layer, i)] = score.get((layer, i), 0.0) + float(a[i]) / len(prompts)
        need = hp.refine_p * len(prompts)
        kept = [k for k, v in votes.items() if v >= need - 1e-9]
        kept.sort(key=lambda k: -score[k])
        return [Neuron(layer, i, score[(layer, i)]) for layer, i in kept[:hp.max_neurons]]

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: KNHParams) -> Edit:
        edits = [self._one(handle, r, hparams) for r in requests]
        return edits[0] if len(edits) == 1 else CompositeEdit(handle, edits)

    def _one(self, handle: ModelHandle, req: EditRequest, hp: KNHParams) -> WeightEdit:
        neurons = self.locate(handle, req, hp)
        scorer = Scorer(handle)
        head = handle.module("lm_head").weight.detach().float()
        old_tok = scorer.encode_pair(req.prompt, _old_answer(handle, req))[1][0]
        new_tok = scorer.encode_pair(req.prompt, req.target_new)[1][0]
        direction = -head[old_tok] if hp.mode == "erase" else head[new_tok] - head[old_tok]
        by_layer: dict[int, list[int]] = {}
        for nrn in neurons:
            by_layer.setdefault(nrn.layer, []).append(nrn.index)
        # A neuron adds activation x value vector: with a negative activation (gated or GELU
        # FFNs) the change goes in with the opposite sign so that it still favours the new answer.
        acts = neuron_activations(handle, req.prompt, _old_answer(handle, req), list(by_layer)) if by_layer else {}

        def make(scale: float) -> WeightEdit:
            factors = {}
            for layer, idx in by_layer.items():
                d_ff = handle.weight_out_in("mlp_out", layer).shape[1]
                cols = torch.zeros(d_ff, len(idx), device=head.device)
                cols[idx, torch.arange(len(idx))] = 1.0
                sign = torch.sign(acts[layer][0, idx]).to(head.device)
                outs = (scale * direction)[:, None] * sign[None, :]
                factors[handle.param_name("mlp_out", layer)] = storage_factors(handle, outs, cols)
            return WeightEdit.from_deltas(handle, self.name, [req], hp.to_dict(), factors=factors)

        scales = [hp.edit_scale / 2 ** k for k in reversed(range(hp.scale_steps))] if hp.scale_search and by_layer else [hp.edit_scale]
        queries = [TFQuery(req.prompt, req.target_new), TFQuery(req.prompt, _old_answer(handle, req))]
        for scale in scales:
            edit = make(scale)
            if scale == scales[-1]:
                break
            new, old = scorer.teacher_forced(queries)
            if new.mean_logprob - old.mean_logprob >= hp.scale_margin:
                break
            edit.revert()
        edit.info.update(neurons=[(n.layer, n.index, round(n.attribution, 6)) for n in neurons], scale=scale)
        return edit
