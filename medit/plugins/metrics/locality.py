"""Locality: unrelated prompts must keep their answers.

Reported as ``agreement`` (teacher-forced on the locality answer: fraction of answer tokens whose
argmax is the same before and after the edit, EasyEdit's definition), ``generate_agreement``
(greedy continuations identical before and after), ``kl`` (neighbourhood KL: mean over the
locality prompts of KL(pre || post) between the next-token distributions at the last prompt
position, in nats), and, where the data gives a ground truth, post-edit accuracy under
``token_acc``/``exact``/``generate``/``answer``. With the ``answer`` protocol also
``answer_agreement``: the first sentence of the full greedy answer is the same (normalised)
before and after the edit.
"""
from __future__ import annotations

from typing import Any

from medit import hookimpl
from medit.core.metric import Metric, Results, Values, mean, staged
from medit.core.requests import EditRequest
from medit.core.queries import (DistQuery, GenQuery, TFQuery, answer_matches, first_sentence, generation_matches,
                                kl_divergence, normalise_answer)


class Locality(Metric):
    name = "locality"
    description = "unrelated prompts keep their predictions (agreement) and ground-truth answers"
    protocols = ("answer", "generate", "token_acc", "exact")

    def queries(self, req: EditRequest, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        qs: list[Any] = []
        for pa in req.locality:
            qs.append(DistQuery(pa.prompt))
            if pa.answer:
                qs.append(TFQuery(pa.prompt, pa.answer))
            if "generate" in protocols:
                qs.append(GenQuery(pa.prompt, gen_tokens))
            if "answer" in protocols:
                qs.append(GenQuery(pa.prompt, self.answer_tokens))
        return qs

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        out: Values = {}
        with_answer = [pa for pa in req.locality if pa.answer]
        if pre is not None and with_answer:
            agree = []
            for pa in with_answer:
                a, b = pre[TFQuery(pa.prompt, pa.answer)], post[TFQuery(pa.prompt, pa.answer)]
                agree.append(sum(x == y for x, y in zip(a.argmax, b.argmax)) / len(a.argmax))
            out["agreement"] = {"pre": None, "post": mean(agree)}
        if pre is not None:
            pairs = [(pre.get(DistQuery(pa.prompt)), post.get(DistQuery(pa.prompt))) for pa in req.locality]
            kls = [kl_divergence(p, q) for p, q in pairs if p is not None and q is not None]
            if kls:
                out["kl"] = {"pre": None, "post": mean(kls)}
        if pre is not None and "generate" in protocols and req.locality:
            g = ctx["gen_tokens"]
            same = [float(pre[GenQuery(pa.prompt, g)] == post[GenQuery(pa.prompt, g)]) for pa in req.locality]
            if same:
                out["generate_agreement"] = {"pre": None, "post": mean(same)}
        if pre is not None and "answer" in protocols and req.locality:
            def sentence(res: Results, prompt: str) -> str:
                return normalise_answer(first_sentence(res[GenQuery(prompt, self.answer_tokens)]))
            kept = [float(sentence(pre, pa.prompt) == sentence(post, pa.prompt)) for pa in req.locality]
            out["answer_agreement"] = {"pre": None, "post": mean(kept)}
        for proto in protocols:
            if proto not in self.protocols or not with_answer:
                continue
            if proto == "answer":
                def scores(res: Results) -> list[float]:
                    return [answer_matches(res[GenQuery(pa.prompt, self.answer_tokens)], pa.answer)
                            for pa in with_answer]
            elif proto == "generate":
                def scores(res: Results) -> list[float]:
                    return [generation_matches(res[GenQuery(pa.prompt, ctx["gen_tokens"])], pa.answer)
                            for pa in with_answer]
            else:
                def scores(res: Results, proto: str = proto) -> list[float]:
                    return [getattr(res[TFQuery(pa.prompt, pa.answer)], proto) for pa in with_answer]
            vals = staged(pre, post, scores)
            if vals["post"] is not None:
                out[proto] = vals
        return out


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Locality())
