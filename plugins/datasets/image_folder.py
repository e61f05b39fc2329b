"""Dataset ``image_folder``: PNG files in ``train/`` and ``test/`` subfolders of a local folder.

Files are read with Pillow in the order of their names (``*.png``, any case; other files
are ignored). Every image must have mode ``L`` (grey, C = 1) or ``RGB`` (C = 3), the same
mode throughout; other modes (``RGBA``, palette ``P``, 16-bit ``I;16``) are refused rather
than converted, so no pixel is changed silently.

``size = 0`` keeps the images as they are, and they must then all have the same size.
``size = S`` center-crops each image to a square (side ``min(W, H)``) and resizes it to
``S x S`` with ``Image.BOX`` (the mean of the source pixels each target pixel covers), the
way the downsampled ImageNet 64x64 that Wavelet Flow uses was prepared; sizes may then differ.

Example recipe table::

    [data]
    use = "image_folder"
    path = "data/imagenet64"
    size = 64
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flowkit import DataParams, ImageDataset, hookimpl, param
from flowkit_plugins.datasets._arrays import apply_limits, local_path, to_nchw
from flowkit_plugins.datasets._folder import Reader, list_folder

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

@dataclass(frozen=True, kw_only=True)
class ImageFolderParams(DataParams):
    path: str = param(doc="local folder of PNG, JPEG or WebP files in train/ and test/ subfolders, optionally in "
                          "class subfolders (relative to the working directory)")
    size: int = param(0, "0: keep the size; S: center-crop to a square and resize to SxS (Image.BOX)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("path is empty; name a local folder.")
        if self.size < 0:
            raise ValueError(f"size = {self.size} is negative; use 0 to keep the size, or the side in pixels.")


def load_image_folder(params: ImageFolderParams, *, build: Callable[..., Any]) -> ImageDataset:
    """Images (L or RGB; PNG, JPEG, WebP) from train/ and test/ subfolders, optionally in class
    subfolders (which give the labels), optionally cropped and resized."""
    listing = list_folder(local_path(params.path))
    # Limits apply before reading, so a small limit does not decode a whole folder.
    train_files, test_files = apply_limits(listing.files["train"], listing.files["test"], params)
    read = Reader(params.size)
    train = np.stack([read(f) for f, _ in train_files])
    test = np.stack([read(f) for f, _ in test_files])
    labels: dict[str, Any] = {}
    if listing.labelled:
        labels = {"train_labels": np.array([k for _, k in train_files], dtype=np.int64),
                  "test_labels": np.array([k for _, k in test_files], dtype=np.int64),
                  "classes": listing.classes}
    return ImageDataset(name=listing.root.name, train=to_nchw(train), test=to_nchw(test), source=str(listing.root),
                        **labels)


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("image_folder", load_image_folder, params=ImageFolderParams,
             summary="PNG, JPEG or WebP images (L or RGB) from train/ and test/ subfolders, class subfolders "
                     "as labels")
