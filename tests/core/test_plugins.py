"""Plugin loading: entry points, env allow/deny lists, check_pending, ``-p``, and one test per hook.

Each hook has a ``test_hook_<hook name>`` test here (tests/core/test_docs.py checks it).
"""

from __future__ import annotations

import json
import os
import subprocess
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
import flowkit.cli.public
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


# --- broken plugins: reported by name and package, and nothing else breaks ------------------------
#
# Each test installs a throwaway distribution the way pip would leave it for importlib.metadata:
# a <name>-<version>.dist-info folder with METADATA and entry_points.txt, next to the plugin
# modules, in a temporary folder put first on sys.path (and on PYTHONPATH for the real CLI).

BROKEN_MODULES = {
    "flowkit_test_import_fails": "import flowkit_test_no_such_dependency\n",
    "flowkit_test_hook_raises": """
        from dataclasses import dataclass

        from flowkit import PartRef, hookimpl, param, part_field


        @dataclass(frozen=True, kw_only=True)
        class P:
            mask: str = param("channel", "which entries condition")
            parity: int = param(0, "which half is transformed")
            net: PartRef = part_field("net", "glow_cnn", "conditioner")


        @hookimpl
        def flowkit_register_couplings(register):
            register("halfway", lambda params, **kwargs: None, params=P)  # registered, then withdrawn
            raise RuntimeError("the spline tables are missing")
    """,
    "flowkit_test_command_raises": """
        import click

        from flowkit import hookimpl


        @hookimpl
        def flowkit_add_commands(cli):
            @cli.command()
            def halfway_command():
                click.echo("never")
            raise ValueError("no config file")
    """,
    "flowkit_test_misspelt": """
        from flowkit import hookimpl


        @hookimpl
        def flowkit_register_coupling(register):
            pass
    """,
}
BROKEN_ENTRY_POINTS = {"import_fails": "flowkit_test_import_fails", "hook_raises": "flowkit_test_hook_raises",
                       "command_raises": "flowkit_test_command_raises", "misspelt": "flowkit_test_misspelt"}


