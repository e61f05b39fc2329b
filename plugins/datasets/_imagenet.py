"""Reading the official downsampled ImageNet (Chrabaszcz, Loshchilov & Hutter 2017, "A Downsampled
Variant of ImageNet as an Alternative to the CIFAR datasets"; the 32x32 and 64x64 sets of Glow,
Flow++ and Wavelet Flow) in its ``.npz`` form. Used by ``flowkit data prepare``.

Private to ``flowkit_plugins.datasets``. The folder holds ``train_data_batch_1.npz`` ..
``train_data_batch_10.npz`` (the 1,281,167 training images, in that order) and ``val_data.npz``
(the 50,000 validation images, flowkit's test split), each with

- ``data``: uint8 ``(N, 3 * S * S)``, one image per row, channel-planar: the S*S red values, then
  green, then blue, each plane row-major (S = 32: 3072 columns; S = 64: 12288), so a row
  reshaped to ``(3, S, S)`` is the image in NCHW;
- ``labels``: the class of each image, **1-based** (1 .. 1000), as a list or an integer array;
- ``mean`` (training batches only): the mean image, not used.

Labels are converted to 0-based (label k here is the official k + 1) and the classes are named
by the official 1-based index, so ``classes[k] == str(k + 1)``: the official ``map_clsloc.txt``
maps those to WordNet ids. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np

from flowkit.errors import DataError

TRAIN_PATTERN = re.compile(r"^train_data_batch_(\d+)\.npz$")
TEST_FILE = "val_data.npz"
CLASSES = tuple(str(k) for k in range(1, 1001))  # classes[k] is the official 1-based label k + 1


def is_imagenet_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / TEST_FILE).is_file() and any(
        TRAIN_PATTERN.match(p.name) for p in folder.iterdir())


def batch_files(folder: Path) -> tuple[list[Path], Path]:
    """The training batches in their numeric order, and the validation file."""
    train = sorted((p for p in folder.iterdir() if TRAIN_PATTERN.match(p.name)),
                   key=lambda p: int(TRAIN_PATTERN.match(p.name).group(1)))  # type: ignore[union-attr]
    if not train or not (folder / TEST_FILE).is_file():
        raise DataError(f"{folder} is not a downsampled-ImageNet folder: it needs train_data_batch_<i>.npz files "
                        f"and {TEST_FILE} (unpack Imagenet32_train_npz.zip and Imagenet32_val_npz.zip into it).")
    return train, folder / TEST_FILE


def read_labels(path: Path) -> np.ndarray:
    """The 0-based labels of one batch file (reads only its ``labels``)."""
    with _open(path) as archive:
        return _labels(archive, path)


def read_imagenet_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's images as uint8 ``(N, 3, S, S)`` and labels as 0-based int64 ``(N,)``."""
    with _open(path) as archive:
        if "data" not in archive.files:
            raise DataError(f'{path} is not a downsampled-ImageNet batch: it has no key "data" '
                            f"(keys: {', '.join(archive.files)}).")
        data = archive["data"]
        labels = _labels(archive, path)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % 3:
        raise DataError(f"{path} is not a downsampled-ImageNet batch: its data is {data.dtype} {data.shape}, not "
                        "uint8 (N, 3 * S * S).")
    side = math.isqrt(data.shape[1] // 3)
    if 3 * side * side != data.shape[1]:
        raise DataError(f"{path}: {data.shape[1]} values per row are not 3 square planes (3 * S * S).")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images.")
    return data.reshape(-1, 3, side, side), labels


def _open(path: Path) -> np.lib.npyio.NpzFile:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a .npz (zip) archive; downsampled-ImageNet batches are .npz files.")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} could not be read ({exc}).") from exc


def _labels(archive: np.lib.npyio.NpzFile, path: Path) -> np.ndarray:
    if "labels" not in archive.files:
        raise DataError(f'{path} is not a downsampled-ImageNet batch: it has no key "labels".')
    try:
        labels = np.asarray(archive["labels"]).astype(np.int64, casting="same_kind").reshape(-1)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: its labels are not integers ({exc}).") from exc
    if len(labels) and (labels.min() < 1 or labels.max() > len(CLASSES)):
        raise DataError(f"{path}: labels range over {labels.min()}..{labels.max()}, but downsampled-ImageNet labels "
                        f"are 1-based, 1..{len(CLASSES)}.")
    return labels - 1
