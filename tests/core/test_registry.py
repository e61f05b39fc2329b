"""The registry: names, duplicates, Params checks and lookup errors with suggestions."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from flowkit import NoParams, PartRef, PluginError, UnknownPartError, hookimpl, param, part_field
from flowkit.plugins import LOCAL, make_plugins
from flowkit.registry import RegisterFn, Registries, Registry, make_register


def _factory(params: object, **kwargs: object) -> None:
    """A factory that builds nothing."""


@dataclass(frozen=True, kw_only=True)
class _CouplingParams:
    """What every coupling declares (the coupling contract): mask, parity and net."""

    mask: str = param("channel", "which entries condition")
    parity: int = param(0, "which half is transformed")
    net: str = param("", "a stand-in for the conditioner")


def _registry(*names: str, kind: str = "coupling") -> Registry:
    registry = Registry(kind)
    register = make_register(registry, "tests", "flowkit-tests", "1.0")
    for name in names:
        register(name, _factory, params=_CouplingParams if kind == "coupling" else NoParams)
    return registry


class _CouplingPlugin:
    """A throwaway plugin registering one coupling under a given name."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def flowkit_register_couplings(self, register: RegisterFn) -> None:
        register(self.name, _factory, params=_CouplingParams, summary="a throwaway coupling")


class _HaarPlugin:
    @hookimpl
    def flowkit_register_decompositions(self, register: RegisterFn) -> None:
        register("haar", _factory)


def test_duplicate_name_names_both_plugins_and_packages() -> None:
    registry = Registry("coupling")
    make_register(registry, "first", "pkg-one", "1.0")("spline", _factory, params=_CouplingParams)
    with pytest.raises(PluginError) as exc:
        make_register(registry, "second", "pkg-two", "2.0")("spline", _factory, params=_CouplingParams)
    message = str(exc.value)
    for text in ('coupling "spline" is registered twice', '"first"', "pkg-one 1.0", '"second"', "pkg-two 2.0"):
        assert text in message


def test_duplicate_between_two_plugins_breaks_the_second_and_the_name() -> None:
    first, second = _CouplingPlugin("spline"), _CouplingPlugin("spline")
    plugins = make_plugins(entry_points=False, extra=[first, second, _CouplingPlugin("other")])
    registries = plugins.registries  # collecting runs the hooks; a duplicate stops nothing else
    assert [b.stage for b in plugins.broken] == ["flowkit_register_couplings"]
    assert 'coupling "spline" is registered twice' in plugins.broken[0].error
    assert "other" in registries["coupling"] and "spline" not in registries["coupling"]
    assert "spline" not in registries["coupling"].names()
    # Neither registration wins: a recipe naming it gets the error, naming both plugins.
    with pytest.raises(UnknownPartError, match='"spline" cannot be used: coupling "spline" is registered twice') as exc:
        registries.part("coupling", "spline")
    assert str(exc.value).count(LOCAL) == 2


def test_duplicate_of_a_builtin_names_package_flowkit() -> None:
    plugins = make_plugins(extra=[_HaarPlugin()])
    with pytest.raises(UnknownPartError, match='decomposition "haar" is registered twice') as exc:
        plugins.registries.part("decomposition", "haar")
    assert "package flowkit 0.1.0" in str(exc.value)
    assert f"package {LOCAL}" in str(exc.value)
    assert "db2" in plugins.registries["decomposition"]


@pytest.mark.parametrize("name", ["Affine", "1x1", "my-coupling", "my coupling", "", "_private", "affine!"])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(PluginError, match="not a valid name"):
        _registry(name)


@pytest.mark.parametrize("name", ["affine", "db4", "mix_logistic2"])
def test_valid_names_are_accepted(name: str) -> None:
    assert _registry(name).names() == [name]


