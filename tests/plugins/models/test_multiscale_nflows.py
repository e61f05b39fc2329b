"""multiscale's reference ``nflows`` (`flowkit.contracts.model.HasReferences`): the same Glow
composed from nflows' transforms with the model's weights computes the same model, and the
configurations it cannot compose are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nflows.transforms.coupling import AffineCouplingTransform

from flowkit.bench.likelihood import compare_log_likelihoods
from flowkit.build import Builder
from flowkit.contracts.model import HasReferences
from flowkit.plugins import Plugins, make_plugins
from flowkit.recipes.load import load_recipe
from flowkit.testing import randomize_
from flowkit_plugins.models._multiscale_nflows import GlowAffineCoupling

ROOT = Path(__file__).resolve().parents[3]
GLOW = ROOT / "recipes" / "glow.toml"


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return make_plugins()


# Each case changes one thing the composition must follow: the coupling formula, the mask's
# parity, the priors' parametrisations, the net's layout.
CASES = {
    "affine": [],
    "exp_tanh": ["model.step.coupling.scale_fn=\"exp_tanh\""],
    "parity 1, split prior output scale": ["model.step.coupling.parity=1", "model.split_prior.output_scale=true"],
    "additive, top prior per element": ["model.step.coupling.use=\"additive\"", "model.top_prior.per=\"element\""],
    "no actnorm anywhere": ["model.step.actnorm=false", "model.step.coupling.net.actnorm=false"],
}


def _glow(plugins: Plugins, overrides: list[str]) -> torch.nn.Module:
    recipe = load_recipe(GLOW, plugins.registries, overrides=[
        "model.levels=3", "model.depth=2", "model.step.coupling.net.hidden=8", *overrides])
    model = Builder(plugins.registries)(recipe.model, in_shape=(3, 16, 16)).double()
    model.initialize(torch.rand(16, 3, 16, 16, dtype=torch.float64))
    # Zero-initialised last layers would hide a wrong shift/scale order or split prior: perturb.
    randomize_(model, 0.05, torch.Generator().manual_seed(0))
    assert isinstance(model, HasReferences) and model.references() == ("nflows",)
    assert model.reference_problems("nflows") == []
    return model


@pytest.mark.filterwarnings("ignore:torch.triangular_solve is deprecated")  # nflows' LU inverse
@pytest.mark.parametrize("case", list(CASES))
def test_nflows_composition_with_copied_weights_is_the_same_model(case: str, plugins: Plugins) -> None:
    model = _glow(plugins, CASES[case])
    reference = model.reference("nflows", 8, torch.float64)
    y = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    check = compare_log_likelihoods(model, reference, y)
    assert check.passed and check.max_abs_per_dim < 1e-6, check.sentence()
    with torch.no_grad():  # the overridden inverses invert (sampling runs them)
        noise, _ = reference.flow._transform(y)
        back, _ = reference.flow._transform.inverse(noise)
    torch.testing.assert_close(back, y, rtol=0, atol=1e-9)


def test_the_likelihood_check_fails_for_a_different_model(plugins: Plugins) -> None:
    model = _glow(plugins, [])
    y = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    nflows_formula = model.reference("nflows", 8, torch.float64)
    for module in nflows_formula.modules():  # back to nflows' own x * (sigmoid(h + 2) + 1e-3) + shift
        if isinstance(module, GlowAffineCoupling):
            module.__class__ = AffineCouplingTransform
    assert not compare_log_likelihoods(model, nflows_formula, y).passed
    one_weight_off = model.reference("nflows", 8, torch.float64)
    with torch.no_grad():
        next(m for m in one_weight_off.modules() if isinstance(m, GlowAffineCoupling)).transform_net.conv_out.bias += 0.1
    assert not compare_log_likelihoods(model, one_weight_off, y).passed




def test_a_configuration_nflows_cannot_compose_is_named_by_its_recipe_key(plugins: Plugins) -> None:
    recipe = load_recipe(ROOT / "recipes" / "macow.toml", plugins.registries, preset="smoke")
    model = Builder(plugins.registries)(recipe.model, in_shape=(1, 28, 28))
    problems = model.reference_problems("nflows")
    assert any('model.step.use = "macow"' in p for p in problems), problems
    assert all(p.startswith("nflows composes a multiscale Glow") for p in problems)
    with pytest.raises(Exception, match='offers the references nflows, not "tfp"'):
        model.reference_problems("tfp")
