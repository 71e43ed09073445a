"""CaliNET (Dong et al. 2022, "Calibrating Factual Knowledge in Pretrained Language Models").

Calibration memory slots: an FFN-like block (keys, biases, values) running in parallel with the
FFN of one or more layers, trained on the edits with the base model frozen. As in the paper the
slots are trained with the language-modelling loss of the corrected answer over several contexts
(here the prompt and the shared context templates); values start at zero so the untrained block
changes nothing. An optional penalty on the slots' output over unrelated text keeps them from
rewriting everything (``memory_weight``; 0 is the paper's plain objective). The patch holds the
slots; reverting detaches them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

import medit
from medit.toolkit.context import context_templates, fill
from medit.core.edit import Edit
from medit.errors import HParamsError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.core.method import Method
from medit.toolkit.added_neurons import NeuronEdit, NeuronGroup, memory_inputs, target_batch, train_groups
from medit.core.requests import EditRequest
from medit.plugins.methods.calinet import DESCRIPTION


@dataclass
class CaliNETHParams(HParams):
    """Hyperparameters of CaliNET."""

    #: layers whose FFN gets a calibration block (negative counts from the end).
    layers: list[int] = field(default_factory=lambda: [-1])
    #: memory slots per layer and edit call.
    slots: int = 16
    activation: Literal["relu", "gelu"] = "gelu"
    lr: float = 0.02
    steps: int = 60
    #: std of the random key initialisation, relative to 1/sqrt(d_model).
    key_init: float = 1.0
    #: context templates (new tokens, count) the answer is trained after, besides the bare prompt.
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    #: weight of the mean squared slot output over unrelated text (0: the paper's objective only).
    memory_weight: float = 0.1
    memory_corpus: str = "generated"
    memory_texts: int = 40
    memory_max_len: int = 32
    early_stop_nll: float = 0.05

    def __post_init__(self) -> None:
        for name in ("slots", "steps", "memory_texts", "memory_max_len"):
            if getattr(self, name) < 1:
                raise HParamsError(f"hparam {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "key_init"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparam {name!r} must be > 0, got {getattr(self, name)}")
        for name in ("memory_weight", "early_stop_nll"):
            if getattr(self, name) < 0:
                raise HParamsError(f"hparam {name!r} must be >= 0, got {getattr(self, name)}")
        if not self.layers:
            raise HParamsError("hparam 'layers' must name at least one layer, got []")
        if any(len(x) != 2 or x[0] < 1 or x[1] < 0 for x in self.context_templates):
            raise HParamsError("hparam 'context_templates' must be a list of [new_tokens, count] pairs, "
                               f"got {self.context_templates!r}")


class CaliNET(Method[CaliNETHParams]):
    name = "calinet"
    description = DESCRIPTION
    hparams_class = CaliNETHParams
    cached_scoring = False  # edits hook modules
    modes = ("single", "batch", "sequential")
    hparams_dir = Path(medit.__file__).parent / "hparams" / "calinet"

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: CaliNETHParams) -> Edit:
        hp = hparams
        layers = resolve_layers(handle, hp.layers, auto=(1.0,))
        templates = ["{}"]
        # (Context templates are sampled from a causal LM; encoder-decoder models train on the prompt.)
        if not handle.is_encoder_decoder and any(c for _, c in hp.context_templates):
            templates = context_templates(handle, [tuple(x) for x in hp.context_templates])  # type: ignore[misc]
        batch = target_batch(handle, requests, [[fill(t, r.prompt)[0] for t in templates] for r in requests])
        gen = torch.Generator().manual_seed(0)
        groups: list[tuple[int, NeuronGroup]] = []
        mems = {}
        for layer in layers:
            w_in, w_out = handle.weight_out_in("mlp_in", layer), handle.weight_out_in("mlp_out", layer)
            d_in, d_out = int(w_in.shape[1]), int(w_out.shape[0])
            keys = torch.randn(hp.slots, d_in, generator=gen) * hp.key_init / d_in ** 0.5
            groups.append((layer, NeuronGroup(keys.to(handle.device), torch.zeros(hp.slots, device=handle.device),
                                              torch.zeros(hp.slots, d_out, device=handle.device), hp.activation)))
            if hp.memory_weight > 0:
                mems[layer] = memory_inputs(handle, layer, hp.memory_corpus, hp.memory_texts,
                                            hp.memory_max_len).to(handle.device)

        def penalty() -> torch.Tensor:
            loss = torch.zeros((), device=handle.device)
            for layer, g in groups:
                if layer in mems:
                    loss = loss + hp.memory_weight * g(mems[layer]).pow(2).sum(-1).mean()
            return loss

        info = train_groups(handle, groups, batch, hp.steps, hp.lr, penalty, hp.early_stop_nll,
                            stop_needs_zero_extra=False)
        edit = NeuronEdit(handle, self.name, requests, hp.to_dict(), groups)
        edit.info.update(layers=layers, **info)
        return edit
