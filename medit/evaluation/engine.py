"""The evaluation engine: applies edits in an explicit mode, scores pre/post in shared batches,
writes results incrementally and never reloads the model (it reverts in place)."""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from medit.core.edit import CompositeEdit, Edit, share_originals
from medit.errors import MeditError, MethodError
from medit.model.handle import ModelHandle
from medit.core.hparams import HParams
from medit.core.io import JsonlAppender, atomic_write_json
from medit.evaluation.memory import current_rss_mb, peak_rss_mb, trim_heap
from medit.core.method import Method
from medit.core.chat import ChatFormat, chat_format, wrap_request
from medit.core.metric import Metric
from medit.plugin.manager import get_plugins
from medit.core.progress import progress_bar
from medit.core.requests import EditRequest
from medit.evaluation.monitor import Monitor, MonitorConfig, RunCollapsed
from medit.evaluation import sharding
from medit.evaluation.rundir import case_files, check_out_dir, check_resumable
from medit.core import distributed
from medit.evaluation.summary import summarise
from medit.scoring.dists import DistFile
from medit.scoring.engine import Scorer
from medit.core.timing import SETUP_FIELDS, setup_since, setup_totals

from medit.evaluation.config import DEFAULT_METRICS, EvalConfig  # noqa: F401 - part of this module's API


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A bar counting cases (cases/s and the ETA); periodic log lines when not on a terminal."""
    return progress_bar(total, desc, "case", enabled)


def _case_progress(bar: Any, n_cases: int, start: int = 0) -> Any:
    """A scorer progress callback (work done / total) that advances ``bar`` in cases, from case
    ``start`` to ``start + n_cases``."""
    def update(done: float, total: float) -> None:
        target = start + (n_cases if total <= 0 else min(n_cases, int(n_cases * done / total)))
        if target > bar.n:
            bar.update(target - bar.n)
    return update


#: cases scored together after a sequence's last edit: full scoring batches, bounded results.
POST_GROUP = 256


class Evaluator:
    """Runs one method over requests. Use :func:`evaluate` for the common path."""

    def __init__(self, handle: ModelHandle, method: Method, hparams: HParams, cfg: EvalConfig) -> None:
        self.handle, self.method, self.hparams, self.cfg = handle, method, hparams, cfg
        #: the chat wrapping of every request (None without ``chat``): one place for every method
        self.chat: ChatFormat | None = (chat_format(handle.tokenizer, cfg.chat_prompt, handle.model_id)
                                        if cfg.chat else None)
        self._original: dict[str, EditRequest] = {}
        self.metrics: list[Metric] = cfg.configured_metrics()
        #: run-level metrics (other_task): scored before editing and after a sample of edits
        self.run_metrics = [m for m in self.metrics if m.run_queries(cfg.protocols, cfg.gen_tokens)]
        self.scorer = Scorer(handle, cfg.score_batch_size, use_cache=method.cached_scoring)
        method.check_supported(handle, cfg.mode)
        check_batched(method, cfg.mode, cfg.batch_size)
        self.final_edit: Edit | None = None

    # ------------------------------------------------------------------ scoring helpers
    def _queries(self, reqs: Sequence[EditRequest]) -> list[Any]:
        return [q for r in reqs for m in self.metrics for q in m.queries(r, self.cfg.protocols, self.cfg.gen_tokens)]

    def _run_queries(self) -> list[Any]:
        return [q for m in self.run_metrics for q in m.run_queries(self.cfg.protocols, self.cfg.gen_tokens)]

    def _run_scores(self, edit: Edit) -> dict:
        """Run-level metrics' queries scored with ``edit`` active (empty without such metrics)."""
        qs = self._run_queries()
        return self.scorer.run(qs, edit.transform_prompts) if qs else {}

    def _check_run_lengths(self) -> None:
        """Refuse a run-level text (a paragraph, a two-choice item) longer than the model's context,
        before any work."""
        from medit.core.queries import TFQuery
        from medit.model.guards import context_limit
        limit = context_limit(self.handle)
        for m in self.run_metrics:
            qs = [q for q in m.run_queries(self.cfg.protocols, self.cfg.gen_tokens) if isinstance(q, TFQuery)]
            if not qs:
                continue
            texts = [q.prompt + " " + q.target for q in qs]
            for text, ids in zip(texts, self.handle.tokenizer(texts, verbose=False)["input_ids"]):
                if len(ids) > limit:
                    raise MeditError(f"metric {m.name!r}: the text {text[:50]!r}... is {len(ids):,} tokens long, longer "
                                     f"than the model's context of {limit:,} tokens; give it shorter paragraphs or "
                                     "items")

    def _sampled(self, count: int) -> set[int]:
        """Indices (of ``count`` edits) after which run-level metrics are measured: ``run_sample``
        evenly spaced ones, the first and the last among them."""
        k = max((m.run_sample for m in self.run_metrics), default=0)
        if not k or not count:
            return set()
        if k >= count:
            return set(range(count))
        if k == 1:
            return {count - 1}
        return {round(i * (count - 1) / (k - 1)) for i in range(k)}

    def _score(self, reqs: Sequence[EditRequest], edit: Edit | None = None, desc: str = "") -> dict:
        """Score the queries of ``reqs`` with ``edit`` active; with ``desc``, behind a progress bar."""
        transform = edit.transform_prompts if edit is not None else None
        if not desc:
            return self.scorer.run(self._queries(reqs), transform)
        bar = _progress(len(reqs), desc, self.cfg.progress)
        try:
            return self.scorer.run(self._queries(reqs), transform, progress=_case_progress(bar, len(reqs)))
        finally:
            bar.close()

    def _pre_scores(self, requests: Sequence[EditRequest], todo: Sequence[EditRequest]) -> dict:
        """Pre-edit scores, once per run, through the disk cache. With the cache the whole run's
        queries are the key (so a resumed run finds the entry its first attempt wrote)."""
        from medit.scoring.cache import cached_run
        reqs = requests if self.cfg.score_cache else todo
        if not reqs:
            return {}
        settings = {"protocols": list(self.cfg.protocols), "gen_tokens": self.cfg.gen_tokens}
        bar = _progress(len(reqs), f"{self.method.name} pre-edit scoring", self.cfg.progress)
        try:
            res, hit = cached_run(self.handle, self.scorer, self._queries(reqs) + self._run_queries(), settings,
                                  progress=_case_progress(bar, len(reqs)), enabled=self.cfg.score_cache,
                                  model_fp=self.base_fingerprint)
        finally:
            bar.close()
        self.pre_from_cache = hit
        return res

    def _case_record(self, req: EditRequest, pre: dict, post: dict, ctx: dict[str, Any],
                     immediate: dict | None = None, edit: dict[str, Any] | None = None) -> dict[str, Any]:
        ctx = {**ctx, "gen_tokens": self.cfg.gen_tokens}
        rec: dict[str, Any] = {"case_id": req.case_id, "metrics": {}, "efficiency": {}}
        for m in self.metrics:
            vals = m.compute(req, pre, post, self.cfg.protocols, ctx)
            if m.name == "efficiency":
                rec["efficiency"] = {k: v["post"] for k, v in vals.items()}
                continue
            if immediate is not None:
                # The same metric with the scores taken right after this case's own edit.
                now = m.compute(req, pre, immediate, self.cfg.protocols, ctx)
                for proto, stages in vals.items():
                    if proto in now:
                        stages["immediate"] = now[proto]["post"]
            if vals:
                rec["metrics"][m.name] = vals
        if "generate" in self.cfg.protocols:
            from medit.core.queries import GenQuery
            q = GenQuery(req.prompt, self.cfg.gen_tokens)
            rec["generated"] = {"prompt": req.prompt, "pre": pre.get(q), "post": post.get(q)}
            if immediate is not None:
                rec["generated"]["immediate"] = immediate.get(q)
        if "answer" in self.cfg.protocols:
            from medit.core.queries import GenQuery
            q = GenQuery(req.prompt, self.cfg.answer_tokens)
            rec["answer"] = {"prompt": req.prompt, "pre": pre.get(q), "post": post.get(q)}
        rec["request"] = self._original.get(req.case_id, req).to_dict()  # as the dataset wrote it
        if edit is not None:
            rec["edit"] = edit
        return rec

    # ------------------------------------------------------------------ modes
    def run(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        cfg = self.cfg
        if self.chat is not None:
            self._original = {r.case_id: r for r in requests}
            requests = [wrap_request(r, self.chat) for r in requests]
        out = Path(cfg.out_dir) if cfg.out_dir else None
        world = sharding.ranks()  # > 1: this rank evaluates its share of the cases (sharding.py)
        me = distributed.rank() if world > 1 else 0
        sharding.check_shardable(cfg.mode, cfg.batch_size, world)
        done: dict[str, dict[str, Any]] = {}
        if out is not None:
            check_out_dir(out, cfg.resume)
            if cfg.resume:  # every case file, whichever world size wrote it
                done = sharding.finished(out)
                sharding.clean(sharding.case_file(out, me, world))
            if world > 1:
                distributed.barrier()  # every rank has read what is done before any rank writes
        from medit.scoring.cache import model_fingerprint
        self.base_fingerprint = model_fingerprint(self.handle)  # of the weights as they are now
        self.pre_from_cache = False
        self._check_run_lengths()
        self.method.start_run(self.handle)
        start = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest = self._manifest(requests, start, None)
        if out is not None:
            if done:
                check_resumable(out, manifest)
            if me == 0:
                atomic_write_json(out / "manifest.json", manifest)
        todo = [r for r in requests if r.case_id not in done]
        mine = sharding.split(todo, cfg.mode, cfg.batch_size, world, me)
        t0 = time.perf_counter()
        records = list(done.values())
        new: list[dict[str, Any]] = []
        writer = JsonlAppender(sharding.case_file(out, me, world)) if out is not None else None
        stopped: RunCollapsed | None = None
        try:
            pre_all = (self._pre_scores(requests, todo) if world == 1 else
                       self._pre_scores(mine, mine)) if mine else {}
            bar = _progress(len(mine), f"{self.method.name} {cfg.mode} editing", cfg.progress)
            try:
                for rec in self._run_mode(mine, pre_all, bar, requests):
                    new.append(rec)
                    if writer is not None:
                        writer.write(rec)
            except RunCollapsed as e:  # the cases edited before the stop were scored: summarise them
                stopped = e
            bar.close()
        finally:
            if writer is not None:
                writer.close()
        records += sharding.gather(new, world)
        eval_s = time.perf_counter() - t0
        order = {r.case_id: i for i, r in enumerate(requests)}
        records.sort(key=lambda r: order.get(str(r["case_id"]), 0))
        summary = summarise(records, self.method.name, self.handle.model_id, cfg.mode, eval_s)
        if stopped is not None:
            summary["stopped"] = {"reason": str(stopped), "cases_scored": len(records), "cases": len(requests)}
        if out is not None and me == 0:
            if world > 1 or len(case_files(out)) > 1:  # rank files: merged into cases.jsonl
                sharding.finish(out, records)
            atomic_write_json(out / "manifest.json", self._manifest(requests, start,
                                                                    _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))
            atomic_write_json(out / "summary.json", summary)
        if stopped is not None:
            raise stopped
        summary["cases"] = records
        return summary

    def _apply(self, reqs: Sequence[EditRequest]) -> tuple[Edit, float]:
        """Apply one edit; returns it with the seconds the edit itself took. One-time setup done
        on the way (statistics, context templates) is not edit time: it goes to
        ``edit.info["setup_s"]``, reported as ``stats_s`` / ``template_s``."""
        before = setup_totals()
        t = time.perf_counter()
        edit = self.method.apply(self.handle, list(reqs), self.hparams)
        if self.handle.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        setup = setup_since(before)
        edit.info["setup_s"] = {SETUP_FIELDS[k]: round(v, 4) for k, v in setup.items() if v > 0}
        trim_heap()  # keeps a long run's memory flat (see trim_heap); not part of the edit's time
        return edit, max(0.0, seconds - sum(setup.values()))

    def _ctx(self, edit_s: float, edit: Edit, rss_mb: float | None = None) -> dict[str, Any]:
        """Efficiency context of a case; ``rss_mb`` is the resident memory right after its edit
        (sequential mode records it then; otherwise it is read now)."""
        setup = edit.info.get("setup_s") or {}
        ctx: dict[str, Any] = {"edit_s": round(edit_s, 4), "peak_rss_mb": peak_rss_mb(),
                               "rss_mb": rss_mb if rss_mb is not None else current_rss_mb(),
                               **{f: setup.get(f) for f in SETUP_FIELDS.values()}}
        if self.handle.device.type == "cuda":
            ctx["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return ctx

    def _chunk_records(self, chunk: Sequence[EditRequest], edit: Edit, seconds: float, pre: dict, post: dict,
                       rss_mb: float | None = None, immediate: dict | None = None,
                       wanted: set[str] | None = None, run_post: dict | None = None,
                       run_case: str | None = None) -> Any:
        """Records of the cases of one edit applied to ``chunk`` (those in ``wanted``, if given):
        each gets an equal share of the edit's time, and its statistics time counts once. The
        run-level scores ``run_post`` go to one case only (``run_case``, default the chunk's first),
        so that they count once in the run's mean."""
        target = run_case if run_case is not None else (chunk[0].case_id if chunk else None)
        for j, req in enumerate(chunk):
            if wanted is not None and req.case_id not in wanted:
                continue
            ctx = self._ctx(seconds / len(chunk), edit, rss_mb)
            if j:  # the setup happened once, for the whole chunk
                ctx.update({f: None for f in SETUP_FIELDS.values()})
            scores = {**post, **run_post} if run_post and req.case_id == target else post
            yield self._case_record(req, pre, scores, ctx, immediate, edit=edit_record(edit, j, len(chunk)))

    def _sequence_records(self, steps: list[tuple[list[EditRequest], Edit, float, float | None, dict | None]],
                          whole: Edit, pre: dict, wanted: set[str], run_post: dict, last: str | None) -> Any:
        """Records of a sequence's cases, scored after its last edit ``POST_GROUP`` cases at a
        time, so that a run of thousands of cases never holds all their post-edit results."""
        todo = [r for chunk, *_ in steps for r in chunk if r.case_id in wanted]
        bar = _progress(len(todo), f"{self.method.name} post-edit scoring", self.cfg.progress)
        try:
            group: list[tuple[list[EditRequest], Edit, float, float | None, dict | None]] = []
            cases: list[EditRequest] = []
            for k, step in enumerate(steps):
                group.append(step)
                cases += [r for r in step[0] if r.case_id in wanted]
                if len(cases) < POST_GROUP and k + 1 < len(steps):
                    continue
                post = self.scorer.run(self._queries(cases), whole.transform_prompts,
                                       progress=_case_progress(bar, len(cases), bar.n)) if cases else {}
                for chunk, edit, s, mb, now in group:
                    yield from self._chunk_records(chunk, edit, s, pre, post, mb, now, wanted,
                                                   run_post=run_post, run_case=last)
                group, cases = [], []
        finally:
            bar.close()

    def _monitor(self, sequence: Sequence[EditRequest]) -> Monitor | None:
        cfg = self.cfg
        if not cfg.monitor_every:
            return None
        mc = MonitorConfig(cfg.monitor_every, cfg.collapse_threshold if cfg.stop_on_collapse else None)
        return Monitor(self.handle, self.scorer, sequence, mc,
                       Path(cfg.out_dir) if cfg.out_dir else None)

    def _run_mode(self, todo: list[EditRequest], pre: dict, bar: Any, sequence: Sequence[EditRequest]) -> Any:
        """Records for the ``todo`` cases. In sequential mode every case of ``sequence`` is edited,
        in order, so a resumed run scores its remaining cases after the same edits as the first try."""
        mode = self.cfg.mode
        if mode == "single":
            index = {r.case_id: i for i, r in enumerate(sequence)}
            sampled = self._sampled(len(sequence))
            for req in todo:
                edit, s = self._apply([req])
                try:
                    post = self._score([req], edit)
                    if index[req.case_id] in sampled:
                        post.update(self._run_scores(edit))
                finally:
                    edit.revert()
                yield self._case_record(req, pre, post, self._ctx(s, edit), edit=edit_record(edit, 0, 1))
                bar.update(1)
        elif mode == "batch":
            size = self.cfg.batch_size or len(todo)
            sampled = self._sampled(-(-len(todo) // size))
            for i in range(0, len(todo), size):
                chunk = todo[i:i + size]
                edit, s = self._apply(chunk)
                keep = self.cfg.keep_edit and size >= len(todo)
                run_post: dict = {}
                try:
                    post = self._score(chunk, edit)
                    if i // size in sampled:
                        run_post = self._run_scores(edit)
                finally:
                    if keep:
                        self.final_edit = edit
                    else:
                        edit.revert()
                yield from self._chunk_records(chunk, edit, s, pre, post, run_post=run_post)
                bar.update(len(chunk))
        else:  # sequential: every case is scored after the last edit (retention)
            size = max(1, self.cfg.batch_size)
            edits: list[Edit] = []
            steps: list[tuple[list[EditRequest], Edit, float, float | None, dict | None]] = []
            ok = False
            wanted = {r.case_id for r in todo}
            monitor = self._monitor(sequence)
            immediate = DistFile.temporary() if self.cfg.also_immediate else None
            collapsed: RunCollapsed | None = None
            try:
                if monitor is not None:
                    monitor.start()
                for i in range(0, len(sequence), size):
                    chunk = list(sequence[i:i + size])
                    edit, s = self._apply(chunk)
                    edits.append(edit)
                    share_originals(edits)  # one copy of each edited matrix, however long the run
                    if monitor is not None:
                        try:
                            monitor.after(i + len(chunk), edits, last=i + size >= len(sequence))
                        except RunCollapsed as e:  # score what was edited so far, then stop
                            collapsed = e
                    mb = current_rss_mb()
                    mine = [r for r in chunk if r.case_id in wanted]
                    now = None
                    if immediate is not None and mine:  # kept to the end: distributions on disk
                        with self.scorer.dists_in(immediate):
                            now = self._score(mine, CompositeEdit(self.handle, edits))
                    steps.append((chunk, edit, s, mb, now))
                    bar.update(len(mine))
                    if collapsed is not None:
                        break
                bar.close()
                whole = CompositeEdit(self.handle, edits)
                # run-level metrics once, after the last edit, on the last case edited
                tail = steps[-1][0][-1].case_id if steps else None
                last = tail if tail in wanted else None
                run_post = self._run_scores(whole) if last is not None else {}
                yield from self._sequence_records(steps, whole, pre, wanted, run_post, last)
                ok = True
            finally:
                if ok and self.cfg.keep_edit:
                    self.final_edit = CompositeEdit(self.handle, edits)
                else:
                    CompositeEdit(self.handle, edits).revert()
            if collapsed is not None:
                raise collapsed

    def _manifest(self, requests: Sequence[EditRequest], start: str, end: str | None) -> dict[str, Any]:
        from medit import __version__
        from medit.toolkit.stats import corpus_record
        corpus = getattr(self.hparams, "stats_corpus", None)  # which statistics corpus: spec, file, fingerprint
        return {"medit_version": __version__,
                **({"stats_corpus": corpus_record(corpus)} if isinstance(corpus, str) else {}),
                "model": {"id": self.handle.model_id, "fingerprint": self.base_fingerprint,
                          "model_type": self.handle.config.model_type, "dtype": str(self.handle.dtype),
                          "device": str(self.handle.device)},
                "method": self.method.name, "hparams": self.hparams.to_dict(), "mode": self.cfg.mode,
                "also_immediate": self.cfg.also_immediate, "pre_scores_cached": self.pre_from_cache,
                "batch_size": self.cfg.batch_size, "protocols": list(self.cfg.protocols),
                "metrics": list(self.cfg.metrics), "gen_tokens": self.cfg.gen_tokens,
                "metric_options": self.cfg.metric_options,
                **({"answer_tokens": self.cfg.answer_tokens} if "answer" in self.cfg.protocols else {}),
                **({"chat": self.chat.record()} if self.chat is not None else {}),
                "dataset": self.cfg.dataset, "n": len(requests),
                "offset": self.cfg.dataset.get("offset", 0), "seed": self.cfg.seed,
                # the ranks of the launch that wrote it (torchrun); a resume may use another number
                **({"world_size": distributed.world()} if distributed.world() > 1 else {}),
                "start_time": start, "end_time": end}


def check_batched(method: Method, mode: str, batch_size: int) -> None:
    """Refuse sequential batches of more than one edit for a method that cannot edit in batches."""
    if mode == "sequential" and batch_size > 1 and "batch" not in method.modes:
        raise MethodError(f"method {method.name!r} cannot apply {batch_size} edits at once, so it cannot run "
                          "sequential batches; drop --batch-size to apply one edit at a time")


def edit_record(edit: Edit, index: int, size: int) -> dict[str, Any]:
    """What a case row says about the edit that made it: the case's position among the edit's
    ``size`` requests, and (on the first of them only, so a batch stores it once) the method's
    diagnostics from ``edit.info`` that JSON can hold, e.g. ROME/MEMIT's ``delta_steps``,
    ``delta_nll`` and ``realised``, whose lists are indexed by that position."""
    rec: dict[str, Any] = {"index": index, "size": size}
    if index == 0:
        info = {}
        for key, value in edit.info.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            info[key] = value
        rec["info"] = info
    return rec


def evaluate(handle: ModelHandle, method: Method | str, requests: Sequence[EditRequest],
             hparams: HParams | None = None, **cfg: Any) -> dict[str, Any]:
    """Library entry point: evaluate ``method`` on ``requests``; returns the summary (with ``cases``)."""
    m = get_plugins().methods.get(method) if isinstance(method, str) else method
    hp = hparams if hparams is not None else m.resolve_hparams(handle)
    return Evaluator(handle, m, hp, EvalConfig(**cfg)).run(requests)