def test_params_must_be_a_dataclass_type() -> None:
    class NotADataclass:
        width: int = 3

    registry = Registry("step")
    register = make_register(registry, "tests", LOCAL, "")
    with pytest.raises(PluginError, match="not a dataclass type"):
        register("odd", _factory, params=NotADataclass)

    @dataclass(frozen=True, kw_only=True)
    class Fine:
        width: int = param(3, "width")

    with pytest.raises(PluginError, match="not a dataclass type"):
        register("odd", _factory, params=Fine(width=2))  # an instance, not the class
    register("fine", _factory, params=Fine)
    assert registry.get("fine").params is Fine


def test_params_default_to_no_params_and_summary_to_factory_docstring() -> None:
    registry = Registry("step")
    make_register(registry, "tests", "flowkit-tests", "1.0")("plain", _factory)
    part = registry.get("plain")
    assert part.params is NoParams
    assert part.summary == "A factory that builds nothing."
    assert (part.kind, part.plugin, part.distribution, part.version) == ("step", "tests", "flowkit-tests", "1.0")


def test_a_coupling_without_the_assembly_params_is_refused_when_registered() -> None:
    @dataclass(frozen=True, kw_only=True)
    class NoParity:
        mask: str = param("channel", "which entries condition")
        net: str = param("", "conditioner")

    register = make_register(Registry("coupling"), "thirdparty", "pkg", "1.0")
    with pytest.raises(PluginError, match=r'"thirdparty" registers coupling "spline" whose params NoParity lack '
                                          r"parity\. Every coupling must declare mask, parity, net"):
        register("spline", _factory, params=NoParity)


def test_unknown_name_suggests_the_closest_and_lists_all() -> None:
    registry = _registry("additive", "affine", "mixlogistic")
    with pytest.raises(UnknownPartError) as exc:
        registry.get("afine")
    err = exc.value
    assert (err.kind, err.name, err.suggestion) == ("coupling", "afine", "affine")
    assert err.available == ["additive", "affine", "mixlogistic"]
    assert str(err) == (
        '"afine" is not a registered coupling. Did you mean "affine"? '
        "Available: additive, affine, mixlogistic."
    )


def test_unknown_name_without_close_match_still_lists_available() -> None:
    with pytest.raises(UnknownPartError) as exc:
        _registry("additive", "affine").get("zzzzzz")
    assert exc.value.suggestion is None
    assert "Did you mean" not in str(exc.value)
    assert "Available: additive, affine." in str(exc.value)


def test_unknown_kind_suggests_a_kind() -> None:
    registries = Registries(["coupling", "step"])
    with pytest.raises(UnknownPartError, match='"couplings" is not a registered kind of part. Did you mean "coupling"?'):
        registries["couplings"]


def test_registry_iterates_sorted_by_name() -> None:
    registry = _registry("zeta", "alpha", "mid")
    assert [p.name for p in registry] == ["alpha", "mid", "zeta"]
    assert "mid" in registry and "nope" not in registry


# --- Params field types: refused when registered, not when a recipe first sets them ----------


class _Opaque:
    """A class no recipe can write down."""


@dataclass(frozen=True, kw_only=True)
class _AnyField:
    mask: str = param("channel", "which entries condition")
    parity: int = param(0, "which half is transformed")
    net: PartRef = part_field("net", "glow_cnn", "conditioner")
    anything: Any = param(None, "an untyped knob")


@pytest.mark.parametrize("annotation", [
    Any, _Opaque, int | None, typing.Optional[str], tuple[int, int], list[int], dict[str, int],
    Literal["a", 1], tuple[_Opaque, ...], PartRef,
], ids=repr)
def test_a_params_field_recipes_cannot_hold_is_refused_at_registration(annotation: Any) -> None:
    params = dataclass(frozen=True, kw_only=True)(
        type("OddParams", (), {"__annotations__": {"knob": annotation}, "knob": param(None, "a knob")}))
    register = make_register(Registry("step"), "thirdparty", "pkg", "1.0")
    with pytest.raises(PluginError) as exc:
        register("odd", _factory, params=params)
    message = str(exc.value)
    for text in ('Plugin "thirdparty"', 'step "odd"', 'field "knob"', "Params fields may be bool, int"):
        assert text in message, message


@pytest.mark.parametrize("annotation", [bool, int, float, str, Literal["a", "b"], Literal[1, 2], tuple[int, ...],
                                        tuple[float, ...], tuple[Literal["up", "down"], ...]], ids=repr)
