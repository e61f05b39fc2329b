"""The formulas the `paper` presets got wrong before, each against the reference's own expression.

One test per finding of docs/baselines/fidelity.md that was a formula, not a count: Wavelet Flow's
exp(tanh) coupling, its 1 | 2 channel split at the 3-channel base, its coupling net; MaCow's width
rule and its split-prior coupling; openai/glow's edge padding and Adamax step; Flow++'s per-half
1x1 convolutions and data-dependent net initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

import flowkit
from flowkit.api import default_plugins
from flowkit.build import Builder
from flowkit.recipes.load import load_recipe
from flowkit.nn.edge_padding import EdgePaddedConv2d
from flowkit_plugins.steps._masked_conv import default_hidden

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (a zero-initialised output layer would hide the formula)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def test_wavelet_flow_coupling_is_x2_plus_t_times_exp_tanh_s() -> None:
    """Coupling.py forward(): (s, t) = st(x1); y2 = (x2 + t) * exp(tanh s); log-det = sum(tanh s).
    (The reference takes s from the first half of the net's output, flowkit t: a permutation of
    the outputs of a zero-initialised layer, so the same family of functions.)"""
    coupling = flowkit.build("coupling", "affine", in_shape=(4, 3, 3), mask="channel", scale_fn="exp_tanh",
                             clamp=1.0, net={"use": "wavelet_flow_resnet", "hidden": 6, "blocks": 1}).double()
    _randomise(coupling)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    x1, x2 = x[:, :2], x[:, 2:]
    t, s = coupling.net(x1).chunk(2, dim=1)
    z, logdet = coupling(x)
    torch.testing.assert_close(z[:, :2], x1)
    torch.testing.assert_close(z[:, 2:], (x2 + t) * torch.exp(torch.tanh(s)))
    torch.testing.assert_close(logdet, torch.tanh(s).sum(dim=(1, 2, 3)))


def _paper_wavelet_flow_small() -> torch.nn.Module:
    """The paper preset's model with its widths and depths shrunk (structure kept)."""
    plugins = default_plugins()
    recipe = load_recipe(RECIPES / "wavelet_flow_affine.toml", plugins.registries, preset="paper",
                         overrides=["model.levels=2", "model.depth=[2, 2, 2]", "model.hidden=[8, 8, 8]",
                                    "model.crops=[1, 1, 1]"])
    return Builder(plugins.registries)(recipe.model, in_shape=(3, 4, 4))


def test_wavelet_flow_base_splits_its_three_channels_1_2_in_every_step() -> None:
    """Coupling.py split_features(): x1 = x[..., :c//2], x2 = x[..., c//2:], no alternation: at the
    1x1x3 base every coupling transforms channels 1..2 given channel 0 (a checkerboard on a 1x1
    image would leave half the couplings the identity)."""
    model = _paper_wavelet_flow_small()
    for name, flow in model.flows.items():
        couplings = [m for m in flow.modules() if type(m).__name__ == "AffineCoupling"]
        assert couplings, name
        for coupling in couplings:
            assert (coupling.mask_kind, coupling.parity) == ("channel", 0), name
            assert coupling.cond_channels == (1 if name == "base" else 4), name
            assert coupling.trans_channels == (2 if name == "base" else 5), name


def test_wavelet_flow_level_coupling_sees_the_coarse_image_itself() -> None:
    """Conditioning_network.py: encode_j returns the low-pass image; Coupling.py concatenates it to
    x1. With cond_depth = 0 the level's context is exactly the (gain-normalised) low-pass image."""
    model = _paper_wavelet_flow_small()
    low = torch.randn(2, 3, 2, 2)
    assert torch.equal(model.flows["level1"].context(low), low)
    net = next(m for m in model.flows["level1"].modules() if type(m).__name__ == "WaveletFlowResNet")
    assert net.conv_in.conv.in_channels == 4 + 3  # x1 (4 of the 9 detail channels) ++ the 3-channel image


