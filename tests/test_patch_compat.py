"""Patches saved by earlier medit versions still load to the same model.

``tests/data/legacy-patches`` holds patches written before the patch kinds were registered in core
(manifest versions 1 and 2, read back then by method-specific loaders), made on the tiny random
models of ``medit.testing`` (same builder, same seed), and the teacher-forced log-probs the model
gave with each patch applied as that code loaded it. Today's loader must give those (to float32
rounding: the CPU that recorded them may round differently), and revert bit for bit.
"""
from __future__ import annotations

import json

import pytest
import torch

from medit.core.edit import load_patch
from medit.core.queries import TFQuery
from medit.errors import PatchError
from medit.scoring.engine import Scorer

from conftest import TEST_DATA
from snapshots import model_state

LEGACY = TEST_DATA / "legacy-patches"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
QUERIES = [TFQuery(p, t) for p, t in EXPECTED["queries"]]


def _hooks(handle) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())


@pytest.mark.parametrize("name", sorted(EXPECTED["cases"]))
def test_legacy_patch_loads_to_the_same_model(tiny_handle, name):
    case = EXPECTED["cases"][name]
    handle = tiny_handle(case["family"], fresh=True)
    before, hooks = model_state(handle), _hooks(handle)
    edit = load_patch(handle, LEGACY / name)
    manifest = json.loads((LEGACY / name / "manifest.json").read_text())
    assert edit.kind == manifest["kind"] and edit.method == case["method"]
    got = [list(r.logprobs) for r in Scorer(handle, use_cache=False).teacher_forced(QUERIES, edit.transform_prompts)]
    # the recorded log-probs came from another CPU: its kernels round the last float32 bits
    # differently, while a patch loaded wrongly moves them by far more than 1e-5
    for g, want in zip(got, case["loaded"], strict=True):
        assert g == pytest.approx(want, abs=1e-5, rel=0), f"legacy {name} patch no longer loads to the same model"
    edit.revert()
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())
    assert _hooks(handle) == hooks


@pytest.mark.parametrize("name", ["ft-l", "grace", "t-patcher", "ike"])
def test_legacy_patch_on_another_model_is_refused(tiny_handle, name):
    other = "llama" if EXPECTED["cases"][name]["family"] == "gpt2" else "gpt2"
    handle = tiny_handle(other, fresh=True)
    before = model_state(handle)
    if name == "ike":  # an in-context patch recorded no model fingerprint before version 3
        load_patch(handle, LEGACY / name).revert()
        return
    with pytest.raises(PatchError, match="made for"):
        load_patch(handle, LEGACY / name)
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())
