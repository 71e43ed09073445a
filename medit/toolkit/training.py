"""Training learned editors (MEND, KE, SERAC): one loop, versioned checkpoints, exact resume.

A learned method subclasses :class:`LearnedMethod`: it builds an editor network for a model
(:meth:`~LearnedMethod.init_editor`), gives the training loss of a batch of edit requests
(:meth:`~LearnedMethod.train_loss`) and turns a trained editor plus requests into an
:class:`~medit.core.edit.Edit` (:meth:`~LearnedMethod.edit_with`). Everything else lives here:
data order, optimiser, periodic validation (edit success, generalization and locality on
held-out cases), early stopping, progress bar, and the checkpoint folder::

    DIR/manifest.json       format, medit version, method, base-model fingerprint, data
                            fingerprints, hparams, step, best validation, history
    DIR/editor.safetensors  the editor weights with the best validation score (used to edit)
    DIR/last.safetensors    the tensors of the last step's training state (for ``--resume``):
                            editor weights, optimiser state (e.g. Adam's ``exp_avg``,
                            ``exp_avg_sq``, ``step``) and the torch RNG state (uint8)
    DIR/last.json           the rest of that state: loop counters and history, the optimiser's
                            param_groups, where each tensor goes, and the SHA-256 of
                            ``last.safetensors``

Only safetensors and JSON, no serialised Python objects, so loading a checkpoint never runs
code from it. A folder written by medit before checkpoint version 2 holds ``last.pt`` (a
``torch.save`` file, which can run code when loaded) instead: it is never loaded and cannot be
resumed (its ``editor.safetensors`` still edits). Each file is written atomically
(temporary file, fsync, rename): the tensors, then ``last.json``, the manifest last.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Sequence, TypeVar, cast

import torch
from torch import nn

from medit.errors import CheckpointError, HParamsError, MeditError
from medit.model.guards import check_lengths
from medit.core.hparams import HParams
from medit.core.io import atomic_write_json
from medit.core.method import Method
from medit.toolkit.checkpoint import (CHECKPOINT_VERSION, LAST, LAST_JSON, STATE_FORMAT,  # noqa: F401 (re-exported)
                                      first_line, save_editor, load_training_state, save_training_state)
from medit.scoring.engine import Scorer
from medit.core.queries import TFQuery

if TYPE_CHECKING:
    from medit.core.edit import Edit
    from medit.model.handle import ModelHandle
    from medit.core.requests import EditRequest

CHECKPOINT_FORMAT = "medit-checkpoint"
MANIFEST = "manifest.json"
EDITOR = "editor.safetensors"
#: the ``torch.save`` resume state of checkpoint version 1: refused, never loaded.
LEGACY_LAST = "last.pt"
#: hparams that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("steps", "patience", "checkpoint", "val_every")


@dataclasses.dataclass
class LearnedHParams(HParams):
    """Training settings shared by every learned editor (method hparams extend this)."""

    #: checkpoint folder written by ``medit train`` (required to edit).
    checkpoint: str | None = None
    #: total optimisation steps (``--max-steps`` caps them for a smoke run).
    steps: int = 1000
    #: edit requests per training step.
    batch_size: int = 4
    #: Adam learning rate of the editor network.
    lr: float = 1e-4
    #: validate (and checkpoint) every this many steps, and after the last step.
    val_every: int = 100
    #: held-out cases taken from the end of the training data when no ``--val`` file is given.
    val_n: int = 20
    #: stop after this many validations without improvement (0: never stop early).
    patience: int = 5
    #: seed of the editor's initialisation and of the data order.
    seed: int = 0

    def check_training(self) -> None:
        for name in ("steps", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise HParamsError(f"hparam {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("val_n", "patience"):
            if getattr(self, name) < 0:
                raise HParamsError(f"hparam {name!r} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise HParamsError(f"hparam 'lr' must be > 0, got {self.lr}")


#: the hparams dataclass of a learned method.
LH = TypeVar("LH", bound=LearnedHParams)
#: the editor network of a learned method.
E = TypeVar("E", bound=nn.Module)


class LearnedMethod(Method[LH], Generic[LH, E]):
    """A method whose edits come from an editor trained once per base model (``medit train``),
    generic in its hparams and its editor network: ``class MEND(LearnedMethod[MENDHParams, MENDEditor])``."""

    trainable: ClassVar[bool] = True
    hparams_class: type[LH] = cast("type[LH]", LearnedHParams)

    def init_editor(self, handle: "ModelHandle", hparams: LH) -> E:
        """A freshly initialised editor for ``handle``'s model (deterministic under the torch seed)."""
        raise NotImplementedError

    def train_loss(self, handle: "ModelHandle", editor: E, batch: Sequence["EditRequest"],
                   hparams: LH) -> tuple[torch.Tensor, dict[str, float]]:
        """(differentiable loss, scalar statistics) of one training batch."""
        raise NotImplementedError

    def edit_with(self, handle: "ModelHandle", editor: E, requests: Sequence["EditRequest"],
                  hparams: LH) -> "Edit":
        """Apply ``requests`` with a trained ``editor``; the Edit reverts exactly."""
        raise NotImplementedError

    def param_groups(self, editor: E, hparams: LH) -> list[dict[str, Any]]:
        return [{"params": [p for p in editor.parameters() if p.requires_grad], "lr": hparams.lr}]

    def after_backward(self, editor: E, hparams: LH) -> None:
        """Hook between ``backward`` and the optimiser step (e.g. gradient ascent on a multiplier)."""

    def apply(self, handle: "ModelHandle", requests: Sequence["EditRequest"], hparams: LH) -> "Edit":
        if not hparams.checkpoint:
            raise CheckpointError(f"method {self.name!r} needs a trained editor; train one with `medit train "
                                  f"--method {self.name} --model {handle.model_id} --data PATH --out DIR` and "
                                  "pass --checkpoint DIR")
        editor = load_editor(handle, self, hparams.checkpoint)
        return self.edit_with(handle, editor, requests, hparams)


