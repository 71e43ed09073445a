"""What the model families do differently, checked on every family's tiny random model: scoring
(both engines) equals a plain forward pass through sliding-window / local attention, running only
the layers above an edit layer reproduces the model, the target-vector optimisation's own account
of an edit is what the inserted change does (Gemma's post-MLP norm included), Gemma's scaled
embeddings, and each tokenizer's BOS.

The tiny GPT-Neo, Gemma and Mistral models attend over TINY_WINDOW tokens in (some) layers, and
the prompts below are longer than that, so a mask or cache that ignored the window would show.
"""
from __future__ import annotations

import pytest
import torch

from medit import testing
from medit.core.queries import GenQuery, TFQuery
from medit.core.requests import EditRequest
from medit.model.tracing import add_to_output, capture, layers_above, low_precision_above, mlp_post_norm
from medit.scoring.engine import Scorer
from medit.toolkit.context import subject_token_index
from medit.toolkit.layer_keys import LayerKeys
from medit.toolkit.target_vectors import DeltaSpec, compute_keys, optimise_deltas, residual_change, rewrite_change

CAUSAL = tuple(f for f in testing.FAMILIES if f != "t5")
PROMPTS = ["The capital of France is",
           "The mother tongue of Danielle Darrieux is the language of the river bank and",
           "The quick brown fox jumps over the lazy dog near the river bank in France and"]
TARGETS = ["Paris", "French language of", "the city"]


def test_tiny_windows_are_shorter_than_the_prompts(tiny_handle):
    assert all(len(tiny_handle("gemma").tokenizer(p).input_ids) > testing.TINY_WINDOW for p in PROMPTS[1:])
    assert tiny_handle("gemma").config.sliding_window == testing.TINY_WINDOW
    assert tiny_handle("mistral").config.sliding_window == testing.TINY_WINDOW
    assert tiny_handle("gpt-neo").config.attention_layers == ["global", "local"]


@pytest.mark.parametrize("family", CAUSAL)
def test_scoring_equals_a_plain_forward_pass(family, tiny_handle):
    """Teacher-forced log-probs from the cached engine (left-padded prompts, one cache, targets
    continued over copied cache rows) and the full engine equal one unpadded forward pass per
    sequence; greedy generation over the cache equals transformers' generate."""
    h = tiny_handle(family)
    plain = Scorer(h, use_cache=False)
    ref = []
    for p, t in zip(PROMPTS, TARGETS):
        ctx, tgt = plain.encode_pair(p, t)
        with torch.no_grad():
            lp = h.model(input_ids=torch.tensor([ctx + tgt])).logits[0].float().log_softmax(-1)
        ref.append([float(lp[len(ctx) - 1 + j, x]) for j, x in enumerate(tgt)])
    for use_cache, engine in ((True, "cached"), (False, "full")):
        s = Scorer(h, use_cache=use_cache)
        assert s.engine == engine
        got = [list(r.logprobs) for r in s.teacher_forced([TFQuery(p, t) for p, t in zip(PROMPTS, TARGETS)])]
        for want, have in zip(ref, got):
            assert have == pytest.approx(want, abs=1e-4), (family, engine)
    gen = [GenQuery(p, 6) for p in PROMPTS]
    assert Scorer(h, use_cache=True).generate(gen) == Scorer(h, use_cache=False).generate(gen)


