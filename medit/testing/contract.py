"""The kit's contract check, :func:`check_method` (see :mod:`medit.testing`)."""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import medit
from medit.errors import HParamsError, MethodError

if TYPE_CHECKING:
    import torch

    from medit.core.edit import Edit
    from medit.core.method import Method
    from medit.core.requests import EditRequest
    from medit.model.handle import ModelHandle

from medit.testing.tiny import scratch_dir, tiny_model, default_requests, training_requests


# ------------------------------------------------------------------------------ the report

@dataclass
class CheckReport:
    """What :func:`check_method` found. ``checks`` maps each check to ``"ok: ..."`` or
    ``"skipped: <reason>"``; a failed check raises instead of being reported."""

    method: str
    family: str
    model: str
    hparams: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: per request: the new target's mean log-prob after the edit prompt, before and after the edit
    logprob_before: list[float] = field(default_factory=list)
    logprob_after: list[float] = field(default_factory=list)
    #: largest |live - patched| logit difference (None when the patch check was skipped)
    patch_max_diff: float | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> list[str]:
        return [k for k, v in self.checks.items() if v.startswith("ok")]

    @property
    def skipped(self) -> dict[str, str]:
        return {k: v.removeprefix("skipped: ") for k, v in self.checks.items() if v.startswith("skipped")}

    def __str__(self) -> str:
        lines = [f"check_method({self.method!r}, family={self.family!r}) on {self.model}: "
                 f"{len(self.passed)} passed, {len(self.skipped)} skipped, {self.seconds:.1f} s"]
        lines += [f"  {k}: {v}" for k, v in self.checks.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Failure(AssertionError):
    pass


def _fail(report: CheckReport, check: str, message: str) -> None:
    raise _Failure(f"check_method({report.method!r}, family={report.family!r}) failed [{check}]: {message}")


# ------------------------------------------------------------------------------ check_method

def check_method(method: "Method[Any] | str", family: str = "llama", hparams: Mapping[str, Any] | None = None,
                 requests: Sequence["EditRequest"] | None = None, *, expect_success: bool = True,
                 min_gain: float = 1e-3, atol: float = 1e-4, model: str | None = None,
                 train_steps: int = 10) -> CheckReport:
    """Check ``method`` (an instance, or a registered name) against medit's contract on the tiny
    random model of ``family`` (or on ``model``, any spec :func:`medit.load_model` takes); see the
    module documentation for the checks. ``hparams`` are overrides on the method's defaults for
    the model (as ``--set`` gives them); ``requests`` default to :func:`default_requests` and are
    applied together in one ``apply`` call (several need ``"batch"`` in the method's modes).

    Returns a :class:`CheckReport`; raises :class:`AssertionError` naming the broken rule. On a
    tiny model the check runs on one CPU thread (thousands of tiny operations gain nothing from
    intra-op threads, and on a busy machine their barriers make each one wait).
    """
    with _one_thread() if model is None else contextlib.nullcontext():
        return _check_method(method, family, hparams, requests, expect_success, min_gain, atol, model, train_steps)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_method(method: "Method[Any] | str", family: str, hparams: Mapping[str, Any] | None,
                  requests: Sequence["EditRequest"] | None, expect_success: bool, min_gain: float, atol: float,
                  model: str | None, train_steps: int) -> CheckReport:
    from medit.core.method import MODES, Method
    from medit.plugin.manager import get_plugins

    start = time.perf_counter()
    m = get_plugins().methods.get(method) if isinstance(method, str) else method
    reqs = list(requests) if requests is not None else default_requests()
    report = CheckReport(method=getattr(m, "name", repr(m)), family=family, model=model or f"tiny {family}")
    overrides = dict(hparams or {})

    # ---- the class contract (no model needed)
    if not isinstance(m, Method):
        _fail(report, "contract", f"{type(m).__name__} is not a medit.Method subclass instance")
    if not m.name or m.name != m.name.lower() or " " in m.name:
        _fail(report, "contract", f"name {m.name!r} must be a non-empty lowercase name")
    if not (isinstance(m.hparams_class, type) and issubclass(m.hparams_class, medit.HParams)
            and is_dataclass(m.hparams_class)):
        _fail(report, "contract", f"hparams_class {m.hparams_class!r} must be a dataclass subclassing medit.HParams")
    if not m.modes or not set(m.modes) <= set(MODES):
        _fail(report, "contract", f"modes {m.modes!r} must be a non-empty subset of {MODES}")
    if type(m).apply is Method.apply:
        _fail(report, "contract", "the method does not implement apply()")
    if len(reqs) > 1 and "batch" not in m.modes:
        raise ValueError(f"{len(reqs)} requests are applied in one call, which needs 'batch' in the method's "
                         f"modes {m.modes}; pass one request")
    report.checks["contract"] = "ok: name, hparams dataclass, modes, apply"

    handle = medit.load_model(model, device="cpu") if model else tiny_model(family)
    family = report.family = handle.adapter.name

    # ---- (e) an unknown hparam is refused, with and without a model
    for where, call in (("resolve_hparams", lambda: m.resolve_hparams(handle, overrides={"no_such_hparam": 1})),
                        ("precheck_hparams", lambda: m.precheck_hparams(overrides={"no_such_hparam": 1}))):
        try:
            call()
        except HParamsError as exc:
            if "no_such_hparam" not in str(exc):
                _fail(report, "bad hparams", f"{where}: the HParamsError does not name the hparam: {exc}")
        else:
            _fail(report, "bad hparams", f"{where} accepted the unknown hparam 'no_such_hparam'")
    report.checks["bad hparams"] = "ok: an unknown hparam is refused with HParamsError"

    # ---- a family the method refuses is refused cleanly, and nothing else is checked on it
    if family in m.unsupported_families:
        try:
            m.check_supported(handle, "single")
        except MethodError as exc:
            for check in ("edit takes", "revert", "hooks", "patch"):
                report.checks[check] = f"skipped: the method refuses the {family} family (unsupported_families)"
            report.notes.append(f"refused with MethodError: {exc}")
            report.seconds = time.perf_counter() - start
            return report
        _fail(report, "contract", f"{family} is in unsupported_families but check_supported() accepts it")
    m.check_supported(handle, "batch" if len(reqs) > 1 else "single")

    hp = m.resolve_hparams(handle, overrides=overrides)
    if not isinstance(hp, m.hparams_class):
        _fail(report, "contract", f"resolve_hparams gave a {type(hp).__name__}, not a {m.hparams_class.__name__}")
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="check-", dir=scratch_dir())))
        hp = _trained_if_needed(m, handle, hp, scratch, train_steps, report)
        report.hparams = hp.to_dict()
        _check_edit(m, handle, hp, reqs, scratch, report, expect_success, min_gain, atol, model)
    report.seconds = time.perf_counter() - start
    return report


