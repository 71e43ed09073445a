"""Model-family adapters: map standard names to module paths (TransformerLens style).

An adapter is registered by a family plugin and picked from ``config.model_type`` only.
Standard names: ``layers``, ``mlp_in``, ``mlp_out`` (the rewrite module), ``attn``, ``ln_f``,
``lm_head``, ``embed``. Per-layer paths contain ``{}`` for the layer index.

Everything a family does differently lives in its adapter as paths and flags, so that methods
never ask which model they run on: ``mlp_post_norm`` (a norm between the rewrite module's output
and the residual stream, Gemma 2/3), ``pos_embed`` (learned positions), ``layer_index_attrs``
(the attribute a layer's attention keeps its cache index in), ``refused`` (model types of the
family that are turned away, with the reason). The input embedding module (``embed``) includes
any scaling the family applies to it (Gemma multiplies by sqrt(hidden)); calling the module, not
indexing its weight, gives what the first layer sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

STANDARD_NAMES = ("layers", "mlp_in", "mlp_out", "attn", "ln_f", "lm_head", "embed")
#: optional: ``pos_embed`` (learned absolute position embeddings, GPT-2), used by tracing;
#: ``mlp_post_norm`` (per layer: the norm applied to the rewrite module's output before it joins
#: the residual stream, Gemma 2/3), used by the target-vector optimisation; ``mlp_gate`` (per
#: layer: the gate projection of a gated MLP, LLaMA layout), which UltraEdit can edit.
PER_LAYER = ("mlp_in", "mlp_out", "attn")
OPTIONAL_PER_LAYER = ("mlp_post_norm", "mlp_gate")


@dataclass(frozen=True)
class ModelAlias:
    """A short model name users type (``llama-2-7b``): its hub id and an embedded config so that
    ``--random-init`` works offline. ``local`` optionally resolves to a local file (e.g. a GGUF
    shipped in an installed package); it returns None when unavailable."""

    name: str
    hub_id: str
    config: dict[str, Any]
    description: str = ""
    local: Any = None  # Callable[[], tuple[str, str] | None]: (path or folder, gguf file name or "")
    dtype: str = "float32"


@dataclass
class ModelAdapter:
    """Base class for a model family. Subclasses set the class attributes."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    paths: ClassVar[dict[str, str]] = {}
    #: GPT-2 style Conv1D stores weights as (in, out) instead of nn.Linear's (out, in).
    transposed: ClassVar[bool] = False
    encoder_decoder: ClassVar[bool] = False
    #: config attribute holding the number of layers that the per-layer paths index (dotted for a
    #: nested config, e.g. ``text_config.num_hidden_layers``).
    n_layers_attr: ClassVar[str] = "num_hidden_layers"
    #: attributes of a layer's submodules that hold the layer's index into the key/value cache
    #: (``layer_idx`` in most families, ``layer_id`` in GPT-Neo); running only the layers above
    #: an edit renumbers them (:func:`medit.model.tracing.layers_above`).
    layer_index_attrs: ClassVar[tuple[str, ...]] = ("layer_idx",)
    #: model types of this family that medit turns away, with the reason (e.g. a mixture-of-experts
    #: variant whose MLP is not one projection to rewrite).
    refused: ClassVar[dict[str, str]] = {}
    aliases: ClassVar[tuple[ModelAlias, ...]] = ()
    #: text inserted between a prompt and its target when the target does not start with a space.
    target_sep: ClassVar[str] = " "
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, std: str, layer: int | None = None) -> str:
        """Module path for a standard name (and layer, for per-layer names)."""
        if std not in self.paths:
            raise KeyError(f"{self.name} adapter has no module for {std!r}")
        p = self.paths[std]
        if "{}" in p:
            if layer is None:
                raise ValueError(f"{std!r} is per-layer; give a layer index")
            return p.format(layer)
        return p

    def n_layers(self, config: Any) -> int:
        value = config
        for attr in self.n_layers_attr.split("."):
            value = getattr(value, attr)
        return int(value)

    def join(self, prompt: str, target: str) -> tuple[str, str]:
        """Return (prompt, target) so that prompt + target is the natural text of the answer.

        Causal models get a separating space inside the target (BPE tokens carry their leading
        space); encoder-decoder models take the target on its own (it goes to the decoder).
        """
        if self.encoder_decoder:
            return prompt, target.strip()
        # a prompt ending in whitespace (a chat turn's "assistant\n") takes the target as it is
        if target.startswith(" ") or prompt[-1:].isspace() or not self.target_sep:
            return prompt, target
        return prompt, self.target_sep + target
