"""Validation of recipe tables against Params: every problem at once, each with its fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from flowkit import NoParams, PartRef, RecipeError, hookimpl, param, part_field
from flowkit.plugins import make_plugins
from flowkit.recipes.schema import type_name, validate_params, validate_part
from flowkit.registry import RegisterFn, Registries

PATH = "model.step.coupling"


@dataclass(frozen=True, kw_only=True)
class ToyParams:
    width: int = param(8, "hidden channels")
    rate: float = param(0.5, "a rate")
    mode: Literal["fast", "slow"] = param("fast", "speed")
    flag: bool = param(False, "a switch")
    sizes: tuple[int, ...] = param((1, 2), "sizes")
    net: PartRef = part_field("net", "tiny", "the conditioner")

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width = {self.width} must be >= 1.")


@dataclass(frozen=True, kw_only=True)
class NeedsParams:
    path: str = param(doc="a data file")
    count: int = param(doc="how many")


@dataclass(frozen=True, kw_only=True)
class TinyParams:
    hidden: int = param(4, "channels")


def _factory(params: object, **kwargs: object) -> None:
    """Builds nothing."""


class _Toys:
    @hookimpl
    def flowkit_register_steps(self, register: RegisterFn) -> None:
        register("toy", _factory, params=ToyParams)
        register("needs", _factory, params=NeedsParams)

    @hookimpl
    def flowkit_register_nets(self, register: RegisterFn) -> None:
        register("tiny", _factory, params=TinyParams)
        register("bare", _factory, params=NoParams)


@pytest.fixture(scope="module")
def registries() -> Registries:
    return make_plugins(entry_points=False, extra=[_Toys()]).registries


def _problems(registries: Registries, table: object, kind: str = "step") -> list[str]:
    with pytest.raises(RecipeError) as exc:
        validate_part(registries, kind, table, PATH)
    return exc.value.problems


def test_defaults_fill_every_field(registries: Registries) -> None:
    ref = validate_part(registries, "step", {"use": "toy"}, PATH)
    # Nested parts get their own defaults too, so a resolved recipe states every value.
    assert ref == PartRef("step", "toy", ToyParams(net=PartRef("net", "tiny", TinyParams())))


def test_nested_table_without_use_tunes_the_default_part(registries: Registries) -> None:
    params = validate_part(registries, "step", {"use": "toy", "net": {"hidden": 2}}, PATH).params
    assert params.net == PartRef("net", "tiny", TinyParams(hidden=2))


def test_values_are_converted_to_the_field_types(registries: Registries) -> None:
    table = {"use": "toy", "width": 3, "rate": 1, "mode": "slow", "flag": True, "sizes": [3, 4],
             "net": {"use": "tiny", "hidden": 2}}
    params = validate_part(registries, "step", table, PATH).params
    assert params == ToyParams(width=3, rate=1.0, mode="slow", flag=True, sizes=(3, 4),
                               net=PartRef("net", "tiny", TinyParams(hidden=2)))
    assert type(params.rate) is float  # an int is accepted for a float, and converted


def test_nested_part_shorthand_string(registries: Registries) -> None:
    params = validate_part(registries, "step", {"use": "toy", "net": "bare"}, PATH).params
    assert params.net == PartRef("net", "bare", NoParams())


def test_unknown_key_suggests_and_lists_parameters(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "toy", "widht": 3})
    assert problem == (
        f'{PATH}.widht is not a parameter of step toy. Did you mean "width"? '
        "Parameters: width, rate, mode, flag, sizes, net."
    )


def test_wrong_type_names_the_expected_type(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "toy", "width": "8"})
    assert problem == f'{PATH}.width = "8" should be int, not str.'


def test_bool_is_refused_for_int_and_float(registries: Registries) -> None:
    problems = _problems(registries, {"use": "toy", "width": True, "rate": False})
    assert problems == [f"{PATH}.width = true should be int, not bool.",
                        f"{PATH}.rate = false should be float, not bool."]


def test_float_is_refused_for_int(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "toy", "width": 2.5})
    assert problem == f"{PATH}.width = 2.5 should be int, not float."


def test_literal_lists_its_choices(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "toy", "mode": "fsat"})
    assert problem == f'{PATH}.mode = "fsat" is not allowed. Did you mean "fast"? Allowed: "fast", "slow".'


def test_list_items_are_checked_one_by_one(registries: Registries) -> None:
    problems = _problems(registries, {"use": "toy", "sizes": [1, "two", 3.0]})
    assert problems == [f'{PATH}.sizes[1] = "two" should be int, not str.',
                        f"{PATH}.sizes[2] = 3.0 should be int, not float."]
    [problem] = _problems(registries, {"use": "toy", "sizes": 4})
    assert problem == f"{PATH}.sizes = 4 should be a list of int."


def test_nested_part_with_unknown_use(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "toy", "net": {"use": "tinny"}})
    assert problem == f'{PATH}.net.use = "tinny" is not a registered net. Did you mean "tiny"? Available: bare, tiny.'


def test_nested_part_parameters_are_validated(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "toy", "net": {"use": "tiny", "hiden": 2}})
    assert problem.startswith(f'{PATH}.net.hiden is not a parameter of net tiny. Did you mean "hidden"?')


def test_unknown_use_lists_the_parts_of_the_kind(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "tyo"})
    assert problem == f'{PATH}.use = "tyo" is not a registered step. Did you mean "toy"? Available: needs, toy.'


def test_missing_use_lists_the_parts_of_the_kind(registries: Registries) -> None:
    [problem] = _problems(registries, {"width": 3})
    assert problem == f"{PATH}.use is missing: name the step to use. Available: needs, toy."


def test_missing_required_fields_are_named_with_type_and_doc(registries: Registries) -> None:
    problems = _problems(registries, {"use": "needs"})
    assert problems == [f"{PATH}.path is required (str): a data file.",
                        f"{PATH}.count is required (int): how many."]


def test_post_init_range_check_is_reported(registries: Registries) -> None:
    [problem] = _problems(registries, {"use": "toy", "width": 0})
    assert problem == f"{PATH}: width = 0 must be >= 1."


def test_every_problem_is_reported_at_once(registries: Registries) -> None:
    table = {"use": "toy", "widht": 3, "rate": "fast", "mode": "medium", "flag": 1,
             "net": {"use": "tinny"}}
    with pytest.raises(RecipeError) as exc:
        validate_part(registries, "step", table, PATH)
    problems = exc.value.problems
    assert len(problems) == 5
    for key in ("widht", "rate", "mode", "flag", "net.use"):
        assert sum(f"{PATH}.{key}" in p for p in problems) == 1, key
    assert str(exc.value).startswith("5 problems:\n  - ")


def test_validate_params_takes_a_table_without_use(registries: Registries) -> None:
    assert validate_params(registries, "net", "tiny", {"hidden": 16}, "net") == TinyParams(hidden=16)


def test_a_table_that_is_not_a_table(registries: Registries) -> None:
    [problem] = _problems(registries, 3)
    assert problem == f'{PATH} should be a table with `use = "<step name>"`, not 3.'


@pytest.mark.parametrize(
    ("tp", "name"),
    [(int, "int"), (float, "float"), (bool, "bool"), (str, "str"), (Literal["a", "b"], '"a" | "b"'),
     (tuple[int, ...], "list of int"), (tuple[float, ...], "list of float"), (PartRef, "part")],
)
def test_type_name(tp: object, name: str) -> None:
    assert type_name(tp) == name
