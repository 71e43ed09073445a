"""The ``medit`` command line, driven through typer's CliRunner on tiny random models.

Covers every command (plugins, list, version, edit, eval, apply), the example third-party plugin,
broken / clashing plugins, and every bad input of the foundation issue: each must exit with code 2
and a one-line ``Error: ...`` naming the bad value, never a traceback.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import medit
from medit.cli import app
from medit.plugin import manager as plugins_mod
from medit.plugin.manager import get_plugins, register_plugin, unregister_plugin

# the first 300 CounterFact dev cases, which the tests carry (tests/data/README.md)
COUNTERFACT = Path(__file__).resolve().parent / "data" / "counterfact-dev-300.json"

# Strong enough for a random tiny model: both edits of a 2-case batch take under `exact` (~1 s).
STRONG_FT = ["--set", "lr=0.05", "--set", "steps=100", "--set", "norm_constraint=0.5", "--set", "layers=[1]"]
FAST_FT = ["--set", "steps=3"]

CASE_A = {"case_id": "a", "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
          "target_true": "Paris", "rephrase": ["France has its capital in"],
          "locality": [{"prompt": "The river bank", "answer": "is near"}]}
CASE_B = {"case_id": "b", "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
          "target_new": "English", "target_true": "French"}


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, args: list[str]) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _text(result: Any) -> tuple[str, str]:
    """(stdout-ish, stderr) across Click versions (8.2+ captures stderr separately)."""
    out = result.output or ""
    try:
        err = result.stderr or ""
    except ValueError:  # Click < 8.2 with mixed output
        err = ""
    return out, err


def ok(result: Any) -> str:
    out, err = _text(result)
    assert result.exit_code == 0, f"exit {result.exit_code}\n{out}\n{err}\n{result.exception!r}"
    return out


def assert_one_line_error(result: Any, *needles: str) -> str:
    """Exit code 2, no traceback, and a single ``Error:`` line (the last thing printed) naming
    every needle. Returns the message."""
    out, err = _text(result)
    both = out + "\n" + err
    assert result.exit_code == 2, f"exit {result.exit_code} (want 2)\n{both}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    assert "Traceback" not in both
    stream = err if "Error:" in err else out
    lines = [ln for ln in stream.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1, f"want exactly one Error line, got:\n{stream}"
    assert lines[-1] == errors[0], f"the error message must be one line and come last:\n{stream}"
    msg = errors[0]
    for needle in needles:
        assert needle in msg, f"{needle!r} not named in: {msg}"
    return msg


def write_jsonl(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def one_case(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "one.jsonl", CASE_A)


@pytest.fixture
def two_cases(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "two.jsonl", CASE_A, CASE_B)


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["gpt2"]


@pytest.fixture(scope="module")
def reseeded_gpt2(tiny_tokenizers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 architecture and tokenizer with different random weights."""
    from conftest import SEED, build_tiny_model

    return build_tiny_model("gpt2", tiny_tokenizers["gpt2"], tmp_path_factory.mktemp("reseeded") / "gpt2",
                            seed=SEED + 1)


