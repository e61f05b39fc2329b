"""The core's commands, added through ``flowkit_add_commands`` as a plugin's are.

The CLI registers this module with its plugin manager before the entry points
(`flowkit.plugins.make_plugins`, ``builtin``), so ``flowkit run`` and ``flowkit superres`` (the
wavelet_flow plugin's) reach the command group by the same hook; `flowkit plugins --all` lists it.
Each command lives in its own module, with a ``register(cli)`` that adds it.
"""

from __future__ import annotations

import click

from flowkit.cli import (
    ablate, bench_cmd, docs_cmd, inspect_cmd, parts, plugins_cmd, report_cmd, run, sample, score_cmd,
)
from flowkit.hookspecs import hookimpl

COMMAND_MODULES = (run, sample, score_cmd, report_cmd, ablate, inspect_cmd, bench_cmd, parts, plugins_cmd, docs_cmd)


@hookimpl
def flowkit_add_commands(cli: click.Group) -> None:
    for module in COMMAND_MODULES:
        module.register(cli)
