"""Locate-then-edit core (tracing, statistics, keys, target vectors) and ROME / MEMIT / AlphaEdit
on tiny random models of every causal family."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from medit.core.edit import load_patch
from medit.errors import InputFileError, MethodError, ValidationError
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest
from medit.toolkit.target_vectors import DeltaSpec, compute_keys, delta_row_keys, negative_rows, optimise_deltas
from medit.scoring.engine import Scorer
from medit.core.queries import TFQuery
from medit.toolkit.stats import SecondMoments, second_moments, wait_for_writes
from medit.model.tracing import Above, capture, layers_above

from conftest import FAMILIES
from snapshots import model_state

CAUSAL = tuple(f for f in FAMILIES if f != "t5")  # every decoder-only family of the tiny-model kit
HERE = Path(__file__).resolve()
# the WikiText-2 text the package ships (medit/datasets/DATA.md), the default statistics corpus
CORPUS = HERE.parents[1] / "medit" / "datasets" / "wikitext-2-valid.txt"
# Random weights give tiny MLP outputs, so the default norm clamp (relative to them) is lifted.
FAST = {"stats_samples": "300", "stats_max_len": "32", "context_templates": "[[3,2]]", "v_steps": "40",
        "v_clamp_norm_factor": "100"}
# Where a family's tiny random model needs another setting (key: family and method, "" for every
# method; measured on the tiny models). Gemma normalises the MLP output again before the residual
# (post-norm): only the rewritten output's direction counts, and the weight decay, relative to a
# tiny random MLP output, holds the vector back (ROME: target log-prob -7.19 -> -3.57 with it, not
# yet the argmax; -2.85 without); AlphaEdit's ridge then still holds the update below the argmax
# (L2 0.01: gain 3.08, no; 0.001: gain 4.94, yes). MEMIT on the tiny Mistral's layer 0 moves the
# unrelated prompts 0.72x as much as the edited one; at layer 1, 0.36x.
FAMILY_FAST: dict[tuple[str, str], dict[str, str]] = {
    ("gemma", ""): {"v_weight_decay": "0"},
    ("gemma", "alphaedit"): {"L2": "0.001"},
    ("mistral", "memit"): {"layers": "[1]"},
}
# On random weights, information barely flows between positions, so the tiny-model edits use a
# prompt that ends with the subject and a one-token target (the real-model tests cover the rest).
PROMPT, SUBJECT = "The capital of France", "France"


def _request(handle) -> EditRequest:
    """A one-token target the model does not already predict."""
    scorer = Scorer(handle)
    for word in (" the", " of", " and", " in", " to"):
        if scorer.teacher_forced([TFQuery(PROMPT, word)])[0].exact == 0.0 and scorer.target_length(PROMPT, word) == 1:
            return EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=word, case_id="r1")
    raise AssertionError("no candidate target")


REQ = EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=" the", case_id="r1")
OTHER = [TFQuery("The river bank", " is"), TFQuery("The quick brown fox", " jumps")]


@pytest.mark.parametrize("family", CAUSAL)
def test_layers_above_and_cached_suffix_match_full_forward(tiny_handle, family):
    h = tiny_handle(family)
    tok = h.tokenizer
    ids = torch.tensor([tok("The capital of France is Paris and the").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = h.model.base_model(input_ids=ids, output_hidden_states=True)
        with capture(h, "layers", [0], what="output") as st:
            h.model(input_ids=ids)
        with layers_above(h, 0) as above:
            full = above(st[0], mask)
            pos = torch.arange(ids.shape[1])[None]
            cache = above.prefix(st[0][:, :3], mask[:, :3], pos[:, :3])
            suf = above.suffix(st[0][:, 3:], mask, pos[:, 3:], cache)
            suf2 = above.suffix(st[0][:, 3:], mask, pos[:, 3:], cache)  # the cache is not consumed
    torch.testing.assert_close(full, out.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(suf, out.last_hidden_state[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(suf2, suf)
    # the layer list and the attention layer indices are restored
    assert len(h.module("layers")) == h.n_layers
    assert [m.layer_idx for m in h.model.modules() if isinstance(getattr(m, "layer_idx", None), int)] \
        == sorted(m.layer_idx for m in h.model.modules() if isinstance(getattr(m, "layer_idx", None), int))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_delta_batching_is_exact_and_nll_matches_scorer(tiny_handle, family):
    h = tiny_handle(family)
    reqs = [REQ, EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                             target_new="English", case_id="r2")]
    spec = DeltaSpec(steps=5, lr=0.5)
    batch, _ = optimise_deltas(h, reqs, 0, ["{}", "Hello there. {}"], spec)
    single = torch.cat([optimise_deltas(h, [r], 0, ["{}", "Hello there. {}"], spec)[0] for r in reqs])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)
    # one step reports the NLL at delta = 0, which must equal the scorer's teacher-forced NLL
    _, info = optimise_deltas(h, reqs[1:], 0, ["{}"], DeltaSpec(steps=1))
    res = Scorer(h).teacher_forced([TFQuery(reqs[1].prompt, reqs[1].target_new)])[0]
    assert info[0]["nll"] == pytest.approx(-res.mean_logprob, abs=1e-4)


@pytest.mark.parametrize("family,stop", [("gpt2", 1.2), ("llama", 1.2), ("gemma", 4.0)])
def test_batched_deltas_drop_finished_edits_and_equal_one_by_one(tiny_handle, family, stop, monkeypatch):
    """Edits that reach the early-stop NLL at different steps leave the batch's forward pass; every
    edit still gets the vector, step count and NLL of its own one-by-one optimisation. The losses
    are independent per edit and Adam is elementwise, so the only differences are float rounding
    of differently shaped batched products. In float32, Adam's normalised steps carry that rounding
    in near-zero gradient entries up to ~1e-4 of the vectors' norm through Gemma's post-MLP norm,
    by an amount that depends on the CPU's kernels; the model runs in float64 here, where it stays
    below float32's resolution, so the bound is 1e-6 x the largest norm. ``stop`` sits
    between the tiny model's NLLs so that some edits stop early, at different steps, and some never."""
    h = tiny_handle(family, fresh=True)
    h.model.double()
    h.dtype = torch.float64
    # prompts end with the subject: on random weights little flows between positions (see PROMPT)
    cases = [(PROMPT, SUBJECT, " the"), ("The home of Danielle Darrieux", "Danielle Darrieux", " of"),
             ("A friend of Toko Yasuda", "Toko Yasuda", " and"), ("Near the Eiffel Tower", "Eiffel Tower", " in")]
    reqs = [EditRequest(prompt=p, subject=s, target_new=t, case_id=str(i)) for i, (p, s, t) in enumerate(cases)]
    templates = ["{}", "Hello there. {}"]
    spec = DeltaSpec(steps=30, lr=0.5, clamp_norm_factor=100.0, early_stop_nll=stop, chunk=len(reqs))
    prefixes = []
    real_prefix = Above.prefix
    monkeypatch.setattr(Above, "prefix", lambda self, *a: prefixes.append(1) or real_prefix(self, *a))
    batch, info_b = optimise_deltas(h, reqs, 0, templates, spec)
    assert len(prefixes) == 1  # finished edits' rows left the prefix cache; it was not computed again
    single = [optimise_deltas(h, [r], 0, templates, spec) for r in reqs]
    steps = [i[0]["steps"] for _, i in single]
    assert len(set(steps)) > 2 and min(steps) < spec.steps  # finished edits really left mid-run
    assert [i["steps"] for i in info_b] == steps
    one_by_one = torch.cat([d for d, _ in single])
    tol = 1e-6 * float(one_by_one.norm(dim=1).max())
    torch.testing.assert_close(batch, one_by_one, atol=tol, rtol=0)
    # chunks of 2, formed by suffix length: results come back in request order
    pairs, _ = optimise_deltas(h, reqs, 0, templates, dataclasses.replace(spec, chunk=2))
    torch.testing.assert_close(pairs, one_by_one, atol=tol, rtol=0)
    assert [i["nll"] for i in info_b] == pytest.approx([i[0]["nll"] for _, i in single], rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_row_keys_and_insert_scale(tiny_handle, family):
    """Per-row keys average to compute_keys' k*; a row scale of 2 with half the learning rate
    inserts exactly what the unscaled optimisation inserts (Adam's steps ignore gradient scale)."""
    h = tiny_handle(family)
    templates = ["{}", "Hello there. {}"]
    spec = DeltaSpec(steps=4, lr=0.5, clamp_norm_factor=1e6, weight_decay=0.0, kl_factor=0.0)
    rows = delta_row_keys(h, REQ, 1, templates, spec)
    keys, _ = compute_keys(h, [REQ], [1], templates)
    assert rows.shape[0] == len(templates) + 1
    torch.testing.assert_close(rows[:len(templates)].mean(0), keys[1][0], atol=1e-5, rtol=1e-5)
    plain, _ = optimise_deltas(h, [REQ], 0, templates, spec)
    half = DeltaSpec(steps=4, lr=0.25, clamp_norm_factor=1e6, weight_decay=0.0, kl_factor=0.0)
    doubled, _ = optimise_deltas(h, [REQ], 0, templates, half, row_scale=torch.full((1, 3), 2.0))
    torch.testing.assert_close(2 * doubled, plain, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_extra_prompts_add_rows_to_the_delta_objective(tiny_handle, family):
    """Extra prompts add one row each (after the templates, before the KL row): their keys are
    the subject keys of the filled prompt, and their target tokens join the NLL."""
    h = tiny_handle(family)
    req = EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                      target_new="English", case_id="x")
    extra = "{} is associated with"
    spec = DeltaSpec(steps=1, extra_prompts=(extra,))
    rows = delta_row_keys(h, req, 1, ["{}"], spec)
    assert rows.shape[0] == 3
    alone = EditRequest(prompt=extra.replace("{}", req.subject), subject=req.subject, target_new="English")
    torch.testing.assert_close(rows[1], compute_keys(h, [alone], [1], ["{}"])[0][1][0], atol=1e-5, rtol=1e-5)
    _, info = optimise_deltas(h, [req], 0, ["{}"], spec)
    scorer = Scorer(h)
    res = scorer.teacher_forced([TFQuery(req.prompt, req.target_new), TFQuery(alone.prompt, req.target_new)])
    lens = [scorer.target_length(req.prompt, req.target_new), scorer.target_length(alone.prompt, req.target_new)]
    expected = -sum(r.mean_logprob * n for r, n in zip(res, lens)) / sum(lens)
    assert info[0]["nll"] == pytest.approx(expected, abs=1e-4)
    from medit.errors import HParamsError
    with pytest.raises(HParamsError, match="v_extra_prompts"):
        get_plugins().methods.get("rome").resolve_hparams(h, overrides={"v_extra_prompts": "[no subject here]"})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_negative_rows_reproduce_the_rank_one_update(tiny_handle, family):
    """Adding δ·(x_t·left) after the edit layer gives exactly the logits of the model with
    ΔW = δ leftᵀ in the rewrite module, so the v-step's negative KL is the finished edit's."""
    h = tiny_handle(family)
    layer = 0
    g = torch.Generator().manual_seed(0)
    d_out, d_in = h.weight_out_in("mlp_out", layer).shape
    left, delta = torch.randn(d_in, generator=g) / d_in, torch.randn(d_out, generator=g)
    neg = negative_rows(h, REQ, layer, left, ["Germany", "the United Kingdom", "France"])
    assert neg is not None and neg.hidden.shape[0] == 2  # the edit's own subject is skipped
    with torch.no_grad(), layers_above(h, layer) as above:
        sim = above(neg.hidden + neg.coef[..., None] * delta, neg.mask)
        sim = h.module("lm_head")(sim[torch.arange(2), neg.last])
    name = h.param_name("mlp_out", layer)
    p = dict(h.model.named_parameters())[name]
    orig = p.detach().clone()
    upd = torch.outer(left, delta) if h.adapter.transposed else torch.outer(delta, left)
    try:
        with torch.no_grad():
            p.add_(upd)
            prompts = [REQ.prompt.replace(REQ.subject, s) for s in ("Germany", "the United Kingdom")]
            ids, mask = Scorer(h).pad([h.tokenizer(x).input_ids for x in prompts])
            real = h.model(input_ids=ids, attention_mask=mask).logits[torch.arange(2), neg.last]
    finally:
        with torch.no_grad():
            p.copy_(orig)
    torch.testing.assert_close(sim, real, atol=1e-4, rtol=1e-4)
    assert negative_rows(h, REQ, layer, left, [SUBJECT]) is None
    with pytest.raises(ValueError):
        optimise_deltas(h, [REQ, REQ], 0, ["{}"], DeltaSpec(steps=1), negatives=neg)


def test_subject_tokens_not_found(tiny_handle):
    h = tiny_handle("gpt2")
    bad = EditRequest(prompt="The capital of France", subject="France", target_new=" Paris", case_id="x")
    object.__setattr__(bad, "subject", "Germany")  # bypass construction-time validation on purpose
    with pytest.raises((ValidationError, ValueError)):
        compute_keys(h, [bad], [0], ["{}"])


def test_one_pass_statistics_equal_per_layer_and_cache(tiny_handle, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    h = tiny_handle("llama", fresh=True)
    both, secs = second_moments(h, [0, 1], str(CORPUS), n_samples=30, max_len=32, progress=False)
    assert secs > 0
    for layer in (0, 1):
        h.reset_state(SecondMoments)
        wait_for_writes()  # files are written in the background
        for f in tmp_path.rglob("*.safetensors"):
            f.unlink()
        alone, _ = second_moments(h, [layer], str(CORPUS), n_samples=30, max_len=32, progress=False)
        torch.testing.assert_close(alone[layer], both[layer], atol=1e-5, rtol=1e-5)
    # hit: from disk (state reset), no computation; only the missing layer is recomputed
    h.reset_state(SecondMoments)
    _, secs = second_moments(h, [0, 1], str(CORPUS), n_samples=30, max_len=32, progress=False)
    assert secs > 0
    h.reset_state(SecondMoments)
    again, secs = second_moments(h, [0, 1], str(CORPUS), n_samples=30, max_len=32, progress=False)
    assert secs == 0.0 and torch.equal(again[0].cpu(), both[0].cpu())
    # miss: different sample count
    h.reset_state(SecondMoments)
    _, secs = second_moments(h, [0], str(CORPUS), n_samples=20, max_len=32, progress=False)
    assert secs > 0
    # corrupt file: recomputed, not reused
    h.reset_state(SecondMoments)
    wait_for_writes()
    files = sorted(tmp_path.rglob("*L0-n30-len32*.safetensors"))
    files[0].write_bytes(b"garbage")
    fixed, secs = second_moments(h, [0], str(CORPUS), n_samples=30, max_len=32, progress=False)
    assert secs > 0
    torch.testing.assert_close(fixed[0], both[0])
    # different corpus content: different key
    other = tmp_path / "other.txt"
    other.write_text("A completely different corpus line.\nAnd another one here.\n")
    h.reset_state(SecondMoments)
    diff, secs = second_moments(h, [0], str(other), n_samples=30, max_len=32, progress=False)
    assert secs > 0 and not torch.allclose(diff[0], both[0])


def test_empty_corpus_and_bad_layer(tiny_handle, tmp_path):
    h = tiny_handle("gpt2")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputFileError, match="holds no text"):
        second_moments(h, [0], str(empty), n_samples=5, progress=False)
    with pytest.raises(MethodError, match="out of range"):
        second_moments(h, [7], str(empty), n_samples=5, progress=False)


def test_default_corpus_is_the_packaged_text_from_any_directory(tiny_handle, tmp_path, monkeypatch):
    """Without --stats-corpus, statistics come from the WikiText-2 text in the package (no network),
    found from any working directory, cached under its content fingerprint, and the run manifest
    names it."""
    import hashlib
    import json
    from medit import api
    from medit.toolkit.spread import LocateHParams
    from medit.toolkit.stats import PACKAGED_CORPUS, Corpus, corpus_record

    assert LocateHParams().stats_corpus == PACKAGED_CORPUS
    for m in ("rome", "memit", "alphaedit"):
        assert get_plugins().methods.get(m).resolve_hparams(tiny_handle("gpt2")).stats_corpus == PACKAGED_CORPUS
    monkeypatch.chdir(tmp_path)  # no medit/ here: the package's copy is found
    fp = hashlib.sha256(CORPUS.read_bytes()).hexdigest()[:16]
    assert Corpus(PACKAGED_CORPUS).fingerprint() == fp
    assert corpus_record(PACKAGED_CORPUS) == {"spec": PACKAGED_CORPUS, "path": str(CORPUS), "fingerprint": fp}
    assert corpus_record("wikitext:wikitext-103-raw-v1")["path"] is None
    h = tiny_handle("gpt2", fresh=True)
    packaged, _ = second_moments(h, [0], PACKAGED_CORPUS, n_samples=20, max_len=16, progress=False)
    h.reset_state(SecondMoments)
    by_path, secs = second_moments(h, [0], str(CORPUS), n_samples=20, max_len=16, progress=False)
    assert secs == 0.0 and torch.equal(packaged[0].cpu(), by_path[0].cpu())  # same cache entry
    summary, _ = api.run(h, "rome", [EditRequest(prompt=PROMPT, subject=SUBJECT, target_new=" the", case_id="r1")],
                         overrides={**FAST, "stats_samples": "20", "layer": "0", "v_steps": "2"},
                         protocols=("exact",), metrics=("reliability",), out_dir=tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["hparams"]["stats_corpus"] == PACKAGED_CORPUS
    assert manifest["stats_corpus"] == {"spec": PACKAGED_CORPUS, "path": str(CORPUS), "fingerprint": fp}
    with pytest.raises(InputFileError, match=r"'nope\.txt' does not exist.*leave the option out"):
        Corpus("nope.txt").fingerprint()


@pytest.mark.parametrize("method", ["rome", "rome-negatives", "rome-bf16", "memit", "memit-bf16", "alphaedit"])
@pytest.mark.parametrize("family", CAUSAL)
def test_locate_methods_take_revert_and_patch(tiny_handle, tmp_path, method, family):
    h = tiny_handle(family)
    m = get_plugins().methods.get(method.split("-")[0])
    # Tiny random keys are isotropic, so the covariance weight / ridge that suit a trained model
    # would swamp the update; scale them to the tiny model.
    # (-bf16: the target vectors optimised with bfloat16 matrix products, v_autocast)
    layer_key = {"rome": {"layer": "0"}, "rome-negatives": {"layer": "0", "v_negative_subjects": "[Germany, Paris]"},
                 "rome-bf16": {"layer": "0", "v_negative_subjects": "[Germany, Paris]", "v_autocast": "bfloat16"},
                 "memit": {"layers": "[0]", "mom2_update_weight": "10"},
                 "memit-bf16": {"layers": "[0]", "mom2_update_weight": "10", "v_autocast": "bfloat16"},
                 "alphaedit": {"layers": "[0]", "L2": "0.01", "nullspace_threshold": "0.5"}}[method]
    hp = m.resolve_hparams(h, overrides={**FAST, **layer_key, **FAMILY_FAST.get((family, ""), {}),
                                         **FAMILY_FAST.get((family, method.split("-")[0]), {}),
                                         "stats_corpus": str(CORPUS)})
    m.start_run(h)
    scorer = Scorer(h)
    req = _request(h)
    q = TFQuery(req.prompt, req.target_new)
    before = model_state(h)
    pre = scorer.teacher_forced([q] + OTHER)
    assert pre[0].exact == 0.0
    edit = m.apply(h, [req], hp)
    try:
        post = scorer.teacher_forced([q] + OTHER)
        assert post[0].exact == 1.0, f"{method} on {family} did not take: {post[0]}"
        # Unrelated prompts move less than the edited one (argmax agreement on random tiny
        # models tests noise; SmolLM2 runs measure real locality).
        gain = post[0].mean_logprob - pre[0].mean_logprob
        drift = max(abs(b.mean_logprob - a.mean_logprob) for a, b in zip(pre[1:], post[1:]))
        assert drift < 0.7 * gain, f"{method} on {family}: drift {drift:.3f}, gain {gain:.3f}"
        path = edit.save(tmp_path / "p")
    finally:
        edit.revert()
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items()), "revert not bit-exact"
    size = (path / "tensors.safetensors").stat().st_size
    dense = h.weight_out_in("mlp_out", 0).numel() * 4
    assert size < dense / 4, f"patch not compact: {size} bytes vs dense {dense}"
    fresh = tiny_handle(family, fresh=True)
    applied = load_patch(fresh, path)
    again = Scorer(fresh).teacher_forced([q])[0]
    assert again.exact == 1.0
    applied.revert()


def test_alphaedit_key_cache_grows_by_each_edit_and_reverts_exactly(tiny_handle):
    """The run's preserved-key cache holds Σ K Kᵀ of the active edits; an edit keeps the cache it
    found (no copy, no keys) and its revert restores exactly that; in a sequence only the first
    edit keeps it."""
    from medit.core.edit import CompositeEdit
    from medit.plugins.methods.alphaedit.method import PreservedKeys

    h = tiny_handle("llama")
    m = get_plugins().methods.get("alphaedit")
    hp = m.resolve_hparams(h, overrides={**FAST, "layers": "[0]", "L2": "0.01", "nullspace_threshold": "0.5",
                                         "stats_corpus": str(CORPUS)})
    m.start_run(h)
    later = EditRequest(prompt="The river bank", subject="river", target_new=" is", case_id="r2")
    first = m.apply(h, [_request(h)], hp)
    c1 = h.state(PreservedKeys).by_layer[0]
    d_in = h.weight_out_in("mlp_out", 0).shape[1]
    assert c1.shape == (d_in, d_in) and int(torch.linalg.matrix_rank(c1, rtol=1e-4)) == 1  # one key
    assert first.before == {0: None}
    second = m.apply(h, [later], hp)
    c2 = h.state(PreservedKeys).by_layer[0]
    assert second.before[0] is c1 and int(torch.linalg.matrix_rank(c2, rtol=1e-4)) == 2
    second.revert()
    assert torch.equal(h.state(PreservedKeys).by_layer[0], c1)
    first.revert()
    assert h.state(PreservedKeys).by_layer == {}
    edits = [m.apply(h, [_request(h)], hp), m.apply(h, [later], hp)]
    whole = CompositeEdit(h, edits)
    assert edits[0].before == {0: None} and edits[1].before == {}
    whole.revert()
    assert h.state(PreservedKeys).by_layer == {}
    m.start_run(h)
    assert h.state(PreservedKeys).by_layer == {}


def test_alphaedit_cache_weight_sets_how_firmly_earlier_edits_are_kept(tiny_handle):
    """A later edit moves an earlier edit's key output less the heavier the cache weighs; weight 0
    is the update without the cache."""
    from medit.errors import HParamsError
    from medit.plugins.methods.alphaedit.method import PreservedKeys

    h = tiny_handle("llama")
    m = get_plugins().methods.get("alphaedit")
    later = EditRequest(prompt="The river bank", subject="river", target_new=" is", case_id="r2")
    moved, factors = {}, {}
    for weight in ("0", "1", "100"):
        hp = m.resolve_hparams(h, overrides={**FAST, "layers": "[0]", "L2": "0.01", "nullspace_threshold": "0.5",
                                             "stats_corpus": str(CORPUS), "cache_weight": weight})
        m.start_run(h)
        first = m.apply(h, [_request(h)], hp)
        evals, evecs = torch.linalg.eigh(h.state(PreservedKeys).by_layer[0].double())
        K1 = (evecs[:, -1:] * evals[-1].sqrt()).float()  # one edit, one key: the cache is K1 K1ᵀ
        W = h.weight_out_in("mlp_out", 0).detach().clone()
        if weight == "1":  # the same edit with the cache emptied must equal weight 0
            saved = h.state(PreservedKeys).by_layer
            h.state(PreservedKeys).by_layer = {}
            blind = m.apply(h, [later], hp)
            factors["emptied"] = blind.factors
            blind.revert()
            h.state(PreservedKeys).by_layer = saved
        second = m.apply(h, [later], hp)
        factors[weight] = second.factors
        moved[weight] = float(((h.weight_out_in("mlp_out", 0) - W) @ K1).norm())
        second.revert()
        first.revert()
    for name, (u, v) in factors["0"].items():
        torch.testing.assert_close(u @ v.T, factors["emptied"][name][0] @ factors["emptied"][name][1].T)
    assert moved["100"] < moved["1"] < moved["0"], moved
    with pytest.raises(HParamsError, match="cache_weight"):
        m.resolve_hparams(h, overrides={"cache_weight": "-1"})


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_more_spread_passes_realise_more_of_the_target(tiny_handle, method):
    """A second pass solves for the gap the first left: the edit realises more of the optimised
    residual change, the factors hold both passes' columns, AlphaEdit's cache counts the edit's
    keys once, and revert is still exact."""
    from medit.errors import HParamsError
    from medit.plugins.methods.alphaedit.method import PreservedKeys

    h = tiny_handle("llama")
    m = get_plugins().methods.get(method)
    # a strong ridge, so one pass falls clearly short of the target
    extra = {"layers": "[0, 1]", "mom2_update_weight": "1000"} if method == "memit" else \
        {"layers": "[0, 1]", "L2": "0.03", "nullspace_threshold": "0.5"}
    base = {**FAST, **extra, "stats_corpus": str(CORPUS)}
    req = _request(h)
    before = model_state(h)
    realised, caches = [], []
    for passes in (1, 2):
        m.start_run(h)
        edit = m.apply(h, [req], m.resolve_hparams(h, overrides={**base, "spread_passes": str(passes)}))
        realised.append(edit.info["realised"][0])
        if method == "alphaedit":  # layer 0's key comes from the unedited model in both runs
            caches.append(h.state(PreservedKeys).by_layer[0])
            assert int(torch.linalg.matrix_rank(caches[-1], rtol=1e-4)) == 1
        assert all(f[0].shape[1] == passes for f in edit.factors.values())
        edit.revert()
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items()), "revert not bit-exact"
    assert realised[0] < 0.9 and realised[1] > realised[0] + 0.05, realised
    if caches:
        torch.testing.assert_close(caches[1], caches[0])
    # an edit that already realises spread_min_realised gets no further pass
    m.start_run(h)
    hp = m.resolve_hparams(h, overrides={**base, "spread_passes": "2", "spread_min_realised": str(realised[0] / 2)})
    edit = m.apply(h, [req], hp)
    assert edit.info["spread_passes"] == 1 and edit.info["realised"][0] == realised[0]
    edit.revert()
    with pytest.raises(HParamsError, match="spread_passes"):
        m.resolve_hparams(h, overrides={"spread_passes": "0"})
    with pytest.raises(HParamsError, match="spread_min_realised"):
        m.resolve_hparams(h, overrides={"spread_min_realised": "0"})


