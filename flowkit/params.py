"""Typed parameters of parts.

Each part declares ``@dataclass(frozen=True, kw_only=True) class Params`` whose fields have
TOML-representable types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``tuple[int, ...]`` / ``tuple[float, ...]`` / ``tuple[str, ...]``, or a nested part
(`PartRef`, declared with `part_field`). A field without a default is required.
Every field carries a one-line ``metadata={"doc": ...}``; `param` and `part_field` set it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


#: The key of a part's table that lists the values it derives for its copies (written to a
#: run's recipe.toml, checked when read back, never set by hand).
DERIVED = "derived"


@dataclass(frozen=True)
class PartRef:
    """A nested part chosen in a recipe: ``{ use = "affine", ... }``.

    ``params`` is the validated Params instance of that part, or ``None`` for its defaults
    (a Params default cannot build the nested Params, since the registry is not known yet).
    ``path`` is where the recipe holds it (``model.step.coupling``; a copy's path has its
    index: ``model.step[3].coupling``), empty for parts a factory builds on its own; it is
    a label for records and errors and takes no part in equality.
    """

    kind: str
    use: str
    params: Any = None
    path: str = field(default="", compare=False)

    def to_toml(self) -> dict[str, Any]:
        """The TOML table of this part. Values the part derives for copies of its nested parts
        are left out of those parts' tables and listed under ``derived`` instead, so that the
        table states exactly the values that are built."""
        table: dict[str, Any] = {"use": self.use}
        if self.params is None:
            return table
        table.update(params_to_toml(self.params))
        derived: dict[str, Any] = {}
        for name, copies in declared_copies(self.params).items():
            template = getattr(self.params, name)
            for rule in copies.derive:
                for sub in paths_of_kind(template, rule.kind):
                    dotted = ".".join([name, *sub, rule.key])
                    node = table[name]
                    for key in sub:
                        node = node[key]
                    node.pop(rule.key, None)
                    # One value stands for all copies; a list has one per copy (derived values
                    # are scalars, so a list is never a single value).
                    same = len(set(map(repr, rule.values))) == 1
                    derived[dotted] = rule.values[0] if same else list(rule.values)
        if derived:
            table[DERIVED] = derived
        return table


def param(default: Any = dataclasses.MISSING, doc: str = "", **kwargs: Any) -> Any:
    """A documented Params field: ``width: int = param(64, "hidden channels")``."""
    metadata = {"doc": doc, **kwargs.pop("metadata", {})}
    if isinstance(default, (list, dict, set)):
        raise TypeError("Params defaults must be immutable; use a tuple.")
    return field(default=default, metadata=metadata, **kwargs)


def part_field(kind: str, default: str | dict[str, Any] | None, doc: str = "") -> Any:
    """A nested part of ``kind``. ``default`` is the registered name used when omitted, or a
    table with ``use`` and some of that part's values (a variational dequantizer's default
    step is a Glow step with a checkerboard mixlogistic coupling); a recipe table without
    ``use``, or with the same ``use``, is merged over it."""
    metadata: dict[str, Any] = {"doc": doc, "kind": kind}
    if default is None:
        return field(metadata=metadata)
    if isinstance(default, dict):
        if not isinstance(default.get("use"), str):
            raise TypeError(f"part_field default table {default!r} needs a `use` name.")
        metadata["default_table"] = default
        name = default["use"]
    else:
        name = default
    return field(default_factory=lambda: PartRef(kind, name), metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class NoParams:
    """For parts without parameters."""


def params_to_toml(params: Any) -> dict[str, Any]:
    """A Params instance as the TOML table that would produce it (defaults included)."""
    table: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, PartRef):
            table[f.name] = value.to_toml()
        elif isinstance(value, tuple):
            table[f.name] = list(value)
        else:
            table[f.name] = value
    return table


# -- what recipes can hold: the one table of accepted field types ------------------------------

#: The scalar types a recipe value can have (TOML's, without dates and tables), by name.
RECIPE_SCALARS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str"}

#: The types a Params field may have, in words, for error messages and docs.
RECIPE_TYPES = ("bool, int, float, str, Literal[...] of one of those, tuple[T, ...] of those, or a nested "
                "part declared with part_field(kind, ...)")


@dataclass(frozen=True)
class FieldType:
    """A Params field's annotation as recipes see it: one of the accepted types.

    ``form`` is ``"scalar"`` (``scalar`` is bool, int, float or str), ``"choice"``
    (``Literal[...]``: ``choices``, all of type ``scalar``), ``"list"`` (``tuple[T, ...]``:
    ``item`` is T's FieldType) or ``"part"`` (a `PartRef`, declared with `part_field`). The
    recipe validator (`flowkit.recipes.schema`) converts values by it, `flowkit parts` names it,
    and the registry refuses, when a plugin registers a part, any annotation `field_type` rejects.
    """

    form: Literal["scalar", "choice", "list", "part"]
    scalar: type | None = None
    choices: tuple[Any, ...] = ()
    item: FieldType | None = None

    @property
    def name(self) -> str:
        """The type in words, as `flowkit parts` and error messages print it."""
        if self.form == "choice":
            return " | ".join(repr(c).replace("'", '"') for c in self.choices)
        if self.form == "list":
            return f"list of {self.item.name}"  # type: ignore[union-attr]
        if self.form == "part":
            return "part"
        return RECIPE_SCALARS[self.scalar]  # type: ignore[index]


def field_type(tp: Any) -> FieldType:
    """The `FieldType` of annotation ``tp``; a TypeError saying why a recipe cannot hold it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or not kinds <= set(RECIPE_SCALARS):
            raise TypeError(f"Literal{list(choices)!r} mixes types or holds values TOML has no type for")
        return FieldType("choice", next(iter(kinds)), choices)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{tp!r} is a fixed-length tuple; recipes give lists of any length (use tuple[T, ...])")
        item = field_type(args[0])
        if item.form == "part":
            raise TypeError(f"{tp!r} is a list of parts; recipes nest parts one per field (part_field)")
        return FieldType("list", item=item)
    if tp is PartRef:
        return FieldType("part")
    if tp in RECIPE_SCALARS:
        return FieldType("scalar", tp)
    raise TypeError("recipes cannot hold it")


def params_field_problems(params_cls: type, kinds: Iterable[str]) -> list[str]:
    """One sentence per field of ``params_cls`` that no recipe could set (empty when all fit).

    ``kinds`` are the kinds of part a nested part (`part_field`) may name.
    """
    try:
        hints = typing.get_type_hints(params_cls)
    except Exception as exc:  # noqa: BLE001 - any failure to resolve an annotation is the plugin's bug
        return [f"its annotations cannot be resolved ({type(exc).__name__}: {exc})"]
    kinds = set(kinds)
    problems = []
    for f in dataclasses.fields(params_cls):
        tp = hints.get(f.name)
        if "kind" in f.metadata:
            if f.metadata["kind"] not in kinds:
                problems.append(f'field "{f.name}" is a nested part of kind "{f.metadata["kind"]}", which is not a '
                                f"kind of part (kinds: {', '.join(sorted(kinds))})")
            continue
        if tp is PartRef:
            problems.append(f'field "{f.name}" is a PartRef without part_field(kind, ...): recipes cannot tell '
                            "which kind of part it names")
            continue
        try:
            field_type(tp)
        except TypeError as why:
            problems.append(f'field "{f.name}" has type {tp!r}: {why}')
    return problems


# -- assembly: copies of a nested part, and the values a part derives for each copy -------------


@dataclass(frozen=True)
class Derive:
    """A parameter that a composite part sets on each copy of a nested part.

    Args:
        kind: the kind of part it is set on: every part of this kind inside the copy (the copy
            itself included), however deep (a coupling inside a Glow step inside a MaCow step).
        key: the parameter.
        values: one value per copy.
        source: what decides the values, for the reader and for errors
            (``"alternates step by step"``, ``"model.hidden, per level"``).
    """

    kind: str
    key: str
    values: tuple[Any, ...]
    source: str


@dataclass(frozen=True)
class Copies:
    """``count`` copies of the part in one field, each with the `Derive` values of its index."""

    count: int
    derive: tuple[Derive, ...] = ()

    def __post_init__(self) -> None:
        for rule in self.derive:
            if len(rule.values) != self.count:
                raise ValueError(f"{rule.kind}.{rule.key} derives {len(rule.values)} values for {self.count} copies.")


# The most copies a field may declare. Recipe loading derives a value per copy, so a mistyped
# `depth = 1000000000` would exhaust memory before any check ran; Params of composite parts
# bound their counts with this (a Glow of 32 x 3 steps is 96; nothing real nears 10,000).
MAX_COPIES = 10_000


@runtime_checkable
class AssemblesCopies(Protocol):
    """Params of a composite part that builds some nested parts several times (steps of a flow).

    ``copies()`` names those fields and what differs between the copies. The recipe loader
    applies it before the recipe is resolved: it refuses a value the user set that a copy
    would override, records the derived values in the resolved recipe, and the part's
    factory builds exactly those copies (``build.copies(params, field)``).
    """

    def copies(self) -> dict[str, Copies]: ...


def declared_copies(params: Any) -> dict[str, Copies]:
    """The copies ``params`` declares. A field built no times derives nothing: its template is
    not built, so its values are neither overridden nor checked against the rules."""
    if not isinstance(params, AssemblesCopies):
        return {}
    return {name: c if c.count else Copies(0) for name, c in params.copies().items()}


def paths_of_kind(ref: PartRef, kind: str, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Field paths, relative to ``ref``, of every part of ``kind`` in ``ref`` (``()``: ``ref`` itself)."""
    found = [prefix] if ref.kind == kind else []
    if ref.params is not None:
        for f in dataclasses.fields(ref.params):
            child = getattr(ref.params, f.name)
            if isinstance(child, PartRef):
                found += paths_of_kind(child, kind, (*prefix, f.name))
    return found


def make_copy(ref: PartRef, rules: tuple[Derive, ...], index: int, defaults: Callable[[str, str], Any],
              path: str) -> PartRef:
    """Copy ``index`` of ``ref``: every nested part of a rule's kind gets that rule's value,
    and every path is relabelled under ``path`` (``model.step[3]``)."""
    params = ref.params if ref.params is not None else defaults(ref.kind, ref.use)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        child = getattr(params, f.name)
        if isinstance(child, PartRef):
            changes[f.name] = make_copy(child, rules, index, defaults, f"{path}.{f.name}")
    for rule in rules:
        if ref.kind == rule.kind:
            changes[rule.key] = rule.values[index]
    return PartRef(ref.kind, ref.use, dataclasses.replace(params, **changes), path=path)
