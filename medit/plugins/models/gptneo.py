"""GPT-Neo family (``model_type`` ``gpt_neo``, EleutherAI): GPT-2-like blocks with nn.Linear MLP
projections (``c_fc``/``c_proj``, stored (out, in), unlike GPT-2's Conv1D), learned position
embeddings, local (windowed) attention on every other layer, LM head tied to ``wte``.

Its attention modules keep their cache index as ``layer_id`` (not ``layer_idx``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias


@dataclass
class GPTNeoAdapter(ModelAdapter):
    name: ClassVar[str] = "gpt-neo"
    description: ClassVar[str] = "GPT-Neo (Linear c_fc/c_proj MLP, learned positions, local attention " \
                                 "on alternate layers)"
    model_types: ClassVar[tuple[str, ...]] = ("gpt_neo",)
    paths: ClassVar[dict[str, str]] = {
        "layers": "transformer.h",
        "mlp_in": "transformer.h.{}.mlp.c_fc",
        "mlp_out": "transformer.h.{}.mlp.c_proj",
        "attn": "transformer.h.{}.attn",
        "ln_f": "transformer.ln_f",
        "lm_head": "lm_head",
        "embed": "transformer.wte",
        "pos_embed": "transformer.wpe",
    }
    n_layers_attr: ClassVar[str] = "num_layers"
    layer_index_attrs: ClassVar[tuple[str, ...]] = ("layer_id",)
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="gpt-neo-2.7b",
            hub_id="EleutherAI/gpt-neo-2.7B",
            config={
                "model_type": "gpt_neo",
                "activation_function": "gelu_new",
                "attention_dropout": 0.0,
                "attention_types": [[["global", "local"], 16]],
                "bos_token_id": 50256,
                "eos_token_id": 50256,
                "embed_dropout": 0.0,
                "hidden_size": 2560,
                "initializer_range": 0.02,
                "intermediate_size": None,
                "layer_norm_epsilon": 1e-05,
                "max_position_embeddings": 2048,
                "num_heads": 20,
                "num_layers": 32,
                "resid_dropout": 0.0,
                "vocab_size": 50257,
                "window_size": 256,
            },
            description="GPT-Neo 2.7B (32 layers, hidden 2560, local attention window 256)",
        ),
    )


@hookimpl
def register_models(register):
    register(GPTNeoAdapter())
