"""Side-by-side comparison of finished runs (``medit report RUN_DIR...``).

Reads each run folder's ``summary.json`` (required) and ``manifest.json`` (optional; it adds the
dataset and protocols) as DESIGN.md "Run outputs" defines them, and builds one report: a row per
metric and protocol (``generate`` first), a column per run holding the post-edit mean, and a
``pre`` column where every run measured the same pre-edit value (the same model and cases);
otherwise each cell shows ``pre → post``. Efficiency figures follow as extra rows. Stages other
than ``pre``/``post`` that a summary may carry (e.g. ``immediate``) get rows of their own.

The report renders as a plain table, a Markdown table or JSON, and :func:`write_report` writes
``report.md``, ``report.json`` and a grouped bar chart ``report.png`` (matplotlib, Agg backend).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from medit.errors import InputFileError, UnknownNameError
from medit.evaluation.intervals import SUMMARY_FIELDS

__all__ = ["FORMATS", "Run", "load_run", "load_runs", "build_report", "render", "write_chart",
           "write_report"]

FORMATS = ("table", "markdown", "json")
METRIC_ORDER = ("reliability", "generalization", "locality", "portability", "fluency")
PROTOCOL_ORDER = ("generate", "token_acc", "exact", "prob", "agreement", "generate_agreement", "kl",
                  "ngram_entropy")
EFFICIENCY_KEYS = ("edit_s_mean", "edit_s_total", "eval_s_total", "stats_s", "template_s", "pool_s", "peak_rss_mb",
                   "peak_gpu_mb")


@dataclass
class Run:
    """One finished run folder."""

    path: Path
    summary: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.manifest.get("method") or "?")

    def info(self) -> dict[str, Any]:
        """What the report says about the run besides its numbers."""
        ds = self.manifest.get("dataset") or {}
        model = self.summary.get("model") or (self.manifest.get("model") or {}).get("id")
        return {"label": self.label, "path": str(self.path), "method": self.method, "model": model,
                "mode": self.summary.get("mode") or self.manifest.get("mode"), "n": self.summary.get("n"),
                "dataset": {k: ds[k] for k in ("path", "format", "fingerprint", "n", "offset", "seed") if k in ds}
                or None,
                "protocols": self.manifest.get("protocols")}


# ------------------------------------------------------------------------------ reading

def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputFileError(f"'{path}' cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"'{path}' is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                             f"re-run the evaluation that wrote it") from None


def load_run(path: str | Path) -> Run:
    """Read one run folder; :class:`InputFileError` naming the folder and the fix otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputFileError(f"run folder '{p}' does not exist; pass folders written by "
                             f"`medit eval --out` or `medit edit --out`")
    if not p.is_dir():
        raise InputFileError(f"'{p}' is a file, not a run folder; pass the folder that holds summary.json")
    summary_file = p / "summary.json"
    if not summary_file.is_file():
        if (p / "cases.jsonl").is_file() or (p / "manifest.json").is_file():
            raise InputFileError(f"run folder '{p}' has no summary.json, so the run did not finish; finish it "
                                 f"with `medit eval ... --out {p} --resume`")
        raise InputFileError(f"'{p}' is not a run folder (it holds no summary.json); pass folders written by "
                             f"`medit eval --out` or `medit edit --out`")
    summary = _read_json(summary_file)
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise InputFileError(f"'{summary_file}' has no 'metrics' object, so it is not a medit run summary; "
                             f"pass folders written by `medit eval --out` or `medit edit --out`")
    manifest: dict[str, Any] = {}
    if (p / "manifest.json").is_file():
        m = _read_json(p / "manifest.json")
        manifest = m if isinstance(m, dict) else {}
    return Run(p, summary, manifest)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read run folders and give each a unique label (the method, then mode or folder name)."""
    if not paths:
        raise InputFileError("no run folder given; pass one or more folders written by `medit eval --out`")
    runs = [load_run(p) for p in paths]
    labels = [r.method for r in runs]
    for refine in (lambda r: f"{r.method} ({r.summary.get('mode') or '?'})", lambda r: f"{r.method} ({r.path.name})"):
        if len(set(labels)) == len(labels):
            break
        labels = [refine(r) if labels.count(lab) > 1 else lab for r, lab in zip(runs, labels)]
    seen: dict[str, int] = {}
    for r, lab in zip(runs, labels):
        seen[lab] = seen.get(lab, 0) + 1
        r.label = lab if labels.count(lab) == 1 else f"{lab} #{seen[lab]}"
    return runs


# ------------------------------------------------------------------------------ building

def _order(names: list[str], preferred: Sequence[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(preferred)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def build_report(runs: Sequence[Run]) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: ``runs``, ``rows`` (metric rows) and ``efficiency`` rows.

    Each row: ``{"metric", "protocol", "stage", "pre": common pre-edit value or None,
    "values": {label: {"pre", "post"}}}``; ``stage`` is ``post`` except for extra stages.
    """
    metrics: list[str] = []
    protocols: dict[str, list[str]] = {}
    for r in runs:
        for m, protos in r.summary["metrics"].items():
            if m not in metrics:
                metrics.append(m)
            for p in (protos or {}):
                if p not in protocols.setdefault(m, []):
                    protocols[m].append(p)
    rows: list[dict[str, Any]] = []
    for m in _order(metrics, METRIC_ORDER):
        for p in _order(protocols[m], PROTOCOL_ORDER):
            cells = {r.label: (r.summary["metrics"].get(m) or {}).get(p) for r in runs}
            cells = {k: v for k, v in cells.items() if isinstance(v, dict)}
            stages = ["post"] + sorted({s for v in cells.values() for s in v} - {"pre", "post", *SUMMARY_FIELDS})
            for stage in stages:
                values = {k: {"pre": _num(v.get("pre")), "post": _num(v.get(stage))} for k, v in cells.items()
                          if stage in v}
                if not values:
                    continue
                pres = [v["pre"] for v in values.values()]
                common = pres[0] if pres[0] is not None and all(
                    x is not None and abs(x - pres[0]) <= 1e-9 for x in pres) else None
                rows.append({"metric": m, "protocol": p, "stage": stage, "pre": common, "values": values})
    efficiency: list[dict[str, Any]] = []
    keys: list[str] = []
    for r in runs:
        keys += [k for k in (r.summary.get("efficiency") or {}) if k not in keys]
    for k in _order(keys, EFFICIENCY_KEYS):
        vals = {r.label: _num((r.summary.get("efficiency") or {}).get(k)) for r in runs}
        efficiency.append({"metric": "efficiency", "protocol": k, "values": vals})
    return {"runs": [r.info() for r in runs], "rows": rows, "efficiency": efficiency}


