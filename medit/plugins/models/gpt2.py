"""GPT-2 family (``model_type`` ``gpt2``): Conv1D weights stored (in, out), tied LM head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias

_GPT2_COMMON = {
    "model_type": "gpt2",
    "activation_function": "gelu_new",
    "attn_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "resid_pdrop": 0.1,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "n_ctx": 1024,
    "n_positions": 1024,
    "vocab_size": 50257,
}


@dataclass
class GPT2Adapter(ModelAdapter):
    name: ClassVar[str] = "gpt2"
    description: ClassVar[str] = "GPT-2 (Conv1D weights stored transposed; LM head tied to wte)"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)
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
    transposed: ClassVar[bool] = True
    n_layers_attr: ClassVar[str] = "n_layer"
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="gpt2-xl",
            hub_id="openai-community/gpt2-xl",
            config={**_GPT2_COMMON, "n_layer": 48, "n_embd": 1600, "n_head": 25},
            description="GPT-2 XL, 1.5B parameters (48 layers, hidden 1600)",
        ),
        ModelAlias(
            name="gpt2",
            hub_id="openai-community/gpt2",
            config={**_GPT2_COMMON, "n_layer": 12, "n_embd": 768, "n_head": 12},
            description="GPT-2 small, 124M parameters (12 layers, hidden 768)",
        ),
    )


@hookimpl
def register_models(register):
    register(GPT2Adapter())
