"""Where a run's measurements go: one sink that `RunDir.log` and the sample writer feed.

Every record goes to ``metrics.jsonl`` (one JSON object per line, appended). With
``[log] tensorboard = true`` the same records also become TensorBoard events in the run's
``tb/`` folder, and the sample grids become images, so the trainer and the evaluators never
know which outputs are on: they log a record, and this module fans it out.

A record is a flat dict with a ``step``. TensorBoard tags group by their first ``/``:
``train_bpd`` -> ``train/bpd``, ``test_bpd/level1`` -> ``test/bpd/level1``; the trainer's
keys without a prefix go to their group (``lr`` -> ``train/lr``, ``eval_images`` ->
``test/images``); other keys keep their name. Values that are not numbers (``final``, ``nonfinite``) are left out; an
``error`` becomes text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from flowkit.errors import FlowkitError

TENSORBOARD_EXTRA = "pip install 'flowkit[tensorboard]'"
#: Keys of the trainer's records without a train_/test_ prefix, and the group they belong to.
_UNPREFIXED = {"lr": "train/lr", "images_per_s": "train/images_per_s", "images": "train/images",
               "eval_images": "test/images"}


def require_tensorboard() -> None:
    """Raises a clear error, before anything runs, when the recipe asks for TensorBoard and the
    package is missing (torch's writer imports it only when it is first used)."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FlowkitError(
            "log.tensorboard = true needs the tensorboard package, which is not installed: "
            f"{TENSORBOARD_EXTRA} (or set log.tensorboard = false; metrics.jsonl is written either way)."
        ) from None


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record under their TensorBoard tags (see the module docstring)."""
    tags = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        head, _, rest = key.partition("_")
        if head in ("train", "test") and rest:
            tag = f"{head}/{rest}"
        elif key in _UNPREFIXED:
            tag = _UNPREFIXED[key]
        else:
            tag = key
        tags[tag] = float(value)
    return tags


class TensorBoardWriter:
    """TensorBoard event files in ``folder``, written through torch's `SummaryWriter`.

    ``purge_step``: TensorBoard hides the events of this step and later ones that earlier
    writers left in ``folder`` (an interrupted run's, logged again after resuming), so a curve
    has one point per step.
    """

    def __init__(self, folder: Path, *, purge_step: int | None = None) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def record(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalar_tags(record).items():
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        if isinstance(record.get("error"), str):
            self.writer.add_text("error", record["error"], step)
        # Flushed per record (every train.log_every steps): a run that crashes or is killed
        # keeps every event it logged, as metrics.jsonl does.
        self.writer.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsSink:
    """``metrics.jsonl`` always; TensorBoard as well once `open_tensorboard` is called."""

    def __init__(self, jsonl: Path) -> None:
        self.jsonl = Path(jsonl)
        self.tensorboard: TensorBoardWriter | None = None
        self._tensorboard_folder: Path | None = None
        self._purge_step: int | None = None

    def open_tensorboard(self, folder: Path) -> None:
        """Also write TensorBoard events to ``folder``, from the next record on (the writer is
        made then, so that `drop_after` can still set its purge step)."""
        require_tensorboard()
        self._tensorboard_folder = Path(folder)

    def drop_after(self, step: int) -> None:
        """A resumed run logs the steps after ``step`` again: TensorBoard hides the events an
        interrupted process wrote for them (`RunDir.drop_metrics_after` does so for metrics.jsonl)."""
        self._purge_step = step + 1

    def _writer(self) -> TensorBoardWriter | None:
        if self.tensorboard is None and self._tensorboard_folder is not None:
            self.tensorboard = TensorBoardWriter(self._tensorboard_folder, purge_step=self._purge_step)
        return self.tensorboard

    def record(self, record: dict[str, Any]) -> None:
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if (writer := self._writer()) is not None:
            writer.record(record)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An ``(H, W, C)`` uint8 image (a sample grid); metrics.jsonl has no images, the PNG
        files in samples/ are their record."""
        if (writer := self._writer()) is not None:
            writer.image(tag, image, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.tensorboard = self._tensorboard_folder = None
