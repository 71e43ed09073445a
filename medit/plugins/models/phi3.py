"""Phi-3 family (``model_type`` ``phi3``): LLaMA-like blocks whose attention has one fused
``qkv_proj`` and whose gated MLP has one fused ``gate_up_proj`` (gate and up halves stacked);
``mlp_in`` is that fused projection (its input is the normalised residual stream, as elsewhere),
``mlp_out`` the ``down_proj`` every locate-then-edit method rewrites.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias


@dataclass
class Phi3Adapter(ModelAdapter):
    name: ClassVar[str] = "phi3"
    description: ClassVar[str] = "Phi-3 (fused qkv_proj and gate_up_proj, RMSNorm, rotary)"
    model_types: ClassVar[tuple[str, ...]] = ("phi3",)
    paths: ClassVar[dict[str, str]] = {
        "layers": "model.layers",
        "mlp_in": "model.layers.{}.mlp.gate_up_proj",
        "mlp_out": "model.layers.{}.mlp.down_proj",
        "attn": "model.layers.{}.self_attn",
        "ln_f": "model.norm",
        "lm_head": "lm_head",
        "embed": "model.embed_tokens",
    }
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="phi-3-mini",
            hub_id="microsoft/Phi-3-mini-4k-instruct",
            config={
                "model_type": "phi3",
                "attention_dropout": 0.0,
                "bos_token_id": 1,
                "embd_pdrop": 0.0,
                "eos_token_id": 32000,
                "hidden_act": "silu",
                "hidden_size": 3072,
                "initializer_range": 0.02,
                "intermediate_size": 8192,
                "max_position_embeddings": 4096,
                "num_attention_heads": 32,
                "num_hidden_layers": 32,
                "num_key_value_heads": 32,
                "original_max_position_embeddings": 4096,
                "pad_token_id": 32000,
                "resid_pdrop": 0.0,
                "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0,
                "sliding_window": 2047,
                "tie_word_embeddings": False,
                "vocab_size": 32064,
            },
            description="Phi-3-mini-4k-instruct, 3.8B (32 layers, hidden 3072, context 4096)",
        ),
    )


@hookimpl
def register_models(register):
    register(Phi3Adapter())
