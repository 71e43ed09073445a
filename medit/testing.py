"""Conformance kit for editing methods: tiny offline models and :func:`check_method`.

A plugin author checks a method against medit's contract in their own test suite::

    from medit.testing import check_method
    from my_plugin.method import MyMethod

    def test_my_method_conforms():
        report = check_method(MyMethod(), family="llama", hparams={"steps": 5})
        print(report)

:func:`check_method` edits a tiny random model of the family (built offline in seconds, cached
for the process) and raises :class:`AssertionError` naming the broken rule unless

(a) the edit takes: the new target's teacher-forced log-probability after the edit prompt rises
    by at least ``min_gain`` nats for every request (``expect_success=False`` records the change
    without asserting it: tiny random models are weak, and some methods cannot move them much);
(b) :meth:`~medit.Edit.revert` restores every parameter and buffer bit for bit (``torch.equal``),
    with the same parameter names, shapes and ``requires_grad`` flags, and is idempotent;
(c) no forward hook or pre-hook is left on any module after the revert, and an edit that hooks
    modules while active belongs to a method that declares ``cached_scoring = False``;
(d) the edit saves as a patch (:meth:`~medit.Edit.save`), the patch loads onto a fresh copy of
    the model with :func:`medit.load_patch` (by its ``kind``, as ``medit apply`` does) and gives
    the same logits as the live edit on the edit prompts and the locality prompts (within
    ``atol``), and that loaded edit reverts bit for bit too; an edit that cannot be saved
    (``save`` raises :class:`NotImplementedError`: its class sets no ``kind`` of its own or does
    not implement ``payload``/``from_payload``) is reported as not saveable, the check skipped
    with that reason;
(e) an unknown hparam (``{"no_such_hparam": 1}``) is refused with :class:`medit.HParamsError`.

It returns a :class:`CheckReport` saying what passed, what was skipped and why. On a family the
method lists in ``unsupported_families`` only the contract and (e) are checked, and that the
method refuses the family with a :class:`medit.MethodError`. Learned methods
(``trainable = True``) given no ``checkpoint`` get a throwaway editor trained for
``train_steps`` steps first (10 by default, a second or two on a tiny model), so the edit
mechanics are checked, not the quality of a real editor; the report says so.

The tiny models: :func:`tiny_tokenizer` trains a byte-level BPE tokenizer (vocabulary ~512) on the
WikiText-2 text medit ships; :func:`build_tiny_model` builds a two-layer random model of a family
(``gpt2``, ``gptj``, ``gptneox``, ``llama``, ``t5``) with fixed seeds; :func:`tiny_model_dir` caches
one folder per family for the process and :func:`tiny_model` loads a fresh
:class:`~medit.ModelHandle` from it. Nothing touches the network.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import time
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import medit
from medit.errors import HParamsError, MethodError

if TYPE_CHECKING:
    import torch

    from medit.core.edit import Edit
    from medit.core.method import Method
    from medit.core.requests import EditRequest
    from medit.model.handle import ModelHandle

__all__ = ["FAMILIES", "TOKENIZER_STYLE", "CHAT_TEMPLATES", "SEED", "CheckReport", "check_method", "default_requests",
           "training_requests", "tiny_tokenizer", "tiny_tokenizers", "build_tiny_model", "tiny_model_dir",
           "tiny_model", "corpus_path", "training_lines"]

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


def _scratch() -> Path:
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
    return build_tiny_model(family, tiny_tokenizer(family), _scratch() / "models" / family)


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


# ------------------------------------------------------------------------------ the report

@dataclass
class CheckReport:
    """What :func:`check_method` found. ``checks`` maps each check to ``"ok: ..."`` or
    ``"skipped: <reason>"``; a failed check raises instead of being reported."""

    method: str
    family: str
    model: str
    hparams: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: per request: the new target's mean log-prob after the edit prompt, before and after the edit
    logprob_before: list[float] = field(default_factory=list)
    logprob_after: list[float] = field(default_factory=list)
    #: largest |live - patched| logit difference (None when the patch check was skipped)
    patch_max_diff: float | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> list[str]:
        return [k for k, v in self.checks.items() if v.startswith("ok")]

    @property
    def skipped(self) -> dict[str, str]:
        return {k: v.removeprefix("skipped: ") for k, v in self.checks.items() if v.startswith("skipped")}

    def __str__(self) -> str:
        lines = [f"check_method({self.method!r}, family={self.family!r}) on {self.model}: "
                 f"{len(self.passed)} passed, {len(self.skipped)} skipped, {self.seconds:.1f} s"]
        lines += [f"  {k}: {v}" for k, v in self.checks.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Failure(AssertionError):
    pass


def _fail(report: CheckReport, check: str, message: str) -> None:
    raise _Failure(f"check_method({report.method!r}, family={report.family!r}) failed [{check}]: {message}")


# ------------------------------------------------------------------------------ check_method

def check_method(method: "Method[Any] | str", family: str = "llama", hparams: Mapping[str, Any] | None = None,
                 requests: Sequence["EditRequest"] | None = None, *, expect_success: bool = True,
                 min_gain: float = 1e-3, atol: float = 1e-4, model: str | None = None,
                 train_steps: int = 10) -> CheckReport:
    """Check ``method`` (an instance, or a registered name) against medit's contract on the tiny
    random model of ``family`` (or on ``model``, any spec :func:`medit.load_model` takes); see the
    module documentation for the checks. ``hparams`` are overrides on the method's defaults for
    the model (as ``--set`` gives them); ``requests`` default to :func:`default_requests` and are
    applied together in one ``apply`` call (several need ``"batch"`` in the method's modes).

    Returns a :class:`CheckReport`; raises :class:`AssertionError` naming the broken rule. On a
    tiny model the check runs on one CPU thread (thousands of tiny operations gain nothing from
    intra-op threads, and on a busy machine their barriers make each one wait).
    """
    with _one_thread() if model is None else contextlib.nullcontext():
        return _check_method(method, family, hparams, requests, expect_success, min_gain, atol, model, train_steps)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_method(method: "Method[Any] | str", family: str, hparams: Mapping[str, Any] | None,
                  requests: Sequence["EditRequest"] | None, expect_success: bool, min_gain: float, atol: float,
                  model: str | None, train_steps: int) -> CheckReport:
    from medit.core.method import MODES, Method
    from medit.plugin.manager import get_plugins

    start = time.perf_counter()
    m = get_plugins().methods.get(method) if isinstance(method, str) else method
    reqs = list(requests) if requests is not None else default_requests()
    report = CheckReport(method=getattr(m, "name", repr(m)), family=family, model=model or f"tiny {family}")
    overrides = dict(hparams or {})

    # ---- the class contract (no model needed)
    if not isinstance(m, Method):
        _fail(report, "contract", f"{type(m).__name__} is not a medit.Method subclass instance")
    if not m.name or m.name != m.name.lower() or " " in m.name:
        _fail(report, "contract", f"name {m.name!r} must be a non-empty lowercase name")
    if not (isinstance(m.hparams_class, type) and issubclass(m.hparams_class, medit.HParams)
            and is_dataclass(m.hparams_class)):
        _fail(report, "contract", f"hparams_class {m.hparams_class!r} must be a dataclass subclassing medit.HParams")
    if not m.modes or not set(m.modes) <= set(MODES):
        _fail(report, "contract", f"modes {m.modes!r} must be a non-empty subset of {MODES}")
    if type(m).apply is Method.apply:
        _fail(report, "contract", "the method does not implement apply()")
    if len(reqs) > 1 and "batch" not in m.modes:
        raise ValueError(f"{len(reqs)} requests are applied in one call, which needs 'batch' in the method's "
                         f"modes {m.modes}; pass one request")
    report.checks["contract"] = "ok: name, hparams dataclass, modes, apply"

    handle = medit.load_model(model, device="cpu") if model else tiny_model(family)
    family = report.family = handle.adapter.name

    # ---- (e) an unknown hparam is refused, with and without a model
    for where, call in (("resolve_hparams", lambda: m.resolve_hparams(handle, overrides={"no_such_hparam": 1})),
                        ("precheck_hparams", lambda: m.precheck_hparams(overrides={"no_such_hparam": 1}))):
        try:
            call()
        except HParamsError as exc:
            if "no_such_hparam" not in str(exc):
                _fail(report, "bad hparams", f"{where}: the HParamsError does not name the hparam: {exc}")
        else:
            _fail(report, "bad hparams", f"{where} accepted the unknown hparam 'no_such_hparam'")
    report.checks["bad hparams"] = "ok: an unknown hparam is refused with HParamsError"

    # ---- a family the method refuses is refused cleanly, and nothing else is checked on it
    if family in m.unsupported_families:
        try:
            m.check_supported(handle, "single")
        except MethodError as exc:
            for check in ("edit takes", "revert", "hooks", "patch"):
                report.checks[check] = f"skipped: the method refuses the {family} family (unsupported_families)"
            report.notes.append(f"refused with MethodError: {exc}")
            report.seconds = time.perf_counter() - start
            return report
        _fail(report, "contract", f"{family} is in unsupported_families but check_supported() accepts it")
    m.check_supported(handle, "batch" if len(reqs) > 1 else "single")

    hp = m.resolve_hparams(handle, overrides=overrides)
    if not isinstance(hp, m.hparams_class):
        _fail(report, "contract", f"resolve_hparams gave a {type(hp).__name__}, not a {m.hparams_class.__name__}")
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="check-", dir=_scratch())))
        hp = _trained_if_needed(m, handle, hp, scratch, train_steps, report)
        report.hparams = hp.to_dict()
        _check_edit(m, handle, hp, reqs, scratch, report, expect_success, min_gain, atol, model)
    report.seconds = time.perf_counter() - start
    return report


def _trained_if_needed(m: "Method[Any]", handle: "ModelHandle", hp: Any, scratch: Path, steps: int,
                       report: CheckReport) -> Any:
    """A learned method without a checkpoint: train a throwaway editor for ``steps`` steps."""
    if not getattr(m, "trainable", False) or getattr(hp, "checkpoint", None):
        return hp
    from medit.toolkit.training import train

    data = training_requests()
    short = hp.replace(steps=steps, val_n=0, val_every=steps, batch_size=min(hp.batch_size, len(data)),
                       patience=0)
    train(handle, m, short, data, scratch / "editor", progress=False)  # type: ignore[arg-type]
    report.notes.append(f"no checkpoint given: trained a throwaway editor for {steps} steps on "
                        f"{len(data)} made-up facts (checks the edit mechanics, not a trained editor's quality)")
    return hp.replace(checkpoint=str(scratch / "editor"))


def _state(handle: "ModelHandle") -> dict[str, "torch.Tensor"]:
    return {k: v.detach().clone() for k, v in handle.model.state_dict(keep_vars=True).items()}


def _params(handle: "ModelHandle") -> dict[str, tuple[tuple[int, ...], bool]]:
    return {n: (tuple(p.shape), p.requires_grad) for n, p in handle.model.named_parameters()}


def _hooks(handle: "ModelHandle") -> list[str]:
    """The forward (pre-)hooks on the model other than transformers' own, and global ones."""
    from torch.nn.modules import module as nn_module

    from medit.model.tracing import foreign_hooks

    found = [f"{name or '(model)'}: {getattr(h, '__qualname__', repr(h))}"
             for name, mod in handle.model.named_modules() for h in foreign_hooks(mod)]
    found += [f"(global): {getattr(h, '__qualname__', repr(h))}"
              for h in (*nn_module._global_forward_hooks.values(), *nn_module._global_forward_pre_hooks.values())]
    return found


def _compare_state(report: CheckReport, check: str, handle: "ModelHandle", state: dict[str, "torch.Tensor"],
                   params: dict[str, tuple[tuple[int, ...], bool]], hooks: list[str]) -> None:
    import torch

    now = handle.model.state_dict(keep_vars=True)
    if set(now) != set(state):
        extra, gone = sorted(set(now) - set(state)), sorted(set(state) - set(now))
        _fail(report, check, f"after revert the model's state differs in names (added {extra[:3]}, removed {gone[:3]})")
    changed = [k for k, v in now.items() if v.shape != state[k].shape or v.dtype != state[k].dtype
               or not torch.equal(v.detach(), state[k])]
    if changed:
        _fail(report, check, f"revert is not bit-exact: {len(changed)} tensor(s) differ, e.g. {changed[:3]}")
    if _params(handle) != params:
        diff = [n for n, v in _params(handle).items() if params.get(n) != v]
        _fail(report, check, f"revert left parameters with other shapes or requires_grad: {diff[:3]}")
    left = [h for h in _hooks(handle) if h not in hooks]
    if left:
        _fail(report, "hooks", f"hooks left on the model after revert: {left[:3]}")


def _logits(handle: "ModelHandle", edit: "Edit", pairs: Sequence[tuple[str, str]]) -> "torch.Tensor":
    """Float32 logits at every position that predicts a target token, with the edit's prompt
    transform applied (the same forward pass the evaluation engine scores)."""
    import torch

    from medit.scoring.engine import Scorer

    scorer = Scorer(handle, use_cache=False)
    prompts = edit.transform_prompts([p for p, _ in pairs])
    with torch.no_grad():
        return torch.cat([scorer.selected_logits([scorer.encode_pair(p, t)]).float()
                          for p, (_, t) in zip(prompts, pairs)])


def _target_logprobs(handle: "ModelHandle", reqs: Sequence["EditRequest"], edit: "Edit | None") -> list[float]:
    from medit.core.queries import TFQuery
    from medit.scoring.engine import Scorer

    res = Scorer(handle, use_cache=False).teacher_forced([TFQuery(r.prompt, r.target_new) for r in reqs],
                                                         edit.transform_prompts if edit is not None else None)
    return [r.mean_logprob for r in res]


def _check_edit(m: "Method[Any]", handle: "ModelHandle", hp: Any, reqs: list["EditRequest"], scratch: Path,
                report: CheckReport, expect_success: bool, min_gain: float, atol: float, model: str | None) -> None:
    from medit.core.edit import Edit, load_patch

    handle.fingerprint()  # the base model's, before any change (as the evaluation engine does)
    state, params, hooks = _state(handle), _params(handle), _hooks(handle)
    report.logprob_before = _target_logprobs(handle, reqs, None)
    edit = m.apply(handle, reqs, hp)
    try:
        if not isinstance(edit, Edit):
            _fail(report, "contract", f"apply() returned a {type(edit).__name__}, not a medit.Edit")
        if not edit.active:
            _fail(report, "contract", "the Edit apply() returned is not active")

        # (a) the edit takes
        report.logprob_after = _target_logprobs(handle, reqs, edit)
        gains = [a - b for a, b in zip(report.logprob_after, report.logprob_before)]
        shown = ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(report.logprob_before, report.logprob_after))
        if all(g >= min_gain for g in gains):
            report.checks["edit takes"] = f"ok: target log-prob {shown}"
        elif expect_success:
            _fail(report, "edit takes", f"the new target's log-prob did not rise by {min_gain} nats ({shown}); "
                  "stronger hparams may help, or pass expect_success=False for a method that cannot move a tiny model")
        else:
            report.checks["edit takes"] = f"skipped: expect_success=False (target log-prob {shown})"

        # (c, while active) an edit that hooks modules must keep the cached scoring engine away
        active_hooks = [h for h in _hooks(handle) if h not in hooks]
        if active_hooks and m.cached_scoring:
            _fail(report, "hooks", f"the edit hooks modules ({active_hooks[:2]}) but the method declares "
                  "cached_scoring = True; set cached_scoring = False")

        # (d, part 1) the live outputs and the patch, while the edit is active
        pairs = [(r.prompt, r.target_new) for r in reqs] + \
                [(q.prompt, q.answer or r.target_new) for r in reqs for q in r.locality]
        live = _logits(handle, edit, pairs)
        patch: Path | None = scratch / "patch"
        try:
            edit.save(scratch / "patch")
        except NotImplementedError as exc:
            report.checks["patch"] = f"skipped: the edit cannot be saved ({exc})"
            patch = None
    finally:
        edit.revert()

    # (b) bit-exact revert, idempotent; (c) no hooks left
    if edit.active:
        _fail(report, "revert", "the Edit is still active after revert()")
    _compare_state(report, "revert", handle, state, params, hooks)
    edit.revert()
    _compare_state(report, "revert", handle, state, params, hooks)
    report.checks["revert"] = f"ok: {len(state)} tensors bit-exact, twice"
    report.checks["hooks"] = "ok: none left" + (" (the edit hooked modules while active)" if active_hooks else "")

    # (d, part 2) the patch on a fresh copy of the model
    if patch is None:
        return
    fresh = medit.load_model(model, device="cpu") if model else tiny_model(report.family)
    fresh.fingerprint()
    f_state, f_params, f_hooks = _state(fresh), _params(fresh), _hooks(fresh)
    loaded = load_patch(fresh, patch)
    try:
        again = _logits(fresh, loaded, pairs)
    finally:
        loaded.revert()
    diff = float((again - live).abs().max()) if again.shape == live.shape else float("inf")
    report.patch_max_diff = diff
    if not diff <= atol:
        _fail(report, "patch", f"the patched model's logits differ from the live edit's by {diff:.3g} "
              f"(> atol={atol}) on the edit and locality prompts")
    _compare_state(report, "patch", fresh, f_state, f_params, f_hooks)
    report.checks["patch"] = f"ok: saved, loaded onto a fresh model (max logit diff {diff:.2g}), reverted bit-exact"
