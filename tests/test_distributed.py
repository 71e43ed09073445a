"""Launches under torchrun (issue 30): medit does not yet shard work across ranks, so a launch as
one of several ranks is refused with one line before anything is loaded or written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _medit(args: list[str], world: str | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if world is not None:  # what torchrun sets for each rank
        env.update(WORLD_SIZE=world, RANK="1", LOCAL_RANK="1")
    return subprocess.run([sys.executable, "-m", "medit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("mode", ["sequential", "single", "batch"])
def test_several_ranks_are_refused_in_one_line(tmp_path, mode):
    out = tmp_path / "run"
    res = _medit(["eval", "--method", "rome", "--model", "gpt2", "--dataset", "counterfact:nowhere.json",
                  "--mode", mode, "--out", str(out)], "2", tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: WORLD_SIZE=2:"), res.stderr
    assert "torchrun" in lines[0] and not out.exists()


def test_one_rank_runs_as_a_plain_launch(tmp_path):
    for world in (None, "1"):
        res = _medit(["version"], world, tmp_path)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr
