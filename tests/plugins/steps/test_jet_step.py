"""``step:jet`` and ``model:jet``: big_vision's projections (random feature permutations, frozen;
checkerboard and stripe token splits with the ``cut``), the coupling (x2 + b) 2 sigmoid(s), odd grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowkit
from flowkit.nn.transformer import tokens
from flowkit.plugins import make_plugins
from flowkit.testing import randomize_
from flowkit_plugins.steps.jet import spatial_halves

NET = {"use": "vit", "width": 16, "depth": 1, "heads": 2}
PAPER_SPATIAL = ["checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv"]


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def jet_step(plugins, shape=(8, 4, 6), **params):
    return flowkit.build("step", "jet", plugins=plugins, in_shape=shape, coupling={"net": NET}, **params).double()


def big_vision_split(projection: str, x: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """x (B, T, K) tokens -> [x1 | x2] after big_vision's split_spatial (jet.py), with its cut
    "... n (s c) -> ... (n s) c": the conditioning half-tokens' features, then the transformed ones'."""
    n = nh * nw
    kind = projection.removesuffix("-inv")
    if kind == "vstripes":
        first, second = np.arange(n)[::2], np.arange(1, n)[::2]
    elif kind == "hstripes":
        rows = np.arange(n) // nw
        first, second = np.nonzero(rows % 2 == 0)[0], np.nonzero(rows % 2 == 1)[0]
    else:
        vals = (np.arange(n).reshape(nh, nw) + np.arange(nh).reshape(nh, 1)).flatten()
        first, second = np.nonzero(vals % 2 == 0)[0], np.nonzero(vals % 2 == 1)[0]
    if projection.endswith("-inv"):
        first, second = second, first
    b, _, k = x.shape

    def cut(a: np.ndarray) -> np.ndarray:
        return a.reshape(b, n // 2, 2, k // 2).reshape(b, n, k // 2)

    return np.concatenate([cut(x[:, first]), cut(x[:, second])], axis=2)


@pytest.mark.parametrize("projection", PAPER_SPATIAL)
def test_spatial_couplings_gather_the_tokens_as_big_visions_split_and_cut_do(plugins, projection: str) -> None:
    s = jet_step(plugins, shape=(8, 4, 6), projection=projection)
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    permuted = x.flatten(1)[:, s.index].reshape(x.shape)
    expected = big_vision_split(projection, tokens(x).numpy(), 4, 6)
    np.testing.assert_array_equal(tokens(permuted).numpy(), expected)


def test_channel_couplings_permute_each_tokens_features_by_one_fixed_random_permutation(plugins) -> None:
    s = jet_step(plugins, projection="random", seed=7)
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    permuted = x.flatten(1)[:, s.index].reshape(x.shape)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(permuted, x[:, perm], atol=0, rtol=0)
    assert not torch.equal(perm, torch.arange(8))


def test_jets_permutations_are_fixed_frozen_and_saved_with_the_model(plugins) -> None:
    model = flowkit.build("model", "jet", plugins=plugins, in_shape=(1, 8, 8), depth=4, seed=3,
                          step={"coupling": {"net": NET}})
    steps = [m for m in model.modules() if type(m).__name__ == "JetStep"]
    again = flowkit.build("model", "jet", plugins=plugins, in_shape=(1, 8, 8), depth=4, seed=3,
                          step={"coupling": {"net": NET}})
    other = flowkit.build("model", "jet", plugins=plugins, in_shape=(1, 8, 8), depth=4, seed=4,
                          step={"coupling": {"net": NET}})
    state = model.state_dict()
    keys = [k for k in state if k.endswith(".index")]
    assert len(keys) == 4, keys  # one permutation per coupling, in the state_dict
    assert all(k not in dict(model.named_parameters()) for k in keys)  # buffers: no optimiser sees them
    for k in keys:
        assert torch.equal(state[k], again.state_dict()[k])  # fixed by the seed
    assert not all(torch.equal(state[k], other.state_dict()[k]) for k in keys)
    assert len({tuple(s.index.tolist()) for s in steps[:3]}) == 3  # each channel coupling its own
    before = [s.index.clone() for s in steps]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        (-model.log_prob(torch.rand(4, 1, 8, 8))).mean().backward()
        optimizer.step()
    assert all(torch.equal(b, s.index) for b, s in zip(before, steps, strict=True))
    other.load_state_dict(state)  # a checkpoint brings its permutations along
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in keys)


def test_the_coupling_is_x2_plus_b_times_two_sigmoid_s(plugins) -> None:
    s = jet_step(plugins, projection="random")
    randomize_(s, 0.1, torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    y = x.flatten(1)[:, s.index].reshape(x.shape)
    b, raw = s.coupling.net(y[:, :4]).chunk(2, dim=1)
    z, logabsdet = s(x)
    z_perm = z.flatten(1)[:, s.index].reshape(x.shape)
    torch.testing.assert_close(z_perm[:, :4], y[:, :4])
    torch.testing.assert_close(z_perm[:, 4:], (y[:, 4:] + b) * 2 * torch.sigmoid(raw))
    torch.testing.assert_close(logabsdet, torch.log(2 * torch.sigmoid(raw)).sum(dim=(1, 2, 3)))


def test_an_odd_grid_splits_its_extra_stripe_by_features() -> None:
    """MNIST at patch 4: a 7x7 grid. Each side gets 49 half-tokens; the checkerboard splits the
    last token, vstripes the last column, hstripes the last row."""
    cond, trans = spatial_halves("checkerboard", 7, 7)
    assert len(cond) == len(trans) == 49
    assert (48, 0) in cond and (48, 1) in trans
    cond, trans = spatial_halves("vstripes-inv", 7, 7)
    column = [r * 7 + 6 for r in range(7)]
    assert [t for t, s in cond if t in column] == column and all(s == 0 for t, s in cond if t in column)
    assert {t for t, s in trans if s == 1 and t in column} == set(column)
    # -inv: the odd columns condition the even ones (but the split last column).
    assert {t for t, _ in cond if t not in column} == {r * 7 + c for r in range(7) for c in (1, 3, 5)}
    cond, trans = spatial_halves("hstripes", 7, 7)
    assert len(cond) == 49 and all((42 + c, 1) in trans for c in range(7))


def test_the_imagenet_config_cycles_four_channel_couplings_and_the_six_spatial_splits(plugins) -> None:
    ref = flowkit.ref("model", "jet", plugins=plugins, depth=32,
                      kinds=["channels", "channels", "channels", "channels", "spatial"],
                      spatial_projections=PAPER_SPATIAL)
    projections = ref.params.projections()
    assert [i for i, p in enumerate(projections) if p != "random"] == [4, 9, 14, 19, 24, 29]
    assert [p for p in projections if p != "random"] == PAPER_SPATIAL
    with pytest.raises(flowkit.RecipeError, match="spatial_projections"):
        flowkit.ref("model", "jet", plugins=plugins, spatial_projections=["diagonal"])