def test_further_passes_push_only_the_edits_still_short(tiny_handle):
    """In a batch, a further pass solves only for the edits below ``spread_min_realised``; the
    others get a zero residual, so their outputs are held where the first pass left them."""
    h = tiny_handle("llama")
    m = get_plugins().methods.get("memit")
    base = {**FAST, "layers": "[0, 1]", "mom2_update_weight": "1000", "stats_corpus": str(CORPUS)}
    first = _request(h)
    reqs = [first, EditRequest(prompt="The capital of Spain", subject="Spain", target_new=first.target_new, case_id="r2")]

    def realised(**over: str) -> tuple[list[float], int]:
        edit = m.apply(h, reqs, m.resolve_hparams(h, overrides={**base, **over}))
        out = edit.info["realised"], edit.info["spread_passes"]
        edit.revert()
        return out

    one, _ = realised()
    lo, hi = sorted(range(2), key=lambda i: one[i])
    assert one[hi] > one[lo], one
    both, n_both = realised(spread_passes="2")
    gated, n_gated = realised(spread_passes="2", spread_min_realised=str((one[lo] + one[hi]) / 2))
    assert n_both == n_gated == 2
    assert gated[lo] > one[lo] + 0.02 and both[hi] > one[hi] + 0.02, (one, both, gated)
    # the edit that already took moves far less when it is held than when it is pushed again
    assert abs(gated[hi] - one[hi]) < 0.5 * (both[hi] - one[hi]), (one, both, gated)