# ---------------------------------------------------------------------------------- checkpoints

def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint folder ``path``; CheckpointError when it is not one."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        raise CheckpointError(f"{str(p)!r} is not a medit checkpoint (no {MANIFEST} inside); pass the folder "
                              "written by `medit train --out`")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {str(p / MANIFEST)!r} is unreadable ({exc}); train again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{str(p)!r} is not a medit checkpoint (format {fmt!r})")
    version = manifest.get("version")
    if isinstance(version, int) and version > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {str(p)!r} has format version {version}, newer than this medit's "
                              f"{CHECKPOINT_VERSION}; upgrade medit")
    return manifest


def check_checkpoint(handle: "ModelHandle", method: Method[Any], manifest: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint of another method or base model, in one sentence."""
    if manifest.get("method") != method.name:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {manifest.get('method')!r} editor, not "
                              f"{method.name!r}; pass a checkpoint trained with --method {method.name}")
    want, have = manifest.get("model", {}).get("fingerprint"), handle.fingerprint()
    if want != have:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained for model "
                              f"{manifest.get('model', {}).get('id')!r} (fingerprint {want}) but "
                              f"{handle.model_id!r} has fingerprint {have}; train an editor for this model "
                              "with `medit train`")


@dataclasses.dataclass
class LoadedEditors:
    """Run state: the editors one model loaded, by (checkpoint folder, editor file's mtime)."""

    by_checkpoint: dict[tuple[str, int], nn.Module] = dataclasses.field(default_factory=dict)


def load_editor(handle: "ModelHandle", method: LearnedMethod[Any, E], path: str | Path) -> E:
    """The trained editor in checkpoint ``path`` for ``handle`` (kept in its :class:`LoadedEditors`)."""
    from safetensors.torch import load_file

    p = Path(path)
    manifest = read_manifest(p)
    check_checkpoint(handle, method, manifest, p)
    if not (p / EDITOR).is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} has no {EDITOR} yet (training stopped before its first "
                              "validation); continue it with `medit train --resume`")
    kept = handle.state(LoadedEditors).by_checkpoint
    key = (str(p.resolve()), (p / EDITOR).stat().st_mtime_ns)
    if key in kept:
        return cast(E, kept[key])  # one checkpoint holds one method's editor
    hp = method.hparams_class.from_dict(manifest["hparams"], f"checkpoint {p}")
    torch.manual_seed(0)
    editor = method.init_editor(handle, hp).to(handle.device)
    try:
        weights = load_file(str(p / EDITOR))
    except Exception as exc:  # SafetensorError, OSError: damaged or cut short
        raise CheckpointError(f"editor weights {str(p / EDITOR)!r} are unreadable ({first_line(exc)}); "
                              "train again") from None
    try:
        editor.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(p)!r} does not fit this version's {method.name} editor "
                              f"({str(exc).splitlines()[0]}); train again") from None
    editor.eval()
    kept[key] = editor
    return editor


# ---------------------------------------------------------------------------------- validation

