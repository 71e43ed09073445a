"""The commands around editing: ``stats``, ``corpus``, ``locate``, ``plugins``, ``list``,
``report``, ``version``."""
from __future__ import annotations

import json
from typing import Optional

import typer

from medit import __version__
from medit.cli import options as o
from medit.cli.app import _Command, app
from medit.core import distributed
from medit.errors import MeditError, UnknownNameError, ValidationError
from medit.plugin.manager import KINDS, get_plugins


@app.command(cls=_Command)
def stats(model: str = o.ModelOpt,
          layers: str = typer.Option(..., "--layers", metavar="LIST", help="comma list of layer indices, e.g. 4,5,6"),
          corpus: str = typer.Option(..., "--corpus", metavar="CORPUS",
                                     help="text/JSONL file (one paragraph per line) or HF dataset name"),
          samples: int = typer.Option(1000, "--samples", metavar="N", help="corpus paragraphs to use"),
          max_len: int = typer.Option(128, "--max-len", metavar="N", help="tokens per paragraph (truncation)"),
          stats_dtype: str = typer.Option("float32", "--stats-dtype", metavar="DTYPE",
                                          help="accumulation dtype: float32 or float64"),
          tf32: bool = typer.Option(True, "--tf32/--no-tf32",
                                    help="on CUDA, TF32 matrix products for the corpus pass"),
          dtype: Optional[str] = o.DtypeOpt, device: Optional[str] = o.DeviceOpt,
          random_init: bool = o.RandomOpt, trust_remote_code: bool = o.TrustOpt,
          no_memory_check: bool = o.NoMemCheckOpt) -> None:
    """Precompute the key covariance statistics of the MLP rewrite layers (one pass for all layers)."""
    from medit.toolkit.stats import cache_file, second_moments

    try:
        idx = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise MeditError(f"--layers {layers!r} is not a comma list of integers; write e.g. --layers 4,5,6") from None
    handle = o.load(model, dtype, device, None, random_init, trust_remote_code, no_memory_check)
    with distributed.shared():  # torchrun: each rank streams its share of the corpus
        result, seconds = second_moments(handle, idx, corpus, samples, max_len, stats_dtype, tf32=tf32,
                                         progress=distributed.is_main())
    rows = [[layer, str(cache_file(handle, layer, corpus, samples, max_len, stats_dtype, tf32)), tuple(m.shape)]
            for layer, m in sorted(result.items())]
    typer.echo(o.tabulate(rows, headers=["layer", "file", "shape"], tablefmt="simple"))
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
                                                 help="most fact lines to take (default all)"),
           force: bool = typer.Option(False, "--force", help="let --out replace an existing file")) -> None:
    """Write a statistics corpus: text paragraphs, then true facts from a dataset's training split."""
    o.one_process("corpus")
    from medit.toolkit.fact_corpus import build_corpus, check_corpus_target, write_corpus

    check_corpus_target(out, force)

    lines, counts = build_corpus(facts, exclude or [], text, text_n, facts_n)
    path = write_corpus(lines, out)
    typer.echo(o.tabulate([[k, v] for k, v in counts.items()], headers=["", "count"], tablefmt="simple"))
    typer.echo(f"wrote {path}: {len(lines)} samples; use it with --stats-corpus {path} --set stats_samples={len(lines)}")


@app.command(cls=_Command)
def locate(data: str = typer.Argument(..., metavar="DATASET",
                                      help="edits: medit JSONL or any registered dataset format (FORMAT:PATH)"),
           method: str = o.MethodOpt, model: str = o.ModelOpt,
           n: Optional[int] = typer.Option(None, "--n", metavar="N", help="number of cases"),
           offset: int = typer.Option(0, "--offset", metavar="N", help="skip this many cases first"),
           skip_invalid: bool = o.SkipInvalidOpt,
           hparams: Optional[str] = o.HparamsOpt, set_: Optional[list[str]] = o.SetOpt,
           dtype: Optional[str] = o.DtypeOpt, device: Optional[str] = o.DeviceOpt,
           random_init: bool = o.RandomOpt, trust_remote_code: bool = o.TrustOpt,
           no_memory_check: bool = o.NoMemCheckOpt) -> None:
    """Print the neurons a locating method (e.g. kn) finds for each case, without editing."""
    o.one_process("locate")
    from medit import api
    from medit.core.dataset import load_dataset
    from medit.core.hparams import parse_sets

    overrides = parse_sets(set_)
    meth = api.get_method(method)
    if not callable(getattr(meth, "locate", None)):
        raise MeditError(f"method {method!r} does not locate neurons; use a locating method such as kn")
    requests, _ = load_dataset(data, n=n, offset=offset, skip_invalid=skip_invalid)
    handle = o.load(model, dtype, device, None, random_init, trust_remote_code, no_memory_check)
    from medit.model.guards import check_lengths
    check_lengths(handle, requests)
    hp = meth.resolve_hparams(handle, hparams, overrides)
    rows = [[r.case_id, nrn.layer, nrn.index, f"{nrn.attribution:.6g}"]
            for r in requests for nrn in meth.locate(handle, r, hp)]
    typer.echo(o.tabulate(rows, headers=["case", "layer", "neuron", "attribution"], tablefmt="simple"))


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
    typer.echo(o.tabulate(table, headers=["plugin", "distribution", "version", "registers"], tablefmt="simple"))


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
    typer.echo(o.tabulate([[r[c] for c in cols] for r in rows], headers=cols, tablefmt="simple",
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
                                                       "reliability.token_acc and locality.agreement)"),
           force: bool = typer.Option(False, "--force", help="let --out replace report files that an earlier "
                                      "medit report did not write")) -> None:
    """Compare finished runs side by side: metrics × protocols per run (post-edit means, with pre)."""
    from medit.evaluation.report import FORMATS, build_report, check_report_dir, load_runs, render, write_report

    if fmt not in FORMATS:
        raise UnknownNameError("report format", fmt, FORMATS, hint="pass --format table, markdown or json")
    if misses or miss_on:
        if out:
            raise ValidationError("--out writes the comparison report, not --misses; drop --out and redirect "
                                  "the listing instead (e.g. --misses --format json > misses.json)")
        from medit.evaluation.misses import DEFAULT_CHECKS, parse_checks, render_misses
        typer.echo(render_misses(load_runs(run_dirs), parse_checks(miss_on or DEFAULT_CHECKS), fmt))
        return
    if out:
        check_report_dir(out, force)
    rep = build_report(load_runs(run_dirs))
    typer.echo(render(rep, fmt))
    if out:
        files = write_report(rep, out, force)
        typer.echo("report: " + ", ".join(str(f) for f in files), err=True)


@app.command(cls=_Command)
def version() -> None:
    """Print the medit version."""
    typer.echo(__version__)