def test_null_space_projector_reports_what_it_protects():
    """P projects onto the directions below threshold × the largest eigenvalue; ``protected``
    counts the others, and ``top_share`` flags a covariance that one direction dominates."""
    from medit.plugins.methods.alphaedit.method import null_space_projector

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    evals = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.004, 0.003, 0.002, 0.001], dtype=torch.float64)
    ns = null_space_projector((Q * evals) @ Q.T, 0.01)
    assert ns.protected == 4 and ns.top_share < 0.6
    torch.testing.assert_close(ns.P.double(), Q[:, 4:] @ Q[:, 4:].T, rtol=0, atol=1e-6)
    dominated = evals.clone()
    dominated[0] = 1e4  # a massive-activation direction: everything else falls under the threshold
    ns = null_space_projector((Q * dominated) @ Q.T, 0.01)
    assert ns.protected == 1 and ns.top_share > 0.99


def test_alphaedit_warns_when_one_direction_dominates_the_covariance(tiny_handle, monkeypatch, capsys):
    """A layer whose key covariance one direction dominates gets a one-line warning (once per
    layer), and every edit reports how many directions each layer's projector protects."""
    from medit.plugins.methods.alphaedit.method import AlphaEditHParams

    h = tiny_handle("llama")
    m = get_plugins().methods.get("alphaedit")
    d_in = h.weight_out_in("mlp_out", 0).shape[1]
    spike = torch.eye(d_in) * 1e-3
    spike[0, 0] = 10.0
    monkeypatch.setattr(AlphaEditHParams, "stats", lambda self, handle, layers: ({0: spike}, 0.0))
    hp = m.resolve_hparams(h, overrides={**FAST, "layers": "[0]", "nullspace_threshold": "0.01"})
    m.start_run(h)
    edit = m.apply(h, [_request(h)], hp)
    err = capsys.readouterr().err
    assert "alphaedit layer 0" in err and f"protects only 1 of {d_in} directions" in err
    assert edit.info["nullspace_protected"] == {0: 1}
    edit.revert()
    again = m.apply(h, [_request(h)], hp)
    assert "warning" not in capsys.readouterr().err
    again.revert()
    # other statistics on the same handle (e.g. another stats_max_len) get their own projector
    flat = torch.eye(d_in) * torch.linspace(1.0, 1e-3, d_in)
    monkeypatch.setattr(AlphaEditHParams, "stats", lambda self, handle, layers: ({0: flat}, 0.0))
    other = m.apply(h, [_request(h)], hp)
    assert other.info["nullspace_protected"][0] > 1 and "warning" not in capsys.readouterr().err
    other.revert()


