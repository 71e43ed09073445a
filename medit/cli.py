"""The ``medit`` command line. Thin: parses options, calls :mod:`medit.api`, prints."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _click_errors  # type: ignore[no-redef]

from medit import __version__
from medit.core import distributed
from medit.errors import MeditError, UnknownNameError, ValidationError
from medit.plugin.manager import KINDS, get_plugins


# Imported on use, so `medit --help` and `medit version` start without them (tabulate
# alone costs ~20 ms; tests/test_startup.py keeps torch out of every metadata command).
def tabulate(*args: Any, **kw: Any) -> str:
    from tabulate import tabulate as _tabulate
    return str(_tabulate(*args, **kw))


def check_out_dir(*args: Any, **kw: Any) -> Any:
    from medit.evaluation.rundir import check_out_dir as _check
    return _check(*args, **kw)


def check_patch_path(*args: Any, **kw: Any) -> Any:
    from medit.evaluation.rundir import check_patch_path as _check
    return _check(*args, **kw)


class _Group(TyperGroup):
    """Turns typed medit errors and usage errors into one-line ``Error:`` messages with exit code 2
    (no traceback, no boxed panel), and prints the help for a bare ``medit`` (exit 0)."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_errors.UsageError as exc:
            ctx = exc.ctx
            where = f"medit {ctx.info_name}" if ctx is not None and ctx.parent is not None else "medit"
            given = _given_value(sys.argv[1:] if args is None else list(args), getattr(exc, "param", None))
            shown = f" (got {given!r})" if given is not None else ""
            typer.echo(f"Error: {exc.format_message()}{shown} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except _click_errors.ClickException as exc:
            typer.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """List each command with the whole first paragraph of its help, wrapped (click would cut
        it at the first full stop or about 45 characters)."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, " ".join((cmd.help or "").strip().split("\n\n")[0].split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: Any) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                distributed.stop()  # a torchrun rank's process group (nothing without one)
        except MeditError as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted; results written so far are kept (continue with --resume).", err=True)
            raise typer.Exit(130) from None


def _one_process(command: str) -> None:
    """Refuse a command that does not split work across torchrun ranks when launched as one of
    several: every rank would run all of it."""
    world = distributed.world()
    if world > 1:
        raise MeditError(f"WORLD_SIZE={world}: medit {command} runs in one process and does not split its work "
                         "across torchrun ranks; run it without torchrun (only eval, edit and stats run as ranks)")


def _ranks(out: Optional[str], device_map: Optional[str], out_needed: bool = True) -> None:
    """Checks for a launch as one of several torchrun ranks, before anything is loaded: one model
    per rank (no --device-map), and one run folder all ranks name."""
    world = distributed.world()
    if world <= 1:
        return
    if device_map:
        raise MeditError(f"WORLD_SIZE={world}: --device-map {device_map} spreads one model over a node's devices, "
                         "but under torchrun each rank loads its own model on cuda:LOCAL_RANK; drop --device-map, or "
                         "run one process with --device-map auto")
    if out_needed and not out:
        raise MeditError(f"WORLD_SIZE={world}: name the run folder with --out so that every torchrun rank writes "
                         "into the same one")


def _no_type_label(ctx: Any) -> None:
    return None


class _Command(TyperCommand):
    """Help as a user reads it: ``Usage: medit edit [OPTIONS] FILE`` (recent typer versions brace
    the argument) and no ``<str>`` / ``<bool>`` labels beside arguments and flags, whose metavar or
    name already says what they take."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p[1:].replace("}", "", 1) if p.startswith("{") else p for p in super().collect_usage_pieces(ctx)]

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "param_type_name", "") == "argument" or getattr(p, "is_flag", False):
                p.display_type_rich = _no_type_label
        return params


def _given_value(args: list[str], param: Any) -> Optional[str]:
    """What the user wrote for ``param`` on the command line (the parser's message omits it)."""
    if param is None or not getattr(param, "opts", None) or getattr(param, "is_flag", False):
        return None
    for i, arg in enumerate(args):
        for opt in param.opts:
            if arg == opt and i + 1 < len(args):
                return str(args[i + 1])
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
    return None


# Plain help text (rich_markup_mode=None): rendering it with rich imports ~80 ms of modules on
# every `medit --help`, more than the rest of medit's start-up together.
app = typer.Typer(cls=_Group, add_completion=False, invoke_without_command=True, rich_markup_mode=None,
                  help="medit: edit facts in language models, measure the edit, save and undo it.")


