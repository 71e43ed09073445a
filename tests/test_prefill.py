"""The cached scoring engine (each prompt run once over a key/value cache) against whole-sequence
passes and Hugging Face ``generate`` on every causal family, its batching, and when it is used."""
from __future__ import annotations

import pytest
import torch

from medit.scoring.cached import CachedRunner, split_sorted
from medit.core.queries import DistQuery, GenQuery, TFQuery, kl_divergence
from medit.scoring.engine import Scorer

CAUSAL = ["gpt2", "gptj", "gptneox", "llama"]
PROMPTS = ["The capital of France is", "Danielle Darrieux speaks", "The river bank is near the old mill and",
           "A", "The quick brown fox jumps over the lazy dog because it"]


def _queries() -> list:
    qs: list = []
    for i, p in enumerate(PROMPTS):
        qs += [TFQuery(p, "Paris"), TFQuery(p, " is near the river bank"), DistQuery(p),
               GenQuery(p, 3 + 4 * (i % 3))]  # token limits 3, 7 and 11 in one run
    return qs


@pytest.mark.parametrize("family,max_reads", [(f, 1024) for f in CAUSAL] + [("llama", 4)])
def test_cached_engine_equals_whole_sequence_passes(tiny_handle, family, max_reads, monkeypatch):
    """(``max_reads`` 4: the targets' passes split into groups of at most 4 read positions, a
    longer target alone.)"""
    monkeypatch.setattr("medit.scoring.cached.MAX_READS", max_reads)
    groups = []
    real = CachedRunner._target_group
    monkeypatch.setattr(CachedRunner, "_target_group", lambda self, jobs, *a: groups.append(len(jobs)) or real(self, jobs, *a))
    h = tiny_handle(family)
    qs = _queries()
    cached, full = Scorer(h, batch_size=3), Scorer(h, batch_size=3, use_cache=False)
    assert (cached.engine, full.engine) == ("cached", "full")
    got, want = cached.run(qs), full.run(qs)
    for q in qs:
        if isinstance(q, TFQuery):
            assert got[q].target_ids == want[q].target_ids and got[q].argmax == want[q].argmax, q
            assert max(abs(a - b) for a, b in zip(got[q].logprobs, want[q].logprobs)) < 1e-4, q
        elif isinstance(q, DistQuery):
            assert kl_divergence(want[q], got[q]) < 1e-5, q
        else:
            assert got[q] == want[q], q
    gens = [q for q in qs if isinstance(q, GenQuery)]
    assert cached.generate(gens) == [want[q] for q in gens]
    _, _, toks = CachedRunner(cached).run([], [], [(cached.encode_prompt(q.prompt), q.max_new_tokens) for q in gens])
    assert all(0 < len(t) <= q.max_new_tokens for t, q in zip(toks, gens))  # never past the query's limit
    assert (max(groups) == 1) == (max_reads == 4)  # each long target went alone under the small cap


def test_a_hooked_model_is_scored_with_whole_sequences(tiny_handle):
    """An edit's hook may read the whole sequence, so any hook switches the engine off."""
    h = tiny_handle("llama")
    assert Scorer(h).engine == "cached"
    with torch.no_grad():  # transformers then keeps output-capturing hooks of its own, which change nothing
        h.model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True, output_attentions=True)
    assert any(m._forward_hooks or m._forward_pre_hooks for m in h.model.modules())
    assert Scorer(h).engine == "cached"
    hook = h.module("mlp_out", 0).register_forward_hook(lambda mod, args, out: None)
    try:
        assert Scorer(h).engine == "full"
    finally:
        hook.remove()
    assert Scorer(tiny_handle("t5")).engine == "full"


def test_split_sorted_minimises_padding_plus_batch_cost():
    lengths = [4] * 10 + [30]
    # one batch would pad 11 x 30; two batches pay one more batch cost and save 260 padded tokens
    assert split_sorted(lengths, max_count=64, batch_cost=100) == [(0, 10), (10, 11)]
    assert split_sorted(lengths, max_count=64, batch_cost=1000) == [(0, 11)]
    assert split_sorted(lengths, max_count=4, batch_cost=0) == [(0, 2), (2, 6), (6, 10), (10, 11)] or all(
        j - i <= 4 for i, j in split_sorted(lengths, max_count=4, batch_cost=0))
    assert split_sorted([5000], max_count=8) == [(0, 1)]  # a prompt over the token budget still runs
    assert all(j - i <= 2 for i, j in split_sorted(list(range(1, 50)), max_count=2))


def test_prompts_shared_by_queries_run_once(tiny_handle):
    h = tiny_handle("gpt2")
    s = Scorer(h)
    ctx = s.encode_prompt("The capital of France is")
    plan = CachedRunner.plan([s.encode_pair("The capital of France is", "Paris")], [ctx], [(ctx, 4)])
    assert len(plan) == 1 and plan[0].tf and plan[0].dist == [0] and plan[0].gen == [(0, 4)]
    seen: list[int] = []
    runner = CachedRunner(s)
    orig = runner._forward

    def counting(ids: torch.Tensor, *args, **kw):
        seen.append(ids.shape[1])
        return orig(ids, *args, **kw)

    runner._forward = counting  # type: ignore[method-assign]
    _, tgt = s.encode_pair("The capital of France is", "Paris")
    runner.run([(ctx, tgt)], [ctx], [(ctx, 4)])
    # one prompt pass, the target's remaining tokens (if any) in one chunk, then one token a step
    assert seen == [len(ctx)] + ([len(tgt) - 1] if len(tgt) > 1 else []) + [1] * (len(seen) - 1 - (len(tgt) > 1))
    assert seen.count(len(ctx)) == 1 and len(seen) <= 1 + (len(tgt) > 1) + 3
