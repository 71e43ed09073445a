"""The patch folder format: ``manifest.json`` + ``tensors.safetensors``, written safely, read verified.

Writing never destroys what medit did not write: a target that exists is replaced only when it is
an empty folder, or a medit patch and the caller says ``force``. The new patch is assembled in a
uniquely named temporary sibling and renamed into place; leftovers of an interrupted write (named
``.NAME.medit-*``) are removed before the next write, never carried into it.

Reading trusts nothing: the manifest is checked field by field, the tensors file against the
SHA-256 and size the manifest records, and every tensor for finiteness. Any failure is one
:class:`~medit.errors.PatchError` naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medit.errors import PatchError
from medit.core.io import apply_umask, atomic_write_text, sha256_file

PATCH_FORMAT = "medit-patch"
#: 2: the manifest records each data file's SHA-256 and size; 3: every patch records the base
#: model's fingerprint (``base_fingerprint``), which medit checks for every kind (versions 1 and 2
#: still load).
PATCH_VERSION = 3
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
PATCH_FILES = (MANIFEST, TENSORS)
_TMP_TAG = ".medit-"

if TYPE_CHECKING:
    import torch


def _is_temp_name(name: str) -> bool:
    """Temporary files medit's atomic writes leave inside a folder (``.manifest.json.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def is_medit_patch(path: Path) -> bool:
    """Whether ``path`` is a folder holding only a medit patch's files (and write leftovers)."""
    if not path.is_dir():
        return False
    names = [p.name for p in path.iterdir()]
    if MANIFEST not in names or any(n not in PATCH_FILES and not _is_temp_name(n) for n in names):
        return False
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == PATCH_FORMAT


def check_target(path: Path, force: bool) -> None:
    """Refuse a patch destination whose replacement would destroy something medit did not write."""
    if not path.exists():
        if path.is_symlink():
            raise PatchError(f"patch folder {str(path)!r} is a dangling link; remove it or choose another folder")
        return
    if not path.is_dir():
        raise PatchError(f"patch folder {str(path)!r} is an existing file, not a folder; choose a new folder "
                         "for --save-patch")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if not is_medit_patch(path):
        raise PatchError(f"patch folder {str(path)!r} already exists and is not a medit patch (it holds "
                         f"{entries[0]!r}); medit replaces only its own patches, so choose a new folder")
    if not force:
        raise PatchError(f"patch folder {str(path)!r} already holds a medit patch; pass --force to replace it "
                         "or choose another folder")


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary siblings an interrupted earlier write of ``path`` left behind."""
    prefix = f".{path.name}{_TMP_TAG}"
    for p in path.parent.glob(f"{glob_escape(prefix)}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    legacy = path.with_name(path.name + ".tmp")  # medit < 0.x wrote here and reused it
    if legacy.is_dir() and all(n.name in PATCH_FILES or _is_temp_name(n.name) for n in legacy.iterdir()):
        shutil.rmtree(legacy, ignore_errors=True)


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters made literal."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def write_patch(path: str | Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                force: bool = False) -> Path:
    """Write a patch folder at ``path`` (see the module docstring for what may be replaced)."""
    from safetensors.torch import save_file

    out = Path(path)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{_TMP_TAG}tmp-"))
    try:
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(data, str(tmp / TENSORS))
        with open(tmp / TENSORS, "rb") as f:
            os.fsync(f.fileno())
        apply_umask(tmp / TENSORS)
        files = {TENSORS: {"sha256": sha256_file(tmp / TENSORS), "bytes": (tmp / TENSORS).stat().st_size}}
        full = {"format": PATCH_FORMAT, "version": PATCH_VERSION, **manifest, "files": files}
        atomic_write_text(tmp / MANIFEST, json.dumps(full, indent=2, default=str))
        apply_umask(tmp, directory=True)
        check_target(out, force)  # again: something may have appeared while we wrote
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{_TMP_TAG}old-"))
            os.replace(out, old / "patch")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ reading

def _need(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = manifest.get(key)
    if not isinstance(value, kind):
        raise PatchError(f"patch manifest {where!r} has no valid {key!r} field; re-create the patch")
    return value


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked manifest of the patch folder ``path``."""
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir():
        raise PatchError(f"patch folder {str(p)!r} does not exist; pass the folder written by "
                         "`medit edit --save-patch`")
    if not mf.is_file():
        raise PatchError(f"{str(p)!r} is not a medit patch (no {MANIFEST} inside); pass the folder "
                         "written by `medit edit --save-patch`")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PatchError(f"patch manifest {str(mf)!r} is unreadable or truncated ({reason}); "
                         "re-create the patch") from None
    where = str(mf)
    if not isinstance(manifest, dict) or manifest.get("format") != PATCH_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise PatchError(f"{str(p)!r} is not a medit patch (format {fmt!r} in {MANIFEST}); pass the folder "
                         "written by `medit edit --save-patch`")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PatchError(f"patch manifest {where!r} has no valid 'version' field; re-create the patch")
    if version > PATCH_VERSION:
        raise PatchError(f"patch {str(p)!r} has format version {version}, newer than this medit reads "
                         f"({PATCH_VERSION}); upgrade medit")
    _need(manifest, "method", str, where)
    _need(manifest, "kind", str, where)
    model = _need(manifest, "model", dict, where)
    if not isinstance(model.get("id"), str):
        raise PatchError(f"patch manifest {where!r} has no valid model 'id'; re-create the patch")
    _need(manifest, "hparams", dict, where)
    if not isinstance(manifest.get("requests", []), list):
        raise PatchError(f"patch manifest {where!r} has no valid 'requests' list; re-create the patch")
    if version >= 3:
        _need(manifest, "base_fingerprint", str, where)
    if version >= 2:
        files = _need(manifest, "files", dict, where)
        spec = files.get(TENSORS)
        if (not isinstance(spec, dict) or not isinstance(spec.get("sha256"), str)
                or not isinstance(spec.get("bytes"), int)):
            raise PatchError(f"patch manifest {where!r} records no SHA-256 for {TENSORS}; re-create the patch")
    return manifest


def read_tensors(path: str | Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The verified tensors of the patch folder ``path`` (checked against ``manifest``)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tf = Path(path) / TENSORS
    if not tf.is_file():
        raise PatchError(f"patch tensors file {str(tf)!r} is missing; copy the whole patch folder or "
                         "re-create the patch")
    spec = (manifest.get("files") or {}).get(TENSORS)
    if spec is not None:
        size = tf.stat().st_size
        if size != spec["bytes"] or sha256_file(tf) != spec["sha256"]:
            raise PatchError(f"patch tensors file {str(tf)!r} is damaged ({size} bytes, SHA-256 differs from "
                             f"the manifest's); copy the patch again or re-create it")
    try:
        tensors = load_file(str(tf))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PatchError(f"patch tensors file {str(tf)!r} is unreadable or truncated ({reason}); "
                         "re-create the patch") from None
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise PatchError(f"patch tensors file {str(tf)!r} holds non-finite values (NaN or inf) in "
                             f"{name!r}; applying it would break the model, so re-create the patch")
    return tensors


def read_patch(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors) of a patch folder, both verified; no model is needed."""
    manifest = read_manifest(path)
    return manifest, read_tensors(path, manifest)
