"""Helpers shared by the built-in datasets: validation, limits and the NCHW layout.

Private to ``flowkit_plugins.datasets``. A ``where`` argument names the array in error
messages, for example ``'Key "x_train" of /data/digits.npz'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from flowkit.contracts.dataset import DataParams
from flowkit.errors import DataError

#: Channel counts accepted as the last axis of an NHWC array (grey, RGB, RGBA).
NHWC_CHANNELS = (1, 3, 4)

#: An array of images, or a list of image files not read yet.
Items = TypeVar("Items", np.ndarray, list[Any])


def local_path(path: str) -> Path:
    """``path`` made absolute against the current working directory (``~`` expanded).

    ``..`` is collapsed but symbolic links are kept, so messages show the names the user wrote.
    """
    return Path(os.path.abspath(os.path.expanduser(path)))


def check_images(images: np.ndarray, *, where: str) -> None:
    """Raises `DataError` unless ``images`` is uint8 ``(N, H, W)`` or ``(N, H, W, C)``, C in 1, 3, 4."""
    if images.dtype != np.uint8:
        raise DataError(
            f"{where} has dtype {images.dtype}, but images must be uint8; convert it with "
            "`.astype(np.uint8)` only if its values are integers from 0 to 255."
        )
    if images.ndim not in (3, 4):
        raise DataError(
            f"{where} has {images.ndim} dimensions (shape {images.shape}), but images must be "
            "(N, H, W) for grey or (N, H, W, C) for colour."
        )
    if images.ndim == 4 and images.shape[-1] not in NHWC_CHANNELS:
        raise DataError(
            f"{where} has shape {images.shape}, but a 4-dimensional image array must be "
            "(N, H, W, C) with C = 1, 3 or 4; channels-first arrays are not accepted."
        )


def to_nchw(images: np.ndarray) -> np.ndarray:
    """A checked ``(N, H, W)`` or ``(N, H, W, C)`` array as C-contiguous ``(N, C, H, W)``."""
    if images.ndim == 3:
        return images[:, None]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def first(items: Items, limit: int) -> Items:
    """The first ``limit`` items: all of them when ``limit`` is 0 or not below the count.

    A cut array is copied, so the full array it came from can be freed.
    """
    if limit <= 0 or limit >= len(items):
        return items
    return items[:limit].copy()


def apply_limits(train: Items, test: Items, params: DataParams) -> tuple[Items, Items]:
    """``(train, test)`` cut to their first ``params.limit_train`` and ``params.limit_test`` items.

    Items are image arrays, or lists of files when the dataset reads images one by one.
    """
    return first(train, params.limit_train), first(test, params.limit_test)
