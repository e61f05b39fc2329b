"""dequantizer:variational: y in the right bin, log q a normalised density, its steps assembled as copies."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import randomize_

MODULES = [
    "flowkit_plugins.dequantizers.variational", "flowkit_plugins.couplings.mixlogistic",
    "flowkit_plugins.nets.gated_resnet", "flowkit_plugins.transforms.actnorm", "flowkit_plugins.transforms.invconv",
    "flowkit_plugins.steps.glow",
]
NET = {"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, in_shape=(2, 4, 4), coupling=None, step=None, **kwargs):
    coupling = {"use": "mixlogistic", "components": 3, "net": NET, **(coupling or {})}
    params = {"steps": 2, "step": {"use": "glow", "coupling": coupling, **(step or {})}, "context_channels": 4,
              "context_blocks": 1, "dropout": 0.0, **kwargs}
    return flowkit.build("dequantizer", "variational", plugins=plugins, in_shape=in_shape, **params)


def images(n=4, shape=(2, 4, 4), n_bits=3):
    return torch.randint(0, 2**n_bits, (n, *shape), dtype=torch.uint8)


def test_y_lies_in_the_bin_of_x(plugins):
    deq = randomize_(make(plugins))
    x = images()
    y, log_q = deq(x, 3)
    assert y.shape == x.shape and log_q.shape == (4,) and log_q.dtype == torch.float32
    assert (y >= 0).all() and (y < 1).all()
    torch.testing.assert_close(torch.floor(y * 8).to(torch.uint8), x, atol=0, rtol=0)
    assert torch.isfinite(log_q).all()


def test_top_bin_stays_below_one(plugins):
    deq = make(plugins)
    with torch.no_grad():
        deq.flow.transforms[-1].transforms[-1].net.conv_out.bias.fill_(40.0)  # sigmoid rounds to 1
    y, _ = deq(torch.full((2, 2, 4, 4), 255, dtype=torch.uint8), 8)
    assert (y < 1).all()


def test_log_q_agrees_with_the_inverse_flow(plugins):
    deq = randomize_(make(plugins)).double().eval()
    x = images()
    y, log_q = deq(x, 3)
    u = y * 8 - x.double()
    torch.testing.assert_close(deq.log_prob_noise(u, x, 3), log_q, atol=1e-6, rtol=1e-6)


def test_density_integrates_to_one_on_a_two_pixel_toy(plugins):
    # One channel, 1 x 2 pixels: the smallest image a checkerboard coupling can split, so
    # q(u | x) is a density on the unit square; a midpoint rule on a 200 x 200 grid.
    deq = randomize_(make(plugins, in_shape=(1, 1, 2)), scale=0.3).double().eval()
    n = 200
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 1, 1, 2)
    for value in ([0, 5], [7, 2]):
        x = torch.tensor(value, dtype=torch.uint8).view(1, 1, 1, 2).expand(len(u), 1, 1, 2)
        with torch.no_grad():
            total = deq.log_prob_noise(u, x, 3).exp().mean()
        assert abs(total.item() - 1.0) < 5e-3, total.item()


def test_every_parameter_gets_a_gradient(plugins):
    deq = randomize_(make(plugins))
    y, log_q = deq(images(), 3)
    (y.square().sum() + log_q.sum()).backward()
    for name, p in deq.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_checkpointing_gives_the_same_gradients(plugins):
    torch.manual_seed(1)
    plain = randomize_(make(plugins))
    ckpt = make(plugins, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = images()
    grads = []
    for deq in (plain, ckpt):
        torch.manual_seed(2)
        y, log_q = deq(x, 3)
        deq.zero_grad()
        (y.sum() + log_q.sum()).backward()
        grads.append([p.grad.clone() for p in deq.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_initialize_sets_actnorm_from_data(plugins):
    deq = make(plugins)
    deq.initialize(images(16), 3)
    actnorms = [m for m in deq.modules() if type(m).__name__ == "ActNorm"]
    assert actnorms and all(bool(m.initialized) for m in actnorms)


def test_channel_mask_and_no_invconv(plugins):
    deq = randomize_(make(plugins, coupling={"mask": "channel"}, step={"invconv": "none", "actnorm": False}))
    assert [type(m).__name__ for m in deq.flow.transforms[0].transforms] == ["MixLogisticCoupling"]
    x = images()
    y, log_q = deq(x, 3)
    torch.testing.assert_close(torch.floor(y * 8).to(torch.uint8), x, atol=0, rtol=0)


def test_steps_are_copies_with_alternating_parity(plugins):
    deq = make(plugins, steps=3)
    couplings = [step.transforms[-1] for step in deq.flow.transforms]
    assert [c.parity for c in couplings] == [0, 1, 0]
    assert {c.mask_kind for c in couplings} == {"checkerboard"}


def test_a_parity_set_by_hand_is_refused(plugins):
    with pytest.raises(flowkit.RecipeError, match=r"coupling\.parity = 1 cannot be set.*alternates step by step"):
        make(plugins, coupling={"parity": 1})


def test_wrong_image_shape_is_reported(plugins):
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 2, 4, 4\)"):
        make(plugins)(images(shape=(1, 4, 4)), 3)


def test_y_stays_in_the_bin_of_x_where_the_sigmoid_rounds_up_in_float32(plugins):
    # x + sigmoid(h) rounds to x + 1 in float32 for large x at h >= ~12: y must not leave x's bin.
    deq = make(plugins)
    with torch.no_grad():
        deq.flow.transforms[-1].transforms[-1].net.conv_out.bias.fill_(16.0)
    x = torch.tensor([0, 1, 128, 200, 254, 255], dtype=torch.uint8).repeat(32).view(4, 2, 4, 6)[..., :4]
    y, _ = deq(x, 8)
    torch.testing.assert_close(torch.floor(y * 256).to(torch.uint8), x, atol=0, rtol=0)


# -- the released code's context: the column halves side by side, initialised from data ---------
def keep(store: dict, name: str, value: torch.Tensor) -> None:
    """For forward hooks: a hook that returns a value replaces the module's output."""
    store.setdefault(name, value.detach().clone())