@app.callback()
def _root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:  # a bare `medit` shows the help and succeeds
        typer.echo(ctx.get_help())

# ---------------------------------------------------------------- shared options
ModelOpt = typer.Option(..., "--model", "-m", metavar="MODEL",
                        help="alias (see `medit list models`), hub id, local folder or .gguf file")
MethodOpt = typer.Option(..., "--method", metavar="NAME", help="editing method (see `medit list methods`)")
HparamsOpt = typer.Option(None, "--hparams", metavar="FILE",
                          help="YAML file of hyperparameters (default: the method's file for this model)")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="override one hyperparameter: key=value (repeatable)")
DtypeOpt = typer.Option(None, "--dtype", metavar="DTYPE", help="float32 (default), float16 or bfloat16")
DeviceOpt = typer.Option(None, "--device", metavar="DEVICE", help="cpu, cuda, cuda:N (default: cuda if available)")
DeviceMapOpt = typer.Option(None, "--device-map", metavar="MAP", help="'auto' to shard a big model over devices")
RandomOpt = typer.Option(False, "--random-init",
                         help="random weights from the model's config (tests, speed benchmarks)")
TrustOpt = typer.Option(False, "--trust-remote-code", help="allow model code from the hub (off by default)")
NoMemCheckOpt = typer.Option(False, "--no-memory-check",
                             help="load the model even when its memory estimate exceeds the free memory")
ProtoOpt = typer.Option(None, "--protocol", metavar="LIST",
                        help="comma list of answer,generate,token_acc,exact,prob (default: all but answer; "
                        "with --chat all)")
OutOpt = typer.Option(None, "--out", metavar="DIR", help="run folder (default: a new folder under runs/)")
GenOpt = typer.Option(8, "--gen-tokens", metavar="N", help="max new tokens for the generate protocol")
CorpusOpt = typer.Option(None, "--stats-corpus", metavar="CORPUS",
                         help="text/JSONL corpus (or HF dataset name[:config]) for covariance statistics (default: "
                         "the WikiText-2 text medit ships)")
CheckpointOpt = typer.Option(None, "--checkpoint", metavar="DIR",
                             help="trained editor folder from `medit train` (mend, ke, serac)")
ChatOpt = typer.Option(False, "--chat", help="ask every prompt as a user turn of the tokenizer's chat template "
                       "(instruct models); targets are scored as the start of the answer")
ChatPromptOpt = typer.Option("Complete the sentence: {prompt}", "--chat-prompt", metavar="TEXT",
                             help="with --chat: the user message a cloze prompt becomes ({prompt} is the prompt; "
                             "questions ending in ? are asked as they are)")
AnswerOpt = typer.Option(24, "--answer-tokens", metavar="N",
                         help="max new tokens of the answer protocol's full answer")
AttrPoolOpt = typer.Option(None, "--attribute-pool", metavar="DATASET",
                           help="attribute metric: dataset file (FORMAT:PATH) whose other records of an edited "
                           "subject give its other facts (repeatable; default: the evaluated file)")
OtherTextOpt = typer.Option(None, "--other-task-text", metavar="FILE",
                            help="other_task metric: held-out text for perplexity, one paragraph per line "
                            "(default: the WikiText-2 test sample medit ships)")
OtherMcOpt = typer.Option(None, "--other-task-mc", metavar="FILE",
                          help="other_task metric: two-choice task in PIQA's JSONL format (goal, sol1, sol2, "
                          "label) to score accuracy on")
SkipInvalidOpt = typer.Option(False, "--skip-invalid",
                              help="leave invalid dataset records out (one warning counts them) instead of stopping "
                              "at one the selection includes")


def _route(method: Any, overrides: dict[str, Any], field: str, value: Any, flag: str, unused: str) -> dict[str, Any]:
    """Put a CLI flag's ``value`` into the method's ``field`` hparam, refusing methods without it."""
    if value is None or value is False:
        return overrides
    if field not in method.hparams_class.field_names():
        raise MeditError(f"method {method.name!r} {unused}; drop {flag}")
    return {**overrides, field: value}


