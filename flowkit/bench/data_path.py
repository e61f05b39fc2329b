"""The data benchmark: how fast the training input path delivers batches, without a model.

What is timed is what `flowkit.runs.trainer.Trainer` does to a batch before the model sees it:
read (the batch's images gathered from the dataset's array, a memory map for a store), n_bits
(the lookup table of `flowkit.runs.data.Split`), the host-to-device copy (pinned memory,
non-blocking) where the device is CUDA, the layout (channels-last when asked) and the
dequantization (the dequantizer the caller gives, uniform noise by default in the CLI). `measure`
runs them as training does, the reads in `flowkit.runs.data.Prefetch`'s thread ``prefetch``
batches ahead; `stage_times` runs each stage alone on the calling thread, so the table says where
the time goes. The random batches are those of training (`flowkit.runs.data.batches`), so a
benchmark on a store larger than the page cache reads from disk as training would.

``flowkit data bench DIR`` (the store plugin's command) prints both; docs/performance.md has the
figures and targets (>= 20,000 images/s at 32x32 and >= 5,000 at 64x64, batch 256, 2 cores).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from flowkit.runs.data import Prefetch, Split, batches

Dequantize = Callable[[Tensor], Tensor]


@dataclass
class DataBenchResult:
    """Throughput of the input path: ``batches`` batches of ``batch_size`` in ``seconds``."""

    batch_size: int
    batches: int
    seconds: float
    prefetch: int
    device: str
    shape: tuple[int, ...]
    n_bits: int
    stages_ms: dict[str, float] = field(default_factory=dict)  #: per batch, each stage alone

    @property
    def images_per_s(self) -> float:
        return self.batches * self.batch_size / self.seconds

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds

    @property
    def megabytes_per_s(self) -> float:
        return self.images_per_s * int(np.prod(self.shape)) / 1e6

    def as_dict(self) -> dict[str, object]:
        return {"batch_size": self.batch_size, "batches": self.batches, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "batches_per_s": self.batches_per_s,
                "megabytes_per_s": self.megabytes_per_s, "prefetch": self.prefetch, "device": self.device,
                "shape": list(self.shape), "n_bits": self.n_bits, "stages_ms": self.stages_ms}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_model(x: Tensor, device: torch.device, channels_last: bool, dequantize: Dequantize) -> Tensor:
    """What the training thread does to a batch the prefetch thread read."""
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return dequantize(x)


def measure(split: Split, dequantize: Dequantize, *, batch_size: int, seconds: float = 5.0, min_batches: int = 20,
            seed: int = 0, device: torch.device | str = "cpu", prefetch: int = 2,
            channels_last: bool = False) -> DataBenchResult:
    """Batches through the whole input path as training runs it, for at least ``seconds`` and
    ``min_batches``; the first batch (thread start, first page faults) is not counted."""
    device = torch.device(device)
    order = batches(len(split), batch_size, seed, 0)
    with Prefetch(split, order, depth=prefetch, device=device) as data:
        _, first = next(data)
        _to_model(first.images, device, channels_last, dequantize)
        _synchronize(device)
        count, tick = 0, time.perf_counter()
        while count < min_batches or time.perf_counter() - tick < seconds:
            _, batch = next(data)
            _to_model(batch.images, device, channels_last, dequantize)
            count += 1
        _synchronize(device)
        elapsed = time.perf_counter() - tick
    return DataBenchResult(min(batch_size, len(split)), count, elapsed, prefetch, str(device), split.shape,
                           split.n_bits)


def stage_times(split: Split, dequantize: Dequantize, *, batch_size: int, count: int = 20, seed: int = 1,
                device: torch.device | str = "cpu", channels_last: bool = False) -> dict[str, float]:
    """Milliseconds per batch of each stage alone, on the calling thread: read (gather), n_bits,
    host-to-device (pinned, CUDA only), layout (channels-last, when asked), dequantize."""
    device = torch.device(device)
    order = batches(len(split), batch_size, seed, 0)
    totals = {"read": 0.0, "n_bits": 0.0, "host_to_device": 0.0, "layout": 0.0, "dequantize": 0.0}
    warm = split[next(order)]  # the first call of each op (allocator, kernels) is not counted
    dequantize(warm.to(device))
    for _ in range(count):
        indices = next(order).numpy()
        tick = time.perf_counter()
        raw = np.ascontiguousarray(split.images[indices])
        totals["read"] += time.perf_counter() - tick
        tick = time.perf_counter()
        levels = np.take(split.table, raw) if split.table is not None else raw
        x = torch.from_numpy(levels).view(levels.shape)
        totals["n_bits"] += time.perf_counter() - tick
        if device.type == "cuda":
            tick = time.perf_counter()
            x = x.pin_memory().to(device, non_blocking=True)
            _synchronize(device)
            totals["host_to_device"] += time.perf_counter() - tick
        if channels_last:
            tick = time.perf_counter()
            x = x.contiguous(memory_format=torch.channels_last)
            _synchronize(device)
            totals["layout"] += time.perf_counter() - tick
        tick = time.perf_counter()
        dequantize(x)
        _synchronize(device)
        totals["dequantize"] += time.perf_counter() - tick
    return {stage: 1000 * total / count for stage, total in totals.items()
            if total or stage in ("read", "n_bits", "dequantize")}