def test_t5_is_refused(tiny_handle):
    h = tiny_handle("t5")
    for name in ("rome", "memit", "alphaedit"):
        with pytest.raises(MethodError, match="does not support the t5 family"):
            get_plugins().methods.get(name).check_supported(h, "single")


def test_rome_negative_hparams_are_validated(tiny_handle):
    from medit.errors import HParamsError
    m = get_plugins().methods.get("rome")
    with pytest.raises(HParamsError, match="v_negative_subjects"):
        m.resolve_hparams(tiny_handle("gpt2"), overrides={"v_negative_subjects": "[Paris, ' ']"})
    with pytest.raises(HParamsError, match="v_negative_kl_factor"):
        m.resolve_hparams(tiny_handle("gpt2"), overrides={"v_negative_kl_factor": "-1"})
    with pytest.raises(HParamsError, match="'v_autocast' must be bfloat16, float16 or null.*'int8'"):
        m.resolve_hparams(tiny_handle("gpt2"), overrides={"v_autocast": "int8"})
    assert m.resolve_hparams(tiny_handle("gpt2"), overrides={"v_autocast": "null"}).v_autocast is None


def test_rome_refuses_batch_mode(tiny_handle):
    with pytest.raises(MethodError, match="--mode single or --mode sequential"):
        get_plugins().methods.get("rome").check_supported(tiny_handle("gpt2"), "batch")


