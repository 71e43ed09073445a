"""Edits: what applying a method produced. They revert exactly and save as patches.

A patch is symmetric: :meth:`Edit.payload` gives the manifest fields and tensors of an edit, and
the classmethod :meth:`Edit.from_payload` of the same class rebuilds the edit from them on a
model. Each Edit class that can be saved sets its own ``kind``, which registers it, and
:func:`apply_patch` finds the class by the manifest's ``kind``. The base model's fingerprint is
written by :meth:`Edit.save` and checked by :func:`apply_patch`, before ``from_payload`` runs, for
every kind: the whole model as loaded, or for an edit that changed weights only the original
values of those weights (see :meth:`Edit.base_params`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from medit.errors import EditError, PatchError, UnknownNameError
from medit.core.patchfile import MANIFEST, PATCH_FORMAT, PATCH_VERSION, TENSORS, read_patch, write_patch

if TYPE_CHECKING:
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest

__all__ = ["Edit", "WeightEdit", "CompositeEdit", "share_originals", "load_patch", "apply_patch",
           "patch_class", "patch_kinds", "patch_requests", "MANIFEST", "PATCH_FORMAT", "PATCH_VERSION",
           "TENSORS"]

#: patch kind -> the Edit class that reads it (filled as Edit classes are defined).
_KINDS: dict[str, type["Edit"]] = {}
#: manifest fields :meth:`Edit.save` writes itself; a payload cannot set them.
CORE_FIELDS = ("format", "version", "files", "medit_version", "kind", "method", "model", "base_fingerprint",
               "hparams", "requests", "created")


class Edit:
    """Base class. An active edit changes what the model answers; :meth:`revert` undoes it exactly.

    Methods that keep the weights (IKE, GRACE, ...) subclass this and may override
    :meth:`transform_prompts` (e.g. to prepend demonstrations); the evaluation engine calls it on
    every prompt it scores while the edit is active, so it sees one scoring interface for all edits.

    To be saved, a subclass sets ``kind`` (a name no other Edit class uses) and implements
    :meth:`payload` and its inverse :meth:`from_payload`; see the module docstring.
    """

    #: the patch kind; a class that sets it in its own body is registered as its reader.
    kind: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not isinstance(kind, str) or not kind:
            return
        old = _KINDS.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"patch kind {kind!r} of {cls.__module__}.{cls.__qualname__} is already the kind of "
                            f"{old.__module__}.{old.__qualname__}; give the class another kind")
        _KINDS[kind] = cls

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
        """(manifest fields, tensors) describing this edit beyond what :meth:`save` writes itself
        (kind, method, model, base fingerprint, hparams, requests); subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    @classmethod
    def from_payload(cls, handle: "ModelHandle", manifest: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> "Edit":
        """The inverse of :meth:`payload`: the edit rebuilt (and active) on ``handle``'s model from
        a patch's manifest and tensors. :func:`apply_patch` has checked the base fingerprint."""
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a patch")

    @classmethod
    def base_params(cls, handle: "ModelHandle", manifest: dict[str, Any]) -> list[str] | None:
        """The parameters whose original values a patch's ``base_fingerprint`` covers: None (the
        default) for every parameter, i.e. the whole model as loaded (``handle.fingerprint()``,
        pinned before its first change, so a patch also applies on top of other edits). An edit
        that changed weights names them (see :class:`WeightEdit`). Raises PatchError when the
        patch does not fit ``handle``'s model."""
        return None

    def base_model_fingerprint(self) -> str:
        """The fingerprint :meth:`save` records, scoped as :meth:`base_params` says."""
        return self.handle.fingerprint()

    def _saved_as(self) -> "Edit":
        """The edit whose payload a patch of this edit holds (a sequence saves as one edit)."""
        return self

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write a patch folder (``manifest.json`` and ``tensors.safetensors``), atomically. An
        existing ``path`` is replaced only if it is empty, or a medit patch and ``force`` is set."""
        from medit import __version__

        edit = self._saved_as()
        reader = _KINDS.get(edit.kind)
        if reader is None or not _reads_patches(reader):
            raise NotImplementedError(f"{type(edit).__name__} cannot be saved: a saveable Edit class sets its own "
                                      "kind and implements payload() and from_payload()")
        extra, tensors = edit.payload()
        taken = sorted(set(extra) & set(CORE_FIELDS))
        if taken:
            raise EditError(f"{type(edit).__name__}.payload() sets manifest field(s) {', '.join(taken)} that "
                            "Edit.save writes itself; rename them")
        manifest = {
            "medit_version": __version__, "kind": edit.kind, "method": edit.method,
            "model": {"id": self.handle.model_id, "model_type": self.handle.config.model_type,
                      "family": self.handle.adapter.name},
            "base_fingerprint": edit.base_model_fingerprint(),
            "hparams": edit.hparams, "requests": [r.to_dict() for r in edit.requests],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        return write_patch(path, manifest, tensors, force=force)


def _reads_patches(cls: type[Edit]) -> bool:
    """Whether ``cls`` (or a base class below Edit) implements :meth:`Edit.from_payload`."""
    return any("from_payload" in vars(k) for k in cls.__mro__ if k is not Edit)


class WeightEdit(Edit):
    """An edit that changed parameters. Keeps bit-exact originals for :meth:`revert`.

    ``factors`` optionally hold a low-rank form of each delta in storage orientation,
    ``delta = u @ v.T``; patches then store the factors instead of the dense matrix.

    In a sequence of edits (see :func:`share_originals`) a later edit of a parameter that an
    earlier one already changed does not keep its own copy of the original (``shared`` names
    those parameters); such an edit reverts and saves only as part of its whole sequence.

    Its patch's base fingerprint covers only the edited parameters' original values
    (``base_fingerprint``), so the patch applies to any model whose those parameters are as they were.
    """

    kind = "weights"

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

    def share(self, names: Iterable[str]) -> None:
        """An earlier edit of the same sequence holds the originals of ``names``: drop this edit's
        copies and whatever else it kept to revert those parameters alone (subclasses that keep
        run state extend this), so the sequence's memory does not grow with its length."""
        for name in names:
            self.originals.pop(name, None)
            self.shared.add(name)

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
        return {"params": params}, tensors

    def base_model_fingerprint(self) -> str:
        return self.base_fingerprint

    @classmethod
    def base_params(cls, handle: "ModelHandle", manifest: dict[str, Any]) -> list[str]:
        specs = manifest.get("params") or {}
        model_params = dict(handle.model.named_parameters())
        for name, spec in specs.items():
            if name not in model_params or list(model_params[name].shape) != list(spec["shape"]):
                raise PatchError(f"patch parameter {name!r} does not exist with shape {spec['shape']} in "
                                 f"{handle.model_id}; apply the patch to the model it was made for "
                                 f"({manifest['model']['id']})")
        return list(specs)

    @classmethod
    def from_payload(cls, handle: "ModelHandle", manifest: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> "WeightEdit":
        specs = manifest.get("params") or {}
        dense = {n: tensors[n] for n, s in specs.items() if s["storage"] == "dense"}
        factors = {n: (tensors[f"{n}::u"], tensors[f"{n}::v"]) for n, s in specs.items() if s["storage"] == "lowrank"}
        return cls.from_deltas(handle, manifest["method"], patch_requests(manifest), manifest.get("hparams", {}),
                               dense, factors)

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

    def _saved_as(self) -> Edit:
        if len(self.edits) == 1:
            return self.edits[0]._saved_as()
        weights = [e for e in self.edits if isinstance(e, WeightEdit)]
        if len(weights) != len(self.edits):
            raise PatchError(f"cannot combine {len(self.edits)} {self.method} edits into one patch; "
                             "save them one at a time")
        return _merge_weight_edits(self.handle, weights)

    def payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._saved_as().payload()


def share_originals(edits: Sequence[Edit]) -> None:
    """``edits`` were applied in this order: keep each parameter's original weights only in the
    first weight edit that changed it. Reverting the sequence (last edit first) restores them
    exactly, and memory no longer grows by a full copy of every edited matrix per edit (100
    sequential MEMIT edits of LLaMA-2-7B's five layers would hold ~90 GB of copies), nor by the
    low-rank factors of every edit once they outgrow the matrix. Idempotent."""
    held: dict[str, int] = {}  # parameter -> its number of elements
    factor_sizes: dict[str, int] = {}
    weights = [e for e in edits if isinstance(e, WeightEdit)]
    for e in weights:
        e.share([n for n in e.originals if n in held])
        held.update({n: t.numel() for n, t in e.originals.items()})
        for name, (u, v) in e.factors.items():
            factor_sizes[name] = factor_sizes.get(name, 0) + u.numel() + v.numel()
    # Low-rank factors of one parameter pile up over a long sequence; once they are as large as
    # the matrix, the sequence's patch stores a dense delta (from the originals) instead.
    for name, size in factor_sizes.items():
        if len(weights) > 1 and size >= held.get(name, size + 1):
            for e in weights:
                e.factors.pop(name, None)


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
    """Apply a patch already read with :func:`~medit.core.patchfile.read_patch`: the Edit class
    registered for its ``kind`` (:func:`patch_class`) is found, the base fingerprint checked, then
    the class's :meth:`~Edit.from_payload` rebuilds the edit."""
    try:
        legacy = _legacy_loader(manifest)
        if legacy is not None:
            edit: Edit = legacy(handle, manifest, tensors)
            return edit
        cls = patch_class(manifest)
        _check_base(handle, cls, manifest)
        return cls.from_payload(handle, manifest, tensors)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # the manifest is input from a file: a field of the wrong shape is the file's fault
        raise PatchError(f"patch {where!r} is malformed ({type(exc).__name__}: {exc}); re-create the patch "
                         "with `medit edit --save-patch`") from None


def patch_requests(manifest: dict[str, Any]) -> list["EditRequest"]:
    """The edit requests a patch manifest lists (for :meth:`Edit.from_payload`)."""
    from medit.core.requests import EditRequest
    return [EditRequest.from_dict(r, where="patch manifest") for r in manifest.get("requests", [])]


def patch_class(manifest: dict[str, Any]) -> type[Edit]:
    """The Edit class that reads patches of the manifest's ``kind``; a one-line PatchError naming
    the known kinds when there is none. An Edit class registers when its module is imported: the
    manifest's method is imported first, then every registered method, until one defines the kind."""
    kind, method = manifest["kind"], manifest.get("method")
    if kind not in _KINDS:
        _import_methods(kind, method)
    cls = _KINDS.get(kind)
    if cls is None or not _reads_patches(cls):
        known = ", ".join(patch_kinds())
        raise PatchError(f"patch kind {kind!r} (method {method!r}) is not one this medit reads (known kinds: "
                         f"{known}); install the plugin that made it or upgrade medit")
    return cls


def patch_kinds() -> list[str]:
    """Every patch kind some Edit class reads, once every registered method is imported."""
    _import_methods(None, None)
    return sorted(k for k, cls in _KINDS.items() if _reads_patches(cls))


def _import_methods(kind: str | None, first: str | None) -> None:
    from medit.errors import MeditError
    from medit.plugin.manager import get_plugins

    methods = get_plugins().methods
    for name in ([first] if first is not None and first in methods else []) + methods.names():
        if kind is not None and kind in _KINDS:
            return
        try:
            methods.get(name)
        except (MeditError, ImportError):  # a plugin that does not import holds no kind we can read
            continue


def _legacy_loader(manifest: dict[str, Any]) -> Any:
    """Before patch version 3, a patch was read by its method's ``load_patch(handle, manifest,
    tensors)``, and an Edit class that set no kind saved as ``weights``. A plugin method that
    still defines ``load_patch`` keeps reading its old patches that way (keyed on the method name,
    since the kind may not tell); built-in methods define none."""
    from medit.plugin.manager import get_plugins

    version = manifest.get("version", PATCH_VERSION)
    if not isinstance(version, int) or version >= 3:
        return None
    try:
        method = get_plugins().methods.get(manifest["method"])
    except UnknownNameError:
        return None
    return getattr(method, "load_patch", None)


def _check_base(handle: "ModelHandle", cls: type[Edit], manifest: dict[str, Any]) -> None:
    """Refuse a patch made for another base model (see :meth:`Edit.base_params`)."""
    names = cls.base_params(handle, manifest)
    want = manifest.get("base_fingerprint")
    if want is None and manifest.get("version", PATCH_VERSION) < 3:
        return  # version 1-2 in-context and SERAC patches recorded none
    have = handle.fingerprint(names)
    if have != want:
        raise PatchError(f"patch was made for model {manifest['model']['id']!r} (fingerprint {want}) but "
                         f"{handle.model_id!r} has fingerprint {have}; apply it to the unedited model it was "
                         "made for")
