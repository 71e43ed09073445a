"""The charts of ``medit report --out``: a bar chart of every metric per run (``report.png``) and
reliability against locality (``tradeoff.png``), drawn with matplotlib's Agg backend from a
report that :func:`medit.evaluation.report.build_report` built."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

from medit.core.io import atomic_write_with

#: protocols whose values are not fractions in [0, 1], with the unit a chart shows them in
UNITS = {"kl": "KL(pre ‖ post), nats (lower is better)", "ngram_entropy": "n-gram entropy, bits",
         "perplexity": "perplexity (lower is better)"}


def describe(report: dict[str, Any]) -> list[str]:
    """One line per run for a chart's subtitle: label, model, data, n, mode."""
    out = []
    for r in report["runs"]:
        ds = r.get("dataset") or {}
        data = f"{ds.get('format')}:{Path(str(ds['path'])).name}" if ds.get("path") else "dataset unknown"
        if ds.get("offset"):
            data += f" (offset {ds['offset']})"
        out.append(f"{r['label']}: {r['model']}, {data}, n={r['n']}, {r['mode']} mode")
    return out


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _is_fraction(row: dict[str, Any]) -> bool:
    vals = [x for v in row["values"].values() for x in (v["pre"], v["post"]) if x is not None]
    return row["protocol"] not in UNITS and all(0.0 <= x <= 1.0 for x in vals)


def _bars(ax: Any, rows: list[dict[str, Any]], labels: list[str], fraction: bool, fontsize: float) -> None:
    """Grouped bars of ``rows`` (one group per row, one bar per run) with their 95% intervals as
    error bars, each bar's value written on it, a black tick at each pre-edit value, a hollow
    outline for a measured 0 and 'not measured' where a run lacks the row."""
    width = 0.8 / max(1, len(labels))
    top = max([1.0] if fraction else [0.0]) or 0.0
    for row in rows:
        for v in row["values"].values():
            for x in (v.get("pre"), v.get("post"), *(v.get("ci95") or ())):
                if x is not None:
                    top = max(top, float(x))
    top = top or 1.0
    for j, lab in enumerate(labels):
        colour = f"C{j % 10}"
        for i, row in enumerate(rows):
            x = i - 0.4 + width * (j + 0.5)
            v = row["values"].get(lab)
            if v is None or v["post"] is None:
                ax.text(x, 0.02 * top, "not measured", rotation=90, ha="center", va="bottom", fontsize=fontsize * 0.8,
                        color="0.4")
                continue
            y = v["post"]
            ax.bar(x, y, width * 0.9, color=colour, edgecolor=colour, linewidth=1.5)
            if y == 0:  # a measured zero: an outline one line high, so it does not look unmeasured
                ax.bar(x, 0.012 * top, width * 0.9, color="none", edgecolor=colour, linewidth=1.5)
            ci = v.get("ci95")
            if ci:
                ax.errorbar(x, y, yerr=[[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]], fmt="none", ecolor="black",
                            elinewidth=1.2, capsize=4, zorder=4)
            label_y = max(y, ci[1] if ci else y, v["pre"] if v["pre"] is not None else y) + 0.015 * top
            text = f"{y:.2f}" if abs(y) < 100 else f"{y:.0f}"
            if row["protocol"] == "kl":
                text = f"{y:.3f}"
            ax.text(x, label_y, text, ha="center", va="bottom", fontsize=fontsize * 0.85, rotation=90 if len(labels) > 2
                    else 0)
            if v["pre"] is not None:
                ax.plot([x - width * 0.45, x + width * 0.45], [v["pre"], v["pre"]], color="black", linewidth=2.5,
                        zorder=5)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylim(0, top * (1.22 if fraction else 1.3))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_tick(r) for r in rows], fontsize=fontsize * 0.85)
    ax.tick_params(axis="y", labelsize=fontsize * 0.85)
    ax.grid(axis="y", alpha=0.3)


def _tick(row: dict[str, Any]) -> str:
    """A group's axis label, long snake_case names broken at their underscores so that
    neighbouring labels do not run into each other."""
    words = [w.replace("_", "_\n") if len(w) > 11 else w for w in (row["metric"], row["protocol"])]
    return "\n".join(words) + ("" if row["stage"] == "post" else f"\n({row['stage']})")


