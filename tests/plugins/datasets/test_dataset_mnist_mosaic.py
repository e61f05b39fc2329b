"""The ``mnist_mosaic`` dataset: shape, dtype, content, determinism, limits, parameter errors."""

from __future__ import annotations

import numpy as np
import pytest

import flowkit
from flowkit.api import default_plugins

SMALL = {"size": 64, "train_images": 6, "test_images": 3}


@pytest.fixture(scope="module")
def mnist() -> flowkit.ImageDataset:
    return flowkit.build("dataset", "mnist")


def test_mosaics_are_uint8_nchw_of_the_asked_size() -> None:
    data = flowkit.build("dataset", "mnist_mosaic", **SMALL)
    assert data.name == "mnist_mosaic"
    assert data.train.shape == (6, 1, 64, 64) and data.test.shape == (3, 1, 64, 64)
    assert data.train.dtype == np.uint8 and data.test.dtype == np.uint8
    assert data.shape == (1, 64, 64) and data.max_value == 255


def test_the_default_is_256x256() -> None:
    data = flowkit.build("dataset", "mnist_mosaic", limit_train=2, limit_test=1)
    assert data.shape == (1, 256, 256) and len(data.train) == 2 and len(data.test) == 1


def _tiles(image: np.ndarray, tile: int) -> list[np.ndarray]:
    """The tiles of a ``(1, H, W)`` mosaic, row by row, as int64."""
    grid = image.shape[-1] // tile
    out = []
    for row in range(grid):
        for col in range(grid):
            cell = image[0, row * tile : (row + 1) * tile, col * tile : (col + 1) * tile].astype(np.int64)
            out.append(cell)
    return out


def test_every_tile_holds_one_digit_of_its_split(mnist: flowkit.ImageDataset) -> None:
    data = flowkit.build("dataset", "mnist_mosaic", **SMALL)
    train_digits = {d.tobytes() for d in mnist.train[:, 0]}
    test_digits = {d.tobytes() for d in mnist.test[:, 0]}
    for images, own in ((data.train, train_digits), (data.test, test_digits)):
        for image in images:
            for cell in _tiles(image, 32):
                windows = [cell[t : t + 28, s : s + 28].astype(np.uint8).tobytes()
                           for t in range(5) for s in range(5)]
                found = [w for w in windows if w in own]
                assert found, "a tile holds no digit of its own split"
                # All ink lies inside the digit's window (black margins around it).
                assert cell.sum() == sum(np.frombuffer(found[0], np.uint8).astype(np.int64))


def test_the_same_seed_gives_the_same_images_and_another_seed_others() -> None:
    a = flowkit.build("dataset", "mnist_mosaic", **SMALL)
    b = flowkit.build("dataset", "mnist_mosaic", **SMALL)
    c = flowkit.build("dataset", "mnist_mosaic", **SMALL, seed=1)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
    assert not np.array_equal(a.train, c.train)


def test_limits_keep_the_first_images_and_leave_the_test_set_alone() -> None:
    full = flowkit.build("dataset", "mnist_mosaic", **SMALL)
    cut = flowkit.build("dataset", "mnist_mosaic", **SMALL, limit_train=2, limit_test=1)
    np.testing.assert_array_equal(cut.train, full.train[:2])
    np.testing.assert_array_equal(cut.test, full.test[:1])
    other_train = flowkit.build("dataset", "mnist_mosaic", **SMALL, limit_train=4)
    np.testing.assert_array_equal(other_train.test, full.test)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tile": 20}, "tile = 20 is smaller than a 28x28 digit"),
        ({"size": 100}, "size = 100 must be a positive multiple of tile = 32"),
        ({"size": 16}, "size = 16 must be a positive multiple of tile = 32"),
        ({"train_images": 0}, "train_images and test_images must be >= 1"),
        ({"seed": -1}, "seed = -1 is out of range"),
    ],
)
def test_bad_parameters_name_the_key(params: dict, message: str) -> None:
    with pytest.raises(flowkit.RecipeError, match=message):
        flowkit.build("dataset", "mnist_mosaic", **params)


def test_mnist_mosaic_is_registered_by_the_flowkit_distribution() -> None:
    part = default_plugins().registries.part("dataset", "mnist_mosaic")
    assert part.distribution == "flowkit" and part.plugin == "mnist_mosaic"
