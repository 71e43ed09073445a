"""The cases a finished run missed (``medit report RUN_DIR... --misses``).

A case *misses* a check ``metric.protocol`` when its post-edit score there is below 1 (every
protocol but ``kl`` and ``ngram_entropy`` scores a case in [0, 1], 1 being a hit). Each missed case
is listed with its scores on every check, the edit that made it (its position among that edit's
requests) and what the method reported about that edit (``edit.info`` in ``cases.jsonl``, as
:func:`medit.evaluation.engine.edit_record` writes it), reduced to this case's share: per-request
lists give the case's entry. That is what tells a miss the method saw coming (e.g. ROME/MEMIT's
``realised`` share or ``delta_nll``) from one a later edit caused.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from tabulate import tabulate

from medit.errors import InputFileError, UnknownNameError, ValidationError
from medit.evaluation.report import FORMATS, Run

__all__ = ["DEFAULT_CHECKS", "parse_checks", "case_misses", "render_misses"]

DEFAULT_CHECKS = ("reliability.token_acc", "locality.agreement")
#: protocols whose value is not a [0, 1] hit score, so "below 1" does not mean a miss.
NOT_A_HIT_SCORE = ("kl", "ngram_entropy", "perplexity")
#: info entries longer than this (as JSON) are left out of the table.
MAX_INFO_CHARS = 60


def parse_checks(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``["reliability.token_acc", ...]`` → ``[("reliability", "token_acc"), ...]``."""
    checks = []
    for spec in specs:
        metric, _, protocol = spec.partition(".")
        if not metric or not protocol:
            raise ValidationError(f"check '{spec}' is not METRIC.PROTOCOL; pass e.g. --miss-on reliability.token_acc")
        if protocol in NOT_A_HIT_SCORE:
            raise ValidationError(f"check '{spec}' is not a hit score in [0, 1], so it cannot be missed; pass a "
                             f"protocol such as token_acc, exact, generate, prob or agreement")
        checks.append((metric, protocol))
    return checks


def _case_info(info: dict[str, Any], index: int, size: int) -> dict[str, Any]:
    """This request's share of an edit's info: its entry of per-request lists, short values as they are."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, list) and len(value) == size and key != "layers":
            value = value[index]
        if len(json.dumps(value)) <= MAX_INFO_CHARS:
            out[key] = value
    return out


def case_misses(run: Run, checks: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The run's cases that score below 1 on any check, in file order.

    Each: ``{"case_id", "prompt", "scores": {"metric.protocol": post or None}, "edit": {"index",
    "size"} or None, "info": {...}}``. A batch edit writes its info on its first case only; the
    later cases of that edit get it from there."""
    return _scan(run, checks)[0]


def _scan(run: Run, checks: Sequence[tuple[str, str]]) -> tuple[list[dict[str, Any]], int]:
    """:func:`case_misses` and the number of cases the run holds, from one read of ``cases.jsonl``."""
    path = run.path / "cases.jsonl"
    if not path.is_file():
        raise InputFileError(f"run folder '{run.path}' has no cases.jsonl, so its cases cannot be listed; "
                             f"re-run it with `medit eval ... --out {run.path}`")
    seen = {(m, p): False for m, p in checks}
    out: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    n = 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"'{path}' line {lineno} is not valid JSON ({exc.msg}); finish the run with "
                                 f"`medit eval ... --out {run.path} --resume`") from None
        n += 1
        edit = row.get("edit") or None
        if edit is not None and (edit.get("index") == 0 or "info" in edit):
            info = edit.get("info") or {}
        scores: dict[str, float | None] = {}
        for m, p in checks:
            cell = ((row.get("metrics") or {}).get(m) or {}).get(p)
            post = cell.get("post") if isinstance(cell, dict) else None
            seen[(m, p)] = seen[(m, p)] or cell is not None
            scores[f"{m}.{p}"] = post if isinstance(post, (int, float)) else None
        if any(v is not None and v < 1 - 1e-9 for v in scores.values()):
            where = {"index": edit["index"], "size": edit["size"]} if edit and "index" in edit else None
            out.append({"case_id": row.get("case_id"), "prompt": (row.get("request") or {}).get("prompt", ""),
                        "scores": scores, "edit": where,
                        "info": _case_info(info, where["index"], where["size"]) if where and info else {}})
    missing = [f"{m}.{p}" for (m, p), ok in seen.items() if not ok]
    if missing:
        raise ValidationError(f"run '{run.path}' scored no case on {', '.join(missing)}; pass checks its cases.jsonl "
                              f"holds (the summary lists them: `medit report {run.path}`)")
    return out, n


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def render_misses(runs: Sequence[Run], checks: Sequence[tuple[str, str]], fmt: str = "table") -> str:
    """Each run's missed cases as a table (``table``/``markdown``) or ``json``."""
    per_run = [(r, *_scan(r, checks)) for r in runs]
    if fmt == "json":
        return json.dumps({r.label: rows for r, rows, _ in per_run}, indent=2)
    if fmt not in FORMATS:
        raise UnknownNameError("report format", fmt, FORMATS, hint="pass --format table, markdown or json")
    names = [f"{m}.{p}" for m, p in checks]
    parts = []
    for run, rows, n in per_run:
        # info the missed cases share (layers, statistics time, ...) is said once, above the table
        same = {k: v for k, v in rows[0]["info"].items()
                if all(k in row["info"] and row["info"][k] == v for row in rows[1:])} if len(rows) > 1 else {}
        table = [[row["case_id"]] + [_cell(row["scores"][c]) if row["scores"][c] is not None else "-" for c in names]
                 + [f"{row['edit']['index'] + 1}/{row['edit']['size']}" if row["edit"] else "-",
                    " ".join(f"{k}={_cell(v)}" for k, v in row["info"].items() if k not in same), row["prompt"][:50]]
                 for row in rows]
        head = f"{run.label}: {len(rows)} of {n} cases miss {' or '.join(names)} ({run.path})"
        if same:
            head += "\nevery one of them: " + " ".join(f"{k}={_cell(v)}" for k, v in same.items())
        parts.append(head + "\n\n" + tabulate(table, headers=["case"] + names + ["edit", "info", "prompt"],
                                              tablefmt="github" if fmt == "markdown" else "simple",
                                              disable_numparse=True))
    return "\n\n".join(parts)
