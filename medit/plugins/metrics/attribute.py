"""Other attribution: the edited subject's *other* facts must stay.

Editing "Grant Hill is a basketball player" into "soccer player" must not change his nationality.
The prompts come from the request's ``attribute`` list (``[{"prompt", "answer"}]``, prompts about
the edited subject's other relations, each with its true answer):

- KnowEdit: the ``Relation_Specificity`` locality items (they stay in ``locality`` too);
- the medit JSONL format: the record's ``attribute`` field;
- any other dataset (CounterFact, zsRE, ...): :func:`attribute_from_pool` fills it from the other
  records of the same subject in a pool of dataset files (``--attribute-pool FORMAT:PATH``,
  repeatable; default the evaluated file), each such record's prompt answered with its true
  answer. Records of the same fact are left out: the same prompt, no true answer, or a true
  answer equal to the edited case's true or new answer (a rephrasing of the edited relation, which
  should change).

Reported, over a case's attribute prompts that have an answer (cases without any are not
counted; ``n`` in the summary says how many were):

- ``agreement``: teacher-forced on the true answer, the fraction of answer tokens whose argmax is
  the same before and after the edit (as locality's ``agreement``; post only);
- ``token_acc`` / ``exact``: accuracy on the true answer, pre and post.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from medit import hookimpl
from medit.core.metric import Metric, Results, Values, mean, staged
from medit.core.queries import TFQuery, normalise
from medit.core.requests import EditRequest, PromptAnswer


class Attribute(Metric):
    name = "attribute"
    description = ("the edited subject's other facts keep their answers (agreement, token_acc); prompts from "
                   "the data's attribute list or --attribute-pool (opt-in)")
    protocols = ("token_acc", "exact")

    @staticmethod
    def items(req: EditRequest) -> list[PromptAnswer]:
        return [pa for pa in req.attribute if pa.answer]

    def queries(self, req: EditRequest, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        return [TFQuery(pa.prompt, pa.answer) for pa in self.items(req)]

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        items = self.items(req)
        if not items:
            return {}
        out: Values = {}
        if pre is not None:
            agree = []
            for pa in items:
                a, b = pre[TFQuery(pa.prompt, pa.answer)], post[TFQuery(pa.prompt, pa.answer)]
                agree.append(sum(x == y for x, y in zip(a.argmax, b.argmax)) / len(a.argmax))
            out["agreement"] = {"pre": None, "post": mean(agree)}
        for proto in protocols:
            if proto in self.protocols:
                out[proto] = staged(pre, post, lambda res, p=proto: [
                    getattr(res[TFQuery(pa.prompt, pa.answer)], p) for pa in items])
        return out


def _same_fact(req: EditRequest, other: EditRequest) -> bool:
    if other.prompt == req.prompt or not other.target_true:
        return True
    answer = normalise(other.target_true)
    return answer in {normalise(req.target_true or ""), normalise(req.target_new)}


def attribute_from_pool(requests: Sequence[EditRequest], pool: Iterable[EditRequest]) -> list[EditRequest]:
    """``requests`` with an empty ``attribute`` list filled from ``pool``: the prompts (answered
    with their true answers) of the pool's other facts about the same subject, in pool order,
    one per prompt. Requests whose data already give ``attribute`` prompts are kept as they are."""
    by_subject: dict[str, list[EditRequest]] = {}
    for r in pool:
        by_subject.setdefault(r.subject.strip(), []).append(r)
    out = []
    for req in requests:
        if req.attribute:
            out.append(req)
            continue
        seen: dict[str, PromptAnswer] = {}
        for other in by_subject.get(req.subject.strip(), ()):
            if not _same_fact(req, other) and other.prompt not in seen:
                seen[other.prompt] = PromptAnswer(other.prompt, other.target_true or "")
        out.append(dataclasses.replace(req, attribute=tuple(seen.values())) if seen else req)
    return out


@dataclasses.dataclass
class AttributePool:
    """The records :func:`attribute_from_pool` draws from, and where they came from (for the
    manifest: ``{"specs", "fingerprints", "n"}``)."""

    requests: list[EditRequest]
    info: dict[str, Any]


def load_attribute_pool(specs: Sequence[str], skip_invalid: bool = True) -> AttributePool:
    """Every record of the dataset files ``specs`` (``FORMAT:PATH`` or ``PATH``), in order. Invalid
    records are left out by default (one warning counts them): the pool only lends prompts."""
    from medit.core.dataset import load_dataset
    requests: list[EditRequest] = []
    fingerprints = []
    for spec in specs:
        reqs, info = load_dataset(spec, skip_invalid=skip_invalid)
        requests += reqs
        fingerprints.append(info.fingerprint)
    return AttributePool(requests, {"specs": [str(s) for s in specs], "fingerprints": fingerprints,
                                    "n": len(requests)})


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Attribute())
