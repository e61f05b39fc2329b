"""A folder of image files: which files, in which split and class, in which order, and how each is
decoded. Used by the ``image_folder`` dataset and by ``flowkit data prepare``.

Private to ``flowkit_plugins.datasets``.

**Files.** PNG, JPEG and WebP (``*.png``, ``*.jpg``, ``*.jpeg``, ``*.webp``, any case); other files
are ignored. Every image must have mode ``L`` (grey, C = 1) or ``RGB`` (C = 3), the same mode
throughout; other modes (``RGBA``, palette ``P``, 16-bit ``I;16``, ``CMYK`` JPEGs) are refused
rather than converted, so no pixel is changed silently. JPEG and lossy WebP are decoded by
Pillow: the pixels are what its decoder gives, not the camera's.

**Splits.** ``root/train/`` and ``root/test/`` are the splits. A folder with neither is split
deterministically: a file is a test image when the CRC-32 of its path relative to ``root``
(POSIX separators) is 0 modulo 10, so about one in ten, the same on every machine and whatever
other files are added. A folder with only one of them is refused.

**Classes.** A split folder holds either image files or class subfolders of image files
(``train/<class>/*.png``), not both. The classes are the subfolder names of both splits, sorted;
a class's label is its index in that order.

**Order.** Files are ordered by file name, then by class folder name: naming files by their
index (``000017.png``) keeps an order across class folders, so a folder written from an array
reads back in the array's order.

**Size.** ``size = 0`` keeps the images as they are, and they must then all have the same size.
``size = S`` center-crops each image to a square (side ``min(W, H)``) and resizes it to ``S x S``
with ``Image.BOX`` (the mean of the source pixels each target pixel covers), the way the
downsampled ImageNet 64x64 that Wavelet Flow uses was prepared; sizes may then differ.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from flowkit.errors import DataError

SPLITS = ("train", "test")
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MODES = {"L": 1, "RGB": 3}
LAYOUT = ("a local folder of PNG, JPEG or WebP files, with train/ and test/ subfolders (or neither, for a "
          "split by file name), each holding image files or class subfolders of them")
TEST_MODULUS = 10  # the deterministic split: one file in TEST_MODULUS, by the CRC-32 of its path


@dataclass(frozen=True)
class Listing:
    """The image files of a folder: per split, ``(file, class index or -1)`` in reading order."""

    root: Path
    files: dict[str, list[tuple[Path, int]]]
    classes: tuple[str, ...]
    split_by: str  # "folders" (train/ and test/) or "crc32" (the deterministic split)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES and path.is_file() and not path.name.startswith(".")


def _scan(folder: Path) -> dict[str | None, list[Path]]:
    """Image files of ``folder`` by class subfolder (None: directly in it); mixing is refused."""
    direct = sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)
    subfolders = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    classes = {d.name: sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name) for d in subfolders}
    classes = {name: files for name, files in classes.items() if files}
    if direct and classes:
        raise DataError(f"The folder {folder} holds both image files ({direct[0].name}) and class subfolders "
                        f"({next(iter(classes))}/); a split folder holds one or the other.")
    return {None: direct} if direct else dict(classes)


def list_folder(root: Path) -> Listing:
    """The files of ``root`` by split and class, in reading order (the module docstring's rules)."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"The image folder {root} {what}; it must be {LAYOUT}.")
    present = [split for split in SPLITS if (root / split).is_dir()]
    if len(present) == 1:
        missing = next(s for s in SPLITS if s not in present)
        raise DataError(f"The image folder {root} has no {missing}/ subfolder; it must be {LAYOUT}.")
    if present:
        scanned = {split: _scan(root / split) for split in SPLITS}
        split_by = "folders"
    else:
        whole = _scan(root)
        scanned = {split: {} for split in SPLITS}
        for name, files in whole.items():
            for file in files:
                relative = file.relative_to(root).as_posix()
                split = "test" if zlib.crc32(relative.encode()) % TEST_MODULUS == 0 else "train"
                scanned[split].setdefault(name, []).append(file)
        split_by = "crc32"
    for split in SPLITS:
        if not any(scanned[split].values()):
            where = root / split if split_by == "folders" else root
            raise DataError(f"The folder {where} holds no image files (*.png, *.jpg, *.jpeg, *.webp) for the "
                            f"{split} split; it must be {LAYOUT}.")
    flat = [split for split in SPLITS if None in scanned[split]]
    if flat and len(flat) < len(SPLITS):
        other = next(s for s in SPLITS if s not in flat)
        raise DataError(f"The {other} images of {root} are in class subfolders but the {flat[0]} images are not; "
                        "both splits must have class subfolders, or neither.")
    classes = tuple(sorted({name for split in SPLITS for name in scanned[split] if name is not None}))
    index = {name: i for i, name in enumerate(classes)}
    files = {}
    for split in SPLITS:
        entries = [(file, index[name] if name is not None else -1)
                   for name, paths in scanned[split].items() for file in paths]
        entries.sort(key=lambda entry: (entry[0].name, entry[0].parent.name))
        files[split] = entries
    return Listing(root, files, classes, split_by)


def center_square(image: Image.Image, size: int) -> Image.Image:
    """``image`` cropped to its central square and resized to ``size x size`` with ``Image.BOX``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.BOX)


def resize_array(pixels: np.ndarray, size: int) -> np.ndarray:
    """One uint8 image ``(H, W)`` or ``(H, W, C)`` through `center_square` (for array sources)."""
    if pixels.shape[0] == pixels.shape[1] == size:
        return pixels
    squeeze = pixels.ndim == 3 and pixels.shape[2] == 1
    image = Image.fromarray(pixels[:, :, 0] if squeeze else pixels)
    out = np.asarray(center_square(image, size), dtype=np.uint8)
    return out[:, :, None] if squeeze else out


class Reader:
    """Decodes image files one by one (HWC uint8) and checks each against the first one read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.first: tuple[Path, str, tuple[int, int]] | None = None

    def __call__(self, file: Path) -> np.ndarray:
        try:
            with Image.open(file) as image:
                image.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"The image {file} could not be read as a PNG, JPEG or WebP file ({exc}).") from exc
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

    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what it returns, once it has read an image."""
        if self.first is None:
            raise RuntimeError("no image read yet")
        _, mode, (width, height) = self.first
        side = (self.size, self.size) if self.size else (height, width)
        return MODES[mode], side[0], side[1]
