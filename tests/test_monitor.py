"""The health monitor of sequential runs (``--monitor-every``, ``--stop-on-collapse``) on tiny
random models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medit import api
from medit.cli import app
from medit.errors import MeditError
from medit.evaluation.engine import EvalConfig
from medit.evaluation.monitor import MONITOR_FILE, RunCollapsed, read_monitor

COUNTERFACT = Path(__file__).resolve().parent / "data" / "counterfact-dev-300.json"
ROW_FIELDS = {"edits", "norm_growth_max", "norm_growth_mean", "probe_locality", "retained_reliability", "perplexity"}


def _run(handle: Any, out: Path, **cfg: Any) -> dict[str, Any]:
    summary, _ = api.run(handle, "ultraedit", f"counterfact:{COUNTERFACT}", n=5, mode="sequential",
                         protocols=("token_acc",), metrics=("reliability", "locality"), out_dir=out,
                         progress=False, score_cache=False, overrides={"lr": "0.01"}, **cfg)
    return summary


def test_monitor_writes_a_row_every_n_edits_and_after_the_last(tiny_handle, tmp_path):
    _run(tiny_handle("llama"), tmp_path / "run", monitor_every=2)
    rows = read_monitor(tmp_path / "run")
    assert [r["edits"] for r in rows] == [0, 2, 4, 5]
    assert all(ROW_FIELDS <= set(r) for r in rows)
    first, last = rows[0], rows[-1]
    assert first["norm_growth_max"] == 1.0 and first["probe_locality"] == 1.0 and first["retained_reliability"] is None
    assert last["norm_growth_max"] != 1.0  # the edited weights moved
    assert last["retained_sample"] == 5 and 0 <= last["retained_reliability"] <= 1
    assert last["perplexity"] > 1


def test_stop_on_collapse_stops_a_run_whose_probes_fail(tiny_handle, tmp_path):
    """A step 10⁴ times the default wrecks the tiny model, so probe locality falls below 0.99."""
    handle = tiny_handle("llama")
    with pytest.raises(RunCollapsed, match=r"stopped after \d+ edits: .* fell below the collapse threshold 0.99"):
        api.run(handle, "ultraedit", f"counterfact:{COUNTERFACT}", n=5, mode="sequential", protocols=("token_acc",),
                metrics=("reliability", "locality"), out_dir=tmp_path / "run", progress=False, score_cache=False,
                overrides={"lr": "100"}, monitor_every=1, stop_on_collapse=True, collapse_threshold=0.99)
    rows = read_monitor(tmp_path / "run")
    assert rows[-1]["probe_locality"] < 0.99 or rows[-1]["retained_reliability"] < 0.99
    # the cases edited before the stop are scored, and the summary says the run stopped
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stopped = summary["stopped"]
    assert "fell below the collapse threshold" in stopped["reason"] and stopped["cases"] == 5
    assert stopped["cases_scored"] == rows[-1]["edits"] < 5
    cases = (tmp_path / "run" / "cases.jsonl").read_text().splitlines()
    assert len(cases) == stopped["cases_scored"]
    from medit.evaluation.report import build_report, load_runs
    report = build_report(load_runs([tmp_path / "run"]))
    assert report["monitor"]


def test_cli_stop_on_collapse_is_one_error_line(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--method", "ultraedit", "--model", str(tiny_model_dirs["llama"]),
                                      "--dataset", f"counterfact:{COUNTERFACT}", "--n", "4", "--mode", "sequential",
                                      "--protocol", "token_acc", "--metrics", "reliability,locality",
                                      "--set", "lr=100", "--monitor-every", "1", "--stop-on-collapse",
                                      "--collapse-threshold", "0.99", "--out", str(out), "--no-score-cache"])
    assert result.exit_code == 2, result.output
    assert "Error: sequential run stopped after" in result.output and "Traceback" not in result.output
    assert (out / MONITOR_FILE).is_file()
    json.loads((out / MONITOR_FILE).read_text().splitlines()[0])


@pytest.mark.parametrize("cfg, words", [
    ({"mode": "batch", "monitor_every": 5}, "--monitor-every 5 tracks a sequential run"),
    ({"mode": "sequential", "stop_on_collapse": True}, "--stop-on-collapse needs the health monitor"),
    ({"mode": "sequential", "monitor_every": -1}, "--monitor-every -1 must be at least 1"),
    ({"mode": "sequential", "monitor_every": 5, "collapse_threshold": 2.0}, "collapse threshold 2.0"),
])
def test_bad_monitor_settings_are_one_line_errors(cfg, words):
    with pytest.raises(MeditError, match=words.replace("-", "-")):
        EvalConfig(**cfg)


def test_report_plots_the_monitor_curve(tiny_handle, tmp_path):
    from medit.evaluation.report import build_report, load_runs, write_report
    _run(tiny_handle("gpt2"), tmp_path / "run", monitor_every=2)
    report = build_report(load_runs([tmp_path / "run"]))
    assert [r["edits"] for r in next(iter(report["monitor"].values()))] == [0, 2, 4, 5]
    files = write_report(report, tmp_path / "report")
    assert (tmp_path / "report" / "monitor.png") in files and (tmp_path / "report" / "monitor.png").stat().st_size > 0