def test_params_fields_recipes_can_hold_register(annotation: Any) -> None:
    params = dataclass(frozen=True, kw_only=True)(
        type("FineParams", (), {"__annotations__": {"knob": annotation}, "knob": param(None, "a knob")}))
    registry = Registry("step")
    make_register(registry, "thirdparty", "pkg", "1.0")("fine", _factory, params=params)
    assert registry.names() == ["fine"]


def test_a_nested_part_of_an_unknown_kind_is_refused() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Nested:
        inner: PartRef = part_field("couplings", "affine", "a typo in the kind")

    with pytest.raises(PluginError, match='field "inner" is a nested part of kind "couplings", which is not a kind'):
        make_register(Registry("step"), "thirdparty", "pkg", "1.0")("nested", _factory, params=Nested)


class _AnyPlugin:
    @hookimpl
    def flowkit_register_couplings(self, register: RegisterFn) -> None:
        register("anyspline", _factory, params=_AnyField)


def test_a_plugin_registering_an_unholdable_field_is_broken_and_named_by_recipes() -> None:
    plugins = make_plugins(extra=[_AnyPlugin()])
    plugins.registries  # noqa: B018 - collecting the registries runs the hooks
    (broken,) = plugins.broken
    assert broken.parts == ("coupling:anyspline",)
    assert 'field "anything" has type typing.Any' in broken.reason
    with pytest.raises(UnknownPartError) as exc:
        plugins.registries.part("coupling", "anyspline")
    assert broken.name in str(exc.value) and 'field "anything"' in str(exc.value)
    assert "affine" in plugins.registries["coupling"]


def test_every_builtin_params_field_is_one_recipes_can_hold(plugins) -> None:  # noqa: ANN001
    assert len(list(plugins.registries.all_parts())) > 20
    assert plugins.broken == []


# -- contexts: declared when a part registers, asked before it is built --------------------------


def test_a_part_takes_the_contexts_of_its_kind_unless_it_declares_more() -> None:
    couplings, models = _registry("affine"), Registry("model")
    make_register(models, "tests", "flowkit-tests", "1.0")("plain", _factory)
    make_register(models, "tests", "flowkit-tests", "1.0")("conditioned", _factory, contexts=("vector",))
    assert couplings.get("affine").contexts == ("spatial", "vector")
    assert models.get("plain").contexts == () and not models.get("plain").accepts("vector")
    assert models.get("conditioned").accepts("vector") and not models.get("conditioned").accepts("spatial")


@pytest.mark.parametrize(("kind", "contexts", "why"), [
    ("model", ("global",), "global is not a form of context (forms: spatial, vector)"),
    ("coupling", ("vector",), "every coupling must take spatial contexts"),
])
def test_a_context_the_kind_does_not_know_or_lacks_is_refused_at_registration(
        kind: str, contexts: tuple[str, ...], why: str) -> None:
    params = _CouplingParams if kind == "coupling" else NoParams
    with pytest.raises(PluginError, match=re.escape(why)):
        make_register(Registry(kind), "tests", "flowkit-tests", "1.0")("odd", _factory, params=params,
                                                                     contexts=contexts)


def test_a_model_asked_for_a_context_it_does_not_declare_is_refused_by_name_before_its_factory_runs() -> None:
    import flowkit
    from flowkit import ShapeError
    from flowkit.build import Builder

    plugins = make_plugins()
    build = Builder(plugins.registries)
    vae_flow, multiscale = flowkit.ref("model", "vae_flow"), flowkit.ref("model", "multiscale")
    assert not build.accepts(vae_flow, "vector") and build.accepts(multiscale, "vector")
    with pytest.raises(ShapeError, match='model "vae_flow" .*takes no context; models that take a vector '
                                         "context: .*multiscale"):
        build(vae_flow, in_shape=(1, 8, 8), context_shape=(4,))
    built = build(multiscale, in_shape=(1, 8, 8), context_shape=(4,))
    assert built.context_shape == (4,)
