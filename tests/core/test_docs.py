"""Meta-tests (as datasette's tests/test_docs.py): no hook is undocumented or untested, and the
code in the plugin docs runs."""

from __future__ import annotations

import ast
import functools
import re
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit import hookspecs
from flowkit.plugins import make_plugins
from flowkit.testing import check_transform, randomize_

ROOT = Path(__file__).resolve().parents[2]
HOOKS_DOC = ROOT / "docs" / "plugin-hooks.md"
GUIDE = ROOT / "docs" / "writing-a-plugin.md"
HOOKS = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, f"{hookspecs.PROJECT}_spec"))


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@functools.cache
def _test_names() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    return names


def test_hooks_are_found() -> None:
    assert "flowkit_register_couplings" in HOOKS and "flowkit_add_commands" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    headings = re.findall(r"^## (\w+)\s*$", HOOKS_DOC.read_text(encoding="utf-8"), re.M)
    assert hook in headings, f"docs/plugin-hooks.md has no '## {hook}' section"


def test_documented_hooks_exist() -> None:
    headings = re.findall(r"^## (flowkit_\w+)\s*$", HOOKS_DOC.read_text(encoding="utf-8"), re.M)
    assert sorted(headings) == HOOKS, "docs/plugin-hooks.md documents a hook that does not exist"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_tested(hook: str) -> None:
    assert f"test_hook_{hook}" in _test_names(), f"no test named test_hook_{hook} under tests/"


@pytest.mark.parametrize("doc", [HOOKS_DOC, GUIDE], ids=lambda p: p.name)
def test_code_blocks_parse(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for block in _code_blocks(text, "python"):
        ast.parse(textwrap.dedent(block))  # the guide shows a class method by method
    for block in _code_blocks(text, "toml"):
        tomllib.loads(block)


def test_guide_shows_the_example_plugin_entry_point() -> None:
    blocks = _code_blocks(GUIDE.read_text(encoding="utf-8"), "toml")
    guide = tomllib.loads(next(block for block in blocks if "[project]" in block))
    package = ROOT / "docs" / "examples" / "flowkit-spline" / "pyproject.toml"
    real = tomllib.loads(package.read_text(encoding="utf-8"))
    assert guide["project"]["entry-points"] == real["project"]["entry-points"]
    assert guide["project"]["name"] == real["project"]["name"]


def test_guide_code_is_a_working_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Section 3 of the guide, put together, makes a plugin that passes the contract, on one
    channel too."""
    text = GUIDE.read_text(encoding="utf-8")
    walkthrough = text[text.index("## 3.") : text.index("## 4.")]
    module = types.ModuleType("guide_plugin")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile("\n".join(_code_blocks(walkthrough, "python")), "writing-a-plugin.md", "exec"), vars(module))
    plugins = make_plugins(entry_points=False, extra=[module, "flowkit_plugins.nets.glow_cnn"])
    assert plugins.registries.part("coupling", "spline").plugin == "guide_plugin"
    for mask, in_shape in (("channel", (3, 2, 2)), ("checkerboard", (1, 3, 3))):
        coupling = flowkit.build("coupling", "spline", plugins=plugins, in_shape=in_shape, mask=mask,
                                 net={"use": "glow_cnn", "hidden": 4}).double()
        randomize_(coupling)
        check_transform(coupling, torch.randn(2, *in_shape, dtype=torch.float64))
