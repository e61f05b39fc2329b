"""The ``flowkit`` command line: a click group whose commands, the core's and the plugins', all
arrive through the ``flowkit_add_commands`` hook (`flowkit.cli.commands`: one module per command;
`flowkit.cli.public`: what a command may use).

Library code raises `FlowkitError`; only this package turns it into a message and an exit
code (2 for bad input, 1 for run-time failures), with a traceback only when asked
(``--traceback`` or ``FLOWKIT_DEBUG=1``).
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click
from rich.markup import escape

from flowkit.cli.console import err_console, traceback_requested
from flowkit.cli.public import set_startup_plugins, startup_plugins, warn_broken
from flowkit.errors import FlowkitError


class FlowkitGroup(click.Group):
    """Turns flowkit errors into one clean paragraph and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from flowkit.runs.signals import RunInterrupted

        try:
            return super().invoke(ctx)
        except RunInterrupted as exc:  # not an error: the one line says how to continue
            err_console.print(f"[bold yellow]{escape(str(exc))}[/]", soft_wrap=True)
            sys.exit(exc.exit_code)
        except FlowkitError as exc:
            if traceback_requested():
                traceback.print_exc()
            err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)


@click.group(cls=FlowkitGroup)
@click.option("--traceback", is_flag=True, help="Show the full traceback of errors.")
@click.option("-p", "plugin_modules", multiple=True, metavar="MODULE",
              help="Load an extra plugin module for this command (repeatable).")
@click.version_option(package_name="flowkit")
@click.pass_context
def cli(ctx: click.Context, traceback: bool, plugin_modules: tuple[str, ...]) -> None:
    """flowkit: normalizing flows on images, assembled from plugins."""
    ctx.obj = {"plugin_modules": plugin_modules}


def _add_commands() -> None:
    """Loads the plugins and adds every command through ``flowkit_add_commands``: the core's
    (`flowkit.cli.commands`, registered first), then the plugins' (``superres`` comes from the
    wavelet_flow plugin). The register hooks run here too, so a broken plugin is reported once."""
    from flowkit.cli import commands
    from flowkit.plugins import make_plugins

    plugins = make_plugins(builtin=(commands,))
    plugins.registries  # noqa: B018 - runs the register hooks: a plugin that raises is broken
    plugins.add_commands(cli)
    set_startup_plugins(plugins)


def main() -> None:
    try:
        _add_commands()
    except FlowkitError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    warn_broken(startup_plugins())
    cli(prog_name="flowkit")
