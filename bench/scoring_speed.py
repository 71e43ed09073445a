"""Scoring throughput benchmark: pre- and post-edit scoring of CounterFact cases.

    python bench/scoring_speed.py                      # SmolLM2, first 100 CounterFact dev cases
    python bench/scoring_speed.py --model gpt2 --random-init --n 20

Times what the evaluation engine does for reliability + generalization + locality: one scoring
pass for the pre-edit model and one for the post-edit model (here the same weights scored again,
so the timing is of scoring alone), first under ``token_acc``, ``exact`` and ``prob`` (the
locality ``agreement`` and neighbourhood ``kl`` come with them), then everything together with
``generate`` (``--gen-tokens`` new tokens), as ``medit eval`` scores it; generate's extra cost is
the difference. The disk cache of pre-edit scores is not used.
Writes JSON (``--out``, default ``bench/results/scoring_speed-<model>.json``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "dev.json"
METRICS = ("reliability", "generalization", "locality")
TF_PROTOCOLS = ("token_acc", "exact", "prob")
TARGETS = {"tf": 15.0, "generate_extra": 30.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dataset", default=f"counterfact:{DEFAULT_DATA}")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    ap.add_argument("--engine", choices=("cached", "full"), default="cached",
                    help="cached: each prompt run once over a key/value cache; full: whole-sequence passes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from medit.core.dataset import load_dataset
    from medit.model.loading import load_model
    from medit.plugin.manager import get_plugins
    from medit.core.queries import DistQuery, GenQuery, TFQuery
    from medit.scoring.engine import Scorer

    handle = load_model(args.model, random_init=args.random_init, device=args.device, dtype=args.dtype)
    reqs, _ = load_dataset(args.dataset, n=args.n)
    metrics = [get_plugins().metrics.get(m) for m in METRICS]
    scorer = Scorer(handle, args.batch_size, use_cache=args.engine == "cached")
    sync = torch.cuda.synchronize if handle.device.type == "cuda" else (lambda: None)
    ctx = {"gen_tokens": args.gen_tokens}

    def queries(protocols: tuple[str, ...]) -> list:
        return list(dict.fromkeys(q for r in reqs for m in metrics for q in m.queries(r, protocols, args.gen_tokens)))

    def timed_pass(qs: list) -> tuple[dict, float]:
        sync()
        t = time.perf_counter()
        res = scorer.run(qs)
        sync()
        return res, time.perf_counter() - t

    def means(protocols: tuple[str, ...], pre: dict, post: dict) -> dict:
        acc: dict[str, dict[str, list[float]]] = {}
        for r in reqs:
            for m in metrics:
                for proto, st in m.compute(r, pre, post, protocols, ctx).items():
                    for stage, v in st.items():
                        if v is not None:
                            acc.setdefault(f"{m.name}/{proto}", {}).setdefault(stage, []).append(v)
        return {k: {s: round(sum(v) / len(v), 4) for s, v in st.items()} for k, st in sorted(acc.items())}

    scorer.run(queries(TF_PROTOCOLS)[:4])  # warm-up: first-call allocations are not scoring cost
    tf_q = queries(TF_PROTOCOLS)
    pre, tf_pre_s = timed_pass(tf_q)
    post, tf_post_s = timed_pass(tf_q)
    tf_values = means(TF_PROTOCOLS, pre, post)
    # The engine scores all of a chunk's queries in one call (generation shares the prompts' passes),
    # so generate's cost is that of scoring everything minus that of the teacher-forced queries alone.
    gen_q = [q for q in queries(("generate",)) if isinstance(q, GenQuery)]
    gpre, all_pre_s = timed_pass(tf_q + gen_q)
    gpost, all_post_s = timed_pass(tf_q + gen_q)
    gen_pre_s, gen_post_s = all_pre_s - tf_pre_s, all_post_s - tf_post_s
    gen_values = means(("generate",), gpre, gpost)

    tf_s, gen_s = tf_pre_s + tf_post_s, gen_pre_s + gen_post_s
    result = {
        "bench": "scoring_speed", "model": args.model, "random_init": args.random_init,
        "device": str(handle.device), "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "dataset": args.dataset, "n": len(reqs), "batch_size": args.batch_size, "engine": scorer.engine, "gen_tokens": args.gen_tokens,
        "queries": {"teacher_forced": sum(isinstance(q, TFQuery) for q in tf_q),
                    "next_token": sum(isinstance(q, DistQuery) for q in tf_q), "generate": len(gen_q)},
        "seconds": {"tf_pre": round(tf_pre_s, 3), "tf_post": round(tf_post_s, 3), "tf_total": round(tf_s, 3),
                    "generate_pre": round(gen_pre_s, 3), "generate_post": round(gen_post_s, 3),
                    "generate_extra": round(gen_s, 3), "all_pre": round(all_pre_s, 3), "all_post": round(all_post_s, 3)},
        "targets_s": TARGETS,
        "within_target": {"tf": tf_s <= TARGETS["tf"], "generate_extra": gen_s <= TARGETS["generate_extra"]},
        "values": {**tf_values, **gen_values},
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"scoring_speed-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    n = len(reqs)
    rows = [["token_acc, exact, prob (+ agreement, kl)", len(tf_q), f"{tf_pre_s:.2f}", f"{tf_post_s:.2f}",
             f"{tf_s:.2f}", f"{TARGETS['tf']:.0f}", f"{n * 2 / tf_s:.1f}"],
            [f"generate ({args.gen_tokens} new tokens), extra", len(gen_q), f"{gen_pre_s:.2f}", f"{gen_post_s:.2f}",
             f"{gen_s:.2f}", f"{TARGETS['generate_extra']:.0f}", f"{n * 2 / gen_s:.1f}"]]
    print(tabulate(rows, headers=["scoring", "queries", "pre s", "post s", "pre+post s", "target s", "cases/s"],
                   tablefmt="github"))
    print(f"model={args.model} n={n} device={handle.device} threads={torch.get_num_threads()} "
          f"batch={args.batch_size} engine={scorer.engine}  result: {out}")


if __name__ == "__main__":
    main()
