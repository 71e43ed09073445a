"""Patch kinds: every saveable Edit class registers its ``kind``; ``apply_patch`` dispatches on the
manifest's kind to the class's ``from_payload`` (the inverse of ``payload``), after core checked the
base-model fingerprint, for every kind. Old plugin loaders keep reading their old patches."""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from medit.core.edit import (CORE_FIELDS, Edit, WeightEdit, apply_patch, load_patch, patch_class, patch_kinds,
                             patch_requests)
from medit.core.method import Method
from medit.core.patchfile import PATCH_VERSION, read_manifest
from medit.core.requests import EditRequest
from medit.errors import EditError, PatchError
from medit.plugin.manager import Entry, get_plugins

from snapshots import model_state

REQ = EditRequest(prompt="The capital of France is", subject="France", target_new="Paris", case_id="k1")


class NoteEdit(Edit):
    """A plugin-style edit that changes nothing and carries one tensor."""

    kind = "test-note"

    def __init__(self, handle: Any, method: str, requests: Any, hparams: dict[str, Any], note: torch.Tensor) -> None:
        super().__init__(handle, method, requests, hparams)
        self.note = note

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"size": int(self.note.numel())}, {"note": self.note}

    @classmethod
    def from_payload(cls, handle: Any, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "NoteEdit":
        assert tensors["note"].numel() == manifest["size"]
        return cls(handle, manifest["method"], patch_requests(manifest), manifest["hparams"], tensors["note"])


def test_builtin_kinds_are_registered_to_their_classes():
    from medit.plugins.methods.grace.method import GraceEdit
    from medit.plugins.methods.ike.method import IKEEdit
    from medit.plugins.methods.serac.method import SeracEdit
    from medit.plugins.methods.wise.method import WiseEdit
    from medit.toolkit.added_neurons import NeuronEdit

    expected = {"weights": WeightEdit, "neurons": NeuronEdit, "codebook": GraceEdit, "side-memory": WiseEdit,
                "in-context": IKEEdit, "memory": SeracEdit}
    assert set(expected) <= set(patch_kinds())
    for kind, cls in expected.items():
        assert patch_class({"kind": kind, "method": "x"}) is cls
    assert not any(hasattr(get_plugins().methods.get(m), "load_patch") for m in get_plugins().methods.names()), \
        "a built-in method still reads patches itself"


def test_a_plugin_edit_round_trips_and_core_checks_the_base_model(tiny_handle, tmp_path):
    handle = tiny_handle("gpt2")
    edit = NoteEdit(handle, "note-method", [REQ], {"a": 1}, torch.arange(6.0))
    path = edit.save(tmp_path / "note")
    manifest = read_manifest(path)
    assert manifest["version"] == PATCH_VERSION == 3 and manifest["kind"] == "test-note"
    assert manifest["base_fingerprint"] == handle.fingerprint() and manifest["size"] == 6
    loaded = load_patch(tiny_handle("gpt2", fresh=True), path)
    assert isinstance(loaded, NoteEdit) and torch.equal(loaded.note, edit.note)
    assert [r.to_dict() for r in loaded.requests] == [REQ.to_dict()] and loaded.hparams == {"a": 1} and loaded.method == "note-method"
    other = tiny_handle("llama", fresh=True)  # the edit changed no weights: the whole model is checked
    with pytest.raises(PatchError, match="made for model .* fingerprint"):
        load_patch(other, path)


def test_every_kind_records_the_base_fingerprint(tiny_handle, tmp_path):
    """An in-context patch recorded none before version 3; now core writes and checks it."""
    handle = tiny_handle("gpt2")
    m = get_plugins().methods.get("ike")
    edit = m.apply(handle, [REQ], m.resolve_hparams(handle, overrides={"k": "0"}))
    path = edit.save(tmp_path / "ike")
    edit.revert()
    assert read_manifest(path)["base_fingerprint"] == handle.fingerprint()
    llama = tiny_handle("llama", fresh=True)
    before = model_state(llama)
    with pytest.raises(PatchError, match="apply it to the unedited model"):
        load_patch(llama, path)
    assert all(torch.equal(v, before[k]) for k, v in llama.model.state_dict().items())
    load_patch(tiny_handle("gpt2", fresh=True), path).revert()


def test_weight_patches_keep_their_per_parameter_fingerprint(tiny_handle, tmp_path):
    """A weight patch covers the edited parameters' original values only, so it still applies to
    a model whose other weights differ (e.g. after another patch)."""
    handle = tiny_handle("gpt2", fresh=True)
    name = handle.param_name("mlp_out", 1)
    other = handle.param_name("mlp_out", 0)
    p = dict(handle.model.named_parameters())[name]
    edit = WeightEdit.from_deltas(handle, "ft-l", [REQ], {}, dense={name: torch.full_like(p, 0.01)})
    path = edit.save(tmp_path / "w")
    assert read_manifest(path)["base_fingerprint"] == edit.base_fingerprint
    edit.revert()
    fresh = tiny_handle("gpt2", fresh=True)
    with torch.no_grad():
        dict(fresh.model.named_parameters())[other].add_(1.0)
    load_patch(fresh, path).revert()
    with torch.no_grad():
        dict(fresh.model.named_parameters())[name].add_(1.0)
    with pytest.raises(PatchError, match="fingerprint"):
        load_patch(fresh, path)


def test_unknown_kind_is_one_line_naming_the_known_kinds(tiny_handle, tmp_path):
    handle = tiny_handle("gpt2")
    path = NoteEdit(handle, "note-method", [REQ], {}, torch.ones(2)).save(tmp_path / "p")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["kind"] = "hologram"
    with pytest.raises(PatchError) as err:
        apply_patch(handle, manifest, {"note": torch.ones(2)}, where=str(path))
    msg = str(err.value)
    assert "\n" not in msg and "'hologram'" in msg and "weights" in msg and "codebook" in msg


def test_version_3_manifest_needs_a_base_fingerprint(tiny_handle, tmp_path):
    handle = tiny_handle("gpt2")
    path = NoteEdit(handle, "note-method", [], {}, torch.ones(2)).save(tmp_path / "p")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["base_fingerprint"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PatchError, match="base_fingerprint"):
        read_manifest(path)


def test_what_cannot_be_read_back_is_not_saved(tiny_handle, tmp_path):
    handle = tiny_handle("gpt2")

    class Unnamed(Edit):  # no kind of its own
        def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            return {}, {}

    class WriteOnly(Edit):
        kind = "test-write-only"

        def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            return {}, {}

    class Greedy(NoteEdit):
        def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            return {"requests": []}, {}

    for cls in (Unnamed, WriteOnly, Edit):
        with pytest.raises(NotImplementedError, match="cannot be saved"):
            cls(handle, "m", [], {}).save(tmp_path / cls.__name__)
    with pytest.raises(EditError, match="requests"):
        Greedy(handle, "m", [], {}, torch.ones(1)).save(tmp_path / "greedy")
    assert "requests" in CORE_FIELDS and not any(tmp_path.iterdir())


def test_a_kind_belongs_to_one_class():
    with pytest.raises(TypeError, match="test-note"):
        class Impostor(Edit):
            kind = "test-note"
    assert patch_class({"kind": "test-note", "method": "x"}) is NoteEdit


def test_old_plugin_loader_still_reads_its_old_patches(tiny_handle, monkeypatch):
    """Before version 3 an Edit class without a kind of its own saved as ``weights`` and its
    method's load_patch read it: such a patch of such a plugin is still read by that method."""
    handle = tiny_handle("gpt2")

    class OldPlugin(Method):
        name = "old-plugin"

        def load_patch(self, handle: Any, manifest: dict[str, Any], tensors: dict[str, Any]) -> Edit:
            return Edit(handle, self.name, patch_requests(manifest), manifest["hparams"])

    entries = get_plugins().methods._entries
    monkeypatch.setitem(entries, "old-plugin", Entry("old-plugin", OldPlugin(), "test", "test", "0"))
    manifest = {"format": "medit-patch", "version": 2, "kind": "weights", "method": "old-plugin",
                "model": {"id": "tiny"}, "hparams": {"x": 1}, "requests": [REQ.to_dict()], "state": "opaque"}
    edit = apply_patch(handle, manifest, {})
    assert type(edit) is Edit and edit.method == "old-plugin" and [r.to_dict() for r in edit.requests] == [REQ.to_dict()]
    with pytest.raises(PatchError, match="malformed|fingerprint"):  # version 3: the kind decides
        apply_patch(handle, {**manifest, "version": 3, "base_fingerprint": "0" * 16}, {})
