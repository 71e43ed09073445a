"""Bad input loses nothing and executes nothing: each case exits with code 2 and exactly one
``Error:`` line, prints no traceback, and leaves every file that existed before byte for byte as it
was (hashed before and after). Then property-based fuzzing (hypothesis) of the dataset readers, the
YAML / ``--set`` parser and the patch loader: truncations, byte flips and wrong types end in a
medit error, never in another exception.

Guards that need a model-sized refusal live beside their feature: a checkpoint with a planted
pickle (``test_learned.py``), a model too big for memory and a 5 MB prompt (``test_guards.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from medit.cli import options as cli_options
from medit.cli import app
from medit.errors import MeditError

from test_cli import CASE_A, CASE_B, FAST_FT, assert_one_line_error, write_jsonl

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ------------------------------------------------------------------------------ helpers

def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under ``root``."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="medit")


@pytest.fixture
def guard(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``guard(args, *needles)``: the command is refused with one ``Error:`` line naming the
    needles, and nothing under ``tmp_path`` changed, nor (for tests using ``made``) the finished
    run, its patch and its data. Returns the message."""
    roots = [tmp_path]
    if "made" in request.fixturenames:
        roots.append(request.getfixturevalue("made")["data"].parent)

    def check(args: list[Any], *needles: str) -> str:
        before = [tree(r) for r in roots]
        msg = assert_one_line_error(run_cli(*args), *needles)
        assert [tree(r) for r in roots] == before, "a refused command changed files"
        return msg
    yield check


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as loading a model."""
    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(cli_options, "load", refuse)


@pytest.fixture(scope="module")
def made(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished `medit edit` run with its patch, on the tiny GPT-2."""
    root = tmp_path_factory.mktemp("made")
    data = write_jsonl(root / "two.jsonl", CASE_A, CASE_B)
    out, patch = root / "run", root / "patch"
    result = run_cli("edit", data, "--method", "ft-l", "--model", tiny_model_dirs["gpt2"], "--out", out,
                     "--save-patch", patch, "--protocol", "exact", *FAST_FT)
    assert result.exit_code == 0, result.output
    return {"data": data, "run": out, "patch": patch, "model": tiny_model_dirs["gpt2"]}


@pytest.fixture(scope="module")
def gpt2(made: dict[str, Path]) -> Any:
    """A private handle on the tiny GPT-2 (the shared ``tiny_handle`` one is left to other modules)."""
    from medit.model.loading import load_model
    return load_model(str(made["model"]), device="cpu")


def _edit(made: dict[str, Path], *extra: Any) -> list[Any]:
    return ["edit", made["data"], "--method", "ft-l", "--model", made["model"], "--protocol", "exact",
            *FAST_FT, *extra]


def _eval(made: dict[str, Path], *extra: Any) -> list[Any]:
    return ["eval", "--method", "ft-l", "--model", made["model"], "--dataset", made["data"],
            "--protocol", "exact", *FAST_FT, *extra]