def _trained_if_needed(m: "Method[Any]", handle: "ModelHandle", hp: Any, scratch: Path, steps: int,
                       report: CheckReport) -> Any:
    """A learned method without a checkpoint: train a throwaway editor for ``steps`` steps."""
    if not getattr(m, "trainable", False) or getattr(hp, "checkpoint", None):
        return hp
    from medit.toolkit.training import train

    data = training_requests()
    short = hp.replace(steps=steps, val_n=0, val_every=steps, batch_size=min(hp.batch_size, len(data)),
                       patience=0)
    train(handle, m, short, data, scratch / "editor", progress=False)  # type: ignore[arg-type]
    report.notes.append(f"no checkpoint given: trained a throwaway editor for {steps} steps on "
                        f"{len(data)} made-up facts (checks the edit mechanics, not a trained editor's quality)")
    return hp.replace(checkpoint=str(scratch / "editor"))


def _state(handle: "ModelHandle") -> dict[str, "torch.Tensor"]:
    return {k: v.detach().clone() for k, v in handle.model.state_dict(keep_vars=True).items()}


def _params(handle: "ModelHandle") -> dict[str, tuple[tuple[int, ...], bool]]:
    return {n: (tuple(p.shape), p.requires_grad) for n, p in handle.model.named_parameters()}


def _hooks(handle: "ModelHandle") -> list[str]:
    """The forward (pre-)hooks on the model other than transformers' own, and global ones."""
    from torch.nn.modules import module as nn_module

    from medit.model.tracing import foreign_hooks

    found = [f"{name or '(model)'}: {getattr(h, '__qualname__', repr(h))}"
             for name, mod in handle.model.named_modules() for h in foreign_hooks(mod)]
    found += [f"(global): {getattr(h, '__qualname__', repr(h))}"
              for h in (*nn_module._global_forward_hooks.values(), *nn_module._global_forward_pre_hooks.values())]
    return found


def _compare_state(report: CheckReport, check: str, handle: "ModelHandle", state: dict[str, "torch.Tensor"],
                   params: dict[str, tuple[tuple[int, ...], bool]], hooks: list[str]) -> None:
    import torch

    now = handle.model.state_dict(keep_vars=True)
    if set(now) != set(state):
        extra, gone = sorted(set(now) - set(state)), sorted(set(state) - set(now))
        _fail(report, check, f"after revert the model's state differs in names (added {extra[:3]}, removed {gone[:3]})")
    changed = [k for k, v in now.items() if v.shape != state[k].shape or v.dtype != state[k].dtype
               or not torch.equal(v.detach(), state[k])]
    if changed:
        _fail(report, check, f"revert is not bit-exact: {len(changed)} tensor(s) differ, e.g. {changed[:3]}")
    if _params(handle) != params:
        diff = [n for n, v in _params(handle).items() if params.get(n) != v]
        _fail(report, check, f"revert left parameters with other shapes or requires_grad: {diff[:3]}")
    left = [h for h in _hooks(handle) if h not in hooks]
    if left:
        _fail(report, "hooks", f"hooks left on the model after revert: {left[:3]}")


