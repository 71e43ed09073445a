"""Distracting neighbourhood: CounterFact+'s neighbourhood score (Hoelscher-Obermaier et al. 2023,
"Detecting Edit Failures In Large Language Models: An Improved Specificity Benchmark").

An edit that overfits to its target can be triggered by the target's mere presence in the context:
"The Eiffel Tower is in Rome. The Louvre is in" must still say Paris. Each of a case's locality
prompts that has an answer is prefixed with the edit statement, in two variants:

- the edit prompt followed by the new target: ``"{prompt} {target_new}. {locality prompt}"``;
- the first rephrase followed by the new target (when the case has a rephrase).

(A full stop is added only when the statement does not already end in ``.``, ``!`` or ``?``.)
A prompt *passes* when the mean per-token log-probability of its true answer (the locality answer)
exceeds that of ``target_new`` after it, as the ``prob`` protocol compares answers; prompts whose
answer is ``target_new`` itself are skipped. Reported per case as the fraction of passing
prompts over both variants:

- ``prob``: that fraction, before the edit (the unedited model can be distracted too: the
  statement is in its context) and after it;
- ``token_acc``: teacher-forced accuracy of the true answer after the distracting prefix, pre and
  post (when ``token_acc`` is among the protocols).
"""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.core.metric import Metric, Results, Values, staged
from medit.core.queries import TFQuery, normalise
from medit.core.requests import EditRequest


def statement(prompt: str, target: str) -> str:
    """``prompt target`` as a sentence: a full stop unless it already ends a sentence."""
    text = f"{prompt.rstrip()} {target.strip()}"
    return text if text.endswith((".", "!", "?")) else text + "."


def distracting_prompts(req: EditRequest) -> list[tuple[str, str]]:
    """(prefixed locality prompt, true answer) for each variant and locality prompt with an answer."""
    prefixes = [statement(req.prompt, req.target_new)]
    if req.rephrase:
        prefixes.append(statement(req.rephrase[0], req.target_new))
    new = normalise(req.target_new)
    out = []
    for prefix in prefixes:
        for pa in req.locality:
            if pa.answer and normalise(pa.answer) != new:
                out.append((f"{prefix} {pa.prompt}", pa.answer))
    return out


class Distracting(Metric):
    name = "distracting"
    description = ("CounterFact+ neighbourhood score: locality prompts after the edit statement still prefer "
                   "their true answer to the new target (opt-in)")
    protocols = ("token_acc",)

    def queries(self, req: EditRequest, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        qs: list[Any] = []
        for prompt, answer in distracting_prompts(req):
            qs += [TFQuery(prompt, answer), TFQuery(prompt, req.target_new)]
        return qs

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        items = distracting_prompts(req)
        if not items:
            return {}

        def passes(res: Results) -> list[float]:
            return [float(res[TFQuery(p, a)].mean_logprob > res[TFQuery(p, req.target_new)].mean_logprob)
                    for p, a in items]

        out: Values = {"prob": staged(pre, post, passes)}
        if "token_acc" in protocols:
            out["token_acc"] = staged(pre, post, lambda res: [res[TFQuery(p, a)].token_acc for p, a in items])
        return out


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Distracting())