def _fake_run(folder: Path) -> Path:
    """A folder of earlier results, as a user's runs/ holds them."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"medit_version": "0.1.0", "method": "rome"}))
    (folder / "cases.jsonl").write_text('{"case_id": "0"}\n')
    (folder / "summary.json").write_text('{"n": 1}\n')
    return folder


# ------------------------------------------------------------------------------ writes never destroy

def test_save_patch_onto_a_folder_of_earlier_runs(made, tmp_path, guard, no_model):
    runs = tmp_path / "runs"
    _fake_run(runs / "20260101-edit-rome")
    guard(_edit(made, "--out", tmp_path / "new", "--save-patch", runs), str(runs), "not a medit patch")
    assert not (tmp_path / "new").exists()


def test_save_patch_onto_its_own_run_folder(made, tmp_path, guard, no_model):
    out = tmp_path / "X"
    guard(_edit(made, "--out", out, "--save-patch", out), "would replace the run folder")
    guard(_edit(made, "--out", out / "inner", "--save-patch", out), "would replace the run folder")
    guard(_edit(made, "--out", out, "--save-patch", out / "summary.json"), "summary.json")
    assert not out.exists()


def test_save_patch_onto_a_folder_of_user_files(made, tmp_path, guard, no_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    guard(_edit(made, "--out", tmp_path / "r", "--save-patch", mine), "not a medit patch", "thesis.tex")
    guard(_edit(made, "--out", tmp_path / "r", "--save-patch", mine, "--force"), "not a medit patch")
    (tmp_path / "file.bin").write_bytes(b"\x00")
    guard(_edit(made, "--out", tmp_path / "r", "--save-patch", tmp_path / "file.bin"), "existing file")


def test_an_existing_patch_is_replaced_only_with_force(made, tmp_path, guard):
    patch = tmp_path / "p"
    shutil.copytree(made["patch"], patch)
    guard(_edit(made, "--out", tmp_path / "r1", "--save-patch", patch), "already holds a medit patch", "--force")
    old = json.loads((patch / "manifest.json").read_text())
    result = run_cli(*_edit(made, "--out", tmp_path / "r2", "--save-patch", patch, "--force"))
    assert result.exit_code == 0, result.output
    new = json.loads((patch / "manifest.json").read_text())
    assert sorted(p.name for p in patch.iterdir()) == ["manifest.json", "tensors.safetensors"]
    assert new["files"] != old["files"] or new["created"] >= old["created"]
    assert not [p for p in tmp_path.iterdir() if ".medit-" in p.name], "temporary folders left behind"
    (patch / "notes.txt").write_text("mine")  # a patch folder holding a user file is no longer medit's
    guard(_edit(made, "--out", tmp_path / "r3", "--save-patch", patch, "--force"), "not a medit patch")


def test_force_without_save_patch_is_refused(made, tmp_path, guard, no_model):
    guard(_edit(made, "--out", tmp_path / "r", "--force"), "--force", "--save-patch")


def test_leftovers_of_a_killed_save_are_removed_not_carried_over(made, tmp_path):
    patch = tmp_path / "p"
    stale = tmp_path / ".p.medit-tmp-dead"  # what a kill during the write leaves
    stale.mkdir()
    (stale / "manifest.json").write_text(json.dumps({"format": "medit-patch", "stale": True}))
    legacy = tmp_path / "p.tmp"  # what an older medit left (and then reused)
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"format": "medit-patch", "stale": True}))
    result = run_cli(*_edit(made, "--out", tmp_path / "r", "--save-patch", patch))
    assert result.exit_code == 0, result.output
    assert "stale" not in json.loads((patch / "manifest.json").read_text())
    assert not stale.exists() and not legacy.exists()


def test_out_refuses_files_fragments_and_foreign_folders(made, tmp_path, guard, no_model):
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    guard(_eval(made, "--out", afile), "existing file", "new or empty folder")
    only_summary = tmp_path / "s"
    only_summary.mkdir()
    (only_summary / "summary.json").write_text('{"n": 3}')
    guard(_eval(made, "--out", only_summary), "already holds results", "summary.json")
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2")
    guard(_eval(made, "--out", foreign), "did not write", "data.csv")
    torn = tmp_path / "t"
    shutil.copytree(made["run"], torn)
    (torn / "summary.json").unlink()
    (torn / "cases.jsonl").write_text('{"case_id": "a", "metr')  # only a fragment: still results
    guard(_eval(made, "--out", torn), "already holds results", "--resume")


def test_a_torn_run_resumes_onto_a_clean_file(made, tmp_path):
    """The fragment a crash left is dropped before the next case is appended, never glued to it."""
    torn = tmp_path / "t"
    shutil.copytree(made["run"], torn)
    (torn / "summary.json").unlink()
    first = (torn / "cases.jsonl").read_text().splitlines()[0]
    (torn / "cases.jsonl").write_text(first + "\n" + '{"case_id": "b", "metr')
    manifest = json.loads((torn / "manifest.json").read_text())
    args = ["eval", "--method", "ft-l", "--model", made["model"], "--dataset", made["data"],
            "--protocol", "exact", *FAST_FT, "--mode", manifest["mode"], "--out", torn, "--resume"]
    if manifest.get("batch_size"):
        args += ["--batch-size", manifest["batch_size"]]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    lines = (torn / "cases.jsonl").read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == ["a", "b"]
    assert lines[0] == first


def test_a_damaged_middle_line_is_reported_not_dropped(made, tmp_path, guard):
    run = tmp_path / "m"
    shutil.copytree(made["run"], run)
    (run / "summary.json").unlink()
    good = (run / "cases.jsonl").read_text().splitlines()
    (run / "cases.jsonl").write_text("{garbage\n" + "\n".join(good) + "\n")
    manifest = json.loads((run / "manifest.json").read_text())
    guard(_eval(made, "--out", run, "--resume", "--mode", manifest["mode"]), "line 1", "damaged")


def test_resume_on_a_finished_run_changes_nothing(made, tmp_path, guard, no_model):
    run = tmp_path / "done"
    shutil.copytree(made["run"], run)
    guard(_eval(made, "--out", run, "--resume"), "finished", "nothing to resume")


@pytest.mark.parametrize("args, needles", [
    (["--gen-tokens", "-3"], ("--gen-tokens", "-3")),
    (["--n", "0"], ("--n", "0")),
    (["--offset", "-1"], ("--offset", "-1")),
    (["--batch-size", "-2", "--mode", "batch"], ("batch size", "-2")),
    (["--score-batch-size", "0"], ("score batch size", "0")),
    (["--set", "nosuch=1"], ("nosuch",)),
    (["--set", "steps=abc"], ("steps", "abc")),
    (["--hparams", "missing.yaml"], ("missing.yaml",)),
    (["--mode", "bogus"], ("bogus",)),
    (["--protocol", "vibes"], ("vibes",)),
    (["--metrics", "nosuch"], ("nosuch",)),
])
def test_options_are_checked_before_the_model_loads(made, tmp_path, guard, no_model, args, needles):
    guard(_eval(made, "--out", tmp_path / "r", *args), *needles)


def test_edit_options_are_checked_before_the_model_loads(made, tmp_path, guard, no_model):
    guard(_edit(made, "--out", tmp_path / "r", "--gen-tokens", "0"), "--gen-tokens")
    guard(_edit(made, "--out", tmp_path / "r", "--mode", "single"), "single")
    guard(_edit(made, "--out", tmp_path / "r", "--set", "lr=abc"), "lr", "abc")


def test_a_missing_statistics_corpus_is_reported_before_the_model_loads(made, tmp_path, guard, no_model):
    args = ["eval", "--method", "rome", "--model", made["model"], "--dataset", made["data"], "--out",
            tmp_path / "r", "--stats-corpus", tmp_path / "missing.txt"]
    guard(args, "missing.txt", "does not exist")
    assert not (tmp_path / "r").exists()


def test_corpus_out_never_replaces_a_file_unasked(made, tmp_path, guard, no_model):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    guard(["corpus", "--facts", made["data"], "--out", mine], "notes.txt", "--force")
    guard(["corpus", "--facts", made["data"], "--out", tmp_path], "is a folder")
    result = run_cli("corpus", "--facts", made["data"], "--out", mine, "--force")
    assert result.exit_code == 0, result.output
    assert mine.read_text() != "my notes\n"


def test_report_out_never_replaces_files_it_did_not_write(made, tmp_path, guard):
    mine = tmp_path / "paper"
    mine.mkdir()
    (mine / "report.md").write_text("# my own report\n")
    guard(["report", made["run"], "--out", mine], "report.md", "--force")
    assert run_cli("report", made["run"], "--out", tmp_path / "new").exit_code == 0
    again = run_cli("report", made["run"], "--out", tmp_path / "new")  # an earlier medit report: rewritten
    assert again.exit_code == 0, again.output
    assert run_cli("report", made["run"], "--out", mine, "--force").exit_code == 0
    assert (mine / "report.md").read_text() != "# my own report\n"
    assert not [p for p in (tmp_path / "new").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_usage_errors_are_one_line(guard):
    guard(["edit", "x.jsonl", "--method", "ft-l"], "--model")
    guard(["eval", "--method", "ft-l", "--model", "m", "--dataset", "d", "--n", "many"], "--n", "many")
    guard(["nosuch"], "nosuch")


def test_train_out_holding_user_files_is_refused(made, tmp_path, guard, no_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "editor.safetensors").write_bytes(b"my own weights")
    guard(["train", "--method", "mend", "--model", made["model"], "--data", made["data"], "--out", mine],
          str(mine), "not an empty folder")
    guard(["train", "--method", "mend", "--model", made["model"], "--data", made["data"], "--out",
           tmp_path / "new", "--max-minutes", "0"], "--max-minutes")


def test_offline_load_error_names_the_aliases_installed_here(guard):
    from medit.model.loading import offline_aliases
    msg = guard(["apply", "--model", "gpt2-xl", "--patch", "nowhere"], "nowhere")  # the patch first
    msg = guard(["stats", "--model", "gpt2-xl", "--layers", "1", "--corpus", "c.txt"], "gpt2-xl", "--random-init")
    for name in offline_aliases():
        assert name in msg


def test_bare_medit_prints_help_and_succeeds():
    result = run_cli()
    assert result.exit_code == 0
    assert "Usage: medit" in result.output and "edit" in result.output


def test_help_shows_real_metavars():
    text = run_cli("edit", "--help").output
    assert "medit edit [OPTIONS] FILE" in " ".join(text.split())
    assert "KEY=VALUE" in text and "<str>" not in text and "<list" not in text


# ------------------------------------------------------------------------------ patches are verified

def _damage(patch: Path, how: str) -> None:
    tensors, manifest = patch / "tensors.safetensors", patch / "manifest.json"
    if how == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif how == "flipped tensors":
        raw = bytearray(tensors.read_bytes())
        raw[-5] ^= 0x40
        tensors.write_bytes(bytes(raw))
    elif how == "missing tensors":
        tensors.unlink()
    elif how == "truncated manifest":
        manifest.write_text(manifest.read_text()[:200])
    elif how == "binary manifest":
        manifest.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "nan tensors":  # a consistent file (checksum updated) whose values are NaN
        from safetensors.torch import load_file, save_file
        data = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(tensors)).items()}
        save_file(data, str(tensors))
        m = json.loads(manifest.read_text())
        m["files"]["tensors.safetensors"] = {"sha256": hashlib.sha256(tensors.read_bytes()).hexdigest(),
                                             "bytes": tensors.stat().st_size}
        manifest.write_text(json.dumps(m))
    elif how == "wrong types":
        m = json.loads(manifest.read_text())
        m["requests"], m["hparams"] = "everything", [1, 2]
        manifest.write_text(json.dumps(m))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how, needles", [
    ("truncated tensors", ("tensors.safetensors", "damaged")),
    ("flipped tensors", ("tensors.safetensors", "damaged")),
    ("missing tensors", ("tensors.safetensors", "missing")),
    ("truncated manifest", ("manifest.json", "truncated")),
    ("binary manifest", ("manifest.json", "unreadable")),
    ("nan tensors", ("tensors.safetensors", "non-finite")),
    ("wrong types", ("manifest.json",)),
])
def test_a_damaged_patch_is_refused_before_the_model_loads(made, tmp_path, guard, no_model, how, needles):
    patch = tmp_path / "p"
    shutil.copytree(made["patch"], patch)
    _damage(patch, how)
    guard(["apply", "--model", made["model"], "--patch", patch], *needles)


def test_patch_and_run_files_follow_the_umask(made):
    # the module fixture ran under the default umask of the test process
    mask = os.umask(0o022)
    os.umask(mask)
    for p in [*made["patch"].iterdir(), *made["run"].iterdir()]:
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    assert stat.S_IMODE(made["patch"].stat().st_mode) == 0o777 & ~mask


# ------------------------------------------------------------------------------ honest efficiency

def test_edit_seconds_exclude_one_time_setup(gpt2):
    """A method that spends 0.3 s on statistics and 0.05 s editing reports edit_s ~0.05 and the
    statistics in stats_s."""
    from medit.api import run
    from medit.core.edit import Edit
    from medit.core.hparams import HParams
    from medit.core.method import Method
    from medit.core.requests import EditRequest
    from medit.core.timing import setup_phase

    class SlowSetup(Method):
        name = "slow-setup"
        modes = ("single",)

        def apply(self, handle: Any, requests: Any, hparams: Any) -> Edit:
            with setup_phase("stats"):
                time.sleep(0.3)
            with setup_phase("templates"):
                time.sleep(0.1)
            time.sleep(0.05)
            return Edit(handle, self.name, requests, {})

    req = EditRequest.from_dict(CASE_B, where="test")
    summary, _ = run(gpt2, SlowSetup(), [req], hparams=HParams(), protocols=("exact",),
                     progress=False)
    eff = summary["cases"][0]["efficiency"]
    assert 0.04 <= eff["edit_s"] < 0.2, eff
    assert eff["stats_s"] >= 0.29 and eff["template_s"] >= 0.09, eff
    assert summary["efficiency"]["stats_s"] >= 0.29 and summary["efficiency"]["template_s"] >= 0.09


# ------------------------------------------------------------------------------ fuzzing

def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "keep"]))
    if not raw or how == "keep":
        return raw
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        return raw[:at]
    if how == "flip":
        buf = bytearray(raw)
        buf[at] ^= data.draw(st.integers(1, 255))
        return bytes(buf)
    return raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at:]


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)


def _wrong_type(record: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    key = data.draw(st.sampled_from(sorted(record)))
    return {**record, key: data.draw(JSON_VALUES)}


CF_RECORD = {"case_id": 1, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
             "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
             "locality_prompt": "The capital of France is", "locality_ground_truth": "Paris"}
ZSRE_RECORD = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
               "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
               "rephrase": "What university did Watts Humphrey take part in?", "loc": "nq question: who sings",
               "loc_ans": "Tennessee Ernie Ford"}


@FUZZ
@given(data=st.data())
def test_fuzz_dataset_readers(tmp_path, data):
    from medit.core.dataset import load_dataset

    fmt, rec = data.draw(st.sampled_from([("", CASE_A), ("medit-jsonl:", CASE_B), ("counterfact:", CF_RECORD),
                                          ("zsre:", ZSRE_RECORD), ("", CF_RECORD)]))
    if data.draw(st.booleans()):
        rec = _wrong_type(rec, data)
    as_list = data.draw(st.booleans())
    text = json.dumps([rec, rec]) if as_list else json.dumps(rec) + "\n" + json.dumps(rec) + "\n"
    path = tmp_path / ("d.json" if as_list else "d.jsonl")
    path.write_bytes(_mutate(text.encode(), data))
    n = data.draw(st.sampled_from([None, 1]))
    try:
        load_dataset(f"{fmt}{path}", n=n)
    except MeditError:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_hparams_yaml_and_set(tmp_path, data):
    from medit.core.hparams import parse_sets, read_yaml
    from medit.plugin.manager import get_plugins

    method = get_plugins().methods.get(data.draw(st.sampled_from(["rome", "ft-l", "grace", "kn"])))
    base = b"layers: [1]\nlr: 0.5\nsteps: 3\nv_lr: 0.1\n"
    text = data.draw(st.one_of(st.just(base), st.binary(max_size=40),
                               st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))))
    path = tmp_path / "h.yaml"
    path.write_bytes(_mutate(text, data))
    sets = data.draw(st.lists(st.text(max_size=12), max_size=3))
    try:
        overrides = parse_sets(sets)
        method.precheck_hparams(path, overrides)
        method.hparams_class.from_dict({**read_yaml(path), **overrides})
    except MeditError:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_patch_loader(made, gpt2, tmp_path, data):
    from medit.core.edit import apply_patch
    from medit.core.patchfile import read_patch

    patch = Path(tempfile.mkdtemp(dir=tmp_path)) / "p"
    shutil.copytree(made["patch"], patch)
    target = patch / data.draw(st.sampled_from(["manifest.json", "tensors.safetensors"]))
    if target.name == "manifest.json" and data.draw(st.booleans()):
        target.write_text(json.dumps(_wrong_type(json.loads(target.read_text()), data)))
    else:
        target.write_bytes(_mutate(target.read_bytes(), data))
    before = {k: v.clone() for k, v in gpt2.model.state_dict().items()}
    try:
        manifest, tensors = read_patch(patch)
        edit = apply_patch(gpt2, manifest, tensors, where=str(patch))
        edit.revert()
    except MeditError:
        pass
    after = gpt2.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "a refused or reverted patch changed weights"
