"""coupling:affine: Glow's parametrisation, masks, context, and nflows' affine coupling."""

from __future__ import annotations

import math

import pytest
import torch
from nflows.transforms.coupling import AffineCouplingTransform

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform, randomize_

MODULES = ["flowkit_plugins.couplings.affine", "flowkit_plugins.nets.glow_cnn", "flowkit_plugins.transforms.actnorm"]
LOG_SIGMOID_2 = math.log(1 / (1 + math.exp(-2.0)))


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, shape=(4, 4, 4), **kwargs):
    kwargs.setdefault("net", {"use": "glow_cnn", "hidden": 8})
    return flowkit.build("coupling", "affine", plugins=plugins, in_shape=shape, **kwargs).double()


@pytest.mark.parametrize("order", ["shift_first", "scale_first"])
@pytest.mark.parametrize("scale_fn", ["sigmoid", "exp_tanh"])
@pytest.mark.parametrize("mask", ["channel", "checkerboard", "columns"])
@pytest.mark.parametrize("parity", [0, 1])
def test_affine_round_trip_and_brute_force_logdet(plugins, scale_fn, mask, parity, order):
    t = randomize_(make(plugins, scale_fn=scale_fn, mask=mask, parity=parity, order=order))
    check_transform(t, torch.randn(2, 4, 4, 4, dtype=torch.float64))


