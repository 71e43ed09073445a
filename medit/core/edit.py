"""Edits: what applying a method produced. They revert exactly and save as patches."""
from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from medit.errors import EditError, PatchError
from medit.core.patchfile import MANIFEST, PATCH_FORMAT, PATCH_VERSION, TENSORS, read_patch, write_patch

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest

__all__ = ["Edit", "WeightEdit", "CompositeEdit", "share_originals", "load_patch", "apply_patch",
           "MANIFEST", "PATCH_FORMAT", "PATCH_VERSION", "TENSORS"]


class Edit:
    """Base class. An active edit changes what the model answers; :meth:`revert` undoes it exactly.

    Methods that keep the weights (IKE, GRACE, ...) subclass this and may override
    :meth:`transform_prompts` (e.g. to prepend demonstrations); the evaluation engine calls it on
    every prompt it scores while the edit is active, so it sees one scoring interface for all edits.
    """

    kind = "weights"

    def __init__(self, handle: "ModelHandle", method: str, requests: Sequence["EditRequest"],
                 hparams: dict[str, Any]) -> None:
        self.handle = handle
        self.method = method
        self.requests = list(requests)
        self.hparams = dict(hparams)
        self.active = True
        self.info: dict[str, Any] = {}

    def transform_prompts(self, prompts: list[str]) -> list[str]:
        return prompts

    def revert(self) -> None:
        """Restore the model exactly as it was before this edit. Idempotent."""
        self.active = False

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(extra manifest fields, tensors) describing this edit; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write a patch folder (``manifest.json`` and ``tensors.safetensors``), atomically. An
        existing ``path`` is replaced only if it is empty, or a medit patch and ``force`` is set."""
        from medit import __version__

        extra, tensors = self.payload()
        manifest = {
            "medit_version": __version__, "kind": self.kind, "method": self.method,
            "model": {"id": self.handle.model_id, "model_type": self.handle.config.model_type,
                      "family": self.handle.adapter.name},
            "hparams": self.hparams, "requests": [r.to_dict() for r in self.requests],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        return write_patch(path, manifest, tensors, force=force)


class WeightEdit(Edit):
    """An edit that changed parameters. Keeps bit-exact originals for :meth:`revert`.

    ``factors`` optionally hold a low-rank form of each delta in storage orientation,
    ``delta = u @ v.T``; patches then store the factors instead of the dense matrix.

    In a sequence of edits (see :func:`share_originals`) a later edit of a parameter that an
    earlier one already changed does not keep its own copy of the original (``shared`` names
    those parameters); such an edit reverts and saves only as part of its whole sequence.
    """

    def __init__(self, handle: "ModelHandle", method: str, requests: Sequence["EditRequest"],
                 hparams: dict[str, Any], originals: dict[str, torch.Tensor],
                 base_fingerprint: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__(handle, method, requests, hparams)
        self.originals = originals
        self.base_fingerprint = base_fingerprint
        self.factors = factors or {}
        #: parameters whose original an earlier edit of the same sequence holds.
        self.shared: set[str] = set()
        self._in_sequence_revert = False

    def _whole_only(self, what: str) -> None:
        if self.shared and not self._in_sequence_revert:
            raise EditError(f"this {self.method} edit shares original weights with earlier edits of its sequence, "
                            f"so it cannot {what} alone; {what} the whole sequence (the CompositeEdit)")

    def _params(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.handle.model.named_parameters())
        return {n: params[n] for n in self.originals}

    def revert(self) -> None:
        if not self.active:
            return
        self._whole_only("revert")
        with torch.no_grad():  # shared parameters: an earlier edit of the sequence restores them
            for name, p in self._params().items():
                p.copy_(self.originals[name])
        self.active = False

    def deltas(self) -> dict[str, torch.Tensor]:
        """Dense deltas (current - original) of every changed parameter."""
        with torch.no_grad():
            return {n: (p.detach() - self.originals[n].to(p.device)) for n, p in self._params().items()}

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self._whole_only("save")
        tensors: dict[str, torch.Tensor] = {}
        params: dict[str, Any] = {}
        dense = self.deltas() if set(self.factors) != set(self.originals) else {}
        for name, orig in self.originals.items():
            if name in self.factors:
                u, v = self.factors[name]
                tensors[f"{name}::u"], tensors[f"{name}::v"] = u, v
                params[name] = {"shape": list(orig.shape), "storage": "lowrank", "rank": int(u.shape[1])}
            else:
                tensors[name] = dense[name]
                params[name] = {"shape": list(orig.shape), "storage": "dense"}
        return {"base_fingerprint": self.base_fingerprint, "params": params}, tensors

    @classmethod
    @contextlib.contextmanager
    def recording(cls, handle: "ModelHandle", param_names: Sequence[str], method: str,
                  requests: Sequence["EditRequest"], hparams: dict[str, Any]) -> Iterator["WeightEdit"]:
        """Snapshot ``param_names``; the block may change them in place. If the block raises, the
        parameters are restored before the exception propagates."""
        handle.fingerprint()  # pin the base-model fingerprint before the first change
        params = dict(handle.model.named_parameters())
        originals = {n: params[n].detach().clone() for n in param_names}
        edit = cls(handle, method, requests, hparams, originals, handle.fingerprint(param_names))
        try:
            yield edit
        except BaseException:
            edit.revert()
            raise

    @classmethod
    def from_deltas(cls, handle: "ModelHandle", method: str, requests: Sequence["EditRequest"],
                    hparams: dict[str, Any], dense: dict[str, torch.Tensor] | None = None,
                    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> "WeightEdit":
        """Add dense deltas and/or low-rank factors (``u @ v.T``) to the named parameters."""
        names = list(dense or {}) + list(factors or {})
        with cls.recording(handle, names, method, requests, hparams) as edit:
            params = dict(handle.model.named_parameters())
            with torch.no_grad():
                for n, d in (dense or {}).items():
                    params[n].add_(d.to(params[n].device, params[n].dtype))
                for n, (u, v) in (factors or {}).items():
                    p = params[n]
                    p.add_((u.to(p.device, torch.float32) @ v.to(p.device, torch.float32).T).to(p.dtype))
            edit.factors = {n: (u.detach().cpu(), v.detach().cpu()) for n, (u, v) in (factors or {}).items()}
        return edit

    @classmethod
    def from_patch(cls, handle: "ModelHandle", manifest: dict[str, Any],
                   tensors: dict[str, torch.Tensor]) -> "WeightEdit":
        specs = manifest.get("params") or {}
        model_params = dict(handle.model.named_parameters())
        for name, spec in specs.items():
            if name not in model_params or list(model_params[name].shape) != list(spec["shape"]):
                raise PatchError(f"patch parameter {name!r} does not exist with shape {spec['shape']} in "
                                 f"{handle.model_id}; apply the patch to the model it was made for "
                                 f"({manifest['model']['id']})")
        fp = handle.fingerprint(list(specs))
        if fp != manifest.get("base_fingerprint"):
            raise PatchError(f"patch was made for model {manifest['model']['id']!r} (fingerprint "
                             f"{manifest.get('base_fingerprint')}) but {handle.model_id!r} has fingerprint {fp}; "
                             "apply it to the unedited model it was made for")
        dense = {n: tensors[n] for n, s in specs.items() if s["storage"] == "dense"}
        factors = {n: (tensors[f"{n}::u"], tensors[f"{n}::v"]) for n, s in specs.items() if s["storage"] == "lowrank"}
        from medit.core.requests import EditRequest
        reqs = [EditRequest.from_dict(r, where="patch manifest") for r in manifest.get("requests", [])]
        return cls.from_deltas(handle, manifest["method"], reqs, manifest.get("hparams", {}), dense, factors)


class CompositeEdit(Edit):
    """Several edits applied one after another (sequential mode, or ``medit edit`` of many facts)."""

    def __init__(self, handle: "ModelHandle", edits: Sequence[Edit]) -> None:
        share_originals(edits)
        method = edits[0].method if edits else "none"
        reqs = [r for e in edits for r in e.requests]
        super().__init__(handle, method, reqs, edits[0].hparams if edits else {})
        self.edits = list(edits)
        self.kind = edits[0].kind if edits else "weights"

    def transform_prompts(self, prompts: list[str]) -> list[str]:
        for e in self.edits:
            prompts = e.transform_prompts(prompts)
        return prompts

    def revert(self) -> None:
        for e in reversed(self.edits):
            if isinstance(e, WeightEdit):
                e._in_sequence_revert = True
            e.revert()
        self.active = False

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if len(self.edits) == 1:
            return self.edits[0].payload()
        if not all(isinstance(e, WeightEdit) for e in self.edits):
            raise PatchError(f"cannot combine {len(self.edits)} {self.method} edits into one patch; "
                             "save them one at a time")
        merged = _merge_weight_edits(self.handle, self.edits)  # type: ignore[arg-type]
        return merged.payload()


def share_originals(edits: Sequence[Edit]) -> None:
    """``edits`` were applied in this order: keep each parameter's original weights only in the
    first weight edit that changed it. Reverting the sequence (last edit first) restores them
    exactly, and memory no longer grows by a full copy of every edited matrix per edit (100
    sequential MEMIT edits of LLaMA-2-7B's five layers would hold ~90 GB of copies). Idempotent."""
    held: set[str] = set()
    for e in edits:
        if not isinstance(e, WeightEdit):
            continue
        for name in [n for n in e.originals if n in held]:
            del e.originals[name]
            e.shared.add(name)
        held.update(e.originals)


def _merge_weight_edits(handle: "ModelHandle", edits: Sequence[WeightEdit]) -> WeightEdit:
    """One WeightEdit equivalent to the stack: originals from the first edit touching each
    parameter; factors concatenated when every edit of a parameter is low-rank."""
    originals: dict[str, torch.Tensor] = {}
    factor_lists: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dense_needed: set[str] = set()
    for e in edits:
        for n in [*e.originals, *sorted(e.shared)]:
            if n in e.originals:
                originals.setdefault(n, e.originals[n])
            if n in e.factors:
                factor_lists.setdefault(n, []).append(e.factors[n])
            else:
                dense_needed.add(n)
    factors = {n: (torch.cat([u for u, _ in fl], 1), torch.cat([v for _, v in fl], 1))
               for n, fl in factor_lists.items() if n not in dense_needed}
    first = edits[0]
    # the union of the parameters, at their values before the first edit
    base = first.base_fingerprint if len(edits) == 1 else handle.fingerprint_of(originals)
    merged = WeightEdit(handle, first.method, [r for e in edits for r in e.requests], first.hparams,
                        originals, base, factors)
    return merged


def load_patch(handle: "ModelHandle", path: str | Path) -> Edit:
    """Apply a saved patch to ``handle`` and return the (revertable) Edit. The patch is verified
    (manifest fields, tensors checksum, finite values) before the model is touched."""
    manifest, tensors = read_patch(path)
    return apply_patch(handle, manifest, tensors, where=str(path))


def apply_patch(handle: "ModelHandle", manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                where: str = "patch") -> Edit:
    """Apply a patch already read with :func:`~medit.core.patchfile.read_patch`."""
    from medit.plugin.manager import get_plugins

    method = get_plugins().methods.get(manifest["method"])
    try:
        return method.load_patch(handle, manifest, tensors)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # the manifest is input from a file: a field of the wrong shape is the file's fault
        raise PatchError(f"patch {where!r} is malformed ({type(exc).__name__}: {exc}); re-create the patch "
                         "with `medit edit --save-patch`") from None
