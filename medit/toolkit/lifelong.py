"""Shared maths of lifelong (sequential) editing.

:class:`RunningMoments` keeps the mean and standard deviation of a stream of feature vectors
(UltraEdit's "lifelong normalization": the statistics of every key and gradient seen so far in a
run, updated turn by turn). They are kept as float64 sums that an update replaces rather than changes
in place, so a reverted edit restores the moments it found exactly (:meth:`RunningMoments.copy`)
and the statistics do not depend on which single-mode edits were tried and reverted before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: standard deviations are floored at this, so a constant feature normalises to 0 instead of inf.
STD_FLOOR = 1e-6


@dataclass
class RunningMoments:
    """Count, sum and sum of squares of the rows seen so far (float64, one vector per feature)."""

    n: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` [T, d]."""
        xd = x.detach().double()
        s, q = xd.sum(0), (xd * xd).sum(0)
        self.total = s if self.total is None else self.total + s.to(self.total.device)
        self.squares = q if self.squares is None else self.squares + q.to(self.squares.device)
        self.n += x.shape[0]

    def copy(self) -> "RunningMoments":
        """A copy that shares the sum tensors: :meth:`add` replaces them instead of changing them in
        place, so it stays as it is now (what a reverted edit restores)."""
        return RunningMoments(self.n, self.total, self.squares)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) per feature; with fewer than two rows the std is 1 (nothing to scale by)."""
        if self.total is None or self.squares is None or self.n == 0:
            raise ValueError("no rows added yet")
        mean = self.total / self.n
        if self.n < 2:
            return mean, torch.ones_like(mean)
        var = ((self.squares - self.n * mean * mean) / (self.n - 1)).clamp_min(0)
        return mean, var.sqrt().clamp_min(STD_FLOOR)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` in float64."""
        mean, std = self.mean_std()
        return (x.double().to(mean.device) - mean) / std


@dataclass
class LifelongMoments:
    """Run state of a lifelong editor: the running moments of each edited parameter's features."""

    by_param: dict[str, RunningMoments] = field(default_factory=dict)

    def of(self, name: str) -> RunningMoments:
        return self.by_param.setdefault(name, RunningMoments())
