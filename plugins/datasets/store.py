"""Dataset ``store``: a prepared store read by memory map, and the ``flowkit data`` commands that
make, check and time one.

``flowkit data prepare SOURCE --out DIR [--size S] [--labels]`` decodes and resizes a folder of
images, an npz, the CIFAR-10 python batches or the downsampled-ImageNet batches once into uint8
arrays on disk (`_prepare`; the format is in `_store`). The dataset maps them: a split is a
read-only ``numpy.memmap`` of shape ``(N, C, H, W)``, an ndarray as the dataset contract asks, and
the runs read it one batch at a time, so anonymous memory does not grow with the store's size.
Opening reads the index and the array headers only; ``verify = true`` (or ``flowkit data verify
DIR``) also reads every chunk and checks its checksum. docs/data.md describes all of it.

Example recipe table::

    [data]
    use = "store"
    path = "data/imagenet32"
    labels = true
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowkit import DataParams, ImageDataset, hookimpl, param
from flowkit_plugins.datasets._arrays import local_path
from flowkit_plugins.datasets._store import check, open_store

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn


@dataclass(frozen=True, kw_only=True)
class StoreParams(DataParams):
    path: str = param(doc="a store folder made by `flowkit data prepare` (relative to the working directory)")
    verify: bool = param(False, "check every chunk's checksum when opened (reads the whole store once; "
                                "`flowkit data verify DIR` does the same); false: check the index and array "
                                "headers only")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("path is empty; name a store folder made by `flowkit data prepare`.")


def load_store(params: StoreParams, *, build: Callable[..., Any]) -> ImageDataset:
    """A prepared store, memory-mapped: its splits, labels and classes as the index records them."""
    store = open_store(local_path(params.path))
    if params.verify:
        check(store)
    cut = {"train": params.limit_train, "test": params.limit_test}
    # Plain slices of a memory map are memory maps: a limit reads nothing either.
    images = {split: array[: cut[split] or None] for split, array in store.images.items()}
    labels = {split: array[: cut[split] or None] if array is not None else None for split, array in store.labels.items()}
    labelled = store.classes and labels["train"] is not None
    return ImageDataset(
        name=store.folder.name, train=images["train"], test=images["test"], source=str(store.folder),
        max_value=int(store.index.get("max_value", 255)),
        train_labels=labels["train"] if labelled else None, test_labels=labels["test"] if labelled else None,
        classes=store.classes if labelled else (),
    )


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("store", load_store, params=StoreParams,
             summary="a store made by `flowkit data prepare`, memory-mapped: images of any number and size")


@hookimpl
def flowkit_add_commands(cli: Any) -> None:
    from flowkit_plugins.datasets._store_cli import data_group

    cli.add_command(data_group())


__all__ = ["StoreParams", "load_store"]
