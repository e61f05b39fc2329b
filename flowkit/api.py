"""The Python API: build one registered part by name, load or train a recipe, load a trained run.

It is the top of the library's layers (docs/architecture.md): the convenience of defaulting to
the entry-point plugins lives here, so the layers below always take their plugins or registries
as arguments.

`load_run` and `train` import the run engine when called, so ``import flowkit`` stays light
for plugins. docs/python-api.md walks through them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowkit.build import Builder
from flowkit.errors import RecipeError
from flowkit.kinds import KINDS
from flowkit.params import PartRef
from flowkit.plugins import Plugins, make_plugins
from flowkit.recipes.load import Recipe
from flowkit.recipes.load import load_recipe as _load_recipe
from flowkit.recipes.schema import validate_part
from flowkit.recipes.toml_write import toml_value
from flowkit.registry import Registries

if TYPE_CHECKING:
    import torch

    from flowkit.runs.trained import TrainedRun
    from flowkit.runs.trainer import Reporter

_default: Plugins | None = None


def default_plugins() -> Plugins:
    """The entry-point plugins, loaded once per process for the Python API."""
    global _default
    if _default is None:
        _default = make_plugins()
    return _default


def build(kind: str, name: str, *, plugins: Plugins | None = None, **kwargs: Any) -> Any:
    """Builds part ``kind:name``: ``build("coupling", "affine", in_shape=(4, 8, 8))``.

    Keyword arguments the kind's factory takes (``flowkit.kinds.KINDS[kind].shape_kwargs``) go
    to the factory; ``context_shape`` defaults to ``None``. Every other one is a parameter of the part, validated as a recipe table would be (nested parts as dicts:
    ``net={"use": "glow_cnn", "hidden": 32}``).
    """
    plugins = plugins or default_plugins()
    shape_kwargs = KINDS[kind].shape_kwargs if kind in KINDS else ()
    shape = {k: kwargs.pop(k) for k in shape_kwargs if k in kwargs}
    if "context_shape" in shape_kwargs:
        shape.setdefault("context_shape", None)
    ref = validate_part(plugins.registries, kind, {"use": name, **kwargs}, path=f"{kind}:{name}")
    return Builder(plugins.registries)(ref, **shape)


def load_recipe(path: str | Path, registries: Registries | None = None, *, preset: str | None = None,
                overrides: Sequence[str] = ()) -> Recipe:
    """A recipe file read, merged (``extends``, ``preset``, ``--set``-style ``overrides``) and
    validated against ``registries`` (default: the installed plugins'); `RecipeError` lists every
    problem."""
    registries = registries if registries is not None else default_plugins().registries
    return _load_recipe(path, registries, preset=preset, overrides=tuple(overrides))


def ref(kind: str, name: str, *, plugins: Plugins | None = None, **params: Any) -> PartRef:
    """A validated `PartRef`, for composing parts in Python."""
    plugins = plugins or default_plugins()
    return validate_part(plugins.registries, kind, {"use": name, **params}, path=f"{kind}:{name}")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", *,
             plugins: Plugins | None = None) -> TrainedRun:
    """A trained run from its directory, with its model and dequantizer on ``device``:
    ``run = flowkit.load_run("runs/glow-20261123-101500")``; then ``run.bpd(x)``,
    ``run.log_prob(x)``, ``run.sample(n, temperature=0.7)`` and, for models that can,
    ``run.superres(x_low, level)`` (see `flowkit.runs.trained.TrainedRun`). Loads the latest
    checkpoint, so it works on a run that is still training, too."""
    from flowkit.runs.trained import TrainedRun, load_trained

    rundir, session = load_trained(Path(run_dir), plugins or default_plugins(), device=device)
    return TrainedRun(rundir, session)


def train(recipe: str | Path, *, overrides: Mapping[str, Any] | Sequence[str] = (), preset: str | None = None,
          out: str | Path | None = None, overwrite: bool = False, plugins: Plugins | None = None,
          reporter: Reporter | None = None) -> dict[str, Any]:
    """Runs a recipe as ``flowkit run`` does (train, evaluate, sample, write the run directory)
    and returns its summary (summary.json) plus ``run_dir``, the directory it wrote.

    ``overrides``: ``{"train.lr": 3e-4, "model.levels": 2}`` or ``["train.lr=3e-4"]``, as
    ``--set``; a dict value sets the keys under it (``{"model.step.coupling": {"use": "additive"}}``).
    ``reporter``: progress callbacks (`flowkit.runs.trainer.Reporter`); default silent.
    """
    from flowkit.runs.run import start_run
    from flowkit.runs.trainer import SilentReporter

    rundir, summary = start_run(Path(recipe), plugins or default_plugins(), reporter or SilentReporter(),
                                preset=preset, overrides=override_strings(overrides),
                                out=None if out is None else Path(out), overwrite=overwrite)
    return {**summary, "run_dir": str(rundir.path)}


def override_strings(overrides: Mapping[str, Any] | Sequence[str]) -> tuple[str, ...]:
    """Python overrides as ``--set`` strings (``key=TOML value``), so the run directory's
    recipe.toml records them as it records the command line's."""
    if isinstance(overrides, str):
        return (overrides,)
    if not isinstance(overrides, Mapping):
        return tuple(overrides)
    items: list[str] = []

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for sub, v in value.items():
                add(f"{key}.{sub}", v)
            return
        try:
            text = toml_value(value)
        except TypeError:
            raise RecipeError(f"override {key} = {value!r} is not a value a recipe can hold; use a bool, int, "
                              "float, string, or a list of them.") from None
        items.append(f"{key}={text}")

    for key, value in overrides.items():
        add(str(key), value)
    return tuple(items)
