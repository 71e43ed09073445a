"""Seconds spent on one-time setup (covariance statistics, context templates, retrieval pools),
kept apart from edit times.

The first edit of a run pays for work that later edits reuse. Code doing such work runs inside
:func:`setup_phase`; the evaluation engine reads :func:`setup_totals` around each edit and
subtracts what was spent there, so ``edit_s`` times the edit alone and the setup is reported in
its own fields (``stats_s``, ``template_s``, ``pool_s``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

#: setup kinds and the efficiency field each is reported in.
SETUP_FIELDS = {"stats": "stats_s", "templates": "template_s", "pool": "pool_s"}

_totals: dict[str, float] = {kind: 0.0 for kind in SETUP_FIELDS}
_active: list[str] = []


@contextlib.contextmanager
def setup_phase(kind: str) -> Iterator[None]:
    """Count the block's wall time as setup of ``kind`` (a key of :data:`SETUP_FIELDS`). Nested
    phases count once, in the outermost."""
    if kind not in SETUP_FIELDS:
        raise ValueError(f"unknown setup kind {kind!r}")
    if _active:
        yield
        return
    _active.append(kind)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _totals[kind] += time.perf_counter() - t0
        _active.pop()


def setup_totals() -> dict[str, float]:
    """Seconds spent so far in this process, per setup kind (a copy)."""
    return dict(_totals)


def setup_since(before: dict[str, float]) -> dict[str, float]:
    """Seconds per setup kind spent since ``before`` (from :func:`setup_totals`)."""
    return {k: _totals[k] - before.get(k, 0.0) for k in _totals}
