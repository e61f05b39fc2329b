"""The training input path: a dataset's images read per batch, never whole, and reduced to n_bits.

A dataset (`flowkit.contracts.dataset.ImageDataset`) hands over uint8 ``(N, C, H, W)`` numpy
arrays: held in memory (the embedded MNIST, an npz) or memory-mapped from disk (a prepared
``store``). `Split` wraps one split and its labels, and is what the session, the trainer, the
evaluation loop and a trained run read. It never copies, widens or scans the whole array:

- ``split[index]`` reads only the images ``index`` names (a slice, an int tensor or array) and
  returns them as a C-contiguous uint8 tensor ``(B, C, H, W)`` of data levels ``0 .. 2^n_bits - 1``;
  the reduction to n_bits is a 256-entry lookup table applied to the batch (the values of
  `flowkit.runs.bpd.reduce_bits`, which once turned the whole dataset into int64 first);
- ``split.labels_at(index)`` the batch's labels as a LongTensor ``(B,)``, or None;
- ``split.first(n)`` the first n images as another `Split` (a view: nothing is read).

Memory: with a memory-mapped store, the pages a batch touches are file-backed (they count in
RSS as ``RssFile`` and the kernel drops them under pressure); anonymous memory (``RssAnon``)
holds one batch and the per-epoch permutation (`batches`: 4 bytes per image, 5 MB for
ImageNet's 1.28 million), not the dataset.

`batches` is the data order: a fresh permutation per epoch from a generator seeded by
(seed, epoch), so the batch of a step is a function of (seed, step) and resume stays exact.
`Prefetch` reads the next batches in a background thread (reads and copies only: pinned memory
and a non-blocking host-to-device copy where a CUDA device is used); every random draw stays on
the training thread, so batches are the same with and without it. `drop_labels` is
train.label_dropout, drawn from a generator of its own seeded by (seed, step).
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor


def level_table(n_bits: int, max_value: int) -> np.ndarray | None:
    """The uint8 lookup table value -> data level of `flowkit.runs.bpd.reduce_bits`
    (``floor(v * 2^n_bits / (max_value + 1))``, wrapped to uint8 as its ``.to(torch.uint8)`` does);
    None when nothing changes (8 bits of a 0..255 format)."""
    if n_bits == 8 and max_value == 255:
        return None
    values = (np.arange(256, dtype=np.int64) * 2**n_bits) // (max_value + 1)
    return values.astype(np.uint8)  # the same wrap-around as torch's int64 -> uint8


class Split:
    """One split of a dataset as the runs read it: images, labels, and the reduction to n_bits.

    Args:
        images: uint8 ``(N, C, H, W)``, any numpy array (a memory map, a transposed view).
        labels: int ``(N,)`` or None; read per batch like the images.
        n_bits: data levels kept, 1..8.
        max_value: the largest value of the format (255; 16 for scikit-learn's digits).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, n_bits: int, max_value: int = 255) -> None:
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images.")
        self.images, self.labels = images, labels
        self.n_bits, self.max_value = n_bits, max_value
        self.table = level_table(n_bits, max_value)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        labelled = "labelled" if self.labels is not None else "unlabelled"
        return f"Split({len(self)} images of shape {self.shape}, {labelled}, n_bits={self.n_bits})"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.images.shape[1:])

    def first(self, n: int) -> Split:
        """The first ``n`` images (all of them when ``n`` is 0 or not below the count), a view."""
        if n <= 0 or n >= len(self):
            return self
        labels = self.labels[:n] if self.labels is not None else None
        return Split(self.images[:n], labels, self.n_bits, self.max_value)

    def __getitem__(self, index: Any) -> Tensor:
        """The images ``index`` names as data levels: uint8 ``(B, C, H, W)``, C-contiguous; an
        int gives one image ``(C, H, W)``."""
        batch = np.ascontiguousarray(self.images[_numpy_index(index)])
        if self.table is not None:
            batch = np.take(self.table, batch)
        elif not batch.flags.writeable:  # a slice of a read-only memory map: the batch's own copy
            batch = batch.copy()
        # numpy leaves any stride on a dimension of size 1 (C = 1 of grey images), which torch would
        # read as channels-last and run the convolutions in that layout: view() sets the standard ones.
        return torch.from_numpy(batch).view(batch.shape)

    def labels_at(self, index: Any) -> Tensor | None:
        """The labels of the images ``index`` names, a LongTensor, or None without labels."""
        if self.labels is None:
            return None
        return torch.from_numpy(np.asarray(self.labels[_numpy_index(index)], dtype=np.int64))

    def all(self) -> Tensor:
        """Every image as one tensor: reads the whole split (for small test sets and the Python API)."""
        return self[:]


