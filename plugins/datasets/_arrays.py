"""Helpers shared by the built-in datasets: validation, labels, limits and the NCHW layout.

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
    """A checked ``(N, H, W)`` or ``(N, H, W, C)`` array as ``(N, C, H, W)``: a view, not a copy (the
    runs read it per batch and make each batch contiguous, `flowkit.runs.data.Split`), so a
    dataset is never held twice."""
    if images.ndim == 3:
        return images[:, None]
    return images.transpose(0, 3, 1, 2)


def check_labels(labels: np.ndarray, *, where: str, count: int) -> np.ndarray:
    """``labels`` as int64 ``(count,)`` class indices >= 0; `DataError` naming ``where`` otherwise."""
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{where} has shape {labels.shape}, but labels must be one per image: ({count},).")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where} has dtype {labels.dtype}, but labels must be integer class indices 0..K-1.")
    if count and int(labels.min()) < 0:
        raise DataError(f"{where} holds the label {int(labels.min())}, but labels must be class indices 0..K-1.")
    return labels.astype(np.int64)


def index_classes(*labels: np.ndarray) -> tuple[str, ...]:
    """Class names ``("0", ..., "K-1")`` for integer labels without names, K = the largest label + 1."""
    top = max((int(y.max()) for y in labels if len(y)), default=-1)
    return tuple(str(k) for k in range(top + 1))


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
