"""torchrun scaling benchmark (issue 30): the same evaluation and the same MEMIT batch at world
size 1 and 2, gloo on CPU with one thread per rank (nccl on CUDA when the machine has GPUs).

    flock /tmp/medit-cpu.lock .venv/bin/python bench/distributed.py            # eval + MEMIT batch
    .venv/bin/python bench/distributed.py --worlds 1,2,4 --skip-batch

Eval: ``torchrun --nproc-per-node W -m medit -- eval --method rome --mode single`` on the first
``--n`` cases of CounterFact dev (``../shared/data/counterfact/dev.json``), into
``<root>/eval-w<W>/``. Two times are recorded:

* ``eval_s``: the summary's evaluation time on rank 0, from its first pre-edit score to the moment
  every rank's rows are gathered (so it waits for the slowest rank): editing and scoring, the work
  that is split. Throughput = cases / eval_s.
* ``wall_s``: the whole launch, including what every process does once for itself (start-up,
  model load, context templates, reading the cached statistics), which does not shrink with ranks.

MEMIT batch: one batch of the first ``--batch-n`` cases applied by every rank together
(:func:`medit.core.distributed.shared`): each rank optimises its share of the target vectors, the
vectors are gathered and every rank solves the same least squares. ``apply_s`` is rank 0's
``method.apply`` time after statistics and templates are warm (computed before the clock starts).

Writes ``bench/results/distributed.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "dev.json"


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _torchrun(world: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-addr", "127.0.0.1", "--master-port", str(port)]


def eval_run(args: argparse.Namespace, world: int) -> dict:
    run = Path(args.root) / f"eval-w{world}"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    cmd = [*_torchrun(world, 29500 + world), "-m", "medit", "--", "eval", "--method", "rome", "--model", args.model,
           "--dataset", args.dataset, "--n", str(args.n), "--mode", "single", "--no-score-cache",
           "--out", str(run)]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=_env(1), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    rel = ((summary.get("metrics") or {}).get("reliability") or {}).get("token_acc") or {}
    eval_s = (summary.get("efficiency") or {}).get("eval_s_total")
    return {"world": world, "rc": rc, "cases": summary.get("n"), "eval_s": eval_s,
            "wall_s": round(wall, 1), "reliability_token_acc": rel.get("post"), "run_dir": str(run)}


def batch_worker(args: argparse.Namespace) -> None:
    """One rank of the MEMIT batch (run by torchrun)."""
    import torch
    torch.set_num_threads(1)
    from medit import api
    from medit.core import distributed
    from medit.core.dataset import load_dataset
    from medit.model.loading import load_model

    device = distributed.start(None)
    handle = load_model(args.model, device=device)
    reqs, _ = load_dataset(args.dataset, n=args.batch_n)
    method = api.get_method("memit")
    hp = method.resolve_hparams(handle)
    with distributed.shared():
        warm = method.apply(handle, reqs[:1], hp)  # statistics and context templates, off the clock
        warm.revert()
        distributed.barrier()
        before = {n: p.detach().clone() for n, p in handle.model.named_parameters()}
        t0 = time.perf_counter()
        edit = method.apply(handle, reqs, hp)
        seconds = time.perf_counter() - t0
        norm = sum(float((p.detach() - before[n]).double().norm() ** 2)
                   for n, p in handle.model.named_parameters()) ** 0.5
        edit.revert()
    if distributed.is_main():
        Path(args.batch_out).write_text(json.dumps({"apply_s": round(seconds, 2), "update_norm": norm}))
    distributed.stop()


def batch_run(args: argparse.Namespace, world: int) -> dict:
    out = Path(args.root) / f"batch-w{world}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [*_torchrun(world, 29600 + world), str(Path(__file__).resolve()), "--worker", "--model", args.model,
           "--dataset", args.dataset, "--batch-n", str(args.batch_n), "--batch-out", str(out)]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=_env(1), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    res = json.loads(out.read_text()) if out.is_file() else {}
    return {"world": world, "rc": rc, "edits": args.batch_n, "wall_s": round(wall, 1), **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default=f"counterfact:{DEFAULT_DATA}")
    ap.add_argument("--n", type=int, default=40, help="eval cases")
    ap.add_argument("--batch-n", type=int, default=16, help="edits in the MEMIT batch")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--root", default=str(ROOT / "runs" / "distributed"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        batch_worker(args)
        return
    from tabulate import tabulate

    worlds = [int(w) for w in args.worlds.split(",")]
    evals = [] if args.skip_eval else [eval_run(args, w) for w in worlds]
    batches = [] if args.skip_batch else [batch_run(args, w) for w in worlds]
    rows = []
    for r in evals:
        base = evals[0]
        rows.append([f"eval rome single, {r['cases']} cases", r["world"], r["eval_s"], r["wall_s"],
                     round(base["eval_s"] / r["eval_s"], 2) if r["eval_s"] else None,
                     round(base["wall_s"] / r["wall_s"], 2), r["rc"]])
    for r in batches:
        base = batches[0]
        rows.append([f"memit batch, {r['edits']} edits", r["world"], r.get("apply_s"), r["wall_s"],
                     round(base["apply_s"] / r["apply_s"], 2) if r.get("apply_s") else None,
                     round(base["wall_s"] / r["wall_s"], 2), r["rc"]])
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": args.model,
              "dataset": args.dataset, "threads_per_rank": 1, "eval": evals, "batch": batches}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(tabulate(rows, headers=["job", "ranks", "work s", "wall s", "speedup (work)", "speedup (wall)", "rc"],
                   tablefmt="github"))
    print("work s: eval = rank 0's eval_s (editing + scoring, after the gather); memit = rank 0's apply time. "
          "wall s: the whole launch, model loads included.")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
