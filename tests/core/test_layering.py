"""The architecture, checked on the source: the core never imports a plugin, imports only go
downwards (cli → runs → models → registry/recipes → contracts), and no package is left out of
the wheel."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "flowkit"

#: Module prefix → the flowkit packages it must never import (runtime imports; imports under
#: ``if TYPE_CHECKING:`` are annotations only and are allowed).
FORBIDDEN = {
    "flowkit.contracts": ("flowkit.recipes", "flowkit.registry", "flowkit.plugins", "flowkit.models",
                          "flowkit.runs", "flowkit.cli", "flowkit.api"),
    "flowkit.errors": ("flowkit.recipes", "flowkit.registry", "flowkit.plugins", "flowkit.models",
                       "flowkit.runs", "flowkit.cli", "flowkit.api"),
    "flowkit.params": ("flowkit.recipes", "flowkit.registry", "flowkit.plugins", "flowkit.models",
                       "flowkit.runs", "flowkit.cli", "flowkit.api"),
    "flowkit.kinds": ("flowkit.recipes", "flowkit.registry", "flowkit.plugins", "flowkit.models",
                      "flowkit.runs", "flowkit.cli", "flowkit.api"),
    "flowkit.hookspecs": ("flowkit.recipes", "flowkit.models", "flowkit.runs", "flowkit.cli", "flowkit.api"),
    "flowkit.registry": ("flowkit.recipes", "flowkit.plugins", "flowkit.models", "flowkit.runs", "flowkit.cli",
                         "flowkit.api"),
    "flowkit.recipes": ("flowkit.models", "flowkit.runs", "flowkit.cli"),
    "flowkit.models": ("flowkit.runs", "flowkit.cli"),
    "flowkit.runs": ("flowkit.cli", "flowkit.bench"),
    "flowkit.bench": ("flowkit.cli",),
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, runtime_only: bool, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


CORE_FILES = sorted(CORE.rglob("*.py"))


def test_core_files_are_found() -> None:
    assert CORE / "plugins.py" in CORE_FILES and CORE / "cli" / "__init__.py" in CORE_FILES


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_flowkit_plugins(path: Path) -> None:
    bad = [(line, name) for line, name in _imports(path, runtime_only=False)
           if name == "flowkit_plugins" or name.startswith("flowkit_plugins.")]
    assert not bad, f"{path.relative_to(ROOT)} imports a plugin: {bad}"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_only_go_downwards(path: Path) -> None:
    module = _module_name(path)
    rules = [banned for prefix, banned in FORBIDDEN.items() if module == prefix or module.startswith(prefix + ".")]
    bad = [
        (line, name) for line, name in _imports(path, runtime_only=True)
        for banned in rules for target in banned
        if name == target or name.startswith(target + ".")
    ]
    assert not bad, f"{module} imports an upper layer: {sorted(set(bad))}"


def test_the_import_checker_can_fail(tmp_path: Path) -> None:
    source = tmp_path / "flowkit" / "recipes" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import importlib\n"
        "from ..runs import trainer\n"
        "from . import schema\n"
        "if TYPE_CHECKING:\n"
        "    import flowkit.cli\n"
        "def load():\n"
        "    return importlib.import_module('flowkit_plugins.couplings.affine')\n"
    )
    runtime = [name for _, name in _imports(source, runtime_only=True, root=tmp_path)]
    assert runtime == ["importlib", "flowkit.runs", "flowkit.runs.trainer", "flowkit.recipes",
                       "flowkit.recipes.schema", "flowkit_plugins.couplings.affine"]
    assert "flowkit.cli" in [name for _, name in _imports(source, runtime_only=False, root=tmp_path)]


def _package_dirs() -> dict[Path, str]:
    """Every directory holding Python files under flowkit/ and plugins/, by its import name."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    found = {}
    for import_root, directory in package_dir.items():
        for py in (ROOT / directory).rglob("*.py"):
            rel = py.parent.relative_to(ROOT / directory)
            if "__pycache__" in rel.parts:
                continue
            found[py.parent] = ".".join([import_root, *rel.parts])
    return found


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = _package_dirs()
    assert "flowkit.cli" in packages.values() and "flowkit_plugins.couplings" in packages.values()
    missing = sorted(set(packages.values()) - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml, or wheels lack them: {missing}"
    stale = sorted(listed - set(packages.values()))
    assert not stale, f"[tool.setuptools] packages lists packages that do not exist: {stale}"


def test_every_package_directory_has_an_init() -> None:
    missing = sorted(str(d.relative_to(ROOT)) for d in _package_dirs() if not (d / "__init__.py").exists())
    assert not missing, f"directories with Python files but no __init__.py: {missing}"
