"""GPT-J family (``model_type`` ``gptj``): parallel attention + MLP, rotary, untied LM head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias


@dataclass
class GPTJAdapter(ModelAdapter):
    name: ClassVar[str] = "gptj"
    description: ClassVar[str] = "GPT-J (parallel attention/MLP blocks, rotary embeddings)"
    model_types: ClassVar[tuple[str, ...]] = ("gptj",)
    paths: ClassVar[dict[str, str]] = {
        "layers": "transformer.h",
        "mlp_in": "transformer.h.{}.mlp.fc_in",
        "mlp_out": "transformer.h.{}.mlp.fc_out",
        "attn": "transformer.h.{}.attn",
        "ln_f": "transformer.ln_f",
        "lm_head": "lm_head",
        "embed": "transformer.wte",
    }
    n_layers_attr: ClassVar[str] = "n_layer"
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="gpt-j-6b",
            hub_id="EleutherAI/gpt-j-6b",
            config={
                "model_type": "gptj",
                "activation_function": "gelu_new",
                "attn_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "resid_pdrop": 0.0,
                "bos_token_id": 50256,
                "eos_token_id": 50256,
                "initializer_range": 0.02,
                "layer_norm_epsilon": 1e-05,
                "n_embd": 4096,
                "n_head": 16,
                "n_inner": None,
                "n_layer": 28,
                "n_positions": 2048,
                "rotary_dim": 64,
                "tie_word_embeddings": False,
                "vocab_size": 50400,
            },
            description="GPT-J 6B (28 layers, hidden 4096)",
        ),
    )


@hookimpl
def register_models(register):
    register(GPTJAdapter())
