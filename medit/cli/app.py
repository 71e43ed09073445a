"""The ``medit`` Typer application: typed medit errors and usage errors as one-line messages,
and help as a user reads it. Commands are added by :mod:`medit.cli.editing` and
:mod:`medit.cli.tools` (and by plugins, see :mod:`medit.cli`)."""
from __future__ import annotations

import sys
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _click_errors  # type: ignore[no-redef]

from medit.core import distributed
from medit.errors import MeditError


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
