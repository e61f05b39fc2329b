"""Reading an ``.npz`` of images: uint8 ``x_train`` and ``x_test`` (NHW or NHWC), optional integer
labels ``y_train`` and ``y_test``. Used by the ``npz`` dataset and by ``flowkit data prepare``.

Private to ``flowkit_plugins.datasets``. The file is read with ``allow_pickle=False``, so object
arrays are refused. Every file in ``shared/data`` has this layout.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowkit.errors import DataError
from flowkit_plugins.datasets._arrays import check_images, check_labels

IMAGE_KEYS = ("x_train", "x_test")
LABEL_KEYS = ("y_train", "y_test")
EXPECTED = "a local .npz archive with uint8 arrays x_train and x_test"


@dataclass
class NpzArrays:
    """The checked arrays of an archive: images as stored (NHW or NHWC), labels int64 or None."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None
    y_test: np.ndarray | None


def _read(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:  # an object array, refused without pickle
        raise DataError(f'Key "{key}" of {path} could not be read as a plain array ({exc}); '
                        "object arrays are refused, save images as uint8.") from exc


def read_npz(path: Path, *, labels: bool = False) -> NpzArrays:
    """The images of the archive at ``path``, checked (`check_images`), and its labels when it holds
    both ``y_train`` and ``y_test``. ``labels``: they are required, and one without the other is
    refused naming the missing key (without it, labels of one split alone are ignored)."""
    if not path.exists():
        raise DataError(f"The dataset file {path} does not exist; it must be {EXPECTED}.")
    if not path.is_file():
        raise DataError(f"The dataset path {path} is not a file; it must be {EXPECTED}.")
    if not zipfile.is_zipfile(path):
        raise DataError(f"The dataset file {path} is not a .npz (zip) archive; it must be {EXPECTED}.")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            present = sorted(archive.files)
            for key in IMAGE_KEYS:
                if key not in present:
                    shown = ", ".join(present) or "none"
                    raise DataError(f'The dataset file {path} has no key "{key}" (keys present: {shown}); it '
                                    f"must be {EXPECTED}.")
                arrays[key] = _read(archive, key, path)
            found = [key for key in LABEL_KEYS if key in present]
            if labels and len(found) < 2:
                missing = " and ".join(f'"{k}"' for k in LABEL_KEYS if k not in present)
                raise DataError(f"The dataset file {path} has no labels {missing} (keys present: "
                                f"{', '.join(present)}); labels need y_train and y_test, one integer per image.")
            if len(found) == 2:
                for key in LABEL_KEYS:
                    arrays[key] = _read(archive, key, path)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"The dataset file {path} could not be read ({exc}); it must be {EXPECTED}.") from exc
    for key in IMAGE_KEYS:
        check_images(arrays[key], where=f'Key "{key}" of {path}')
    ys = {}
    for x_key, y_key in zip(IMAGE_KEYS, LABEL_KEYS, strict=True):
        if y_key in arrays:
            ys[y_key] = check_labels(arrays[y_key], where=f'Key "{y_key}" of {path}', count=len(arrays[x_key]))
    return NpzArrays(arrays["x_train"], arrays["x_test"], ys.get("y_train"), ys.get("y_test"))
