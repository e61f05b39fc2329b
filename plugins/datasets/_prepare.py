"""``flowkit data prepare``: a source of images decoded and resized once into a store (`_store`),
chunk by chunk, resumable.

Private to ``flowkit_plugins.datasets``. Sources, each read by the one reader of its format:

- ``folder``: PNG, JPEG or WebP files (`_folder`: splits, class subfolders, order, size);
- ``npz``: an archive with uint8 ``x_train``/``x_test`` and optional ``y_train``/``y_test`` (`_npz`);
- ``cifar10``: the official python batches (`_cifar`);
- ``imagenet``: the official downsampled-ImageNet ``.npz`` batches (`_imagenet`; 1-based labels
  made 0-based).

``size = S`` center-crops and resizes every image to S x S with ``Image.BOX``, as the
``image_folder`` dataset does; array sources are resized only where they are not already S x S.
Labels are stored only with ``labels`` (``--labels``), and refused for a source that has none.

Resuming: the index records a fingerprint of the source (its files' names, sizes and
modification times) and of the options. Prepare writes every array at its full size first
(sparse until written), then per chunk: read and decode, write into the memory map, flush it to
disk, checksum it, and only then record it in the index (replaced atomically). Interrupted at any
point, the next run with the same source and options starts at the first chunk not recorded; with
another source or options it refuses, naming what differs, rather than mix two datasets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowkit.errors import DataError
from flowkit.runs.rundir import write_atomic
from flowkit_plugins.datasets._arrays import index_classes, to_nchw
from flowkit_plugins.datasets._cifar import CLASSES as CIFAR_CLASSES
from flowkit_plugins.datasets._cifar import TEST_FILE as CIFAR_TEST
from flowkit_plugins.datasets._cifar import TRAIN_FILES as CIFAR_TRAIN
from flowkit_plugins.datasets._cifar import find_folder, read_batch
from flowkit_plugins.datasets._folder import SPLITS, Reader, list_folder, resize_array
from flowkit_plugins.datasets._imagenet import CLASSES as IMAGENET_CLASSES
from flowkit_plugins.datasets._imagenet import (
    batch_files,
    is_imagenet_folder,
    read_imagenet_batch,
    read_labels,
)
from flowkit_plugins.datasets._npz import read_npz
from flowkit_plugins.datasets._store import (
    FORMAT,
    INDEX,
    VERSION,
    chunk_sha256,
    images_file,
    labels_file,
    read_index,
)

FORMATS = ("auto", "folder", "npz", "cifar10", "imagenet")
MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class Options:
    size: int = 0  #: 0 keeps the size; S: center crop and BOX resize to S x S
    labels: bool = False  #: store the labels (refused where the source has none)
    chunk_images: int = 4096  #: images per checksummed chunk
    max_value: int = 255  #: the largest value of the format (16 for scikit-learn's digits)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise DataError(f"--size {self.size} is negative; use 0 to keep the size, or the side in pixels.")
        if self.chunk_images < 1:
            raise DataError(f"--chunk {self.chunk_images} must be at least 1 image.")
        if not 1 <= self.max_value <= 255:
            raise DataError(f"--max-value {self.max_value} is out of range; allowed: 1 to 255.")


class Source:
    """What prepare reads: counts, shape, classes, and images ``start:stop`` of a split as uint8
    NCHW with their labels (int64, or None)."""

    kind = ""

    def __init__(self, path: Path, options: Options) -> None:
        self.path, self.options = path, options
        self.counts: dict[str, int] = {}
        self.shape: tuple[int, int, int] = (0, 0, 0)
        self.classes: tuple[str, ...] = ()
        self.notes: list[str] = []

    def read(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def identity(self) -> list[Any]:
        """What identifies the source's content: its files with their sizes and modification times."""
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.iterdir() if p.is_file())
        return [_stat(p, self.path) for p in files]

    def _no_labels(self, why: str) -> DataError:
        return DataError(f"--labels asks for labels, but {self.path} has none ({why}).")


def _stat(path: Path, root: Path) -> list[Any]:
    stat = path.stat()
    return [path.relative_to(root).as_posix() if path != root else path.name, stat.st_size, stat.st_mtime_ns]


