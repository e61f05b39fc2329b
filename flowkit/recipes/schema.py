"""Validation of TOML tables against Params dataclasses, with every problem reported at once.

The types allowed in Params are stated once, in `flowkit.params.field_type`; here values are
converted to them. An int is accepted where a float is expected; a bool is never a number.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, get_args

from flowkit.errors import RecipeError, UnknownPartError
from flowkit.params import DERIVED, PartRef, declared_copies, field_type, make_copy, paths_of_kind
from flowkit.registry import Registries

RESERVED = "use"
#: Keys a table inherited from the part it replaced (see `flowkit.recipes.load.deep_merge`).
INHERITED = "__inherited__"


def type_name(tp: Any) -> str:
    """A human name of a Params field type, as `flowkit parts` prints it (`flowkit.params.FieldType`)."""
    return field_type(tp).name


def field_types(params_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(params_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(params_cls)}


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _check_scalar(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """``value`` converted to the field type ``tp`` (`flowkit.params.field_type`), or None after
    appending the problem (the key, the value, what was expected)."""
    expected = field_type(tp)
    if expected.form == "choice":
        choices = expected.choices
        if value in choices and type(value) is type(choices[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        allowed = ", ".join(_show(c) for c in choices)
        problems.append(f"{key} = {_show(value)} is not allowed.{hint} Allowed: {allowed}.")
        return None
    if expected.form == "list":
        inner = get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key} = {_show(value)} should be a list of {expected.item.name}.")  # type: ignore[union-attr]
            return None
        return tuple(_check_scalar(inner, v, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if expected.scalar is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan passes every range check (nan < 0 is false)
                problems.append(f"{key} = {value} should be a finite float; TOML's nan and inf are not allowed.")
                return None
            return float(value)
    elif expected.scalar is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # TOML's integers are 64-bit; torch's seeds and sizes too
                problems.append(f"{key} = {value} is outside the 64-bit integer range TOML allows.")
                return None
            return value
    elif expected.scalar in (bool, str):
        if isinstance(value, expected.scalar):
            return value
    problems.append(f"{key} = {_show(value)} should be {expected.name}, not {type(value).__name__}.")
    return None


def _validate(
    registries: Registries, kind: str, table: Any, path: str, problems: list[str],
    default_use: str | None = None,
) -> PartRef | None:
    if isinstance(table, str):  # shorthand: coupling = "affine"
        table = {RESERVED: table}
    if not isinstance(table, dict):
        problems.append(f'{path} should be a table with `use = "<{kind} name>"`, not {_show(table)}.')
        return None
    # A table without `use` tunes the default part: [model.step.coupling] with only `mask = ...`.
    name = table.get(RESERVED, default_use)
    if not isinstance(name, str):
        names = ", ".join(registries[kind].names())
        problems.append(f'{path}.use is missing: name the {kind} to use. Available: {names}.')
        return None
    try:
        part = registries.part(kind, name)
    except UnknownPartError as exc:
        problems.append(f"{path}.use = {exc}")
        return None
    before = len(problems)
    params = validate_fields(registries, part.params, table, path, problems, kind=kind, name=name,
                             extra_keys=(RESERVED, DERIVED))
    if len(problems) > before:
        return None
    ref = PartRef(kind, name, params, path=path)
    _check_copies(registries, ref, table, problems)
    return ref if len(problems) == before else None


def _check_copies(registries: Registries, ref: PartRef, table: dict[str, Any], problems: list[str]) -> None:
    """What ``ref`` derives for the copies of its nested parts (`flowkit.params.Copies`), checked
    before anything is built: every value fits the part it is set on; none replaces a value
    the recipe sets (that value would never run); a ``derived`` table, as a run directory's
    recipe.toml has, lists exactly what is derived now."""
    owner = f'{ref.kind} "{ref.use}"'
    before = len(problems)
    for name, copies in declared_copies(ref.params).items():
        template: PartRef = getattr(ref.params, name)
        for rule in copies.derive:
            for sub in paths_of_kind(template, rule.kind):
                target, raw = template, table.get(name)
                for key in sub:
                    target = getattr(target.params, key)
                    raw = raw.get(key) if isinstance(raw, dict) else None
                dotted = ".".join([ref.path, name, *sub, rule.key])
                types = field_types(type(target.params))
                if rule.key not in types:
                    problems.append(
                        f'{dotted}: {owner} sets {rule.key} on each copy ({rule.source}), but {target.kind} '
                        f'"{target.use}" has no parameter {rule.key}; choose a {target.kind} that has it.'
                    )
                    continue
                if isinstance(raw, dict) and rule.key in raw:
                    problems.append(
                        f"{dotted} = {_show(raw[rule.key])} cannot be set: {owner} sets it on each copy "
                        f"({rule.source}), so that value would never run. Remove it."
                    )
                for value in dict.fromkeys(rule.values):
                    _check_scalar(types[rule.key], value, f"{dotted} (set on each copy by {owner}: {rule.source})",
                                  problems)
    if len(problems) > before:
        return
    defaults = lambda kind, use: validate_params(registries, kind, use, {}, f"{kind}:{use}")  # noqa: E731
    for name, copies in declared_copies(ref.params).items():
        for index in range(copies.count):
            try:
                make_copy(getattr(ref.params, name), copies.derive, index, defaults, f"{ref.path}.{name}[{index}]")
            except (TypeError, ValueError) as exc:  # a range check in a nested Params
                problems.append(f"{ref.path}.{name}[{index}] (a copy {owner} builds): {exc}")
                return
    given = table.get(DERIVED)
    if given is not None:
        expected = ref.to_toml().get(DERIVED)
        if expected is None:
            problems.append(f"{ref.path}.{DERIVED}: {owner} derives no values for copies; remove this table.")
        elif given != expected:
            problems.append(
                f"{ref.path}.{DERIVED} does not match what {owner} derives from these parameters "
                f"({_show(expected)}); it is written by flowkit run, not read: remove it."
            )


def _default_use(f: dataclasses.Field) -> str | None:
    if "kind" not in f.metadata or f.default_factory is dataclasses.MISSING:
        return None
    return f.default_factory().use


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def with_default_table(f: dataclasses.Field, value: Any) -> Any:
    """A nested part's table with the field's default table (`part_field`) merged under it, when
    it names the default part (or no part)."""
    default = f.metadata.get("default_table")
    if default is None:
        return value
    if isinstance(value, str):
        value = {RESERVED: value}
    if isinstance(value, dict) and value.get(RESERVED, default[RESERVED]) == default[RESERVED]:
        return _merged(default, value)
    return value


def validate_fields(
    registries: Registries, params_cls: type, table: dict[str, Any], path: str,
    problems: list[str], *, kind: str = "", name: str = "", extra_keys: tuple[str, ...] = (RESERVED,),
) -> Any:
    """Builds a ``params_cls`` from ``table``, appending problems instead of raising."""
    types = field_types(params_cls)
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    inherited = set(table.get(INHERITED, ()))
    table = {k: v for k, v in table.items() if k != INHERITED and not (k in inherited and k not in types)}
    values: dict[str, Any] = {}
    owner = f"{kind} {name}".strip() or "this table"
    for key, value in table.items():
        dotted = f"{path}.{key}" if path else key
        if key in extra_keys:
            continue
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f' Did you mean "{close[0]}"?' if close else ""
            known = ", ".join(types) or "none"
            problems.append(f"{dotted} is not a parameter of {owner}.{hint} Parameters: {known}.")
            continue
        tp, meta = types[key], fields[key].metadata
        if "kind" in meta:
            values[key] = _validate(registries, meta["kind"], with_default_table(fields[key], value), dotted, problems,
                                    _default_use(fields[key]))
        else:
            values[key] = _check_scalar(tp, value, dotted, problems)
    for key, f in fields.items():
        default_use = _default_use(f)
        if key not in table and default_use is not None:
            # Fill in the nested part's defaults, so the resolved recipe states every value.
            values[key] = _validate(registries, f.metadata["kind"], with_default_table(f, {RESERVED: default_use}),
                                    f"{path}.{key}" if path else key, problems)
        if key not in table and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            dotted = f"{path}.{key}" if path else key
            problems.append(f"{dotted} is required ({type_name(types[key])}): {f.metadata.get('doc', '')}".rstrip(": ") + ".")
    if problems:
        return None
    try:
        return params_cls(**values)
    except (TypeError, ValueError) as exc:  # a Params __post_init__ may check ranges
        problems.append(f"{path}: {exc}")
        return None


def validate_part(registries: Registries, kind: str, table: Any, path: str) -> PartRef:
    """Validates a ``{use = ..., ...}`` table of ``kind``; raises `RecipeError` on problems."""
    problems: list[str] = []
    ref = _validate(registries, kind, table, path, problems)
    if problems or ref is None:
        raise RecipeError(problems)
    return ref


def validate_params(registries: Registries, kind: str, name: str, table: dict[str, Any], path: str) -> Any:
    """The Params instance of part ``kind:name`` from a table without ``use``."""
    return validate_part(registries, kind, {RESERVED: name, **table}, path).params