def columns(plugins, **kwargs):
    return make(plugins, coupling={"mask": "columns"}, context_layout="columns", **kwargs)


def test_a_columns_context_is_computed_from_the_column_halves_at_half_width(plugins):
    """run_cifar.py shallow_processor: x / 256 - 0.5, CheckerboardSplit, concatenated on channels,
    then the convolutions at half width; each coupling gets that context as it is (32 channels
    there, context_channels here), not gathered from a full-width one."""
    deq = randomize_(columns(plugins))
    x = images()
    seen = {}
    deq.encoder.conv_in.register_forward_hook(lambda m, args, out: keep(seen, "encoder", args[0]))
    coupling = deq.flow.transforms[0].transforms[-1]
    coupling.net.register_forward_hook(lambda m, args, out: keep(seen, "net", args[1]))
    y, log_q = deq(x, 3)
    centred = x.float() / 8 - 0.5
    torch.testing.assert_close(seen["encoder"], torch.cat([centred[..., 0::2], centred[..., 1::2]], dim=1))
    assert seen["net"].shape == (4, 4, 4, 2)  # context_channels at half width
    assert coupling.net.context_shape == (4, 4, 2)
    torch.testing.assert_close(torch.floor(y * 8).to(torch.uint8), x, atol=0, rtol=0)
    deq = deq.double().eval()
    y, log_q = deq(x, 3)
    torch.testing.assert_close(deq.log_prob_noise(y * 8 - x.double(), x, 3), log_q, atol=1e-6, rtol=1e-6)


def test_a_columns_context_needs_an_even_width(plugins):
    with pytest.raises(flowkit.ShapeError, match="even width"):
        columns(plugins, in_shape=(2, 4, 3))


def test_context_init_data_standardises_the_encoder_once(plugins):
    """flows.py conv2d with vcfg.init: every convolution of the shallow processor standardised
    on the first batch, the gate convolutions (init_scale 0.1) to 0.1; a restored dequantizer
    keeps its weights (the flag is saved with them)."""
    torch.manual_seed(0)
    deq = columns(plugins, context_init="data", context_blocks=2)
    x = images(n=256)
    deq.initialize(x, 3)
    outputs = {}  # of each layer, on the initialisation batch, with the initialised weights
    for name, conv in [("in", deq.encoder.conv_in), ("gate0", deq.encoder.convs2[0]), ("gate1", deq.encoder.convs2[1])]:
        conv.register_forward_hook(lambda m, args, out, n=name: keep(outputs, n, out))
    with torch.no_grad():
        deq.encoder(torch.cat([x.float()[..., 0::2], x.float()[..., 1::2]], dim=1) / 8 - 0.5)
    for name, scale in [("in", 1.0), ("gate0", 0.1), ("gate1", 0.1)]:
        out = outputs[name]
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(out.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.std(dim=(0, 2, 3), unbiased=False), torch.full((out.shape[1],), scale),
                                   atol=1e-4, rtol=1e-3)
    assert bool(deq.context_initialized) and "context_initialized" in deq.state_dict()
    weights = deq.encoder.conv_in.weight.clone()
    deq.initialize(images(n=256) // 2, 3)  # another batch: the encoder is not initialised again
    torch.testing.assert_close(deq.encoder.conv_in.weight, weights, atol=0, rtol=0)


def test_a_columns_context_with_a_coupling_that_cannot_take_it_names_the_key(plugins):
    with pytest.raises(flowkit.ShapeError, match='context_layout = "columns".*mask'):
        make(plugins, coupling={"mask": "channel"}, context_layout="columns")
