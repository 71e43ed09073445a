"""Run summaries: means over cases of every metric, protocol and stage, efficiency totals, and the
table medit prints."""
from __future__ import annotations

from typing import Any

import torch
from tabulate import tabulate

from medit.evaluation.memory import peak_rss_mb
from medit.core.metric import mean
from medit.core.timing import SETUP_FIELDS
from medit.evaluation.intervals import SUMMARY_FIELDS, bootstrap_ci, half_width


def summarise(records: list[dict[str, Any]], method: str, model: str, mode: str, eval_s: float) -> dict[str, Any]:
    """Means over cases of every metric/protocol/stage, plus efficiency totals.

    Beside each mean: ``n``, the cases that gave a post-edit value; ``ci95``, the 95% bootstrap
    interval of the post-edit mean over those cases; ``delta_ci95``, the interval of the mean
    change post - pre over the cases that have both (see :mod:`medit.evaluation.intervals`).
    Intervals need at least two cases.
    """
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    deltas: dict[tuple[str, str], list[float]] = {}
    for r in records:
        for metric, protos in r["metrics"].items():
            for proto, stages in protos.items():
                for stage, v in stages.items():
                    if v is not None and stage not in SUMMARY_FIELDS:
                        acc.setdefault(metric, {}).setdefault(proto, {}).setdefault(stage, []).append(v)
                if stages.get("pre") is not None and stages.get("post") is not None:
                    deltas.setdefault((metric, proto), []).append(stages["post"] - stages["pre"])
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for m, protos in acc.items():
        for p, st in protos.items():
            entry: dict[str, Any] = {"pre": mean(st.get("pre", [])), "post": mean(st.get("post", []))}
            ci = bootstrap_ci(st.get("post", []))
            if ci is not None:
                entry["ci95"] = ci
            dci = bootstrap_ci(deltas.get((m, p), []))
            if dci is not None:
                entry["delta_ci95"] = dci
            entry["n"] = len(st.get("post", []))
            if "immediate" in st:
                entry["immediate"] = mean(st["immediate"])
            metrics.setdefault(m, {})[p] = entry
    def timed(field: str) -> list[float]:
        return [r["efficiency"][field] for r in records if (r.get("efficiency") or {}).get(field) is not None]

    edit_s = timed("edit_s")

    def total(vals: list[float], digits: int) -> float | None:
        """The sum over cases of an efficiency field (0 when no case had that setup); None when no
        case was timed (the ``efficiency`` metric was not asked for): not measured, rather than 0."""
        return round(float(sum(vals)), digits) if vals or edit_s else None

    eff = {"edit_s_mean": mean(edit_s), "edit_s_total": total(edit_s, 4), "eval_s_total": round(eval_s, 3),
           **{f: total(timed(f), 3) for f in SETUP_FIELDS.values()}, "peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        eff["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"method": method, "model": model, "mode": mode, "n": len(records), "metrics": metrics, "efficiency": eff}


def summary_table(summary: dict[str, Any], fmt: str = "github") -> str:
    """Metrics × protocols, each cell ``pre → post`` (``answer`` first when measured, then
    ``generate``: the honest numbers)."""
    protos: list[str] = []
    for m in summary["metrics"].values():
        for p in m:
            if p not in protos:
                protos.append(p)
    order = {p: i for i, p in enumerate(("answer", "generate", "token_acc", "exact", "prob", "agreement",
                                          "answer_agreement",
                                          "generate_agreement", "kl", "perplexity", "mc_acc", "mc_agreement"))}
    protos.sort(key=lambda p: order.get(p, 99))
    # Sequential runs with --also-immediate: each protocol's score right after its own edit gets
    # a column of its own next to the retention (after the last edit) column.
    cols: list[tuple[str, str]] = []
    for p in protos:
        cols.append((p, "post"))
        if any("immediate" in (summary["metrics"][m].get(p) or {}) for m in summary["metrics"]):
            cols.append((p, "immediate"))

    def num(v: float, proto: str) -> str:
        return f"{v:.4f}" if proto == "kl" else f"{v:.3f}"

    def cell(v: dict[str, Any] | None, proto: str, stage: str) -> str:
        if not v:
            return ""
        if stage == "immediate":
            return "" if v.get("immediate") is None else num(v["immediate"], proto)
        post = "-" if v.get("post") is None else num(v["post"], proto)
        hw = None if v.get("post") is None else half_width(v["post"], v.get("ci95"))
        if hw is not None:
            post += f" ±{num(hw, proto)}"
        return post if v.get("pre") is None else f"{num(v['pre'], proto)} → {post}"

    rows = [[name] + [cell(summary["metrics"][name].get(p), p, st) for p, st in cols] for name in summary["metrics"]]
    headers = ["metric (pre → post ±95%)"] + [p if st == "post" else f"{p} (immediate)" for p, st in cols]
    table = tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)
    eff = summary.get("efficiency", {})
    tail = (f"n={summary['n']}  mode={summary['mode']}  edit s/case={_fmt(eff.get('edit_s_mean'))}  "
            f"eval s={_fmt(eff.get('eval_s_total'))}  peak RSS MB={_fmt(eff.get('peak_rss_mb'))}")
    return table + "\n" + tail


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
