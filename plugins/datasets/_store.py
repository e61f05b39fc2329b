"""The prepared store on disk: its index, its arrays, their checksums. Read by the ``store``
dataset and ``flowkit data verify``, written by ``flowkit data prepare`` (`_prepare`).

Private to ``flowkit_plugins.datasets``. Layout of a store folder::

    index.json          the index (below), replaced atomically after every chunk written
    train_images.npy    uint8 (N_train, C, H, W), a plain .npy: np.load(..., mmap_mode="r")
    train_labels.npy    int64 (N_train,), only where the store has labels
    test_images.npy     uint8 (N_test, C, H, W)
    test_labels.npy     int64 (N_test,)

``index.json``::

    {"format": "flowkit-store", "version": 1, "complete": true,
     "shape": [C, H, W], "mode": "L" | "RGB", "max_value": 255,
     "classes": ["0", ..., "9"],          # [] without labels; label k names classes[k]
     "source": "/abs/path", "source_format": "folder" | "npz" | "cifar10" | "imagenet",
     "notes": ["labels are the official 1-based labels minus 1", ...],
     "size": 0, "fingerprint": "<sha256 of the source listing and the options>",
     "chunk_images": 4096,
     "splits": {"train": {"count": N, "images": "train_images.npy", "labels": "train_labels.npy" | null,
                          "chunks": [{"start": 0, "count": 4096, "sha256": "..."}, ...]},
                "test": {...}}}

A chunk is ``chunk_images`` consecutive images of a split (the last one shorter); its checksum is
the SHA-256 of its image bytes (C-order) followed by its labels' bytes (little-endian int64).
The arrays are NCHW because that is the dataset contract and the order a batch is read in: one
image is one contiguous run of C*H*W bytes, so a random batch reads B runs. ``complete`` is
false while ``flowkit data prepare`` runs: a chunk is recorded only once written, flushed to disk
and checksummed, so an interrupted prepare resumes at the first chunk not recorded.

Opening a store reads the index and the ``.npy`` headers only (sizes and shapes are checked, no
pixel is read), so it costs the same for 1,000 images as for 1.28 million; `verify` reads every
chunk and names each damaged one with both checksums (``flowkit data verify DIR``, or the
dataset's ``verify = true``).
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

FORMAT, VERSION = "flowkit-store", 1
INDEX = "index.json"
SPLITS = ("train", "test")


def images_file(split: str) -> str:
    return f"{split}_images.npy"


def labels_file(split: str) -> str:
    return f"{split}_labels.npy"


def chunk_sha256(images: np.ndarray, labels: np.ndarray | None) -> str:
    """SHA-256 of a chunk: its image bytes, then its labels as little-endian int64."""
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype="<i8").data)
    return digest.hexdigest()


def read_index(folder: Path) -> dict[str, Any]:
    """``folder/index.json`` checked for its format and version (not for completeness)."""
    path = folder / INDEX
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"The store {folder} {what}; make one with `flowkit data prepare SOURCE --out {folder}`.")
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared store: it has no {INDEX}; make one with "
                        f"`flowkit data prepare SOURCE --out {folder}`.")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} could not be read as a store index ({exc}).") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f'{path} is not a flowkit store index (its "format" is not "{FORMAT}").')
    if index.get("version") != VERSION:
        raise DataError(f"{path} is a store of version {index.get('version')}; this flowkit reads version {VERSION}.")
    problem = _structure_problem(index)
    if problem:
        raise DataError(f"{path} is a damaged store index: {problem}; prepare the store again.")
    return index


def _structure_problem(index: dict[str, Any]) -> str:
    """What is missing or mistyped in an index, or ""."""
    if not (isinstance(index.get("shape"), list) and len(index["shape"]) == 3):
        return 'its "shape" is not [C, H, W]'
    if not isinstance(index.get("classes"), list) or not isinstance(index.get("splits"), dict):
        return 'it lacks "classes" or "splits"'
    for split in SPLITS:
        entry = index["splits"].get(split)
        if not isinstance(entry, dict) or not isinstance(entry.get("count"), int) \
                or not isinstance(entry.get("images"), str) or not isinstance(entry.get("chunks"), list):
            return f'its "{split}" split lacks "count", "images" or "chunks"'
        for chunk in entry["chunks"]:
            if not isinstance(chunk, dict) or not all(k in chunk for k in ("start", "count", "sha256")):
                return f'a chunk of its "{split}" split lacks "start", "count" or "sha256"'
    return ""


@dataclass(frozen=True)
class Store:
    """An opened store: the index, and each split's images and labels as read-only memory maps."""

    folder: Path
    index: dict[str, Any]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray | None]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.index["classes"])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.index["shape"]
        return int(c), int(h), int(w)


def open_store(folder: Path) -> Store:
    """The store at ``folder``, memory-mapped; refuses an unfinished one and arrays that do not
    match the index (wrong shape, dtype or a file cut short), naming the file. Reads no pixel."""
    index = read_index(folder)
    if not index.get("complete"):
        raise DataError(f"The store {folder} is unfinished: its prepare was interrupted. Run the same `flowkit data "
                        f"prepare {index.get('source', 'SOURCE')} --out {folder}` again to finish it.")
    shape = tuple(index["shape"])
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray | None] = {}
    for split in SPLITS:
        entry = index["splits"][split]
        count = int(entry["count"])
        images[split] = _map(folder / entry["images"], np.uint8, (count, *shape))
        labels[split] = _map(folder / entry["labels"], np.int64, (count,)) if entry.get("labels") else None
        covered = sum(int(c["count"]) for c in entry["chunks"])
        if covered != count:
            raise DataError(f"{folder / INDEX} records checksums for {covered} of the {count} {split} images; "
                            "the store is damaged: prepare it again.")
    return Store(folder, index, images, labels)


def _map(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """``path`` as a read-only memory map, checked against the index's dtype and shape."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"The store file {path} is missing; the store is damaged: prepare it again.") from None
    except (OSError, ValueError) as exc:  # a header cut or garbled, or a file shorter than its header says
        raise DataError(f"The store file {path} could not be memory-mapped ({exc}); the store is damaged: "
                        "prepare it again.") from exc
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise DataError(f"The store file {path} holds {array.dtype} {array.shape}, but its index says "
                        f"{np.dtype(dtype)} {shape}; the store is damaged: prepare it again.")
    return array


def verify(store: Store, progress: Callable[[int], None] | None = None) -> list[str]:
    """Every chunk's checksum recomputed from the files; one sentence per damaged chunk (empty when
    all match). ``progress(images)`` is called after each chunk. Reads the whole store once."""
    damaged = []
    for split in SPLITS:
        entry = store.index["splits"][split]
        for number, chunk in enumerate(entry["chunks"]):
            start, count = int(chunk["start"]), int(chunk["count"])
            stop = start + count
            labels = store.labels[split]
            found = chunk_sha256(store.images[split][start:stop], labels[start:stop] if labels is not None else None)
            if found != chunk["sha256"]:
                files = entry["images"] + (f" or {entry['labels']}" if entry.get("labels") else "")
                damaged.append(f"{split} chunk {number} (images {start}..{stop - 1}) in {files} has sha256 {found}, "
                               f"but the index records {chunk['sha256']}")
            if progress is not None:
                progress(count)
    return damaged


def check(store: Store, progress: Callable[[int], None] | None = None) -> None:
    """`verify`, raising `DataError` that names every damaged chunk with its checksums."""
    damaged = verify(store, progress)
    if damaged:
        raise DataError(f"The store {store.folder} is damaged: " + "; ".join(damaged)
                        + ". Prepare it again from its source (the index names it).")
