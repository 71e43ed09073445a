"""GRACE (Hartvigsen et al. 2023): a discrete key-value codebook at one layer's output.

The key of a token is the residual stream entering block ``layer`` at that token. When it lies
within the deferral radius ε of a stored key, the block's output at that token is replaced by the
entry's learned value; every other token passes through untouched (bit for bit). An edit stores
the key of its prompt's last token (the token that predicts the target) with a value trained so
that the model produces the target. A new key inside an existing entry's ball either expands that
entry (same target) or splits the two (different targets: both radii become half their distance).
Removing an edit removes its entries and undoes its expansions/splits. The weights never change.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import medit
from medit.core.edit import Edit, patch_requests
from medit.errors import HParamsError, PatchError
from medit.model.handle import ModelHandle
from medit.model.adaptors import Adaptor, attach, installed, release
from medit.toolkit.layerwise import LayerwiseLM
from medit.core.hparams import HParams
from medit.model.layers import resolve_layers
from medit.core.method import Method
from medit.core.requests import EditRequest
from medit.scoring.engine import Scorer
from medit.model.tracing import capture, run_until
from medit.plugins.methods.grace import DESCRIPTION

AUTO_DEPTH = 0.7


@dataclass
class GRACEHParams(HParams):
    """Hyperparameters of GRACE."""

    #: block whose output the codebook replaces (index, negative from the end, or ``auto``).
    layer: int | str = "auto"
    #: initial deferral radius of a new entry, as a fraction of its key's norm.
    eps: float = 0.05
    #: Adam steps and learning rate of a new entry's value.
    steps: int = 60
    lr: float = 0.5
    #: stop training once every target token is the argmax and the mean NLL is below this.
    early_stop_nll: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.layer, str) and self.layer != "auto":
            raise HParamsError(f"hparam 'layer' must be an integer or 'auto', got {self.layer!r}")
        if self.eps <= 0:
            raise HParamsError(f"hparam 'eps' must be > 0, got {self.eps}")
        if self.steps < 1:
            raise HParamsError(f"hparam 'steps' must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise HParamsError(f"hparam 'lr' must be > 0, got {self.lr}")


@dataclass
class _Entry:
    key: torch.Tensor
    value: torch.Tensor
    radius: float
    label: str
    owner: int


class Codebook(Adaptor):
    """The GRACE adaptor of one block: entries, and the token-wise replacement."""

    def __init__(self, handle: ModelHandle, layer: int) -> None:
        super().__init__(handle, handle.module("layers", layer))
        self.layer = layer
        self.entries: list[_Entry] = []
        self._packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: while training a value: (rows, cols, value) written over the block output.
        self.override: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def changed(self) -> None:
        self._packed = None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._packed is None:
            self._packed = (torch.stack([e.key for e in self.entries]),
                            torch.stack([e.value for e in self.entries]),
                            torch.tensor([e.radius for e in self.entries], device=self.entries[0].key.device))
        return self._packed

    def empty(self) -> bool:
        return not self.entries

    def nearest(self, key: torch.Tensor) -> tuple[int, float]:
        keys, _, _ = self.packed()
        d = (keys - key[None]).norm(dim=1)
        j = int(d.argmin())
        return j, float(d[j])

    def rewrite(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.override is not None:
            rows, cols, v = self.override
            out = y.clone()
            out[rows, cols] = v.to(y.dtype)
            return out
        if not self.entries:
            return y
        keys, values, radii = self.packed()
        h = x.reshape(-1, x.shape[-1]).float()
        d = torch.cdist(h, keys.float())
        dmin, j = d.min(dim=1)
        hit = dmin <= radii[j]
        if not bool(hit.any()):
            return y
        out = y.clone()
        flat = out.view(-1, out.shape[-1])
        flat[hit] = values[j[hit]].to(y.dtype)
        return out


class GraceEdit(Edit):
    """Entries added to (and radii changed in) a :class:`Codebook`; revert undoes exactly that."""

    kind = "codebook"
    _next_id = 0

    def __init__(self, handle: ModelHandle, method: str, requests: Sequence[EditRequest],
                 hparams: dict[str, Any], layer: int) -> None:
        super().__init__(handle, method, requests, hparams)
        GraceEdit._next_id += 1
        self.id = GraceEdit._next_id
        self.layer = layer
        self.added: list[_Entry] = []
        self.changed: list[tuple[_Entry, float]] = []  # (entry, radius before this edit)

    def codebook(self) -> Codebook:
        return attach(self.handle, Codebook, self.layer, lambda: Codebook(self.handle, self.layer))

    def add(self, entry: _Entry) -> None:
        cb = self.codebook()
        cb.entries.append(entry)
        self.added.append(entry)
        cb.changed()

    def set_radius(self, entry: _Entry, radius: float) -> None:
        self.changed.append((entry, entry.radius))
        entry.radius = radius
        self.codebook().changed()

    def revert(self) -> None:
        if not self.active:
            return
        cb = installed(self.handle, Codebook, self.layer)
        if cb is not None:
            for entry, old in reversed(self.changed):
                entry.radius = old
            ids = {id(e) for e in self.added}
            cb.entries = [e for e in cb.entries if id(e) not in ids]
            cb.changed()
            release(self.handle, Codebook, self.layer)
        self.active = False

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.changed:
            raise PatchError("this GRACE edit changed the radii of earlier edits' entries, so it cannot be "
                             "saved on its own; save the edits together (medit edit --mode batch)")
        tensors: dict[str, torch.Tensor] = {}
        if self.added:
            tensors = {"keys": torch.stack([e.key for e in self.added]),
                       "values": torch.stack([e.value for e in self.added]),
                       "radii": torch.tensor([e.radius for e in self.added])}
        extra = {"layer": self.layer, "labels": [e.label for e in self.added],
                 "note": "GRACE codebook: keys, values and radii at one block's output; the weights are unchanged"}
        return extra, tensors

    @classmethod
    def from_payload(cls, handle: ModelHandle, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "GraceEdit":
        layer = int(manifest.get("layer", -1))
        if not 0 <= layer < handle.n_layers:
            raise PatchError(f"GRACE patch layer {layer} does not exist in {handle.model_id}; apply the patch "
                             f"to the model it was made for ({manifest['model']['id']})")
        edit = cls(handle, manifest["method"], patch_requests(manifest), manifest.get("hparams", {}), layer)
        for i, label in enumerate(manifest.get("labels", [])):
            edit.add(_Entry(tensors["keys"][i].to(handle.device), tensors["values"][i].to(handle.device),
                            float(tensors["radii"][i]), label, edit.id))
        return edit


class GRACE(Method[GRACEHParams]):
    name = "grace"
    description = DESCRIPTION
    hparams_class = GRACEHParams
    cached_scoring = False  # edits hook modules
    modes = ("single", "batch", "sequential")
    hparams_dir = Path(medit.__file__).parent / "hparams" / "grace"

    def layer(self, handle: ModelHandle, hp: GRACEHParams) -> int:
        return resolve_layers(handle, [hp.layer] if isinstance(hp.layer, int) else hp.layer,
                              auto=(AUTO_DEPTH,), what="layer")[0]

    def apply(self, handle: ModelHandle, requests: Sequence[EditRequest], hparams: GRACEHParams) -> Edit:
        layer = self.layer(handle, hparams)
        edit = GraceEdit(handle, self.name, requests, hparams.to_dict(), layer)
        try:
            infos = [self._one(handle, edit, r, hparams) for r in requests]
        except BaseException:
            edit.revert()
            raise
        edit.info.update(layer=layer, entries=infos)
        return edit

    def _one(self, handle: ModelHandle, edit: GraceEdit, req: EditRequest, hp: GRACEHParams) -> dict[str, Any]:
        scorer = Scorer(handle)
        pair = scorer.encode_pair(req.prompt, req.target_new)
        lm = LayerwiseLM(handle, [pair], edit.layer)
        pos = lm.first_pos[0]
        key, out = _key_and_output(handle, lm, edit.layer, pos)
        cb = edit.codebook()
        radius = hp.eps * float(key.norm())
        info: dict[str, Any] = {"case_id": req.case_id, "action": "add"}
        if cb.entries:
            j, d = cb.nearest(key)
            near = cb.entries[j]
            if d <= near.radius + radius:
                if near.label == req.target_new:
                    edit.set_radius(near, max(near.radius, d))
                    info["action"] = "expand"
                    return info
                edit.set_radius(near, d / 2)
                radius = d / 2
                info["action"] = "split"
        value, steps, nll = _train_value(lm, cb, out, pos, hp)
        edit.add(_Entry(key, value, radius, req.target_new, edit.id))
        info.update(steps=steps, nll=nll)
        return info


def _key_and_output(handle: ModelHandle, lm: LayerwiseLM, layer: int, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``layer``'s input (the key) and output at ``pos`` of the single row of ``lm``,
    computed with no codebook replacement (a bare forward of the prompt's context)."""
    ctx = lm.pairs[0][0]
    ids = torch.tensor([ctx], device=handle.device)
    with torch.no_grad(), capture(handle, "layers", [layer], what="input") as kin, \
            capture(handle, "layers", [layer], what="output") as kout:
        cb = installed(handle, Codebook, layer)
        saved = None
        if cb is not None:  # the key must not see earlier entries' replacements at this block
            saved, cb.entries = cb.entries, []
        try:
            if handle.is_encoder_decoder:
                start = handle.config.decoder_start_token_id or 0
                handle.model(input_ids=ids, decoder_input_ids=torch.tensor([[start]], device=handle.device))
            else:
                with capture(handle, "layers", [layer], what="output", stop=True):
                    run_until(handle, lambda: handle.model(input_ids=ids, use_cache=False))
        finally:
            if cb is not None and saved is not None:
                cb.entries = saved
    return kin[layer][0, pos].float().clone(), kout[layer][0, pos].float().clone()


def _train_value(lm: LayerwiseLM, cb: Codebook, init: torch.Tensor, pos: int, hp: GRACEHParams
                 ) -> tuple[torch.Tensor, int, float]:
    """Adam on the value written at ``pos`` until the target is produced."""
    value = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([value], lr=hp.lr)
    rows = torch.tensor([0], device=init.device)
    cols = torch.tensor([pos], device=init.device)
    nll = float("nan")
    step = 0
    try:
        with lm.session():
            for step in range(hp.steps + 1):
                cb.override = (rows, cols, value[None])
                logits = lm.logits()
                loss = lm.row_nll(logits).mean()
                nll = float(loss.detach())
                if step == hp.steps or (bool(lm.row_correct(logits).all()) and nll < hp.early_stop_nll):
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        cb.override = None
    return value.detach().clone(), step, nll