def validate(handle: "ModelHandle", method: LearnedMethod[Any, Any], editor: nn.Module, hparams: Any,
             requests: Sequence["EditRequest"], pre: dict | None = None) -> dict[str, float]:
    """Edit each request alone with ``editor`` and score it (teacher-forced ``token_acc``):
    ``edit_success`` on the prompt, ``generalization`` on rephrases, ``locality`` as token
    agreement of pre- and post-edit predictions on the locality prompts. ``score`` is their mean."""
    scorer = Scorer(handle)
    was_training = editor.training
    editor.eval()
    loc_q = [TFQuery(loc.prompt, loc.answer) for r in requests for loc in r.locality if loc.answer]
    if pre is None:
        pre = scorer.run(loc_q)
    es: list[float] = []
    gen: list[float] = []
    loc: list[float] = []
    try:
        for r in requests:
            edit = method.edit_with(handle, editor, [r], hparams)
            try:
                mine = [TFQuery(x.prompt, x.answer) for x in r.locality if x.answer]
                queries = [TFQuery(r.prompt, r.target_new)] + [TFQuery(p, r.target_new) for p in r.rephrase] + mine
                post = scorer.run(queries, edit.transform_prompts)
            finally:
                edit.revert()
            es.append(post[queries[0]].token_acc)
            gen += [post[TFQuery(p, r.target_new)].token_acc for p in r.rephrase]
            for q in mine:
                a, b = pre[q].argmax, post[q].argmax
                loc.append(sum(x == y for x, y in zip(a, b)) / len(a))
    finally:
        editor.train(was_training)
    out = {"edit_success": _mean(es), "generalization": _mean(gen), "locality": _mean(loc)}
    vals = [v for v in out.values() if not math.isnan(v)]
    out["score"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------- the loop

def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of training step ``step``: a seeded permutation per epoch (stateless, so a resumed
    run sees exactly the batches an uninterrupted one would)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _data_record(info: Any, n: int) -> dict[str, Any]:
    if info is None:
        return {"n": n}
    return {"path": str(info.path), "format": info.format, "fingerprint": info.fingerprint,
            "n_total": info.n_total, "n": n}


def train(handle: "ModelHandle", method: LearnedMethod[Any, Any], hparams: Any, data: Sequence["EditRequest"],
          out_dir: str | Path, *, val: Sequence["EditRequest"] | None = None, data_info: Any = None,
          val_info: Any = None, max_steps: int | None = None, max_minutes: float | None = None,
          resume: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``method``'s editor on ``data`` and write a checkpoint folder; returns its manifest.

    Without ``val`` the last ``hparams.val_n`` cases of ``data`` are held out for validation.
    ``max_steps`` caps the total number of steps (smoke runs); ``max_minutes`` caps this call's
    wall time: the step that crosses it is validated and checkpointed, and training stops with
    ``stopped = "max_minutes"`` (``--resume`` goes on from there). ``resume`` continues from
    ``out_dir/last.safetensors`` + ``last.json`` exactly (same batches, optimiser and RNG state).
    """
    from medit import __version__

    if not getattr(method, "trainable", False):
        raise MeditError(f"method {method.name!r} is not trained; `medit train` works with the learned "
                         "editors (see `medit list methods`: mend, ke, serac)")
    if max_steps is not None and max_steps < 1:
        raise MeditError(f"--max-steps must be >= 1, got {max_steps}")
    if max_minutes is not None and not max_minutes > 0:
        raise MeditError(f"--max-minutes must be > 0, got {max_minutes}")
    deadline = time.monotonic() + 60.0 * max_minutes if max_minutes is not None else None
    data = list(data)
    if val is None:
        if hparams.val_n and len(data) <= hparams.val_n:
            raise MeditError(f"training data has {len(data)} cases, too few to hold out val_n={hparams.val_n} "
                             "for validation; pass --val PATH or --set val_n=...")
        val = data[len(data) - hparams.val_n:] if hparams.val_n else []
        data = data[:len(data) - hparams.val_n] if hparams.val_n else data
    val = list(val)
    if len(data) < 1:
        raise MeditError("training data holds no cases; pass a --data file with edit cases")
    check_lengths(handle, [*data, *val])
    out = Path(out_dir)
    target = min(hparams.steps, max_steps) if max_steps is not None else hparams.steps
    fingerprint = handle.fingerprint()
    data_rec = _data_record(data_info, len(data))
    val_rec = _data_record(val_info, len(val)) if val_info is not None else {"held_out_from_data": len(val)}
    hp_dict = hparams.to_dict()
    hp_dict["checkpoint"] = None

    torch.manual_seed(hparams.seed)
    editor = method.init_editor(handle, hparams).to(handle.device)
    editor.train()
    opt = torch.optim.Adam(method.param_groups(editor, hparams))
    state: dict[str, Any] = {"step": 0, "best_score": None, "best_step": None, "best": None,
                             "bad": 0, "history": [], "stopped": None, "created": _now(), "loss_sum": 0.0,
                             "loss_n": 0}

    if any((out / f).is_file() for f in (MANIFEST, LAST, LAST_JSON, LEGACY_LAST)):
        if not resume:
            raise MeditError(f"{str(out)!r} already holds a checkpoint; pass --resume to continue it or choose "
                             "another --out")
        if (out / LEGACY_LAST).is_file() and not (out / LAST_JSON).is_file():
            raise CheckpointError(f"checkpoint {str(out)!r} holds {LEGACY_LAST}, a torch.save training state "
                                  "(medit checkpoint version 1) that can no longer be resumed safely (loading it "
                                  "could run code); it is not loaded: train again into a new --out (its "
                                  f"{EDITOR} still edits)")
        old = read_manifest(out)
        check_checkpoint(handle, method, old, out)
        if old.get("data", {}).get("fingerprint") != data_rec.get("fingerprint"):
            raise CheckpointError(f"checkpoint {str(out)!r} was trained on other data "
                                  f"({old.get('data', {}).get('path')}); resume with the same --data")
        diff = sorted(k for k in hp_dict if k not in RESUMABLE_CHANGES
                      and old.get("hparams", {}).get(k) != hp_dict[k])
        if diff:
            raise CheckpointError(f"checkpoint {str(out)!r} was trained with other hparams ({', '.join(diff)}); "
                                  "resume with the hparams it was started with")
        saved = load_training_state(out)
        try:
            editor.load_state_dict(saved["editor"])
            opt.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            if not isinstance(saved["state"], dict) or set(state) - set(saved["state"]):
                raise ValueError("the loop state lacks fields")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"training state in {str(out)!r} does not fit this run's {method.name} editor "
                                  f"({first_line(exc)}); train again into a new --out") from None
        state.update(saved["state"])
        if state["stopped"] != "early_stop":  # a step or time cap, or a raised `steps`, lets training go on
            state["stopped"] = None
    elif resume:
        raise MeditError(f"--resume given but {str(out)!r} holds no checkpoint; drop --resume to start training")
    out.mkdir(parents=True, exist_ok=True)

    def manifest() -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "medit_version": __version__,
                "method": method.name,
                "model": {"id": handle.model_id, "fingerprint": fingerprint,
                          "model_type": handle.config.model_type, "family": handle.adapter.name,
                          "dtype": str(handle.dtype)},
                "data": data_rec, "val": val_rec, "hparams": hp_dict, "step": state["step"],
                "target_steps": target, "best": {"step": state["best_step"], "score": state["best_score"],
                                                 "metrics": state["best"]},
                "stopped": state["stopped"], "history": state["history"],
                "created": state["created"], "updated": _now()}

    def save() -> None:
        save_training_state(out, {"editor": dict(editor.state_dict()), "optimizer": opt.state_dict(),
                                  "rng": torch.get_rng_state(), "state": dict(state)})
        atomic_write_json(out / MANIFEST, manifest())

    scorer = Scorer(handle)
    pre_val = scorer.run([TFQuery(x.prompt, x.answer) for r in val for x in r.locality if x.answer]) if val else {}

    from medit.core.progress import progress_bar
    bar = progress_bar(target, f"train {method.name}", "step", progress, initial=min(state["step"], target))
    try:
        while state["step"] < target and state["stopped"] is None:
            idx = batch_indices(len(data), hparams.batch_size, state["step"], hparams.seed)
            batch = [data[i] for i in idx]
            loss, stats = method.train_loss(handle, editor, batch, hparams)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(editor, hparams)
            opt.step()
            state["step"] += 1
            state["loss_sum"] += float(loss.item())
            state["loss_n"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if state["step"] % hparams.val_every == 0 or state["step"] >= target or out_of_time:
                metrics = (validate(handle, method, editor, hparams, val, pre_val) if val
                           else {"score": -state["loss_sum"] / state["loss_n"]})
                entry = {"step": state["step"], "train_loss": state["loss_sum"] / state["loss_n"],
                         **{k: float(v) for k, v in stats.items()}, **metrics}
                state["history"].append(entry)
                state["loss_sum"], state["loss_n"] = 0.0, 0
                if log is not None:
                    log("step " + str(state["step"]) + ": " + ", ".join(
                        f"{k} {v:.4f}" for k, v in entry.items() if k != "step" and isinstance(v, float)))
                score = metrics["score"]
                if state["best_score"] is None or (not math.isnan(score) and score > state["best_score"]):
                    state["best_score"], state["best_step"], state["best"] = score, state["step"], metrics
                    state["bad"] = 0
                    save_editor(out / EDITOR, editor)
                else:
                    state["bad"] += 1
                    if hparams.patience and state["bad"] >= hparams.patience:
                        state["stopped"] = "early_stop"
                if state["step"] >= target and state["stopped"] is None:
                    state["stopped"] = "max_steps" if target < hparams.steps else "steps"
                if out_of_time and state["stopped"] is None:
                    state["stopped"] = "max_minutes"
                save()
    finally:
        bar.close()
    return manifest()