class FolderSource(Source):
    kind = "folder"

    def __init__(self, path: Path, options: Options) -> None:
        super().__init__(path, options)
        self.listing = list_folder(path)
        if options.labels and not self.listing.labelled:
            raise self._no_labels("its split folders hold image files, not class subfolders")
        self.counts = {split: len(self.listing.files[split]) for split in SPLITS}
        self.reader = Reader(options.size)
        self.reader(self.listing.files["train"][0][0])  # the first image fixes mode and size for all
        self.shape = self.reader.shape()
        self.classes = self.listing.classes if options.labels else ()
        if self.listing.split_by == "crc32":
            self.notes.append("no train/ and test/ folders: a file is a test image when the CRC-32 of its path "
                              "relative to the source is 0 modulo 10")
        if self.classes:
            self.notes.append("labels index the class subfolders in sorted order (classes)")

    def read(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        entries = self.listing.files[split][start:stop]
        images = np.stack([self.reader(file) for file, _ in entries]).transpose(0, 3, 1, 2)
        labels = np.array([k for _, k in entries], dtype=np.int64) if self.classes else None
        return np.ascontiguousarray(images), labels

    def identity(self) -> list[Any]:
        return [_stat(file, self.path) for split in SPLITS for file, _ in self.listing.files[split]]


class ArraySource(Source):
    """A source held as NCHW arrays (npz, CIFAR-10) or read batch file by batch file (ImageNet)."""

    def _set(self, images: dict[str, np.ndarray], labels: dict[str, np.ndarray | None]) -> None:
        self.images, self.labels = images, labels
        self.counts = {split: len(images[split]) for split in SPLITS}
        c, h, w = images["train"].shape[1:]
        side = self.options.size
        self.shape = (int(c), side, side) if side else (int(c), int(h), int(w))

    def read(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        images = self._resize(np.asarray(self.images[split][start:stop]))
        labels = self.labels[split]
        return images, (np.asarray(labels[start:stop], dtype=np.int64) if labels is not None else None)

    def _resize(self, images: np.ndarray) -> np.ndarray:
        size = self.options.size
        if not size or images.shape[2:] == (size, size):
            return np.ascontiguousarray(images)
        hwc = images.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(np.stack([resize_array(im, size) for im in hwc]).transpose(0, 3, 1, 2))


class NpzSource(ArraySource):
    kind = "npz"

    def __init__(self, path: Path, options: Options) -> None:
        super().__init__(path, options)
        arrays = read_npz(path, labels=options.labels)
        keep = options.labels and arrays.y_train is not None and arrays.y_test is not None
        self._set({"train": to_nchw(arrays.x_train), "test": to_nchw(arrays.x_test)},
                  {"train": arrays.y_train if keep else None, "test": arrays.y_test if keep else None})
        if keep:
            self.classes = index_classes(arrays.y_train, arrays.y_test)  # type: ignore[arg-type]
            self.notes.append("classes are the label values as strings, 0 .. the largest label")


class CifarSource(ArraySource):
    kind = "cifar10"

    def __init__(self, path: Path, options: Options) -> None:
        super().__init__(path, options)
        self.path = folder = find_folder(path)
        train = [read_batch(folder / name) for name in CIFAR_TRAIN]
        test = read_batch(folder / CIFAR_TEST)
        self._set({"train": np.concatenate([b.images for b in train]), "test": test.images},
                  {"train": np.concatenate([b.labels for b in train]) if options.labels else None,
                   "test": test.labels if options.labels else None})
        self.classes = CIFAR_CLASSES if options.labels else ()

    def identity(self) -> list[Any]:
        return [_stat(self.path / name, self.path) for name in (*CIFAR_TRAIN, CIFAR_TEST)]


class ImagenetSource(ArraySource):
    """The official downsampled-ImageNet batches, one batch file in memory at a time."""

    kind = "imagenet"

    def __init__(self, path: Path, options: Options) -> None:
        super().__init__(path, options)
        train, test = batch_files(path)
        self.files = {"train": train, "test": [test]}
        self.bounds: dict[str, list[tuple[int, int, Path]]] = {}
        self.labels_by_split: dict[str, np.ndarray] = {}
        for split, files in self.files.items():
            start, bounds, labels = 0, [], []
            for file in files:
                file_labels = read_labels(file)
                bounds.append((start, start + len(file_labels), file))
                labels.append(file_labels)
                start += len(file_labels)
            self.bounds[split], self.labels_by_split[split] = bounds, np.concatenate(labels)
        self.counts = {split: len(self.labels_by_split[split]) for split in SPLITS}
        images, _ = read_imagenet_batch(train[0])
        c, h, w = images.shape[1:]
        self.native = (int(c), int(h), int(w))
        self.shape = (int(c), options.size, options.size) if options.size else (int(c), int(h), int(w))
        self.cached: tuple[Path, np.ndarray] = (train[0], images)
        self.classes = IMAGENET_CLASSES if options.labels else ()
        self.notes.append("labels are the official 1-based labels minus 1: label k is the official k + 1, and "
                          "classes[k] names it by the official index")

    def read(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        parts = []
        for first, last, file in self.bounds[split]:
            if last <= start or first >= stop:
                continue
            if self.cached[0] != file:
                self.cached = (file, read_imagenet_batch(file)[0])
            images = self.cached[1]
            if tuple(images.shape[1:]) != self.native or len(images) != last - first:
                raise DataError(f"{file} holds {len(images)} images of shape {tuple(images.shape[1:])}, but its labels "
                                f"count {last - first} and the first batch file's images are {self.native}; one store "
                                "holds one image size.")
            parts.append(images[max(start, first) - first : min(stop, last) - first])
        images = self._resize(np.concatenate(parts))
        labels = self.labels_by_split[split][start:stop] if self.classes else None
        return images, labels

    def identity(self) -> list[Any]:
        return [_stat(file, self.path) for split in SPLITS for file in self.files[split]]


def open_source(path: Path, source_format: str, options: Options) -> Source:
    """The source at ``path`` in ``source_format`` (``auto``: a ``.npz`` file is an npz, a folder
    with ``val_data.npz`` downsampled ImageNet, one with the CIFAR-10 batches CIFAR-10, any other
    folder a folder of images)."""
    if source_format not in FORMATS:
        raise DataError(f"--format {source_format} is not a source format; allowed: {', '.join(FORMATS)}.")
    if not path.exists():
        raise DataError(f"The source {path} does not exist; name a folder of images, an .npz file, the CIFAR-10 "
                        "python folder or a downsampled-ImageNet folder.")
    if source_format == "auto":
        if path.is_file():
            source_format = "npz"
        elif is_imagenet_folder(path):
            source_format = "imagenet"
        elif all((path / n).is_file() for n in (*CIFAR_TRAIN, CIFAR_TEST)) or (path / "cifar-10-batches-py").is_dir():
            source_format = "cifar10"
        else:
            source_format = "folder"
    kinds: dict[str, type[Source]] = {"folder": FolderSource, "npz": NpzSource, "cifar10": CifarSource,
                                      "imagenet": ImagenetSource}
    return kinds[source_format](path, options)


def fingerprint(source: Source) -> str:
    """SHA-256 of what the store is made from: the source's format, path and files, and the options
    that change what is written (not the chunk size, which only changes how it is checksummed)."""
    what = {"format": source.kind, "path": str(source.path), "files": source.identity(),
            "size": source.options.size, "labels": source.options.labels, "max_value": source.options.max_value}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def new_index(source: Source, print_: str) -> dict[str, Any]:
    labelled = bool(source.classes)
    return {
        "format": FORMAT, "version": VERSION, "complete": False,
        "shape": list(source.shape), "mode": MODES.get(source.shape[0], "?"), "max_value": source.options.max_value,
        "classes": list(source.classes), "source": str(source.path), "source_format": source.kind,
        "notes": source.notes, "size": source.options.size, "fingerprint": print_,
        "chunk_images": source.options.chunk_images,
        "splits": {split: {"count": source.counts[split], "images": images_file(split),
                           "labels": labels_file(split) if labelled else None, "chunks": []} for split in SPLITS},
    }


#: progress(split, images done, images in the split), after each chunk and once at the start
Progress = Callable[[str, int, int], None]


def prepare(source: Source, out: Path, progress: Progress | None = None) -> tuple[dict[str, Any], bool]:
    """Writes (or finishes) the store of ``source`` at ``out``; returns its index and whether
    anything was left to do (False: ``out`` already held this store, complete)."""
    print_ = fingerprint(source)
    index = _existing(out, source, print_)
    if index is not None and index["complete"]:
        return index, False
    if index is None:
        out.mkdir(parents=True, exist_ok=True)
        index = new_index(source, print_)
        for split in SPLITS:  # full size at once: sparse until written, so a resume finds the same files
            count = source.counts[split]
            np.lib.format.open_memmap(out / images_file(split), mode="w+", dtype=np.uint8,
                                      shape=(count, *source.shape)).flush()
            if index["splits"][split]["labels"]:
                np.lib.format.open_memmap(out / labels_file(split), mode="w+", dtype=np.int64, shape=(count,)).flush()
        _write_index(out, index)
    for split in SPLITS:
        _fill(source, out, index, split, progress)
    index["complete"] = True
    _write_index(out, index)
    return index, True


def _fill(source: Source, out: Path, index: dict[str, Any], split: str, progress: Progress | None) -> None:
    entry, chunk = index["splits"][split], int(index["chunk_images"])
    count = int(entry["count"])
    images = np.load(out / entry["images"], mmap_mode="r+")
    labels = np.load(out / entry["labels"], mmap_mode="r+") if entry["labels"] else None
    start = sum(int(c["count"]) for c in entry["chunks"])
    if progress is not None:
        progress(split, start, count)
    while start < count:
        stop = min(start + chunk, count)
        block, block_labels = source.read(split, start, stop)
        if block.shape != (stop - start, *source.shape):
            raise DataError(f"{source.path}: images {start}..{stop - 1} of the {split} split came out as {block.shape}, "
                            f"not {(stop - start, *source.shape)}.")
        top = int(block.max()) if block.size else 0
        if top > source.options.max_value:
            raise DataError(f"{source.path}: the {split} images {start}..{stop - 1} hold values up to {top}, above "
                            f"--max-value {source.options.max_value}; set it to the largest value the format allows.")
        images[start:stop] = block
        images.flush()  # msync: on disk before the chunk is recorded
        if labels is not None and block_labels is not None:
            labels[start:stop] = block_labels
            labels.flush()
        entry["chunks"].append({"start": start, "count": stop - start, "sha256": chunk_sha256(block, block_labels)})
        _write_index(out, index)
        start = stop
        if progress is not None:
            progress(split, start, count)


def _existing(out: Path, source: Source, print_: str) -> dict[str, Any] | None:
    """The index of the store being made at ``out`` (None: none yet); refuses a folder that holds
    something else, and a store of another source or options, naming what differs."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder; name a new folder for the store.")
    if not out.exists():
        return None
    if not (out / INDEX).is_file():
        # What a prepare stopped before its first index leaves: its arrays, a temporary index.
        ours = {name(split) for split in SPLITS for name in (images_file, labels_file)}
        if any(p.name not in ours and not p.name.startswith(f".{INDEX}.") for p in out.iterdir()):
            raise DataError(f"--out {out} already holds files that are not a store (it has no {INDEX}); name a new "
                            "or empty folder.")
        return None
    index = read_index(out)
    if index.get("fingerprint") == print_:
        return index
    mine = new_index(source, print_)
    differs = [key for key in ("source", "source_format", "size", "shape", "classes", "max_value")
               if index.get(key) != mine.get(key)] or ["the source's files (names, sizes or modification times)"]
    state = "a complete store" if index.get("complete") else "an unfinished store"
    raise DataError(f"--out {out} holds {state} of another source or options (it differs in: {', '.join(differs)}); "
                    "delete it or name another --out, so that two datasets are never mixed.")


def _write_index(out: Path, index: dict[str, Any]) -> None:
    write_atomic(out / INDEX, json.dumps(index, indent=1) + "\n")