def _logits(handle: "ModelHandle", edit: "Edit", pairs: Sequence[tuple[str, str]]) -> "torch.Tensor":
    """Float32 logits at every position that predicts a target token, with the edit's prompt
    transform applied (the same forward pass the evaluation engine scores)."""
    import torch

    from medit.scoring.engine import Scorer

    scorer = Scorer(handle, use_cache=False)
    prompts = edit.transform_prompts([p for p, _ in pairs])
    with torch.no_grad():
        return torch.cat([scorer.selected_logits([scorer.encode_pair(p, t)]).float()
                          for p, (_, t) in zip(prompts, pairs)])


def _target_logprobs(handle: "ModelHandle", reqs: Sequence["EditRequest"], edit: "Edit | None") -> list[float]:
    from medit.core.queries import TFQuery
    from medit.scoring.engine import Scorer

    res = Scorer(handle, use_cache=False).teacher_forced([TFQuery(r.prompt, r.target_new) for r in reqs],
                                                         edit.transform_prompts if edit is not None else None)
    return [r.mean_logprob for r in res]


def _check_edit(m: "Method[Any]", handle: "ModelHandle", hp: Any, reqs: list["EditRequest"], scratch: Path,
                report: CheckReport, expect_success: bool, min_gain: float, atol: float, model: str | None) -> None:
    from medit.core.edit import Edit, load_patch

    handle.fingerprint()  # the base model's, before any change (as the evaluation engine does)
    state, params, hooks = _state(handle), _params(handle), _hooks(handle)
    report.logprob_before = _target_logprobs(handle, reqs, None)
    edit = m.apply(handle, reqs, hp)
    try:
        if not isinstance(edit, Edit):
            _fail(report, "contract", f"apply() returned a {type(edit).__name__}, not a medit.Edit")
        if not edit.active:
            _fail(report, "contract", "the Edit apply() returned is not active")

        # (a) the edit takes
        report.logprob_after = _target_logprobs(handle, reqs, edit)
        gains = [a - b for a, b in zip(report.logprob_after, report.logprob_before)]
        shown = ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(report.logprob_before, report.logprob_after))
        if all(g >= min_gain for g in gains):
            report.checks["edit takes"] = f"ok: target log-prob {shown}"
        elif expect_success:
            _fail(report, "edit takes", f"the new target's log-prob did not rise by {min_gain} nats ({shown}); "
                  "stronger hparams may help, or pass expect_success=False for a method that cannot move a tiny model")
        else:
            report.checks["edit takes"] = f"skipped: expect_success=False (target log-prob {shown})"

        # (c, while active) an edit that hooks modules must keep the cached scoring engine away
        active_hooks = [h for h in _hooks(handle) if h not in hooks]
        if active_hooks and m.cached_scoring:
            _fail(report, "hooks", f"the edit hooks modules ({active_hooks[:2]}) but the method declares "
                  "cached_scoring = True; set cached_scoring = False")

        # (d, part 1) the live outputs and the patch, while the edit is active
        pairs = [(r.prompt, r.target_new) for r in reqs] + \
                [(q.prompt, q.answer or r.target_new) for r in reqs for q in r.locality]
        live = _logits(handle, edit, pairs)
        patch: Path | None = scratch / "patch"
        try:
            edit.save(scratch / "patch")
        except NotImplementedError as exc:
            report.checks["patch"] = f"skipped: the edit cannot be saved ({exc})"
            patch = None
    finally:
        edit.revert()

    # (b) bit-exact revert, idempotent; (c) no hooks left
    if edit.active:
        _fail(report, "revert", "the Edit is still active after revert()")
    _compare_state(report, "revert", handle, state, params, hooks)
    edit.revert()
    _compare_state(report, "revert", handle, state, params, hooks)
    report.checks["revert"] = f"ok: {len(state)} tensors bit-exact, twice"
    report.checks["hooks"] = "ok: none left" + (" (the edit hooked modules while active)" if active_hooks else "")

    # (d, part 2) the patch on a fresh copy of the model
    if patch is None:
        return
    fresh = medit.load_model(model, device="cpu") if model else tiny_model(report.family)
    fresh.fingerprint()
    f_state, f_params, f_hooks = _state(fresh), _params(fresh), _hooks(fresh)
    loaded = load_patch(fresh, patch)
    try:
        again = _logits(fresh, loaded, pairs)
    finally:
        loaded.revert()
    diff = float((again - live).abs().max()) if again.shape == live.shape else float("inf")
    report.patch_max_diff = diff
    if not diff <= atol:
        _fail(report, "patch", f"the patched model's logits differ from the live edit's by {diff:.3g} "
              f"(> atol={atol}) on the edit and locality prompts")
    _compare_state(report, "patch", fresh, f_state, f_params, f_hooks)
    report.checks["patch"] = f"ok: saved, loaded onto a fresh model (max logit diff {diff:.2g}), reverted bit-exact"
