"""Lifelong (sequential) editing benchmark: reliability, locality, wall time and peak RSS of long
sequential `medit eval` runs, with the health monitor's curve.

    .venv/bin/python bench/lifelong.py --method ultraedit --n 1000 --batch-size 100 --monitor-every 100
    .venv/bin/python bench/lifelong.py --method alphaedit --n 20,100 --monitor-every 10   # memory vs length

Cases are the first N of CounterFact train (``../shared/data/counterfact/train.json``, README
"Benchmark data") unless ``--dataset`` names others. Each N runs as its own `medit eval --mode
sequential` process into ``<root>/<method>-<label>-n<N>/`` (default root runs/lifelong), every case
scored after the last edit; the wall time is the process's, the peak RSS the evaluator's own
(``peak_rss_mb`` in the run's summary). Writes
``bench/results/lifelong-<method>-<label>.json`` and prints a table.
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

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "train.json"


def cell(summary: dict, metric: str, protocol: str) -> float | None:
    v = ((summary.get("metrics") or {}).get(metric) or {}).get(protocol) or {}
    return v.get("post")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", default="100", help="comma list of run lengths (edits)")
    ap.add_argument("--batch-size", type=int, default=1, help="edits per sequential turn")
    ap.add_argument("--monitor-every", type=int, default=0)
    ap.add_argument("--dataset", default=f"counterfact:{DEFAULT_DATA}")
    ap.add_argument("--protocol", default="token_acc")
    ap.add_argument("--set", action="append", default=[], help="hparam key=value")
    ap.add_argument("--label", default="default", help="names this configuration in folders and the JSON")
    ap.add_argument("--root", default=str(ROOT / "runs" / "lifelong"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    medit = str(Path(sys.executable).parent / "medit")
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        run = Path(args.root) / f"{args.method}-{args.label}-n{n}"
        cmd = [medit, "eval", "--method", args.method, "--model", args.model, "--dataset", args.dataset,
               "--n", str(n), "--mode", "sequential", "--batch-size", str(args.batch_size),
               "--protocol", args.protocol, "--metrics", "reliability,generalization,locality,efficiency",
               "--out", str(run)]
        if run.exists():
            cmd.append("--resume")
        if args.monitor_every:
            cmd += ["--monitor-every", str(args.monitor_every)]
        for s in args.set:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        wall = time.perf_counter() - t0
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        eff = summary.get("efficiency") or {}
        monitor = run / "monitor.jsonl"
        curve = [json.loads(x) for x in monitor.read_text().splitlines() if x.strip()] if monitor.is_file() else []
        rows.append({
            "n": n, "rc": rc, "run_dir": str(run), "wall_s": round(wall, 1),
            "reliability": cell(summary, "reliability", args.protocol),
            "generalization": cell(summary, "generalization", args.protocol),
            "locality": cell(summary, "locality", args.protocol),
            "locality_agreement": cell(summary, "locality", "agreement"),
            "edit_s_mean": eff.get("edit_s_mean"), "edit_s_total": eff.get("edit_s_total"),
            "peak_rss_mb": eff.get("peak_rss_mb"), "monitor": curve,
        })
    result = {"method": args.method, "model": args.model, "label": args.label, "batch_size": args.batch_size,
              "sets": args.set, "dataset": args.dataset, "protocol": args.protocol, "runs": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "threads": os.environ.get("OMP_NUM_THREADS")}}
    out = Path(args.out or ROOT / "bench" / "results" / f"lifelong-{args.method}-{args.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    cols = ["n", "rc", "reliability", "generalization", "locality", "locality_agreement", "edit_s_mean",
            "wall_s", "peak_rss_mb"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3f"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
