"""Health monitor of long sequential runs (``--monitor-every N``).

Every N edits (and after the last) :class:`Monitor` records one row of ``monitor.jsonl`` in the
run directory: the edit count, how far the edited weights' norms have grown, locality agreement
on a fixed probe set, the retained reliability of a fixed sample of the edits made so far, and the
perplexity of a few held-out paragraphs. With ``collapse_below`` set (``--stop-on-collapse``) a row
whose probe locality or retained reliability falls below it ends the run with
:class:`RunCollapsed`.

The probes score the model as it is (weights and hooks), not through an edit's prompt transform,
so they measure the weight editors the monitor is for.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from medit.core.edit import Edit, WeightEdit
from medit.core.io import JsonlAppender, atomic_write_with
from medit.core.queries import TFQuery
from medit.errors import MeditError
from medit.evaluation.memory import current_rss_mb, peak_rss_mb

if TYPE_CHECKING:
    from medit.core.requests import EditRequest
    from medit.model.handle import ModelHandle
    from medit.scoring.engine import Scorer

MONITOR_FILE = "monitor.jsonl"
#: held-out text for the perplexity probe: the WikiText-2 test sample the package ships.
HELD_OUT = Path(__file__).resolve().parents[1] / "datasets" / "wikitext-2-test-sample.txt"


class RunCollapsed(MeditError):
    """A monitored sequential run whose health probes fell below the collapse threshold."""


@dataclass
class MonitorConfig:
    """``every``: edits between rows; ``collapse_below``: stop when probe locality agreement or
    retained reliability falls below it (None: never stop); the sizes of the fixed probe sets."""

    every: int
    collapse_below: float | None = None
    probes: int = 20
    retained: int = 20
    held_out: int = 16
    held_out_words: int = 48

    def __post_init__(self) -> None:
        if self.every < 1:
            raise MeditError(f"--monitor-every {self.every} must be at least 1 (edits between health rows)")
        if self.collapse_below is not None and not 0 < self.collapse_below <= 1:
            raise MeditError(f"collapse threshold {self.collapse_below} must be in (0, 1]; pass e.g. "
                             "--collapse-threshold 0.5")


def held_out_queries(n: int, words: int) -> list[TFQuery]:
    """The first ``n`` paragraphs of the held-out text, each as 8 words of prompt and the rest
    (up to ``words``) as target."""
    out = []
    for line in HELD_OUT.read_text(encoding="utf-8").splitlines():
        w = line.split()
        if len(w) >= 16:
            out.append(TFQuery(" ".join(w[:8]), " ".join(w[8:words])))
        if len(out) == n:
            break
    return out


def fit_context(handle: "ModelHandle", scorer: "Scorer", q: TFQuery) -> TFQuery | None:
    """``q`` with its target cut by words until prompt and target fit well inside the model's context."""
    from medit.model.guards import context_limit
    limit = context_limit(handle) // 2
    words = q.target.split()
    while words:
        target = " ".join(words)
        ids = scorer.encode_pair(q.prompt, target)
        if len(ids[0]) + len(ids[1]) <= limit:
            return TFQuery(q.prompt, target)
        words = words[:len(words) * 3 // 4]
    return None


def norm_growth(handle: "ModelHandle", edits: Sequence[Edit]) -> dict[str, float]:
    """‖W‖ / ‖W₀‖ (Frobenius) of every weight the edits changed, by parameter name."""
    originals: dict[str, torch.Tensor] = {}
    for e in edits:
        if isinstance(e, WeightEdit):
            for name, w0 in e.originals.items():
                originals.setdefault(name, w0)
    params = dict(handle.model.named_parameters())
    with torch.no_grad():
        return {n: float(params[n].detach().float().norm() / w0.float().norm().clamp_min(1e-30))
                for n, w0 in originals.items()}


class Monitor:
    """Scores the fixed probes before the first edit (:meth:`start`) and every ``every`` edits
    (:meth:`after`), appending each row to ``out_dir/monitor.jsonl`` as it is measured."""

    def __init__(self, handle: "ModelHandle", scorer: "Scorer", sequence: Sequence["EditRequest"],
                 cfg: MonitorConfig, out_dir: Path | None) -> None:
        self.handle, self.scorer, self.cfg = handle, scorer, cfg
        self.sequence = list(sequence)
        self.probes = [TFQuery(x.prompt, x.answer) for r in self.sequence for x in r.locality if x.answer]
        self.probes = self.probes[:cfg.probes]
        self.held_out = [q for q in (fit_context(handle, scorer, q) for q in held_out_queries(cfg.held_out, cfg.held_out_words))
                         if q is not None]
        self.path = out_dir / MONITOR_FILE if out_dir is not None else None
        self.rows: list[dict[str, Any]] = []
        self._pre: list[tuple[int, ...]] = []
        self._last = -1

    def start(self) -> None:
        """Pre-edit probe predictions and the row at edit count 0."""
        if self.path is not None and self.path.exists():
            self.path.unlink()  # a resumed or repeated run measures its curve again
        self._pre = [r.argmax for r in self.scorer.teacher_forced(self.probes)] if self.probes else []
        self._record(0, [])

    def after(self, done: int, edits: Sequence[Edit], last: bool = False) -> dict[str, Any] | None:
        """The row after ``done`` edits when one is due (every ``every`` edits, and the last);
        raises :class:`RunCollapsed` when it falls below the threshold."""
        if done == self._last or not (last or done // self.cfg.every > self._last // self.cfg.every):
            return None
        row = self._record(done, edits)
        worst = [(k, row[k]) for k in ("probe_locality", "retained_reliability") if row[k] is not None]
        low = [(k, v) for k, v in worst if self.cfg.collapse_below is not None and v < self.cfg.collapse_below]
        if low:
            k, v = low[0]
            where = f" (the curve is in {self.path})" if self.path is not None else ""
            raise RunCollapsed(f"sequential run stopped after {done} edits: {k.replace('_', ' ')} {v:.3f} fell below "
                               f"the collapse threshold {self.cfg.collapse_below}{where}; edit fewer facts, "
                               "lower the method's step, or drop --stop-on-collapse to run on")
        return row

    def _record(self, done: int, edits: Sequence[Edit]) -> dict[str, Any]:
        t0 = time.perf_counter()
        growth = norm_growth(self.handle, edits)
        now = self.scorer.teacher_forced(self.probes) if self.probes else []
        agree = [sum(a == b for a, b in zip(p, n.argmax)) / len(p) for p, n in zip(self._pre, now)]
        sample = [r for r in self.sequence[:done]][:self.cfg.retained]
        kept = self.scorer.teacher_forced([TFQuery(r.prompt, r.target_new) for r in sample]) if sample else []
        held = self.scorer.teacher_forced(self.held_out) if self.held_out else []
        tokens = sum(len(h.logprobs) for h in held)
        nll = -sum(sum(h.logprobs) for h in held) / tokens if tokens else None
        row = {
            "edits": done,
            "norm_growth_max": round(max(growth.values()), 6) if growth else 1.0,
            "norm_growth_mean": round(sum(growth.values()) / len(growth), 6) if growth else 1.0,
            "probe_locality": round(sum(agree) / len(agree), 6) if agree else None,
            "retained_reliability": round(sum(k.token_acc for k in kept) / len(kept), 6) if kept else None,
            "perplexity": round(math.exp(nll), 4) if nll is not None else None,
            "probes": len(self.probes), "retained_sample": len(sample),
            # memory against the edit count: what a longer run's peak can be extrapolated from
            "rss_mb": _round(current_rss_mb()), "peak_rss_mb": round(peak_rss_mb(), 1), "monitor_s": 0.0,
        }
        row["monitor_s"] = round(time.perf_counter() - t0, 3)
        self.rows.append(row)
        self._last = done
        if self.path is not None:
            with JsonlAppender(self.path) as w:
                w.write(row)
        return row


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def read_monitor(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``monitor.jsonl`` (empty when it has none)."""
    from medit.core.io import read_jsonl_tolerant
    path = Path(run_dir) / MONITOR_FILE
    return read_jsonl_tolerant(path) if path.is_file() else []


#: the monitor chart's panels: (row field, title).
PANELS = (("norm_growth_max", "largest norm growth ‖W‖/‖W₀‖"), ("probe_locality", "probe locality agreement"),
          ("retained_reliability", "retained reliability (token_acc)"), ("perplexity", "held-out perplexity"))


def write_monitor_chart(curves: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """``monitor.png``: each panel of :data:`PANELS` against the edit count, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for label, rows in curves.items():
            pts = [(r["edits"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out