# ------------------------------------------------------------------------------ rendering

def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    labels = [r["label"] for r in report["runs"]]
    headers = ["metric", "protocol", "pre"] + labels
    rows = []
    for row in report["rows"]:
        cells = []
        for lab in labels:
            v = row["values"].get(lab)
            if v is None:
                cells.append("")
            elif row["pre"] is None and v["pre"] is not None:
                cells.append(f"{_f(v['pre'])} → {_f(v['post'])}")
            else:
                cells.append(_f(v["post"]))
        proto = row["protocol"] if row["stage"] == "post" else f"{row['protocol']} ({row['stage']})"
        rows.append([row["metric"], proto, "" if row["pre"] is None else _f(row["pre"])] + cells)
    for row in report["efficiency"]:
        rows.append(["efficiency", row["protocol"], ""] + [_f(row["values"].get(lab)) for lab in labels])
    return headers, rows


def render(report: dict[str, Any], fmt: str = "table") -> str:
    """The report as ``table`` (plain text), ``markdown`` or ``json``."""
    if fmt not in FORMATS:
        raise UnknownNameError("report format", fmt, FORMATS, hint="pass --format table, markdown or json")
    if fmt == "json":
        return json.dumps(report, indent=2)
    headers, rows = _table_rows(report)
    table = tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                     disable_numparse=True)
    legend = []
    for r in report["runs"]:
        ds = r.get("dataset") or {}
        where = f"{ds.get('format')}:{ds.get('path')}" if ds.get("path") else "dataset unknown"
        legend.append(f"{r['label']}: {r['path']} (model {r['model']}, mode {r['mode']}, n={r['n']}, {where})")
    if fmt == "markdown":
        return ("Runs:\n\n" + "\n".join(f"- {line}" for line in legend) + "\n\n" + table
                + "\n\nCells are post-edit means; `pre` is the unedited model's value where all runs share it, "
                  "otherwise cells read `pre → post`.\n")
    return "\n".join(legend) + "\n\n" + table


def write_chart(report: dict[str, Any], path: str | Path) -> Path:
    """A grouped bar chart of the post-edit values (one bar per run, a black tick at each pre value):
    fractions in one panel, other scales (fluency bits, KL) in a second."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in report["runs"]]

    def is_fraction(row: dict[str, Any]) -> bool:
        vals = [x for v in row["values"].values() for x in (v["pre"], v["post"]) if x is not None]
        return row["protocol"] not in ("kl", "ngram_entropy") and all(0.0 <= x <= 1.0 for x in vals)

    panels = [[r for r in report["rows"] if is_fraction(r)], [r for r in report["rows"] if not is_fraction(r)]]
    panels = [p for p in panels if p]
    groups = max((len(p) for p in panels), default=1)
    fig_w = min(30.0, max(6.0, 2.0 + groups * (0.6 + 0.25 * len(labels))))
    fig, axes = plt.subplots(len(panels) or 1, 1, squeeze=False, figsize=(fig_w, 4.2 * max(1, len(panels))))
    width = 0.8 / max(1, len(labels))
    for ax, rows in zip(axes[:, 0], panels or [[]]):
        pre_labelled = False
        for j, lab in enumerate(labels):
            xs, ys, pre_x, pre_y = [], [], [], []
            for i, row in enumerate(rows):
                v = row["values"].get(lab)
                if v is None or v["post"] is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                xs.append(x)
                ys.append(v["post"])
                if v["pre"] is not None:
                    pre_x.append(x)
                    pre_y.append(v["pre"])
            if xs:  # one colour per run across panels
                ax.bar(xs, ys, width * 0.9, label=lab, color=f"C{j % 10}")
            if pre_x:
                ax.scatter(pre_x, pre_y, marker="_", s=150, linewidths=2, color="black", zorder=3,
                           label=None if pre_labelled else "pre-edit")
                pre_labelled = True
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['metric']}\n{r['protocol']}" + ("" if r["stage"] == "post" else f" ({r['stage']})")
                            for r in rows], fontsize=8)
        if rows and all(is_fraction(r) for r in rows):
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("mean over cases")
        elif rows:
            ax.set_ylabel("value (bits / nats)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0, 0].set_title("post-edit means by metric and protocol")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``report.md``, ``report.json`` and ``report.png`` into ``out_dir`` (created)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputFileError(f"--out '{out}' is a file; pass a folder for report.md, report.json and report.png")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(render(report, "markdown"), encoding="utf-8")
    js = out / "report.json"
    js.write_text(render(report, "json") + "\n", encoding="utf-8")
    return [md, js, write_chart(report, out / "report.png")]