def test_covariance_factor_is_memoised_and_memit_solve_matches_direct(tiny_handle):
    from medit.toolkit.spread import covariance_solver
    from medit.toolkit.stats import effective_dtype
    from medit.plugins.methods.memit.method import least_squares_keys

    h = tiny_handle("gpt2")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 24, generator=g)
    C = X.T @ X / 200
    K = torch.randn(24, 3, generator=g)
    inv = covariance_solver(h, C, scale=5.0, ridge=1e-3)
    assert inv.factored and covariance_solver(h, C, scale=5.0, ridge=1e-3) is inv
    A = 5.0 * C.double() + 1e-3 * (5.0 * C.double()).diagonal().mean() * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(inv(K), torch.linalg.solve(A, K.double()), rtol=1e-9, atol=1e-9)
    direct = torch.linalg.solve(15.0 * C.double() + K.double() @ K.double().T, K.double()).float()
    torch.testing.assert_close(least_squares_keys(h, C, 15.0, K), direct, rtol=1e-5, atol=1e-6)
    # rank-deficient statistics: no Cholesky factor, the direct solve of λC + KKᵀ still answers
    low = X[:, :20].T @ X[:, :20] / 200
    C2 = torch.zeros(24, 24)
    C2[:20, :20] = low
    assert not covariance_solver(h, C2, scale=15.0).factored
    K2 = torch.randn(24, 4, generator=g)
    K2[20:] = torch.eye(4)  # the new keys span the statistics' null space: λC + KKᵀ is invertible
    direct2 = torch.linalg.solve(15.0 * C2.double() + K2.double() @ K2.double().T, K2.double()).float()
    torch.testing.assert_close(least_squares_keys(h, C2, 15.0, K2), direct2, rtol=1e-5, atol=1e-5)
    # statistics computed with TF32 are cached apart only where TF32 applies
    assert effective_dtype(h, "float32", True) == "float32"


