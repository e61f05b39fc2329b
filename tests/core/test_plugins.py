"""Plugin loading: entry points, env allow/deny lists, check_pending, ``-p``, and one test per hook.

Each hook has a ``test_hook_<hook name>`` test here (tests/core/test_docs.py checks it).
"""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

import flowkit
import flowkit.cli
from flowkit import NoParams, PluginError, hookimpl, param
from flowkit.cli.console import console
from flowkit.hookspecs import KIND_HOOKS
from flowkit.plugins import LOCAL, Plugins, make_plugins
from flowkit.registry import Part, RegisterFn
from flowkit.testing import check_transform, randomize_

ROOT = Path(__file__).resolve().parents[2]
INSTALL_EXAMPLE = "install it with: pip install --no-deps ./tests/fixtures/flowkit_example_plugin"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide tables, so no cell is folded in the middle of a name. rich reads COLUMNS when the
    # console is created (pytest-xdist workers have it set), so the width is set on the console.
    monkeypatch.setattr(console, "_width", 200)


@pytest.fixture(scope="module")
def cli() -> click.Group:
    flowkit.cli._add_commands()
    return flowkit.cli.cli


def _invoke(cli: click.Group, args: list[str]) -> Any:
    return CliRunner().invoke(cli, args, env={"FLOWKIT_DEBUG": ""})


# --- entry points ---------------------------------------------------------------------------


def test_builtins_load_from_distribution_flowkit(plugins: Plugins) -> None:
    part = plugins.registries.part("decomposition", "haar")
    assert (part.plugin, part.distribution, part.version) == ("haar", "flowkit", flowkit.__version__)


def test_every_builtin_entry_point_in_pyproject_is_installed(plugins: Plugins) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["flowkit"]
    packages = {row["name"]: row["package"] for row in plugins.describe()}
    missing = sorted(set(declared) - set(packages))
    assert not missing, f"entry points {missing} are not installed; rerun: pip install -e '.[test]'"
    assert {packages[name] for name in declared} == {"flowkit"}


def test_example_plugin_is_discovered_through_its_entry_point(plugins: Plugins) -> None:
    assert "example_shift" in plugins.registries["coupling"], INSTALL_EXAMPLE
    part = plugins.registries.part("coupling", "example_shift")
    assert (part.plugin, part.distribution, part.version) == ("example", "flowkit-example-plugin", "0.1.0")
    row = next(r for r in plugins.describe() if r["name"] == "example")
    assert row["hooks"] == ["flowkit_register_couplings"]
    assert row["parts"] == ["coupling:example_shift"]


def test_example_shift_works_inside_a_glow_step(plugins: Plugins) -> None:
    coupling = {"use": "example_shift", "scale": True, "net": {"use": "glow_cnn", "hidden": 8}}
    step = flowkit.build("step", "glow", plugins=plugins, in_shape=(4, 4, 4), context_shape=(2, 4, 4),
                         coupling=coupling).double()
    assert type(step.transforms[-1]).__name__ == "ExampleShiftCoupling"
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    context = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    step.initialize(x, context)
    randomize_(step)
    check_transform(step, x, context, jacobian=False)  # the contract suite checks the Jacobian
    z, _ = step(x, context)
    assert not torch.allclose(step(x, context + 1.0)[0], z), "the context is ignored"


def test_example_shift_additive_has_zero_logabsdet(plugins: Plugins) -> None:
    coupling = flowkit.build("coupling", "example_shift", plugins=plugins, in_shape=(3, 2, 2)).double()
    randomize_(coupling)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    check_transform(coupling, x)
    z, logabsdet = coupling(x)
    torch.testing.assert_close(logabsdet, torch.zeros(2, dtype=torch.float64), atol=0, rtol=0)
    assert not torch.allclose(z, x)


# --- check_pending and the environment variables ------------------------------------------------


class _Misspelt:
    @hookimpl
    def flowkit_register_coupling(self, register: RegisterFn) -> None:  # the hook is ..._couplings
        register("never", lambda params, **kw: None)


def test_misspelt_hookimpl_fails_check_pending() -> None:
    with pytest.raises(PluginError, match="unknown hook") as exc:
        make_plugins(entry_points=False, extra=[_Misspelt()])
    assert "flowkit_register_coupling" in str(exc.value)


def test_disable_plugins_blocks_an_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWKIT_DISABLE_PLUGINS", "example, squeeze")
    plugins = make_plugins()
    names = {row["name"] for row in plugins.describe()}
    assert "example" not in names and "squeeze" not in names
    assert "example_shift" not in plugins.registries["coupling"]
    assert "squeeze" not in plugins.registries["decomposition"]
    assert "affine" in plugins.registries["coupling"]


def test_load_plugins_is_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWKIT_LOAD_PLUGINS", "haar,example")
    plugins = make_plugins()
    assert {row["name"] for row in plugins.describe()} == {"haar", "example"}
    assert plugins.registries["coupling"].names() == ["example_shift"]
    assert plugins.registries["decomposition"].names() == ["haar"]


def test_disable_wins_over_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWKIT_LOAD_PLUGINS", "haar,example")
    monkeypatch.setenv("FLOWKIT_DISABLE_PLUGINS", "example")
    assert {row["name"] for row in make_plugins().describe()} == {"haar"}


def test_empty_allow_list_loads_no_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWKIT_LOAD_PLUGINS", "")
    assert make_plugins().describe() == []


# --- temporary plugins through the CLI ----------------------------------------------------------

