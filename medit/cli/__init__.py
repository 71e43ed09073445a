"""The ``medit`` command line. Thin: parses options, calls :mod:`medit.api`, prints.

:mod:`medit.cli.app` is the Typer application, :mod:`medit.cli.options` what the commands share,
:mod:`medit.cli.editing` and :mod:`medit.cli.tools` the commands; plugins add theirs through the
``register_commands`` hook.
"""
from __future__ import annotations

import sys

from medit.cli import editing, tools  # noqa: F401 - importing them registers their commands
from medit.cli.app import app
from medit.plugin.manager import get_plugins

__all__ = ["app", "main"]


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
