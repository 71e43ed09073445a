"""A fast CLI: the commands that only read metadata import neither torch nor transformers, with
every installed plugin (the example plugin included) registered. Each command runs in a fresh
interpreter, through ``medit.cli.main`` with ``sys.argv`` set, and ``sys.modules`` is read after it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

COMMANDS = [["--help"], ["version"], ["list", "methods"], ["list", "models"], ["list", "metrics"],
            ["list", "datasets"], ["plugins"], ["edit", "--help"]]
HEAVY = ("torch", "transformers")

PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    argv = json.loads(sys.argv[1])
    sys.argv = ["medit", *argv]
    from medit.cli import main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    print(json.dumps({"code": code, "heavy": heavy, "out": out.getvalue(), "err": err.getvalue()}))
""")


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_metadata_commands_import_no_torch(argv):
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["code"] == 0, got["err"]
    assert not got["heavy"], f"`medit {' '.join(argv)}` imported {got['heavy']}"
    if argv == ["list", "methods"]:  # a third-party plugin is registered, and still costs no torch
        assert "rank-one-example" in got["out"] and "rome" in got["out"]
    if argv == ["list", "models"]:
        assert "smollm2-135m" in got["out"]


def test_importing_the_cli_imports_no_torch():
    res = subprocess.run([sys.executable, "-c", "import sys, medit.cli; print(sorted(m for m in "
                          f"{HEAVY!r} if m in sys.modules))"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