def test_wavelet_flow_net_is_the_reference_block_structure() -> None:
    """Coupling.py: h = conv_in(x) (1x1); per block relu(h + conv2(conv1(h))) with conv1 kxk + ReLU and
    conv2 1x1 without activation, each followed by actnorm; out = zero_conv(h) * exp(3 logs)."""
    net = flowkit.build("net", "wavelet_flow_resnet", in_shape=(2, 5, 5), out_channels=4, hidden=6, blocks=2).double()
    _randomise(net, seed=1)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)

    def normalised(conv_module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        norm = conv_module.norm
        return (conv_module.conv(h) + norm.bias) * torch.exp(norm.log_scale)

    h = F.relu(normalised(net.conv_in, x))
    for first, second in net.blocks:
        h = F.relu(h + normalised(second, F.relu(normalised(first, h))))
    expected = net.conv_out(h) * torch.exp(3.0 * net.logs)
    torch.testing.assert_close(net(x), expected)
    assert net.conv_in.conv.kernel_size == (1, 1) and net.blocks[0][0].conv.kernel_size == (3, 3)
    assert all(m.conv.bias is None for m in net.modules() if type(m).__name__ == "NormalisedConv")


def test_macow_masked_conv_width_rule() -> None:
    """macow/flows/conv.py MaskedConvFlow: 4C while C <= 96, else min(2C, 512)."""
    assert [default_hidden(c) for c in (3, 12, 31, 32, 48, 96, 97, 200, 300)] == [
        12, 48, 124, 128, 192, 384, 194, 400, 512]


def test_macow_split_coupling_factors_out_the_last_quarter_then_third() -> None:
    """macow/flows/nice.py NICE(factor=f): z1 = the first C - C // f channels, z2 = the last C // f,
    transformed given z1; MaCowInternalBlock uses f = 4 then 3 (12 channels: 9 | 3, then 6 | 3)."""
    model = flowkit.build("model", "multiscale", in_shape=(3, 8, 8), levels=2, depth=1, splits=2, split_flow=True,
                          split_prior={"use": "gaussian"},
                          split_step={"use": "glow", "coupling": {"use": "affine", "net": {"use": "glow_cnn", "hidden": 4}}},
                          step={"use": "glow", "coupling": {"use": "affine", "net": {"use": "glow_cnn", "hidden": 4}}})
    # Level 1's two stages end the walker's first two chains; each is (K steps, split step).
    split_couplings = [chain.transforms[-1].transforms[1].transforms[0].transforms[-1]
                       for chain in model.flow.chains()[:2]]
    assert [(c.cond_channels, c.trans_channels, c.parity) for c in split_couplings] == [(9, 3, 0), (6, 3, 0)]


def test_glow_edge_padding_is_a_border_channel_then_a_valid_conv() -> None:
    """openai/glow tfops.py add_edge_padding: pad with zeros, append a channel that is 1 on the
    padding, convolve 'VALID'."""
    conv = EdgePaddedConv2d(2, 3, 3).double()
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    border = torch.ones(1, 1, 6, 7, dtype=torch.float64)
    border[:, :, 1:5, 1:6] = 0
    by_hand = F.conv2d(torch.cat([F.pad(x, (1, 1, 1, 1)), border], dim=1), conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), by_hand)
    assert conv.weight.shape == (3, 3, 3, 3)  # one more input channel than the data


