"""Neuron-level editors (KN, T-Patcher, CaliNET) on tiny random GPT-2, LLaMA and T5 models:
integrated-gradients completeness, the edit takes, revert is exact, patches round-trip."""
from __future__ import annotations

import json

import pytest
import torch

from medit.toolkit.attribution import integrated_gradients
from medit.core.edit import CompositeEdit, load_patch
from medit.errors import HParamsError
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer
from medit.core.queries import TFQuery

from snapshots import model_state

FAMILIES = ("gpt2", "llama", "t5")
REQ = EditRequest(prompt="The capital of France is", subject="France", target_new="Paris",
                  target_true="French", rephrase=("The mother tongue of France is",), case_id="n1")
REQ2 = EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                   target_new="the", target_true="French", case_id="n2")
UNRELATED = [TFQuery("The quick brown fox jumps over the", "lazy dog"), TFQuery("The river bank", "is near")]
# Tiny random models need larger steps than a trained one, and smaller memories; T-Patcher's lr is
# 0.08 (default 0.05), where both of the batch test's edits take on every CPU tried.
TINY = {"kn": {"edit_scale": "4.0"},
        "t-patcher": {"lr": "0.08", "memory_texts": "6", "memory_max_len": "10"},
        "calinet": {"lr": "0.2", "steps": "50", "context_templates": "[[3, 1]]", "memory_texts": "6",
                    "memory_max_len": "10"}}


def _logits(handle, queries) -> torch.Tensor:
    return torch.tensor([lp for r in Scorer(handle).teacher_forced(queries) for lp in r.logprobs])


def _hooks(handle) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_integrated_gradients_completeness(tiny_handle, family):
    handle = tiny_handle(family, fresh=True)
    with torch.no_grad():  # random FFNs barely move the output; louder ones make F(a) - F(0) sizeable
        for layer in range(handle.n_layers):
            handle.weight_out_in("mlp_out", layer).mul_(10.0)
    layers = list(range(handle.n_layers))
    words = ["the", "is", "Paris", "French", "of", "a", "France", "capital", "The"]
    res = Scorer(handle).teacher_forced([TFQuery(REQ.prompt, w) for w in words])
    answer = max(zip(words, res), key=lambda x: x[1].logprobs[0])[0]
    for scope in ("joint", "layer"):
        attr, info = integrated_gradients(handle, REQ.prompt, answer, layers, steps=20, scope=scope,
                                          target_tokens=2)
        assert set(attr) == set(layers)
        d_ff = handle.weight_out_in("mlp_out", 0).shape[1]
        assert all(a.shape == (d_ff,) for a in attr.values())
        gap = info["sum_gap"]
        print(f"{family} {scope} {answer!r}: F(a) {info['f_full']:.4f} sum(attr) {info['attr_sum']:.5f} "
              f"vs F(a)-F(0) {gap:.5f}")
        assert abs(gap) > 0.1 * info["f_full"] > 0  # the FFN activations matter for this answer
        assert abs(info["attr_sum"] - gap) <= 0.1 * abs(gap)
    assert _hooks(handle) == 0


def _edit_checks(handle, method, req, tmp_path, tiny_handle, family):
    m = get_plugins().methods.get(method)
    hp = m.resolve_hparams(handle, overrides=TINY[method])
    before = model_state(handle)
    queries = [TFQuery(req.prompt, req.target_new), TFQuery(req.prompt, req.target_true)] + UNRELATED
    pre = _logits(handle, queries)
    pre_new, pre_old = Scorer(handle).teacher_forced(queries[:2])
    n_hooks = _hooks(handle)

    edit = m.apply(handle, [req], hp)
    scorer = Scorer(handle)
    new, old = scorer.teacher_forced(queries[:2])
    post = _logits(handle, queries)
    if method == "kn":  # the located neurons' value vectors now favour the new answer's first token
        assert edit.info["neurons"], f"kn located no neuron on {family}"
        assert new.logprobs[0] > pre_new.logprobs[0] and old.logprobs[0] < pre_old.logprobs[0], \
            f"kn on {family} did not move the answer: {pre_new} {new} {pre_old} {old}"
    else:
        assert new.exact == 1.0, f"{method} on {family} did not take: {new}"
    assert not torch.equal(pre, post)

    path = edit.save(tmp_path / f"{method}-{family}.patch")
    edit.revert()
    assert torch.equal(_logits(handle, queries), pre), "outputs differ after revert"
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items()), "weights differ after revert"
    assert _hooks(handle) == n_hooks, "hooks left behind"
    assert not any(p.requires_grad for p in handle.model.parameters())

    fresh = tiny_handle(family, fresh=True)
    fresh_pre = _logits(fresh, queries)
    # (another copy of the same model: equal up to float reordering, not necessarily bit for bit)
    torch.testing.assert_close(fresh_pre, pre, rtol=1e-5, atol=1e-5)
    applied = load_patch(fresh, path)
    torch.testing.assert_close(_logits(fresh, queries), post, rtol=1e-5, atol=1e-5)
    applied.revert()
    assert torch.equal(_logits(fresh, queries), fresh_pre), "outputs differ after the loaded patch is removed"
    return edit


