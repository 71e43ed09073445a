"""The metric contract. A metric declares the queries it needs for a request; the evaluation
engine scores the queries of many cases in shared batches, pre- and post-edit, and hands each
metric its results. Every value a metric returns is keyed by the protocol that produced it.

A *run-level* metric (``other_task``) measures the model as a whole rather than a case: it
declares :meth:`Metric.run_queries` instead of per-case queries. The engine scores those once
before editing and, after editing, with the edits of a sample of cases (``run_sample`` evenly
spaced cases in single mode, as many batches in batch mode, once after the last edit in sequential
mode); only the sampled cases' results hold them, so :meth:`Metric.compute` returns values for
those cases alone and the run's mean is over the sampled edits.

A metric that takes options (files, sizes) gets them through :meth:`Metric.configure`, which
returns a configured copy (``EvalConfig.metric_options``, CLI flags such as ``--other-task-text``).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

from medit.core.requests import EditRequest
from medit.core.queries import GenQuery, TFQuery, TFResult, answer_matches, generation_matches

#: every scoring protocol; ``answer`` (a full greedy answer, see :func:`answer_matches`) is
#: opt-in (``--protocol``) and on by default with ``--chat``.
PROTOCOLS = ("answer", "generate", "token_acc", "exact", "prob")
#: the protocols a run scores unless told otherwise.
DEFAULT_PROTOCOLS = ("generate", "token_acc", "exact", "prob")
#: the ``answer`` protocol's default token limit (``--answer-tokens``).
ANSWER_TOKENS = 24
#: protocol -> {"pre": value or None, "post": value}
Values = dict[str, dict[str, float | None]]
Results = Mapping[Any, Any]


class Metric:
    """Base class for metrics; subclasses implement :meth:`queries` and :meth:`compute`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: protocols this metric can report (besides the metric-specific ones such as ``agreement``).
    protocols: ClassVar[tuple[str, ...]] = ("generate", "token_acc", "exact")

    #: run-level metrics: how many edits (single mode) or batches (batch mode) to measure after.
    run_sample: int = 10
    #: the ``answer`` protocol's token limit; the evaluation engine sets it on its copy of the metric.
    answer_tokens: int = ANSWER_TOKENS

    def queries(self, req: EditRequest, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        return []

    def run_queries(self, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        """Queries about the model as a whole, the same for every case (run-level metrics only)."""
        return []

    def configure(self, **options: Any) -> "Metric":
        """A copy of this metric with ``options`` applied; the base class takes none."""
        if options:
            from medit.errors import ValidationError
            raise ValidationError(f"metric {self.name!r} takes no options; got {', '.join(sorted(options))}")
        return self

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        raise NotImplementedError


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def staged(pre: Results | None, post: Results, scores: Callable[[Results], list[float]]) -> dict[str, float | None]:
    """``{"pre": mean of scores(pre), "post": mean of scores(post)}`` (``pre`` None when not scored)."""
    return {stage: None if res is None else mean(scores(res)) for stage, res in (("pre", pre), ("post", post))}


class TargetMetric(Metric):
    """Shared logic of reliability, generalization and portability: each of a list of prompts
    should be answered with a target; scored under every requested protocol."""

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str | None]]:
        """(prompt, expected answer, competing answer for ``prob`` or None)."""
        raise NotImplementedError

    def queries(self, req: EditRequest, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        qs: list[Any] = []
        for prompt, target, rival in self.pairs(req):
            if {"token_acc", "exact", "prob"} & set(protocols):
                qs.append(TFQuery(prompt, target))
            if "prob" in protocols and rival:
                qs.append(TFQuery(prompt, rival))
            if "generate" in protocols:
                qs.append(GenQuery(prompt, gen_tokens))
            if "answer" in protocols:
                qs.append(GenQuery(prompt, self.answer_tokens))
        return qs

    def _score(self, res: Results, protocol: str, prompt: str, target: str, rival: str | None,
               gen_tokens: int) -> float | None:
        if protocol == "token_acc":
            return float(res[TFQuery(prompt, target)].token_acc)
        if protocol == "exact":
            return float(res[TFQuery(prompt, target)].exact)
        if protocol == "prob":
            if not rival:
                return None
            r_new: TFResult = res[TFQuery(prompt, target)]
            r_old: TFResult = res[TFQuery(prompt, rival)]
            return float(r_new.mean_logprob > r_old.mean_logprob)
        if protocol == "generate":
            gen = res.get(GenQuery(prompt, gen_tokens))
            return None if gen is None else generation_matches(gen, target)
        if protocol == "answer":
            ans = res.get(GenQuery(prompt, self.answer_tokens))
            return None if ans is None else answer_matches(ans, target, rival)
        return None

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        out: Values = {}
        pairs = self.pairs(req)
        if not pairs:
            return out
        for proto in protocols:
            if proto not in self.protocols:
                continue
            vals = staged(pre, post, lambda res: [
                s for p, t, r in pairs if (s := self._score(res, proto, p, t, r, ctx["gen_tokens"])) is not None])
            if vals["post"] is not None:
                out[proto] = vals
        return out