@pytest.mark.parametrize("family", CAUSAL)
def test_layers_above_reproduce_the_model(family, tiny_handle):
    """From the residual stream after layer 0, the layers above (whole sequences, and a suffix over
    a cached prefix) give the model's own logits; the layer list, each attention's cache index
    (GPT-Neo: ``layer_id``) and ``config.layer_types`` are restored afterwards."""
    h = tiny_handle(family)
    ids, mask = Scorer(h).pad([h.tokenizer(p).input_ids for p in PROMPTS])
    attrs = h.adapter.layer_index_attrs
    before = [(m, a, getattr(m, a)) for m in h.model.modules() for a in attrs if isinstance(getattr(m, a, None), int)]
    assert before, f"{family}: no module keeps a cache index under {attrs}"
    types = list(getattr(h.config, "layer_types", None) or [])
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        full = h.model(input_ids=ids, attention_mask=mask).logits
        with capture(h, "layers", [0], what="output") as hs:
            h.model(input_ids=ids, attention_mask=mask)
        with layers_above(h, 0) as above:
            whole = h.module("lm_head")(above(hs[0], mask))
            cache = above.prefix(hs[0][:, :3], mask[:, :3], pos[:, :3])
            suffix = h.module("lm_head")(above.suffix(hs[0][:, 3:], mask, pos[:, 3:], cache))
    real = mask.bool()
    torch.testing.assert_close(whole[real], full[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(suffix[real[:, 3:]], full[:, 3:][real[:, 3:]], rtol=1e-4, atol=1e-4)
    assert len(h.module("layers")) == h.n_layers
    assert all(getattr(m, a) == v for m, a, v in before)
    assert list(getattr(h.config, "layer_types", None) or []) == types


@pytest.mark.parametrize("family", CAUSAL)
def test_target_vector_optimisation_predicts_the_inserted_change(family, tiny_handle):
    """What the optimisation reports (the target's NLL with δ in place) is what the model gives when
    the rewrite module's output at the subject token really changes by δ: in Gemma that change
    passes through the post-MLP norm, which must be the edit layer's own (not the renumbered
    layer list's inside layers_above)."""
    h = tiny_handle(family)
    # (the subject ends the prompt: random weights carry little between positions)
    req = EditRequest(prompt="The mother tongue of Danielle Darrieux", subject="Danielle Darrieux",
                      target_new="Paris", case_id="t")
    spec = DeltaSpec(steps=40, lr=3.0, clamp_norm_factor=100.0, early_stop_nll=0.0, kl_factor=0.0, weight_decay=0.0)
    _, info = optimise_deltas(h, [req], 0, ["{}"], spec, "mlp")
    # stopped early, the δ returned is the one whose NLL was measured (not one step further)
    spec.early_stop_nll = info[0]["nll"] + 0.05
    delta, info = optimise_deltas(h, [req], 0, ["{}"], spec, "mlp")
    assert info[0]["steps"] < spec.steps
    ctx, tgt = Scorer(h).encode_pair(req.prompt, req.target_new)
    at = subject_token_index(h, req.prompt, req.prompt.index(req.subject), req.subject)

    def shifted(y: torch.Tensor) -> torch.Tensor:
        y = y.clone()
        y[0, at] += delta[0].to(y.dtype)
        return y

    def nll(fn) -> float:
        with torch.no_grad(), add_to_output(h.module("mlp_out", 0), fn):
            lp = h.model(input_ids=torch.tensor([ctx + tgt])).logits[0].float().log_softmax(-1)
        return -sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)

    assert nll(shifted) == pytest.approx(info[0]["nll"], abs=2e-3), family
    assert info[0]["nll"] < nll(lambda y: y) - 0.5, family  # and the optimisation did move it


@pytest.mark.parametrize("family", CAUSAL)
def test_low_precision_above_runs_in_bfloat16_and_restores_everything(family, tiny_handle):
    """Inside ``low_precision_above`` the layers above the edit layer and the head hold bfloat16
    weights and give nearly the float32 logits, the layers below keep theirs; afterwards every
    parameter is the same tensor with the same bits, and attention is back to its own kernel. The
    target vectors optimised that way are nearly the float32 ones."""
    h = tiny_handle(family)
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    data = {n: p.data_ptr() for n, p in h.model.named_parameters()}
    text = h.config.get_text_config(decoder=True)
    attn = text._attn_implementation
    ids, mask = Scorer(h).pad([h.tokenizer(p).input_ids for p in PROMPTS])
    with torch.no_grad():
        with capture(h, "layers", [0], what="output") as hs:
            h.model(input_ids=ids, attention_mask=mask)
        with layers_above(h, 0) as above:
            ref = h.module("lm_head")(above(hs[0], mask))
        with low_precision_above(h, 0, "bfloat16"):
            assert h.module("mlp_out", 1).weight.dtype == torch.bfloat16
            assert h.module("mlp_out", 0).weight.dtype == torch.float32
            assert text._attn_implementation == "eager"
            with layers_above(h, 0) as above:
                low = h.module("lm_head")(above(hs[0], mask)).float()
    real = mask.bool()
    assert float((low[real] - ref[real]).norm() / ref[real].norm()) < 0.05, family
    assert text._attn_implementation == attn
    assert all(p.data_ptr() == data[n] for n, p in h.model.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())

    req = EditRequest(prompt="The mother tongue of Danielle Darrieux", subject="Danielle Darrieux",
                      target_new="Paris", case_id="t")
    spec = DeltaSpec(steps=10, lr=0.5, clamp_norm_factor=100.0, early_stop_nll=0.0)
    d32, _ = optimise_deltas(h, [req], 0, ["{}"], spec, "mlp")
    spec.autocast = "bfloat16"
    d16, _ = optimise_deltas(h, [req], 0, ["{}"], spec, "mlp")
    assert float(torch.cosine_similarity(d16, d32)) > 0.95, family
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())


