"""model:flowpp: change of variables, sampling, layout, checkpointing, and the recipe's ablations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.plugins import make_plugins
from flowkit.recipes.load import load_recipe
from flowkit.testing import jacobian_logabsdet, randomize_

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "flowpp.toml"
NET = {"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2, "dropout": 0.0}
COUPLING = {"use": "mixlogistic", "components": 3}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def make(plugins, in_shape=(1, 4, 4), net=None, **kwargs):
    step = {"use": "glow", "coupling": {**COUPLING, "net": net or NET}}
    params = {"step": step, "layout": ["checkerboard", "squeeze", "channel", "channel"], **kwargs}
    return flowkit.build("model", "flowpp", plugins=plugins, in_shape=in_shape, **params)


def test_log_prob_is_the_change_of_variables(plugins):
    model = randomize_(make(plugins)).double().eval()
    y = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    model.initialize(y)
    z, logabsdet = model.encode(y)
    brute = jacobian_logabsdet(lambda v: model.encode(v)[0].flatten(1), y)
    torch.testing.assert_close(logabsdet, brute, atol=1e-6, rtol=1e-6)
    parts = model.log_prob_parts(y)
    assert list(parts) == ["total"] and model.part_dims() == {"total": 16}
    torch.testing.assert_close(parts["total"], model.prior.log_prob(z) + logabsdet)


def test_flow_inverts(plugins):
    # The mixture couplings invert by bisection; at its default tol (1e-6 in x) the inverse's
    # log-det, a sum over 32 dims, carries ~1e-6 of bisection error. A tight tol makes this a test
    # of the exact inverse, independent of the processor's rounding.
    coupling = {**COUPLING, "tol": 1e-12, "max_iter": 200, "net": NET}
    model = randomize_(make(plugins, in_shape=(2, 4, 4), step={"use": "glow", "coupling": coupling})).double().eval()
    y = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    z, logabsdet = model.encode(y)
    assert z.shape == (3, 8, 2, 2) and model.latent_shape == (8, 2, 2)
    y_back, inv_logabsdet = model.flow.decode([z])
    torch.testing.assert_close(y_back, y, atol=1e-6, rtol=0)
    torch.testing.assert_close(inv_logabsdet, -logabsdet, atol=1e-6, rtol=1e-8)


def test_samples_invert_the_flow_from_prior_draws(plugins):
    # Sampling is the prior's draw pushed through the inverse flow: the sample's latent is that
    # draw. (Samples may leave [0, 1) by up to alpha / (1 - 2 alpha), the range of the logit
    # preprocessing's inverse; the run engine saturates them.)
    model = make(plugins, in_shape=(1, 8, 8)).double()
    model.initialize(torch.rand(16, 1, 8, 8, dtype=torch.float64))
    randomize_(model, scale=0.02)
    for temperature in (1.0, 0.5):
        torch.manual_seed(3)
        s = model.sample(5, temperature=temperature)
        torch.manual_seed(3)
        z = model.prior.sample(5, temperature=temperature)
        alpha = 0.05
        assert s.shape == (5, 1, 8, 8) and ((s >= -alpha / (1 - 2 * alpha)) & (s <= (1 - alpha) / (1 - 2 * alpha))).all()
        # The mixture couplings invert by bisection to tol = 1e-6 (mixlogistic's default).
        torch.testing.assert_close(model.encode(s)[0], z, atol=1e-6, rtol=1e-5)


def test_layout_alternates_parity_and_resets_it_and_the_recipe_records_it(plugins):
    model = make(plugins, in_shape=(1, 8, 8),
                 layout=["checkerboard", "checkerboard", "checkerboard", "squeeze", "channel", "channel"])
    couplings = [step.transforms[-1] for step in model.flow.chains()[0].transforms
                 if isinstance(step, flowkit.Sequential)]
    assert [(c.mask_kind, c.parity) for c in couplings] == [
        ("checkerboard", 0), ("checkerboard", 1), ("checkerboard", 0), ("channel", 0), ("channel", 1)]
    assert [c.in_shape for c in couplings][-1] == (4, 4, 4)
    ref = flowkit.ref("model", "flowpp", plugins=plugins, layout=["checkerboard", "checkerboard", "squeeze", "channel"])
    assert ref.to_toml()["derived"] == {"step.coupling.mask": ["checkerboard", "checkerboard", "channel"],
                                        "step.coupling.parity": [0, 1, 0]}
    assert "mask" not in ref.to_toml()["step"]["coupling"] and "parity" not in ref.to_toml()["step"]["coupling"]


def test_every_coupling_uses_the_recipe_net(plugins):
    model = make(plugins, net={**NET, "hidden": 6})
    nets = [m for m in model.modules() if type(m).__name__ == "GatedResNet"]
    assert nets and all(n.conv_in.out_channels == 6 for n in nets)


def test_checkpointing_gives_the_same_loss_and_gradients(plugins):
    plain = randomize_(make(plugins))
    ckpt = make(plugins, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    y = torch.rand(4, 1, 4, 4)
    results = []
    for model in (plain, ckpt):
        model.zero_grad()
        loss = -model.log_prob(y).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bad_layouts_are_reported(plugins):
    with pytest.raises(flowkit.RecipeError, match="layout"):
        make(plugins, layout=["checkerboard", "sqeeze"])
    with pytest.raises(flowkit.ShapeError, match="must be even"):
        make(plugins, in_shape=(1, 6, 6), layout=["squeeze", "squeeze", "channel"])
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 1, 4, 4\)"):
        make(plugins).log_prob(torch.rand(2, 1, 8, 8))


def test_a_mask_or_parity_set_by_hand_is_refused(plugins):
    for key, value, why in (("mask", "channel", "model.layout"), ("parity", 1, "alternates within a run")):
        with pytest.raises(flowkit.RecipeError, match=rf"step\.coupling\.{key} = .* cannot be set.*\({why}"):
            make(plugins, step={"use": "glow", "coupling": {**COUPLING, "net": NET, key: value}})


def test_a_coupling_without_the_layouts_mask_is_refused(plugins):
    # The third-party example coupling only has channel masks; the layout asks for a checkerboard.
    with pytest.raises(flowkit.RecipeError, match=r'step\.coupling\.mask \(set on each copy by model "flowpp": '
                                                r'model\.layout\) = "checkerboard" is not allowed\. Allowed: "channel"'):
        make(plugins, step={"use": "glow", "coupling": {"use": "example_shift"}})


@pytest.mark.parametrize("override", [
    None, "dequantizer.use=uniform", "model.step.coupling.use=affine", "model.step.coupling.net.attention=false",
])
def test_each_ablation_is_one_override(plugins, override):
    recipe = load_recipe(RECIPE, plugins.registries, preset="smoke", overrides=[override] if override else [])
    build = Builder(plugins.registries)
    model = build(recipe.model, in_shape=(1, 28, 28))
    deq = build(recipe.dequantizer, in_shape=(1, 28, 28))
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    deq.initialize(x, 8)
    y, log_q = deq(x, 8)
    model.initialize(y)
    log_p = model.log_prob(y)
    assert torch.isfinite(log_p).all() and torch.isfinite(torch.as_tensor(log_q)).all()
    couplings = {type(m).__name__ for m in model.modules()}
    if override == "model.step.coupling.use=affine":
        assert "AffineCoupling" in couplings and "MixLogisticCoupling" not in couplings
    if override == "model.step.coupling.net.attention=false":
        assert not any(a.attention for a in model.modules() if type(a).__name__ == "GatedAttention")
    if override == "dequantizer.use=uniform":
        assert recipe.dequantizer.use == "uniform"


@pytest.mark.slow
def test_paper_preset_builds_at_the_published_size(plugins):
    recipe = load_recipe(RECIPE, plugins.registries, preset="paper")
    build = Builder(plugins.registries)
    model = build(recipe.model, in_shape=(3, 32, 32))
    deq = build(recipe.dequantizer, in_shape=(3, 32, 32))
    total = sum(p.numel() for p in [*model.parameters(), *deq.parameters()])
    # The official CIFAR-10 model has 31,443,440 parameters (per-position actnorm included).
    assert 25e6 < total < 35e6, total


@pytest.mark.slow
def test_smoke_preset_runs_end_to_end(tmp_path):
    # Through the installed console script, as a user runs it.
    exe = Path(sys.executable).with_name("flowkit")
    out = tmp_path / "run"
    done = subprocess.run([str(exe), "run", str(RECIPE), "--preset", "smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and 0 < summary["test_bpd"] < 16
