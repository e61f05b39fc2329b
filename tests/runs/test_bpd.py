"""Bits/dim against cases computed by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flowkit import DensityModel, ImageDataset, NoParams, hookimpl
from flowkit.plugins import make_plugins
from flowkit.recipes.load import validate_recipe
from flowkit.runs.bpd import bits_per_dim, reduce_bits
from flowkit.runs.evaluate import evaluate
from flowkit.runs.session import build_session


def test_bits_per_dim_of_the_uniform_density_is_n_bits() -> None:
    # p(y) = 1 on the unit cube: each of the 2^n levels has probability 2^-n, so n bits per dim.
    log_p = torch.zeros(3, dtype=torch.float64)
    for n_bits in (1, 5, 8):
        torch.testing.assert_close(bits_per_dim(log_p, 784, n_bits), torch.full((3,), float(n_bits), dtype=torch.float64))


def test_bits_per_dim_counts_log_q_and_nats() -> None:
    # D = 2, n = 8, log p = -2 log 2 nats, log q = log 2: (2 log2 + 16 log2 + log2) / (2 log 2) = 9.5.
    got = bits_per_dim(torch.tensor([-2 * math.log(2.0)]), 2, 8, torch.tensor([math.log(2.0)]))
    assert got.item() == pytest.approx(9.5, abs=1e-12)


def test_reduce_bits_keeps_the_top_bits() -> None:
    x = torch.tensor([0, 7, 8, 255], dtype=torch.uint8)
    assert reduce_bits(x, 5).tolist() == [0, 0, 1, 31]
    assert reduce_bits(x, 8).tolist() == [0, 7, 8, 255]


class StandardNormalOnY(DensityModel):
    """log p(y) = log N(y; 0, I): a density whose bits/dim we can write down by hand."""

    def __init__(self, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.in_shape = in_shape
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def part_dims(self) -> dict[str, int]:
        return {"total": int(np.prod(self.in_shape))}

    def log_prob_parts(self, y, parts=None):  # noqa: ANN001, ANN201
        return {"total": (-0.5 * y**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) + 0 * self.dummy}


@dataclass(frozen=True, kw_only=True)
class ConstantParams:
    n_bits: int = 8
    limit_train: int = 0
    limit_test: int = 0


class HandPlugin:
    @hookimpl
    def flowkit_register_models(self, register) -> None:  # noqa: ANN001
        register("normal_on_y", lambda params, *, in_shape, build: StandardNormalOnY(in_shape), params=NoParams)

    @hookimpl
    def flowkit_register_datasets(self, register) -> None:  # noqa: ANN001
        def constant(params, *, build):  # noqa: ANN001, ANN202
            images = np.full((4, 1, 2, 2), 128, dtype=np.uint8)
            return ImageDataset("constant", images, images)

        register("constant", constant, params=ConstantParams)


def test_engine_bpd_of_a_constant_image_under_a_normal_density() -> None:
    plugins = make_plugins(extra=[HandPlugin()])
    table = {"recipe": {"name": "hand"}, "data": {"use": "constant"}, "dequantizer": {"use": "uniform"},
             "model": {"use": "normal_on_y"}, "train": {"steps": 1}}
    recipe = validate_recipe(plugins.registries, table, "hand.toml")
    session = build_session(recipe, plugins)
    got = evaluate(session, session.test_x, batch_size=4, seed=7)
    # The same noise by hand: y = (128 + u) / 256, D = 4, n_bits = 8.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        y, _ = session.dequantizer(session.test_x.all(), 8)
    nll = (0.5 * y.double() ** 2 + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    expected = ((nll + 4 * 8 * math.log(2)) / (4 * math.log(2))).mean().item()
    assert got["bpd"] == pytest.approx(expected, abs=1e-6)  # the model runs in float32
    # y is about 0.5 everywhere: 8 + (0.125 + 0.919) / log 2 = 9.506 bits/dim.
    assert got["bpd"] == pytest.approx(8 + (0.5 * 0.5**2 + 0.5 * math.log(2 * math.pi)) / math.log(2), abs=5e-3)


def test_importance_weighted_bpd_with_one_sample_is_the_bound_and_more_samples_do_not_raise_it() -> None:
    from flowkit.runs.evaluate import evaluate_iw

    plugins = make_plugins(extra=[HandPlugin()])
    table = {"recipe": {"name": "hand"}, "data": {"use": "constant"}, "dequantizer": {"use": "uniform"},
             "model": {"use": "normal_on_y"}, "train": {"steps": 1}}
    session = build_session(validate_recipe(plugins.registries, table, "hand.toml"), plugins)
    bound = evaluate(session, session.test_x, batch_size=4, seed=5)["bpd"]
    assert evaluate_iw(session, session.test_x, k=1, batch_size=4, seed=5) == pytest.approx(bound, abs=1e-9)
    # log-mean-exp >= mean-log (Jensen), so the k-sample estimate is at most the average bound.
    assert evaluate_iw(session, session.test_x, k=8, batch_size=4, seed=5) <= bound + 1e-3
