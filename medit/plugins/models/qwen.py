"""Qwen family (``model_type`` ``qwen2``, ``qwen3``): the LLaMA module layout; Qwen2 has biases
on the query/key/value projections, Qwen3 RMS-normalises queries and keys per head. Optional
sliding-window layers (``use_sliding_window``, ``max_window_layers``) come from the config.

``qwen2_moe`` is refused: its MLP is a router over many experts plus a shared expert, so there
is no single output projection per layer for locate-then-edit methods to rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias
from medit.plugins.models.llama import LLAMA_LAYOUT


@dataclass
class QwenAdapter(ModelAdapter):
    name: ClassVar[str] = "qwen"
    description: ClassVar[str] = "Qwen2 / Qwen2.5 / Qwen3 (LLaMA layout; QKV bias or per-head QK norm)"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2", "qwen3")
    paths: ClassVar[dict[str, str]] = dict(LLAMA_LAYOUT)
    refused: ClassVar[dict[str, str]] = {
        "qwen2_moe": "its MLP is a mixture of experts (a router over many expert MLPs and a shared "
                     "expert), so a layer has no single output projection to rewrite",
        "qwen3_moe": "its MLP is a mixture of experts, so a layer has no single output projection "
                     "to rewrite",
    }
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="qwen2.5-7b",
            hub_id="Qwen/Qwen2.5-7B",
            config={
                "model_type": "qwen2",
                "bos_token_id": 151643,
                "eos_token_id": 151643,
                "hidden_act": "silu",
                "hidden_size": 3584,
                "initializer_range": 0.02,
                "intermediate_size": 18944,
                "max_position_embeddings": 131072,
                "max_window_layers": 28,
                "num_attention_heads": 28,
                "num_hidden_layers": 28,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-06,
                "rope_theta": 1000000.0,
                "sliding_window": 131072,
                "tie_word_embeddings": False,
                "use_sliding_window": False,
                "vocab_size": 152064,
            },
            description="Qwen2.5 7B base (28 layers, hidden 3584, 4 key/value heads)",
        ),
    )


@hookimpl
def register_models(register):
    register(QwenAdapter())