@pytest.fixture(scope="module")
def unsupported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local folder whose config.json has model_type 'bert' (no family plugin handles it)."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bert") / "bert-tiny"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
               vocab_size=100).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_patch(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One `medit edit --save-patch` run on the tiny GPT-2, shared by the edit/apply tests."""
    root = tmp_path_factory.mktemp("edit-run")
    data = write_jsonl(root / "two.jsonl", CASE_A, CASE_B)
    out, patch = root / "run", root / "patch"
    result = CliRunner().invoke(app, ["edit", str(data), "--method", "ft-l", "--model", str(gpt2_dir),
                                      "--out", str(out), "--save-patch", str(patch), *STRONG_FT])
    return {"data": data, "out": out, "patch": patch, "result": result}


@pytest.fixture
def restore_plugins():
    """Whatever a test does to the plugin registries, later tests see the normal ones."""
    yield
    get_plugins(reload=True)


# ------------------------------------------------------------------------------ info commands

def test_version(runner):
    assert ok(invoke(runner, ["version"])).strip() == medit.__version__


def test_help(runner):
    out = ok(invoke(runner, ["--help"]))
    for cmd in ("edit", "eval", "apply", "plugins", "list", "version"):
        assert cmd in out
    for cmd in ("edit", "eval", "apply"):
        assert "--model" in ok(invoke(runner, [cmd, "--help"]))


def test_plugins_table_and_json(runner):
    out = ok(invoke(runner, ["plugins"]))
    example_version = md.version("medit-plugin-example")
    row = next(ln for ln in out.splitlines() if ln.startswith("rank-one-example"))
    assert "medit-plugin-example" in row and example_version in row and "methods: rank-one-example" in row
    ft_row = next(ln for ln in out.splitlines() if ln.split()[:1] == ["ft"])
    assert " medit " in ft_row and "ft-l" in ft_row and medit.__version__ in ft_row

    data = json.loads(ok(invoke(runner, ["plugins", "--json"])))
    by_name = {p["plugin"]: p for p in data["plugins"]}
    assert by_name["ft"]["distribution"] == "medit"
    assert by_name["ft"]["registers"]["methods"] == ["ft-l", "ft-m"]
    for builtin in ("gpt2", "gptj", "gptneox", "llama", "t5", "reliability", "generalization", "locality",
                    "portability", "efficiency", "medit-jsonl", "counterfact", "zsre"):
        assert by_name[builtin]["distribution"] == "medit", builtin
        assert by_name[builtin]["version"] == medit.__version__
    ex = by_name["rank-one-example"]
    assert ex["distribution"] == "medit-plugin-example"
    assert ex["version"] == example_version
    assert ex["registers"] == {"methods": ["rank-one-example"]}
    assert data["problems"] == []


@pytest.mark.parametrize("kind,expected", [
    ("methods", {"ft-l", "ft-m", "rank-one-example"}),
    ("models", {"gpt2", "gptj", "gptneox", "llama", "t5"}),
    ("metrics", {"reliability", "generalization", "locality", "portability", "efficiency"}),
    ("datasets", {"medit-jsonl", "counterfact", "zsre"}),
])
def test_list(runner, kind, expected):
    out = ok(invoke(runner, ["list", kind]))
    names = {ln.split()[0] for ln in out.splitlines()[2:] if ln.strip() and not ln.startswith(" ")}
    assert expected <= names
    rows = json.loads(ok(invoke(runner, ["list", kind, "--json"])))
    by_name = {r["name"]: r for r in rows}
    assert expected <= set(by_name)
    for name in expected:
        assert by_name[name]["description"], f"{kind} {name} has no description"
        assert "\n" not in by_name[name]["description"]
    if kind == "models":
        assert "smollm2-135m" in by_name["llama"]["aliases"]
        assert "gpt2-xl" in by_name["gpt2"]["aliases"]
        assert "t5" in by_name["t5"]["model_types"]
    if kind == "methods":
        assert by_name["rank-one-example"]["distribution"] == "medit-plugin-example"


# ------------------------------------------------------------------------------ edit and apply

def test_edit_writes_run_files_and_patch(saved_patch):
    result, out, patch = saved_patch["result"], saved_patch["out"], saved_patch["patch"]
    text = ok(result)
    # before/after completions and the metrics table
    assert "before" in text and "after" in text
    assert "| reliability" in text and "exact" in text
    assert f"patch: {patch}" in text

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["medit_version"] == medit.__version__
    assert manifest["method"] == "ft-l" and manifest["n"] == 2
    assert manifest["model"]["id"] and manifest["model"]["fingerprint"]
    assert manifest["hparams"]["steps"] == 100 and manifest["hparams"]["layers"] == [1]
    assert manifest["dataset"]["fingerprint"] and manifest["dataset"]["format"] == "medit-jsonl"
    assert manifest["start_time"] and manifest["end_time"]

    cases = [json.loads(ln) for ln in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["case_id"] for c in cases] == ["a", "b"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "ft-l" and summary["n"] == 2 and summary["mode"] in ("batch", "sequential")
    for metric, protos in summary["metrics"].items():
        for proto, stages in protos.items():
            assert set(stages) - {"ci95", "delta_ci95", "n"} == {"pre", "post"}, (metric, proto)
    assert set(summary["metrics"]["reliability"]) >= {"generate", "token_acc", "exact", "prob"}
    assert {k: v for k, v in summary["metrics"]["reliability"]["exact"].items() if k in ("pre", "post")} == {"pre": 0.0, "post": 1.0}
    assert set(summary["efficiency"]) >= {"edit_s_mean", "edit_s_total", "eval_s_total", "stats_s", "peak_rss_mb"}

    assert (patch / "manifest.json").is_file() and (patch / "tensors.safetensors").is_file()
    pm = json.loads((patch / "manifest.json").read_text())
    assert pm["method"] == "ft-l" and len(pm["requests"]) == 2


def _completion_rows(out: str, prompt: str) -> list[str]:
    row = next(ln for ln in out.splitlines() if ln.startswith(prompt))
    return [c.strip() for c in re.split(r"\s{2,}", row[len(prompt):].strip())]


def test_apply_patch_changes_the_output(runner, saved_patch, gpt2_dir, tmp_path):
    ok(saved_patch["result"])
    prompt = CASE_A["prompt"]
    saved = tmp_path / "edited"
    out = ok(invoke(runner, ["apply", "--model", gpt2_dir, "--patch", saved_patch["patch"],
                             "--prompt", prompt, "--save", saved]))
    assert "applied ft-l patch with 2 edit(s)" in out
    before, after = _completion_rows(out, prompt)
    assert before != after, out
    assert after.startswith("R"), out  # the edit target is "Rome"
    assert (saved / "config.json").is_file()
    # The saved model is the edited one: it answers like the patched model.
    from medit.model.loading import load_model
    from medit.scoring.engine import Scorer
    from medit.core.queries import TFQuery
    edited = load_model(str(saved), device="cpu")
    assert Scorer(edited).teacher_forced([TFQuery(prompt, CASE_A["target_new"])])[0].exact == 1.0


def test_apply_default_prompts_are_the_patch_edits(runner, saved_patch, gpt2_dir):
    ok(saved_patch["result"])
    out = ok(invoke(runner, ["apply", "--model", gpt2_dir, "--patch", saved_patch["patch"]]))
    assert CASE_A["prompt"] in out and "Danielle Darrieux" in out
    assert all(c.isprintable() for ln in out.splitlines() if not ln.startswith("\r") for c in ln)


def test_apply_patch_to_reseeded_model_fails(runner, saved_patch, reseeded_gpt2):
    ok(saved_patch["result"])
    result = invoke(runner, ["apply", "--model", reseeded_gpt2, "--patch", saved_patch["patch"]])
    assert_one_line_error(result, "patch", str(reseeded_gpt2), "fingerprint")


def test_apply_patch_to_other_family_fails(runner, saved_patch, tiny_model_dirs):
    ok(saved_patch["result"])
    result = invoke(runner, ["apply", "--model", tiny_model_dirs["llama"], "--patch", saved_patch["patch"]])
    assert_one_line_error(result, "patch", str(tiny_model_dirs["llama"]))


def test_apply_missing_patch(runner, gpt2_dir, tmp_path):
    result = invoke(runner, ["apply", "--model", gpt2_dir, "--patch", tmp_path / "no-such-patch"])
    assert_one_line_error(result, "no-such-patch", "does not exist")
    (tmp_path / "empty").mkdir()
    result = invoke(runner, ["apply", "--model", gpt2_dir, "--patch", tmp_path / "empty"])
    assert_one_line_error(result, "empty", "not a medit patch")


def test_edit_sequential_mode(runner, two_cases, gpt2_dir, tmp_path):
    out = tmp_path / "seq"
    ok(invoke(runner, ["edit", two_cases, "--method", "ft-l", "--model", gpt2_dir, "--out", out,
                       "--mode", "sequential", "--protocol", "exact,generate", *FAST_FT]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sequential" and summary["n"] == 2
    assert set(summary["metrics"]["reliability"]) == {"exact", "generate"}
    assert len((out / "cases.jsonl").read_text().splitlines()) == 2


def test_edit_refuses_an_existing_run_folder(runner, one_case, gpt2_dir, tmp_path):
    out = tmp_path / "run"
    ok(invoke(runner, ["edit", one_case, "--method", "ft-l", "--model", gpt2_dir, "--out", out, *FAST_FT]))
    result = invoke(runner, ["edit", one_case, "--method", "ft-l", "--model", gpt2_dir, "--out", out, *FAST_FT])
    assert_one_line_error(result, str(out), "already holds results", "choose another --out")


# ------------------------------------------------------------------------------ eval

def test_eval_counterfact_and_resume(runner, gpt2_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--method", "ft-l", "--model", gpt2_dir, "--dataset", f"counterfact:{COUNTERFACT}",
            "--n", "2", "--out", out, *FAST_FT]
    text = ok(invoke(runner, args))
    assert "| reliability" in text and "| generalization" in text and "| locality" in text
    for name in ("manifest.json", "cases.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "single" and manifest["n"] == 2
    assert manifest["dataset"]["format"] == "counterfact"
    assert manifest["dataset"]["path"] == str(COUNTERFACT.resolve())
    assert manifest["protocols"] == ["generate", "token_acc", "exact", "prob"]
    cases = [json.loads(ln) for ln in (out / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 2 and len({c["case_id"] for c in cases}) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["mode"] == "single"
    assert {"reliability", "generalization", "locality"} <= set(summary["metrics"])
    for protos in summary["metrics"].values():
        for stages in protos.values():
            assert set(stages) - {"ci95", "delta_ci95", "n"} == {"pre", "post"}
    for metric in ("reliability", "generalization"):
        for stages in summary["metrics"][metric].values():
            assert all(v is None or 0.0 <= v <= 1.0 for k, v in stages.items() if k in ("pre", "post")), stages
            assert 0.0 <= stages["ci95"][0] <= stages["post"] <= stages["ci95"][1] <= 1.0, (metric, stages)

    # Same --out without --resume: refused cleanly, results untouched.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(invoke(runner, args), str(out), "already holds results")
    # --resume on a finished run says so and changes nothing (its efficiency record included).
    assert_one_line_error(invoke(runner, args + ["--resume"]), str(out), "finished", "nothing to resume")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # An interrupted run (one case written, plus a torn line, no summary) resumes to exactly the
    # missing case; without --resume it is refused.
    (out / "cases.jsonl").write_text(json.dumps(cases[0]) + "\n" + '{"case_id": "tor')
    (out / "summary.json").unlink()
    assert_one_line_error(invoke(runner, args), str(out), "already holds results", "--resume")
    ok(invoke(runner, args + ["--resume"]))
    resumed = [json.loads(ln) for ln in (out / "cases.jsonl").read_text().splitlines()]
    assert sorted(c["case_id"] for c in resumed) == sorted(c["case_id"] for c in cases)
    assert json.loads((out / "summary.json").read_text())["n"] == 2

    # Resuming with other settings would mix two configurations: refused, naming the difference.
    (out / "cases.jsonl").write_text(json.dumps(cases[0]) + "\n")
    (out / "summary.json").unlink()
    assert_one_line_error(invoke(runner, args + ["--resume", "--mode", "sequential"]), str(out), "mode",
                          "'single'", "'sequential'")
    assert_one_line_error(invoke(runner, args + ["--resume", "--set", "steps=2"]), "hparams.steps", "2")
    assert (out / "cases.jsonl").read_text() == json.dumps(cases[0]) + "\n"
    assert json.loads((out / "manifest.json").read_text())["mode"] == "single"
    # a manifest from an older medit, without a newer setting, still resumes
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["also_immediate"], manifest["hparams"]["steps"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    ok(invoke(runner, args + ["--resume"]))
    assert len((out / "cases.jsonl").read_text().splitlines()) == 2


def test_eval_metric_and_protocol_selection(runner, gpt2_dir, tmp_path):
    out = tmp_path / "sel"
    ok(invoke(runner, ["eval", "--method", "ft-l", "--model", gpt2_dir, "--dataset", f"counterfact:{COUNTERFACT}",
                       "--n", "1", "--out", out, "--metrics", "reliability,efficiency", "--protocol", "exact",
                       *FAST_FT]))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"reliability"}
    assert set(summary["metrics"]["reliability"]) == {"exact"}
    assert summary["efficiency"]["edit_s_total"] >= 0


# ------------------------------------------------------------------------------ the example plugin

def test_example_plugin_discovered_through_its_entry_point():
    eps = [ep for ep in md.entry_points(group="medit") if ep.name == "rank-one-example"]
    assert len(eps) == 1, "the example plugin is not installed (pip install -e examples/medit-plugin-example)"
    assert eps[0].dist is not None and eps[0].dist.metadata["Name"] == "medit-plugin-example"
    assert eps[0].value == "medit_plugin_example"
    entry = get_plugins().methods.entry("rank-one-example")
    assert entry.dist == "medit-plugin-example"
    assert entry.version == md.version("medit-plugin-example")
    assert entry.plugin == "rank-one-example"


def test_example_plugin_runs_via_medit_edit(runner, one_case, gpt2_dir, tmp_path):
    out = tmp_path / "r1"
    text = ok(invoke(runner, ["edit", one_case, "--method", "rank-one-example", "--model", gpt2_dir,
                              "--out", out, "--set", "scale=0.3", "--set", "steps=40", "--save-patch",
                              tmp_path / "r1.patch"]))
    assert "| reliability" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "rank-one-example"
    assert {k: v for k, v in summary["metrics"]["reliability"]["exact"].items() if k in ("pre", "post")} == {"pre": 0.0, "post": 1.0}
    patch = json.loads((tmp_path / "r1.patch" / "manifest.json").read_text())
    assert patch["method"] == "rank-one-example"
    assert all(p["storage"] == "lowrank" for p in patch["params"].values())


def test_medit_load_plugins_empty_hides_third_party(monkeypatch, runner, one_case, gpt2_dir, restore_plugins):
    monkeypatch.setenv("MEDIT_LOAD_PLUGINS", "")
    p = get_plugins(reload=True)
    assert "rank-one-example" not in p.methods
    assert {"ft-l", "ft-m"} <= set(p.methods.names())  # built-ins always load
    assert "rank-one-example" not in ok(invoke(runner, ["list", "methods"]))
    assert "medit-plugin-example" not in ok(invoke(runner, ["plugins"]))
    result = invoke(runner, ["edit", one_case, "--method", "rank-one-example", "--model", gpt2_dir])
    assert_one_line_error(result, "'rank-one-example'", "ft-l")

    monkeypatch.setenv("MEDIT_LOAD_PLUGINS", "rank-one-example")
    assert "rank-one-example" in get_plugins(reload=True).methods
    monkeypatch.setenv("MEDIT_LOAD_PLUGINS", "medit-plugin-example")  # a distribution name works too
    assert "rank-one-example" in get_plugins(reload=True).methods
    monkeypatch.setenv("MEDIT_LOAD_PLUGINS", "some-other-plugin")
    assert "rank-one-example" not in get_plugins(reload=True).methods

    monkeypatch.delenv("MEDIT_LOAD_PLUGINS")
    assert "rank-one-example" in get_plugins(reload=True).methods


# ------------------------------------------------------------------------------ broken plugins

class _ClashingPlugin:
    """Registers a method under a name a built-in already holds."""

    @medit.hookimpl
    def register_methods(register):  # noqa: N805 - registered as a class, called without self
        class Impostor:
            name = "ft-l"
            description = "an impostor"
        register(Impostor())


class _BrokenPlugin:
    """Raises inside its hook."""

    @medit.hookimpl
    def register_metrics(register):  # noqa: N805
        raise RuntimeError("boom\nsecond line of a long message")


def test_clashing_plugin_is_reported_and_skipped(runner, capsys, restore_plugins):
    try:
        register_plugin(_ClashingPlugin, "clash-test")
        p = get_plugins()
        problems = [x for x in p.problems if "clash-test" in x]
        assert len(problems) == 1 and "\n" not in problems[0]
        assert "'ft-l'" in problems[0] and "skipped" in problems[0]
        assert p.methods.entry("ft-l").dist == "medit"
        assert p.methods.get("ft-l").description != "an impostor"
        err = capsys.readouterr().err
        assert "medit: warning:" in err and "clash-test" in err
        # The CLI still works and reports the problem.
        assert "ft-l" in ok(invoke(runner, ["list", "methods"]))
        data = json.loads(ok(invoke(runner, ["plugins", "--json"])))
        assert any("clash-test" in x for x in data["problems"])
    finally:
        unregister_plugin("clash-test")
    assert not any("clash-test" in x for x in get_plugins().problems)


def test_plugin_failing_in_its_hook_is_reported_and_skipped(runner, restore_plugins):
    try:
        register_plugin(_BrokenPlugin, "broken-hook-test")
        problems = [x for x in get_plugins().problems if "broken-hook-test" in x]
        assert len(problems) == 1 and "\n" not in problems[0] and "boom" in problems[0]
        assert "reliability" in ok(invoke(runner, ["list", "metrics"]))
    finally:
        unregister_plugin("broken-hook-test")


def test_plugin_that_fails_to_import_is_reported_and_skipped(monkeypatch, runner, capsys, restore_plugins):
    real = md.entry_points

    def fake_entry_points(**kw: Any) -> Any:
        eps = list(real(**kw))
        if kw.get("group") == "medit":
            eps.append(md.EntryPoint(name="broken-import-test", value="medit_no_such_module_xyz",
                                     group="medit"))
        return eps

    monkeypatch.setattr(plugins_mod.md, "entry_points", fake_entry_points)
    p = get_plugins(reload=True)
    problems = [x for x in p.problems if "broken-import-test" in x]
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "failed to load" in problems[0] and "medit_no_such_module_xyz" in problems[0]
    assert "medit: warning:" in capsys.readouterr().err
    # Everything else loaded, and the CLI works.
    assert {"ft-l", "rank-one-example"} <= set(p.methods.names())
    ok(invoke(runner, ["plugins"]))
    assert "ft-l" in ok(invoke(runner, ["list", "methods"]))
    data = json.loads(ok(invoke(runner, ["plugins", "--json"])))
    assert any("broken-import-test" in x for x in data["problems"])
    monkeypatch.undo()
    assert not get_plugins(reload=True).problems


class _FakeEntryPoint:
    """An entry point of the example distribution under another name (what plugins.py reads)."""

    group = "medit"

    def __init__(self, name: str, real: Any) -> None:
        self.name, self.value, self.dist, self._real = name, real.value, real.dist, real

    def load(self) -> Any:
        return self._real.load()


def test_third_party_entry_point_cannot_shadow_a_builtin_plugin(monkeypatch, restore_plugins):
    real = md.entry_points
    example = next(ep for ep in real(group="medit") if ep.name == "rank-one-example")

    def fake_entry_points(**kw: Any) -> Any:
        eps = list(real(**kw))
        if kw.get("group") == "medit":
            # A third-party distribution's entry point named like the built-in "ft" plugin.
            eps.insert(0, _FakeEntryPoint("ft", example))
        return eps

    monkeypatch.setattr(plugins_mod.md, "entry_points", fake_entry_points)
    p = get_plugins(reload=True)
    assert p.methods.entry("ft-l").dist == "medit"
    assert any("'ft'" in x and "medit-plugin-example" in x and "skipped" in x for x in p.problems)


# ------------------------------------------------------------------------------ bad input

def _edit(file: Any, model: Any, tmp_path: Path, *extra: str) -> list[Any]:
    return ["edit", file, "--method", "ft-l", "--model", model, "--out", tmp_path / "out", *extra]


def test_bad_missing_file(runner, gpt2_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_one_line_error(invoke(runner, _edit(missing, gpt2_dir, tmp_path)), str(missing), "does not exist")


def test_bad_unreadable_file_a_directory(runner, gpt2_dir, tmp_path):
    folder = tmp_path / "adir"
    folder.mkdir()
    assert_one_line_error(invoke(runner, _edit(folder, gpt2_dir, tmp_path)), str(folder), "directory")


def test_bad_malformed_json(runner, gpt2_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"prompt": "a b", "subject": "a",\n   "target_new": "x" "oops": 1}\n]\n')
    assert_one_line_error(invoke(runner, _edit(bad, gpt2_dir, tmp_path)), str(bad), "line 3")


def test_bad_malformed_jsonl(runner, gpt2_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CASE_A) + "\n\n# a comment\n" + '{"prompt": "a b", "subject": \n')
    assert_one_line_error(invoke(runner, _edit(bad, gpt2_dir, tmp_path)), str(bad), "line 4")


def test_bad_unknown_method(runner, one_case, gpt2_dir, tmp_path):
    result = invoke(runner, ["edit", one_case, "--method", "nope-method", "--model", gpt2_dir])
    assert_one_line_error(result, "'nope-method'", "ft-l", "ft-m")
    result = invoke(runner, ["eval", "--method", "nope-method", "--model", gpt2_dir, "--dataset", one_case])
    assert_one_line_error(result, "'nope-method'", "ft-l")


def test_bad_unknown_model_family(runner, one_case, unsupported_model, tmp_path):
    msg = assert_one_line_error(invoke(runner, _edit(one_case, unsupported_model, tmp_path)), "'bert'")
    for supported in ("gpt2", "gptj", "gpt_neox", "llama", "t5"):
        assert supported in msg


def test_bad_unknown_metric(runner, one_case, gpt2_dir, tmp_path):
    result = invoke(runner, ["eval", "--method", "ft-l", "--model", gpt2_dir, "--dataset", one_case,
                             "--metrics", "reliability,nope"])
    assert_one_line_error(result, "'nope'", "reliability", "locality")


def test_bad_unknown_dataset_format(runner, one_case, gpt2_dir, tmp_path):
    result = invoke(runner, _edit(f"nope:{one_case}", gpt2_dir, tmp_path))
    assert_one_line_error(result, "'nope'", "medit-jsonl", "counterfact", "zsre")
    result = invoke(runner, ["eval", "--method", "ft-l", "--model", gpt2_dir, "--dataset", f"nope:{one_case}"])
    assert_one_line_error(result, "'nope'", "counterfact")


def test_bad_subject_not_in_prompt(runner, gpt2_dir, tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", CASE_A, {**CASE_B, "subject": "Marie Curie"})
    assert_one_line_error(invoke(runner, _edit(f, gpt2_dir, tmp_path)), "'Marie Curie'", "'b'", "s.jsonl:2")


def test_bad_empty_target(runner, gpt2_dir, tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", {**CASE_A, "target_new": ""})
    assert_one_line_error(invoke(runner, _edit(f, gpt2_dir, tmp_path)), "'target_new'", "'a'")
    f = write_jsonl(tmp_path / "e2.jsonl", {**CASE_A, "target_new": "   "})
    assert_one_line_error(invoke(runner, _edit(f, gpt2_dir, tmp_path)), "'target_new'")


def test_bad_unknown_hparam(runner, one_case, gpt2_dir, tmp_path):
    msg = assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--set", "nope=1")), "'nope'")
    for valid in ("layers", "lr", "steps", "norm_constraint"):
        assert valid in msg


def test_bad_mistyped_hparam(runner, one_case, gpt2_dir, tmp_path):
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--set", "steps=abc")),
                          "'steps'", "'abc'", "integer")
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--set", "lr=fast")),
                          "'lr'", "'fast'")
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--set", "steps")),
                          "'steps'", "key=value")


def test_bad_layer_out_of_range(runner, one_case, gpt2_dir, tmp_path):
    msg = assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--set", "layers=[99]")),
                                "99", "out of range", "0..1")
    assert "'layers'" in msg
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--set", "layers=[-3]")),
                          "-3", "out of range")
    # a failed run leaves no results behind: the same --out is usable afterwards
    ok(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, *FAST_FT)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="no-GPU test: a GPU is present")
def test_bad_device_cuda_without_gpu(runner, one_case, gpt2_dir, tmp_path):
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--device", "cuda")),
                          "'cuda'", "--device cpu")

@pytest.mark.skipif(torch.cuda.is_available(), reason="no-GPU test: a GPU is present")
def test_bad_device_cuda_without_gpu_apply(runner, saved_patch, gpt2_dir):
    assert_one_line_error(invoke(runner, ["apply", "--model", gpt2_dir, "--patch", saved_patch["patch"],
                                          "--device", "cuda:0"]), "'cuda:0'")


def test_bad_device_name(runner, one_case, gpt2_dir, tmp_path):
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--device", "toaster")), "'toaster'")


def test_bad_unknown_protocol(runner, one_case, gpt2_dir, tmp_path):
    msg = assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--protocol", "exact,nope")),
                                "'nope'")
    for proto in ("generate", "token_acc", "exact", "prob"):
        assert proto in msg


def test_bad_unknown_mode(runner, one_case, gpt2_dir, tmp_path):
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--mode", "nope")),
                          "'nope'", "batch", "sequential")
    result = invoke(runner, ["eval", "--method", "ft-l", "--model", gpt2_dir, "--dataset", one_case,
                             "--mode", "nope"])
    assert_one_line_error(result, "'nope'", "single", "batch", "sequential")
    # `medit edit` keeps its edits together: single mode is refused with the alternatives.
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--mode", "single",
                                               "--save-patch", tmp_path / "p")),
                          "single", "--mode batch", "medit eval")


def test_bad_hparams_file(runner, one_case, gpt2_dir, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--hparams", missing)),
                          str(missing), "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [0.1\n")
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--hparams", broken)),
                          str(broken), "YAML")


def test_bad_resume_without_out(runner, one_case, gpt2_dir):
    result = invoke(runner, ["eval", "--method", "ft-l", "--model", gpt2_dir, "--dataset", one_case, "--resume"])
    assert_one_line_error(result, "--resume", "--out")


def test_bad_model_paths_and_dtype(runner, one_case, tmp_path, gpt2_dir):
    missing = tmp_path / "no-model"
    assert_one_line_error(invoke(runner, _edit(one_case, missing, tmp_path)), str(missing))
    assert_one_line_error(invoke(runner, _edit(one_case, tmp_path / "x.gguf", tmp_path)), "x.gguf")
    assert_one_line_error(invoke(runner, _edit(one_case, gpt2_dir, tmp_path, "--dtype", "float64")),
                          "'float64'", "float32")


def test_bad_list_kind(runner):
    assert_one_line_error(invoke(runner, ["list", "nope"]), "'nope'", "methods", "models")


def test_bad_patch_for_a_different_model_is_checked_by_fingerprint(runner, saved_patch, reseeded_gpt2):
    """The issue's "patch applied to a different model" case, named as such."""
    ok(saved_patch["result"])
    msg = assert_one_line_error(invoke(runner, ["apply", "--model", reseeded_gpt2, "--patch", saved_patch["patch"]]))
    assert "made for" in msg
