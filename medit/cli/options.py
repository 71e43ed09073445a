"""What the ``medit`` commands share: their common options, the checks every command runs before
a model loads, model loading (torchrun ranks included) and the printed results."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medit.core import distributed
from medit.errors import MeditError, UnknownNameError
from medit.plugin.manager import get_plugins


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


def one_process(command: str) -> None:
    """Refuse a command that does not split work across torchrun ranks when launched as one of
    several: every rank would run all of it."""
    world = distributed.world()
    if world > 1:
        raise MeditError(f"WORLD_SIZE={world}: medit {command} runs in one process and does not split its work "
                         "across torchrun ranks; run it without torchrun (only eval, edit and stats run as ranks)")


def check_ranks(out: Optional[str], device_map: Optional[str], out_needed: bool = True) -> None:
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
MaxLenOpt = typer.Option(None, "--max-length", metavar="N",
                         help="refuse prompts and targets longer than N tokens (default and most: the model's "
                         "context length)")
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


def route(method: Any, overrides: dict[str, Any], field: str, value: Any, flag: str, unused: str) -> dict[str, Any]:
    """Put a CLI flag's ``value`` into the method's ``field`` hparam, refusing methods without it."""
    if value is None or value is False:
        return overrides
    if field not in method.hparams_class.field_names():
        raise MeditError(f"method {method.name!r} {unused}; drop {flag}")
    return {**overrides, field: value}


def method_flags(method: Any, overrides: dict[str, Any], corpus: Optional[str],
                  checkpoint: Optional[str]) -> dict[str, Any]:
    """Route --stats-corpus and --checkpoint into the method's hparams."""
    overrides = route(method, overrides, "stats_corpus", corpus, "--stats-corpus", "uses no covariance statistics")
    if corpus is not None:  # a missing file fails here, not after the model has loaded
        from medit.toolkit.stats import Corpus
        Corpus(corpus).check()
    overrides = route(method, overrides, "checkpoint", checkpoint, "--checkpoint", "uses no trained editor")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise MeditError(f"checkpoint folder {checkpoint!r} does not exist; pass the --out folder of `medit train`")
    return overrides


def chat_options(chat: bool, chat_prompt: str, answer_tokens: int | None = None) -> dict[str, Any]:
    """--chat, --chat-prompt and --answer-tokens as EvalConfig keywords, checked before the model loads."""
    from medit.core.chat import DEFAULT_CHAT_PROMPT
    at_least(answer_tokens, 1, "--answer-tokens", 24)
    if "{prompt}" not in chat_prompt:
        raise MeditError(f"--chat-prompt {chat_prompt!r} has no {{prompt}} placeholder; write e.g. "
                         f"--chat-prompt {DEFAULT_CHAT_PROMPT!r}")
    if chat_prompt != DEFAULT_CHAT_PROMPT and not chat:
        raise MeditError("--chat-prompt sets the user message of --chat, which is off; add --chat or drop --chat-prompt")
    kw: dict[str, Any] = {"chat": chat, "chat_prompt": chat_prompt} if chat else {}
    if answer_tokens is not None:
        kw["answer_tokens"] = answer_tokens
    return kw


def metric_flags(metrics: tuple[str, ...], pool: Optional[list[str]], text: Optional[str], mc: Optional[str],
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


def at_least(value: Optional[float], minimum: float, flag: str, example: Any) -> None:
    """Refuse a numeric option below its range, naming it and a valid value."""
    if value is not None and value < minimum:
        raise MeditError(f"{flag} {value} must be at least {minimum}; pass e.g. {flag} {example}")


def check_new_folder(path: str, flag: str) -> None:
    """Refuse a destination folder that holds anything: medit writes only into new or empty ones."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise MeditError(f"{flag} {path!r} already exists and is not an empty folder; choose a new folder")


def load(model: str, dtype: Optional[str], device: Optional[str], device_map: Optional[str],
          random_init: bool, trust_remote_code: bool, no_memory_check: bool = False) -> Any:
    from medit.model.loading import load_model
    if distributed.world() > 1:  # a torchrun rank: join the group, take this rank's device
        device = distributed.start(device)
        if not distributed.is_main():  # rank 0 prints the results
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    return load_model(model, dtype=dtype, device=device, device_map=device_map,
                      random_init=random_init, trust_remote_code=trust_remote_code,
                      memory_check=not no_memory_check)


def protocols(spec: Optional[str]) -> dict[str, Any]:
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


def shown(text: Optional[str]) -> str:
    """A completion for a table cell: stripped, newlines and control characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in (text or "").strip())


def print_completions(summary: dict[str, Any]) -> None:
    # the request's own prompt (a chat run's model read it inside the template); the full answer
    # when the answer protocol ran
    rows = [[c["case_id"], c["request"]["prompt"], c["request"]["target_new"],
             shown(c[k]["pre"]), shown(c[k]["post"])]
            for c in summary["cases"] for k in ("answer" if c.get("answer") else "generated",) if c.get(k)]
    if rows:
        typer.echo(tabulate(rows, headers=["case", "prompt", "target", "before", "after"], tablefmt="simple",
                            maxcolwidths=[8, 40, 16, 30, 30]))
        typer.echo("")


def print_summary(summary: dict[str, Any], out: Path) -> None:
    from medit.evaluation.summary import summary_table
    typer.echo(summary_table(summary))
    typer.echo(f"results: {out}/summary.json, {out}/cases.jsonl")
