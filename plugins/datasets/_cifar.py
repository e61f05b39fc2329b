"""Reading the official CIFAR-10 python batches without running pickled code; used by the
``cifar10`` dataset and by ``flowkit data prepare``.

Private to ``flowkit_plugins.datasets``. The official python version of CIFAR-10 (Krizhevsky
2009) is a folder of six pickles, ``data_batch_1`` .. ``data_batch_5`` (50000 training images)
and ``test_batch`` (10000), each a dict with ``data`` (uint8, ``(10000, 3072)``: 1024 red, then
1024 green, then 1024 blue values of a 32x32 image, row-major), ``labels`` (a list of ints 0..9,
the classes of `CLASSES`), ``batch_label`` and ``filenames``. Pickles can run arbitrary code when
loaded, so they are read with a restricted unpickler whose ``find_class`` admits only what a
numpy array needs (``numpy.ndarray``, ``numpy.dtype`` and numpy's array reconstructors) and
refuses anything else with `DataError`, before it is imported or called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flowkit.errors import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
IMAGE_SHAPE = (3, 32, 32)
VALUES_PER_IMAGE = 3 * 32 * 32
#: The class names of the labels 0..9, in the official order (``batches.meta``'s label_names).
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CifarBatch(NamedTuple):
    images: np.ndarray  #: uint8 (N, 3, 32, 32)
    labels: np.ndarray  #: int64 (N,), 0..9


def _array_reconstructors() -> dict[tuple[str, str], Any]:
    """The only globals a pickled numpy array may name, resolved without importing by name.

    Pickles written by numpy 1 name ``numpy.core.multiarray``; numpy 2 renamed the package
    ``numpy._core``. Both spellings map to the functions of the installed numpy, looked up
    here, so ``find_class`` never imports a module named in the file.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # used by numpy's pickle protocol 5
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def __init__(self, file: Any, source: Path) -> None:
        # encoding="bytes": the official files are Python 2 pickles whose str values are bytes.
        super().__init__(file, encoding="bytes")
        self.source = source
        self.allowed = _array_reconstructors()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source} is not a CIFAR-10 batch: its pickle asks for {module}.{name}, and only "
                "numpy arrays, lists and strings are allowed (refused without importing or running it)."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source} is not a CIFAR-10 batch: it holds a persistent reference, which is refused.")


def read_batch(path: Path) -> CifarBatch:
    """The images of one official batch file as uint8 ``(N, 3, 32, 32)``, and its labels."""
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, path).load()
    except DataError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path} could not be read as a CIFAR-10 batch ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict.")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray):
        raise DataError(f'{path} is not a CIFAR-10 batch: it has no array under the key "data".')
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != VALUES_PER_IMAGE:
        raise DataError(
            f"{path} is not a CIFAR-10 batch: its data is {data.dtype} of shape {data.shape}, not uint8 of "
            f"shape (N, {VALUES_PER_IMAGE})."
        )
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        raise DataError(f"{path} is not a CIFAR-10 batch: its labels do not match its {data.shape[0]} images.")
    label_array = np.asarray(labels, dtype=np.int64)
    if len(label_array) and (label_array.min() < 0 or label_array.max() >= len(CLASSES)):
        raise DataError(f"{path} is not a CIFAR-10 batch: its labels range over {label_array.min()}.."
                        f"{label_array.max()}, not 0..{len(CLASSES) - 1}.")
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major: already NCHW.
    return CifarBatch(np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE)), label_array)


def find_folder(path: Path) -> Path:
    """``path`` itself when it holds the six batch files, or its ``cifar-10-batches-py`` subfolder."""
    expected = ", ".join((*TRAIN_FILES, TEST_FILE))
    if not path.exists():
        raise DataError(
            f"The CIFAR-10 folder {path} does not exist; data.path must name the official "
            f"{FOLDER} folder (with {expected})."
        )
    if not path.is_dir():
        raise DataError(
            f"The CIFAR-10 path {path} is not a folder; data.path must name the official {FOLDER} folder "
            f"(with {expected}), not a file."
        )
    for candidate in (path, path / FOLDER):
        if all((candidate / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (path / name).is_file()]
    raise DataError(
        f"{path} is not the official {FOLDER} folder: {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} missing. Download and unpack cifar-10-python.tar.gz "
        f"and set data.path to the {FOLDER} folder it contains."
    )
