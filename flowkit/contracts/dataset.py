"""Image datasets: uint8 NCHW arrays (in memory or memory-mapped) and their labels, from local files only.

A dataset never has to load its images: any numpy array will do, a memory map of a prepared
store included (`numpy.memmap` is an ndarray), and the runs read it per batch
(`flowkit.runs.data.Split`). So nothing here scans the images: checks look at dtypes and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowkit.params import param


@dataclass(frozen=True, kw_only=True)
class DataParams:
    """Keys every ``[data]`` table accepts; datasets subclass this for their own Params."""

    n_bits: int = param(8, "bits per pixel kept (Glow uses 5 on CelebA-HQ); 1..8")
    limit_train: int = param(0, "use only the first N training images (0: all)")
    limit_test: int = param(0, "use only the first N test images (0: all)")
    labels: bool = param(False, "read the class labels beside the images (for class-conditional models); "
                                "refused where the dataset has none")

    def __post_init__(self) -> None:
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits = {self.n_bits} is out of range; allowed: 1 to 8.")
        if self.limit_train < 0 or self.limit_test < 0:
            raise ValueError("limit_train and limit_test must be >= 0.")


@dataclass(frozen=True)
class ImageDataset:
    """Train and test images, ``uint8`` arrays of shape ``(N, C, H, W)``, values 0..255, and
    their labels where the dataset has them.

    ``max_value`` is the largest value the format allows (255; 16 for scikit-learn digits):
    reducing to ``n_bits`` maps ``[0, max_value]`` onto ``[0, 2^n_bits)``.

    ``train_labels`` and ``test_labels`` are int64 arrays ``(N,)`` with values ``0 .. K - 1``, or
    both None; ``classes`` names the K classes (``("0", ..., "9")`` for MNIST), empty without
    labels. K is ``num_classes``; a class-conditional model reads the label K as "no class"
    (train.label_dropout). The images may be a transposed view or a memory map: nothing here
    reads them, and label values are checked only for arrays in memory (a store's are covered
    by its checksums).
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    source: str = ""
    max_value: int = 255
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split, arr in (("train", self.train), ("test", self.test)):
            if arr.dtype != np.uint8 or arr.ndim != 4:
                raise ValueError(
                    f"{self.name}: {split} images must be uint8 of shape (N, C, H, W), got "
                    f"{arr.dtype} {arr.shape}."
                )
        if self.train.shape[1:] != self.test.shape[1:]:
            raise ValueError(
                f"{self.name}: train images are {self.train.shape[1:]} but test images are "
                f"{self.test.shape[1:]}."
            )
        if (self.train_labels is None) != (self.test_labels is None):
            raise ValueError(f"{self.name}: labels for one split only; give both or neither.")
        if self.train_labels is None or self.test_labels is None:
            if self.classes:
                raise ValueError(f"{self.name}: classes {self.classes[:3]}... are named but there are no labels.")
            return
        if not self.classes:
            raise ValueError(f"{self.name}: labels without classes; name the classes (their count is K).")
        for split, images, labels in (("train", self.train, self.train_labels), ("test", self.test, self.test_labels)):
            if labels.dtype != np.int64 or labels.shape != (len(images),):
                raise ValueError(f"{self.name}: {split} labels must be int64 of shape ({len(images)},), got "
                                 f"{labels.dtype} {labels.shape}.")
            if len(labels) and not isinstance(labels, np.memmap):
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or high >= len(self.classes):
                    raise ValueError(f"{self.name}: {split} labels range over {low}..{high}, outside the "
                                     f"{len(self.classes)} classes (0..{len(self.classes) - 1}).")

    @property
    def has_labels(self) -> bool:
        return self.train_labels is not None

    @property
    def num_classes(self) -> int:
        """K, the number of classes (0 without labels); the label K means "no class"."""
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)
