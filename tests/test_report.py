"""`medit report`: side-by-side comparison of hand-written run folders (no model involved)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medit.cli import app
from medit.errors import InputFileError, UnknownNameError
from medit.evaluation.report import build_report, load_run, load_runs, render, write_report

DATASET = {"path": "/data/counterfact/dev.json", "format": "counterfact", "fingerprint": "abcd", "n": 10,
           "offset": 0, "seed": None}


def make_run(root: Path, name: str, method: str, metrics: dict[str, Any], *, mode: str = "single",
             manifest: bool = True, efficiency: dict[str, Any] | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    summary = {"method": method, "model": "smollm2-135m", "mode": mode, "n": 10, "metrics": metrics,
               "efficiency": efficiency if efficiency is not None else
               {"edit_s_mean": 1.5, "edit_s_total": 15.0, "eval_s_total": 3.25, "stats_s": 0.0, "peak_rss_mb": 900.0}}
    (d / "summary.json").write_text(json.dumps(summary))
    if manifest:
        (d / "manifest.json").write_text(json.dumps({"method": method, "mode": mode, "dataset": DATASET,
                                                     "protocols": ["generate", "token_acc"]}))
    (d / "cases.jsonl").write_text("")
    return d


ROME = {"reliability": {"token_acc": {"pre": 0.1, "post": 1.0}, "generate": {"pre": 0.0, "post": 0.9}},
        "locality": {"agreement": {"pre": None, "post": 0.95}},
        "fluency": {"ngram_entropy": {"pre": 5.5, "post": 5.25}}}
FT = {"reliability": {"generate": {"pre": 0.0, "post": 0.4}, "token_acc": {"pre": 0.1, "post": 0.75}},
      "portability": {"token_acc": {"pre": 0.2, "post": 0.3}},
      "locality": {"agreement": {"pre": None, "post": 0.5}}}


@pytest.fixture()
def two_runs(tmp_path: Path) -> list[Path]:
    return [make_run(tmp_path, "run-rome", "rome", ROME), make_run(tmp_path, "run-ft", "ft-l", FT)]


def test_build_report_rows(two_runs):
    rep = build_report(load_runs(two_runs))
    assert [r["label"] for r in rep["runs"]] == ["rome", "ft-l"]
    assert rep["runs"][0]["dataset"]["format"] == "counterfact" and rep["runs"][0]["mode"] == "single"
    keys = [(r["metric"], r["protocol"]) for r in rep["rows"]]
    # metrics in the canonical order, generate before token_acc, union over runs
    assert keys == [("reliability", "generate"), ("reliability", "token_acc"), ("locality", "agreement"),
                    ("portability", "token_acc"), ("fluency", "ngram_entropy")]
    rel_gen = rep["rows"][0]
    assert rel_gen["pre"] == 0.0  # both runs measured the same unedited model
    assert rel_gen["values"] == {"rome": {"pre": 0.0, "post": 0.9}, "ft-l": {"pre": 0.0, "post": 0.4}}
    port = rep["rows"][3]
    assert set(port["values"]) == {"ft-l"}  # a metric only one run has
    assert rep["rows"][2]["pre"] is None  # agreement has no pre
    eff = {r["protocol"]: r["values"] for r in rep["efficiency"]}
    assert eff["edit_s_mean"] == {"rome": 1.5, "ft-l": 1.5} and "peak_rss_mb" in eff


def test_table_and_markdown(two_runs):
    rep = build_report(load_runs(two_runs))
    table = render(rep, "table")
    lines = table.splitlines()
    assert lines[0].startswith("rome: ") and "counterfact:/data/counterfact/dev.json" in lines[0]
    header = next(ln for ln in lines if ln.startswith("metric"))
    assert header.split() == ["metric", "protocol", "pre", "rome", "ft-l"]
    row = next(ln for ln in lines if ln.startswith("reliability") and "generate" in ln)
    assert row.split() == ["reliability", "generate", "0.000", "0.900", "0.400"]
    row = next(ln for ln in lines if ln.startswith("fluency"))
    assert row.split() == ["fluency", "ngram_entropy", "5.500", "5.250"]
    assert any(ln.startswith("efficiency") and "edit_s_mean" in ln for ln in lines)
    md = render(rep, "markdown")
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]
    assert rows[0] == ["metric", "protocol", "pre", "rome", "ft-l"]
    assert ["reliability", "generate", "0.000", "0.900", "0.400"] in rows
    assert "- rome: " in md


def test_different_pre_values_show_arrows(tmp_path):
    other = {"reliability": {"token_acc": {"pre": 0.3, "post": 0.8}}}
    runs = [make_run(tmp_path, "a", "rome", ROME), make_run(tmp_path, "b", "memit", other)]
    rep = build_report(load_runs(runs))
    row = next(r for r in rep["rows"] if r["protocol"] == "token_acc")
    assert row["pre"] is None
    line = next(ln for ln in render(rep).splitlines() if ln.startswith("reliability") and "token_acc" in ln)
    assert "0.100 → 1.000" in line and "0.300 → 0.800" in line


def test_extra_stages_get_their_own_rows(tmp_path):
    seq = {"reliability": {"generate": {"pre": 0.0, "post": 0.5, "immediate": 0.875}}}
    rep = build_report(load_runs([make_run(tmp_path, "s", "rome", seq, mode="sequential")]))
    assert [(r["protocol"], r["stage"]) for r in rep["rows"]] == [("generate", "post"), ("generate", "immediate")]
    assert rep["rows"][1]["values"]["rome"]["post"] == 0.875
    assert "generate (immediate)" in render(rep)


def test_labels_are_unique(tmp_path):
    runs = load_runs([make_run(tmp_path, "a", "rome", ROME, mode="single"),
                      make_run(tmp_path, "b", "rome", ROME, mode="sequential"),
                      make_run(tmp_path, "c", "ft-l", FT), make_run(tmp_path, "d", "ft-l", FT)])
    assert [r.label for r in runs] == ["rome (single)", "rome (sequential)", "ft-l (c)", "ft-l (d)"]
    same = load_runs([tmp_path / "a", tmp_path / "a"])
    assert [r.label for r in same] == ["rome (a) #1", "rome (a) #2"]


def test_run_without_manifest(tmp_path):
    run = load_run(make_run(tmp_path, "x", "rome", ROME, manifest=False))
    assert run.manifest == {} and run.info()["dataset"] is None
    assert "dataset unknown" in render(build_report([run]))


def test_write_report_files(two_runs, tmp_path):
    rep = build_report(load_runs(two_runs))
    files = write_report(rep, tmp_path / "out" / "cmp")
    assert [f.name for f in files] == ["report.md", "report.json", "report.png", "tradeoff.png"]
    assert json.loads((tmp_path / "out" / "cmp" / "report.json").read_text()) == rep
    png = (tmp_path / "out" / "cmp" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from PIL import Image
    with Image.open(tmp_path / "out" / "cmp" / "report.png") as im:
        assert im.size[0] >= 1600 and im.size[1] >= 900  # legible at 1600 px: fractions and entropy panels
    with Image.open(tmp_path / "out" / "cmp" / "tradeoff.png") as im:
        assert im.size == (1600, 1000)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputFileError, match="'.*nope' does not exist"):
        load_run(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputFileError, match="is a file, not a run folder"):
        load_run(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="'.*empty' is not a run folder.*summary.json"):
        load_run(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "cases.jsonl").write_text("{}\n")
    with pytest.raises(InputFileError, match="has no summary.json.*--resume"):
        load_run(unfinished)
    broken = make_run(tmp_path, "broken", "rome", ROME)
    (broken / "summary.json").write_text("{\"method\": ")
    with pytest.raises(InputFileError, match=r"summary\.json' is not valid JSON \(line 1"):
        load_run(broken)
    wrong = make_run(tmp_path, "wrong", "rome", ROME)
    (wrong / "summary.json").write_text("[1, 2]")
    with pytest.raises(InputFileError, match="no 'metrics' object"):
        load_run(wrong)
    with pytest.raises(UnknownNameError, match="report format 'html'"):
        render(build_report(load_runs([make_run(tmp_path, "ok", "rome", ROME)])), "html")


# ------------------------------------------------------------------------------ CLI

def _err(result: Any) -> str:
    try:
        return result.stderr or ""
    except ValueError:
        return ""


def test_cli_report(two_runs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", *map(str, two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "reliability" in result.output and "rome" in result.output and "ft-l" in result.output
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "report.png", "tradeoff.png"}
    result = runner.invoke(app, ["report", *map(str, two_runs), "--format", "json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["runs"][1]["label"] == "ft-l"
    result = runner.invoke(app, ["report", *map(str, two_runs), "--format", "markdown"])
    assert result.exit_code == 0 and "| metric" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["{tmp}/missing"], "does not exist"),
    (["{tmp}/empty"], "is not a run folder"),
    (["{run}", "--format", "html"], "unknown report format 'html'"),
])
def test_cli_report_bad_input(two_runs, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, run=two_runs[0]) for a in args]
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 2, result.output
    err = _err(result)
    stream = err if "Error:" in err else result.output
    assert "Traceback" not in result.output + err
    errors = [ln for ln in stream.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], stream


# ------------------------------------------------------------------------------ --misses

def _case(cid: str, rel: float, loc: float, edit: dict[str, Any]) -> str:
    return json.dumps({"case_id": cid, "request": {"prompt": f"prompt {cid}"}, "edit": edit,
                       "metrics": {"reliability": {"token_acc": {"pre": 0.0, "post": rel}},
                                   "locality": {"agreement": {"pre": None, "post": loc},
                                                "kl": {"pre": None, "post": 0.1}}}})


def test_misses_list_failed_cases_with_their_share_of_the_edit_info(tmp_path):
    from medit.evaluation.misses import case_misses, parse_checks, render_misses
    run_dir = make_run(tmp_path, "b", "memit", ROME, mode="batch")
    info = {"layers": [3, 4, 5], "realised": [0.9, 0.2, 0.7], "spread_passes": 2, "stats_s": 1.5}
    rows = [_case("a", 1.0, 1.0, {"index": 0, "size": 3, "info": info}),
            _case("b", 0.5, 1.0, {"index": 1, "size": 3}),   # a batch's later case: info comes from the first
            _case("c", 1.0, 0.0, {"index": 2, "size": 3})]
    (run_dir / "cases.jsonl").write_text("\n".join(rows) + "\n")
    run = load_runs([run_dir])[0]
    misses = case_misses(run, parse_checks(["reliability.token_acc", "locality.agreement"]))
    assert [m["case_id"] for m in misses] == ["b", "c"]
    assert misses[0]["scores"] == {"reliability.token_acc": 0.5, "locality.agreement": 1.0}
    assert misses[0]["edit"] == {"index": 1, "size": 3}
    # the per-request list gives this case's entry; "layers" (same length by chance) stays whole
    assert misses[0]["info"] == {"layers": [3, 4, 5], "realised": 0.2, "spread_passes": 2, "stats_s": 1.5}
    assert misses[1]["info"]["realised"] == 0.7
    # only reliability checked: case c no longer misses
    assert [m["case_id"] for m in case_misses(run, parse_checks(["reliability.token_acc"]))] == ["b"]
    text = render_misses([run], parse_checks(["reliability.token_acc", "locality.agreement"]))
    assert "2 of 3 cases miss" in text
    # what both rows share is said once, above the table; what differs is in each row
    assert "every one of them: layers=[3, 4, 5] spread_passes=2 stats_s=1.500" in text
    assert "realised=0.200" in text and "realised=0.700" in text
    assert json.loads(render_misses([run], parse_checks(["locality.agreement"]), "json"))["memit"][0]["case_id"] == "c"


def test_misses_cli_and_its_errors(tmp_path):
    run_dir = make_run(tmp_path, "s", "rome", ROME, mode="sequential")
    (run_dir / "cases.jsonl").write_text(_case("x", 0.0, 1.0, {"index": 0, "size": 1, "info": {"realised": [0.3]}})
                                         + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(run_dir), "--misses"])
    assert res.exit_code == 0, res.output
    assert "1 of 1 cases miss" in res.output and "realised=0.300" in res.output and "prompt x" in res.output
    for check, says in (("locality.kl", "not a hit score"), ("reliability", "not METRIC.PROTOCOL"),
                        ("portability.token_acc", "scored no case on portability.token_acc")):
        res = runner.invoke(app, ["report", str(run_dir), "--miss-on", check])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(app, ["report", str(run_dir), "--misses", "--out", str(tmp_path / "rep")])
    assert res.exit_code == 2 and "--out writes the comparison report" in res.output
    (run_dir / "cases.jsonl").unlink()
    res = runner.invoke(app, ["report", str(run_dir), "--misses"])
    assert res.exit_code == 2 and "has no cases.jsonl" in res.output


# ------------------------------------------------------------------------------ intervals, paired comparison

def _with_cases(root: Path, name: str, method: str, scores: list[float], dataset: dict[str, Any] | None = None,
                prompts: list[str] | None = None) -> Path:
    """A run folder whose cases.jsonl holds ``scores`` as reliability.token_acc, and a summary to match."""
    from medit.evaluation.summary import summarise
    recs = [{"case_id": str(i), "metrics": {"reliability": {"token_acc": {"pre": 0.0, "post": v}}},
             "efficiency": {}, "request": {"prompt": (prompts or [])[i] if prompts else f"p{i}", "target_new": "x"}}
            for i, v in enumerate(scores)]
    d = make_run(root, name, method, summarise(recs, method, "smollm2-135m", "single", 0.0)["metrics"])
    (d / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if dataset is not None:
        (d / "manifest.json").write_text(json.dumps({"method": method, "mode": "single", "dataset": dataset}))
    return d


def test_paired_comparison_of_a_run_with_itself_marks_nothing(tmp_path):
    a = _with_cases(tmp_path, "a", "rome", [1.0, 0.0, 1.0, 1.0, 0.5] * 4)
    rep = build_report(load_runs([a, a]))
    (d,) = rep["paired"]
    assert (d["n"], d["diff"], d["ci95"], d["significant"]) == (20, 0.0, [0.0, 0.0], False)
    assert rep["warnings"] == []
    text = render(rep)
    assert "Paired differences" in text and " *" not in text.split("95% interval")[-1]
    # the table shows each mean with its interval
    row = next(ln for ln in text.splitlines() if ln.startswith("reliability"))
    assert "0.700 ±0.200" in row


def test_paired_comparison_marks_a_real_difference_only(tmp_path):
    a = _with_cases(tmp_path, "a", "rome", [1.0] * 10 + [0.0] * 10)
    b = _with_cases(tmp_path, "b", "memit", [1.0] * 18 + [0.0] * 2)  # better on 8 of the same cases, worse on none
    c = _with_cases(tmp_path, "c", "ft-l", [0.0, 1.0] * 10)  # the same mean, other cases: no net difference
    rep = build_report(load_runs([a, b, c]))
    by_run = {d["run"]: d for d in rep["paired"]}
    assert by_run["memit"]["diff"] == pytest.approx(0.4) and by_run["memit"]["significant"]
    assert by_run["memit"]["ci95"][0] > 0
    assert by_run["ft-l"]["diff"] == pytest.approx(0.0) and not by_run["ft-l"]["significant"]
    line = next(ln for ln in render(rep).splitlines() if "memit - rome" in ln)
    assert "+0.400 *" in line


def test_cases_with_other_requests_are_not_paired_and_other_data_warns(tmp_path):
    other = dict(DATASET, offset=100)
    a = _with_cases(tmp_path, "a", "rome", [1.0] * 4)
    b = _with_cases(tmp_path, "b", "memit", [0.0] * 4, dataset=other, prompts=["p0", "p1", "q2", "q3"])
    rep = build_report(load_runs([a, b]))
    assert rep["paired"][0]["n"] == 2  # case ids 2 and 3 hold other requests
    assert any("different data" in w for w in rep["warnings"])
    assert "Warning: the runs were evaluated on different data" in render(rep)
    files = write_report(rep, tmp_path / "out")
    assert [f.name for f in files][-2:] == ["report.png", "tradeoff.png"]


def test_other_data_warning_names_n_from_older_manifests(tmp_path):
    """Manifests written before the dataset record carried ``n`` keep it at the top level."""
    runs = []
    for name, offset in (("a", 0), ("b", 100)):
        d = make_run(tmp_path, name, "rome", ROME)
        ds = {k: v for k, v in DATASET.items() if k != "n"}
        (d / "manifest.json").write_text(json.dumps({"method": "rome", "mode": "single", "n": 10,
                                                     "dataset": dict(ds, offset=offset)}))
        runs.append(d)
    (warning,) = build_report(load_runs(runs))["warnings"]
    assert "offset 100 n 10" in warning and "None" not in warning


def test_efficiency_not_measured_reads_as_not_measured(tmp_path):
    """A run evaluated without the ``efficiency`` metric has no edit or setup times: its summary
    holds None for them (not 0) and the report shows them as missing."""
    from medit.evaluation.summary import summarise

    records = [{"case_id": str(i), "metrics": {"reliability": {"token_acc": {"pre": 0.0, "post": 1.0}}},
                "efficiency": {}} for i in range(3)]
    eff = summarise(records, "rome", "m", "single", 2.0)["efficiency"]
    assert eff["edit_s_mean"] is None and eff["edit_s_total"] is None and eff["stats_s"] is None
    timed = [{**r, "efficiency": {"edit_s": 0.5, "stats_s": 0.0 if i else 1.25}} for i, r in enumerate(records)]
    eff = summarise(timed, "rome", "m", "single", 2.0)["efficiency"]
    assert eff["edit_s_total"] == 1.5 and eff["stats_s"] == 1.25 and eff["template_s"] == 0.0  # timed, none made
    run = make_run(tmp_path, "untimed", "rome", ROME,
                   efficiency={"edit_s_mean": None, "edit_s_total": None, "eval_s_total": 3.0, "peak_rss_mb": 9.0})
    line = next(ln for ln in render(build_report(load_runs([run]))).splitlines() if "edit_s_total" in ln)
    assert line.split()[-1] == "-"


def test_answer_protocol_is_shown_first(tmp_path):
    """``answer`` (would a user see the new fact) leads each metric's rows, whatever order the
    summary holds the protocols in."""
    metrics = {"reliability": {"token_acc": {"pre": 0.1, "post": 1.0}, "generate": {"pre": 0.0, "post": 0.9},
                               "answer": {"pre": 0.0, "post": 0.8}},
               "locality": {"agreement": {"pre": None, "post": 0.95}, "answer_agreement": {"pre": None, "post": 0.9}}}
    rows = build_report(load_runs([make_run(tmp_path, "chat", "rome", metrics)]))["rows"]
    order = [(r["metric"], r["protocol"]) for r in rows if r["stage"] == "post"]
    assert order[0] == ("reliability", "answer")
    assert [p for m, p in order if m == "reliability"] == ["answer", "generate", "token_acc"]
    table = render(build_report(load_runs([tmp_path / "chat"])))
    assert table.index("answer") < table.index("generate")
