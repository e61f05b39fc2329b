"""Recipes cannot run code or import modules by path: every part comes from an installed plugin.

A recipe names parts by their registered names only (`use = "affine"`). Import paths in any
spelling (`module:Class`, dotted paths, file paths) are unknown names, and the module they
name is never imported; `extends` reads TOML, never code; and outside `flowkit/plugins.py`
(entry points and the command line's `-p`) neither flowkit nor its built-in plugins import
modules by name, execute strings, or unpickle anything without a restricted unpickler.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

import flowkit
from flowkit.plugins import Plugins

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
MARKER_MODULE = "flowkit_test_recipe_payload"

PAYLOAD = """
from pathlib import Path

Path(__file__).with_suffix(".ran").write_text("imported")


class Coupling:
    pass
"""

#: Ways a recipe could try to name code instead of a registered part.
SPELLINGS = [
    f"{MARKER_MODULE}:Coupling",
    f"{MARKER_MODULE}.Coupling",
    MARKER_MODULE,
    "flowkit_plugins.couplings.affine:AffineCoupling",
    "flowkit_plugins.couplings.affine.AffineCoupling",
    "./flowkit_test_recipe_payload.py",
    "os:system",
    "builtins:eval",
]
#: A part table in each place a recipe holds one.
PLACES = ["model.step.coupling", "model.step", "model.step.coupling.net", "model.decomposition", "model",
          "dequantizer", "data"]


@pytest.fixture
def payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module that leaves a file behind when it is imported."""
    (tmp_path / f"{MARKER_MODULE}.py").write_text(textwrap.dedent(PAYLOAD))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path / f"{MARKER_MODULE}.ran"
    sys.modules.pop(MARKER_MODULE, None)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_use_naming_code_is_an_unknown_part(plugins: Plugins, payload: Path, place: str, spelling: str) -> None:
    with pytest.raises(flowkit.RecipeError) as exc:
        flowkit.load_recipe(RECIPE, plugins.registries, overrides=[f'{place}.use="{spelling}"'])
    assert f'{place}.use = "{spelling}" is not a registered' in str(exc.value)
    assert MARKER_MODULE not in sys.modules and not payload.exists(), "a recipe imported a module"


def test_extends_reads_toml_never_code(plugins: Plugins, payload: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[recipe]\nname = "x"\nextends = "{MARKER_MODULE}.py"\n')
    with pytest.raises(flowkit.RecipeError, match="is not valid TOML"):
        flowkit.load_recipe(recipe, plugins.registries)
    assert not payload.exists()


def test_no_recipe_key_loads_plugins(plugins: Plugins, payload: Path) -> None:
    for override in (f'recipe.plugins=["{MARKER_MODULE}"]', f'plugins.load="{MARKER_MODULE}"', f'model.plugin="{MARKER_MODULE}"'):
        with pytest.raises(flowkit.RecipeError):
            flowkit.load_recipe(RECIPE, plugins.registries, overrides=[override])
    assert MARKER_MODULE not in sys.modules and not payload.exists()


# -- the source: nothing below the plugin loader turns a string into code ------------------------

#: Calls that import, execute or unpickle by name.
DYNAMIC = {"import_module", "__import__", "exec", "eval", "run_path", "run_module", "load_entry_point"}
#: Keyword values that make np.load / torch.load unpickle arbitrary objects.
UNPICKLING_OPT_INS = {"allow_pickle": True, "weights_only": False}
#: Where they are allowed: the plugin loader (entry points and `-p`).
ALLOWED = {ROOT / "flowkit" / "plugins.py": {"import_module"}}


def _dynamic_calls(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name in DYNAMIC and (isinstance(func, ast.Name) or name not in ("eval", "exec")):
            found.append((node.lineno, name))  # (module.eval() is nn.Module's eval mode)
        elif owner == "pickle" and name in ("load", "loads"):
            found.append((node.lineno, f"pickle.{name}"))
        # numpy and torch refuse pickles by default; only an explicit opt-in runs them.
        for keyword in node.keywords:
            if (keyword.arg in UNPICKLING_OPT_INS and isinstance(keyword.value, ast.Constant)
                    and keyword.value.value == UNPICKLING_OPT_INS[keyword.arg]):
                found.append((node.lineno, f"{name}({keyword.arg}={keyword.value.value})"))
    return found


SOURCES = sorted((ROOT / "flowkit").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_or_runs_code_by_name(path: Path) -> None:
    calls = [(line, name) for line, name in _dynamic_calls(path) if name not in ALLOWED.get(path, set())]
    assert not calls, f"{path.relative_to(ROOT)} turns strings into code: {calls}"


def test_the_source_check_can_fail(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text("import importlib, numpy as np, torch\n"
                      "def f(name, path):\n"
                      "    importlib.import_module(name)\n"
                      "    eval(name)\n"
                      "    model.eval()\n"
                      "    np.load(path)\n"
                      "    np.load(path, allow_pickle=True)\n"
                      "    torch.load(path, weights_only=False)\n"
                      "    pickle.loads(path)\n")
    assert _dynamic_calls(source) == [(3, "import_module"), (4, "eval"), (7, "load(allow_pickle=True)"),
                                      (8, "load(weights_only=False)"), (9, "pickle.loads")]
