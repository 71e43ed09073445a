"""Fluency: ROME's weighted bi-/tri-gram entropy, on hand-made text and through the evaluator."""
from __future__ import annotations

import math

import pytest

from medit import api
from medit.errors import HParamsError
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest
from medit.core.queries import GenQuery
from medit.scoring.engine import Scorer
from medit.plugins.metrics.fluency import Fluency, ngram_entropy, words


def _rome(h2: float, h3: float) -> float:
    return (2 / 3 * h2 + 4 / 3 * h3) / 2


def test_words_split_punctuation():
    assert words("Hi, there. It's 42!") == ["Hi", ",", "there", ".", "It", "'", "s", "42", "!"]


def test_entropy_of_hand_made_text():
    # four distinct words: 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit)
    assert ngram_entropy("a b c d") == pytest.approx(_rome(math.log2(3), 1.0))
    # pure repetition has no entropy at all
    assert ngram_entropy("the the the the the the") == 0.0
    # "a b a b a": bigrams ab, ba, ab, ba -> 1 bit; trigrams aba, bab, aba -> H(2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b a") == pytest.approx(_rome(1.0, h3))
    # too short for any trigram: the trigram part is 0, not NaN
    assert ngram_entropy("a b") == pytest.approx(_rome(0.0, 0.0))
    assert ngram_entropy("a b c") == pytest.approx(_rome(1.0, 0.0))
    assert ngram_entropy("") == 0.0
    # more varied text scores higher than a degenerate loop of the same length
    varied = "Paris is the capital of France and its largest city by far"
    loop = "Paris is Paris is Paris is Paris is Paris is Paris is"
    assert ngram_entropy(varied) > ngram_entropy(loop)


def test_entropy_weights_are_explicit():
    assert ngram_entropy("a b c d", ns=(2,), weights=(1.0,)) == pytest.approx(math.log2(3))
    with pytest.raises(ValueError):
        ngram_entropy("a b c", ns=(2, 3), weights=(1.0,))


def test_metric_contract_on_hand_made_results():
    req = EditRequest(prompt="The mother tongue of X is", subject="X", target_new="English", case_id="c",
                      generation_prompts=("X was born in", "X likes"))
    m = Fluency(max_new_tokens=5)
    assert m.queries(req, ("generate",), 8) == [GenQuery("X was born in", 5), GenQuery("X likes", 5)]
    pre = {GenQuery("X was born in", 5): " Paris and grew up", GenQuery("X likes", 5): " music and films"}
    post = {GenQuery("X was born in", 5): " English English English", GenQuery("X likes", 5): " English English"}
    vals = m.compute(req, pre, post, ("generate",), {"gen_tokens": 8})
    assert set(vals) == {"ngram_entropy"}
    expect_pre = (ngram_entropy("X was born in Paris and grew up") + ngram_entropy("X likes music and films")) / 2
    expect_post = (ngram_entropy("X was born in English English English") + ngram_entropy("X likes English English")) / 2
    assert vals["ngram_entropy"]["pre"] == pytest.approx(expect_pre)
    assert vals["ngram_entropy"]["post"] == pytest.approx(expect_post)
    assert vals["ngram_entropy"]["post"] < vals["ngram_entropy"]["pre"]
    # no generation prompts: the edit prompt is used
    plain = EditRequest(prompt="The mother tongue of X is", subject="X", target_new="English")
    assert m.queries(plain, (), 8) == [GenQuery("The mother tongue of X is", 5)]
    assert m.compute(plain, None, {GenQuery(plain.prompt, 5): " a"}, (), {})["ngram_entropy"]["pre"] is None


def test_bad_setting():
    with pytest.raises(HParamsError, match="max_new_tokens.*0"):
        Fluency(max_new_tokens=0)


def test_registered_and_opt_in():
    from medit.evaluation.engine import DEFAULT_METRICS
    assert isinstance(get_plugins().metrics.get("fluency"), Fluency)
    assert "fluency" not in DEFAULT_METRICS


def test_fluency_through_the_evaluator(tiny_handle, monkeypatch):
    handle = tiny_handle("gpt2")
    metric = get_plugins().metrics.get("fluency")
    monkeypatch.setattr(metric, "max_new_tokens", 16)  # keep the test fast on a busy CPU
    asked: list[GenQuery] = []
    real_generate, real_run = Scorer.generate, Scorer.run

    def spy(self, queries, *args, **kwargs):  # type: ignore[no-untyped-def]
        queries = list(queries)
        asked.extend(q for q in queries if isinstance(q, GenQuery))
        return real_run(self, queries, *args, **kwargs)

    monkeypatch.setattr(Scorer, "run", spy)
    req = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", case_id="f",
                      generation_prompts=("France is a country", "In France people"))
    method = get_plugins().methods.get("ft-m")
    hp = method.resolve_hparams(handle).replace(steps=2)
    summary, _ = api.run(handle, method, [req], hparams=hp, metrics=("reliability", "fluency"),
                         protocols=("token_acc",), progress=False)
    vals = summary["metrics"]["fluency"]["ngram_entropy"]
    # both prompts were generated from, pre and post, with the metric's own token budget
    want = {GenQuery(p, 16) for p in req.generation_prompts}
    assert sorted(map(repr, (q for q in asked if q in want))) == sorted(map(repr, list(want) * 2))
    # the pre-edit value is exactly the entropy of the unedited model's greedy continuations
    gens = real_generate(Scorer(handle), [GenQuery(p, 16) for p in req.generation_prompts])
    expected = sum(ngram_entropy(p + g) for p, g in zip(req.generation_prompts, gens)) / 2
    assert vals["pre"] == pytest.approx(expected)
    assert isinstance(vals["post"], float) and vals["post"] >= 0.0
    assert summary["cases"][0]["metrics"]["fluency"]["ngram_entropy"] == {k: vals[k] for k in ("pre", "post")}
    assert vals["n"] == 1 and "ci95" not in vals  # one case gives no interval
