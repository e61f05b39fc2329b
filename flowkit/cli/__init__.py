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


def get_plugins(ctx: click.Context):  # noqa: ANN201 - returns flowkit.plugins.Plugins
    """The one plugin manager of this invocation (entry points plus ``-p`` modules)."""
    from flowkit.plugins import make_plugins

    root = ctx.find_root()
    root.obj = root.obj or {}
    if "plugins" not in root.obj:
        extra = root.obj.get("plugin_modules", ())
        if _startup_plugins and not extra:
            root.obj["plugins"] = _startup_plugins
        else:
            root.obj["plugins"] = make_plugins(extra=extra)
            warn_broken(root.obj["plugins"], already=_startup_plugins.broken if _startup_plugins else [])
    return root.obj["plugins"]


_startup_plugins = None


def _add_commands() -> None:
    """The core's commands, then the plugins' (``flowkit_add_commands``: ``superres`` comes from
    the wavelet_flow plugin). Plugins are loaded for this, so a broken plugin is reported here."""
    from flowkit.cli import ablate, bench_cmd, docs_cmd, inspect_cmd, parts, plugins_cmd, report_cmd, run, sample
    from flowkit.plugins import make_plugins

    for module in (run, sample, report_cmd, ablate, inspect_cmd, bench_cmd, parts, plugins_cmd, docs_cmd):
        module.register(cli)
    global _startup_plugins
    _startup_plugins = make_plugins()
    _startup_plugins.registries  # noqa: B018 - runs the register hooks: a plugin that raises is broken
    _startup_plugins.add_commands(cli)


def main() -> None:
    try:
        _add_commands()
    except FlowkitError as exc:
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    warn_broken(_startup_plugins)
    cli(prog_name="flowkit")


def warn_broken(plugins, already: list | None = None) -> None:  # noqa: ANN001 - flowkit.plugins.Plugins
    """One line on stderr per broken plugin (not in ``already``): the command goes on without it."""
    for broken in plugins.broken:
        if broken in (already or []):
            continue
        if traceback_requested():
            err_console.print(broken.detail, markup=False, highlight=False)
        err_console.print(f"[bold yellow]Warning:[/] {escape(broken.label)} {escape(broken.reason)} and is not "
                          "loaded; `flowkit plugins` lists it.", soft_wrap=True)
