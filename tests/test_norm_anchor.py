"""Norm anchoring (medit.toolkit.norm_anchor), the shared option of rome, memit, alphaedit,
ultraedit and ft: the anchored norms hold over sequential edits on tiny models, edits still
revert bit for bit and round-trip as patches, and bad values are one-line errors."""
from __future__ import annotations

import pytest
import torch

from medit.api import get_method
from medit.core.edit import CompositeEdit, apply_patch
from medit.errors import HParamsError
from medit.testing import default_requests, training_requests
from medit.toolkit.norm_anchor import NormAnchors, anchor_values
from medit.toolkit.target_vectors import subject_outputs

METHODS = ("rome", "memit", "alphaedit", "ultraedit", "ft-l")


def _state(handle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in handle.model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [{"norm_anchor": "maybe"}, {"norm_anchor_samples": "0"}])
def test_bad_values_refused(method, bad):
    with pytest.raises(HParamsError):
        get_method(method).hparams_class.from_dict(bad)


@pytest.mark.parametrize("method", METHODS)
def test_off_by_default(method):
    assert get_method(method).hparams_class().norm_anchor is False


@pytest.mark.parametrize("method,extra", [("ultraedit", {"lr": "1.0", "layers": "[0, 1]"}),
                                          ("ft-l", {"lr": "0.05", "norm_constraint": "null"})])
def test_weight_anchor_keeps_norms_and_reverts(tiny_handle, tmp_path, method, extra):
    handle = tiny_handle("llama")
    m = get_method(method)
    hp = m.hparams_class.from_dict({**extra, "norm_anchor": "true"})
    m.start_run(handle)
    before = _state(handle)
    edits = [m.apply(handle, [r], hp) for r in training_requests(4)]
    names = list(edits[0].originals)
    params = dict(handle.model.named_parameters())
    for n in names:
        ref = before[n].double().norm()
        assert abs(float(params[n].double().norm() / ref) - 1) < 1e-5
        assert not torch.equal(params[n].detach(), before[n])
    edited = _state(handle)
    seq = CompositeEdit(handle, edits)
    seq.save(tmp_path / "patch")
    seq.revert()
    after = _state(handle)
    assert all(torch.equal(before[k], after[k]) for k in before)
    applied = apply_patch(handle, *_read(tmp_path / "patch"))
    for n in names:
        assert torch.allclose(dict(handle.model.named_parameters())[n].detach(), edited[n], atol=1e-5)
    applied.revert()
    assert all(torch.equal(before[k], v) for k, v in _state(handle).items())


def test_weights_grow_without_the_anchor(tiny_handle):
    handle = tiny_handle("llama")
    m = get_method("ultraedit")
    hp = m.hparams_class.from_dict({"lr": "1.0", "layers": "[0, 1]"})
    m.start_run(handle)
    before = _state(handle)
    edits = [m.apply(handle, [r], hp) for r in training_requests(4)]
    params = dict(handle.model.named_parameters())
    growth = [float(params[n].double().norm() / before[n].double().norm()) for n in edits[0].originals]
    CompositeEdit(handle, edits).revert()
    assert max(abs(g - 1) for g in growth) > 1e-4


def _read(path):
    from medit.core.patchfile import read_patch
    return read_patch(path)


def test_anchor_values_rescale_to_the_first_edits_mean(tiny_handle):
    handle = tiny_handle("llama")
    handle.reset_state(NormAnchors)
    reqs = training_requests(3)
    hp = get_method("memit").hparams_class.from_dict({"norm_anchor": "true", "norm_anchor_samples": "2"})
    torch.manual_seed(0)
    v0 = subject_outputs(handle, reqs, 1)
    deltas = torch.randn_like(v0) * 3
    out = anchor_values(handle, reqs, 1, deltas, hp)
    ref = (v0 + deltas).norm(dim=1)[:2].mean()
    assert torch.allclose((v0 + out).norm(dim=1), ref.expand(3), rtol=1e-5)
    # later edits keep the reference the first two set
    out2 = anchor_values(handle, reqs[:1], 1, deltas[:1] * 10, hp)
    assert torch.allclose((v0[:1] + out2).norm(dim=1), ref[None], rtol=1e-5)
    handle.reset_state(NormAnchors)


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_value_anchor_sequential_edits_revert(tiny_handle, method):
    handle = tiny_handle("gpt2")
    m = get_method(method)
    hp = m.hparams_class.from_dict({"norm_anchor": "true", "v_steps": "5", "stats_samples": "8"})
    m.start_run(handle)
    before = _state(handle)
    reqs = default_requests()[:1] + training_requests(2)
    edits = [m.apply(handle, [r], hp) for r in reqs]
    assert handle.state(NormAnchors).values  # the reference was set
    assert any(not torch.equal(before[k], v) for k, v in _state(handle).items())
    CompositeEdit(handle, edits).revert()
    assert all(torch.equal(before[k], v) for k, v in _state(handle).items())