@pytest.fixture
def broken_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Distribution ``flowkit-test-broken`` 0.3 with four broken plugins, importable from a temp folder."""
    info = tmp_path / "flowkit_test_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flowkit-test-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[flowkit]\n" + "".join(f"{name} = {module}\n" for name, module in BROKEN_ENTRY_POINTS.items()))
    for module, source in BROKEN_MODULES.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in BROKEN_MODULES:
        sys.modules.pop(module, None)


def _broken(plugins: Plugins) -> dict[str, Any]:
    plugins.registries  # noqa: B018 - runs the register hooks
    return {b.name: b for b in plugins.broken}


def test_broken_plugins_are_recorded_by_name_package_and_reason(broken_dist: Path) -> None:
    plugins = make_plugins()
    broken = _broken(plugins)
    assert set(broken) == {"import_fails", "hook_raises", "misspelt"}  # command_raises fails only at add_commands
    for b in broken.values():
        assert (b.package, b.version) == ("flowkit-test-broken", "0.3")
    assert broken["import_fails"].reason == (
        "failed to import (ModuleNotFoundError: No module named 'flowkit_test_no_such_dependency')")
    assert broken["hook_raises"].reason == (
        "raised in flowkit_register_couplings (RuntimeError: the spline tables are missing)")
    assert "flowkit_register_coupling, which is not a flowkit hook" in broken["misspelt"].reason
    # Every other plugin loaded, the broken plugins' parts did not.
    assert {"affine", "additive", "example_shift"} <= set(plugins.registries["coupling"].names())
    assert "halfway" not in plugins.registries["coupling"]
    rows = {row["name"]: row for row in plugins.describe()}
    assert rows["hook_raises"]["error"] == broken["hook_raises"].reason
    assert "error" not in rows["affine"]


def test_a_part_of_a_broken_plugin_is_refused_naming_the_plugin(broken_dist: Path) -> None:
    plugins = make_plugins()
    with pytest.raises(flowkit.RecipeError) as exc:
        flowkit.load_recipe(ROOT / "recipes" / "glow.toml", plugins.registries,
                            overrides=["model.step.coupling.use=halfway"])
    message = str(exc.value)
    for text in ('model.step.coupling.use = "halfway" is the coupling of plugin "hook_raises"',
                 "package flowkit-test-broken 0.3", "RuntimeError: the spline tables are missing"):
        assert text in message, message
    # A name nobody registered lists the plugins that failed before registering anything.
    with pytest.raises(flowkit.UnknownPartError) as exc:
        plugins.registries.part("coupling", "nobody_registers_this")
    assert 'plugin "import_fails" (package flowkit-test-broken 0.3), which failed to import' in str(exc.value)


def test_a_command_hook_that_raises_adds_no_command(broken_dist: Path) -> None:
    group = click.Group("flowkit")
    plugins = make_plugins()
    plugins.registries  # noqa: B018
    plugins.add_commands(group)
    assert "superres" in group.commands  # the wavelet_flow plugin's command
    assert "halfway-command" not in group.commands
    assert {b.name for b in plugins.broken} >= {"command_raises"}


def test_disable_plugins_still_blocks_broken_plugins(broken_dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWKIT_DISABLE_PLUGINS", "import_fails,hook_raises,misspelt")
    plugins = make_plugins()
    assert _broken(plugins) == {}
    assert "import_fails" not in {row["name"] for row in plugins.describe()}


def _flowkit(args: list[str], pythonpath: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "FLOWKIT_DEBUG": "", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "flowkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Warning:")]


def test_cli_help_works_beside_broken_plugins_with_one_warning_line_each(broken_dist: Path) -> None:
    result = _flowkit(["--help"], broken_dist)
    assert result.returncode == 0, result.stderr
    assert "Commands:" in result.stdout and "Traceback" not in result.stderr
    warnings = _warnings(result.stderr)
    assert len(warnings) == 4 and len(result.stderr.splitlines()) == 4, result.stderr
    assert any('plugin "import_fails" (package flowkit-test-broken 0.3) failed to import' in w for w in warnings)


def test_plugins_command_lists_broken_plugins(cli: click.Group, broken_dist: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    startup = make_plugins()
    startup.registries  # noqa: B018 - as the CLI's startup does
    monkeypatch.setattr(flowkit.cli.public, "_startup", startup)
    rows = {row["name"]: row for row in json.loads(_invoke(cli, ["plugins", "--json"]).stdout)}
    assert {name for name, row in rows.items() if "error" in row} == {"import_fails", "hook_raises", "misspelt"}
    table = _invoke(cli, ["plugins"]).stdout
    assert "3 broken plugin(s), not loaded" in table
    assert "│ broken " in next(line for line in table.splitlines() if line.startswith("│ hook_raises "))
    result = _invoke(cli, ["run", "recipes/glow.toml", "--preset", "smoke", "--set",
                           "model.step.coupling.use=halfway", "--out", str(broken_dist / "refused")])
    assert result.exit_code == 2
    assert 'is the coupling of plugin "hook_raises" (package flowkit-test-broken 0.3)' in result.stderr
    assert not (broken_dist / "refused").exists()


def test_cli_run_works_beside_broken_plugins(broken_dist: Path, tmp_path: Path) -> None:
    result = _flowkit(["run", "recipes/glow.toml", "--preset", "smoke", "--out", str(tmp_path / "run")], broken_dist)
    assert result.returncode == 0, result.stderr
    assert len(_warnings(result.stderr)) == 4
    assert (tmp_path / "run" / "summary.json").is_file()


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
    monkeypatch.setattr(flowkit.cli.public, "_startup", make_plugins(extra=[_Throwaway()]))
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
