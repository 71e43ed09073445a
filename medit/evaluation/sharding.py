"""Sharded evaluation: the cases of one run split over torchrun ranks (``single`` and ``batch`` modes).

* The cases still to do are split deterministically: in units of one case (single mode) or one
  batch of ``batch_size`` cases (batch mode, so every batch is the one a single process would
  apply), unit ``i`` to rank ``i mod WORLD_SIZE``.
* Each rank appends its rows to ``cases.rank-K.jsonl`` as it goes; at the end the rows are
  gathered on rank 0, which writes ``cases.jsonl`` in dataset order (atomically) and removes the
  rank files.
* ``--resume`` reads every case file in the run folder (``cases.jsonl`` and all rank files, of
  whatever world size wrote them), so a run killed under one world size continues under another:
  the remaining cases are split anew.

Sequential mode edits every case into one model one after another and cannot be split; batch mode
needs a ``batch_size`` (a single batch of everything is one edit, see ``medit edit``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

from medit.core import distributed
from medit.core.io import read_jsonl_records
from medit.errors import MeditError
from medit.evaluation.rundir import CASES, case_files, rewrite_cases

T = TypeVar("T")


def ranks() -> int:
    """How many ranks split this evaluation: the world size when the process group is up and the
    ranks are not running one shared job (:func:`medit.core.distributed.shared`), else 1."""
    return distributed.world() if distributed.started() and not distributed.in_shared() else 1


def check_shardable(mode: str, batch_size: int, world: int) -> None:
    """Refuse a mode that cannot be split over ``world`` ranks (one line, before any work)."""
    if world <= 1:
        return
    if mode == "sequential":
        raise MeditError(f"WORLD_SIZE={world}: sequential mode edits every case into one model, one after another, "
                         "so torchrun ranks cannot split it; run it in one process (plain `medit ...`) or use "
                         "--mode single or --mode batch")
    if mode == "batch" and batch_size <= 0:
        raise MeditError(f"WORLD_SIZE={world}: batch mode without --batch-size is one batch of every case, which "
                         "torchrun ranks cannot split; pass --batch-size N (whole batches go to each rank), or apply "
                         "one batch over all ranks with `medit edit`")


def case_file(out: Path, which: int, world: int) -> Path:
    """The file rank ``which`` appends to: ``cases.rank-K.jsonl`` with several ranks."""
    return out / (CASES if world <= 1 else f"cases.rank-{which}.jsonl")


def finished(out: Path) -> dict[str, dict[str, Any]]:
    """The rows already written in ``out`` by case id (every case file; the first row of a case
    wins; a crash's torn last line is dropped)."""
    done: dict[str, dict[str, Any]] = {}
    for path in case_files(out):
        for rec in read_jsonl_records(path)[0]:
            done.setdefault(str(rec.get("case_id")), rec)
    return done


def clean(path: Path) -> None:
    """Drop a torn last line (and repeated cases) of the file this process appends to."""
    found, torn = read_jsonl_records(path)
    seen: set[str] = set()
    keep = []
    for rec in found:
        cid = str(rec.get("case_id"))
        if cid not in seen:
            seen.add(cid)
            keep.append(rec)
    if torn or len(keep) < len(found):
        rewrite_cases(path, keep)


def split(todo: Sequence[T], mode: str, batch_size: int, world: int, which: int) -> list[T]:
    """Rank ``which``'s share of ``todo``: units of one case (single) or ``batch_size`` cases
    (batch), unit ``i`` to rank ``i mod world``, kept in order."""
    if world <= 1:
        return list(todo)
    size = max(1, batch_size) if mode == "batch" else 1
    units = [list(todo[i:i + size]) for i in range(0, len(todo), size)]
    return [item for unit in distributed.shard(units, world, which) for item in unit]


def gather(records: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every rank's new rows (each rank's list, concatenated in rank order)."""
    return [r for part in distributed.all_gather_objects(records, world) for r in part]


def finish(out: Path, records: list[dict[str, Any]]) -> None:
    """Rank 0: write the run's rows (already in dataset order) as ``cases.jsonl`` and remove the
    rank files they came from."""
    ranked = [p for p in case_files(out) if p.name != CASES]
    rewrite_cases(out / CASES, records)
    for p in ranked:
        p.unlink(missing_ok=True)
