"""KN integrated-gradients cost: attributing one prompt with S steps vs one forward+backward pass.

    python bench/kn_ig.py --model smollm2-135m [--steps 20] [--repeats 5] [--device cpu]

The reference is one forward+backward pass of the model over a batch of S copies of the prompt
(gradient of the answer's summed probability with respect to the input embeddings). The
attribution is :func:`medit.toolkit.attribution.integrated_gradients` with every FFN layer, in the
default ``joint`` scope (all S interpolation steps in one batch, every layer at once) and, for
reference, the per-layer ``layer`` scope. Reports the median over ``--repeats`` runs after one
warm-up. Writes ``bench/results/kn_ig-<model>.json`` (or ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
PROMPT, ANSWER = "The mother tongue of Danielle Darrieux is", "French"


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-layer-scope", action="store_true", help="do not time the per-layer scope")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from medit.toolkit.attribution import integrated_gradients
    from medit.model.loading import load_model
    from medit.scoring.engine import Scorer

    handle = load_model(args.model, random_init=args.random_init, device=args.device)
    layers = list(range(handle.n_layers))
    ctx, tgt = Scorer(handle).encode_pair(PROMPT, ANSWER)
    ids = torch.tensor([ctx] * args.steps, device=handle.device)
    embed = handle.module("embed")

    def forward_backward() -> None:
        x = embed(ids).detach().requires_grad_(True)
        logits = handle.model(inputs_embeds=x, use_cache=False).logits[:, -1].float()
        logits.softmax(-1)[:, tgt[0]].sum().backward()

    def attribute(scope: str) -> None:
        integrated_gradients(handle, PROMPT, ANSWER, layers, args.steps, scope)

    ref = _timed(forward_backward, args.repeats)
    joint = _timed(lambda: attribute("joint"), args.repeats)
    _, info = integrated_gradients(handle, PROMPT, ANSWER, layers, args.steps, "joint")
    rows = [["forward+backward, batch of %d" % args.steps, round(ref, 4), 1.0],
            ["KN attribution, joint scope (%d steps, %d layers)" % (args.steps, len(layers)), round(joint, 4),
             round(joint / ref, 2)]]
    layer_s = None
    if not args.skip_layer_scope:
        layer_s = _timed(lambda: attribute("layer"), max(1, args.repeats // 5))
        rows.append(["KN attribution, layer scope (one pass per layer)", round(layer_s, 4), round(layer_s / ref, 2)])
    result = {
        "benchmark": "kn_ig", "model": args.model, "random_init": args.random_init,
        "device": str(handle.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(), "prompt": PROMPT, "answer": ANSWER, "steps": args.steps,
        "layers": len(layers), "repeats": args.repeats,
        "forward_backward_s": ref, "joint_s": joint, "joint_ratio": joint / ref,
        "layer_s": layer_s, "layer_ratio": (layer_s / ref) if layer_s else None,
        "completeness": {"attr_sum": info["attr_sum"], "f_full_minus_f_base": info["sum_gap"]},
        "target_ratio": 2.0, "passes": joint / ref <= 2.0,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"kn_ig-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(tabulate(rows, headers=["what", "seconds (median)", "x forward+backward"], tablefmt="github"))
    print(f"completeness: sum(attr) {info['attr_sum']:.5f} vs F(a)-F(0) {info['sum_gap']:.5f}; "
          f"joint/ref {joint / ref:.2f} (target <= 2.0): {'pass' if result['passes'] else 'FAIL'}")
    print(f"result: {out}")


if __name__ == "__main__":
    main()
