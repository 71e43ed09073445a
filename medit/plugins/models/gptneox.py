"""GPT-NeoX family (``model_type`` ``gpt_neox``, also Pythia): fused QKV, untied LM head.

transformers 5 names the output projection ``lm_head`` (checkpoints' ``embed_out`` is renamed on load).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias


@dataclass
class GPTNeoXAdapter(ModelAdapter):
    name: ClassVar[str] = "gptneox"
    description: ClassVar[str] = "GPT-NeoX / Pythia (fused QKV attention, partial rotary)"
    model_types: ClassVar[tuple[str, ...]] = ("gpt_neox",)
    paths: ClassVar[dict[str, str]] = {
        "layers": "gpt_neox.layers",
        "mlp_in": "gpt_neox.layers.{}.mlp.dense_h_to_4h",
        "mlp_out": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
        "attn": "gpt_neox.layers.{}.attention",
        "ln_f": "gpt_neox.final_layer_norm",
        "lm_head": "lm_head",
        "embed": "gpt_neox.embed_in",
    }
    n_layers_attr: ClassVar[str] = "num_hidden_layers"
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="gpt-neox-20b",
            hub_id="EleutherAI/gpt-neox-20b",
            config={
                "model_type": "gpt_neox",
                "bos_token_id": 0,
                "eos_token_id": 0,
                "hidden_act": "gelu_fast",
                "hidden_size": 6144,
                "initializer_range": 0.02,
                "intermediate_size": 24576,
                "layer_norm_eps": 1e-05,
                "max_position_embeddings": 2048,
                "num_attention_heads": 64,
                "num_hidden_layers": 44,
                "rotary_emb_base": 10000,
                "rotary_pct": 0.25,
                "tie_word_embeddings": False,
                "use_parallel_residual": True,
                "vocab_size": 50432,
            },
            description="GPT-NeoX 20B (44 layers, hidden 6144)",
        ),
    )


@hookimpl
def register_models(register):
    register(GPTNeoXAdapter())
