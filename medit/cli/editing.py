"""The commands that edit or evaluate a model: ``edit``, ``eval``, ``apply``, ``train``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from medit.cli import options as o
from medit.cli.app import _Command, app
from medit.core import distributed
from medit.errors import MeditError, UnknownNameError
from medit.plugin.manager import get_plugins


@app.command(cls=_Command)
def edit(file: str = typer.Argument(..., metavar="FILE",
                                    help="edits: medit JSONL or any registered dataset format (FORMAT:PATH)"),
         method: str = o.MethodOpt, model: str = o.ModelOpt, hparams: Optional[str] = o.HparamsOpt,
         set_: Optional[list[str]] = o.SetOpt,
         mode: Optional[str] = typer.Option(None, "--mode", metavar="MODE",
                                            help="batch or sequential (default: batch when the method can)"),
         save_patch: Optional[str] = typer.Option(None, "--save-patch", metavar="DIR",
                                                  help="write the edit as a patch folder"),
         force: bool = typer.Option(False, "--force", help="let --save-patch replace an existing medit patch"),
         out: Optional[str] = o.OutOpt, protocol: Optional[str] = o.ProtoOpt, gen_tokens: int = o.GenOpt,
         max_length: Optional[int] = o.MaxLenOpt,
         stats_corpus: Optional[str] = o.CorpusOpt, checkpoint: Optional[str] = o.CheckpointOpt,
         chat: bool = o.ChatOpt, chat_prompt: str = o.ChatPromptOpt, answer_tokens: int = o.AnswerOpt,
         skip_invalid: bool = o.SkipInvalidOpt,
         attribute_pool: Optional[list[str]] = o.AttrPoolOpt, other_task_text: Optional[str] = o.OtherTextOpt,
         other_task_mc: Optional[str] = o.OtherMcOpt,
         dtype: Optional[str] = o.DtypeOpt, device: Optional[str] = o.DeviceOpt, device_map: Optional[str] = o.DeviceMapOpt,
         random_init: bool = o.RandomOpt, trust_remote_code: bool = o.TrustOpt,
         no_memory_check: bool = o.NoMemCheckOpt) -> None:
    """Apply the edits in FILE, show before/after completions and metrics, optionally save a patch.
    --attribute-pool, --other-task-text and --other-task-mc add the attribute / other_task metric."""
    from medit import api
    from medit.core.dataset import load_dataset
    from medit.core.hparams import parse_sets

    overrides = parse_sets(set_)
    api.check_edit_mode(mode)
    o.check_ranks(out, device_map, out_needed=False)  # torchrun: all ranks apply the one edit together
    o.at_least(gen_tokens, 1, "--gen-tokens", 8)
    o.at_least(max_length, 1, "--max-length", 512)
    protos = o.protocols(protocol)
    protos.update(o.chat_options(chat, chat_prompt, answer_tokens))
    run_dir = Path(out) if out else api.default_run_dir("edit", method)
    o.check_out_dir(run_dir, resume=False)
    if save_patch:
        o.check_patch_path(save_patch, run_dir, force)
    elif force:
        raise MeditError("--force lets --save-patch replace an existing patch; add --save-patch DIR or drop --force")
    requests, info = load_dataset(file, skip_invalid=skip_invalid)
    from medit.evaluation.engine import DEFAULT_METRICS
    metrics, extra = o.metric_flags(DEFAULT_METRICS, attribute_pool, other_task_text, other_task_mc, file,
                                   implied=True)
    if metrics != DEFAULT_METRICS:
        extra["metrics"] = metrics
    meth = api.get_method(method)
    if mode:
        meth.check_mode(mode)
    overrides = o.method_flags(meth, overrides, stats_corpus, checkpoint)
    meth.precheck_hparams(hparams, overrides)
    handle = o.load(model, dtype, device, device_map, random_init, trust_remote_code, no_memory_check)
    main = distributed.is_main()  # under torchrun rank 0 writes the run folder and the patch
    with distributed.shared():  # every rank applies the same edit; its target vectors are split
        summary, _ = api.edit(handle, meth, requests, dataset_info=info, mode=mode,
                              save_patch=save_patch if main else None, force=force, hparams_file=hparams,
                              overrides=overrides, out_dir=run_dir if main else None, gen_tokens=gen_tokens,
                              max_length=max_length, progress=main, **protos, **extra)
    o.print_completions(summary)
    o.print_summary(summary, run_dir)
    if save_patch:
        typer.echo(f"patch: {summary['patch']}")


@app.command("eval", cls=_Command)
def eval_(method: str = o.MethodOpt, model: str = o.ModelOpt,
          dataset: str = typer.Option(..., "--dataset", metavar="DATASET",
                                      help="PATH or FORMAT:PATH (e.g. counterfact:dev.json)"),
          n: Optional[int] = typer.Option(None, "--n", metavar="N", help="number of cases"),
          offset: int = typer.Option(0, "--offset", metavar="N", help="skip this many cases first"),
          seed: Optional[int] = typer.Option(None, "--seed", metavar="N",
                                             help="shuffle cases with this seed before selecting"),
          mode: str = typer.Option("single", "--mode", metavar="MODE", help="single, batch or sequential"),
          batch_size: int = typer.Option(0, "--batch-size", metavar="N",
                                         help="edits per batch: batch mode (0: all at once) or sequential mode "
                                         "(batches applied one after another; 0: one edit at a time)"),
          hparams: Optional[str] = o.HparamsOpt, set_: Optional[list[str]] = o.SetOpt,
          protocol: Optional[str] = o.ProtoOpt, gen_tokens: int = o.GenOpt, max_length: Optional[int] = o.MaxLenOpt,
          stats_corpus: Optional[str] = o.CorpusOpt,
          checkpoint: Optional[str] = o.CheckpointOpt, chat: bool = o.ChatOpt, chat_prompt: str = o.ChatPromptOpt,
          answer_tokens: int = o.AnswerOpt, skip_invalid: bool = o.SkipInvalidOpt,
          metrics: Optional[str] = typer.Option(None, "--metrics", metavar="LIST",
                                                help="comma list of metrics (default: reliability, generalization, "
                                                "locality, portability, efficiency; opt-in: fluency, attribute, "
                                                "distracting, other_task)"),
          attribute_pool: Optional[list[str]] = o.AttrPoolOpt, other_task_text: Optional[str] = o.OtherTextOpt,
          other_task_mc: Optional[str] = o.OtherMcOpt,
          out: Optional[str] = o.OutOpt, resume: bool = typer.Option(False, "--resume",
                                                                   help="continue an interrupted run in --out"),
          also_immediate: bool = typer.Option(False, "--also-immediate",
                                              help="sequential mode: also score each case right after its own edit"),
          monitor_every: int = typer.Option(0, "--monitor-every", metavar="N",
                                            help="sequential mode: every N edits, a health row in monitor.jsonl "
                                            "(norm growth, probe locality, retained reliability, perplexity)"),
          stop_on_collapse: bool = typer.Option(False, "--stop-on-collapse",
                                                help="end a monitored run when probe locality or retained "
                                                "reliability falls below --collapse-threshold"),
          collapse_threshold: float = typer.Option(0.5, "--collapse-threshold", metavar="X",
                                                   help="the --stop-on-collapse threshold, in (0, 1]"),
          score_batch_size: int = typer.Option(64, "--score-batch-size", metavar="N",
                                               help="most sequences per forward pass when scoring"),
          no_score_cache: bool = typer.Option(False, "--no-score-cache",
                                              help="recompute pre-edit scores instead of reusing MEDIT_CACHE/scores"),
          dtype: Optional[str] = o.DtypeOpt, device: Optional[str] = o.DeviceOpt, device_map: Optional[str] = o.DeviceMapOpt,
          random_init: bool = o.RandomOpt, trust_remote_code: bool = o.TrustOpt,
          no_memory_check: bool = o.NoMemCheckOpt) -> None:
    """Evaluate a method on a dataset; writes manifest.json, cases.jsonl and summary.json."""
    from medit import api
    from medit.core.dataset import load_dataset
    from medit.core.hparams import parse_sets

    if resume and not out:
        raise MeditError("--resume needs --out RUN_DIR naming the run to continue")
    overrides = parse_sets(set_)
    from medit.core.method import MODES
    if mode not in MODES:
        raise UnknownNameError("mode", mode, MODES)
    if distributed.world() > 1:  # torchrun ranks split the cases (medit/evaluation/sharding.py)
        from medit.evaluation.sharding import check_shardable
        check_shardable(mode, batch_size, distributed.world())
        o.check_ranks(out, device_map)
    o.at_least(gen_tokens, 1, "--gen-tokens", 8)
    o.at_least(max_length, 1, "--max-length", 512)
    o.at_least(n, 1, "--n", 20)
    o.at_least(offset, 0, "--offset", 0)
    run_dir = Path(out) if out else api.default_run_dir("eval", method)
    o.check_out_dir(run_dir, resume)
    requests, info = load_dataset(dataset, n=n, offset=offset, seed=seed,  # fail fast, before loading the model
                                  skip_invalid=skip_invalid)
    meth = api.get_method(method)
    overrides = o.method_flags(meth, overrides, stats_corpus, checkpoint)
    cfg: dict[str, Any] = {"mode": mode, "batch_size": batch_size, "gen_tokens": gen_tokens, **o.protocols(protocol),
                           "also_immediate": also_immediate, "score_batch_size": score_batch_size,
                           "monitor_every": monitor_every, "stop_on_collapse": stop_on_collapse,
                           "collapse_threshold": collapse_threshold,
                           "score_cache": not no_score_cache, **o.chat_options(chat, chat_prompt, answer_tokens),
                           "progress": distributed.is_main()}
    if metrics:
        for name in (m.strip() for m in metrics.split(",")):
            get_plugins().metrics.get(name)
        cfg["metrics"] = tuple(m.strip() for m in metrics.split(","))
    from medit.evaluation.engine import DEFAULT_METRICS, EvalConfig, check_batched
    _, extra = o.metric_flags(cfg.get("metrics", DEFAULT_METRICS), attribute_pool, other_task_text, other_task_mc,
                             dataset)
    cfg.update({k: v for k, v in extra.items() if k != "attribute_pool"})
    EvalConfig(**cfg)  # bad settings fail here, before the model is loaded
    meth.check_mode(mode)
    check_batched(meth, mode, batch_size)
    meth.precheck_hparams(hparams, overrides)
    handle = o.load(model, dtype, device, device_map, random_init, trust_remote_code, no_memory_check)
    summary, _ = api.run(handle, meth, requests, dataset_info=info, seed=seed, hparams_file=hparams,
                         overrides=overrides, out_dir=run_dir, resume=resume, max_length=max_length,
                         attribute_pool=extra.get("attribute_pool"), **cfg)
    o.print_summary(summary, run_dir)


@app.command(cls=_Command)
def apply(model: str = o.ModelOpt, patch: str = typer.Option(..., "--patch", metavar="DIR",
                                                           help="patch folder from --save-patch"),
          prompt: Optional[list[str]] = typer.Option(None, "--prompt", metavar="TEXT",
                                                     help="prompt to complete before/after (repeatable; default: "
                                                     "the patch's edit prompts)"),
          save: Optional[str] = typer.Option(None, "--save", metavar="DIR",
                                             help="write the edited model to this folder"),
          gen_tokens: int = o.GenOpt, chat: bool = o.ChatOpt, chat_prompt: str = o.ChatPromptOpt,
          dtype: Optional[str] = o.DtypeOpt, device: Optional[str] = o.DeviceOpt,
          device_map: Optional[str] = o.DeviceMapOpt, random_init: bool = o.RandomOpt,
          trust_remote_code: bool = o.TrustOpt, no_memory_check: bool = o.NoMemCheckOpt) -> None:
    """Apply a saved patch to a fresh model and show its effect (--chat: each prompt asked as a chat turn)."""
    o.one_process("apply")
    from medit.core.edit import apply_patch, patch_class
    from medit.core.patchfile import read_patch
    from medit.core.queries import GenQuery
    from medit.scoring.engine import Scorer

    o.at_least(gen_tokens, 1, "--gen-tokens", 8)
    chat_kw = o.chat_options(chat, chat_prompt)
    if save:
        o.check_new_folder(save, "--save")
    manifest, tensors = read_patch(patch)  # verified before the model loads
    get_plugins().methods.get(manifest["method"])
    patch_class(manifest)  # a kind this medit cannot read is refused before the model loads
    handle = o.load(model, dtype, device, device_map, random_init, trust_remote_code, no_memory_check)
    scorer = Scorer(handle)
    prompts = list(prompt or [r.get("prompt", "") for r in manifest.get("requests", []) if isinstance(r, dict)])
    asked = prompts
    if chat_kw:
        from medit.core.chat import chat_format
        fmt = chat_format(handle.tokenizer, chat_prompt, handle.model_id)
        asked = [fmt.wrap(p) for p in prompts]
    qs = [GenQuery(p, gen_tokens) for p in asked]
    before_edit = dict(zip(prompts, scorer.generate(qs)))
    ed = apply_patch(handle, manifest, tensors, where=patch)
    after = scorer.generate(qs, ed.transform_prompts)
    typer.echo(f"applied {ed.method} patch with {len(ed.requests)} edit(s) to {handle.model_id}")
    if prompts:
        typer.echo(o.tabulate([[p, o.shown(before_edit[p]), o.shown(a)] for p, a in zip(prompts, after)],
                            headers=["prompt", "before", "after"], tablefmt="simple", maxcolwidths=[40, 30, 30]))
    if save:
        handle.model.save_pretrained(save)
        handle.tokenizer.save_pretrained(save)
        typer.echo(f"edited model written to {save}")


@app.command(cls=_Command)
def train(method: str = o.MethodOpt, model: str = o.ModelOpt,
          data: str = typer.Option(..., "--data", metavar="DATASET",
                                   help="training edits: PATH or FORMAT:PATH (e.g. counterfact:train.json)"),
          val: Optional[str] = typer.Option(None, "--val", metavar="DATASET",
                                            help="validation edits (default: the last val_n cases of --data)"),
          out: str = typer.Option(..., "--out", metavar="DIR", help="checkpoint folder to write"),
          resume: bool = typer.Option(False, "--resume", help="continue the training checkpointed in --out"),
          max_steps: Optional[int] = typer.Option(None, "--max-steps", metavar="N",
                                                  help="cap the total number of steps (smoke runs)"),
          max_minutes: Optional[float] = typer.Option(None, "--max-minutes", metavar="MINUTES",
                                                      help="stop (validated and checkpointed) after this much wall time"),
          n: Optional[int] = typer.Option(None, "--n", metavar="N", help="use only the first N training cases"),
          val_n: Optional[int] = typer.Option(None, "--val-n", metavar="N", help="use only the first N --val cases"),
          skip_invalid: bool = o.SkipInvalidOpt, chat: bool = o.ChatOpt, chat_prompt: str = o.ChatPromptOpt,
          hparams: Optional[str] = o.HparamsOpt, set_: Optional[list[str]] = o.SetOpt,
          dtype: Optional[str] = o.DtypeOpt, device: Optional[str] = o.DeviceOpt,
          random_init: bool = o.RandomOpt, trust_remote_code: bool = o.TrustOpt,
          no_memory_check: bool = o.NoMemCheckOpt) -> None:
    """Train a learned editor (mend, ke, serac) for a model; writes a resumable checkpoint folder.
    With --chat it trains on the prompts wrapped as chat turns (then edit and eval with --chat too)."""
    o.one_process("train")
    from medit import api
    from medit.core.dataset import load_dataset
    from medit.core.hparams import parse_sets
    from medit.toolkit.training import train as run_training

    overrides = parse_sets(set_)
    meth = api.get_method(method)
    if not getattr(meth, "trainable", False):
        trainable = [e.name for e in get_plugins().methods if e.attr("trainable", False)]
        raise MeditError(f"method {method!r} is not trained; `medit train` takes one of {', '.join(trainable)}")
    if max_steps is not None and max_steps < 1:
        raise MeditError(f"--max-steps must be >= 1, got {max_steps}")
    o.at_least(max_minutes, 0.01, "--max-minutes", 30)
    o.at_least(n, 1, "--n", 1000)
    o.at_least(val_n, 1, "--val-n", 100)
    chat_kw = o.chat_options(chat, chat_prompt)
    if not resume and not (Path(out) / "manifest.json").is_file():
        o.check_new_folder(out, "--out")  # a checkpoint folder itself is refused (or resumed) by train
    meth.precheck_hparams(hparams, overrides)
    requests, info = load_dataset(data, n=n, skip_invalid=skip_invalid)
    val_reqs, val_info = load_dataset(val, n=val_n, skip_invalid=skip_invalid) if val else (None, None)
    handle = o.load(model, dtype, device, None, random_init, trust_remote_code, no_memory_check)
    if chat_kw:
        requests = api.chat_requests(handle, requests, chat_prompt)
        val_reqs = api.chat_requests(handle, val_reqs, chat_prompt) if val_reqs is not None else None
    hp = meth.resolve_hparams(handle, hparams, overrides)
    manifest = run_training(handle, meth, hp, requests, out, val=val_reqs, data_info=info, val_info=val_info,
                            max_steps=max_steps, max_minutes=max_minutes, resume=resume, log=typer.echo)
    best = manifest["best"]
    typer.echo(f"trained {meth.name} for {manifest['step']} step(s) ({manifest['stopped']}); best validation at "
               f"step {best['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in (best["metrics"] or {}).items()))
    typer.echo(f"checkpoint: {out}  (use: medit edit --method {meth.name} --checkpoint {out} ...)")
