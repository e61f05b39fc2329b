"""docs/examples/flowkit-spline, the third-party plugin the guide walks through: installed from
its folder, tested with flowkit's tests, shown in the guide exactly as it is, and running in the
Wavelet Flow recipe next to it."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import flowkit.cli
from flowkit.plugins import Plugins

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "docs" / "examples" / "flowkit-spline"
GUIDE = ROOT / "docs" / "writing-a-plugin.md"
REINSTALL = "reinstall it: pip install ./docs/examples/flowkit-spline"


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_the_installed_plugin_is_this_folder(plugins: Plugins) -> None:
    pyproject = tomllib.loads((PACKAGE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    try:
        dist = importlib.metadata.distribution(pyproject["name"])
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"flowkit-spline is not installed; {REINSTALL} (the README's test command does)")
    assert dist.version == pyproject["version"], REINSTALL
    assert {ep.name: ep.value for ep in dist.entry_points if ep.group == "flowkit"} == \
        pyproject["entry-points"]["flowkit"]
    # pip copies the module: an edit here is not what runs until it is installed again.
    import flowkit_spline

    assert Path(flowkit_spline.__file__).read_text(encoding="utf-8") == \
        (PACKAGE / "flowkit_spline.py").read_text(encoding="utf-8"), f"the installed copy is stale; {REINSTALL}"
    part = plugins.registries.part("coupling", "spline")
    assert (part.plugin, part.distribution) == ("spline", "flowkit-spline")


def test_flowkit_runs_the_package_tests() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "docs/examples/flowkit-spline/tests" in pyproject["tool"]["pytest"]["ini_options"]["testpaths"]
    assert (PACKAGE / "tests" / "test_flowkit_spline.py").is_file()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "./docs/examples/flowkit-spline && pytest" in readme, "the README's test command installs it"


def test_the_guide_walks_through_the_whole_module_line_by_line() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    walkthrough = guide[guide.index("## 3.") : guide.index("## 4.")]
    shown = "\n".join(_blocks(walkthrough, "python"))
    assert _lines(shown) == _lines((PACKAGE / "flowkit_spline.py").read_text(encoding="utf-8")), (
        "docs/writing-a-plugin.md section 3 no longer shows flowkit_spline.py as it is")


def test_the_guide_shows_the_package_files_as_they_are() -> None:
    guide = GUIDE.read_text(encoding="utf-8")
    toml_blocks = [block.rstrip() for block in _blocks(guide, "toml")]
    for name in ("pyproject.toml", "wavelet_flow_spline.toml"):
        assert (PACKAGE / name).read_text(encoding="utf-8").rstrip() in toml_blocks, f"the guide's {name} is stale"
    tests = (PACKAGE / "tests" / "test_flowkit_spline.py").read_text(encoding="utf-8")
    section = guide[guide.index("## 6.") : guide.index("## 7.")]
    (shown,) = _blocks(section, "python")
    assert shown.strip() in tests, "the guide's test excerpt is stale"


@pytest.fixture(scope="module")
def cli() -> click.Group:
    flowkit.cli._add_commands()
    return flowkit.cli.cli


def test_the_spline_recipe_runs_wavelet_flow_on_one_channel_mnist(cli: click.Group, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(PACKAGE / "wavelet_flow_spline.toml"), "--preset", "smoke",
                                      "--out", str(out)], env={"FLOWKIT_DEBUG": ""})
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads((out / "recipe.toml").read_text(encoding="utf-8"))
    assert resolved["data"]["use"] == "mnist"
    step, base = resolved["model"]["step"]["coupling"], resolved["model"]["base_step"]["coupling"]
    assert (step["use"], step["mask"]) == ("spline", "channel")  # 3-channel details
    assert (base["use"], base["mask"]) == ("spline", "checkerboard")  # the 1-channel 7x7 base
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "finished"
    assert set(summary["test_bpd_per_part"]) == {"base", "level1", "level2"}
    assert 0 < summary["test_bpd"] < 16, summary
