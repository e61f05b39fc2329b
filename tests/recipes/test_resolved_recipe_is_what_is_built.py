"""The resolved recipe is what runs: every value in it is the value a built part received, and a
value set explicitly either reaches the part it names or is refused.

Parts are built with a recording `Builder` (no training, no data beyond the image shape), which
logs the Params each part of the recipe was built from, under its recipe path (a copy of a
nested part has its index: ``model.step[3].coupling``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from flowkit.build import Builder
from flowkit.errors import FlowkitError, ShapeError
from flowkit.nn.guidance import Guidance
from flowkit.params import DERIVED, PartRef, declared_copies
from flowkit.plugins import make_plugins
from flowkit.recipes.load import Recipe, load_recipe, preset_names
from flowkit.recipes.schema import field_types
from flowkit.recipes.toml_write import toml_value
from flowkit.runs.session import build_model

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))
CASES = [(path, preset) for path in RECIPES for preset in [None, *preset_names(path)]]
#: Image shapes of datasets whose files are not part of the repository (paper presets).
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "npz": (3, 64, 64), "mnist_mosaic": (1, 256, 256)}


@pytest.fixture(scope="module")
def plugins():  # noqa: ANN201
    return make_plugins()


def build_recorded(plugins, recipe: Recipe) -> list[tuple[str, Any]]:  # noqa: ANN001
    build = Builder(plugins.registries)
    shape = SHAPES[recipe.data.use]
    build(recipe.dequantizer, in_shape=shape)
    # A class-conditional preset (data.labels) is built as a run builds it, for 10 classes.
    num_classes = 10 if recipe.data.params.labels else 0
    build_model(recipe, build, shape, num_classes, Guidance() if num_classes else None)
    return build.built


def leaves(params: Any) -> dict[str, Any]:
    """The scalar (non-part) values of a Params instance, as TOML would hold them."""
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if not isinstance(value, PartRef):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def template_path(path: str) -> tuple[str, list[tuple[str, int]]]:
    """``model.step[3].coupling`` -> (``model.step.coupling``, [(``model.step``, 3)])."""
    copies = [(path[: m.start()], int(m.group(1))) for m in re.finditer(r"\[(\d+)\]", path)]
    return re.sub(r"\[\d+\]", "", path), copies


def table_at(resolved: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = resolved
    for key in dotted.split("."):
        node = node[key]
    return node


def expected_value(resolved: dict[str, Any], path: str, key: str) -> Any:
    """What the resolved recipe says part ``path`` (a copy path) received as ``key``."""
    template, copies = template_path(path)
    table = table_at(resolved, template)
    if key in table:
        return table[key]
    for copy_of, index in reversed(copies):  # a derived value: listed by the part that makes the copies
        owner = re.sub(r"\[\d+\]", "", copy_of).rpartition(".")[0]
        derived = table_at(resolved, owner).get(DERIVED, {})
        sub = f"{template[len(owner) + 1:]}.{key}"
        if sub in derived:
            value = derived[sub]  # one value per copy, or one for all
            return value[index] if isinstance(value, list) else value
    raise AssertionError(f"{path}.{key} was built but the resolved recipe has no value for it")


@pytest.mark.parametrize(("path", "preset"), CASES, ids=[f"{p.stem}-{s or 'default'}" for p, s in CASES])
def test_every_value_of_the_resolved_recipe_is_the_value_built(plugins, path: Path, preset: str | None) -> None:
    recipe = load_recipe(path, plugins.registries, preset=preset)
    resolved = recipe.to_dict()
    built = build_recorded(plugins, recipe)
    seen = set()
    for part_path, params in built:
        seen.add(template_path(part_path)[0])
        for key, value in leaves(params).items():
            assert value == expected_value(resolved, part_path, key), f"{part_path}.{key}"
    # And every part table of the recipe was built (so none of its values is idle).
    # And every part table of the recipe was built, but templates of which no copy is made
    # (multiscale's bottom_step with bottom_depth = 0): none of its values is idle.
    unused = _unused_templates(recipe.model, "model") + _unused_templates(recipe.dequantizer, "dequantizer")
    tables = _part_tables(resolved["model"], "model") + _part_tables(resolved["dequantizer"], "dequantizer")
    idle = [t for t in tables if t not in seen and not any(t == u or t.startswith(u + ".") for u in unused)]
    assert not idle, f"part tables of the resolved recipe that were never built: {idle}"


def _unused_templates(ref: PartRef, path: str) -> list[str]:
    """Tables of templates of which no copy is made, at any depth (a nested model's too)."""
    if ref.params is None:
        return []
    out = []
    copies = declared_copies(ref.params)
    for f in dataclasses.fields(ref.params):
        child = getattr(ref.params, f.name)
        if not isinstance(child, PartRef):
            continue
        if f.name in copies and copies[f.name].count == 0:
            out.append(f"{path}.{f.name}")
        else:
            out += _unused_templates(child, f"{path}.{f.name}")
    return out


def _part_tables(table: dict[str, Any], path: str) -> list[str]:
    out = [path]
    for key, value in table.items():
        if isinstance(value, dict) and key != DERIVED:
            out += _part_tables(value, f"{path}.{key}")
    return out


def _changed(value: Any, tp: Any) -> Any:
    """Another valid-looking value of the same type, or None where there is no obvious one."""
    if get_origin(tp) is Literal:
        choices = [c for c in get_args(tp) if c != value]
        return choices[0] if choices else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [value[0] + 1, *value[1:]]
    return None


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_an_explicit_override_reaches_the_part_it_names_or_is_refused(plugins, path: Path) -> None:
    recipe = load_recipe(path, plugins.registries, preset="smoke")
    resolved = recipe.to_dict()
    overrides = {}
    for part_path, params in build_recorded(plugins, recipe):
        template = template_path(part_path)[0]
        types = field_types(type(params))
        for key, value in leaves(params).items():
            if key in table_at(resolved, template):  # derived keys are refused: see the tests below
                new = _changed(value, types[key])
                if new is not None:
                    overrides[f"{template}.{key}"] = new
    assert len(overrides) > 5  # the walk found the recipe's values (TarFlow's smoke model has 8)
    outcomes = {"built": 0, "refused": 0}
    for dotted, new in overrides.items():
        try:
            changed = load_recipe(path, plugins.registries, preset="smoke", overrides=[f"{dotted}={toml_value(new)}"])
            built = build_recorded(plugins, changed)
        except ShapeError:  # the changed model does not fit the images (a channel split of one channel)
            outcomes["refused"] += 1
            continue
        except FlowkitError as exc:  # refused when loading, with a message naming the key
            assert dotted.rpartition(".")[2] in str(exc), (dotted, str(exc))
            outcomes["refused"] += 1
            continue
        part, key = dotted.rsplit(".", 1)
        received = [leaves(params)[key] for p, params in built if template_path(p)[0] == part]
        assert received and all(v == new for v in received), (dotted, new, received)
        outcomes["built"] += 1
    assert outcomes["built"] > outcomes["refused"]


def test_a_width_set_on_the_wavelet_flow_net_is_refused_naming_the_key_and_model_hidden_changes_the_model(plugins):
    recipe = RECIPES[0].parent / "wavelet_flow_affine.toml"
    with pytest.raises(FlowkitError, match=r"model\.step\.coupling\.net\.hidden = 128 cannot be set.*model\.hidden"):
        load_recipe(recipe, plugins.registries, preset="smoke", overrides=["model.step.coupling.net.hidden=128"])

    def count(*overrides: str) -> int:
        r = load_recipe(recipe, plugins.registries, preset="smoke", overrides=list(overrides))
        return sum(p.numel() for p in Builder(plugins.registries)(r.model, in_shape=(1, 28, 28)).parameters())

    assert count("model.hidden=[128]") > count()


def test_a_width_set_on_the_flowpp_net_changes_the_model(plugins):
    recipe = RECIPES[0].parent / "flowpp.toml"

    def count(*overrides: str) -> int:
        r = load_recipe(recipe, plugins.registries, preset="smoke", overrides=list(overrides))
        return sum(p.numel() for p in Builder(plugins.registries)(r.model, in_shape=(1, 28, 28)).parameters())

    assert count("model.step.coupling.net.hidden=16") > count()
    with pytest.raises(FlowkitError, match=r"model\.coupling is not a parameter of model flowpp"):
        load_recipe(recipe, plugins.registries, preset="smoke", overrides=["model.coupling.net.hidden=16"])
