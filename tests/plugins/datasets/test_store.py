"""The prepared store: flowkit data prepare from each source format, resume, checksums, refusals,
and the store dataset that maps it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import flowkit
from flowkit.cli import _add_commands, cli
from flowkit.errors import DataError
from flowkit_plugins.datasets import _prepare
from flowkit_plugins.datasets._prepare import Options, open_source, prepare

_add_commands()


def run_cli(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def said(result) -> str:  # noqa: ANN001
    return " ".join(result.output.split())


def _prepare_dir(source: Path, out: Path, **options: object) -> dict:
    index, _ = prepare(open_source(source, "auto", Options(**options)), out)
    return index


def _load(out: Path, **params: object) -> flowkit.ImageDataset:
    return flowkit.build("dataset", "store", path=str(out), **params)


def _digits(n: int, seed: int, shape: tuple[int, ...] = (12, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _image_folder(root: Path, train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray,
                  jpeg_every: int = 3) -> None:
    """Class subfolders, files named by their index (so the folder reads back in array order); every
    ``jpeg_every``-th file a JPEG."""
    for split, images, labels in (("train", train, y_train), ("test", test, y_test)):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            suffix = ".jpg" if i % jpeg_every == 1 else ".png"
            Image.fromarray(image).save(folder / f"{i:05d}{suffix}", quality=90)


def _decoded(root: Path, split: str, n: int) -> np.ndarray:
    """What Pillow decodes from each written file, in index order (JPEG is lossy)."""
    files = sorted((p for p in (root / split).rglob("*") if p.is_file()), key=lambda p: p.name)
    assert len(files) == n
    return np.stack([np.asarray(Image.open(f)) for f in files])


def test_a_store_from_png_and_jpeg_files_equals_a_store_from_an_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, test = _digits(11, 1), _digits(5, 2)
    y_train, y_test = rng.integers(0, 3, 11), rng.integers(0, 3, 5)
    y_train[:3] = [0, 1, 2]  # every class present in train
    _image_folder(tmp_path / "folder", train, y_train, test, y_test)
    # The npz holds what the files decode to: the JPEG files are lossy, the PNG files exact.
    x_train, x_test = _decoded(tmp_path / "folder", "train", 11), _decoded(tmp_path / "folder", "test", 5)
    assert (x_train != train).any() and (x_train[::3] == train[::3]).all()
    np.savez(tmp_path / "arrays.npz", x_train=x_train, x_test=x_test, y_train=y_train.astype(np.uint8),
             y_test=y_test.astype(np.uint8))

    from_folder = _prepare_dir(tmp_path / "folder", tmp_path / "s1", labels=True, chunk_images=4)
    from_npz = _prepare_dir(tmp_path / "arrays.npz", tmp_path / "s2", labels=True, chunk_images=4)
    assert from_folder["source_format"] == "folder" and from_npz["source_format"] == "npz"
    a, b = _load(tmp_path / "s1"), _load(tmp_path / "s2")
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
        np.testing.assert_array_equal(getattr(a, f"{split}_labels"), getattr(b, f"{split}_labels"))
    np.testing.assert_array_equal(a.train[:, 0], x_train)
    np.testing.assert_array_equal(a.train_labels, y_train)
    assert a.classes == b.classes == ("0", "1", "2") and a.num_classes == 3
    assert isinstance(a.train, np.memmap) and a.train.shape == (11, 1, 12, 12) and a.train.dtype == np.uint8
    # The same chunks, the same checksums: the stores are byte-identical.
    assert [c["sha256"] for c in from_folder["splits"]["train"]["chunks"]] == \
        [c["sha256"] for c in from_npz["splits"]["train"]["chunks"]]
    # And the image_folder dataset reads the folder the same way.
    folder = flowkit.build("dataset", "image_folder", path=str(tmp_path / "folder"))
    np.testing.assert_array_equal(folder.train, a.train)
    np.testing.assert_array_equal(folder.test_labels, a.test_labels)


def test_webp_and_rgb_files_and_a_size_crop_as_image_folder_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / "src" / split).mkdir(parents=True)
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
            image.save(tmp_path / "src" / split / f"{i}.webp", lossless=True)
    _prepare_dir(tmp_path / "src", tmp_path / "out", size=8)
    store = _load(tmp_path / "out")
    expected = flowkit.build("dataset", "image_folder", path=str(tmp_path / "src"), size=8)
    assert store.shape == (3, 8, 8) and not store.has_labels
    np.testing.assert_array_equal(store.train, expected.train)


def test_a_folder_without_split_folders_is_split_by_the_crc32_of_each_path(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    images = _digits(40, 4, (4, 4))
    for i, image in enumerate(images):
        Image.fromarray(image).save(src / f"{i:03d}.png")
    index = _prepare_dir(src, tmp_path / "out")
    counts = {s: index["splits"][s]["count"] for s in ("train", "test")}
    import zlib

    expected_test = [i for i in range(40) if zlib.crc32(f"{i:03d}.png".encode()) % 10 == 0]
    assert counts == {"train": 40 - len(expected_test), "test": len(expected_test)} and expected_test
    np.testing.assert_array_equal(_load(tmp_path / "out").test[:, 0], images[expected_test])
    assert any("CRC-32" in note for note in index["notes"])


def test_an_interrupted_prepare_resumes_at_the_first_chunk_not_recorded(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = _digits(10, 5), _digits(3, 6)
    np.savez(tmp_path / "a.npz", x_train=train, x_test=test, y_train=np.arange(10) % 4, y_test=np.arange(3))
    reads: list[tuple[str, int]] = []
    original = _prepare.ArraySource.read

    def interrupted(self, split, start, stop):  # noqa: ANN001, ANN202
        reads.append((split, start))
        if len(reads) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, while the third chunk is being read
        return original(self, split, start, stop)

    monkeypatch.setattr(_prepare.ArraySource, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare_dir(tmp_path / "a.npz", tmp_path / "out", labels=True, chunk_images=3)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert not index["complete"] and [c["start"] for c in index["splits"]["train"]["chunks"]] == [0, 3]
    with pytest.raises(DataError, match="unfinished: its prepare was interrupted. Run the same"):
        _load(tmp_path / "out")

    reads.clear()
    monkeypatch.setattr(_prepare.ArraySource, "read", lambda self, split, start, stop: (
        reads.append((split, start)), original(self, split, start, stop))[1])
    _prepare_dir(tmp_path / "a.npz", tmp_path / "out", labels=True, chunk_images=3)
    assert reads == [("train", 6), ("train", 9), ("test", 0)], "only the chunks not recorded are read again"
    _prepare_dir(tmp_path / "a.npz", tmp_path / "fresh", labels=True, chunk_images=3)
    resumed, fresh = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("out", "fresh"))
    assert resumed["splits"] == {s: {**v} for s, v in fresh["splits"].items()}
    np.testing.assert_array_equal(_load(tmp_path / "out").train[:, 0], train)

    # Done: a third run has nothing to do; the CLI says so.
    result = run_cli("data", "prepare", str(tmp_path / "a.npz"), "--out", str(tmp_path / "out"), "--labels",
                     "--chunk", "3")
    assert result.exit_code == 0 and "nothing to do" in said(result)


def test_a_damaged_chunk_is_named_with_its_checksum(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x_train=_digits(8, 7), x_test=_digits(2, 8))
    index = _prepare_dir(tmp_path / "a.npz", tmp_path / "out", chunk_images=3)
    assert run_cli("data", "verify", str(tmp_path / "out")).exit_code == 0
    path = tmp_path / "out" / "train_images.npy"
    header = len(path.read_bytes()) - 8 * 144
    with path.open("r+b") as handle:  # one pixel of image 4 (chunk 1: images 3..5)
        handle.seek(header + 4 * 144 + 7)
        byte = handle.read(1)
        handle.seek(header + 4 * 144 + 7)
        handle.write(bytes([byte[0] ^ 0xFF]))
    recorded = index["splits"]["train"]["chunks"][1]["sha256"]
    result = run_cli("data", "verify", str(tmp_path / "out"))
    message = said(result)
    assert result.exit_code == 2
    assert "train chunk 1 (images 3..5) in train_images.npy has sha256" in message and recorded in message
    assert "chunk 0" not in message and "chunk 2" not in message
    # Opening does not read the pixels; verify = true does, and names the chunk the same way.
    assert _load(tmp_path / "out").train.shape == (8, 1, 12, 12)
    with pytest.raises(DataError, match=f"train chunk 1 .* the index records {recorded}"):
        _load(tmp_path / "out", verify=True)


def test_a_store_of_another_source_or_size_is_never_mixed_in(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x_train=_digits(4, 9), x_test=_digits(2, 10))
    np.savez(tmp_path / "b.npz", x_train=_digits(4, 11), x_test=_digits(2, 12))
    _prepare_dir(tmp_path / "a.npz", tmp_path / "out")
    with pytest.raises(DataError, match="holds a complete store of another source or options .*: source"):
        _prepare_dir(tmp_path / "b.npz", tmp_path / "out")
    with pytest.raises(DataError, match="differs in: size, shape"):
        _prepare_dir(tmp_path / "a.npz", tmp_path / "out", size=6)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="already holds files that are not a store"):
        _prepare_dir(tmp_path / "a.npz", tmp_path / "other")


def test_mixed_modes_or_sizes_are_refused_naming_the_file(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "src" / split).mkdir(parents=True)
        Image.fromarray(_digits(1, 13, (6, 6))[0]).save(tmp_path / "src" / split / "0.png")
    Image.fromarray(_digits(1, 14, (6, 6, 3))[0]).save(tmp_path / "src" / "train" / "1.jpg")
    with pytest.raises(DataError, match=r"1\.jpg has mode RGB but .*0\.png has mode L"):
        _prepare_dir(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "train" / "1.jpg").unlink()
    Image.fromarray(_digits(1, 15, (7, 6))[0]).save(tmp_path / "src" / "test" / "1.png")
    result = run_cli("data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out2"))
    assert result.exit_code == 2 and f"{tmp_path / 'src' / 'test' / '1.png'} is 6x7 but" in said(result)


def test_labels_are_refused_where_the_source_has_none(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x_train=_digits(4, 16), x_test=_digits(2, 17))
    result = run_cli("data", "prepare", str(tmp_path / "a.npz"), "--out", str(tmp_path / "out"), "--labels")
    assert result.exit_code == 2 and 'has no labels "y_train" and "y_test"' in said(result)
    assert not (tmp_path / "out").exists(), "nothing is written for a refused source"


def _official_imagenet(root: Path, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(18)
    root.mkdir()
    train = rng.integers(0, 256, (7, 3 * side * side), dtype=np.uint8)
    y_train = rng.integers(1, 1001, 7)
    test = rng.integers(0, 256, (3, 3 * side * side), dtype=np.uint8)
    y_test = np.array([1, 1000, 500])
    # As the official files: two training batches (numbered, not sorted as text), labels as lists.
    np.savez(root / "train_data_batch_1.npz", data=train[:4], labels=list(y_train[:4]), mean=train.mean(0))
    np.savez(root / "train_data_batch_10.npz", data=train[4:], labels=list(y_train[4:]), mean=train.mean(0))
    np.savez(root / "val_data.npz", data=test, labels=list(y_test))
    return train, y_train, test, y_test


def test_downsampled_imagenet_batches_are_channel_planar_with_one_based_labels(tmp_path: Path) -> None:
    train, y_train, test, y_test = _official_imagenet(tmp_path / "imagenet8", 8)
    index = _prepare_dir(tmp_path / "imagenet8", tmp_path / "out", labels=True, chunk_images=5)
    assert index["source_format"] == "imagenet" and any("1-based" in n for n in index["notes"])
    store = _load(tmp_path / "out")
    np.testing.assert_array_equal(store.train, train.reshape(-1, 3, 8, 8))
    np.testing.assert_array_equal(store.test, test.reshape(-1, 3, 8, 8))
    np.testing.assert_array_equal(store.train_labels, y_train - 1)
    np.testing.assert_array_equal(store.test_labels, [0, 999, 499])
    assert store.num_classes == 1000 and store.classes[0] == "1" and store.classes[999] == "1000"


def test_cifar10_python_batches_keep_their_labels_and_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(19)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = {}
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        data[name] = (rng.integers(0, 256, (2, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, 2)])
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": data[name][0], "labels": data[name][1]}, handle)
    _prepare_dir(tmp_path, tmp_path / "out", labels=True)
    store = _load(tmp_path / "out", limit_train=3)
    np.testing.assert_array_equal(store.train, data["data_batch_1"][0].reshape(2, 3, 32, 32).tolist()
                                  + data["data_batch_2"][0][:1].reshape(1, 3, 32, 32).tolist())
    assert store.train_labels.tolist() == data["data_batch_1"][1] + data["data_batch_2"][1][:1]
    assert store.classes[0] == "airplane" and store.classes[9] == "truck"


def test_opening_a_store_reads_only_the_index_and_headers(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x_train=_digits(6, 20), x_test=_digits(2, 21))
    _prepare_dir(tmp_path / "a.npz", tmp_path / "out")
    with (tmp_path / "out" / "test_images.npy").open("r+b") as handle:
        handle.truncate(100)  # shorter than its header says
    with pytest.raises(DataError, match="test_images.npy could not be memory-mapped .* damaged: prepare it again"):
        _load(tmp_path / "out")
    (tmp_path / "out" / "index.json").write_text("{}")
    with pytest.raises(DataError, match="is not a flowkit store index"):
        _load(tmp_path / "out")
    with pytest.raises(DataError, match="has no index.json; make one with `flowkit data prepare"):
        _load(tmp_path)
