"""Reliability: does the edited prompt now produce target_new?"""
from __future__ import annotations

from medit import hookimpl
from medit.core.metric import TargetMetric
from medit.core.requests import EditRequest


class Reliability(TargetMetric):
    name = "reliability"
    description = "the edit prompt is answered with target_new (prob: P(new) > P(true))"
    protocols = ("answer", "generate", "token_acc", "exact", "prob")

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str | None]]:
        return [(req.prompt, req.target_new, req.target_true)]


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Reliability())