@pytest.mark.parametrize("method", ["kn", "t-patcher", "calinet"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_takes_reverts_and_patch_roundtrips(tiny_handle, tmp_path, family, method):
    _edit_checks(tiny_handle(family), method, REQ, tmp_path, tiny_handle, family)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_tpatcher_sequential_adds_neurons_and_keeps_silent(tiny_handle, family):
    handle = tiny_handle(family)
    m = get_plugins().methods.get("t-patcher")
    hp = m.resolve_hparams(handle, overrides=TINY["t-patcher"])
    before = model_state(handle)
    pre = _logits(handle, UNRELATED)
    first = m.apply(handle, [REQ], hp)
    second = m.apply(handle, [REQ2], hp)
    both = CompositeEdit(handle, [first, second])
    res = Scorer(handle).teacher_forced([TFQuery(REQ.prompt, REQ.target_new), TFQuery(REQ2.prompt, REQ2.target_new)])
    assert [r.exact for r in res] == [1.0, 1.0], res
    # The second patch was trained to stay silent on the first edit's inputs (its memory).
    layer = first.groups[0][0]
    g1, g2 = first.groups[0][1], second.groups[0][1]
    # (one neuron per target token, each firing on the input that predicts its token)
    assert bool((g2.pre(g1.inputs) < 0).all()) and bool((g1.pre(g1.inputs).diagonal() > 0).all())
    drift = (_logits(handle, UNRELATED) - pre).abs().max()
    print(f"{family}: unrelated log-prob drift {float(drift):.4f} (layer {layer})")
    both.revert()
    assert torch.equal(_logits(handle, UNRELATED), pre)
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())


def test_bad_hparams_are_rejected(tiny_handle):
    handle = tiny_handle("llama")
    for method, bad in [("kn", {"threshold": "1.5"}), ("kn", {"layers": "some"}),
                        ("t-patcher", {"neurons": "0"}), ("calinet", {"slots": "0"}),
                        ("calinet", {"activation": "tanh"})]:
        with pytest.raises(HParamsError):
            get_plugins().methods.get(method).resolve_hparams(handle, overrides=bad)


def test_cli_locate_prints_neurons_without_editing(tiny_model_dirs, tmp_path):
    from typer.testing import CliRunner
    from medit.cli import app

    data = tmp_path / "edits.jsonl"
    data.write_text(json.dumps(REQ.to_dict()) + "\n")
    model = str(tiny_model_dirs["llama"])
    ok = CliRunner().invoke(app, ["locate", str(data), "--method", "kn", "--model", model, "--set", "steps=4"])
    assert ok.exit_code == 0, ok.output
    lines = [ln.split() for ln in ok.output.splitlines() if ln.startswith("n1 ")]
    assert lines and all(0 <= int(c[1]) < 2 and 0 <= int(c[2]) < 80 for c in lines)
    bad = CliRunner().invoke(app, ["locate", str(data), "--method", "ft-l", "--model", model])
    assert bad.exit_code == 2 and "does not locate neurons" in bad.output


def test_tpatcher_batch_is_one_patch(tiny_handle, tmp_path):
    handle = tiny_handle("gpt2")
    m = get_plugins().methods.get("t-patcher")
    hp = m.resolve_hparams(handle, overrides=TINY["t-patcher"])
    pre = _logits(handle, UNRELATED)
    n_hooks = _hooks(handle)
    edit = m.apply(handle, [REQ, REQ2], hp)
    queries = [TFQuery(REQ.prompt, REQ.target_new), TFQuery(REQ2.prompt, REQ2.target_new)]
    try:  # a failed assertion must not leave the shared model hooked for later tests
        post = _logits(handle, queries)
        assert [r.exact for r in Scorer(handle).teacher_forced(queries)] == [1.0, 1.0]
        path = edit.save(tmp_path / "both.patch")
    finally:
        edit.revert()
    assert torch.equal(_logits(handle, UNRELATED), pre) and _hooks(handle) == n_hooks
    fresh = tiny_handle("gpt2", fresh=True)
    applied = load_patch(fresh, path)
    assert len(applied.requests) == 2 and applied.n_neurons == edit.n_neurons
    torch.testing.assert_close(_logits(fresh, queries), post, rtol=1e-5, atol=1e-5)


def test_violated_mean_averages_only_broken_constraints():
    from medit.plugins.methods.tpatcher.method import violated_mean
    assert float(violated_mean(torch.tensor([-1.0, -0.5]))) == 0.0
    # two violators among many satisfied rows keep their full weight (no dilution)
    slack = torch.cat([torch.full((1000,), -2.0), torch.tensor([1.0, 3.0])])
    assert float(violated_mean(slack)) == pytest.approx(2.0)


def test_tpatcher_memory_from_a_dataset_silences_the_neighbour(tiny_handle, tmp_path):
    """With ``memory_corpus`` an edit dataset, its prompts (+ true answers) and locality prompts
    (+ answers) are the memory, and the patch stays silent on them."""
    from medit.toolkit.added_neurons import _memory_texts, target_batch, target_inputs
    neighbour = "The capital of Germany is"
    other = EditRequest(prompt=neighbour, subject="Germany", target_new="Rome", target_true="Berlin",
                        locality=({"prompt": "The capital of Spain is", "answer": "Madrid"},), case_id="m1")
    data = tmp_path / "memory.jsonl"
    data.write_text(json.dumps(other.to_dict()) + "\n")
    spec = f"medit-jsonl:{data}"
    assert _memory_texts(spec, 5) == ["The capital of Germany is Berlin", "The capital of Spain is Madrid"]
    handle = tiny_handle("llama")
    m = get_plugins().methods.get("t-patcher")
    hp = m.resolve_hparams(handle, overrides={**TINY["t-patcher"], "memory_corpus": spec, "memory_max_len": "64",
                                                    "negative_subjects": "[]"})
    edit = m.apply(handle, [REQ], hp)
    try:
        layer, g = edit.groups[0]
        x_nb = target_inputs(handle, layer, target_batch(handle, [other], [[neighbour]]))
        # row 0: the neighbour's last prompt position, which the memory text covers
        assert bool((g.pre(x_nb[0]) < -hp.memory_margin + 1e-4).all()) and bool((g.pre(g.inputs).diagonal() > 0).all())
        assert Scorer(handle).teacher_forced([TFQuery(REQ.prompt, REQ.target_new)])[0].exact == 1.0
    finally:
        edit.revert()


def test_kn_scale_search_picks_the_smallest_scale_that_takes(tiny_handle):
    handle = tiny_handle("llama")
    m = get_plugins().methods.get("kn")
    hp = m.resolve_hparams(handle, overrides={"edit_scale": "16.0", "scale_search": "true", "scale_steps": "8",
                                              "scale_margin": "2.5", "steps": "4"})
    queries = [TFQuery(REQ.prompt, REQ.target_new), TFQuery(REQ.prompt, REQ.target_true)]

    def gap(edit) -> float:
        new, old = Scorer(handle).teacher_forced(queries)
        edit.revert()
        return new.mean_logprob - old.mean_logprob

    edit = m.apply(handle, [REQ], hp)
    scale = edit.info["scale"]
    print(f"kn: chosen scale {scale}")
    assert scale in [16.0 / 2 ** k for k in range(8)]
    assert gap(edit) >= 2.5 or scale == 16.0
    if scale > 16.0 / 2 ** 7:  # half of it did not take
        half = m.resolve_hparams(handle, overrides={"edit_scale": str(scale / 2), "scale_search": "false", "steps": "4"})
        assert gap(m.apply(handle, [REQ], half)) < 2.5
