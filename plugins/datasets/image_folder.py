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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from flowkit import DataParams, ImageDataset, hookimpl, param
from flowkit.errors import DataError
from flowkit_plugins.datasets._arrays import apply_limits, local_path, to_nchw

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

SPLITS = ("train", "test")
MODES = {"L": 1, "RGB": 3}
LAYOUT = "a local folder with train/ and test/ subfolders of PNG files"


@dataclass(frozen=True, kw_only=True)
class ImageFolderParams(DataParams):
    path: str = param(doc="local folder with train/ and test/ subfolders of PNG files "
                          "(relative to the working directory)")
    size: int = param(0, "0: keep the size; S: center-crop to a square and resize to SxS (Image.BOX)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("path is empty; name a local folder.")
        if self.size < 0:
            raise ValueError(f"size = {self.size} is negative; use 0 to keep the size, or the side in pixels.")


def png_files(root: Path, split: str) -> list[Path]:
    """The PNG files of ``root/split``, sorted by name."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"The image folder {root} has no {split}/ subfolder; it must be {LAYOUT}.")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file()),
                   key=lambda p: p.name)
    if not files:
        raise DataError(f"The folder {folder} holds no PNG files (*.png); it must hold the {split} images.")
    return files


def center_square(image: Image.Image, size: int) -> Image.Image:
    """``image`` cropped to its central square and resized to ``size x size`` with ``Image.BOX``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.BOX)


class _Reader:
    """Reads images one by one and checks that each matches the first one read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.first: tuple[Path, str, tuple[int, int]] | None = None

    def __call__(self, file: Path) -> np.ndarray:
        try:
            with Image.open(file) as image:
                image.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"The image {file} could not be read as a PNG file ({exc}).") from exc
        if image.mode not in MODES:
            raise DataError(
                f"The image {file} has mode {image.mode}, but only L (grey) and RGB images are "
                'accepted; convert the files first, for example with `image.convert("RGB")`, '
                "which drops an alpha channel."
            )
        if self.first is None:
            self.first = (file, image.mode, image.size)
        first_file, first_mode, first_size = self.first
        if image.mode != first_mode:
            raise DataError(
                f"The image {file} has mode {image.mode} but {first_file} has mode {first_mode}; "
                "every image must have the same mode."
            )
        if self.size:
            image = center_square(image, self.size)
        elif image.size != first_size:
            raise DataError(
                f"The image {file} is {image.size[0]}x{image.size[1]} but {first_file} is "
                f"{first_size[0]}x{first_size[1]}; every image must have the same size, or set "
                "size to crop and resize them."
            )
        pixels = np.asarray(image, dtype=np.uint8)
        return pixels if pixels.ndim == 3 else pixels[:, :, None]


def load_image_folder(params: ImageFolderParams, *, build: Callable[..., Any]) -> ImageDataset:
    """PNG images (L or RGB) from train/ and test/ subfolders, optionally cropped and resized."""
    root = local_path(params.path)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"The image folder {root} {what}; it must be {LAYOUT}.")
    train_files, test_files = (png_files(root, split) for split in SPLITS)
    # Limits apply before reading, so a small limit does not decode a whole folder.
    train_files, test_files = apply_limits(train_files, test_files, params)
    read = _Reader(params.size)
    train = np.stack([read(f) for f in train_files])
    test = np.stack([read(f) for f in test_files])
    return ImageDataset(name=root.name, train=to_nchw(train), test=to_nchw(test), source=str(root))


@hookimpl
def flowkit_register_datasets(register: RegisterFn) -> None:
    register("image_folder", load_image_folder, params=ImageFolderParams,
             summary="PNG images (L or RGB) from train/ and test/ subfolders of a local folder")
