"""``flowkit plugins``: the installed plugins, their package and version, hooks and parts.

Built-in parts are entry-point plugins of package ``flowkit`` and are listed with the rest;
``-p MODULE`` plugins show the package "(not installed)". A broken plugin (its import failed,
a hook raised, or flowkit refused a part it registers) is listed as broken with the reason;
in the JSON its record has an ``error``.
"""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.table import Table

from flowkit.cli.console import console
from flowkit.cli.public import get_plugins


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON, one object per plugin.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List the installed plugins: package, version, hooks and the parts they register, and
    the broken ones with the reason."""
    rows = get_plugins(ctx).describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Plugins", title_justify="left")
    table.add_column("Plugin", style="bold", no_wrap=True)
    table.add_column("Package", overflow="fold")
    table.add_column("Hooks", overflow="fold")
    table.add_column("Parts", overflow="fold")
    for row in rows:
        package = f"{row['package']} {row['version']}".strip()
        if "error" in row:
            table.add_row(escape(row["name"]), escape(package), "[bold red]broken[/]", escape(row["error"]))
            continue
        # The table is short ("couplings", "affine"); the JSON has "flowkit_register_couplings"
        # and "coupling:affine".
        hooks = ", ".join(h.removeprefix("flowkit_").removeprefix("register_") for h in row["hooks"])
        parts = ", ".join(p.partition(":")[2] for p in row["parts"]) or "[dim](none)[/]"
        table.add_row(escape(row["name"]), escape(package), hooks, parts)
    console.print(table)
    broken = [row["name"] for row in rows if "error" in row]
    if broken:
        console.print(f"{len(broken)} broken plugin(s), not loaded: {escape(', '.join(broken))}. Recipes that use "
                      "their parts fail naming them; everything else works. Fix or uninstall them, or set "
                      f"FLOWKIT_DISABLE_PLUGINS={escape(','.join(broken))}.")


def register(cli: click.Group) -> None:
    cli.add_command(plugins)
