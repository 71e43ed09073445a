"""Fluency: n-gram entropy of greedily generated text (the ROME paper's generation fluency).

For each of the request's ``generation_prompts`` (its edit prompt when it has none) the model
generates ``max_new_tokens`` tokens greedily; the prompt plus its continuation is scored with
:func:`ngram_entropy`, the weighted mean of the bi- and tri-gram entropies in bits
(weights 2/3 and 4/3, as ROME's ``compute_n_gram_entropy``). A model that degenerates into
repetition after an edit scores lower than before it. Reported under the protocol
``ngram_entropy`` as the mean over the request's prompts; the value is in bits, not in [0, 1]
(ROME's tables show it multiplied by 100).

Differences from ROME's code: generation is greedy (ROME samples from the top 5 tokens), and words
are split by a regular expression (runs of word characters, each other non-space character
alone) instead of NLTK's ``word_tokenize``, which needs downloaded data.

The metric is opt-in (``--metrics ...,fluency``): it generates far more tokens than the other
metrics score.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Sequence

from medit import hookimpl
from medit.errors import HParamsError
from medit.core.metric import Metric, Results, Values, staged
from medit.core.requests import EditRequest
from medit.core.queries import GenQuery

PROTOCOL = "ngram_entropy"
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens: runs of word characters, and every other non-space character on its own."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean over ``ns`` of the entropy (bits) of the text's word n-gram frequencies.

    A text too short to have any n-gram of some length contributes 0 for that length.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError("ngram_entropy needs one weight per n-gram length")
    tokens = words(text)
    parts = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


class Fluency(Metric):
    name = "fluency"
    description = ("n-gram entropy (bits) of greedy generations from the generation prompts, "
                   "pre and post edit (ROME's fluency; opt-in)")
    protocols = ()

    def __init__(self, max_new_tokens: int = 64) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise HParamsError(f"fluency max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def prompts(req: EditRequest) -> tuple[str, ...]:
        """The prompts generated from: the request's generation prompts, else its edit prompt."""
        return req.generation_prompts or (req.prompt,)

    def queries(self, req: EditRequest, protocols: tuple[str, ...], gen_tokens: int) -> list[Any]:
        return [GenQuery(p, self.max_new_tokens) for p in self.prompts(req)]

    def compute(self, req: EditRequest, pre: Results | None, post: Results,
                protocols: tuple[str, ...], ctx: dict[str, Any]) -> Values:
        prompts = self.prompts(req)

        def scores(res: Results) -> list[float]:
            return [ngram_entropy(p + res[GenQuery(p, self.max_new_tokens)]) for p in prompts]

        return {PROTOCOL: staged(pre, post, scores)}


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Fluency())
