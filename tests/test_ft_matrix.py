"""FT-L / FT-M × every family (the tiny Gemma aside, see FAMILIES) on tiny random models: the edit takes, revert is bit-exact,
unrelated prompts keep their prediction, and a patch round-trips onto a fresh model."""
from __future__ import annotations

import pytest
import torch

from medit.core.edit import load_patch
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer
from medit.core.queries import TFQuery

from conftest import FAMILIES as ALL_FAMILIES
from snapshots import model_state

# Not the tiny Gemma: its post-MLP norm caps what one layer's output can move, and the 3-token
# target's log-prob gain stops at 2.99 whatever the step size, steps or bound (measured: lr 0.05 /
# 0.2, 100 / 300 steps, norm_constraint 0.2 / 1.0), short of the argmax. FT-L / FT-M on Gemma are
# checked by the conformance kit (tests/test_conformance.py) on its own request, and on real
# Gemma-3-270M weights in docs/results.md.
FAMILIES = tuple(f for f in ALL_FAMILIES if f != "gemma")

REQ = EditRequest(prompt="The capital of France is", subject="France", target_new="Paris",
                  case_id="t1")
UNRELATED = [TFQuery("The quick brown fox jumps over the", "lazy dog"),
             TFQuery("The river bank", "is near")]


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_takes_reverts_and_patch_roundtrips(tiny_handle, tmp_path, family, method):
    handle = tiny_handle(family)
    m = get_plugins().methods.get(method)
    # Tiny random weights need a larger step than a trained model; only the size differs.
    hp = m.resolve_hparams(handle, overrides={"lr": "0.05", "steps": "100", "layers": "[1]"}
                           | ({"norm_constraint": "0.2"} if method == "ft-l" else {}))
    scorer = Scorer(handle)
    before = model_state(handle)
    pre = scorer.teacher_forced([TFQuery(REQ.prompt, REQ.target_new)] + UNRELATED)
    assert pre[0].exact == 0.0

    edit = m.apply(handle, [REQ], hp)
    post = scorer.teacher_forced([TFQuery(REQ.prompt, REQ.target_new)] + UNRELATED)
    assert post[0].exact == 1.0, f"{method} on {family} did not take: {post[0]}"
    changed = [k for k, v in handle.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [handle.param_name("mlp_out", 1)] or (handle.lm_head_tied and changed)
    # Unrelated prompts move far less than the edited one (a random tiny model's near-uniform
    # predictions flip on any change, so argmax agreement would test noise, not locality).
    gain = post[0].mean_logprob - pre[0].mean_logprob
    drift = max(abs(b.mean_logprob - a.mean_logprob) for a, b in zip(pre[1:], post[1:]))
    print(f"{family} {method}: gain {gain:.3f} drift {drift:.3f}")
    assert drift < 0.2 * gain

    path = edit.save(tmp_path / "p.patch")
    edit.revert()
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items()), "revert not bit-exact"

    fresh = tiny_handle(family, fresh=True)
    applied = load_patch(fresh, path)
    again = Scorer(fresh).teacher_forced([TFQuery(REQ.prompt, REQ.target_new)])
    assert again[0].exact == 1.0
    torch.testing.assert_close(torch.tensor(again[0].logprobs), torch.tensor(post[0].logprobs), rtol=1e-4, atol=1e-4)
    applied.revert()
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())


def test_failed_edit_restores_weights(tiny_handle, monkeypatch):
    handle = tiny_handle("llama")
    m = get_plugins().methods.get("ft-l")
    hp = m.resolve_hparams(handle)
    before = model_state(handle)
    calls = {"n": 0}
    real = Scorer.target_nll

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("interrupted")
        return real(self, *a, **k)

    monkeypatch.setattr(Scorer, "target_nll", boom)
    with pytest.raises(RuntimeError):
        m.apply(handle, [REQ], hp)
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())
    assert not any(p.requires_grad for p in handle.model.parameters())