def test_openai_adamax_step_is_lr_sqrt_one_minus_beta2_t_over_one_minus_beta1_t() -> None:
    """openai/glow optim.py adamax(): w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m_t / (u_t + eps);
    flowkit's adamax_openai is torch's Adamax with the sqrt factor in the learning-rate schedule."""
    from flowkit.recipes.sections import TrainParams
    from flowkit.runs.trainer import Trainer

    cfg = TrainParams(optimizer="adamax_openai", betas=(0.9, 0.99), lr=1e-2, steps=3)
    fake = type("T", (), {"cfg": cfg})()
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = torch.optim.Adamax([w], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    reference = w.detach().clone()
    m = torch.zeros(2, dtype=torch.float64)
    u = torch.zeros(2, dtype=torch.float64)
    for step in range(3):
        g = torch.tensor([0.5, -1.5], dtype=torch.float64) * (step + 1)
        for group in optimizer.param_groups:
            group["lr"] = Trainer.lr_at(fake, step, 0.0)
        w.grad = g.clone()
        optimizer.step()
        t = step + 1
        m = 0.9 * m + 0.1 * g
        u = torch.maximum(0.99 * u, g.abs())
        reference -= cfg.lr * math.sqrt(1 - 0.99**t) / (1 - 0.9**t) * m / (u + 1e-8)
    torch.testing.assert_close(w.detach(), reference, rtol=1e-6, atol=1e-9)


def test_flowpp_pointwise_is_one_matrix_per_half() -> None:
    """flows/flows.py Pointwise on a tuple: W0 on one half, W1 on the other; for a channel split the
    halves are never mixed with each other (block-diagonal)."""
    step = flowkit.build("step", "flowpp", in_shape=(4, 2, 2), noise=0.5,
                         coupling={"use": "affine", "mask": "channel", "net": {"use": "glow_cnn", "hidden": 4}}).double()
    pointwise = step.transforms[1]
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    z, _ = pointwise(x)
    w0, w1 = pointwise.weights
    torch.testing.assert_close(z[:, :2], torch.einsum("oc,bchw->bohw", w0, x[:, :2]))
    torch.testing.assert_close(z[:, 2:], torch.einsum("oc,bchw->bohw", w1, x[:, 2:]))
    board = flowkit.build("step", "flowpp", in_shape=(3, 2, 2), noise=0.5,
                          coupling={"use": "affine", "mask": "checkerboard", "net": {"use": "glow_cnn", "hidden": 4}})
    pointwise = board.transforms[1].double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    z, _ = pointwise(x)
    w0, w1 = pointwise.weights
    mask = pointwise.mask[0, 0]
    for i in range(2):
        for j in range(2):
            expected = (w0 if mask[i, j] else w1) @ x[:, :, i, j].T
            torch.testing.assert_close(z[:, :, i, j], expected.T)
    # The released split (mask "columns"): W0 on the tuple's first element, the even columns
    # at parity 0 (CheckerboardSplit's a) and the odd ones after a TupleFlip (parity 1).
    for parity in (0, 1):
        split = flowkit.build("step", "flowpp", in_shape=(3, 2, 4), noise=0.5, coupling={
            "use": "mixlogistic", "mask": "columns", "parity": parity, "components": 2,
            "net": {"use": "gated_resnet", "hidden": 4, "blocks": 1, "heads": 1}})
        pointwise = split.transforms[1].double()
        x = torch.randn(2, 3, 2, 4, dtype=torch.float64)
        z, _ = pointwise(x)
        w0, w1 = pointwise.weights
        first, second = (slice(0, None, 2), slice(1, None, 2)) if parity == 0 else (slice(1, None, 2), slice(0, None, 2))
        torch.testing.assert_close(z[..., first], torch.einsum("oc,bchw->bohw", w0, x[..., first]))
        torch.testing.assert_close(z[..., second], torch.einsum("oc,bchw->bohw", w1, x[..., second]))


def test_flowpp_data_dependent_init_standardises_every_layer() -> None:
    """flows/flows.py conv2d/dense with init: each layer's output on the first batch has zero mean
    and standard deviation init_scale per channel (0.1 for the output layer)."""
    torch.manual_seed(0)
    net = flowkit.build("net", "gated_resnet", in_shape=(3, 4, 4), out_channels=6, hidden=8, blocks=1, heads=2,
                        dropout=0.0, init="data")
    x = torch.randn(256, 3, 4, 4) * 4 + 2
    net.initialize(x)
    h = net.conv_in(x)
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(h.std(dim=(0, 2, 3), unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    out = net(x)
    torch.testing.assert_close(out.std(dim=(0, 2, 3), unbiased=False), torch.full((6,), 0.1), atol=1e-3, rtol=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.initialize(x * 3)  # once only: a restored or initialised net keeps its weights
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
