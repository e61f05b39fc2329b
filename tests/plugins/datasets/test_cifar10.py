"""The cifar10 reader: official folder layout, channel order, limits, and refusal of unsafe pickles."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

import flowkit
from flowkit_plugins.datasets.cifar10 import TEST_FILE, TRAIN_FILES, read_batch

SUBSET = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "cifar10_subset.npz"


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: protocol 2, every ``str``
    (and ``bytes``) as a BINSTRING opcode, which Python 3 reads back as bytes."""

    def save_binstring(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_binstring
    dispatch[str] = save_binstring


def _python2_dump(obj, handle) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy 1 (which wrote the official files) named its package numpy.core, not numpy._core
    handle.write(buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _write_batch(path: Path, images_nchw: np.ndarray, label: bytes = b"batch") -> None:
    """One batch in the official format: a dict of bytes keys, data rows R, G, B planes."""
    n = len(images_nchw)
    batch = {
        b"batch_label": label,
        b"labels": [i % 10 for i in range(n)],
        b"data": images_nchw.reshape(n, 3 * 32 * 32).astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    with path.open("wb") as handle:
        _python2_dump(batch, handle)


def _official_folder(root: Path, per_batch: int = 3, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = rng.integers(0, 256, size=(5 * per_batch, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
    for i, name in enumerate(TRAIN_FILES):
        _write_batch(folder / name, train[i * per_batch : (i + 1) * per_batch])
    _write_batch(folder / TEST_FILE, test)
    (folder / "batches.meta").write_bytes(b"not read")
    return folder, train, test


def _load(path: Path, **params):
    return flowkit.build("dataset", "cifar10", path=str(path), **params)


def test_reads_the_official_layout_as_nchw(tmp_path):
    folder, train, test = _official_folder(tmp_path)
    data = _load(folder)
    assert data.name == "cifar10" and data.shape == (3, 32, 32)
    np.testing.assert_array_equal(data.train, train)
    np.testing.assert_array_equal(data.test, test)
    assert data.train.dtype == np.uint8 and data.train.flags.c_contiguous


def test_a_data_row_is_the_red_then_green_then_blue_plane_row_major(tmp_path):
    folder, _, _ = _official_folder(tmp_path)
    row = np.arange(3072) % 251
    _write_batch(folder / TEST_FILE, row.reshape(1, 3, 32, 32))
    image = _load(folder).test[0]
    channel, i, j = 2, 5, 7
    assert image[channel, i, j] == row[channel * 1024 + i * 32 + j]


def test_the_parent_folder_is_accepted(tmp_path):
    _official_folder(tmp_path)
    assert _load(tmp_path).train.shape == (15, 3, 32, 32)


def test_limits_cut_the_splits_and_read_only_the_batches_needed(tmp_path):
    folder, train, test = _official_folder(tmp_path)
    (folder / "data_batch_3").write_bytes(b"corrupt: must not be read")
    data = _load(folder, limit_train=5, limit_test=2)
    np.testing.assert_array_equal(data.train, train[:5])
    np.testing.assert_array_equal(data.test, test[:2])


def test_real_cifar10_images_round_trip_through_the_official_format(tmp_path):
    """The shared subset (exact CIFAR-10 pixels, NHWC) written as official batches reads back exactly."""
    if not SUBSET.is_file():
        pytest.skip(f"{SUBSET} is not available")
    with np.load(SUBSET, allow_pickle=False) as archive:
        train, test = archive["x_train"][:500], archive["x_test"][:100]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    nchw = train.transpose(0, 3, 1, 2)
    for i, name in enumerate(TRAIN_FILES):
        _write_batch(folder / name, nchw[i * 100 : (i + 1) * 100])
    _write_batch(folder / TEST_FILE, test.transpose(0, 3, 1, 2))
    data = _load(folder)
    np.testing.assert_array_equal(data.train.transpose(0, 2, 3, 1), train)
    # the well-known first pixels of CIFAR-10 training image 0 and test image 0
    assert data.train[0, :, 0, 0].tolist() == [59, 62, 63]
    assert data.test[0, :, 0, 0].tolist() == [158, 112, 49]


def test_a_wrong_folder_names_the_missing_files(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(flowkit.DataError, match="data_batch_2.*test_batch.*are missing"):
        _load(tmp_path)


def test_a_missing_folder_or_a_file_is_refused(tmp_path):
    with pytest.raises(flowkit.DataError, match="does not exist"):
        _load(tmp_path / "nowhere")
    file = tmp_path / "cifar.tar.gz"
    file.write_bytes(b"x")
    with pytest.raises(flowkit.DataError, match="not a folder"):
        _load(file)
    with pytest.raises(flowkit.DataError, match="data.path is empty"):
        flowkit.build("dataset", "cifar10")


class _RunsCommand:
    """Unpickling this would run ``os.system``; the reader must refuse it first."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_a_pickle_that_would_import_anything_else_is_refused_without_running(tmp_path, payload):
    folder, _, _ = _official_folder(tmp_path)
    marker = tmp_path / "pwned"
    evil = {
        "system": _RunsCommand(f"touch {marker}"),
        "eval": _Evaluates(),
        "nested": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_RunsCommand(f"touch {marker}")]},
    }[payload]
    with (folder / "data_batch_1").open("wb") as handle:
        _python2_dump(evil, handle)
    with pytest.raises(flowkit.DataError, match=r"asks for ((posix|nt|os)\.system|(__builtin__|builtins)\.eval)"):
        _load(folder)
    assert not marker.exists()


def test_a_pickle_of_the_wrong_content_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    with path.open("wb") as handle:
        _python2_dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(flowkit.DataError, match=r"not uint8 of shape \(N, 3072\)"):
        read_batch(path)
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(flowkit.DataError, match="could not be read"):
        read_batch(path)


def test_newer_numpy_pickle_protocols_are_read(tmp_path):
    path = tmp_path / "data_batch_1"
    images = np.random.default_rng(1).integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
    with path.open("wb") as handle:
        pickle.dump({"data": images.reshape(2, 3072), "labels": [0, 1]}, handle, protocol=5)
    np.testing.assert_array_equal(read_batch(path).images, images)
