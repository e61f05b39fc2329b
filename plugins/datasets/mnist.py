"""Dataset ``mnist``: the complete MNIST set, shipped inside flowkit (no download).

The embedded ``data/mnist.npz`` holds uint8 ``x_train`` (60000, 28, 28) and ``x_test``
(10000, 28, 28), byte-identical to the official IDX files (see ``shared/data/README.md``
for the provenance and checksums), and the labels ``y_train`` and ``y_test`` (uint8 digits
0..9, the official ones). Train mean pixel 33.3184, test mean 33.7912.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from flowkit import DataParams, ImageDataset, hookimpl
from flowkit.errors import DataError
from flowkit_plugins.datasets._arrays import apply_limits, check_images, check_labels, to_nchw

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

PACKAGE = "flowkit_plugins.datasets"
FILENAME = "mnist.npz"
CLASSES = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True, kw_only=True)
class MnistParams(DataParams):
    """MNIST takes only the keys every dataset accepts (``n_bits``, ``limit_train``, ``limit_test``, ``labels``)."""


def load_mnist(params: MnistParams, *, build: Callable[..., Any]) -> ImageDataset:
    """MNIST 28x28 grey digits, embedded: 60000 train and 10000 test images as (N, 1, 28, 28), with
    their labels (the digits, classes "0" to "9")."""
    resource = resources.files(PACKAGE) / "data" / FILENAME
    with resources.as_file(resource) as path:
        if not path.is_file():
            raise DataError(
                f"The embedded MNIST file {path} is missing; reinstall flowkit, whose package "
                "data includes it."
            )
        with np.load(path, allow_pickle=False) as archive:
            train, test = archive["x_train"], archive["x_test"]
            train_labels, test_labels = archive["y_train"], archive["y_test"]
    check_images(train, where=f'Key "x_train" of {path}')
    check_images(test, where=f'Key "x_test" of {path}')
    train_labels = check_labels(train_labels, where=f'Key "y_train" of {path}', count=len(train))
    test_labels = check_labels(test_labels, where=f'Key "y_test" of {path}', count=len(test))
    train, test = apply_limits(train, test, params)
    train_labels, test_labels = apply_limits(train_labels, test_labels, params)
    return ImageDataset(name="mnist", train=to_nchw(train), test=to_nchw(test), source=str(path),
                        train_labels=train_labels, test_labels=test_labels, classes=CLASSES)


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("mnist", load_mnist, params=MnistParams,
             summary="MNIST 28x28 grey digits, embedded: 60000 train and 10000 test images")
