"""Generalization: are rephrasings of the edit prompt answered with target_new?"""
from __future__ import annotations

from medit import hookimpl
from medit.core.metric import TargetMetric
from medit.core.requests import EditRequest


class Generalization(TargetMetric):
    name = "generalization"
    description = "rephrased prompts are answered with target_new (mean over rephrasings)"
    protocols = ("answer", "generate", "token_acc", "exact", "prob")

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str | None]]:
        return [(p, req.target_new, req.target_true) for p in req.rephrase]


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Generalization())
