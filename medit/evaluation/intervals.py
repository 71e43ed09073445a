"""Bootstrap intervals over cases, and the paired comparison of two runs.

Every interval here is a seeded percentile bootstrap: the cases are resampled with replacement
``N_BOOT`` times (seed ``SEED``, so a summary is reproducible to the bit), the mean of each resample
is taken, and the 2.5th and 97.5th percentiles of those means bound the 95% interval. Bounds are
clipped to the smallest and largest value (no resample mean lies outside them; the clip only
removes floating-point rounding), so a metric that is the same on every case has the interval
``[v, v]``. One value gives no interval (``None``): a single case says nothing about the spread.

The paired comparison resamples the *differences* of two runs on the cases both scored (the same
case ids and requests), which is much tighter than comparing two independent intervals: most of
the case-to-case spread is shared by the two runs. A difference is marked when its interval
excludes 0.

Torch-free (numpy only), so ``medit report`` runs without torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: what a summary's ``{METRIC: {PROTOCOL: {...}}}`` entry holds besides its stages (pre, post,
#: immediate): the post-edit interval, the interval of the change, the number of cases.
SUMMARY_FIELDS = ("ci95", "delta_ci95", "n")
N_BOOT = 2000
SEED = 0
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float], seed: int = SEED, n_boot: int = N_BOOT,
                 level: float = LEVEL) -> list[float] | None:
    """``[lo, hi]``: the ``level`` percentile-bootstrap interval of the mean of ``values``.

    ``None`` for fewer than two values.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size < 2:
        return None
    lo_v, hi_v = float(x.min()), float(x.max())
    if lo_v == hi_v:
        return [lo_v, hi_v]
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    # Resample in blocks so that a run of many thousand cases stays within a few MB.
    block = max(1, min(n_boot, 4_000_000 // x.size))
    for start in range(0, n_boot, block):
        k = min(block, n_boot - start)
        means[start:start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return [min(max(float(lo), lo_v), hi_v), min(max(float(hi), lo_v), hi_v)]


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = SEED,
                      n_boot: int = N_BOOT) -> dict[str, object]:
    """Mean of ``b - a`` over paired cases, its bootstrap interval and whether it excludes 0.

    ``{"n", "diff", "ci95": [lo, hi] or None, "significant": bool}``; ``significant`` is True only
    when the whole interval lies on one side of 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    d = [float(y) - float(x) for x, y in zip(a, b)]
    ci = bootstrap_ci(d, seed=seed, n_boot=n_boot)
    diff = sum(d) / len(d) if d else None
    significant = ci is not None and (ci[0] > 0.0 or ci[1] < 0.0)
    return {"n": len(d), "diff": diff, "ci95": ci, "significant": significant}


def half_width(mean: float, ci: Sequence[float] | None) -> float | None:
    """The ``±`` shown beside a mean: the larger distance from the mean to a bound (an interval
    near 0 or 1 is lopsided; the larger side never understates it)."""
    if not ci or len(ci) != 2:
        return None
    return max(mean - float(ci[0]), float(ci[1]) - mean, 0.0)
