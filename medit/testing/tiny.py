"""The kit's tiny offline models: a byte-level BPE tokenizer trained on the WikiText-2 text medit
ships, two-layer random models of every family with fixed seeds, cached per process, and
requests to edit them with (see :mod:`medit.testing`)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import medit

if TYPE_CHECKING:

    from medit.core.requests import EditRequest
    from medit.model.handle import ModelHandle


#: the model families medit ships, each with a tiny random model here.
FAMILIES = ("gpt2", "gptj", "gptneox", "llama", "t5", "gpt-neo", "gemma", "qwen", "mistral", "phi3")
#: which tokenizer style each tiny family uses (``gpt2``: byte-level BPE without BOS; ``llama``:
#: ``<s>`` in front, eos ``</s>``; ``t5``: ``</s>`` appended, pad ``<pad>``), after the real
#: family's tokenizer: Gemma, Mistral and Phi-3 put a BOS in front, Qwen and GPT-Neo do not.
TOKENIZER_STYLE = {"gpt2": "gpt2", "gptj": "gpt2", "gptneox": "gpt2", "llama": "llama", "t5": "t5",
                   "gpt-neo": "gpt2", "gemma": "llama", "qwen": "gpt2", "mistral": "llama", "phi3": "llama"}
#: chat templates of the tiny families whose real instruct models have one (Qwen's ChatML, Gemma's
#: turns with BOS); the other tiny tokenizers have none, as base models' tokenizers.
CHAT_TEMPLATES = {
    "qwen": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "gemma": ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
              "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}
#: attention window of the tiny families with local / sliding-window attention (GPT-Neo, Gemma,
#: Mistral): shorter than the test prompts, so that the window changes what the model computes.
TINY_WINDOW = 4
SEED = 1234
#: paragraphs of the corpus the tokenizers train on, and their vocabulary size.
TOKENIZER_LINES = 400
TOKENIZER_VOCAB = 512
#: the output embedding of a causal tiny model is scaled by this: default init gives near-uniform
#: next-token distributions that no edit of a hidden state can make confident; a larger output
#: embedding makes the tiny models behave like trained ones in that respect.
LOGIT_SCALE = 10.0
#: sentences the tokenizers also train on (x20), so the words the default requests and medit's
#: own tests use are in the vocabulary.
EXTRA_SENTENCES = ("The capital of France is Paris. The mother tongue of Danielle Darrieux is French.",)


# ------------------------------------------------------------------------------ tiny tokenizers

def corpus_path() -> Path:
    """The WikiText-2 validation text medit ships (``medit/datasets/DATA.md``)."""
    return Path(medit.__file__).resolve().parent / "datasets" / "wikitext-2-valid.txt"


def training_lines() -> list[str]:
    """The tokenizers' training text: the first TOKENIZER_LINES paragraphs of :func:`corpus_path`
    (headings left out) and EXTRA_SENTENCES, 20 times each."""
    path = corpus_path()
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("="):
                lines.append(line)
            if len(lines) >= TOKENIZER_LINES:
                break
    if len(lines) != TOKENIZER_LINES:
        raise RuntimeError(f"{path} holds fewer than {TOKENIZER_LINES} paragraphs; reinstall medit")
    for sentence in EXTRA_SENTENCES:
        lines += [sentence] * 20
    return lines


def train_tokenizer(style: str, lines: Sequence[str]) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of ``style`` (gpt2, llama or t5) trained on ``lines``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "gpt2": ["<|endoftext|>"],
        "llama": ["<unk>", "<s>", "</s>"],
        "t5": ["<pad>", "</s>", "<unk>"],
    }[style]
    tok = Tokenizer(models.BPE(unk_token=None if style == "gpt2" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(lines), trainer=trainer)
    if style == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
    if style == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="</s>")
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@functools.lru_cache(maxsize=None)
def tiny_tokenizers() -> dict[str, Any]:
    """Style (gpt2, llama, t5) -> its tiny tokenizer; trained once per process (a second or two)."""
    lines = training_lines()
    return {style: train_tokenizer(style, lines) for style in ("gpt2", "llama", "t5")}


def tiny_tokenizer(style: str) -> Any:
    """The tiny tokenizer of ``style`` (gpt2, llama or t5), or of a family's style."""
    return tiny_tokenizers()[TOKENIZER_STYLE.get(style, style)]


# ------------------------------------------------------------------------------ tiny models