def _method_flags(method: Any, overrides: dict[str, Any], corpus: Optional[str],
                  checkpoint: Optional[str]) -> dict[str, Any]:
    """Route --stats-corpus and --checkpoint into the method's hparams."""
    overrides = _route(method, overrides, "stats_corpus", corpus, "--stats-corpus", "uses no covariance statistics")
    overrides = _route(method, overrides, "checkpoint", checkpoint, "--checkpoint", "uses no trained editor")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise MeditError(f"checkpoint folder {checkpoint!r} does not exist; pass the --out folder of `medit train`")
    return overrides


def _chat_options(chat: bool, chat_prompt: str, answer_tokens: int | None = None) -> dict[str, Any]:
    """--chat, --chat-prompt and --answer-tokens as EvalConfig keywords, checked before the model loads."""
    from medit.core.chat import DEFAULT_CHAT_PROMPT
    _at_least(answer_tokens, 1, "--answer-tokens", 24)
    if "{prompt}" not in chat_prompt:
        raise MeditError(f"--chat-prompt {chat_prompt!r} has no {{prompt}} placeholder; write e.g. "
                         f"--chat-prompt {DEFAULT_CHAT_PROMPT!r}")
    if chat_prompt != DEFAULT_CHAT_PROMPT and not chat:
        raise MeditError("--chat-prompt sets the user message of --chat, which is off; add --chat or drop --chat-prompt")
    kw: dict[str, Any] = {"chat": chat, "chat_prompt": chat_prompt} if chat else {}
    if answer_tokens is not None:
        kw["answer_tokens"] = answer_tokens
    return kw


def _metric_flags(metrics: tuple[str, ...], pool: Optional[list[str]], text: Optional[str], mc: Optional[str],
                  default_pool: str, implied: bool = False) -> tuple[tuple[str, ...], dict[str, Any]]:
    """--attribute-pool / --other-task-text / --other-task-mc as (metrics, api.run keywords),
    checked (files read) before the model loads. With ``implied`` (``medit edit``, which has no
    --metrics) a flag adds its metric; otherwise the metric must be among ``metrics``."""
    kw: dict[str, Any] = {}
    for flag, given, metric in (("--attribute-pool", pool, "attribute"), ("--other-task-text", text, "other_task"),
                                ("--other-task-mc", mc, "other_task")):
        if given and metric not in metrics:
            if not implied:
                raise MeditError(f"{flag} is an option of the {metric} metric, which this run does not evaluate; "
                                 f"add {metric} to --metrics or drop {flag}")
            metrics = metrics + (metric,)
    if "other_task" in metrics:
        opts = {k: v for k, v in (("text", text), ("mc", mc)) if v}
        get_plugins().metrics.get("other_task").configure(**opts)  # a bad file fails here
        if opts:
            kw["metric_options"] = {"other_task": opts}
    if "attribute" in metrics:
        from medit.plugins.metrics.attribute import load_attribute_pool
        kw["attribute_pool"] = load_attribute_pool(pool or [default_pool])
    return metrics, kw


def _at_least(value: Optional[float], minimum: float, flag: str, example: Any) -> None:
    """Refuse a numeric option below its range, naming it and a valid value."""
    if value is not None and value < minimum:
        raise MeditError(f"{flag} {value} must be at least {minimum}; pass e.g. {flag} {example}")


def _check_new_folder(path: str, flag: str) -> None:
    """Refuse a destination folder that holds anything: medit writes only into new or empty ones."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise MeditError(f"{flag} {path!r} already exists and is not an empty folder; choose a new folder")


def _load(model: str, dtype: Optional[str], device: Optional[str], device_map: Optional[str],
          random_init: bool, trust_remote_code: bool, no_memory_check: bool = False) -> Any:
    from medit.model.loading import load_model
    if distributed.world() > 1:  # a torchrun rank: join the group, take this rank's device
        device = distributed.start(device)
        if not distributed.is_main():  # rank 0 prints the results
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    return load_model(model, dtype=dtype, device=device, device_map=device_map,
                      random_init=random_init, trust_remote_code=trust_remote_code,
                      memory_check=not no_memory_check)


def _protocols(spec: Optional[str]) -> dict[str, Any]:
    """``--protocol`` as EvalConfig keywords, checked before any model is loaded."""
    if not spec:
        return {}
    from medit.core.metric import PROTOCOLS
    protos = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [p for p in protos if p not in PROTOCOLS]
    if bad:
        raise UnknownNameError("protocol", bad[0], PROTOCOLS, hint="pass a comma list to --protocol")
    if not protos:
        raise MeditError(f"--protocol {spec!r} names no protocol; pass some of {', '.join(PROTOCOLS)}")
    return {"protocols": protos}


def _shown(text: Optional[str]) -> str:
    """A completion for a table cell: stripped, newlines and control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in (text or "").strip())


