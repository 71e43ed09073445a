"""A sequence of weight edits keeps one copy of each edited matrix's original, reverts exactly as
a whole, refuses to revert (or save) a sharing member alone, and saves as one patch."""
from __future__ import annotations

import json

import pytest
import torch

from medit.core.edit import CompositeEdit, WeightEdit, load_patch, share_originals
from medit.errors import EditError

from snapshots import model_state


def _rank_one(handle, name: str, seed: int) -> WeightEdit:
    p = dict(handle.model.named_parameters())[name]
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(p.shape[0], 1, generator=g) * 0.1, torch.randn(p.shape[1], 1, generator=g)
    return WeightEdit.from_deltas(handle, "memit", [], {}, factors={name: (u, v)})


def test_sequence_shares_originals_and_reverts_exactly(tiny_handle, tmp_path):
    h = tiny_handle("llama")
    a, b = h.param_name("mlp_out", 0), h.param_name("mlp_out", 1)
    before = model_state(h)
    edits = [_rank_one(h, a, 0), _rank_one(h, a, 1), _rank_one(h, b, 2), _rank_one(h, a, 3)]
    after = model_state(h)
    share_originals(edits)
    share_originals(edits)  # idempotent
    assert [sorted(e.originals) for e in edits] == [[a], [], [b], []]
    assert [sorted(e.shared) for e in edits] == [[], [a], [], [a]]

    with pytest.raises(EditError, match="revert the whole sequence"):
        edits[1].revert()
    with pytest.raises(EditError, match="save the whole sequence"):
        edits[3].save(tmp_path / "alone")
    assert all(torch.equal(v, after[k]) for k, v in h.model.state_dict().items()), "a refused revert changed weights"

    whole = CompositeEdit(h, edits)
    path = whole.save(tmp_path / "seq")
    whole.revert()
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items()), "revert not bit-exact"

    fresh = tiny_handle("llama", fresh=True)
    applied = load_patch(fresh, path)
    for name in (a, b):
        torch.testing.assert_close(dict(fresh.model.named_parameters())[name], after[name], rtol=1e-5, atol=1e-6)
    applied.revert()


def test_unshared_edits_still_revert_alone(tiny_handle):
    h = tiny_handle("gpt2")
    before = model_state(h)
    e = _rank_one(h, h.param_name("mlp_out", 0), 0)
    CompositeEdit(h, [e])
    e.revert()
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())


def test_factors_that_outgrow_the_matrix_are_dropped_for_a_dense_patch(tiny_handle, tmp_path):
    """A long sequence does not pile up low-rank factors: once a parameter's factors are as large
    as the matrix, every edit drops them and the sequence's patch stores that parameter dense."""
    h = tiny_handle("llama")
    a, b = h.param_name("mlp_out", 0), h.param_name("mlp_out", 1)
    rows, cols = dict(h.model.named_parameters())[a].shape
    rank_fill = rows * cols // (rows + cols)  # rank-one edits until the factors outweigh the matrix
    edits = [_rank_one(h, a, i) for i in range(rank_fill)] + [_rank_one(h, b, 99)]
    share_originals(edits)
    assert all(a in e.factors for e in edits[:-1]), "kept while smaller than the matrix"
    edits.append(_rank_one(h, a, rank_fill))
    after = model_state(h)
    share_originals(edits)
    assert not any(a in e.factors for e in edits) and b in edits[-2].factors
    whole = CompositeEdit(h, edits)
    path = whole.save(tmp_path / "long")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["params"][a]["storage"] == "dense" and manifest["params"][b]["storage"] == "lowrank"
    whole.revert()
    fresh = tiny_handle("llama", fresh=True)
    applied = load_patch(fresh, path)
    for name in (a, b):
        torch.testing.assert_close(dict(fresh.model.named_parameters())[name], after[name], rtol=1e-5, atol=1e-6)
    applied.revert()