def test_clamp_escalation_only_for_requests_that_miss_their_target(tiny_handle):
    """With v_clamp_norm_factor_max, a request that misses its target within the steps gets as
    many more at the raised clamp; the first phase is exactly the unescalated run."""
    h = tiny_handle("gpt2")
    tight = DeltaSpec(steps=3, lr=0.5, clamp_norm_factor=1e-3, early_stop_nll=1e-6, max_clamp_steps=4)
    plain, info = optimise_deltas(h, [REQ], 0, ["{}"], tight)
    raised, info2 = optimise_deltas(h, [REQ], 0, ["{}"], DeltaSpec(**{**tight.__dict__, "clamp_norm_factor_max": 100.0}))
    assert info[0]["steps"] == 3 and info2[0]["steps"] == 7
    assert raised.norm() > 10 * plain.norm()
    assert info2[0]["nll"] < info[0]["nll"]
    # a request that reaches its target in the first phase is unaffected by the escalation
    free = DeltaSpec(steps=3, lr=0.5, clamp_norm_factor=1e6, early_stop_nll=1e-6)
    _, reached = optimise_deltas(h, [REQ], 0, ["{}"], free)
    easy = DeltaSpec(**{**free.__dict__, "early_stop_nll": reached[0]["nll"] + 1e-4})
    a, ia = optimise_deltas(h, [REQ], 0, ["{}"], easy)
    b, ib = optimise_deltas(h, [REQ], 0, ["{}"], DeltaSpec(**{**easy.__dict__, "clamp_norm_factor_max": 1e7}))
    assert ia[0]["steps"] == ib[0]["steps"] == 2 and a.norm() > 0
    assert torch.equal(a, b)
    from medit.errors import HParamsError
    with pytest.raises(HParamsError, match="v_clamp_norm_factor_max"):
        get_plugins().methods.get("rome").resolve_hparams(h, overrides={"v_clamp_norm_factor": "4",
                                                                          "v_clamp_norm_factor_max": "2"})


