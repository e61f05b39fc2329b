"""``flowkit plugins`` and ``flowkit parts``, through click's CliRunner."""

from __future__ import annotations

import json
import tomllib

import click
import pytest
from click.testing import CliRunner, Result

import flowkit.cli
from flowkit.cli.console import console


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide tables, so no cell is folded in the middle of a name. rich reads COLUMNS when the
    # console is created (pytest-xdist workers have it set), so the width is set on the console.
    monkeypatch.setattr(console, "_width", 200)


@pytest.fixture(scope="module")
def cli() -> click.Group:
    flowkit.cli._add_commands()
    return flowkit.cli.cli


def _invoke(cli: click.Group, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"FLOWKIT_DEBUG": ""})


def _ok(cli: click.Group, *args: str) -> str:
    result = _invoke(cli, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_plugins_lists_builtins_and_the_example_plugin(cli: click.Group) -> None:
    lines = _ok(cli, "plugins").splitlines()
    haar = next(line for line in lines if line.startswith("│ haar "))
    assert "flowkit 0.1.0" in haar and "decompositions" in haar
    example = next(line for line in lines if line.startswith("│ example "))
    for text in ("flowkit-example-plugin 0.1.0", "couplings", "example_shift"):
        assert text in example


def test_plugins_json(cli: click.Group) -> None:
    rows = {row["name"]: row for row in json.loads(_ok(cli, "plugins", "--json"))}
    assert rows["haar"] == {"name": "haar", "package": "flowkit", "version": flowkit.__version__,
                            "hooks": ["flowkit_register_decompositions"], "parts": ["decomposition:haar"]}
    assert rows["example"]["package"] == "flowkit-example-plugin"
    assert rows["example"]["version"] == "0.1.0"


def test_parts_lists_every_kind(cli: click.Group) -> None:
    out = _ok(cli, "parts")
    for kind in ("transform", "decomposition", "coupling", "step", "net", "prior", "dequantizer", "model",
                 "dataset"):
        assert kind in out
    kinds = json.loads(_ok(cli, "parts", "--json"))
    assert {"additive", "affine", "example_shift"} <= set(kinds["coupling"])
    assert "haar" in kinds["decomposition"]


def test_parts_of_a_kind(cli: click.Group) -> None:
    out = _ok(cli, "parts", "coupling")
    for name in ("additive", "affine", "example_shift", "flowkit-example-plugin"):
        assert name in out
    records = {r["name"]: r for r in json.loads(_ok(cli, "parts", "coupling", "--json"))}
    assert records["affine"]["plugin"] == "affine" and records["affine"]["package"] == "flowkit"
    assert records["example_shift"]["package"] == "flowkit-example-plugin"
    assert records["affine"]["summary"]


def test_parts_of_one_part_shows_its_params(cli: click.Group) -> None:
    out = _ok(cli, "parts", "coupling", "affine")
    assert "net" in out and "net part" in out and '{ use = "glow_cnn" }' in out
    assert "[model.step.coupling]" in out and 'use = "affine"' in out


def test_parts_json_of_one_part(cli: click.Group) -> None:
    data = json.loads(_ok(cli, "parts", "coupling", "example_shift", "--json"))
    assert (data["kind"], data["name"], data["plugin"], data["package"]) == (
        "coupling", "example_shift", "example", "flowkit-example-plugin")
    fields = {f["name"]: f for f in data["params"]}
    assert fields["net"] == {"name": "net", "type": "part", "kind": "net", "required": False,
                             "default": {"use": "glow_cnn"}, "doc": fields["net"]["doc"]}
    assert fields["scale"]["type"] == "bool" and fields["scale"]["default"] is False
    assert all(f["doc"] for f in data["params"])


def test_example_table_parses_as_toml_with_the_defaults(cli: click.Group) -> None:
    data = json.loads(_ok(cli, "parts", "coupling", "example_shift", "--json"))
    table = tomllib.loads(data["example"])["model"]["step"]["coupling"]
    assert table == {"use": "example_shift", "mask": "channel", "parity": 0, "scale": False, "max_log_scale": 1.0,
                     "net": {"use": "glow_cnn"}}


def test_example_table_comments_out_required_fields(cli: click.Group) -> None:
    data = json.loads(_ok(cli, "parts", "dataset", "npz", "--json"))
    assert [f["name"] for f in data["params"] if f["required"]] == ["path"]
    assert "# path = ...  (required: str)" in data["example"]
    assert "path" not in tomllib.loads(data["example"])["data"]


def test_misspelt_part_exits_2_with_a_suggestion(cli: click.Group) -> None:
    result = _invoke(cli, "parts", "coupling", "afine")
    assert result.exit_code == 2
    assert 'Did you mean "affine"?' in result.stderr
    assert "Available: " in result.stderr and "example_shift" in result.stderr
    assert "Traceback" not in result.output


def test_misspelt_kind_exits_2_with_a_suggestion(cli: click.Group) -> None:
    result = _invoke(cli, "parts", "couplings")
    assert result.exit_code == 2
    assert '"couplings" is not a registered kind of part. Did you mean "coupling"?' in result.stderr
    assert "Traceback" not in result.output
