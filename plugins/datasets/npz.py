"""Dataset ``npz``: any local ``.npz`` archive with uint8 arrays ``x_train`` and ``x_test``.

Arrays are ``(N, H, W)`` for grey images or ``(N, H, W, C)`` with C = 1, 3 or 4 for colour;
they become ``(N, C, H, W)`` (a transposed view, not a copy). Integer labels ``y_train`` and
``y_test``, when the file has both, are the labels (classes ``"0" .. "K-1"``, K the largest label
+ 1); other keys are ignored. The file is read with ``allow_pickle=False``, so object arrays are
refused. Every file in ``shared/data`` has this layout (`_npz.read_npz` reads it).

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowkit import DataParams, ImageDataset, hookimpl, param
from flowkit.errors import DataError
from flowkit_plugins.datasets._arrays import apply_limits, index_classes, local_path, to_nchw
from flowkit_plugins.datasets._npz import read_npz

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

@dataclass(frozen=True, kw_only=True)
class NpzParams(DataParams):
    path: str = param(doc="local .npz file with uint8 x_train and x_test, NHW or NHWC, and optional "
                          "labels y_train and y_test (relative to the working directory)")
    max_value: int = param(255, "largest pixel value of the format: 255, or 16 for sklearn_digits")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("path is empty; name a local .npz file.")
        if not 1 <= self.max_value <= 255:
            raise ValueError(f"max_value = {self.max_value} is out of range; allowed: 1 to 255.")


def load_npz(params: NpzParams, *, build: Callable[..., Any]) -> ImageDataset:
    """Images from a local .npz file with uint8 x_train and x_test (NHW or NHWC), and its labels
    y_train and y_test where it has both."""
    path = local_path(params.path)
    read = read_npz(path, labels=params.labels)
    arrays = {"x_train": read.x_train, "x_test": read.x_test}
    for key, images in arrays.items():
        where = f'Key "{key}" of {path}'
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
    labels: dict[str, Any] = {}
    if read.y_train is not None and read.y_test is not None:
        train_labels, test_labels = apply_limits(read.y_train, read.y_test, params)
        labels = {"train_labels": train_labels, "test_labels": test_labels,
                  "classes": index_classes(read.y_train, read.y_test)}
    return ImageDataset(
        name=path.stem, train=to_nchw(train), test=to_nchw(test), source=str(path),
        max_value=params.max_value, **labels,
    )


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("npz", load_npz, params=NpzParams,
             summary="images from a local .npz file with uint8 x_train and x_test (NHW or NHWC)")
