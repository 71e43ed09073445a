"""Progress lines for non-terminal runs (log files): periodic, with rate and ETA; silent when short."""
from __future__ import annotations

from medit.core import progress
from medit.core.progress import LineProgress, progress_bar


def test_line_progress_prints_rate_and_eta(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = LineProgress(total=10, desc="rome sequential editing", unit="case", every=15.0)
    bar.set_postfix(loss="0.5")
    bar.update(2)   # t=10: under the interval, silent
    bar.update(2)   # t=20: 4 cases in 20 s
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rome sequential editing: 4/10 case (0.2 case/s, elapsed 0:20, ETA 0:30, loss=0.5)"]


def test_non_terminal_gets_lines_and_env_turns_them_off(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setenv(progress.ENV, "5")
    assert isinstance(progress_bar(3, "x"), LineProgress)
    monkeypatch.setenv(progress.ENV, "0")
    assert not isinstance(progress_bar(3, "x"), LineProgress)
    monkeypatch.setenv(progress.ENV, "5")
    assert not isinstance(progress_bar(3, "x", enabled=False), LineProgress)


def test_only_rank_zero_reports_progress(monkeypatch):
    """Under torchrun every rank runs the same loops; one progress report per launch (rank 0)."""
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setenv(progress.ENV, "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    bar = progress_bar(3, "x")
    assert not isinstance(bar, LineProgress) and bar.disable
    monkeypatch.setenv("RANK", "0")
    assert isinstance(progress_bar(3, "x"), LineProgress)
