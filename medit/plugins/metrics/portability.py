"""Portability: are consequences of the edit (multi-hop, aliases) answered correctly?"""
from __future__ import annotations

from medit import hookimpl
from medit.core.metric import TargetMetric
from medit.core.requests import EditRequest


class Portability(TargetMetric):
    name = "portability"
    description = "portability prompts are answered with their expected answers"
    protocols = ("answer", "generate", "token_acc", "exact")

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str | None]]:
        return [(pa.prompt, pa.answer, None) for pa in req.portability if pa.answer]


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Portability())