def test_affine_odd_channel_count(plugins):
    t = randomize_(make(plugins, shape=(3, 4, 4)))
    check_transform(t, torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_affine_single_channel_checkerboard(plugins):
    t = randomize_(make(plugins, shape=(1, 4, 4), mask="checkerboard"))
    check_transform(t, torch.randn(2, 1, 4, 4, dtype=torch.float64))


def test_affine_single_channel_channel_mask_suggests_checkerboard(plugins):
    with pytest.raises(flowkit.ShapeError, match="checkerboard"):
        make(plugins, shape=(1, 4, 4))


def test_affine_exp_tanh_is_identity_at_initialisation(plugins):
    t = make(plugins, scale_fn="exp_tanh")
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z, logabsdet = t(x)
    torch.testing.assert_close(z, x, atol=0, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros(2, dtype=torch.float64), atol=0, rtol=0)


@pytest.mark.parametrize("mask", ["channel", "checkerboard", "columns"])
def test_affine_sigmoid_at_initialisation_scales_by_sigmoid_2(plugins, mask):
    # Zero-initialised net: shift = 0 and scale = sigmoid(0 + 2) on the transformed half (Glow).
    t = make(plugins, mask=mask)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z, logabsdet = t(x)
    if mask == "channel":
        expected = torch.cat([x[:, :2], x[:, 2:] * math.exp(LOG_SIGMOID_2)], dim=1)
    else:
        rows, cols = torch.arange(4).view(-1, 1), torch.arange(4).view(1, -1)
        cond = (rows + cols) % 2 == 0 if mask == "checkerboard" else (cols % 2 == 0).expand(4, 4)
        expected = torch.where(cond, x, x * math.exp(LOG_SIGMOID_2))
    torch.testing.assert_close(z, expected, atol=1e-12, rtol=0)
    # Half of the 64 entries are transformed, with either mask.
    torch.testing.assert_close(logabsdet, torch.full((2,), 32 * LOG_SIGMOID_2, dtype=torch.float64),
                               atol=1e-12, rtol=0)


class _GlowOrderAffine(AffineCouplingTransform):
    """nflows' affine coupling with Glow's scale: (x + t) * s == x * s + t * s."""

    def _scale_and_shift(self, transform_params):
        shift = transform_params[:, : self.num_transform_features]
        scale = torch.sigmoid(transform_params[:, self.num_transform_features :] + 2.0)
        return scale, shift * scale


@pytest.mark.parametrize("parity", [0, 1])
def test_affine_matches_nflows_affine_coupling_with_glow_scale(plugins, parity):
    ours = randomize_(make(plugins, parity=parity))
    mask = [-1, -1, 1, 1] if parity == 0 else [1, 1, -1, -1]
    reference = _GlowOrderAffine(mask, lambda n_in, n_out: ours.net)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z, logabsdet = ours(x)
    z_ref, logabsdet_ref = reference(x)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(logabsdet, logabsdet_ref, atol=1e-10, rtol=0)
    x_back, inv_logabsdet = ours.inverse(z)
    x_ref, inv_logabsdet_ref = reference.inverse(z)
    torch.testing.assert_close(x_back, x_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_logabsdet, inv_logabsdet_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("context_shape", [(2, 4, 4), (3,)], ids=["spatial", "vector"])
def test_affine_context_changes_output(plugins, context_shape):
    t = randomize_(make(plugins, context_shape=context_shape))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    context = torch.randn(2, *context_shape, dtype=torch.float64)
    z1, ld1 = t(x, context)
    z2, ld2 = t(x, context + 1.0)
    assert not torch.allclose(z1, z2)
    assert not torch.allclose(ld1, ld2)
    check_transform(t, x, context, jacobian=False)


def test_affine_built_with_context_raises_without(plugins):
    t = make(plugins, context_shape=(2, 4, 4))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(flowkit.ShapeError, match="without context"):
        t(x)
    with pytest.raises(flowkit.ShapeError, match="without context"):
        t.inverse(x)


def test_affine_built_without_context_raises_with(plugins):
    t = make(plugins)
    with pytest.raises(flowkit.ShapeError, match="built without context"):
        t(torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.zeros(2, 2, 4, 4, dtype=torch.float64))


def test_affine_rejects_wrong_channel_count_but_is_fully_convolutional(plugins):
    t = make(plugins)
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 4, H, W\)"):
        t(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    check_transform(randomize_(make(plugins, mask="checkerboard")), torch.randn(2, 4, 6, 2, dtype=torch.float64))


@pytest.mark.parametrize("scale_fn", ["sigmoid", "exp_tanh"])
def test_affine_gradients_are_finite(plugins, scale_fn):
    t = randomize_(make(plugins, scale_fn=scale_fn, context_shape=(2, 4, 4)))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z, logabsdet = t(x, torch.randn(2, 2, 4, 4, dtype=torch.float64))
    check_gradients(t, -(logabsdet - 0.5 * z.pow(2).sum((1, 2, 3))).mean())


def test_affine_initialize_reaches_actnorm_inside_the_net(plugins):
    t = make(plugins, net={"use": "glow_cnn", "hidden": 8, "actnorm": True})
    norms = list(t.net.norms)
    assert len(norms) == 2 and not any(bool(n.initialized) for n in norms)
    t.initialize(torch.randn(4, 4, 4, 4, dtype=torch.float64))
    assert all(bool(n.initialized) for n in norms)


def test_affine_parity_must_be_0_or_1(plugins):
    with pytest.raises(flowkit.RecipeError, match="parity"):
        make(plugins, parity=2)


def test_affine_unknown_scale_fn_lists_choices(plugins):
    with pytest.raises(flowkit.RecipeError, match="exp_tanh"):
        make(plugins, scale_fn="exp")


def test_scale_first_is_macows_nice_coupling(plugins):
    """macow/flows/nice.py NICE.forward: mu, log_scale = net(z1).chunk(2); scale = sigmoid(log_scale + 2);
    z2 = z2 * scale + mu; logdet = sum(log scale). Glow's order adds the shift before scaling."""
    t = randomize_(make(plugins, mask="channel", order="scale_first"))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    mu, raw = t.net(x[:, :2]).chunk(2, dim=1)
    scale = torch.sigmoid(raw + 2.0)
    z, logabsdet = t(x)
    torch.testing.assert_close(z, torch.cat([x[:, :2], x[:, 2:] * scale + mu], dim=1))
    torch.testing.assert_close(logabsdet, scale.log().flatten(1).sum(1))
    glow = make(plugins, mask="channel")
    glow.load_state_dict(t.state_dict())
    assert not torch.allclose(glow(x)[0], z)


def test_scaled_tanh_is_realnvps_learned_factor_of_tanh(plugins):
    """tensorflow/models research/real_nvp: log scale = a * tanh(s), a learned scalar per coupling."""
    t = make(plugins, scale_fn="scaled_tanh", scale_init=0.7, mask="checkerboard")
    assert t.scale_factor.item() == pytest.approx(0.7, rel=1e-7) and t.scale_factor.requires_grad
    randomize_(t)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    check_transform(t, x)
    x_cond, x_trans = t.split(x)
    shift, raw = t.net(x_cond).chunk(2, dim=1)
    log_scale = t.scale_factor.detach() * torch.tanh(raw)
    z, logabsdet = t(x)
    expected = torch.where(t.mask, x, (x + shift) * torch.exp(log_scale))
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(logabsdet, log_scale.masked_fill(t.mask, 0).sum(dim=(1, 2, 3)))
    check_gradients(t, -(logabsdet - 0.5 * z.square().flatten(1).sum(1)).mean())
    assert t.scale_factor.grad.abs() > 0
    # a = 0 (RealNVP's checkerboard couplings start so): volume-preserving, only the shift acts.
    zero = make(plugins, scale_fn="scaled_tanh", scale_init=0.0)
    assert zero(x)[1].abs().max() == 0
    assert make(plugins).scale_factor is None  # only scaled_tanh has the parameter


def test_mask_channel_hands_the_net_the_mask_after_the_context(plugins):
    """RealNVP's masked_conv_aff_coupling concatenates the mask to its net's input."""
    seen = []
    t = make(plugins, mask="checkerboard", parity=1, mask_channel=True, scale_fn="exp_tanh")
    assert t.net.context_shape == (1, 4, 4)
    t.net.register_forward_hook(lambda net, args, out: seen.append(args[1]))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t(x)
    torch.testing.assert_close(seen[-1], t.mask.double().expand(2, 1, 4, 4))
    randomize_(t)
    check_transform(t, x)
    with_context = make(plugins, mask="checkerboard", mask_channel=True, context_shape=(3, 4, 4))
    assert with_context.net.context_shape == (4, 4, 4)
    context = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with_context.net.register_forward_hook(lambda net, args, out: seen.append(args[1]))
    with_context(x, context)
    torch.testing.assert_close(seen[-1][:, :3], context)
    torch.testing.assert_close(seen[-1][:, 3:], with_context.mask.double().expand(2, 1, 4, 4))
    with pytest.raises(flowkit.ShapeError, match="spatial mask"):
        make(plugins, mask="channel", mask_channel=True)
    # A vector context (a class one-hot) is broadcast over the pixels, then the mask: one spatial context.
    with_vector = make(plugins, mask="checkerboard", mask_channel=True, context_shape=(5,))
    assert with_vector.net.context_shape == (6, 4, 4)
    vector = torch.randn(2, 5, dtype=torch.float64)
    with_vector.net.register_forward_hook(lambda net, args, out: seen.append(args[1]))
    with_vector(x, vector)
    torch.testing.assert_close(seen[-1][:, :5], vector[:, :, None, None].expand(2, 5, 4, 4))
    torch.testing.assert_close(seen[-1][:, 5:], with_vector.mask.double().expand(2, 1, 4, 4))
    with pytest.raises(flowkit.ShapeError, match=r"accepts a context of shape \(Cc,\)"):
        make(plugins, mask="checkerboard", mask_channel=True, context_shape=(3, 2, 2))
