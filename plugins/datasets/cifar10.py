"""Dataset ``cifar10``: the official ``cifar-10-batches-py`` folder, read without running pickled code.

The official python version of CIFAR-10 (Krizhevsky 2009) is a folder of six pickles,
``data_batch_1`` .. ``data_batch_5`` (50000 training images) and ``test_batch`` (10000); `_cifar`
reads them (its docstring states the format) with a restricted unpickler that refuses anything
but numpy arrays, lists and strings. The labels are the ten classes of `_cifar.CLASSES`.

Example recipe table::

    [data]
    use = "cifar10"
    path = "~/data/cifar-10-batches-py"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flowkit import DataParams, ImageDataset, hookimpl, param
from flowkit.errors import DataError
from flowkit_plugins.datasets._arrays import first, local_path
from flowkit_plugins.datasets._cifar import CLASSES, FOLDER, TEST_FILE, TRAIN_FILES, find_folder, read_batch

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

__all__ = ["TEST_FILE", "TRAIN_FILES", "Cifar10Params", "load_cifar10", "read_batch"]


@dataclass(frozen=True, kw_only=True)
class Cifar10Params(DataParams):
    path: str = param("", f"the official {FOLDER} folder, or the folder holding it (relative to the working directory)")


def load_cifar10(params: Cifar10Params, *, build: Callable[..., Any]) -> ImageDataset:
    """CIFAR-10 32x32 colour images from the official python folder: 50000 train and 10000 test,
    with their labels (the ten classes, airplane .. truck)."""
    if not params.path:
        raise DataError(f"data.path is empty; set it to the official {FOLDER} folder of CIFAR-10.")
    folder = find_folder(local_path(params.path))
    batches = []
    count = 0
    for name in TRAIN_FILES:
        if params.limit_train and count >= params.limit_train:
            break  # the first files already hold every image asked for
        batches.append(read_batch(folder / name))
        count += len(batches[-1].images)
    train = first(np.concatenate([b.images for b in batches]), params.limit_train)
    train_labels = first(np.concatenate([b.labels for b in batches]), params.limit_train)
    test_batch = read_batch(folder / TEST_FILE)
    test, test_labels = first(test_batch.images, params.limit_test), first(test_batch.labels, params.limit_test)
    return ImageDataset(name="cifar10", train=train, test=test, source=str(folder),
                        train_labels=train_labels, test_labels=test_labels, classes=CLASSES)


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("cifar10", load_cifar10, params=Cifar10Params,
             summary="CIFAR-10 from the official cifar-10-batches-py folder, read without running pickled code")