PLUGIN_MODULE = '''
from dataclasses import dataclass

from flowkit import PartRef, hookimpl, param, part_field


@dataclass(frozen=True, kw_only=True)
class ThrowawayParams:
    mask: str = param("channel", "which entries condition")
    parity: int = param(0, "which half is transformed")
    net: PartRef = part_field("net", "glow_cnn", "conditioner")


def _factory(params, **kwargs):
    """A throwaway coupling."""


@hookimpl
def flowkit_register_couplings(register):
    register("throwaway", _factory, params=ThrowawayParams)
'''


@dataclass(frozen=True, kw_only=True)
class _CouplingParams:
    """What every coupling declares (the coupling contract)."""

    mask: str = param("channel", "which entries condition")
    parity: int = param(0, "which half is transformed")
    net: str = param("", "a stand-in for the conditioner")


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "flowkit_throwaway_plugin"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_p_module_is_loaded_for_one_command(cli: click.Group, plugin_module: str) -> None:
    result = _invoke(cli, ["-p", plugin_module, "parts", "coupling", "--json"])
    assert result.exit_code == 0, result.output
    assert "throwaway" in [p["name"] for p in json.loads(result.stdout)]
    result = _invoke(cli, ["-p", plugin_module, "plugins", "--json"])
    row = next(r for r in json.loads(result.stdout) if r["name"] == plugin_module)
    assert (row["package"], row["parts"]) == (LOCAL, ["coupling:throwaway"])
    # The next command, without -p, does not see it.
    assert "throwaway" not in _invoke(cli, ["parts", "coupling"]).stdout


def test_p_module_that_cannot_be_imported_exits_2(cli: click.Group) -> None:
    result = _invoke(cli, ["-p", "flowkit_no_such_plugin", "plugins"])
    assert result.exit_code == 2
    assert 'Plugin module "flowkit_no_such_plugin" could not be imported' in result.stderr
    assert "Traceback" not in result.output


class _Throwaway:
    @hookimpl
    def flowkit_register_couplings(self, register: RegisterFn) -> None:
        register("throwaway_obj", lambda params, **kw: None, params=_CouplingParams,
                 summary="a throwaway object plugin")


def test_extra_plugin_object_is_visible_through_the_cli(cli: click.Group, monkeypatch: pytest.MonkeyPatch) -> None:
    # main() builds the startup manager once and every command reuses it (llm's pattern of
    # registering on the one manager, undone afterwards: monkeypatch restores it).
    monkeypatch.setattr(flowkit.cli, "_startup_plugins", make_plugins(extra=[_Throwaway()]))
    result = _invoke(cli, ["parts", "coupling"])
    assert result.exit_code == 0, result.output
    assert "throwaway_obj" in result.stdout and "a throwaway object plugin" in result.stdout
    rows = json.loads(_invoke(cli, ["plugins", "--json"]).stdout)
    assert [r["package"] for r in rows if r["parts"] == ["coupling:throwaway_obj"]] == [LOCAL]


# --- one test per hook --------------------------------------------------------------------------


def _registered(kind: str) -> Part:
    """Registers ``throwaway`` through the hook of ``kind``, from a throwaway plugin module."""
    hook_name = KIND_HOOKS[kind]

    def factory(params: Any, **kwargs: Any) -> str:
        return f"built {kind}"

    def impl(register: RegisterFn) -> None:
        params = _CouplingParams if kind == "coupling" else NoParams
        register("throwaway", factory, params=params, summary=f"a throwaway {kind}")

    module = types.ModuleType(f"throwaway_{kind}")
    setattr(module, hook_name, hookimpl(impl))
    plugins = make_plugins(entry_points=False, extra=[module])
    part = plugins.registries.part(kind, "throwaway")
    assert (part.kind, part.plugin, part.distribution, part.summary) == (
        kind, module.__name__, LOCAL, f"a throwaway {kind}")
    assert part.factory(None, build=None) == f"built {kind}"
    assert plugins.describe()[0]["hooks"] == [hook_name]
    for other in plugins.registries.kinds():
        if other != kind:
            assert "throwaway" not in plugins.registries[other]
    return part


def test_hook_flowkit_register_transforms() -> None:
    assert _registered("transform").kind == "transform"


def test_hook_flowkit_register_decompositions() -> None:
    assert _registered("decomposition").kind == "decomposition"


def test_hook_flowkit_register_couplings() -> None:
    assert _registered("coupling").kind == "coupling"


def test_hook_flowkit_register_steps() -> None:
    assert _registered("step").kind == "step"


def test_hook_flowkit_register_nets() -> None:
    assert _registered("net").kind == "net"


def test_hook_flowkit_register_priors() -> None:
    assert _registered("prior").kind == "prior"


def test_hook_flowkit_register_dequantizers() -> None:
    assert _registered("dequantizer").kind == "dequantizer"


def test_hook_flowkit_register_models() -> None:
    assert _registered("model").kind == "model"


def test_hook_flowkit_register_datasets() -> None:
    assert _registered("dataset").kind == "dataset"


def test_kind_hooks_cover_every_register_hook() -> None:
    from flowkit import hookspecs

    register_hooks = {n for n in dir(hookspecs) if n.startswith("flowkit_register_")}
    assert register_hooks == set(KIND_HOOKS.values())


class _Commands:
    @hookimpl
    def flowkit_add_commands(self, cli: click.Group) -> None:
        @cli.command()
        @click.argument("who")
        def hello(who: str) -> None:
            """Greets WHO."""
            click.echo(f"hello {who}")


def test_hook_flowkit_add_commands() -> None:
    group = click.Group("flowkit")
    plugins = make_plugins(entry_points=False, extra=[_Commands()])
    plugins.pm.hook.flowkit_add_commands(cli=group)
    assert list(group.commands) == ["hello"]
    result = CliRunner().invoke(group, ["hello", "world"])
    assert (result.exit_code, result.output) == (0, "hello world\n")
