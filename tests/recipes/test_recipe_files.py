"""Every recipe validates with every preset; bad recipes give one clear paragraph."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowkit.errors import RecipeError
from flowkit.recipes.load import load_recipe, preset_names, read_toml, validate_recipe

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.toml"))
CASES = [(p, preset) for p in RECIPES for preset in [None, *preset_names(p)]]


@pytest.mark.parametrize(("path", "preset"), CASES, ids=[f"{p.stem}-{s or 'default'}" for p, s in CASES])
def test_recipe_validates(plugins, path: Path, preset: str | None) -> None:
    recipe = load_recipe(path, plugins.registries, preset=preset)
    assert recipe.meta.description, "each recipe says which paper configuration it follows"


def test_every_recipe_has_a_smoke_preset() -> None:
    for path in RECIPES:
        assert "smoke" in preset_names(path), f"{path.name} has no smoke preset"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_resolved_recipe_reloads_identically(plugins, tmp_path: Path, path: Path) -> None:
    recipe = load_recipe(path, plugins.registries, preset="smoke", overrides=["train.seed=3"])
    resolved = tmp_path / "recipe.toml"
    resolved.write_text(recipe.to_toml())
    again = load_recipe(resolved, plugins.registries)
    assert again.to_dict() == recipe.to_dict()
    assert (again.model, again.data, again.train) == (recipe.model, recipe.data, recipe.train)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


BASE = """
[recipe]
name = "t"
[data]
use = "mnist"
[dequantizer]
use = "uniform"
[model]
use = "wavelet_flow"
[train]
steps = 1
"""


def problems(plugins, path: Path, **kwargs) -> str:  # noqa: ANN001
    with pytest.raises(RecipeError) as info:
        load_recipe(path, plugins.registries, **kwargs)
    return str(info.value)


def test_unknown_part_names_file_key_suggestion_and_choices(plugins, tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[model.step.coupling]\nuse = "afine"\n')
    message = problems(plugins, path)
    assert str(path) in message and "model.step.coupling.use" in message
    assert 'Did you mean "affine"?' in message and "additive" in message


def test_misspelled_key_gets_did_you_mean(plugins, tmp_path: Path) -> None:
    message = problems(plugins, write(tmp_path, BASE.replace('use = "wavelet_flow"', 'use = "wavelet_flow"\nlevles = 2')))
    assert "model.levles" in message and 'Did you mean "levels"?' in message


def test_wrong_type_names_expected_type(plugins, tmp_path: Path) -> None:
    message = problems(plugins, write(tmp_path, BASE + 'lr = "fast"\n'))
    assert 'train.lr = "fast" should be float' in message


def test_literal_lists_allowed_values(plugins, tmp_path: Path) -> None:
    message = problems(plugins, write(tmp_path, BASE + 'optimizer = "sgd"\n'))
    assert "train.optimizer" in message and '"adamax", "adamax_openai", "adam", "adamw"' in message


def test_n_bits_out_of_range(plugins, tmp_path: Path) -> None:
    message = problems(plugins, write(tmp_path, BASE.replace('use = "mnist"', 'use = "mnist"\nn_bits = 9')))
    assert "data" in message and "n_bits = 9" in message and "1 to 8" in message


def test_all_problems_are_reported_at_once(plugins, tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'lr = "fast"\nbatchsize = 3\n[sampel]\nn = 2\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path, plugins.registries)
    assert len(info.value.problems) == 3
    assert 'Did you mean "sample"?' in str(info.value) and 'Did you mean "batch_size"?' in str(info.value)


def test_unknown_preset_lists_presets(plugins) -> None:
    message = problems(plugins, RECIPES[0], preset="smok")
    assert 'Did you mean "smoke"?' in message


def test_set_overrides_are_parsed_as_toml_and_validated(plugins, tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, plugins.registries, overrides=["train.lr=3e-4", "model.decomposition.use=db2",
                                                              "model.depth=[2, 3, 4]"])
    assert recipe.train.lr == 3e-4 and recipe.model.params.decomposition.use == "db2"
    assert recipe.model.params.depth == (2, 3, 4)
    assert "train.batch_size" in problems(plugins, path, overrides=["train.batch_size=big"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(path, plugins.registries, overrides=["lr"])


def test_extends_merges_and_detects_cycles(plugins, tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text(BASE)
    child = tmp_path / "child.toml"
    child.write_text('[recipe]\nname = "child"\nextends = "base.toml"\n[train]\nlr = 0.5\n')
    recipe = load_recipe(child, plugins.registries)
    assert recipe.meta.name == "child" and recipe.train.lr == 0.5 and recipe.model.use == "wavelet_flow"
    loop = tmp_path / "loop.toml"
    loop.write_text('[recipe]\nname = "loop"\nextends = "loop.toml"\n')
    with pytest.raises(RecipeError, match="deeper than"):
        read_toml(loop)


def test_missing_sections_are_named(plugins) -> None:
    with pytest.raises(RecipeError) as info:
        validate_recipe(plugins.registries, {"recipe": {"name": "x"}, "train": {"steps": 1}}, "x.toml")
    text = str(info.value)
    assert "[data] is missing" in text and "[model] is missing" in text


def test_every_part_section_of_the_kinds_table_is_a_field_of_the_recipe() -> None:
    import dataclasses

    from flowkit.kinds import PART_SECTIONS
    from flowkit.recipes.load import SECTIONS, Recipe

    fields = {f.name for f in dataclasses.fields(Recipe)}
    assert set(PART_SECTIONS) <= fields and set(PART_SECTIONS) <= set(SECTIONS)
