"""Merging of weight deltas (task vectors), for methods that keep several and fold them into one."""
from __future__ import annotations

from typing import Sequence

import torch


def ties_merge(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging of task vectors: keep each one's ``density`` largest-magnitude entries, elect
    the sign with the larger total mass per entry, average the entries agreeing with it."""
    trimmed = []
    for d in deltas:
        k = max(1, int(density * d.numel()))
        thresh = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= thresh, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign[None]) & (stack != 0)
    total = (stack * agree).sum(0)
    return total / agree.sum(0).clamp_min(1)
