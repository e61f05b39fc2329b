"""Dataset ``npz``: any local ``.npz`` archive with uint8 arrays ``x_train`` and ``x_test``.

Arrays are ``(N, H, W)`` for grey images or ``(N, H, W, C)`` with C = 1, 3 or 4 for colour;
they become ``(N, C, H, W)``. Other keys (labels such as ``y_train``) are ignored. The file
is read with ``allow_pickle=False``, so object arrays are refused. Every file in
``shared/data`` has this layout.

``max_value`` is the largest value the format allows: 255 for ordinary images, 16 for
scikit-learn's digits (17 levels). Reducing to ``n_bits`` maps ``[0, max_value]`` onto
``[0, 2^n_bits)``, so getting it wrong changes the reported bits/dim.

Example recipe table::

    [data]
    use = "npz"
    path = "../shared/data/sklearn_digits.npz"
    max_value = 16
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flowkit import DataParams, ImageDataset, hookimpl, param
from flowkit.errors import DataError
from flowkit_plugins.datasets._arrays import apply_limits, check_images, local_path, to_nchw

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

KEYS = ("x_train", "x_test")


@dataclass(frozen=True, kw_only=True)
class NpzParams(DataParams):
    path: str = param(doc="local .npz file with uint8 x_train and x_test, NHW or NHWC "
                          "(relative to the working directory)")
    max_value: int = param(255, "largest pixel value of the format: 255, or 16 for sklearn_digits")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("path is empty; name a local .npz file.")
        if not 1 <= self.max_value <= 255:
            raise ValueError(f"max_value = {self.max_value} is out of range; allowed: 1 to 255.")


def read_npz_images(path: Path) -> dict[str, np.ndarray]:
    """The arrays ``x_train`` and ``x_test`` of the archive at ``path``, unchecked."""
    expected = "a local .npz archive with uint8 arrays x_train and x_test"
    if not path.exists():
        raise DataError(f"The dataset file {path} does not exist; it must be {expected}.")
    if not path.is_file():
        raise DataError(f"The dataset path {path} is not a file; it must be {expected}.")
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"The dataset file {path} is not a .npz (zip) archive; it must be {expected}."
        )
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            present = sorted(archive.files)
            for key in KEYS:
                if key not in present:
                    shown = ", ".join(present) or "none"
                    raise DataError(
                        f'The dataset file {path} has no key "{key}" (keys present: {shown}); it '
                        f"must be {expected}."
                    )
                try:
                    arrays[key] = archive[key]
                except ValueError as exc:  # an object array, refused without pickle
                    raise DataError(
                        f'Key "{key}" of {path} could not be read as a plain array ({exc}); '
                        "object arrays are refused, save images as uint8."
                    ) from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"The dataset file {path} could not be read ({exc}); it must be {expected}.") from exc
    return arrays


def load_npz(params: NpzParams, *, build: Callable[..., Any]) -> ImageDataset:
    """Images from a local .npz file with uint8 x_train and x_test (NHW or NHWC)."""
    path = local_path(params.path)
    arrays = read_npz_images(path)
    for key, images in arrays.items():
        where = f'Key "{key}" of {path}'
        check_images(images, where=where)
        if images.size and int(images.max()) > params.max_value:
            raise DataError(
                f"{where} holds values up to {int(images.max())}, above max_value = "
                f"{params.max_value}; set max_value to the largest value the format allows."
            )
    train, test = apply_limits(arrays["x_train"], arrays["x_test"], params)
    if train.shape[1:] != test.shape[1:]:
        raise DataError(
            f'Key "x_train" of {path} holds images of shape {train.shape[1:]} but key "x_test" holds '
            f"{test.shape[1:]}; both splits must have the same image shape."
        )
    return ImageDataset(
        name=path.stem, train=to_nchw(train), test=to_nchw(test), source=str(path),
        max_value=params.max_value,
    )


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("npz", load_npz, params=NpzParams,
             summary="images from a local .npz file with uint8 x_train and x_test (NHW or NHWC)")
