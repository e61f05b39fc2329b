"""``flowkit inspect RECIPE``: the model a recipe builds, without data or training."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from flowkit.cli.console import console
from flowkit.cli.public import get_plugins


def _shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not C,H,W (e.g. 3,32,32).", param_hint="--shape") from None
    if min(c, h, w) < 1:
        raise click.BadParameter(f"{text!r}: every size must be >= 1.", param_hint="--shape")
    return c, h, w


def register(cli: click.Group) -> None:
    @cli.command(name="inspect")
    @click.argument("recipe", type=click.Path(path_type=Path))
    @click.option("--preset", help="A preset of the recipe (e.g. paper).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
    @click.option("--shape", help="Image shape C,H,W (default: read from the dataset).")
    @click.option("--no-memory", is_flag=True, help="Skip the activation-memory estimate (a forward pass).")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object: shape, params, parts, memory, recipe.")
    @click.pass_context
    def inspect_command(ctx: click.Context, recipe: Path, preset: str | None, overrides: tuple[str, ...],
                        shape: str | None, no_memory: bool, as_json: bool) -> None:
        """Build the model and dequantizer of RECIPE (no data read with --shape, no training) and
        print the parameters per part, the activation memory of one image, and the resolved recipe."""
        from flowkit.recipes.load import load_recipe
        from flowkit.runs.inspect import inspect

        plugins = get_plugins(ctx)
        resolved = load_recipe(recipe, plugins.registries, preset=preset, overrides=overrides)
        result = inspect(resolved, plugins, shape=_shape(shape), memory=not no_memory)
        if as_json:
            click.echo(json.dumps({**result.to_dict(), "recipe": resolved.to_dict()}, indent=2))
            return
        table = Table(title=f"{resolved.meta.name}" + (f" --preset {preset}" if preset else "") +
                      f" on images {result.shape}")
        table.add_column("part")
        table.add_column("parameters", justify="right")
        for name, n in result.parts.items():
            table.add_row(escape(name), f"{n:,}")
        table.add_row("[bold]total", f"[bold]{result.params:,}")
        console.print(table)
        if result.activation_bytes_per_image is not None:
            console.print(f"activation memory of a training step: about "
                          f"{result.activation_bytes_per_image / 2**20:.1f} MiB per image (outputs of every layer "
                          "in one forward pass; a lower bound)")
        console.print(escape(resolved.to_toml()), soft_wrap=True, highlight=False)
