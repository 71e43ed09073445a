"""torchrun ranks (issue 30): sharded evaluation, data-parallel statistics, a MEMIT batch's target
vectors split over ranks, resume after a killed rank, and the refusals. Every multi-rank test
spawns its processes itself (gloo on CPU, one thread each) with the variables torchrun sets:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

COUNTERFACT = Path(__file__).resolve().parent / "data" / "counterfact-dev-300.json"
FAST = ["--set", "v_steps=6", "--set", "stats_samples=40", "--set", "stats_max_len=32",
        "--set", "context_templates=[[4, 2]]", "--no-score-cache"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(world: int | None, rank: int = 0, port: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if world is not None:  # what torchrun sets for each rank
        env.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def _medit(args: list[str], world: int | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """One process (or one rank of ``world`` that no other rank joins: it must stop before)."""
    return subprocess.run([sys.executable, "-m", "medit", *map(str, args)], capture_output=True, text=True,
                          env=_env(world, 1 if world else 0), cwd=cwd, timeout=300)


def _spawn(cmd: list[str], world: int, cwd: Path, **extra: str) -> list[subprocess.Popen[str]]:
    port = _port()
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                             env={**_env(world, r, port), **extra}) for r in range(world)]


def _ranks(args: list[str], world: int, cwd: Path) -> list[tuple[int, str, str]]:
    procs = _spawn([sys.executable, "-m", "medit", *map(str, args)], world, cwd)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        outs.append((p.returncode, out, err))
    for code, _, err in outs:
        assert code == 0, err[-3000:]
    return outs


def _cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metric_values(rec: dict) -> dict[str, float]:
    out = {}
    for metric, protos in rec["metrics"].items():
        for proto, stages in protos.items():
            for stage, value in stages.items():
                if isinstance(value, (int, float)):
                    out[f"{metric}.{proto}.{stage}"] = float(value)
    return out


def _same_cases(one: list[dict], many: list[dict]) -> None:
    assert [c["case_id"] for c in many] == [c["case_id"] for c in one]
    for a, b in zip(one, many):
        va, vb = _metric_values(a), _metric_values(b)
        assert va.keys() == vb.keys() and va
        for k in va:
            assert abs(va[k] - vb[k]) <= 1e-5, (a["case_id"], k, va[k], vb[k])


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_sharded_eval_equals_one_process(tmp_path, tiny_model_dirs, mode):
    method, extra = ("rome", []) if mode == "single" else ("memit", ["--batch-size", "2"])
    args = ["eval", "--method", method, "--model", tiny_model_dirs["gpt2"], "--dataset",
            f"counterfact:{COUNTERFACT}", "--n", "5", "--mode", mode, *extra, *FAST]
    one = _medit([*args, "--out", tmp_path / "one"], None, tmp_path)
    assert one.returncode == 0, one.stderr
    outs = _ranks([*args, "--out", tmp_path / "two"], 2, tmp_path)
    assert "reliability" in outs[0][1] and not outs[1][1].strip()  # rank 0 prints the table, rank 1 nothing
    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == ["cases.jsonl", "manifest.json", "summary.json"]
    _same_cases(_cases(tmp_path / "one" / "cases.jsonl"), _cases(two / "cases.jsonl"))
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1["n"] == s2["n"] == 5
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert "world_size" not in m1 and m2["world_size"] == 2
    for metric, protos in s1["metrics"].items():
        for proto, stages in protos.items():
            for stage in ("pre", "post"):
                if isinstance(stages.get(stage), float):
                    assert abs(stages[stage] - s2["metrics"][metric][proto][stage]) <= 1e-5


SHARED = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from medit.core import distributed
    from medit.model.loading import load_model
    from medit.toolkit.stats import second_moments
    from medit import api
    from medit.core.dataset import load_dataset
    model, corpus, cases, out = sys.argv[1:5]
    distributed.start("cpu")
    handle = load_model(model, device="cpu")
    with distributed.shared():
        moments, _ = second_moments(handle, [0, 1], corpus, 40, 32, progress=False)
        reqs, _ = load_dataset(cases, n=4)
        hp = api.get_method("memit").resolve_hparams(handle, None, {"v_steps": 6, "stats_samples": 40,
                                                                    "stats_max_len": 32, "context_templates": [[4, 2]]})
        before = {n: p.detach().clone() for n, p in handle.model.named_parameters()}
        edit = api.get_method("memit").apply(handle, reqs, hp)
        delta = {n: (p.detach() - before[n]) for n, p in handle.model.named_parameters()
                 if not torch.equal(p, before[n])}
        edit.revert()
    if distributed.rank() == 0:
        torch.save({"moments": moments, "delta": delta}, out)
    distributed.stop()
""")