def _print_completions(summary: dict[str, Any]) -> None:
    # the request's own prompt (a chat run's model read it inside the template); the full answer
    # when the answer protocol ran
    rows = [[c["case_id"], c["request"]["prompt"], c["request"]["target_new"],
             _shown(c[k]["pre"]), _shown(c[k]["post"])]
            for c in summary["cases"] for k in ("answer" if c.get("answer") else "generated",) if c.get(k)]
    if rows:
        typer.echo(tabulate(rows, headers=["case", "prompt", "target", "before", "after"], tablefmt="simple",
                            maxcolwidths=[8, 40, 16, 30, 30]))
        typer.echo("")


def _report(summary: dict[str, Any], out: Path) -> None:
    from medit.evaluation.summary import summary_table
    typer.echo(summary_table(summary))
    typer.echo(f"results: {out}/summary.json, {out}/cases.jsonl")


# ---------------------------------------------------------------- commands
@app.command(cls=_Command)
def edit(file: str = typer.Argument(..., metavar="FILE",
                                    help="edits: medit JSONL or any registered dataset format (FORMAT:PATH)"),
         method: str = MethodOpt, model: str = ModelOpt, hparams: Optional[str] = HparamsOpt,
         set_: Optional[list[str]] = SetOpt,
         mode: Optional[str] = typer.Option(None, "--mode", metavar="MODE",
                                            help="batch or sequential (default: batch when the method can)"),
         save_patch: Optional[str] = typer.Option(None, "--save-patch", metavar="DIR",
                                                  help="write the edit as a patch folder"),
         force: bool = typer.Option(False, "--force", help="let --save-patch replace an existing medit patch"),
         out: Optional[str] = OutOpt, protocol: Optional[str] = ProtoOpt, gen_tokens: int = GenOpt,
         stats_corpus: Optional[str] = CorpusOpt, checkpoint: Optional[str] = CheckpointOpt,
         chat: bool = ChatOpt, chat_prompt: str = ChatPromptOpt, answer_tokens: int = AnswerOpt,
         skip_invalid: bool = SkipInvalidOpt,
         attribute_pool: Optional[list[str]] = AttrPoolOpt, other_task_text: Optional[str] = OtherTextOpt,
         other_task_mc: Optional[str] = OtherMcOpt,
         dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt, device_map: Optional[str] = DeviceMapOpt,
         random_init: bool = RandomOpt, trust_remote_code: bool = TrustOpt,
         no_memory_check: bool = NoMemCheckOpt) -> None:
    """Apply the edits in FILE, show before/after completions and metrics, optionally save a patch.
    --attribute-pool, --other-task-text and --other-task-mc add the attribute / other_task metric."""
    from medit import api
    from medit.core.dataset import load_dataset
    from medit.core.hparams import parse_sets

    overrides = parse_sets(set_)
    api.check_edit_mode(mode)
    _ranks(out, device_map, out_needed=False)  # torchrun: all ranks apply the one edit together
    _at_least(gen_tokens, 1, "--gen-tokens", 8)
    protos = _protocols(protocol)
    protos.update(_chat_options(chat, chat_prompt, answer_tokens))
    run_dir = Path(out) if out else api.default_run_dir("edit", method)
    check_out_dir(run_dir, resume=False)
    if save_patch:
        check_patch_path(save_patch, run_dir, force)
    elif force:
        raise MeditError("--force lets --save-patch replace an existing patch; add --save-patch DIR or drop --force")
    requests, info = load_dataset(file, skip_invalid=skip_invalid)
    from medit.evaluation.engine import DEFAULT_METRICS
    metrics, extra = _metric_flags(DEFAULT_METRICS, attribute_pool, other_task_text, other_task_mc, file,
                                   implied=True)
    if metrics != DEFAULT_METRICS:
        extra["metrics"] = metrics
    meth = api.get_method(method)
    if mode:
        meth.check_mode(mode)
    overrides = _method_flags(meth, overrides, stats_corpus, checkpoint)
    meth.precheck_hparams(hparams, overrides)
    handle = _load(model, dtype, device, device_map, random_init, trust_remote_code, no_memory_check)
    main = distributed.is_main()  # under torchrun rank 0 writes the run folder and the patch
    with distributed.shared():  # every rank applies the same edit; its target vectors are split
        summary, _ = api.edit(handle, meth, requests, dataset_info=info, mode=mode,
                              save_patch=save_patch if main else None, force=force, hparams_file=hparams,
                              overrides=overrides, out_dir=run_dir if main else None, gen_tokens=gen_tokens,
                              progress=main, **protos, **extra)
    _print_completions(summary)
    _report(summary, run_dir)
    if save_patch:
        typer.echo(f"patch: {summary['patch']}")


