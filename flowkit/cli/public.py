"""What a command may use, the core's commands and plugins' alike: the public surface of the CLI.

A plugin adds commands through the ``flowkit_add_commands`` hook (as the core's own commands do,
`flowkit.cli.commands`) and imports from this module only, never from the CLI's other modules::

    from flowkit.cli.public import console, get_plugins, load_trained, sampling_options

- `console`, `err_console`: the one rich Console of the CLI (stdout, stderr);
- `get_plugins(ctx)`: the plugin manager of this invocation (entry points plus ``-p`` modules);
- `load_trained(ctx, run_dir)`: a trained run's directory and session, latest weights loaded;
- `sampling_options`, `SamplingOptions`, `mcmc_progress`: the options every sampling command
  shares (``--n``, ``--temperature``, ``--seed``, ``--mcmc``...), declared once.

Library errors (`flowkit.FlowkitError`) raised in a command become a clean message and an exit
code (2 for bad input, 1 at run time); a command needs no error handling of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from flowkit.cli.console import console, err_console, progress_enabled, traceback_requested
from flowkit.cli.sampling_options import SamplingOptions, mcmc_progress, sampling_options

if TYPE_CHECKING:
    from flowkit.plugins import Plugins
    from flowkit.runs.rundir import RunDir
    from flowkit.runs.session import Session

__all__ = ["SamplingOptions", "console", "err_console", "get_plugins", "load_trained", "mcmc_progress",
           "progress_enabled", "sampling_options"]

#: The plugins loaded when the CLI started (to add the commands), reused by commands that
#: load no ``-p`` module of their own.
_startup: Plugins | None = None


def set_startup_plugins(plugins: Plugins) -> None:
    global _startup
    _startup = plugins


def startup_plugins() -> Plugins | None:
    return _startup


def get_plugins(ctx: click.Context) -> Plugins:
    """The one plugin manager of this invocation (entry points plus ``-p`` modules)."""
    from flowkit.plugins import make_plugins

    root = ctx.find_root()
    root.obj = root.obj or {}
    if "plugins" not in root.obj:
        extra = root.obj.get("plugin_modules", ())
        if _startup is not None and not extra:
            root.obj["plugins"] = _startup
        else:
            # The -p modules with the entry points, and the CLI's own commands as at startup.
            root.obj["plugins"] = make_plugins(extra=extra, builtin=_startup.builtin if _startup is not None else ())
            warn_broken(root.obj["plugins"], already=_startup.broken if _startup is not None else [])
    return root.obj["plugins"]


def load_trained(ctx: click.Context, run_dir: Path) -> tuple[RunDir, Session]:
    """`flowkit.runs.trained.load_trained` with this invocation's plugins: the run's recipe rebuilt
    and its latest weights loaded (each level from its own job for a directory of level jobs)."""
    from flowkit.runs.trained import load_trained as load

    return load(Path(run_dir), get_plugins(ctx))


def warn_broken(plugins: Plugins, already: list | None = None) -> None:
    """One line on stderr per broken plugin (not in ``already``): the command goes on without it."""
    for broken in plugins.broken:
        if broken in (already or []):
            continue
        if traceback_requested():
            err_console.print(broken.detail, markup=False, highlight=False)
        err_console.print(f"[bold yellow]Warning:[/] {escape(broken.label)} {escape(broken.reason)} and is not "
                          "loaded; `flowkit plugins` lists it.", soft_wrap=True)
