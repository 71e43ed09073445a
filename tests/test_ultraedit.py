"""UltraEdit's maths and run state on tiny random models (its conformance on every family is in
tests/test_conformance.py)."""
from __future__ import annotations

import pytest
import torch

from medit.core.edit import CompositeEdit
from medit.errors import HParamsError
from medit.api import get_method
from medit.testing import default_requests, training_requests
from medit.toolkit.lifelong import LifelongMoments, RunningMoments
from medit.plugins.methods.ultraedit.method import UltraEditHParams, key_least_squares


def _method():
    return get_method("ultraedit")


def _state(handle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in handle.model.state_dict().items()}


def test_running_moments_match_torch_and_copies_stay_as_they_were():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(3, 7) * 4 + 2
    m = RunningMoments()
    m.add(a)
    kept = m.copy()
    m.add(b)
    mean, std = m.mean_std()
    both = torch.cat([a, b]).double()
    assert torch.allclose(mean, both.mean(0)) and torch.allclose(std, both.std(0))
    mean, std = kept.mean_std()
    assert kept.n == 5 and torch.equal(mean, a.double().sum(0) / 5) and torch.allclose(std, a.double().std(0))
    one = RunningMoments()
    one.add(a[:1])
    assert torch.equal(one.mean_std()[1], torch.ones(7, dtype=torch.float64))  # no spread from one row
    with pytest.raises(ValueError):
        RunningMoments().mean_std()


def test_key_least_squares_is_the_ridge_solution():
    torch.manual_seed(0)
    K = torch.randn(4, 9)
    direct = torch.linalg.solve(K.double().T @ K.double() + 2.0 * torch.eye(9, dtype=torch.float64), K.double().T)
    assert torch.allclose(key_least_squares(K, 2.0), direct, atol=1e-10)


@pytest.mark.parametrize("bad", [{"lr": "0"}, {"ridge": "-1"}, {"modules": "[attn]"}])
def test_bad_hparams_refused(bad):
    with pytest.raises(HParamsError):
        UltraEditHParams.from_dict(bad)


def test_sequential_edits_accumulate_moments_and_revert_to_nothing(tiny_handle):
    handle = tiny_handle("llama")
    m = _method()
    hp = UltraEditHParams.from_dict({"lr": "0.01", "layers": "[0, 1]"})
    m.start_run(handle)
    before = _state(handle)
    reqs = training_requests(2)
    edits = [m.apply(handle, [r], hp) for r in reqs]
    moments = handle.state(LifelongMoments).by_param
    names = [handle.param_name("mlp_in", layer) for layer in (0, 1)]
    assert sorted(moments) == sorted(names)
    counts = [edits[0].info["target_tokens"][n] + edits[1].info["target_tokens"][n] for n in names]
    assert [moments[n].n for n in names] == counts and all(c > 0 for c in counts)
    whole = CompositeEdit(handle, edits)  # the later edit gives its revert state up to the first
    assert set(edits[0].before) == set(names) and edits[1].before == {}
    whole.revert()
    moments = handle.state(LifelongMoments).by_param
    assert all(moments[n].n == 0 for n in names)
    after = _state(handle)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_normalisation_changes_the_shift(tiny_handle):
    """The lifelong normalisation is not a no-op: with it off the same edit moves the weights differently."""
    handle = tiny_handle("gpt2")
    m = _method()
    req = default_requests()[:1]
    deltas = []
    for normalise in ("true", "false"):
        m.start_run(handle)
        edit = m.apply(handle, req, UltraEditHParams.from_dict({"lr": "0.01", "normalise": normalise}))
        deltas.append(edit.deltas())
        edit.revert()
    name = next(iter(deltas[0]))
    assert deltas[0][name].abs().sum() > 0 and not torch.allclose(deltas[0][name], deltas[1][name])


def test_gate_and_up_projections_edit_and_revert(tiny_handle):
    """The reference edits a gated MLP's gate and up projections together (``mlp_gate`` + ``mlp_in``)."""
    handle = tiny_handle("llama")
    m = _method()
    hp = UltraEditHParams.from_dict({"lr": "0.01", "layers": "[0, 1]", "modules": "[mlp_gate, mlp_in]"})
    m.start_run(handle)
    before = _state(handle)
    edit = m.apply(handle, default_requests()[:1], hp)
    gates = [handle.param_name("mlp_gate", layer) for layer in (0, 1)]
    assert all(n in edit.info["edited"] for n in gates)
    assert all(not torch.equal(before[n], dict(handle.model.named_parameters())[n].detach()) for n in gates)
    edit.revert()
    assert all(torch.equal(before[k], v) for k, v in _state(handle).items())


def test_gate_refused_without_a_gated_mlp(tiny_handle):
    handle = tiny_handle("gpt2")
    hp = UltraEditHParams.from_dict({"modules": "[mlp_gate]"})
    with pytest.raises(HParamsError, match="no 'mlp_gate'"):
        _method().apply(handle, default_requests()[:1], hp)


def test_preserved_least_squares_is_the_weighted_ridge_solution(tiny_handle):
    from medit.plugins.methods.ultraedit.method import preserved_least_squares
    from medit.toolkit.spread import CovarianceSolver
    torch.manual_seed(0)
    X = torch.randn(50, 9)
    C = (X.T @ X / 50).float()
    K = torch.randn(4, 9)
    A = 3.0 * C.double() + 0.5 * torch.eye(9, dtype=torch.float64)
    direct = torch.linalg.solve(A + K.double().T @ K.double(), K.double().T)
    solver = CovarianceSolver(C, 3.0, 0.5 / (3.0 * float(C.diagonal().double().mean())))
    assert torch.allclose(preserved_least_squares(K, solver), direct, atol=1e-8)


def test_preserve_edits_and_reverts(tiny_handle):
    handle = tiny_handle("gpt2")
    m = _method()
    hp = UltraEditHParams.from_dict({"lr": "0.01", "modules": "[mlp_out]", "preserve": "100", "stats_samples": "16"})
    m.start_run(handle)
    before = _state(handle)
    edit = m.apply(handle, default_requests()[:1], hp)
    assert any(not torch.equal(before[k], v) for k, v in _state(handle).items())
    edit.revert()
    assert all(torch.equal(before[k], v) for k, v in _state(handle).items())


@pytest.mark.parametrize("bad", [{"preserve": "-1"}, {"preserve": "10", "modules": "[mlp_in]"}, {"stats_samples": "0"}])
def test_bad_preserve_refused(bad):
    with pytest.raises(HParamsError):
        UltraEditHParams.from_dict(bad)


@pytest.mark.parametrize("family,at_targets", [("llama", True), ("gpt2", False), ("t5", True)])
def test_token_grads_in_small_passes_equal_one_pass(tiny_handle, monkeypatch, family, at_targets):
    """token_grads runs GRAD_BATCH prompts per backward pass (bounded memory for a turn of many
    edits); the rows are those of one pass over every prompt."""
    from medit.scoring.engine import Scorer
    from medit.toolkit import gradient_editors as ge

    handle = tiny_handle(family)
    names = ge.edited_params(handle, ["mlp_in"], [0, 1])
    pairs = ge.edit_pairs(Scorer(handle), training_requests(5))
    one = ge.token_grads(handle, names, pairs, at_targets=at_targets)
    monkeypatch.setattr(ge, "GRAD_BATCH", 2)
    parts = ge.token_grads(handle, names, pairs, at_targets=at_targets)
    for n in names:
        for a, b in zip(one[n], parts[n]):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
