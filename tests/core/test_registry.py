"""The registry: names, duplicates, Params checks and lookup errors with suggestions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from flowkit import NoParams, PluginError, UnknownPartError, hookimpl, param
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


def test_duplicate_between_two_plugins_fails_when_collected() -> None:
    plugins = make_plugins(entry_points=False, extra=[_CouplingPlugin("spline"), _CouplingPlugin("spline")])
    with pytest.raises(PluginError, match='coupling "spline" is registered twice') as exc:
        plugins.registries  # noqa: B018 - collecting the registries runs the hooks
    assert str(exc.value).count(LOCAL) == 2


def test_duplicate_of_a_builtin_names_package_flowkit() -> None:
    plugins = make_plugins(extra=[_HaarPlugin()])
    with pytest.raises(PluginError, match='decomposition "haar" is registered twice') as exc:
        plugins.registries  # noqa: B018
    assert "package flowkit 0.1.0" in str(exc.value)
    assert f"package {LOCAL}" in str(exc.value)


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
