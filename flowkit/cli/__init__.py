"""The ``flowkit`` command line: a click group, one module per command.

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
from flowkit.errors import FlowkitError


class FlowkitGroup(click.Group):
    """Turns flowkit errors into one clean paragraph and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
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


def get_plugins(ctx: click.Context):  # noqa: ANN201 - returns flowkit.plugins.Plugins
    """The one plugin manager of this invocation (entry points plus ``-p`` modules)."""
    from flowkit.plugins import make_plugins

    root = ctx.find_root()
    root.obj = root.obj or {}
    if "plugins" not in root.obj:
        extra = root.obj.get("plugin_modules", ())
        root.obj["plugins"] = _startup_plugins if (_startup_plugins and not extra) else make_plugins(extra=extra)
    return root.obj["plugins"]


_startup_plugins = None


def _add_commands() -> None:
    """The core's commands, then the plugins' (``flowkit_add_commands``: ``superres`` comes from
    the wavelet_flow plugin). Plugins are loaded for this, so a broken plugin is reported here."""
    from flowkit.cli import ablate, inspect_cmd, parts, plugins_cmd, run, sample
    from flowkit.plugins import make_plugins

    for module in (run, sample, ablate, inspect_cmd, parts, plugins_cmd):
        module.register(cli)
    global _startup_plugins
    _startup_plugins = make_plugins()
    _startup_plugins.pm.hook.flowkit_add_commands(cli=cli)


def main() -> None:
    try:
        _add_commands()
    except FlowkitError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    cli(prog_name="flowkit")
