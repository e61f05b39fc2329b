"""The embedded MNIST dataset: shape, dtype, known statistics, limits, registration."""

from __future__ import annotations

import numpy as np
import pytest

import flowkit
from flowkit.api import default_plugins


@pytest.fixture(scope="module")
def mnist() -> flowkit.ImageDataset:
    return flowkit.build("dataset", "mnist")


def test_mnist_is_uint8_nchw_of_the_full_size(mnist: flowkit.ImageDataset) -> None:
    assert mnist.name == "mnist"
    assert mnist.train.shape == (60000, 1, 28, 28)
    assert mnist.test.shape == (10000, 1, 28, 28)
    assert mnist.train.dtype == np.uint8 and mnist.test.dtype == np.uint8
    assert mnist.shape == (1, 28, 28)
    assert mnist.max_value == 255


def _mean_std(images: np.ndarray) -> tuple[float, float]:
    # From the histogram of the 256 values: exact, and much faster than float64 copies.
    counts = np.bincount(images.ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64)
    mean = float((counts * values).sum() / counts.sum())
    return mean, float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))


def test_mnist_matches_the_published_statistics(mnist: flowkit.ImageDataset) -> None:
    train_mean, train_std = _mean_std(mnist.train)
    assert train_mean == pytest.approx(33.3184, abs=5e-4)
    assert train_std == pytest.approx(78.5675, abs=5e-4)
    assert _mean_std(mnist.test)[0] == pytest.approx(33.7912, abs=5e-4)
    assert mnist.train.min() == 0 and mnist.train.max() == 255


def test_mnist_limits_keep_the_first_images(mnist: flowkit.ImageDataset) -> None:
    small = flowkit.build("dataset", "mnist", limit_train=100, limit_test=7)
    assert small.train.shape == (100, 1, 28, 28)
    assert small.test.shape == (7, 1, 28, 28)
    np.testing.assert_array_equal(small.train, mnist.train[:100])
    np.testing.assert_array_equal(small.test, mnist.test[:7])


def test_mnist_limit_above_the_count_keeps_everything() -> None:
    data = flowkit.build("dataset", "mnist", limit_test=10**6)
    assert data.test.shape[0] == 10000


def test_mnist_is_registered_by_the_flowkit_distribution() -> None:
    part = default_plugins().registries.part("dataset", "mnist")
    assert part.distribution == "flowkit"
    assert part.plugin == "mnist"


def test_mnist_rejects_n_bits_out_of_range() -> None:
    with pytest.raises(flowkit.RecipeError, match="n_bits = 9 is out of range"):
        flowkit.build("dataset", "mnist", n_bits=9)
