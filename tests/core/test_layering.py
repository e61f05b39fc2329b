"""The architecture, checked on the source by import-linter: the contracts in pyproject.toml
(flowkit's layers, no import cycle, private modules stay private, the core imports no plugin,
plugins import no other plugin) hold, they cover every module, they can fail, and no package is
left out of the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "flowkit"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CONTRACTS = {c["id"]: c for c in PYPROJECT["tool"]["importlinter"]["contracts"]}


def lint_imports(root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages importable from ``root`` with ``root/pyproject.toml``."""
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_lint_imports_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in result.stdout


def test_every_top_level_module_of_flowkit_is_in_a_layer() -> None:
    declared = set(CONTRACTS["layers"]["layers"])
    present = {p.stem for p in CORE.glob("*.py") if p.name != "__init__.py"}
    present |= {p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()}
    assert present == declared, (f"in no layer: {sorted(present - declared)}; "
                                 f"declared but absent: {sorted(declared - present)}")


def test_every_entry_point_is_an_independent_plugin() -> None:
    entry_points = set(PYPROJECT["project"]["entry-points"]["flowkit"].values())
    assert set(CONTRACTS["plugins-independent"]["modules"]) == entry_points
    kinds = {f"flowkit_plugins.{p.name}" for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file()}
    assert set(CONTRACTS["kinds-independent"]["modules"]) == kinds


#: Imports planted in a copy of the tree, each breaking one contract.
PLANTED = {
    "layers": ("flowkit/errors.py", "from flowkit.cli import public\n"),
    "acyclic": ("flowkit/runs/bpd.py", "def _late():\n    from flowkit.runs import execute\n"),
    "core-imports-no-plugin": ("flowkit/runs/images.py", "import flowkit_plugins.couplings.affine\n"),
    "plugins-independent": ("flowkit_plugins/couplings/additive.py", "from flowkit_plugins.couplings import affine\n"),
    "kinds-independent": ("flowkit_plugins/priors/gaussian.py", "import flowkit_plugins.nets.glow_cnn\n"),
    "private": ("flowkit_plugins/nets/glow_cnn.py", "from flowkit_plugins.datasets import _arrays\n"),
}


def test_a_planted_import_breaks_its_contract_and_only_its_own(tmp_path: Path) -> None:
    assert set(PLANTED) == set(CONTRACTS), "every contract needs a planted import that breaks it"
    # A copy of the tree under the import names (plugins/ is flowkit_plugins), first on the path.
    shutil.copytree(CORE, tmp_path / "flowkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "plugins", tmp_path / "flowkit_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    clean = lint_imports(tmp_path, env)
    assert clean.returncode == 0, "the copy itself keeps every contract: " + clean.stdout
    for relative, line in PLANTED.values():
        with open(tmp_path / relative, "a", encoding="utf-8") as f:
            f.write("\n" + line)
    result = lint_imports(tmp_path, env)
    assert result.returncode != 0
    report = "".join(result.stdout.split())  # rich wraps long names anywhere: compare without whitespace
    for contract_id in PLANTED:
        name = "".join(CONTRACTS[contract_id]["name"].split())
        assert f"{name}BROKEN" in report, f"{contract_id} was not broken by its planted import:\n{result.stdout}"
    assert f"0kept,{len(PLANTED)}broken" in report


def _package_dirs() -> dict[Path, str]:
    """Every directory holding Python files under flowkit/ and plugins/, by its import name."""
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = {}
    for import_root, directory in package_dir.items():
        for py in (ROOT / directory).rglob("*.py"):
            rel = py.parent.relative_to(ROOT / directory)
            if "__pycache__" in rel.parts:
                continue
            found[py.parent] = ".".join([import_root, *rel.parts])
    return found


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    packages = _package_dirs()
    assert "flowkit.cli" in packages.values() and "flowkit_plugins.couplings" in packages.values()
    missing = sorted(set(packages.values()) - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml, or wheels lack them: {missing}"
    stale = sorted(listed - set(packages.values()))
    assert not stale, f"[tool.setuptools] packages lists packages that do not exist: {stale}"


def test_every_package_directory_has_an_init() -> None:
    missing = sorted(str(d.relative_to(ROOT)) for d in _package_dirs() if not (d / "__init__.py").exists())
    assert not missing, f"directories with Python files but no __init__.py: {missing}"
