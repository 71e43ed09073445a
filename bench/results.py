"""Run the declared `medit eval` runs and write docs/results.md from their run folders.

    .venv/bin/python bench/results.py                 # run what is missing, then write the page
    .venv/bin/python bench/results.py --only-render   # rebuild the page from existing run folders
    .venv/bin/python bench/results.py --dry-run       # print the command lines, run nothing
    .venv/bin/python bench/results.py --rows ft-l,rome --threads 2

The runs are declared in bench/results.yaml: one table ("setting") per group of rows, one row per
`medit eval` command line. Each row runs into <root>/<setting id>/<row id>/ (default root:
runs/results/). A row whose folder already holds summary.json is not run again, so an interrupted
invocation picks up where it stopped; a folder left without summary.json is continued with
`medit eval --resume`. Beside each run folder, <row id>.run.json records the command line, its exit
code, wall time and the machine (CPU count, torch version, threads).

The page is built only from what the run folders hold (manifest.json, summary.json) and those
records, so every number in it comes from a run and every row names the command that made it.
The script calls medit through its command line only, never its Python modules.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_DEV = SHARED_DATA / "counterfact" / "dev.json"
REPO_DEV = ROOT / "tests" / "data" / "counterfact-dev-300.json"

# (metric, protocol, column heading) of the table, in order
COLUMNS = [
    ("reliability", "generate", "rel generate"),
    ("reliability", "token_acc", "rel token_acc"),
    ("generalization", "generate", "gen generate"),
    ("generalization", "token_acc", "gen token_acc"),
    ("locality", "generate", "loc generate"),
    ("locality", "token_acc", "loc token_acc"),
    ("locality", "agreement", "loc agreement"),
    ("locality", "kl", "loc kl"),
]
# decimals of a protocol's cells (others: 3)
DIGITS = {"kl": 4, "perplexity": 2}


def rel(path: Path) -> str:
    """A path as written in a command line: relative to the repository root when it is in the
    repository or beside it (the benchmark data), else absolute."""
    if not path.is_absolute():
        return str(path)
    path = Path(os.path.abspath(path))
    if path.is_relative_to(ROOT.parent):
        return os.path.relpath(path, ROOT)
    return str(path)


def public(text: str) -> str:
    """Text for the page: the benchmark data folder is written $DATA (the README's "Benchmark data"
    section is the one place that names it)."""
    for prefix in (str(SHARED_DATA), rel(SHARED_DATA)):
        text = text.replace(prefix, "$DATA")
    return text


def placeholders() -> dict[str, str]:
    dev = SHARED_DEV if SHARED_DEV.is_file() else REPO_DEV
    return {"counterfact_dev": rel(dev)}


def load_config(path: Path) -> tuple[list[dict], str]:
    """The settings of the config file, and its page-level note (may be empty)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    settings = data.get("settings")
    if not isinstance(settings, list) or not settings:
        sys.exit(f"Error: {path}: no 'settings' list")
    seen = set()
    for s in settings:
        for key in ("id", "title", "args", "rows"):
            if key not in s:
                sys.exit(f"Error: {path}: setting {s.get('id', '?')!r} has no {key!r}")
        if s["id"] in seen:
            sys.exit(f"Error: {path}: setting id {s['id']!r} appears twice")
        seen.add(s["id"])
        ids = set()
        for r in s["rows"]:
            if "method" not in r:
                sys.exit(f"Error: {path}: a row of setting {s['id']!r} has no 'method'")
            r.setdefault("id", r["method"])
            if r["id"] in ids:
                sys.exit(f"Error: {path}: row id {r['id']!r} appears twice in setting {s['id']!r}")
            ids.add(r["id"])
    return settings, " ".join(str(data.get("note") or "").split())


def command(setting: dict, row: dict, out_dir: Path, threads: int) -> tuple[list[str], dict[str, str]]:
    """argv (after `medit`) and the environment variables the row runs with."""
    subs = placeholders()
    args = ["eval", "--method", row["method"]]
    args += [str(a).format(**subs) for a in setting["args"]]
    args += [str(a).format(**subs) for a in row.get("args", [])]
    args += ["--out", rel(out_dir)]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return args, env