def test_clamp_escalation_looks_at_the_edit_prompt_not_the_extra_prompts(tiny_handle):
    """The raised clamp runs only for an edit whose own prompt misses its target, even when the
    extra prompts keep the combined NLL above the early stop."""
    h = tiny_handle("gpt2")
    forms = ["The capital of {}", "{} is associated with"]
    scorer = Scorer(h)
    nll = [-scorer.teacher_forced([TFQuery(f.replace("{}", SUBJECT), " the")])[0].mean_logprob for f in forms]
    assert all(scorer.target_length(f.replace("{}", SUBJECT), " the") == 1 for f in forms)
    lo, hi = sorted(range(2), key=lambda j: nll[j])
    assert nll[hi] - nll[lo] > 1e-3
    req = EditRequest(prompt=forms[lo].replace("{}", SUBJECT), subject=SUBJECT, target_new=" the", case_id="e")
    # a tiny clamp keeps the NLLs where they start: the edit prompt is below the early stop, the
    # mean over it and the extra prompt above
    spec = DeltaSpec(steps=3, lr=0.5, clamp_norm_factor=1e-6, clamp_norm_factor_max=2e-6, max_clamp_steps=4,
                     early_stop_nll=(3 * nll[lo] + nll[hi]) / 4, extra_prompts=(forms[hi],))
    _, info = optimise_deltas(h, [req], 0, ["{}"], spec)
    assert info[0]["steps"] == 3  # stopped when the first phase ended, without the raised clamp
    assert info[0]["nll"] > spec.early_stop_nll  # the combined NLL never reached the early stop
