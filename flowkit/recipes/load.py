"""Loading a recipe: TOML file → ``extends`` → preset → ``--set`` overrides → validated `Recipe`.

Every problem is collected and reported at once, naming the file and the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowkit.errors import RecipeError
from flowkit.kinds import PART_SECTIONS
from flowkit.params import PartRef, params_to_toml
from flowkit.recipes.schema import INHERITED, _validate, validate_fields
from flowkit.recipes.sections import EvalParams, LogParams, RecipeMeta, SampleParams, TrainParams
from flowkit.recipes.toml_write import comment, dumps
from flowkit.registry import Registries

ENGINE_SECTIONS = {"recipe": RecipeMeta, "train": TrainParams, "eval": EvalParams, "sample": SampleParams,
                   "log": LogParams}
#: Every top-level table: [recipe], the part sections of `flowkit.kinds` ([data], [dequantizer],
#: [model]: each a field of `Recipe`), the engine's own, and [presets].
SECTIONS = ["recipe", *PART_SECTIONS, *[name for name in ENGINE_SECTIONS if name != "recipe"], "presets"]
MAX_EXTENDS_DEPTH = 8


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: names resolved to typed Params, defaults filled in."""

    meta: RecipeMeta
    data: PartRef
    dequantizer: PartRef
    model: PartRef
    train: TrainParams
    sample: SampleParams
    eval: EvalParams = field(default_factory=lambda: EvalParams())
    log: LogParams = field(default_factory=lambda: LogParams())
    source: str = ""
    preset: str = ""
    overrides: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe as a TOML table; loading it gives an equal Recipe."""
        meta = params_to_toml(self.meta)
        meta["extends"] = ""
        return {
            "recipe": meta,
            "data": self.data.to_toml(),
            "dequantizer": self.dequantizer.to_toml(),
            "model": self.model.to_toml(),
            "train": params_to_toml(self.train),
            "eval": params_to_toml(self.eval),
            "sample": params_to_toml(self.sample),
            "log": params_to_toml(self.log),
        }

    def to_toml(self) -> str:
        header = f"Resolved from {self.source}"
        if self.preset:
            header += f" with preset {self.preset}"
        if self.overrides:
            header += " and --set " + " ".join(self.overrides)
        return (comment(header) + "\n# Rerun with: flowkit run recipe.toml\n# Every value here is the value that was built. A [*.derived] table lists what a part sets\n"
                "# on each copy of a nested part (one value per copy, or one for all); those keys are\n"
                "# left out of the copied part's table, and cannot be set.\n\n" + dumps(self.to_dict()))

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; a changed ``use`` replaces the whole table."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if "use" in value and value["use"] != out[key].get("use"):
                # Another part: keys of the old part carry over only if the new part has them
                # too (a coupling's mask and net survive affine -> additive); the validator
                # drops the others instead of calling them typos.
                inherited = {k: v for k, v in out[key].items() if k not in value and k != "use"}
                out[key] = {**copy.deepcopy(inherited), **copy.deepcopy(value)}
                if inherited:
                    out[key][INHERITED] = sorted(inherited)
            else:
                out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_toml(path: Path, depth: int = 0) -> dict[str, Any]:
    """The TOML table of ``path`` with its ``extends`` chain merged in."""
    if depth > MAX_EXTENDS_DEPTH:
        raise RecipeError(f"recipe.extends is nested deeper than {MAX_EXTENDS_DEPTH} (a cycle?).", str(path))
    if not path.is_file():
        raise RecipeError(f"no recipe file at {path}.", str(path))
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"is not valid TOML: {exc}.", str(path)) from None
    except UnicodeDecodeError:
        raise RecipeError("is not a UTF-8 text file.", str(path)) from None
    parent = table.get("recipe", {}).get("extends", "")
    if parent:
        base = read_toml((path.parent / parent).resolve(), depth + 1)
        base.get("recipe", {}).pop("name", None)
        table = deep_merge(base, table)
        table["recipe"]["extends"] = ""
    return table


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], value); the value is parsed as TOML, else kept as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f'--set {item!r} should look like "section.key=value", e.g. "train.lr=3e-4".')
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words: --set model.decomposition.use=db2
    return key.split("."), value


def apply_overrides(table: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        patch: dict[str, Any] = value if not keys else {}
        node = patch
        for key in keys[:-1]:
            node[key] = {}
            node = node[key]
        node[keys[-1]] = value
        table = deep_merge(table, patch)
    return table


def resolve_table(
    table: dict[str, Any], preset: str | None, overrides: list[str] | tuple[str, ...], source: str
) -> dict[str, Any]:
    presets = table.pop("presets", {})
    if preset:
        if preset not in presets:
            close = difflib.get_close_matches(preset, list(presets), n=1)
            hint = f' Did you mean "{close[0]}"?' if close else ""
            names = ", ".join(presets) or "none"
            raise RecipeError(f'has no preset "{preset}".{hint} Presets: {names}.', source)
        table = deep_merge(table, presets[preset])
    return apply_overrides(table, overrides)


def unknown_sections(table: dict[str, Any], sections: list[str] | tuple[str, ...], what: str) -> list[str]:
    """One problem per top-level table that is not one of ``sections``, with a did-you-mean."""
    problems = []
    for key in table:
        if key not in sections:
            close = difflib.get_close_matches(key, list(sections), n=1)
            hint = f' Did you mean "{close[0]}"?' if close else ""
            problems.append(f"[{key}] is not {what}.{hint} Sections: {', '.join(sections)}.")
    return problems


def validate_recipe(
    registries: Registries, table: dict[str, Any], source: str, preset: str = "",
    overrides: tuple[str, ...] = (),
) -> Recipe:
    problems = unknown_sections(table, SECTIONS, "a recipe section")
    values: dict[str, Any] = {}
    for section, kind in PART_SECTIONS.items():
        if section not in table:
            problems.append(f'[{section}] is missing: add a table with `use = "<{kind} name>"`.')
            continue
        values[section] = _validate(registries, kind, table[section], section, problems)
    for section, cls in ENGINE_SECTIONS.items():
        sub = table.get(section, {})
        if not isinstance(sub, dict):
            problems.append(f"[{section}] should be a table.")
            continue
        values[section] = validate_fields(registries, cls, sub, section, problems, extra_keys=())
    problems += _across_sections(values)
    if problems:
        raise RecipeError(problems, source)
    return Recipe(
        meta=values["recipe"], data=values["data"], dequantizer=values["dequantizer"],
        model=values["model"], train=values["train"], sample=values["sample"], eval=values["eval"],
        log=values["log"],
        source=source, preset=preset or "", overrides=tuple(overrides),
    )


def _across_sections(values: dict[str, Any]) -> list[str]:
    """Problems of keys that depend on another section's (once each section is valid)."""
    train, data = values.get("train"), getattr(values.get("data"), "params", None)
    if train is None or data is None or train.label_dropout == 0:
        return []
    if not getattr(data, "labels", False):
        return [f"train.label_dropout = {train.label_dropout} replaces training labels by \"no class\", but "
                "data.labels = false reads none; set data.labels = true (on a dataset with labels) or "
                "train.label_dropout = 0."]
    return []


def load_recipe(
    path: str | Path, registries: Registries, *, preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Recipe:
    """Reads, merges and validates a recipe file against ``registries``; raises `RecipeError`
    listing every problem. (`flowkit.load_recipe` is this with the entry-point plugins'.)"""
    path = Path(path)
    source = str(path)
    table = read_toml(path.resolve())
    table = resolve_table(table, preset, overrides, source)
    return validate_recipe(registries, table, source, preset or "", tuple(overrides))


def preset_names(path: str | Path) -> list[str]:
    return list(read_toml(Path(path).resolve()).get("presets", {}))