def test_statistics_and_memit_batch_split_over_ranks(tmp_path, tiny_model_dirs):
    from medit.toolkit.stats import PACKAGED_CORPUS
    import torch
    model = str(tiny_model_dirs["gpt2"])
    corpus = str(Path(__file__).resolve().parents[1] / PACKAGED_CORPUS)
    cmd = [sys.executable, "-c", SHARED, model, corpus, f"counterfact:{COUNTERFACT}"]
    one = subprocess.run([*cmd, str(tmp_path / "one.pt")], capture_output=True, text=True, env=_env(None),
                         cwd=tmp_path, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    # a fresh cache: the two ranks must compute the statistics themselves, not read the first run's
    procs = _spawn([*cmd, str(tmp_path / "two.pt")], 2, tmp_path, MEDIT_CACHE=str(tmp_path / "cache2"))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["moments"].keys() == b["moments"].keys() == {0, 1}
    for layer in (0, 1):
        assert torch.allclose(a["moments"][layer], b["moments"][layer], atol=1e-5, rtol=0)
    assert a["delta"].keys() == b["delta"].keys() and a["delta"]
    for name in a["delta"]:
        assert (a["delta"][name] - b["delta"][name]).abs().max() <= 1e-4, name
    assert list((tmp_path / "cache2" / "stats").rglob("*.safetensors"))  # rank 0 wrote the entries


@pytest.mark.parametrize("resume_world", [1, 2], ids=["resumed-by-one-process", "resumed-by-two-ranks"])
def test_killed_rank_then_resume_has_every_case_once(tmp_path, tiny_model_dirs, resume_world):
    out = tmp_path / "run"
    args = ["eval", "--method", "rome", "--model", tiny_model_dirs["gpt2"], "--dataset",
            f"counterfact:{COUNTERFACT}", "--n", "12", "--out", out, *FAST]
    procs = _spawn([sys.executable, "-m", "medit", *map(str, args)], 2, tmp_path)
    rank1 = out / "cases.rank-1.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (rank1.is_file() and rank1.read_text().count("\n") >= 1):
        assert procs[1].poll() is None, procs[1].communicate()[1][-3000:]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)  # mid-run: one case written, five to go
    procs[1].wait()
    procs[0].kill()  # as torchrun ends the other ranks when one dies (rank 0 waits for rank 1)
    procs[0].wait()
    for p in procs:
        p.communicate()
    assert not (out / "summary.json").exists() and rank1.is_file()
    done = len(_cases(out / "cases.rank-0.jsonl")) + len(_cases(rank1))
    assert 1 <= done < 12
    # resume per rank (two ranks again) or under another world size (one process): the rest is
    # done once, the rank files merged
    if resume_world == 1:
        res = _medit([*args, "--resume"], None, tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        _ranks([*args, "--resume"], 2, tmp_path)
    ids = [c["case_id"] for c in _cases(out / "cases.jsonl")]
    assert len(ids) == len(set(ids)) == 12
    assert not list(out.glob("cases.rank-*.jsonl"))
    assert json.loads((out / "summary.json").read_text())["n"] == 12


@pytest.mark.parametrize("args,needle", [
    (["--mode", "sequential"], "sequential mode"),
    (["--mode", "batch"], "--batch-size"),
    (["--device-map", "auto"], "--device-map"),
])
def test_unsplittable_runs_are_refused_in_one_line(tmp_path, args, needle):
    out = tmp_path / "run"
    res = _medit(["eval", "--method", "rome", "--model", "gpt2", "--dataset", "counterfact:nowhere.json",
                  "--out", str(out), *args], 2, tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: WORLD_SIZE=2:"), res.stderr
    assert needle in lines[0] and "torchrun" in lines[0] and not out.exists()


def test_one_process_commands_are_refused_and_one_rank_runs_plainly(tmp_path):
    res = _medit(["apply", "--model", "gpt2", "--patch", "nowhere"], 2, tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("Error: WORLD_SIZE=2: medit apply runs in one process")
    for world in (None, 1):
        res = _medit(["version"], world, tmp_path)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr
