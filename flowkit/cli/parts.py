"""``flowkit parts [KIND [NAME]]``: the reference of registered parts, built from their code.

- no argument: every kind of part and its registered names;
- ``KIND``: the parts of that kind, with summary, plugin and package;
- ``KIND NAME``: the Params of that part (name, type, default, doc) and an example TOML table.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from flowkit.cli.console import console
from flowkit.recipes.toml_write import toml_value
from flowkit.cli.public import get_plugins
from flowkit.kinds import KINDS
from flowkit.params import PartRef
from flowkit.recipes.schema import field_types, type_name
from flowkit.registry import Part, Registries


def field_records(params_cls: type) -> list[dict[str, Any]]:
    """One record per Params field: name, type, kind (nested parts), required, default, doc.

    ``default`` is the TOML value (a nested part is ``{"use": name}``), ``None`` when required.
    """
    types = field_types(params_cls)
    records = []
    for f in dataclasses.fields(params_cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if isinstance(default, PartRef):
            default = f.metadata.get("default_table") or default.to_toml()
        elif isinstance(default, tuple):
            default = list(default)
        required = default is dataclasses.MISSING
        records.append({
            "name": f.name,
            "type": type_name(types[f.name]),
            "kind": f.metadata.get("kind"),
            "required": required,
            "default": None if required else default,
            "doc": f.metadata.get("doc", ""),
        })
    return records


def example_toml(part: Part) -> str:
    """A recipe table that selects ``part`` with every parameter at its default."""
    header = KINDS[part.kind].example if part.kind in KINDS else f"model.{part.kind}"
    if header is None:  # no recipe table names one: show the table a part that builds it validates
        lines = [f'# {part.kind} "{part.name}" with its defaults. No recipe table names a {part.kind}: the parts',
                 f'# that use one build it by name (in Python: flowkit.build("{part.kind}", "{part.name}", ...)).',
                 f'use = "{part.name}"']
    else:
        lines = [f'# {part.kind} "{part.name}" with its defaults; the table name depends on the recipe.',
                 f"[{header}]", f'use = "{part.name}"']
    for record in field_records(part.params):
        if record["required"]:
            lines.append(f"# {record['name']} = ...  (required: {record['type']})")
        else:
            lines.append(f"{record['name']} = {toml_value(record['default'])}")
    return "\n".join(lines)


def show_default(record: dict[str, Any]) -> str:
    return "(required)" if record["required"] else toml_value(record["default"])


def show_type(record: dict[str, Any]) -> str:
    return f"{record['kind']} part" if record["kind"] else record["type"]


def _part_record(part: Part) -> dict[str, Any]:
    return {"kind": part.kind, "name": part.name, "summary": part.summary, "plugin": part.plugin,
            "package": part.distribution, "version": part.version}


def _list_kinds(registries: Registries, as_json: bool) -> None:
    kinds = {kind: registries[kind].names() for kind in registries.kinds()}
    if as_json:
        click.echo(json.dumps(kinds, indent=2))
        return
    table = Table(title="Kinds of part", title_justify="left")
    table.add_column("Kind", style="bold", overflow="fold")
    table.add_column("Registered names")
    for kind, names in kinds.items():
        table.add_row(kind, ", ".join(names) or "[dim](none)[/]")
    console.print(table)
    console.print("Details: [bold]flowkit parts KIND[/] and [bold]flowkit parts KIND NAME[/].")


def _list_parts(registries: Registries, kind: str, as_json: bool) -> None:
    parts = list(registries[kind])
    if as_json:
        click.echo(json.dumps([_part_record(p) for p in parts], indent=2))
        return
    table = Table(title=f"Registered {kind} parts", title_justify="left")
    table.add_column("Name", style="bold", overflow="fold")
    table.add_column("Summary", overflow="fold")
    table.add_column("Plugin", overflow="fold")
    table.add_column("Package", overflow="fold")
    for p in parts:
        package = f"{p.distribution} {p.version}".strip()
        table.add_row(p.name, escape(p.summary), p.plugin, escape(package))
    console.print(table)


def _show_part(registries: Registries, kind: str, name: str, as_json: bool) -> None:
    part = registries.part(kind, name)
    records = field_records(part.params)
    example = example_toml(part)
    if as_json:
        click.echo(json.dumps({**_part_record(part), "params": records, "example": example}, indent=2))
        return
    package = f"{part.distribution} {part.version}".strip()
    console.print(f"[bold]{kind} {name}[/]: {escape(part.summary)}")
    console.print(f"Plugin {escape(part.plugin)}, package {escape(package)}.")
    if records:
        table = Table(title="Parameters", title_justify="left")
        table.add_column("Name", style="bold", overflow="fold")
        table.add_column("Type", overflow="fold")
        table.add_column("Default", overflow="fold")
        table.add_column("Description", overflow="fold")
        for record in records:
            table.add_row(record["name"], escape(show_type(record)), escape(show_default(record)),
                          escape(record["doc"]))
        console.print(table)
    else:
        console.print("No parameters.")
    console.print("\nExample recipe table:")
    # Plain print: the TOML must stay copyable, without markup or wrapping.
    console.print(example, markup=False, highlight=False, soft_wrap=True)


@click.command()
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def parts(ctx: click.Context, kind: str | None, name: str | None, as_json: bool) -> None:
    """List the registered parts, or show the parameters of one.

    \b
      flowkit parts                     every kind of part and its names
      flowkit parts coupling            the couplings, with plugin and package
      flowkit parts coupling affine     the parameters of "affine" and an example table
    """
    registries = get_plugins(ctx).registries
    if kind is None:
        _list_kinds(registries, as_json)
    elif name is None:
        _list_parts(registries, kind, as_json)
    else:
        _show_part(registries, kind, name, as_json)


def register(cli: click.Group) -> None:
    cli.add_command(parts)
