"""Side-by-side comparison of finished runs (``medit report RUN_DIR...``).

Reads each run folder's ``summary.json`` (required) and ``manifest.json`` (optional; it adds the
dataset and protocols) as DESIGN.md "Run outputs" defines them, and builds one report: a row per
metric and protocol (``answer`` first when present, then ``generate``), a column per run holding the post-edit mean, and a
``pre`` column where every run measured the same pre-edit value (the same model and cases);
otherwise each cell shows ``pre → post``. A mean that carries its 95% bootstrap interval
(``ci95`` in summary.json) is shown as ``0.950 ±0.080`` (the larger distance to a bound).
Efficiency figures follow as extra rows. Stages other than ``pre``/``post`` that a summary may
carry (e.g. ``immediate``) get rows of their own.

With two or more runs, each later run is compared with the first, case for case: over the cases
both scored (the same case id *and* the same request, read from each folder's ``cases.jsonl``),
the paired bootstrap of the mean difference (run - first) of every metric and protocol, with its
95% interval; a difference whose interval excludes 0 is marked ``*``
(:mod:`medit.evaluation.intervals`). Runs on different data, models or numbers of cases get a
warning in the table and the charts.

The report renders as a plain table, a Markdown table or JSON, and :func:`write_report` writes
``report.md``, ``report.json``, a bar chart ``report.png`` and a trade-off chart
``tradeoff.png`` (matplotlib, Agg backend).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from medit.core.io import atomic_write_text
from medit.errors import InputFileError, UnknownNameError
from medit.evaluation.intervals import SUMMARY_FIELDS, half_width, paired_difference

__all__ = ["FORMATS", "Run", "load_run", "load_runs", "build_report", "render", "write_report"]

FORMATS = ("table", "markdown", "json")
METRIC_ORDER = ("reliability", "generalization", "locality", "portability", "attribute", "distracting",
                "other_task", "fluency")
PROTOCOL_ORDER = ("answer", "generate", "token_acc", "exact", "prob", "agreement", "answer_agreement",
                  "generate_agreement", "kl",
                  "ngram_entropy", "perplexity", "mc_acc", "mc_agreement")
EFFICIENCY_KEYS = ("edit_s_mean", "edit_s_total", "eval_s_total", "stats_s", "template_s", "pool_s", "peak_rss_mb",
                   "peak_gpu_mb")


@dataclass
class Run:
    """One finished run folder."""

    path: Path
    summary: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    _cases: dict[str, dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.manifest.get("method") or "?")

    def cases(self) -> dict[str, dict[str, Any]]:
        """The run's case rows by case id (``cases.jsonl``; empty when the folder has none)."""
        if self._cases is None:
            from medit.core.io import read_jsonl_records
            found, _ = read_jsonl_records(self.path / "cases.jsonl")
            self._cases = {str(r.get("case_id")): r for r in found}
        return self._cases

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
                values = {k: _cell(v, stage) for k, v in cells.items() if stage in v}
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
    report = {"runs": [r.info() for r in runs], "warnings": _warnings(runs), "rows": rows, "efficiency": efficiency,
              "paired": _paired(runs, rows)}
    from medit.evaluation.monitor import read_monitor
    curves = {r.label: rows for r in runs if (rows := read_monitor(r.path))}
    if curves:  # sequential runs with --monitor-every: their health rows, by run label
        report["monitor"] = curves
    return report


def _cell(v: dict[str, Any], stage: str) -> dict[str, Any]:
    """A run's value of a row: pre and the stage's mean, and (post only) its interval and n."""
    out: dict[str, Any] = {"pre": _num(v.get("pre")), "post": _num(v.get(stage))}
    if stage == "post":
        ci = v.get("ci95")
        if isinstance(ci, list) and len(ci) == 2 and all(_num(x) is not None for x in ci):
            out["ci95"] = [float(ci[0]), float(ci[1])]
        if isinstance(v.get("n"), int):
            out["n"] = v["n"]
    return out


def _warnings(runs: Sequence[Run]) -> list[str]:
    """What makes the runs' numbers not comparable side by side."""
    if len(runs) < 2:
        return []
    out = []
    keys = ("format", "path", "fingerprint", "offset", "n", "seed")

    def data(r: Run) -> tuple[Any, ...] | None:
        ds = r.manifest.get("dataset")
        if not isinstance(ds, dict) or not ds:
            return None
        return tuple(ds.get(k, r.manifest.get(k)) for k in keys)  # older manifests keep n only at the top

    found = {r.label: data(r) for r in runs}
    unknown = [lab for lab, d in found.items() if d is None]
    if unknown:
        out.append(f"dataset unknown for {', '.join(unknown)} (no manifest.json): the runs may not share their cases")
    known = {d for d in found.values() if d is not None}
    if len(known) > 1:
        out.append("the runs were evaluated on different data (" + "; ".join(
            f"{lab}: {d[0]}:{Path(str(d[1])).name} offset {d[3]} n {d[4]}" for lab, d in found.items() if d)
            + "): their numbers are not comparable case for case")
    models = {r.label: r.info()["model"] for r in runs}
    if len(set(models.values())) > 1:
        out.append("the runs edited different models (" + ", ".join(f"{k}: {v}" for k, v in models.items()) + ")")
    ns = {r.label: r.summary.get("n") for r in runs}
    if len(set(ns.values())) > 1 and len(known) <= 1:
        out.append("the runs scored different numbers of cases (" + ", ".join(f"{k}: {v}" for k, v in ns.items()) + ")")
    return out