def tiny_config(family: str, tok: Any) -> Any:
    """A tiny config of each family: 2 layers, hidden 32, intermediate 80 (never equal to hidden);
    T5 has 3 encoder and 2 decoder layers."""
    from transformers import AutoConfig

    v = len(tok)
    if family == "gpt2":
        eos = tok.eos_token_id
        return AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, n_inner=80,
                                    n_positions=128, vocab_size=v, bos_token_id=eos, eos_token_id=eos)
    if family == "gptj":
        eos = tok.eos_token_id
        return AutoConfig.for_model("gptj", n_layer=2, n_embd=32, n_head=2, n_inner=80, rotary_dim=8,
                                    n_positions=128, vocab_size=v, bos_token_id=eos, eos_token_id=eos,
                                    tie_word_embeddings=False)
    if family == "gptneox":
        eos = tok.eos_token_id
        return AutoConfig.for_model("gpt_neox", num_hidden_layers=2, hidden_size=32,
                                    num_attention_heads=2, intermediate_size=80, rotary_pct=0.25,
                                    max_position_embeddings=128, vocab_size=v, bos_token_id=eos,
                                    eos_token_id=eos, tie_word_embeddings=False)
    if family == "llama":
        return AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=80,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, vocab_size=v,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    if family == "t5":
        return AutoConfig.for_model("t5", num_layers=3, num_decoder_layers=2, d_model=32, d_ff=80,
                                    num_heads=2, d_kv=16, vocab_size=v, feed_forward_proj="relu",
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                    decoder_start_token_id=tok.pad_token_id)
    if family == "gpt-neo":  # layer 0 global, layer 1 local (window TINY_WINDOW)
        eos = tok.eos_token_id
        return AutoConfig.for_model("gpt_neo", num_layers=2, hidden_size=32, num_heads=2, intermediate_size=80,
                                    attention_types=[[["global", "local"], 1]], window_size=TINY_WINDOW,
                                    max_position_embeddings=128, vocab_size=v, bos_token_id=eos,
                                    eos_token_id=eos)
    if family == "gemma":  # Gemma 3 text: post-norms, scaled embeddings, a sliding then a full layer
        return AutoConfig.for_model("gemma3_text", num_hidden_layers=2, hidden_size=32, intermediate_size=80,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    query_pre_attn_scalar=8, sliding_window=TINY_WINDOW,
                                    layer_types=["sliding_attention", "full_attention"],
                                    max_position_embeddings=128, vocab_size=v, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "qwen":  # Qwen2: biased query/key/value projections
        eos = tok.eos_token_id
        return AutoConfig.for_model("qwen2", num_hidden_layers=2, hidden_size=32, intermediate_size=80,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    vocab_size=v, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    if family == "mistral":  # sliding-window attention on every layer
        return AutoConfig.for_model("mistral", num_hidden_layers=2, hidden_size=32, intermediate_size=80,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    sliding_window=TINY_WINDOW, max_position_embeddings=128, vocab_size=v,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return AutoConfig.for_model("phi3", num_hidden_layers=2, hidden_size=32, intermediate_size=80,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                    original_max_position_embeddings=128, vocab_size=v,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    raise KeyError(f"no tiny model for family {family!r}; families: {', '.join(FAMILIES)}")


def build_tiny_model(family: str, tok: Any, folder: str | Path, seed: int = SEED) -> Path:
    """Build a tiny random model of ``family`` (weights from ``seed``) and save it with ``tok``
    into ``folder``; ``medit.load_model(str(folder))`` loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = tiny_config(family, tok)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = cls.from_config(config)
    with torch.no_grad():
        # (T5's tied, d_model-rescaled head is peaked enough already.)
        if not config.is_encoder_decoder:
            model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
        if family == "gemma":
            # Gemma's norms start as identities (scale 1 + 0); give each its own scale, as trained
            # ones have, so that a norm taken from the wrong layer changes the result.
            gen = torch.Generator().manual_seed(seed + 1)
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if family in CHAT_TEMPLATES:
        import copy
        tok = copy.deepcopy(tok)  # the style's tokenizer is shared by other families
        tok.chat_template = CHAT_TEMPLATES[family]
    tok.save_pretrained(folder)
    return folder


_ROOT: list[Path] = []


def scratch_dir() -> Path:
    """This process's folder for tiny models and patches; removed when the process exits."""
    if not _ROOT:
        root = Path(tempfile.mkdtemp(prefix="medit-testing-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _ROOT.append(root)
    return _ROOT[0]


@functools.lru_cache(maxsize=None)
def tiny_model_dir(family: str) -> Path:
    """A folder holding the tiny random model of ``family`` and its tokenizer, built once per
    process (under a temporary folder removed at exit). Treat it as read-only."""
    if family not in FAMILIES:
        raise KeyError(f"no tiny model for family {family!r}; families: {', '.join(FAMILIES)}")
    return build_tiny_model(family, tiny_tokenizer(family), scratch_dir() / "models" / family)


def tiny_model(family: str) -> "ModelHandle":
    """A freshly loaded :class:`~medit.ModelHandle` of the tiny ``family`` model on the CPU."""
    from medit.model.loading import load_model

    return load_model(str(tiny_model_dir(family)), device="cpu")


# ------------------------------------------------------------------------------ requests

def default_requests() -> list["EditRequest"]:
    """The edit :func:`check_method` makes unless given others: one fact whose words are in the
    tiny tokenizers' training text, with a rephrase and an unrelated (locality) prompt.

    The prompt ends with the subject: on random weights information barely flows between
    positions, so methods that rewrite the subject's representation (ROME, MEMIT, AlphaEdit) move
    the next token only when it follows the subject directly. The text is otherwise arbitrary."""
    from medit.core.requests import EditRequest, PromptAnswer

    return [EditRequest(prompt="The mother tongue of Danielle Darrieux", subject="Danielle Darrieux",
                        target_new="Paris", target_true="French", case_id="conformance-0",
                        rephrase=("Danielle Darrieux speaks the language",),
                        locality=(PromptAnswer("The capital of France is", "Paris"),))]


def training_requests(n: int = 8) -> list["EditRequest"]:
    """``n`` made-up facts for training a throwaway learned editor (see :func:`check_method`)."""
    from medit.core.requests import EditRequest, PromptAnswer

    subjects = ["France", "the river", "the dog", "Paris", "the bank", "the fox", "Darrieux", "the city"]
    words = ["Paris", "French", "lazy", "river", "bank", "dog", "quick", "brown"]
    out = []
    for i in range(n):
        s, t = subjects[i % len(subjects)], words[(i * 3 + 1) % len(words)]
        out.append(EditRequest(prompt=f"The capital of {s} is", subject=s, target_new=t,
                               rephrase=(f"{s} has the capital",),
                               locality=(PromptAnswer(f"The mother tongue of {subjects[(i + 1) % len(subjects)]} is",
                                                      words[i % len(words)]),),
                               case_id=f"train-{i}"))
    return out