def command_line(args: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={v}" for k, v in env.items()] + ["medit"] + [shlex.quote(a) for a in args])


def machine(threads: int) -> dict:
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - the venv always has torch
        torch_version = None
    return {"cpus": os.cpu_count(), "threads": threads, "torch": torch_version,
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def git_state() -> dict | None:
    """The checkout the run used: commit, and whether the working tree had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": dirty}


def medit_bin() -> str:
    exe = Path(sys.executable).parent / "medit"
    return str(exe) if exe.exists() else "medit"


def run_row(setting: dict, row: dict, root: Path, threads: int, dry_run: bool) -> bool:
    out_dir = root / setting["id"] / row["id"]
    record_path = root / setting["id"] / f"{row['id']}.run.json"
    args, env = command(setting, row, out_dir, threads)
    line = command_line(args, env)
    label = f"{setting['id']}/{row['id']}"
    if row.get("skip"):
        print(f"[skip] {label}: {row['skip']}")
        return True
    if (out_dir / "summary.json").is_file():
        print(f"[done] {label}")
        return True
    resume = out_dir.is_dir() and (out_dir / "manifest.json").is_file()
    argv = args + (["--resume"] if resume else [])
    print(f"[run]  {label}{' (resuming)' if resume else ''}\n       {line}", flush=True)
    if dry_run:
        return True
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    proc = subprocess.run([medit_bin(), *argv], cwd=ROOT, env={**os.environ, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    attempts = previous.get("attempts", []) + [{
        "started": started, "wall_s": round(wall, 1), "rc": proc.returncode, "resume": resume,
        "machine": machine(threads), "git": git_state()}]
    record = {"command": line, "argv": ["medit", *args], "env": env, "attempts": attempts}
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tail = "\n".join(proc.stdout.strip().splitlines()[-12:])
    if proc.returncode != 0:
        print(f"[fail] {label}: exit {proc.returncode} after {wall:.0f} s\n{tail}", flush=True)
        return False
    print(f"[ok]   {label}: {wall:.0f} s", flush=True)
    return True


# ------------------------------------------------------------------------------------- rendering
def fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def value(summary: dict, metric: str, protocol: str, stage: str):
    return summary.get("metrics", {}).get(metric, {}).get(protocol, {}).get(stage)


def read_run(root: Path, setting: dict, row: dict) -> dict | None:
    out_dir = root / setting["id"] / row["id"]
    summary_p, manifest_p = out_dir / "summary.json", out_dir / "manifest.json"
    if not summary_p.is_file():
        return None
    summary = json.loads(summary_p.read_text(encoding="utf-8"))
    manifest = json.loads(manifest_p.read_text(encoding="utf-8")) if manifest_p.is_file() else {}
    record_p = root / setting["id"] / f"{row['id']}.run.json"
    record = json.loads(record_p.read_text(encoding="utf-8")) if record_p.is_file() else {}
    return {"summary": summary, "manifest": manifest, "record": record}


def render(settings: list[dict], root: Path, threads: int, note: str = "") -> str:
    out: list[str] = []
    w = out.append
    w("# Results")
    w("")
    w("<!-- Generated by bench/results.py from the run folders under "
      f"{rel(root)}/; edit bench/results.yaml or the script, not this page. -->")
    w("")
    w("Every row below is one `medit eval` run, made by `bench/results.py` from the rows declared in")
    w("`bench/results.yaml`; the command under each table reproduces it from the repository root. Each")
    w("cell is the mean over the run's cases **after** the edit, under the protocol its column names")
    w("(see [metrics.md](metrics.md)); `loc kl` is in nats, lower is better. The \"unedited model\" row")
    w("gives the same scores before any edit (shown when every run of the table measured the same")
    w("ones; locality `agreement` and `kl` compare with it, so they have none). Edit seconds are")
    w("`edit_s_mean` (the method's edit alone, no one-time setup); run seconds are `eval_s_total`")
    w("(the whole run in that process). Times depend on the machine and what else ran on it, so")
    w("compare them within one table only. One case moves a mean by 1/n, so a table of few cases is")
    w("a smoke-level comparison.")
    w("")
    w("`$DATA` in the commands is the benchmark data folder (README, \"Benchmark data\"). Without it")
    w("the script reads the same cases from `tests/data/counterfact-dev-300.json` (its first 300")
    w("records). Rebuild: `.venv/bin/python bench/results.py` (runs only what is missing, then")
    w("rewrites this page); `--only-render` rewrites it from the existing run folders.")
    w("")
    if note:
        w(note)
        w("")
    for setting in settings:
        runs = [(row, read_run(root, setting, row)) for row in setting["rows"]]
        w(f"## {setting['title']}")
        w("")
        if setting.get("why"):
            w(" ".join(str(setting["why"]).split()))
            w("")
        done = [(row, r) for row, r in runs if r is not None]
        columns = [tuple(c) for c in setting.get("columns", COLUMNS)]
        head = ["method", "model", "mode", "n"] + [c[2] for c in columns] + ["edit s/case", "run s"]
        w("| " + " | ".join(head) + " |")
        w("|" + "|".join([" --- "] * 4 + [" ---: "] * (len(head) - 4)) + "|")
        if done:
            pre_row = unedited_row(done, columns)
            if pre_row:
                w(pre_row)
        for row, r in runs:
            if r is None:
                why = row.get("skip") or "not run yet"
                w(f"| {row['method']} | | | | " + " | ".join([""] * len(columns)) + f" | | {why} |")
                continue
            s = r["summary"]
            cells = [s.get("method", row["method"]), s.get("model", ""), s.get("mode", ""), str(s.get("n", ""))]
            for metric, protocol, _ in columns:
                digits = DIGITS.get(protocol, 3)
                cells.append(fmt(value(s, metric, protocol, "post"), digits))
            eff = s.get("efficiency", {})
            cells += [fmt(eff.get("edit_s_mean"), 2), fmt(eff.get("eval_s_total"), 0)]
            w("| " + " | ".join(cells) + " |")
        w("")
        skipped = [row for row, r in runs if r is None and row.get("skip")]
        for row in skipped:
            w(f"- `{row['method']}` was not run: {row['skip']}")
        if skipped:
            w("")
        w("Why each row:")
        w("")
        for row, _ in runs:
            w(f"- `{row['id']}`: {' '.join(str(row.get('why', '')).split())}")
        w("")
        w("Commands (from the repository root; `medit` is `.venv/bin/medit`):")
        w("")
        w("```sh")
        for row, r in runs:
            if r is not None and r["record"].get("command"):
                w(public(r["record"]["command"]))
            else:
                args, env = command(setting, row, root / setting["id"] / row["id"], threads)
                w(public(command_line(args, env)) + ("   # not run" if r is None else ""))
        w("```")
        w("")
        w(provenance(done))
        w("")
    return "\n".join(out).rstrip() + "\n"


def unedited_row(done: list, columns: list) -> str | None:
    """The pre-edit scores, when every run of the table measured the same ones."""
    cells = []
    for metric, protocol, _ in columns:
        pres = {None if (v := value(r["summary"], metric, protocol, "pre")) is None else round(v, 3)
                for _, r in done}
        if len(pres) > 1:
            return None
        (p,) = pres
        cells.append(fmt(p, DIGITS.get(protocol, 3)))
    n = {r["summary"].get("n") for _, r in done}
    return "| *unedited model* | | | " + (str(n.pop()) if len(n) == 1 else "") + " | " + " | ".join(cells) + " | | |"


def provenance(done: list) -> str:
    if not done:
        return "No run of this table has finished yet."
    starts = sorted(r["manifest"].get("start_time", "") for _, r in done if r["manifest"].get("start_time"))
    ends = sorted(r["manifest"].get("end_time", "") for _, r in done if r["manifest"].get("end_time"))
    versions = sorted({r["manifest"].get("medit_version", "?") for _, r in done})
    machines, gits = [], []
    for _, r in done:
        attempts = r["record"].get("attempts") or []
        if attempts:
            machines.append(attempts[-1]["machine"])
            if attempts[-1].get("git"):
                g = attempts[-1]["git"]
                gits.append(g["commit"] + (" with uncommitted changes" if g.get("dirty") else ""))
    devices = sorted({f"{r['manifest'].get('model', {}).get('device', '?')}, "
                      f"{r['manifest'].get('model', {}).get('dtype', '?').replace('torch.', '')}" for _, r in done})
    datasets = sorted({f"{r['manifest'].get('dataset', {}).get('path', '?')} "
                       f"(fingerprint {r['manifest'].get('dataset', {}).get('fingerprint', '?')})" for _, r in done})
    parts = []
    if starts and ends:
        parts.append(f"Ran {starts[0][:16].replace('T', ' ')} to {ends[-1][:16].replace('T', ' ')} UTC")
    parts.append(f"medit {', '.join(versions)}" + (f" (checkout {', '.join(sorted(set(gits)))})" if gits else "")
                 + f"; model on {'; '.join(devices)}")
    if machines:
        cpus = sorted({str(x.get("cpus")) for x in machines})
        threads = sorted({str(x.get("threads")) for x in machines})
        torches = sorted({str(x.get("torch")) for x in machines})
        plats = sorted({f"{x.get('machine')}, Python {x.get('python')}" for x in machines})
        loads = [x.get("load_avg", [None])[0] for x in machines if x.get("load_avg")]
        parts.append(f"{'/'.join(cpus)} CPUs ({'; '.join(plats)}), {'/'.join(threads)} torch thread(s), "
                     f"torch {', '.join(torches)}")
        if loads:
            parts.append(f"1-minute load average when each run started: {min(loads):.1f} to {max(loads):.1f}")
    parts.append(public(f"cases from {'; '.join(datasets)}"))
    return "Provenance: " + "; ".join(parts) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "bench" / "results.yaml")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "results", help="where the run folders go")
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md", help="the page to write")
    ap.add_argument("--rows", default=None, help="comma list of row ids (or SETTING/ROW) to run; default all")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each run [1]")
    ap.add_argument("--only-render", action="store_true", help="run nothing; rebuild the page from the run folders")
    ap.add_argument("--dry-run", action="store_true", help="print the command lines, run nothing, write nothing")
    args = ap.parse_args()

    settings, note = load_config(args.config)
    root = args.root if args.root.is_absolute() else (Path.cwd() / args.root)
    wanted = set(args.rows.split(",")) if args.rows else None
    ok = True
    if not args.only_render:
        for setting in settings:
            for row in setting["rows"]:
                if wanted and row["id"] not in wanted and f"{setting['id']}/{row['id']}" not in wanted:
                    continue
                ok = run_row(setting, row, root, args.threads, args.dry_run) and ok
    if args.dry_run:
        return
    args.page.parent.mkdir(parents=True, exist_ok=True)
    args.page.write_text(render(settings, root, args.threads, note), encoding="utf-8")
    print(f"wrote {rel(args.page)}")
    if not ok:
        sys.exit("some runs failed (see above); rerun to continue them")


if __name__ == "__main__":
    main()
