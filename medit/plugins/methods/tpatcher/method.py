"""T-Patcher (Huang et al. 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

Each edit adds a few trainable neurons (key, bias, value) to one FFN layer (the last by
default). They are trained with three losses: the edit loss (NLL of target_new), an activation
loss that makes them fire on the edit's input (the FFN inputs at the positions that predict the
target), and a memory loss that keeps them silent on other inputs: unrelated text, the edit prompt with other
subjects in place of its own, and the inputs of the patches already applied (so a sequential run keeps adding neurons without disturbing the
earlier ones). As in the reference implementation, each hinge loss is averaged over its
*violated* constraints only (an average over every memory row lets thousands of satisfied text
tokens drown the few prompts that matter, and the patch then fires on its neighbours); the
paper's exponential is replaced by a linear hinge, which does not overflow. The base weights never change: the patch is the
added neurons, and reverting detaches them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

import medit
from medit.core.edit import Edit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.core.method import Method
from medit.toolkit.added_neurons import (NeuronEdit, NeuronGroup, attached_groups, memory_inputs, target_batch,
                                target_inputs, train_groups)
from medit.core.requests import EditRequest
from medit.toolkit.context import NEGATIVE_SUBJECTS, swapped_prompts
from medit.plugins.methods.tpatcher import DESCRIPTION


@dataclass
class TPatcherHParams(HParams):
    """Hyperparameters of T-Patcher."""

    #: FFN layer that receives the patches (-1: the last, as in the paper).
    layer: int = -1
    #: neurons added per edit and target token (each is keyed on the input that predicts its token).
    neurons: int = 1
    activation: Literal["relu", "gelu"] = "relu"
    lr: float = 0.05
    steps: int = 80
    #: weight of the activation loss (fire on the edit input, pre-activation >= act_margin).
    act_weight: float = 1.0
    #: weight of the memory loss (pre-activation <= -memory_margin on memory inputs).
    memory_weight: float = 1.0
    act_margin: float = 0.5
    memory_margin: float = 0.5
    #: the memory's text: ``generated`` (sampled from the model; needs no data), an edit dataset
    #: ``FORMAT:PATH`` of other cases (in-distribution, as the paper's memory of training inputs:
    #: it keeps a patch silent on prompts of the same relation whose subjects share its old
    #: answer, which generated text does not) or a local text/JSONL file.
    memory_corpus: str = "generated"
    memory_texts: int = 40
    memory_max_len: int = 32
    #: the edit prompt with its subject swapped for each of these joins the memory, so a patch
    #: fires on its subject, not on every prompt of the same shape.
    negative_subjects: list[str] = field(default_factory=lambda: list(NEGATIVE_SUBJECTS))
    early_stop_nll: float = 0.05

    def __post_init__(self) -> None:
        for name in ("neurons", "steps", "memory_texts", "memory_max_len"):
            if getattr(self, name) < 1:
                raise HParamsError(f"hparam {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "act_margin", "memory_margin"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparam {name!r} must be > 0, got {getattr(self, name)}")
        for name in ("act_weight", "memory_weight", "early_stop_nll"):
            if getattr(self, name) < 0:
                raise HParamsError(f"hparam {name!r} must be >= 0, got {getattr(self, name)}")


def init_group(x_edit: torch.Tensor, x_mem: torch.Tensor, n: int, d_out: int, activation: str,
               act_margin: float, memory_margin: float) -> tuple[NeuronGroup, torch.Tensor]:
    """``n`` neurons per edit position (row of ``x_edit``), and each neuron's position.

    A neuron's key points from the mean memory input to its position's input, with the bias set
    so that input starts at +act_margin and the memory mean at -memory_margin; values start at
    zero (the edit loss trains them), so the untrained patch changes nothing.
    """
    owner = torch.arange(x_edit.shape[0], device=x_edit.device).repeat_interleave(n)
    d = x_edit[owner] - x_mem.mean(0)
    keys = d * (act_margin + memory_margin) / (d * d).sum(1, keepdim=True).clamp_min(1e-12)
    bias = act_margin - (keys * x_edit[owner]).sum(1)
    values = torch.zeros(len(owner), d_out, device=x_edit.device)
    return NeuronGroup(keys.contiguous(), bias, values, activation, x_edit.detach()), owner


def violated_mean(slack: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of ``slack`` (a hinge averaged over the violated constraints
    only); exactly zero when none is violated."""
    bad = slack[slack > 0]
    return bad.mean() if bad.numel() else slack.new_zeros(())


class TPatcher(Method[TPatcherHParams]):
    name = "t-patcher"
    description = DESCRIPTION
    hparams_class = TPatcherHParams
    cached_scoring = False  # edits hook modules
    modes = ("single", "batch", "sequential")
    hparams_dir = Path(medit.__file__).parent / "hparams" / "t-patcher"

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: TPatcherHParams) -> Edit:
        layer = resolve_layers(handle, [hparams.layer], auto=(1.0,), what="layer")[0]
        edits: list[NeuronEdit] = []
        try:
            for r in requests:  # each edit's patch is trained with the earlier ones attached
                edits.append(self._one(handle, r, layer, hparams))
        except BaseException:
            for e in reversed(edits):
                e.revert()
            raise
        return edits[0] if len(edits) == 1 else NeuronEdit.merge(edits)

    def _one(self, handle: ModelHandle, req: EditRequest, layer: int, hp: TPatcherHParams) -> NeuronEdit:
        batch = target_batch(handle, [req])
        x_edit = target_inputs(handle, layer, batch).to(handle.device)
        x_text = memory_inputs(handle, layer, hp.memory_corpus, hp.memory_texts, hp.memory_max_len)
        earlier = [g.inputs for g in attached_groups(handle, layer) if g.inputs is not None]
        swapped = swapped_prompts(req.prompt, req.subject, hp.negative_subjects)
        negatives = [target_inputs(handle, layer, target_batch(handle, [req], [swapped]))] if swapped else []
        x_mem = torch.cat([x_text] + [e.cpu() for e in earlier + negatives]).to(handle.device)
        d_out = handle.weight_out_in("mlp_out", layer).shape[0]
        group, owner = init_group(x_edit, x_text.to(handle.device), hp.neurons, d_out, hp.activation,
                                  hp.act_margin, hp.memory_margin)
        cols = torch.arange(len(owner), device=owner.device)

        def losses() -> torch.Tensor:
            act = violated_mean(hp.act_margin - group.pre(x_edit)[owner, cols])
            mem = violated_mean(group.pre(x_mem) + hp.memory_margin)
            return hp.act_weight * act + hp.memory_weight * mem

        info = train_groups(handle, [(layer, group)], batch, hp.steps, hp.lr, losses, hp.early_stop_nll)
        edit = NeuronEdit(handle, self.name, [req], hp.to_dict(), [(layer, group)])
        edit.info.update(layer=layer, **info)
        return edit