def _paired(runs: Sequence[Run], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each later run against the first, on the cases both scored with the same request."""
    if len(runs) < 2:
        return []
    base = runs[0]
    out: list[dict[str, Any]] = []
    for other in runs[1:]:
        a_cases, b_cases = base.cases(), other.cases()
        shared = []
        for cid, a in a_cases.items():
            b = b_cases.get(cid)
            if b is None:
                continue
            ra, rb = a.get("request") or {}, b.get("request") or {}
            if (ra.get("prompt"), ra.get("target_new")) == (rb.get("prompt"), rb.get("target_new")):
                shared.append((a, b))
        for row in rows:
            if row["stage"] != "post":
                continue
            m, p = row["metric"], row["protocol"]
            xs, ys = [], []
            for a, b in shared:
                va = _num((((a.get("metrics") or {}).get(m) or {}).get(p) or {}).get("post"))
                vb = _num((((b.get("metrics") or {}).get(m) or {}).get(p) or {}).get("post"))
                if va is not None and vb is not None:
                    xs.append(va)
                    ys.append(vb)
            if len(xs) < 2:
                continue
            d = paired_difference(xs, ys)
            out.append({"metric": m, "protocol": p, "baseline": base.label, "run": other.label, **d})
    return out


# ------------------------------------------------------------------------------ rendering

def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fci(v: dict[str, Any]) -> str:
    """A post value with its ``±`` (when it has an interval)."""
    hw = None if v.get("post") is None else half_width(v["post"], v.get("ci95"))
    return _f(v.get("post")) + ("" if hw is None else f" ±{hw:.3f}")


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
                cells.append(f"{_f(v['pre'])} → {_fci(v)}")
            else:
                cells.append(_fci(v))
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
    tablefmt = "github" if fmt == "markdown" else "simple"
    headers, rows = _table_rows(report)
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    legend = []
    for r in report["runs"]:
        ds = r.get("dataset") or {}
        where = f"{ds.get('format')}:{ds.get('path')}" if ds.get("path") else "dataset unknown"
        legend.append(f"{r['label']}: {r['path']} (model {r['model']}, mode {r['mode']}, n={r['n']}, {where})")
    warnings = [f"Warning: {w}" for w in report.get("warnings") or []]
    paired = _paired_table(report, tablefmt)
    if fmt == "markdown":
        return ("Runs:\n\n" + "\n".join(f"- {line}" for line in legend) + "\n\n"
                + "".join(f"**{w}**\n\n" for w in warnings) + table
                + "\n\nCells are post-edit means over cases with the half-width of their 95% bootstrap interval "
                  "(`±`); `pre` is the unedited model's value where all runs share it, otherwise cells read "
                  "`pre → post`.\n" + (f"\n{paired}\n" if paired else ""))
    return "\n".join(legend + warnings) + "\n\n" + table + (f"\n\n{paired}" if paired else "")


def _paired_table(report: dict[str, Any], tablefmt: str) -> str:
    pairs = report.get("paired") or []
    if not pairs:
        return ""
    rows = []
    for d in pairs:
        ci = d.get("ci95")
        rows.append([d["metric"], d["protocol"], f"{d['run']} - {d['baseline']}", d["n"],
                     f"{d['diff']:+.3f}" + (" *" if d["significant"] else ""),
                     "" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"])
    head = ("Paired differences over the cases both runs scored (same case id and request); * marks a "
            "difference whose 95% bootstrap interval excludes 0:")
    return head + "\n\n" + tabulate(rows, headers=["metric", "protocol", "difference", "n", "mean", "95% interval"],
                                      tablefmt=tablefmt, disable_numparse=True)


#: the files ``write_report`` writes into its folder
REPORT_FILES = ("report.md", "report.json", "report.png", "tradeoff.png", "monitor.png")


def check_report_dir(out_dir: str | Path, force: bool = False) -> None:
    """Refuse a report folder that is a file, or whose report file names hold files medit did not
    write (no medit ``report.json`` beside them), unless ``force``: rewriting an earlier report is
    fine, replacing somebody's own ``report.md`` is not."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputFileError(f"--out '{out}' is a file; pass a folder for report.md, report.json and the charts")
    present = [name for name in REPORT_FILES if (out / name).exists()] if out.is_dir() else []
    if not present or force:
        return
    try:
        earlier = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and {"runs", "rows"} <= set(earlier)):
        raise InputFileError(f"--out '{out}' already holds {present[0]}, which is not from a medit report; "
                             "pass --force to replace it, or choose another folder")


def write_report(report: dict[str, Any], out_dir: str | Path, force: bool = False) -> list[Path]:
    """Write ``report.md``, ``report.json``, ``report.png`` and ``tradeoff.png`` into ``out_dir`` (created),
    and ``monitor.png`` when a run has a health monitor curve; each file atomically. A folder holding
    such files that an earlier medit report did not write is refused unless ``force``."""
    check_report_dir(out_dir, force)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    atomic_write_text(md, render(report, "markdown"))
    js = out / "report.json"
    atomic_write_text(js, render(report, "json") + "\n")
    from medit.evaluation.charts import write_chart, write_tradeoff
    files = [md, js, write_chart(report, out / "report.png"), write_tradeoff(report, out / "tradeoff.png")]
    if report.get("monitor"):
        from medit.evaluation.monitor import write_monitor_chart
        files.append(write_monitor_chart(report["monitor"], out / "monitor.png"))
    return files
