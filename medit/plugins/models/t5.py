"""T5 family (``model_type`` ``t5``): encoder-decoder; per-layer names index the DECODER blocks.

``mlp_in`` is ``DenseReluDense.wi``, the input projection of the original (v1.0) T5 checkpoints
registered as aliases here (t5-small, t5-3b). Gated variants (T5 v1.1, Flan-T5:
``is_gated_act``) split it into ``wi_0`` (gate) and ``wi_1`` (linear branch), so ``mlp_in`` does
not resolve on them; ``mlp_out`` (``wo``, the rewrite module), ``attn`` and the other names do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias

_T5_COMMON = {
    "model_type": "t5",
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "feed_forward_proj": "relu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "n_positions": 512,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": True,
    "vocab_size": 32128,
}

_T5_3B = {**_T5_COMMON, "d_ff": 16384, "d_kv": 128, "d_model": 1024, "num_heads": 32,
          "num_layers": 24, "num_decoder_layers": 24}


@dataclass
class T5Adapter(ModelAdapter):
    name: ClassVar[str] = "t5"
    description: ClassVar[str] = "T5 encoder-decoder (per-layer names index the decoder blocks)"
    model_types: ClassVar[tuple[str, ...]] = ("t5",)
    paths: ClassVar[dict[str, str]] = {
        "layers": "decoder.block",
        "mlp_in": "decoder.block.{}.layer.2.DenseReluDense.wi",
        "mlp_out": "decoder.block.{}.layer.2.DenseReluDense.wo",
        "attn": "decoder.block.{}.layer.0.SelfAttention",
        "ln_f": "decoder.final_layer_norm",
        "lm_head": "lm_head",
        "embed": "shared",
    }
    encoder_decoder: ClassVar[bool] = True
    n_layers_attr: ClassVar[str] = "num_decoder_layers"
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="t5-3b",
            hub_id="google-t5/t5-3b",
            config=dict(_T5_3B),
            description="T5 3B (24+24 layers, d_model 1024, d_ff 16384)",
        ),
        ModelAlias(
            name="t5-xl",
            hub_id="google-t5/t5-3b",
            config=dict(_T5_3B),
            description="Same model as t5-3b (google-t5/t5-3b; the original T5 '3B' size, "
                        "which EasyEdit calls t5-xl) - not the v1.1 google/t5-v1_1-xl",
        ),
        ModelAlias(
            name="t5-small",
            hub_id="google-t5/t5-small",
            config={**_T5_COMMON, "d_ff": 2048, "d_kv": 64, "d_model": 512, "num_heads": 8,
                    "num_layers": 6, "num_decoder_layers": 6},
            description="T5 small, 60M parameters (6+6 layers, d_model 512)",
        ),
    )


@hookimpl
def register_models(register):
    register(T5Adapter())