def _numpy_index(index: Any) -> Any:
    if isinstance(index, Tensor):
        return index.numpy()
    return index


def labels_tensor(labels: Tensor | np.ndarray | None, start: int, stop: int) -> Tensor | None:
    """``labels[start:stop]`` as a LongTensor, or None."""
    if labels is None:
        return None
    return torch.as_tensor(np.asarray(labels[start:stop]), dtype=torch.int64)


def read_batch(images: Split | Tensor, labels: Tensor | np.ndarray | None, start: int, stop: int
               ) -> tuple[Tensor, Tensor | None]:
    """Images ``start:stop`` of a `Split` or a tensor, and their labels (the evaluation loop's read)."""
    return images[start:stop], labels_tensor(labels, start, stop)


def batches(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[Tensor]:
    """Index batches of a fresh permutation per epoch, from step ``start_step`` on: the data order,
    a function of (seed, step). The permutation is int32 where ``n`` allows (torch draws the same
    permutation as in int64, in half the memory); each batch is int64."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    dtype = torch.int32 if n < 2**31 else torch.int64
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch), dtype=dtype)
        for b in range(index, per_epoch):
            yield perm[b * batch_size : (b + 1) * batch_size].long()
        step = (epoch + 1) * per_epoch


def dropout_generator(seed: int, step: int) -> torch.Generator:
    """The generator of train.label_dropout at ``step``: seeded by (seed, step) alone, never the
    global RNG, so a resumed run drops the labels an uninterrupted one dropped."""
    return torch.Generator().manual_seed(zlib.crc32(f"label_dropout/{seed}/{step}".encode()))


def drop_labels(labels: Tensor, p: float, num_classes: int, seed: int, step: int,
                part: tuple[int, int] = (0, 0)) -> Tensor:
    """``labels`` with each replaced by ``num_classes`` ("no class") with probability ``p``.

    ``part = (start, total)``: these labels are items ``start ..`` of a global batch of ``total``
    (a rank's shard under DDP); the draws are made for the whole global batch and cut, so they
    do not depend on the number of processes. Labels on any device; the draws are on the CPU."""
    if p <= 0:
        return labels
    start, total = part
    total = total or len(labels)
    drop = torch.rand(total, generator=dropout_generator(seed, step))[start : start + len(labels)] < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, num_classes), labels)


class Batch:
    """One training batch as `Prefetch` hands it over: data levels and labels (or None)."""

    __slots__ = ("images", "labels")

    def __init__(self, images: Tensor, labels: Tensor | None) -> None:
        self.images, self.labels = images, labels


def read_training_batch(split: Split, indices: Tensor, device: torch.device, to_device: bool) -> Batch:
    """What the prefetch thread does for one batch: read (gather, n_bits), and where ``to_device``
    on a CUDA device, pin and copy to it without blocking. No random draw."""
    images, labels = split[indices], split.labels_at(indices)
    if to_device and device.type == "cuda":
        images = images.pin_memory().to(device, non_blocking=True)
        if labels is not None:
            labels = labels.pin_memory().to(device, non_blocking=True)
    return Batch(images, labels)


_END = object()


class Prefetch:
    """The batches of ``order`` (index tensors) read ``depth`` ahead in a background thread;
    ``select(indices)`` picks what this process reads of each (its shard under DDP).

    The thread only reads and copies (`read_training_batch`), so what it yields is what reading
    the same indices on the training thread gives (tests/runs/test_data_path.py checks it); an
    error in the thread is raised on the training thread at the batch it happened at. ``depth = 0``
    reads on the calling thread. `close` stops the thread; use it as a context manager."""

    def __init__(self, split: Split, order: Iterator[Tensor], *, depth: int, device: torch.device,
                 to_device: bool = True, select: Callable[[Tensor], Tensor] | None = None) -> None:
        self.split, self.order, self.depth = split, order, depth
        self.select = select or (lambda indices: indices)
        self.device, self.to_device = device, to_device
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        if depth > 0:
            self.thread = threading.Thread(target=self._fill, name="flowkit-prefetch", daemon=True)
            self.thread.start()

    def _fill(self) -> None:
        try:
            for indices in self.order:
                batch = read_training_batch(self.split, self.select(indices), self.device, self.to_device)
                while not self.stopped.is_set():
                    try:
                        self.queue.put((indices, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as exc:  # handed to the training thread, raised there
            self._put_last(exc)
            return
        self._put_last(_END)

    def _put_last(self, item: Any) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[Tensor, Batch]]:
        return self

    def __next__(self) -> tuple[Tensor, Batch]:
        """The next batch's indices (all of them, before ``select``) and its `Batch`."""
        if self.thread is None:
            indices = next(self.order)
            return indices, read_training_batch(self.split, self.select(indices), self.device, self.to_device)
        item = self.queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
