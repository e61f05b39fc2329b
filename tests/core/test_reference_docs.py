"""docs/reference/ is generated from the code (``flowkit docs``) and is never stale.

The committed recipes.md and parts.md must equal what the registry and the engine's sections
generate now; the test says the command that refreshes them. Other tests check that the
generator covers every section, key and built-in part, and leaves third-party parts out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowkit.cli.docs_cmd import REFRESH, builtin_registries, docs, render
from flowkit.recipes.load import ENGINE_SECTIONS, SECTIONS
from flowkit.plugins import Plugins
from flowkit.registry import Registries

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"


@pytest.fixture(scope="module")
def registries() -> Registries:
    return builtin_registries()


@pytest.fixture(scope="module")
def generated(registries: Registries) -> dict[str, str]:
    return render(registries)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``flowkit docs`` writes now, in a temporary folder."""
    out = tmp_path_factory.mktemp("reference")
    result = CliRunner().invoke(docs, ["--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", ["recipes.md", "parts.md"])
def test_committed_reference_is_up_to_date(regenerated: Path, name: str) -> None:
    committed = (REFERENCE / name).read_text(encoding="utf-8") if (REFERENCE / name).is_file() else ""
    assert committed == (regenerated / name).read_text(encoding="utf-8"), (
        f"docs/reference/{name} is stale: the registry or the engine's recipe sections changed. "
        f"Regenerate it (from the repository root) with: {REFRESH}")


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start: end if end != -1 else len(text)]


def test_every_engine_section_and_key_is_in_the_recipe_reference(generated: dict[str, str]) -> None:
    text = generated["recipes.md"]
    for section in SECTIONS:
        assert f"## [{section}{'.NAME' if section == 'presets' else ''}]" in text
    for section, params in ENGINE_SECTIONS.items():
        body = _section(text, f"## [{section}]")
        for f in dataclasses.fields(params):
            assert f"| `{f.name}` |" in body, f"[{section}] {f.name} is missing from recipes.md"


def test_every_builtin_part_and_key_is_in_both_references(registries: Registries, generated: dict[str, str]) -> None:
    recipes, parts = generated["recipes.md"], generated["parts.md"]
    count = 0
    for part in registries.all_parts():
        if part.distribution != "flowkit":
            continue
        count += 1
        body = _section(recipes, f"#### {part.kind} `{part.name}`")
        for f in dataclasses.fields(part.params):
            assert f"| `{f.name}` |" in body, f"{part.kind} {part.name}: key {f.name} is missing from recipes.md"
        assert f"### {part.kind} `{part.name}`" in parts
        assert f'use = "{part.name}"' in _section(parts, f"### {part.kind} `{part.name}`")
    assert count > 20


def test_third_party_parts_stay_out(plugins: Plugins, generated: dict[str, str]) -> None:
    third_party = [p for p in plugins.registries.all_parts() if p.distribution != "flowkit"]
    assert {p.name for p in third_party} >= {"example_shift", "spline"}, "install the test plugins (README)"
    for part in third_party:
        for text in generated.values():
            assert f"`{part.name}`" not in text


def test_docs_check_fails_on_a_stale_file_and_names_the_command(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(docs, ["--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(docs, ["--out", str(tmp_path), "--check"]).exit_code == 0
    stale = tmp_path / "parts.md"
    stale.write_text(stale.read_text() + "\nedited by hand\n")
    result = runner.invoke(docs, ["--out", str(tmp_path), "--check"])
    assert result.exit_code == 1
    assert "parts.md: stale" in result.stderr and REFRESH in result.stderr