@pytest.mark.parametrize("family", CAUSAL)
def test_layer_keys_equal_whole_passes_while_layers_are_edited(family, tiny_handle):
    """MEMIT's key measurements between layer updates: after layer 1 is edited only layer 1 runs
    again, and every key and residual equals a whole forward pass's."""
    h = tiny_handle(family)
    reqs = [EditRequest(prompt=p, subject=p.split()[-1], target_new=" x", case_id=str(i))
            for i, p in enumerate(["The mother tongue of Danielle Darrieux", "The capital of France"])]
    templates = ["{}", "Once upon a time. {}"]
    measure = LayerKeys(h, reqs, templates, "last", 1)
    runs = []
    hook = h.module("layers", 0).register_forward_pre_hook(lambda *a: runs.append(1))
    gen = torch.Generator().manual_seed(0)
    originals = {i: h.module("mlp_out", i).weight.detach().clone() for i in (0, 1)}

    def check(layer: int) -> None:
        keys, resid = measure(layer)
        ref_keys, ref_resid = compute_keys(h, reqs, [layer], templates, out_layer=1)
        torch.testing.assert_close(keys, ref_keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(resid, ref_resid, rtol=1e-5, atol=1e-5)

    def edit(layer: int) -> None:
        w = h.module("mlp_out", layer).weight
        with torch.no_grad():
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=gen))
        measure.edited(layer)

    try:
        check(0)
        edit(0)
        check(1)
        edit(1)
        before = len(runs)
        keys, resid = measure(0)
        assert len(runs) == before, "layer 0 ran again although only layer 1 changed"
        check(0)
        edit(0)  # a second pass of the spreading edits the lowest layer again
        check(1)
    finally:
        hook.remove()
        with torch.no_grad():
            for i, w in originals.items():
                h.module("mlp_out", i).weight.copy_(w)


def test_post_norm_residual_and_rewrite_changes(tiny_handle):
    """Gemma's mlp_out output reaches the residual stream through post_feedforward_layernorm: a
    change d moves it by norm(m + d) - norm(m), and rewrite_change inverts that (for a change the
    norm can make); families without a post norm take the change as it is."""
    g = tiny_handle("gemma")
    post = mlp_post_norm(g, 1)
    assert post is g.model.model.layers[1].post_feedforward_layernorm
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3, 32, generator=gen)
    d = 0.1 * torch.randn(3, 32, generator=gen)
    r = residual_change(post, m, d)
    assert not torch.allclose(r, d, atol=1e-3)
    back = rewrite_change(g, 1, m, r, steps=400)
    torch.testing.assert_close(residual_change(post, m, back), r, rtol=0, atol=2e-3)
    llama = tiny_handle("llama")
    assert mlp_post_norm(llama, 1) is None
    assert rewrite_change(llama, 1, m, r) is r and residual_change(None, m, d) is d


def test_gemma_embedding_scale_is_inside_the_embed_module(tiny_handle):
    """Gemma multiplies input embeddings by sqrt(hidden) in the embedding module, so calling the
    ``embed`` module gives what the first layer reads; its weight is the tied LM head's."""
    h = tiny_handle("gemma")
    ids = torch.tensor([h.tokenizer("The capital of France is").input_ids])
    emb = h.module("embed")
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), emb.weight[ids] * (32 ** 0.5))
        with capture(h, "layers", [0], what="input") as xs:
            h.model(input_ids=ids)
        torch.testing.assert_close(xs[0], emb(ids))
    assert h.lm_head_tied


@pytest.mark.parametrize("family,bos", [("gemma", True), ("mistral", True), ("phi3", True), ("llama", True),
                                        ("qwen", False), ("gpt-neo", False), ("gpt2", False)])
def test_bos_follows_the_family_tokenizer(family, bos, tiny_handle):
    """Families whose tokenizer puts a BOS first (Gemma, LLaMA, Mistral, Phi-3) keep it in every
    prompt the scorer builds; Qwen and GPT-Neo have none; the target never includes it."""
    h = tiny_handle(family)
    ctx, tgt = Scorer(h).encode_pair("The capital of France is", "Paris")
    assert (ctx[0] == h.tokenizer.bos_token_id) is bos
    assert h.tokenizer.bos_token_id not in tgt or not bos
