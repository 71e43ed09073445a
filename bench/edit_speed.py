"""Edit speed benchmark: seconds per edit, statistics seconds and peak memory for one method.

    python bench/edit_speed.py --method rome --model smollm2-135m --n 5
    python bench/edit_speed.py --method memit --model llama-2-7b --random-init --device cuda
    python bench/edit_speed.py --method alphaedit --model smollm2-135m --n 30 --sequential
    python bench/edit_speed.py --method memit --model smollm2-135m --n 100 --batch

``--sequential`` keeps every edit applied (as ``--mode sequential`` does) and records the resident
memory after each edit, so memory growth over a long run shows; ``--no-trim`` skips the heap trim
after each edit that the evaluator does (to see what it saves). ``--batch`` applies all ``--n``
edits in one call (as ``--mode batch`` does) and reports the amortised seconds per edit.

Cases come from the benchmark data beside the checkout (``../shared/data``, README "Benchmark
data") unless ``--dataset`` names others.

Writes a JSON result (``--out``, default ``bench/results/edit_speed-<method>-<model>.json``) and
prints a table. Statistics are timed separately from the edits: the first call computes (or
loads) them; ``--fresh-stats`` points the cache at an empty folder so they are really computed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "dev.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=5, help="edits to time (single mode: applied and reverted one by one)")
    ap.add_argument("--dataset", default=f"counterfact:{DEFAULT_DATA}")
    ap.add_argument("--stats-corpus", default=None, help="default: the method's (the WikiText-2 text medit ships)")
    ap.add_argument("--stats-samples", type=int, default=1000)
    ap.add_argument("--set", action="append", default=[], help="extra hparam key=value")
    ap.add_argument("--fresh-stats", action="store_true", help="use an empty statistics cache")
    ap.add_argument("--sequential", action="store_true", help="keep the edits applied, one after another")
    ap.add_argument("--batch", action="store_true", help="apply all edits in one batch (seconds per edit amortised)")
    ap.add_argument("--no-trim", action="store_true", help="do not trim the C heap after each edit")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="also profile one more edit (torch.profiler) and write its "
                    "table of operators to this file")
    args = ap.parse_args()

    if args.fresh_stats:
        fresh = tempfile.mkdtemp(prefix="medit-bench-")
        models = Path(os.environ.get("MEDIT_CACHE", Path.home() / ".cache" / "medit")) / "models"
        os.environ["MEDIT_CACHE"] = fresh
        if models.exists():  # keep the converted-model cache, drop only statistics/templates
            (Path(fresh) / "models").symlink_to(models, target_is_directory=True)

    from medit.core.dataset import load_dataset
    from medit.core.edit import CompositeEdit, share_originals
    from medit.model.loading import load_model
    from medit.core.hparams import parse_sets
    from medit.evaluation.memory import current_rss_mb, peak_rss_mb, trim_heap
    from medit.plugin.manager import get_plugins

    t0 = time.perf_counter()
    handle = load_model(args.model, random_init=args.random_init, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    reqs, _ = load_dataset(args.dataset, n=args.n)
    method = get_plugins().methods.get(args.method)
    overrides = parse_sets(args.set)
    fields = method.hparams_class.field_names()
    if "stats_corpus" in fields:
        if args.stats_corpus:
            overrides.setdefault("stats_corpus", args.stats_corpus)
        overrides.setdefault("stats_samples", str(args.stats_samples))
    hp = method.resolve_hparams(handle, overrides=overrides)
    method.start_run(handle)
    sync = torch.cuda.synchronize if handle.device.type == "cuda" else (lambda: None)

    stats_s = 0.0
    layers = None
    if "stats_corpus" in fields and getattr(hp, "mom2_adjustment", True):
        from medit.model.layers import resolve_layers
        from medit.model.layers import spread_layers
        if hasattr(hp, "layers"):
            layers = spread_layers(handle, hp.layers)
        else:
            from medit.plugins.methods.rome.method import AUTO_DEPTH
            layers = resolve_layers(handle, [hp.layer] if isinstance(hp.layer, int) else hp.layer, auto=(AUTO_DEPTH,))
        t = time.perf_counter()
        _, stats_s = hp.stats(handle, layers)
        sync()
        stats_wall = time.perf_counter() - t
    else:
        stats_wall = 0.0
    if hasattr(hp, "templates"):
        t = time.perf_counter()
        hp.templates(handle)
        templates_s = time.perf_counter() - t
    else:
        templates_s = 0.0

    per_edit: list[float] = []
    rss_after: list[float | None] = []
    kept = []
    if args.batch:
        sync()
        t = time.perf_counter()
        edit = method.apply(handle, list(reqs), hp)
        sync()
        batch_s = time.perf_counter() - t
        per_edit = [batch_s / len(reqs)] * len(reqs)
        edit.revert()
        rss_after.append(current_rss_mb())
    for r in ([] if args.batch else reqs):
        sync()
        t = time.perf_counter()
        edit = method.apply(handle, [r], hp)
        sync()
        per_edit.append(time.perf_counter() - t)
        if args.sequential:
            kept.append(edit)
            share_originals(kept)  # as the evaluator does
        else:
            edit.revert()
        if not args.no_trim:
            trim_heap()  # as the evaluator does after each edit
        rss_after.append(current_rss_mb())
    CompositeEdit(handle, kept).revert()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if handle.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            method.apply(handle, [reqs[0]], hp).revert()
            sync()
        sort = "cuda_time_total" if handle.device.type == "cuda" else "cpu_time_total"
        Path(args.profile).write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    result = {
        "method": args.method, "model": args.model, "random_init": args.random_init,
        "device": str(handle.device), "device_name": torch.cuda.get_device_name() if handle.device.type == "cuda"
        else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "dtype": args.dtype, "n": len(per_edit), "load_s": round(load_s, 2),
        "mode": "batch" if args.batch else "sequential" if args.sequential else "single", "trim": not args.no_trim,
        "stats_layers": layers, "stats_samples": args.stats_samples if layers else None,
        "stats_corpus": getattr(hp, "stats_corpus", None) if layers else None,
        "stats_s": round(stats_s, 3), "stats_wall_s": round(stats_wall, 3), "templates_s": round(templates_s, 3),
        "edit_s": [round(x, 3) for x in per_edit],
        "edit_s_mean": round(sum(per_edit) / len(per_edit), 3),
        "edit_s_median": round(sorted(per_edit)[len(per_edit) // 2], 3),
        "first_edit_plus_stats_s": round(stats_wall + templates_s + per_edit[0], 3),
        "peak_rss_mb": peak_rss_mb(),
        "rss_mb_after_edit": rss_after, "rss_first_mb": rss_after[0], "rss_last_mb": rss_after[-1],
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if handle.device.type == "cuda" else None,
        "hparams": hp.to_dict(),
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"edit_speed-{args.method}-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    keys = ["method", "model", "device", "mode", "n", "stats_wall_s", "templates_s", "edit_s_mean", "edit_s_median",
            "first_edit_plus_stats_s", "rss_first_mb", "rss_last_mb", "peak_rss_mb", "peak_gpu_mb"]
    print(tabulate([[result[k] for k in keys]], headers=keys, tablefmt="github"))
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
