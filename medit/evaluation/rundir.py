"""Run folders (``--out``): what may be written where, checked before any model is loaded.

A run folder holds ``manifest.json``, ``cases.jsonl`` and ``summary.json`` (see docs/outputs.md). medit
writes into a new or empty folder, or continues a medit run folder with ``resume``; it never
writes over results without ``resume``, never over a finished run, and never into a folder of
someone else's files. A patch is never written over its own run folder or its results.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medit.errors import MeditError, PatchError
from medit.core.patchfile import check_target, is_medit_patch

MANIFEST = "manifest.json"
CASES = "cases.jsonl"
SUMMARY = "summary.json"
RESULT_FILES = (MANIFEST, CASES, SUMMARY)


def _has_results(cases: Path) -> bool:
    """Whether ``cases.jsonl`` holds anything, a torn fragment included."""
    try:
        return cases.is_file() and cases.stat().st_size > 0 and bool(cases.read_bytes().strip())
    except OSError:
        return True


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a folder medit wrote as a run (its manifest names a medit version)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "medit_version" in manifest and "method" in manifest


def case_files(out: Path) -> list[Path]:
    """Every case file in the run folder: ``cases.jsonl`` first, then the rank files of a torchrun
    launch (``cases.rank-K.jsonl``, see :mod:`medit.evaluation.sharding`) by rank."""
    def key(p: Path) -> int:
        try:
            return int(p.name[len("cases.rank-"):-len(".jsonl")])
        except ValueError:
            return 1 << 30
    ranked = sorted((p for p in out.glob("cases.rank-*.jsonl") if p.is_file()), key=key)
    return [p for p in [out / CASES, *ranked] if p.is_file()]


def _own_entry(path: Path, name: str) -> bool:
    """Entries medit may find in its own run folder: results, rank files, monitor, report files,
    atomic-write leftovers and saved patches."""
    if name in RESULT_FILES or name == "monitor.jsonl" or name.startswith(("cases.rank-", "report.")):
        return True
    if name.startswith(".") and name.endswith(".tmp"):
        return True
    return is_medit_patch(path / name)


def check_out_dir(out: str | Path, resume: bool) -> None:
    """Refuse a ``--out`` that medit must not write into (see the module docstring)."""
    p = Path(out)
    if not p.exists():
        if p.is_symlink():
            raise MeditError(f"--out {str(p)!r} is a dangling link; remove it or choose another folder")
        return
    if not p.is_dir():
        raise MeditError(f"--out {str(p)!r} is an existing file, not a folder; pass a new or empty folder")
    names = sorted(e.name for e in p.iterdir())
    if not names:
        return
    if not is_run_dir(p) and not (p / CASES).exists() and not (p / SUMMARY).exists():
        raise MeditError(f"--out {str(p)!r} holds files medit did not write (e.g. {names[0]!r}); pass a new "
                         "or empty folder, or a medit run folder with --resume")
    if (p / SUMMARY).exists():
        if resume:
            raise MeditError(f"run folder {str(p)!r} is finished (it holds {SUMMARY}), so there is nothing to "
                             "resume; read it with `medit report` or choose another --out to run again")
        raise MeditError(f"run folder {str(p)!r} already holds results ({SUMMARY}); choose another --out")
    written = [q.name for q in case_files(p) if _has_results(q)]
    if written and not resume:
        raise MeditError(f"run folder {str(p)!r} already holds results ({written[0]}); pass --resume to continue "
                         "it or choose another --out")
    foreign = [n for n in names if not _own_entry(p, n)]
    if foreign:
        raise MeditError(f"--out {str(p)!r} holds files medit did not write (e.g. {foreign[0]!r}); pass a new "
                         "or empty folder, or a medit run folder with --resume")


def check_patch_path(patch: str | Path, out: str | Path | None, force: bool) -> None:
    """Refuse a ``--save-patch`` destination that would replace its run's results or anything medit
    did not write (an existing medit patch needs ``force``)."""
    target = Path(patch).resolve()
    if out is not None:
        run = Path(out).resolve()
        if target == run or run.is_relative_to(target):
            raise PatchError(f"--save-patch {str(patch)!r} would replace the run folder {str(out)!r} and its "
                             f"results; save the patch beside them instead, e.g. --save-patch {Path(out) / 'patch'}")
        if target.parent == run and target.name in RESULT_FILES:
            raise PatchError(f"--save-patch {str(patch)!r} would replace the run's {target.name}; save the patch "
                             f"in its own folder, e.g. --save-patch {Path(out) / 'patch'}")
    check_target(Path(patch), force)


#: manifest entries a resumed run must share with the run it continues (model: id, weights, dtype)
RESUME_KEYS = ("method", "hparams", "mode", "batch_size", "also_immediate", "protocols", "metrics",
               "metric_options", "gen_tokens", "dataset", "n", "offset", "seed")


def _resume_view(manifest: dict[str, Any]) -> dict[str, Any]:
    model = manifest.get("model") or {}
    return {**{k: manifest[k] for k in RESUME_KEYS if k in manifest},
            "model": {k: model[k] for k in ("id", "fingerprint", "dtype") if k in model}}


def _differences(old: Any, new: Any, name: str) -> list[tuple[str, Any, Any]]:
    # only keys both sides have: a manifest written by an older medit lacks newer settings
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) & set(new), key=str)
                for d in _differences(old[k], new[k], f"{name}.{k}")]
    return [] if old == new else [(name, old, new)]


def check_resumable(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse to resume the run in ``out`` with settings other than those it started with: its
    finished cases would be mixed with cases from another configuration."""
    try:
        old = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return  # no readable manifest: the cases themselves are all there is to go on
    diffs = _differences(_resume_view(old), _resume_view(json.loads(json.dumps(manifest))), "")
    if diffs:
        name, was, now = diffs[0]
        raise MeditError(f"run folder {str(out)!r} was started with {name.lstrip('.')} = {was!r}, not {now!r}; "
                         "resume it with the settings it started with, or choose another --out")


def rewrite_cases(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` as the case file ``path`` (atomically): drops a torn trailing line left by
    a crash so appends continue on a clean file, or writes a merged file."""
    from medit.core.io import atomic_write_text
    import json
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))
