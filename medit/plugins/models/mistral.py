"""Mistral family (``model_type`` ``mistral``): the LLaMA module layout (RMSNorm, gated SiLU MLP,
grouped-query attention) with sliding-window attention (4,096 tokens in Mistral-7B-v0.1), which
transformers applies from the config; the key/value cache is built from the same config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias
from medit.plugins.models.llama import LLAMA_LAYOUT

@dataclass
class MistralAdapter(ModelAdapter):
    name: ClassVar[str] = "mistral"
    description: ClassVar[str] = "Mistral (LLaMA layout, grouped-query and sliding-window attention)"
    model_types: ClassVar[tuple[str, ...]] = ("mistral",)
    paths: ClassVar[dict[str, str]] = dict(LLAMA_LAYOUT)
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="mistral-7b",
            hub_id="mistralai/Mistral-7B-v0.1",
            config={
                "model_type": "mistral",
                "bos_token_id": 1,
                "eos_token_id": 2,
                "hidden_act": "silu",
                "hidden_size": 4096,
                "initializer_range": 0.02,
                "intermediate_size": 14336,
                "max_position_embeddings": 32768,
                "num_attention_heads": 32,
                "num_hidden_layers": 32,
                "num_key_value_heads": 8,
                "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0,
                "sliding_window": 4096,
                "tie_word_embeddings": False,
                "vocab_size": 32000,
            },
            description="Mistral 7B v0.1 (32 layers, hidden 4096, sliding window 4096)",
        ),
    )


@hookimpl
def register_models(register):
    register(MistralAdapter())
