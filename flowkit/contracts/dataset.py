"""Image datasets: uint8 NCHW arrays held in memory, read from local files only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowkit.params import param


@dataclass(frozen=True, kw_only=True)
class DataParams:
    """Keys every ``[data]`` table accepts; datasets subclass this for their own Params."""

    n_bits: int = param(8, "bits per pixel kept (Glow uses 5 on CelebA-HQ); 1..8")
    limit_train: int = param(0, "use only the first N training images (0: all)")
    limit_test: int = param(0, "use only the first N test images (0: all)")

    def __post_init__(self) -> None:
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits = {self.n_bits} is out of range; allowed: 1 to 8.")
        if self.limit_train < 0 or self.limit_test < 0:
            raise ValueError("limit_train and limit_test must be >= 0.")


@dataclass(frozen=True)
class ImageDataset:
    """Train and test images, ``uint8`` arrays of shape ``(N, C, H, W)``, values 0..255.

    ``max_value`` is the largest value the format allows (255; 16 for scikit-learn digits):
    reducing to ``n_bits`` maps ``[0, max_value]`` onto ``[0, 2^n_bits)``.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    source: str = ""
    max_value: int = 255

    def __post_init__(self) -> None:
        for split, arr in (("train", self.train), ("test", self.test)):
            if arr.dtype != np.uint8 or arr.ndim != 4:
                raise ValueError(
                    f"{self.name}: {split} images must be uint8 of shape (N, C, H, W), got "
                    f"{arr.dtype} {arr.shape}."
                )
        if self.train.shape[1:] != self.test.shape[1:]:
            raise ValueError(
                f"{self.name}: train images are {self.train.shape[1:]} but test images are "
                f"{self.test.shape[1:]}."
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)
