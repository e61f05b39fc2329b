"""Dataset ``mnist_mosaic``: large grey images tiled from the embedded MNIST digits (no download).

Each image is a ``size/tile x size/tile`` grid of tiles; every tile holds one 28x28 digit at a
random offset inside it (0 .. tile - 28 pixels on each axis), on a black background. Train
mosaics take their digits from MNIST's training set and test mosaics from its test set, so no
digit is shared between the splits. Everything is drawn from one ``numpy`` generator seeded
with ``seed``, with all draws made up front: image ``i`` is the same whatever ``limit_train`` or
``limit_test`` cut, and the same on every machine.

What it is for: exercising models at high resolution (256x256 and up: Wavelet Flow's patch-wise
training, `recipes/wavelet_flow_256.toml`) on CPU and offline. What it is not: natural images.
Its statistics are MNIST's (mostly black), its tiles are independent, and its bits/dim is not
comparable with any published figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from flowkit import DataParams, ImageDataset, hookimpl, param
from flowkit.errors import DataError
from flowkit_plugins.datasets._arrays import check_images

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

DIGIT = 28  # side of an MNIST digit


@dataclass(frozen=True, kw_only=True)
class MnistMosaicParams(DataParams):
    size: int = param(256, "side of each square image in pixels; a multiple of tile")
    tile: int = param(32, "side of the tile that holds one digit (>= 28: the digit's random offset is "
                          "0..tile-28)")
    train_images: int = param(1000, "training mosaics (digits from MNIST's training set)")
    test_images: int = param(100, "test mosaics (digits from MNIST's test set)")
    seed: int = param(0, "seed of the digits and offsets chosen; the same seed gives the same images")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile < DIGIT:
            raise ValueError(f"tile = {self.tile} is smaller than a {DIGIT}x{DIGIT} digit; "
                             f"use tile >= {DIGIT}.")
        if self.size < self.tile or self.size % self.tile:
            raise ValueError(f"size = {self.size} must be a positive multiple of tile = {self.tile} "
                             f"(e.g. {self.tile * max(1, round(self.size / self.tile))}).")
        if self.train_images < 1 or self.test_images < 1:
            raise ValueError("train_images and test_images must be >= 1.")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed = {self.seed} is out of range; allowed: 0 to 2^63 - 1.")


def mosaics(digits: np.ndarray, count: int, params: MnistMosaicParams, rng: np.random.Generator,
            limit: int) -> np.ndarray:
    """``(min(count, limit or count), 1, size, size)`` uint8 mosaics of ``digits`` ``(N, 28, 28)``.
    The draws of all ``count`` images are made before the cut, so a limit keeps the first ones."""
    grid = params.size // params.tile
    chosen = rng.integers(0, len(digits), size=(count, grid, grid))
    offsets = rng.integers(0, params.tile - DIGIT + 1, size=(count, grid, grid, 2))
    n = min(count, limit) if limit > 0 else count
    out = np.zeros((n, params.size, params.size), dtype=np.uint8)
    for i in range(n):
        for row in range(grid):
            for col in range(grid):
                top = row * params.tile + offsets[i, row, col, 0]
                left = col * params.tile + offsets[i, row, col, 1]
                out[i, top : top + DIGIT, left : left + DIGIT] = digits[chosen[i, row, col]]
    return out[:, None]


def load_mnist_mosaic(params: MnistMosaicParams, *, build: Callable[..., Any]) -> ImageDataset:
    """``train_images`` and ``test_images`` grey mosaics of shape ``(N, 1, size, size)``."""
    resource = resources.files("flowkit_plugins.datasets") / "data" / "mnist.npz"
    with resources.as_file(resource) as path:
        if not path.is_file():
            raise DataError(f"The embedded MNIST file {path} is missing; reinstall flowkit, whose package "
                            "data includes it.")
        with np.load(path, allow_pickle=False) as archive:
            train, test = archive["x_train"], archive["x_test"]
    check_images(train, where=f'Key "x_train" of {path}')
    check_images(test, where=f'Key "x_test" of {path}')
    rng = np.random.default_rng(params.seed)
    train_x = mosaics(train, params.train_images, params, rng, params.limit_train)
    # The test draws come after all train draws, so limit_train never changes the test images.
    test_x = mosaics(test, params.test_images, params, rng, params.limit_test)
    return ImageDataset(name="mnist_mosaic", train=train_x, test=test_x,
                        source=f"{path} (mosaics: size {params.size}, tile {params.tile}, "
                               f"seed {params.seed})")


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("mnist_mosaic", load_mnist_mosaic, params=MnistMosaicParams,
             summary="grey mosaics of embedded MNIST digits, 256x256 by default: high resolution offline")
