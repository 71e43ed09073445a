"""High-level library API, the same operations the CLI offers.

>>> from medit import api
>>> handle = api.load("smollm2-135m")
>>> result = api.edit(handle, "ft-l", "medit/datasets/demo.jsonl", save_patch="demo.patch")
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Sequence

from medit.core.chat import DEFAULT_CHAT_PROMPT, chat_format, wrap_request
from medit.core.dataset import load_dataset
from medit.core.edit import Edit, load_patch
from medit.errors import MeditError, UnknownNameError
from medit.evaluation.engine import DEFAULT_METRICS, EvalConfig, Evaluator
from medit.model.guards import check_lengths
from medit.model.handle import ModelHandle
from medit.model.loading import load_model
from medit.core.hparams import HParams
from medit.core.method import Method
from medit.plugin.manager import get_plugins
from medit.core.requests import EditRequest
from medit.evaluation.rundir import check_patch_path

load = load_model
EDIT_MODES = ("batch", "sequential")


def default_run_dir(kind: str, method: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{kind}-{method}"
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def get_method(name: str) -> Method:
    return get_plugins().methods.get(name)


def resolve_hparams(handle: ModelHandle, method: Method, hparams_file: str | None = None,
                    overrides: dict[str, Any] | None = None) -> HParams:
    return method.resolve_hparams(handle, hparams_file, overrides)


def run(handle: ModelHandle, method: str | Method, requests: Sequence[EditRequest] | str, *,
        hparams: HParams | None = None, hparams_file: str | None = None,
        overrides: dict[str, Any] | None = None, n: int | None = None, offset: int = 0,
        seed: int | None = None, keep_edit: bool = False, dataset_info: Any = None,
        skip_invalid: bool = False, attribute_pool: Sequence[str] | Any = None, max_length: int | None = None,
        **cfg: Any) -> tuple[dict[str, Any], Edit | None]:
    """Evaluate ``method`` on requests (a list or a dataset spec such as ``counterfact:PATH``).

    Returns (summary with per-case records under ``cases``, the kept edit or None). ``chat=True``
    asks every prompt as a user turn of the tokenizer's chat template (``chat_prompt``: the user
    message of a cloze prompt) and adds the ``answer`` protocol to the default ones; other
    keywords are :class:`~medit.evaluation.engine.EvalConfig`'s. Pass
    ``dataset_info`` with already-selected requests to record where they came from. With a spec,
    ``skip_invalid`` leaves invalid records out (see :func:`~medit.core.dataset.load_dataset`).

    With the ``attribute`` metric, requests without ``attribute`` prompts get them from
    ``attribute_pool`` (dataset specs, or an :class:`~medit.plugins.metrics.attribute.AttributePool`;
    default: the whole dataset file ``requests`` names, else the requests themselves).

    A prompt or target longer than ``max_length`` tokens (default, and at most, the model's
    context length) is refused before anything is edited.
    """
    m = get_method(method) if isinstance(method, str) else method
    if isinstance(requests, str):
        reqs, dataset_info = load_dataset(requests, n=n, offset=offset, seed=seed, skip_invalid=skip_invalid)
    else:
        reqs = list(requests) if dataset_info is not None else list(requests)[offset:offset + n if n is not None else None]
    dataset: dict[str, Any] = {}
    if dataset_info is not None:
        dataset = {"path": str(dataset_info.path), "format": dataset_info.format,
                   "fingerprint": dataset_info.fingerprint, "n_total": dataset_info.n_total,
                   "n": dataset_info.n, "offset": dataset_info.offset, "seed": dataset_info.seed,
                   "skipped": getattr(dataset_info, "skipped", 0), "invalid": getattr(dataset_info, "invalid", 0),
                   "source": getattr(dataset_info, "source", "file")}
    metrics = cfg.get("metrics") or DEFAULT_METRICS
    if "attribute" in metrics:
        from medit.plugins.metrics.attribute import AttributePool, attribute_from_pool, load_attribute_pool
        if attribute_pool is None:
            attribute_pool = ([requests] if isinstance(requests, str)
                              else AttributePool(reqs, {"specs": [], "fingerprints": [], "n": len(reqs)}))
        if isinstance(attribute_pool, (str, Path)):
            attribute_pool = [attribute_pool]
        pool = (attribute_pool if isinstance(attribute_pool, AttributePool)
                else load_attribute_pool([str(s) for s in attribute_pool]))
        reqs = attribute_from_pool(reqs, pool.requests)
        dataset["attribute_pool"] = {**pool.info, "cases_with_attribute": sum(1 for r in reqs if r.attribute)}
    elif attribute_pool is not None:
        raise MeditError("an attribute pool is for the attribute metric, which this run does not evaluate; add "
                         "attribute to the metrics (--metrics) or drop --attribute-pool")
    check_lengths(handle, reqs, max_length)  # an over-long prompt or target: one line now, not an OOM kill later
    hp = hparams if hparams is not None else m.resolve_hparams(handle, hparams_file, overrides)
    ev = Evaluator(handle, m, hp, EvalConfig(dataset=dataset, keep_edit=keep_edit,
                                             seed=seed or 0, **cfg))
    summary = ev.run(reqs)
    return summary, ev.final_edit


def edit(handle: ModelHandle, method: str | Method, requests: Sequence[EditRequest] | str, *,
         mode: str | None = None, save_patch: str | Path | None = None, force: bool = False,
         keep: bool = False, **kw: Any) -> tuple[dict[str, Any], Edit | None]:
    """Apply all requests together (batch if the method can, else one after another), score them,
    optionally save the combined edit as a patch (an existing patch is replaced only with
    ``force``). With ``keep`` the edit stays applied and is returned (call ``.revert()`` to undo
    it); otherwise the model is restored."""
    check_edit_mode(mode)
    m = get_method(method) if isinstance(method, str) else method
    mode = mode or ("batch" if "batch" in m.modes else "sequential")
    if save_patch:  # refuse a bad destination before any work is done
        check_patch_path(save_patch, kw.get("out_dir"), force)
    summary, edit_obj = run(handle, m, requests, mode=mode, keep_edit=True, **kw)
    if save_patch:
        if edit_obj is None:
            raise MeditError(f"no combined edit was kept in {mode!r} mode, so no patch can be saved to "
                             f"{str(save_patch)!r}; use mode 'batch' with one batch or 'sequential'")
        summary["patch"] = str(edit_obj.save(save_patch, force=force))
    if edit_obj is not None and not keep:
        edit_obj.revert()
        edit_obj = None
    return summary, edit_obj


def check_edit_mode(mode: str | None) -> None:
    """:func:`edit` keeps its edits applied together: only ``batch`` and ``sequential`` make sense."""
    if mode is None or mode in EDIT_MODES:
        return
    if mode == "single":
        raise MeditError("--mode single does not apply to `medit edit`, which keeps all its edits applied "
                         "together; use --mode batch or --mode sequential (or score edits one at a time "
                         "with `medit eval --mode single`)")
    raise UnknownNameError("mode", mode, EDIT_MODES, hint="`medit edit` applies all its edits together")


def chat_requests(handle: ModelHandle, requests: Sequence[EditRequest],
                  chat_prompt: str = DEFAULT_CHAT_PROMPT) -> list[EditRequest]:
    """``requests`` with every prompt wrapped as a user turn of ``handle``'s chat template, as
    ``chat=True`` does inside :func:`run` (e.g. to train a learned editor on them)."""
    fmt = chat_format(handle.tokenizer, chat_prompt, handle.model_id)
    return [wrap_request(r, fmt) for r in requests]


def apply_patch(handle: ModelHandle, path: str | Path) -> Edit:
    """Apply a saved patch to ``handle``; the returned Edit reverts it."""
    return load_patch(handle, path)
