"""An ablation file: a grid or a list of variants over recipes, at one budget, over seeds.

```toml
[ablation]
name = "couplings"
recipe = "../wavelet_flow_affine.toml"   # the base of the grid (relative to this file)
seeds = [0, 1, 2]
budget = { minutes = 8.0 }               # steps, images or minutes: the same for every variant
eval_every_seconds = 30.0                # learning-curve points (train.eval_every_seconds)
eval_images = 1000                       # on the first 1000 test images

[grid]                                   # cartesian over every key
"model.step.coupling.use" = ["additive", "affine", "mixlogistic"]

# or named variants, each a recipe plus overrides:
# [[variants]]
# name = "glow"
# recipe = "../glow.toml"
# set = ["train.lr=2e-3"]

[slurm]                                  # --executor slurm (submitit)
partition = "gpu"

[presets.smoke]                          # merged over [ablation]
recipe_preset = "smoke"
budget = { steps = 3 }
```

`load_ablation` validates the file and resolves every run (variant x seed) with the recipe
loader before anything starts, so a typo in the last variant fails at once, naming it.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowkit.errors import RecipeError
from flowkit.params import param
from flowkit.recipes.load import Recipe, deep_merge, load_recipe, parse_override, unknown_sections
from flowkit.recipes.schema import validate_fields
from flowkit.recipes.toml_write import toml_value
from flowkit.registry import Registries

SECTIONS = ("ablation", "grid", "variants", "slurm", "presets")


@dataclass(frozen=True, kw_only=True)
class BudgetParams:
    steps: int = param(0, "training steps of every run")
    images: int = param(0, "training images of every run (steps = images / its batch size)")
    minutes: float = param(0.0, "minutes of training of every run (unfair with --jobs > 1 on one machine)")

    def __post_init__(self) -> None:
        given = [k for k in ("steps", "images", "minutes") if getattr(self, k)]
        if len(given) != 1 or min(self.steps, self.images, self.minutes) < 0:
            raise ValueError("budget needs exactly one of steps, images or minutes, > 0.")

    @property
    def kind(self) -> str:
        return next(k for k in ("steps", "images", "minutes") if getattr(self, k))


@dataclass(frozen=True, kw_only=True)
class AblationParams:
    name: str = param(doc="name of the ablation; the default output is runs/ablations/<name>[-<preset>]")
    description: str = param("", "what is compared, and what the budget is")
    recipe: str = param("", "base recipe of the grid, relative to this file")
    recipe_preset: str = param("", "preset of every variant's recipe (e.g. smoke)")
    seeds: tuple[int, ...] = param((0,), "train.seed of the runs of each variant")
    eval_every_seconds: float = param(0.0, "learning-curve points every this many training seconds (0: none)")
    eval_images: int = param(1000, "test images of the curve points (the first N)")
    target_bpd: float = param(0.0, "report the time to reach this test bits/dim (0: the worst final one)")
    set: tuple[str, ...] = param((), "overrides applied to every run, before the variant's own")
    jobs: int = param(1, "runs at a time with --executor local")
    temperature: float = param(1.0, "temperature of the sample mosaic")

    def __post_init__(self) -> None:
        if not self.seeds or self.jobs < 1 or self.eval_every_seconds < 0 or self.eval_images < 0:
            raise ValueError("seeds must be non-empty, jobs >= 1, eval_every_seconds and eval_images >= 0.")


@dataclass(frozen=True, kw_only=True)
class VariantParams:
    name: str = param(doc="the variant's name in the report")
    recipe: str = param("", "its recipe, relative to the ablation file (default: [ablation] recipe)")
    preset: str = param("", "its recipe's preset (default: [ablation] recipe_preset)")
    set: tuple[str, ...] = param((), "its overrides")


@dataclass(frozen=True, kw_only=True)
class SlurmParams:
    cluster: Literal["slurm", "local"] = param(
        "slurm", 'slurm submits with sbatch; "local" runs the same submitit jobs on this machine (for tests)')
    partition: str = param("", "SLURM partition (empty: the cluster's default)")
    gpus_per_node: int = param(0, "GPUs per job")
    cpus_per_task: int = param(2, "CPU cores per job")
    mem_gb: int = param(16, "memory per job, GiB")
    timeout_min: int = param(60, "time limit per job, minutes")


@dataclass(frozen=True)
class Run:
    """One run of the ablation: a variant at a seed, resolved."""

    variant: str
    seed: int
    recipe_path: Path
    preset: str
    overrides: tuple[str, ...]
    recipe: Recipe

    @property
    def slug(self) -> str:
        return f"{slug(self.variant)}-seed{self.seed}"


@dataclass(frozen=True)
class Ablation:
    source: Path
    preset: str
    params: AblationParams
    budget: BudgetParams
    slurm: SlurmParams
    variants: list[str]
    runs: list[Run]
    duplicates: dict[str, str] = field(default_factory=dict)  # variant -> the earlier variant it equals

    @property
    def default_out(self) -> Path:
        return Path("runs") / "ablations" / (self.params.name + (f"-{self.preset}" if self.preset else ""))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "variant"


def _grid_variants(grid: dict[str, Any], problems: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            problems.append(f'grid."{key}" should be a non-empty list of values.')
    if problems:
        return []
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        sets = tuple(f"{k}={toml_value(v)}" for k, v in zip(keys, values, strict=True))
        if len(keys) == 1:
            name = str(values[0])
        else:
            name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, values, strict=True))
        out.append((name, sets))
    return out


def _budget_overrides(budget: BudgetParams, recipe: Recipe) -> tuple[str, ...]:
    if budget.kind == "minutes":
        return ("train.steps=0", f"train.minutes={budget.minutes}")
    steps = budget.steps or math.ceil(budget.images / recipe.train.batch_size)
    return (f"train.steps={steps}", "train.minutes=0.0")


def load_ablation(path: str | Path, registries: Registries, *, preset: str | None = None) -> Ablation:
    """Reads and validates an ablation file and resolves all its runs; raises `RecipeError`
    listing every problem (naming the variant) before anything runs."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"no ablation file at {path}.", source)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"is not valid TOML: {exc}.", source) from None
    problems = unknown_sections(table, SECTIONS, "a section of an ablation file")
    presets = table.get("presets", {})
    ablation = table.get("ablation", {})
    if preset:
        if preset not in presets:
            raise RecipeError(f'has no preset "{preset}". Presets: {", ".join(presets) or "none"}.', source)
        ablation = deep_merge(ablation, presets[preset])
        if "budget" in presets[preset]:  # a budget replaces the other: steps are not minutes
            ablation["budget"] = presets[preset]["budget"]
    ablation = dict(ablation)
    budget_table = ablation.pop("budget", None)
    params = validate_fields(registries, AblationParams, ablation, "ablation", problems, extra_keys=())
    if not isinstance(budget_table, dict):
        problems.append("ablation.budget is required: { steps = N }, { images = N } or { minutes = M }, "
                        "the same for every variant.")
        budget_table = {"steps": 1}
    budget = validate_fields(registries, BudgetParams, budget_table, "ablation.budget", problems, extra_keys=())
    slurm = validate_fields(registries, SlurmParams, table.get("slurm", {}), "slurm", problems, extra_keys=())
    if problems:
        raise RecipeError(problems, source)
    grid, listed = table.get("grid"), table.get("variants")
    if (grid is None) == (listed is None):
        problems.append("give either a [grid] table or [[variants]], not both and not neither.")
    variants: list[tuple[str, Path, str, tuple[str, ...]]] = []
    base = path.parent
    if grid is not None:
        if not params.recipe:
            problems.append("ablation.recipe is required with a [grid]: the recipe the grid varies.")
        for name, sets in _grid_variants(grid, problems):
            variants.append((name, base / params.recipe, params.recipe_preset, sets))
    for index, entry in enumerate(listed or []):
        v = validate_fields(registries, VariantParams, entry, f"variants[{index}]", problems, extra_keys=())
        if v is None:
            continue
        recipe = v.recipe or params.recipe
        if not recipe:
            problems.append(f'variants[{index}] ("{v.name}") has no recipe, and [ablation] names none.')
            continue
        variants.append((v.name, base / recipe, v.preset or params.recipe_preset, v.set))
    names = [v[0] for v in variants]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f'variant name "{name}" is used twice; names must be unique.')
    if problems:
        raise RecipeError(problems, source)
    runs: list[Run] = []
    for name, recipe_path, recipe_preset, sets in variants:
        common = (*params.set, *sets)
        try:
            for item in common:
                parse_override(item)
            recipe = load_recipe(recipe_path, registries, preset=recipe_preset or None, overrides=common)
            for seed in params.seeds:
                overrides = (*common, *_budget_overrides(budget, recipe), f"train.seed={seed}",
                             f"train.eval_every_seconds={params.eval_every_seconds}",
                             f"train.eval_images={params.eval_images}")
                resolved = load_recipe(recipe_path, registries, preset=recipe_preset or None, overrides=overrides)
                runs.append(Run(name, seed, recipe_path, recipe_preset, overrides, resolved))
        except RecipeError as exc:
            problems.append(f'variant "{name}": {exc}')
    if problems:
        raise RecipeError(problems, source)
    return Ablation(path, preset or "", params, budget, slurm, names, runs, find_duplicates(runs))


#: Keys that differ between runs without making them different variants.
NOT_A_VARIANT = ("recipe.", "train.seed", "train.threads", "log.")  # log.*: where metrics go, not what runs


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved recipe table as ``{"model.step.coupling.use": ..., ...}``."""
    out = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def comparable(table: dict[str, Any], ignore: tuple[str, ...] = NOT_A_VARIANT) -> dict[str, Any]:
    """The flat values of a resolved recipe that tell runs apart, without the ``ignore`` prefixes."""
    return {k: v for k, v in flatten(table).items() if not k.startswith(ignore)}


def find_duplicates(runs: list[Run]) -> dict[str, str]:
    """Variants whose resolved recipes equal an earlier variant's (an override that changes
    nothing): variant -> the earlier one."""
    first_seed: dict[str, Run] = {}
    for run in runs:
        first_seed.setdefault(run.variant, run)
    seen: list[tuple[str, dict[str, Any]]] = []
    duplicates = {}
    for name, run in first_seed.items():
        table = comparable(run.recipe.to_dict())
        twin = next((other for other, t in seen if t == table), None)
        if twin is not None:
            duplicates[name] = twin
        else:
            seen.append((name, table))
    return duplicates