def write_chart(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the post-edit means, 1600 px wide: fractions in panels of at most a dozen
    metric/protocol groups (wrapped onto further lines), each other unit (KL in nats, entropy in
    bits, perplexity) in a panel of its own. Bars carry their values and 95% intervals; black ticks
    mark pre-edit values; the runs' model, data and n are in the subtitle, the legend sits below
    the panels, and a warning says when the runs do not share their data or model."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    labels = [r["label"] for r in report["runs"]]
    fractions = [r for r in report["rows"] if _is_fraction(r)]
    others: dict[str, list[dict[str, Any]]] = {}
    for r in report["rows"]:
        if not _is_fraction(r):
            others.setdefault(r["protocol"], []).append(r)
    per_line = max(3, int(14.0 / (0.45 + 0.3 * len(labels))))
    lines: list[list[tuple[str, list[dict[str, Any]], bool]]] = []
    if fractions:
        n_lines = -(-len(fractions) // per_line)
        size = -(-len(fractions) // n_lines)
        for i in range(0, len(fractions), size):
            lines.append([("mean over cases (1 = every case passes)", fractions[i:i + size], True)])
    line: list[tuple[str, list[dict[str, Any]], bool]] = []
    for proto, rows in others.items():
        if line and sum(max(2, len(r)) for _, r, _ in line) + max(2, len(rows)) > per_line:
            lines.append(line)
            line = []
        line.append((UNITS.get(proto, f"{proto} (not a fraction)"), rows, False))
    if line:
        lines.append(line)
    if not lines:
        lines = [[("mean over cases", [], True)]]
    fontsize = 13.0
    header, footer, line_h = 1.25 + 0.22 * len(labels) + (0.5 if report.get("warnings") else 0.0), 1.2, 4.4
    fig_h = header + footer + line_h * len(lines)
    fig = plt.figure(figsize=(16.0, fig_h))
    outer = fig.add_gridspec(len(lines), 1, left=0.07, right=0.99, top=1 - header / fig_h,
                             bottom=footer / fig_h, hspace=0.55)
    for k, panels in enumerate(lines):
        slots = [max(2, len(rows)) if not fraction else len(rows) for _, rows, fraction in panels]
        pad = not any(fraction for _, _, fraction in panels) and sum(slots) < per_line  # unit panels stay narrow
        ratios = slots + ([per_line - sum(slots)] if pad else [])
        sub = outer[k].subgridspec(1, len(ratios), width_ratios=ratios, wspace=0.35)
        for j, (unit, rows, fraction) in enumerate(panels):
            ax = fig.add_subplot(sub[0, j])
            _bars(ax, rows, labels, fraction, fontsize)
            ax.set_ylabel(unit, fontsize=fontsize * (0.9 if fraction else 0.8))
    fig.suptitle("Post-edit means by metric and protocol", fontsize=fontsize * 1.4,
                 y=1 - 0.15 / fig_h, va="top", weight="bold")
    note = "\n".join(describe(report)) + "\nerror bars: 95% bootstrap interval over cases; black tick: pre-edit value"
    fig.text(0.5, 1 - 0.62 / fig_h, note, ha="center", va="top", fontsize=fontsize * 0.9)
    warnings = report.get("warnings") or []
    if warnings:
        fig.text(0.5, 1 - (header - 0.45) / fig_h, "Warning: " + " / ".join(warnings), ha="center", va="top",
                 fontsize=fontsize * 0.85, color="#b00000", weight="bold", wrap=True)
    handles = [Patch(color=f"C{j % 10}", label=lab) for j, lab in enumerate(labels)]
    handles.append(Line2D([], [], color="black", linewidth=2.5, label="pre-edit"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=fontsize, frameon=False,
               bbox_to_anchor=(0.5, 0.05 / fig_h))
    out = Path(path)
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


def _pick(report: dict[str, Any], metric: str, prefer: Sequence[str]) -> str | None:
    """The first protocol of ``prefer`` that every run has for ``metric`` (else that any run has)."""
    have: dict[str, set[str]] = {}
    for row in report["rows"]:
        if row["metric"] == metric and row["stage"] == "post":
            have[row["protocol"]] = {k for k, v in row["values"].items() if v.get("post") is not None}
    labels = {r["label"] for r in report["runs"]}
    for want_all in (True, False):
        for p in prefer:
            if p in have and (have[p] == labels if want_all else have[p]):
                return p
    return None


def write_tradeoff(report: dict[str, Any], path: str | Path) -> Path:
    """The trade-off chart: one point per run, reliability (x) against locality (y), the 95%
    intervals as error bars, the area of the marker growing with generalization. Up and right is
    better. Drawn 16 x 10 inches at 100 dpi (1600 px wide)."""
    plt = _pyplot()
    rel = _pick(report, "reliability", ("answer", "generate", "token_acc", "exact", "prob"))
    loc = _pick(report, "locality", ("agreement", "generate_agreement", "token_acc", "generate"))
    gen = _pick(report, "generalization", ("answer", "generate", "token_acc", "exact", "prob"))

    def value(metric: str, proto: str | None, label: str) -> dict[str, Any] | None:
        for row in report["rows"]:
            if row["metric"] == metric and row["protocol"] == proto and row["stage"] == "post":
                v = row["values"].get(label)
                return v if v and v.get("post") is not None else None
        return None

    def size(g: float) -> float:
        return 150.0 + 2400.0 * max(0.0, min(1.0, g))

    fontsize = 15.0
    warning = textwrap.wrap("Warning: " + " / ".join(report["warnings"]), 150) if report.get("warnings") else []
    fig, ax = plt.subplots(figsize=(16.0, 10.0))
    # the warning's lines sit below the x-axis label, never on it
    fig.subplots_adjust(left=0.08, right=0.80, top=0.84, bottom=0.09 + 0.025 * len(warning))
    missing = []
    seen: list[float] = []  # every drawn coordinate and interval bound, to zoom on them
    for j, r in enumerate(report["runs"]):
        lab = r["label"]
        x, y = value("reliability", rel, lab), value("locality", loc, lab)
        if x is None or y is None:
            missing.append(lab)
            continue
        g = value("generalization", gen, lab)
        seen += [x["post"], y["post"], *(x.get("ci95") or ()), *(y.get("ci95") or ())]
        colour = f"C{j % 10}"
        xe = [[x["post"] - x["ci95"][0]], [x["ci95"][1] - x["post"]]] if x.get("ci95") else None
        ye = [[y["post"] - y["ci95"][0]], [y["ci95"][1] - y["post"]]] if y.get("ci95") else None
        ax.errorbar(x["post"], y["post"], xerr=xe, yerr=ye, fmt="none", ecolor=colour, elinewidth=2, capsize=6,
                    zorder=2)
        ax.scatter([x["post"]], [y["post"]], s=size(g["post"]) if g else size(0.0), color=colour, alpha=0.75,
                   edgecolors="black", linewidths=1.2, zorder=3, label=lab)
        gtext = f", gen. {g['post']:.2f}" if g else ""
        right = x["post"] > 0.6  # keep the label inside the axes
        ax.annotate(f"{lab}: rel. {x['post']:.2f}, loc. {y['post']:.2f}{gtext}", (x["post"], y["post"]),
                    xytext=(-30 if right else 30, -40 - 28 * j), textcoords="offset points",
                    ha="right" if right else "left", va="top", fontsize=fontsize * 0.9, color=colour,
                    weight="bold", arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 1})
    # zoom on the points, in steps of 0.1, keeping at least half of the [0, 1] range in view
    lo = min(0.5, math.floor((min(seen, default=0.0) - 0.05) * 10) / 10) if seen else 0.0
    lo = max(lo, 0.0)
    ax.set_xlim(lo - 0.02, 1.05)
    ax.set_ylim(lo - 0.02, 1.05)
    ax.set_xlabel(f"reliability ({rel or 'none'}): the edit prompt gives the new answer", fontsize=fontsize)
    ax.set_ylabel(f"locality ({loc or 'none'}): unrelated prompts unchanged", fontsize=fontsize)
    ax.tick_params(labelsize=fontsize * 0.9)
    ax.grid(alpha=0.3)
    fig.suptitle("Edit success against side effects (up and to the right is better)", fontsize=fontsize * 1.3,
                 weight="bold", y=0.975)
    note = "\n".join(describe(report)) + "\nerror bars: 95% bootstrap interval over cases"
    fig.text(0.08, 0.925, note, ha="left", va="top", fontsize=fontsize * 0.8)
    if warning:
        fig.text(0.5, 0.008, "\n".join(warning), ha="center", va="bottom", fontsize=fontsize * 0.8,
                 color="#b00000", weight="bold")
    # marker-size key: what generalization a marker's area means
    for g in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=size(g), color="0.7", edgecolors="black", label=f"generalization {g:g}")
    if missing:
        ax.scatter([], [], s=0, label="no reliability/locality: " + ", ".join(missing))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=fontsize * 0.85, labelspacing=2.2,
              borderpad=1.2, handletextpad=1.5, frameon=False, title=f"generalization: {gen or 'not measured'}",
              title_fontsize=fontsize * 0.85)
    out = Path(path)
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