@app.command("eval", cls=_Command)
def eval_(method: str = MethodOpt, model: str = ModelOpt,
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
          hparams: Optional[str] = HparamsOpt, set_: Optional[list[str]] = SetOpt,
          protocol: Optional[str] = ProtoOpt, gen_tokens: int = GenOpt, stats_corpus: Optional[str] = CorpusOpt,
          checkpoint: Optional[str] = CheckpointOpt, chat: bool = ChatOpt, chat_prompt: str = ChatPromptOpt,
          answer_tokens: int = AnswerOpt, skip_invalid: bool = SkipInvalidOpt,
          metrics: Optional[str] = typer.Option(None, "--metrics", metavar="LIST",
                                                help="comma list of metrics (default: reliability, generalization, "
                                                "locality, portability, efficiency; opt-in: fluency, attribute, "
                                                "distracting, other_task)"),
          attribute_pool: Optional[list[str]] = AttrPoolOpt, other_task_text: Optional[str] = OtherTextOpt,
          other_task_mc: Optional[str] = OtherMcOpt,
          out: Optional[str] = OutOpt, resume: bool = typer.Option(False, "--resume",
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
          dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt, device_map: Optional[str] = DeviceMapOpt,
          random_init: bool = RandomOpt, trust_remote_code: bool = TrustOpt,
          no_memory_check: bool = NoMemCheckOpt) -> None:
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
        _ranks(out, device_map)
    _at_least(gen_tokens, 1, "--gen-tokens", 8)
    _at_least(n, 1, "--n", 20)
    _at_least(offset, 0, "--offset", 0)
    run_dir = Path(out) if out else api.default_run_dir("eval", method)
    check_out_dir(run_dir, resume)
    requests, info = load_dataset(dataset, n=n, offset=offset, seed=seed,  # fail fast, before loading the model
                                  skip_invalid=skip_invalid)
    meth = api.get_method(method)
    overrides = _method_flags(meth, overrides, stats_corpus, checkpoint)
    cfg: dict[str, Any] = {"mode": mode, "batch_size": batch_size, "gen_tokens": gen_tokens, **_protocols(protocol),
                           "also_immediate": also_immediate, "score_batch_size": score_batch_size,
                           "monitor_every": monitor_every, "stop_on_collapse": stop_on_collapse,
                           "collapse_threshold": collapse_threshold,
                           "score_cache": not no_score_cache, **_chat_options(chat, chat_prompt, answer_tokens),
                           "progress": distributed.is_main()}
    if metrics:
        for name in (m.strip() for m in metrics.split(",")):
            get_plugins().metrics.get(name)
        cfg["metrics"] = tuple(m.strip() for m in metrics.split(","))
    from medit.evaluation.engine import DEFAULT_METRICS, EvalConfig, check_batched
    _, extra = _metric_flags(cfg.get("metrics", DEFAULT_METRICS), attribute_pool, other_task_text, other_task_mc,
                             dataset)
    cfg.update({k: v for k, v in extra.items() if k != "attribute_pool"})
    EvalConfig(**cfg)  # bad settings fail here, before the model is loaded
    meth.check_mode(mode)
    check_batched(meth, mode, batch_size)
    meth.precheck_hparams(hparams, overrides)
    handle = _load(model, dtype, device, device_map, random_init, trust_remote_code, no_memory_check)
    summary, _ = api.run(handle, meth, requests, dataset_info=info, seed=seed, hparams_file=hparams,
                         overrides=overrides, out_dir=run_dir, resume=resume,
                         attribute_pool=extra.get("attribute_pool"), **cfg)
    _report(summary, run_dir)


@app.command(cls=_Command)
def apply(model: str = ModelOpt, patch: str = typer.Option(..., "--patch", metavar="DIR",
                                                           help="patch folder from --save-patch"),
          prompt: Optional[list[str]] = typer.Option(None, "--prompt", metavar="TEXT",
                                                     help="prompt to complete before/after (repeatable; default: "
                                                     "the patch's edit prompts)"),
          save: Optional[str] = typer.Option(None, "--save", metavar="DIR",
                                             help="write the edited model to this folder"),
          gen_tokens: int = GenOpt, chat: bool = ChatOpt, chat_prompt: str = ChatPromptOpt,
          dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt,
          device_map: Optional[str] = DeviceMapOpt, random_init: bool = RandomOpt,
          trust_remote_code: bool = TrustOpt, no_memory_check: bool = NoMemCheckOpt) -> None:
    """Apply a saved patch to a fresh model and show its effect (--chat: each prompt asked as a chat turn)."""
    _one_process("apply")
    from medit.core.edit import apply_patch, patch_class
    from medit.core.patchfile import read_patch
    from medit.core.queries import GenQuery
    from medit.scoring.engine import Scorer

    _at_least(gen_tokens, 1, "--gen-tokens", 8)
    chat_kw = _chat_options(chat, chat_prompt)
    if save:
        _check_new_folder(save, "--save")
    manifest, tensors = read_patch(patch)  # verified before the model loads
    get_plugins().methods.get(manifest["method"])
    patch_class(manifest)  # a kind this medit cannot read is refused before the model loads
    handle = _load(model, dtype, device, device_map, random_init, trust_remote_code, no_memory_check)
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
        typer.echo(tabulate([[p, _shown(before_edit[p]), _shown(a)] for p, a in zip(prompts, after)],
                            headers=["prompt", "before", "after"], tablefmt="simple", maxcolwidths=[40, 30, 30]))
    if save:
        handle.model.save_pretrained(save)
        handle.tokenizer.save_pretrained(save)
        typer.echo(f"edited model written to {save}")


@app.command(cls=_Command)
def train(method: str = MethodOpt, model: str = ModelOpt,
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
          skip_invalid: bool = SkipInvalidOpt, chat: bool = ChatOpt, chat_prompt: str = ChatPromptOpt,
          hparams: Optional[str] = HparamsOpt, set_: Optional[list[str]] = SetOpt,
          dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt,
          random_init: bool = RandomOpt, trust_remote_code: bool = TrustOpt,
          no_memory_check: bool = NoMemCheckOpt) -> None:
    """Train a learned editor (mend, ke, serac) for a model; writes a resumable checkpoint folder.
    With --chat it trains on the prompts wrapped as chat turns (then edit and eval with --chat too)."""
    _one_process("train")
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
    _at_least(max_minutes, 0.01, "--max-minutes", 30)
    _at_least(n, 1, "--n", 1000)
    _at_least(val_n, 1, "--val-n", 100)
    chat_kw = _chat_options(chat, chat_prompt)
    if not resume and not (Path(out) / "manifest.json").is_file():
        _check_new_folder(out, "--out")  # a checkpoint folder itself is refused (or resumed) by train
    meth.precheck_hparams(hparams, overrides)
    requests, info = load_dataset(data, n=n, skip_invalid=skip_invalid)
    val_reqs, val_info = load_dataset(val, n=val_n, skip_invalid=skip_invalid) if val else (None, None)
    handle = _load(model, dtype, device, None, random_init, trust_remote_code, no_memory_check)
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


@app.command(cls=_Command)
def stats(model: str = ModelOpt,
          layers: str = typer.Option(..., "--layers", metavar="LIST", help="comma list of layer indices, e.g. 4,5,6"),
          corpus: str = typer.Option(..., "--corpus", metavar="CORPUS",
                                     help="text/JSONL file (one paragraph per line) or HF dataset name"),
          samples: int = typer.Option(1000, "--samples", metavar="N", help="corpus paragraphs to use"),
          max_len: int = typer.Option(128, "--max-len", metavar="N", help="tokens per paragraph (truncation)"),
          stats_dtype: str = typer.Option("float32", "--stats-dtype", metavar="DTYPE",
                                          help="accumulation dtype: float32 or float64"),
          tf32: bool = typer.Option(True, "--tf32/--no-tf32",
                                    help="on CUDA, TF32 matrix products for the corpus pass"),
          dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt,
          random_init: bool = RandomOpt, trust_remote_code: bool = TrustOpt,
          no_memory_check: bool = NoMemCheckOpt) -> None:
    """Precompute the key covariance statistics of the MLP rewrite layers (one pass for all layers)."""
    from medit.toolkit.stats import cache_file, second_moments

    try:
        idx = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise MeditError(f"--layers {layers!r} is not a comma list of integers; write e.g. --layers 4,5,6") from None
    handle = _load(model, dtype, device, None, random_init, trust_remote_code, no_memory_check)
    with distributed.shared():  # torchrun: each rank streams its share of the corpus
        result, seconds = second_moments(handle, idx, corpus, samples, max_len, stats_dtype, tf32=tf32,
                                         progress=distributed.is_main())
    rows = [[layer, str(cache_file(handle, layer, corpus, samples, max_len, stats_dtype, tf32)), tuple(m.shape)]
            for layer, m in sorted(result.items())]
    typer.echo(tabulate(rows, headers=["layer", "file", "shape"], tablefmt="simple"))
    typer.echo(f"computed in {seconds:.1f} s" if seconds else "all layers were cached")


@app.command(cls=_Command)
def corpus(facts: str = typer.Option(..., "--facts", metavar="DATASET",
                                     help="dataset whose true facts to add (FORMAT:PATH), "
                                     "e.g. counterfact:train.json"),
           out: str = typer.Option(..., "--out", metavar="FILE",
                                   help="the corpus file to write (one sample per line)"),
           exclude: Optional[list[str]] = typer.Option(None, "--exclude", metavar="DATASET",
                                                       help="dataset you will evaluate on: "
                                                       "cases sharing a subject with it are left out (repeatable)"),
           text: Optional[str] = typer.Option(None, "--text", metavar="FILE",
                                              help="text corpus whose paragraphs come first"),
           text_n: int = typer.Option(1000, "--text-n", metavar="N", help="paragraphs of --text to take"),
           facts_n: Optional[int] = typer.Option(None, "--facts-n", metavar="N",
                                                 help="most fact lines to take (default all)")) -> None:
    """Write a statistics corpus: text paragraphs, then true facts from a dataset's training split."""
    _one_process("corpus")
    from medit.toolkit.fact_corpus import build_corpus, write_corpus

    lines, counts = build_corpus(facts, exclude or [], text, text_n, facts_n)
    path = write_corpus(lines, out)
    typer.echo(tabulate([[k, v] for k, v in counts.items()], headers=["", "count"], tablefmt="simple"))
    typer.echo(f"wrote {path}: {len(lines)} samples; use it with --stats-corpus {path} --set stats_samples={len(lines)}")


@app.command(cls=_Command)
def locate(data: str = typer.Argument(..., metavar="DATASET",
                                      help="edits: medit JSONL or any registered dataset format (FORMAT:PATH)"),
           method: str = MethodOpt, model: str = ModelOpt,
           n: Optional[int] = typer.Option(None, "--n", metavar="N", help="number of cases"),
           offset: int = typer.Option(0, "--offset", metavar="N", help="skip this many cases first"),
           skip_invalid: bool = SkipInvalidOpt,
           hparams: Optional[str] = HparamsOpt, set_: Optional[list[str]] = SetOpt,
           dtype: Optional[str] = DtypeOpt, device: Optional[str] = DeviceOpt,
           random_init: bool = RandomOpt, trust_remote_code: bool = TrustOpt,
           no_memory_check: bool = NoMemCheckOpt) -> None:
    """Print the neurons a locating method (e.g. kn) finds for each case, without editing."""
    _one_process("locate")
    from medit import api
    from medit.core.dataset import load_dataset
    from medit.core.hparams import parse_sets

    overrides = parse_sets(set_)
    meth = api.get_method(method)
    if not callable(getattr(meth, "locate", None)):
        raise MeditError(f"method {method!r} does not locate neurons; use a locating method such as kn")
    requests, _ = load_dataset(data, n=n, offset=offset, skip_invalid=skip_invalid)
    handle = _load(model, dtype, device, None, random_init, trust_remote_code, no_memory_check)
    from medit.model.guards import check_lengths
    check_lengths(handle, requests)
    hp = meth.resolve_hparams(handle, hparams, overrides)
    rows = [[r.case_id, nrn.layer, nrn.index, f"{nrn.attribution:.6g}"]
            for r in requests for nrn in meth.locate(handle, r, hp)]
    typer.echo(tabulate(rows, headers=["case", "layer", "neuron", "attribution"], tablefmt="simple"))


@app.command(cls=_Command)
def plugins(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List loaded plugins, their distribution and version, and what each registers."""
    p = get_plugins()
    rows = [{"plugin": i.name, "distribution": i.dist, "version": i.version,
             "registers": {k: v for k, v in i.registered.items()}} for i in sorted(p.info, key=lambda i: (i.dist != "medit", i.name))]
    if as_json:
        typer.echo(json.dumps({"plugins": rows, "problems": p.problems}, indent=2))
        return
    table = [[r["plugin"], r["distribution"], r["version"],
              "; ".join(f"{k}: {', '.join(v)}" for k, v in r["registers"].items())] for r in rows]
    typer.echo(tabulate(table, headers=["plugin", "distribution", "version", "registers"], tablefmt="simple"))


@app.command("list", cls=_Command)
def list_(kind: str = typer.Argument(..., metavar="KIND", help="methods, models, metrics or datasets"),
          as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List registered methods, model families (with aliases), metrics or dataset formats."""
    if kind not in KINDS:
        raise MeditError(f"cannot list {kind!r}; choose one of {', '.join(KINDS)}")
    reg = get_plugins().registries[kind]
    rows = []
    for e in reg:
        row = {"name": e.name, "description": e.description, "plugin": e.plugin, "distribution": e.dist}
        if kind == "models":
            row["model_types"] = ", ".join(e.obj.model_types)
            row["aliases"] = ", ".join(a.name for a in e.obj.aliases)
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    cols = ["name", "description"] + (["model_types", "aliases"] if kind == "models" else []) + ["distribution"]
    typer.echo(tabulate([[r[c] for c in cols] for r in rows], headers=cols, tablefmt="simple",
                        maxcolwidths=[None, 60] + [None] * (len(cols) - 2)))


@app.command(cls=_Command)
def report(run_dirs: list[str] = typer.Argument(..., metavar="RUN_DIR",
                                                help="run folders written by `medit eval/edit --out`"),
           out: Optional[str] = typer.Option(None, "--out", metavar="DIR",
                                             help="write report.md, report.json, report.png (bars) and "
                                             "tradeoff.png (reliability against locality) here"),
           fmt: str = typer.Option("table", "--format", metavar="FORMAT",
                                   help="what to print: table, markdown or json"),
           misses: bool = typer.Option(False, "--misses", help="list each run's cases that score below 1 on a "
                                       "check, with what the method reported about their edit"),
           miss_on: Optional[list[str]] = typer.Option(None, "--miss-on", metavar="METRIC.PROTOCOL",
                                                       help="a check for --misses (repeatable; default "
                                                       "reliability.token_acc and locality.agreement)")) -> None:
    """Compare finished runs side by side: metrics × protocols per run (post-edit means, with pre)."""
    from medit.evaluation.report import FORMATS, build_report, load_runs, render, write_report

    if fmt not in FORMATS:
        raise UnknownNameError("report format", fmt, FORMATS, hint="pass --format table, markdown or json")
    if misses or miss_on:
        if out:
            raise ValidationError("--out writes the comparison report, not --misses; drop --out and redirect "
                                  "the listing instead (e.g. --misses --format json > misses.json)")
        from medit.evaluation.misses import DEFAULT_CHECKS, parse_checks, render_misses
        typer.echo(render_misses(load_runs(run_dirs), parse_checks(miss_on or DEFAULT_CHECKS), fmt))
        return
    rep = build_report(load_runs(run_dirs))
    typer.echo(render(rep, fmt))
    if out:
        files = write_report(rep, out)
        typer.echo("report: " + ", ".join(str(f) for f in files), err=True)


@app.command(cls=_Command)
def version() -> None:
    """Print the medit version."""
    typer.echo(__version__)


def _register_plugin_commands() -> None:
    """Let plugins add commands; one that fails is reported in one line and skipped."""
    from medit.plugin.manager import _one_line
    for impl in get_plugins().pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=app)
        except Exception as exc:  # a broken plugin must never take the CLI down
            print(f"medit: warning: plugin {impl.plugin_name!r} failed in register_commands and was "
                  f"skipped: {_one_line(exc)}", file=sys.stderr)


_register_plugin_commands()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
