"""No host synchronisation inside a training step: the loss and gradient norms stay on the device
until `Trainer.flush`, which reads them back at log points, and the metrics are those of before."""

from __future__ import annotations

import json
import math
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.trainer import SilentReporter, Trainer

ROOT = Path(__file__).resolve().parents[2]
# Reads of a tensor's value on the host: each waits for the device to finish the work queued before it.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def make_trainer(plugins: Plugins, out: Path, recipe: str, *overrides: str) -> Trainer:
    recipe_ = load_recipe(ROOT / "recipes" / recipe, plugins.registries, preset="smoke", overrides=[
        "train.device=cpu", "train.threads=1", "train.level_threads=1", "train.minutes=0.0", *overrides])
    return Trainer(build_session(recipe_, plugins), RunDir.create(recipe_.meta.name, out=out))


class Watch:
    """Where the trainer is (inside `_steps`, inside `flush`) and the host reads made in a step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.in_steps = self.in_flush = False
        self.flushed: list[list[int]] = []  # the steps each flush read back
        self.reads: Counter[tuple[str, str]] = Counter()  # (method, first caller outside torch) inside a step
        flush, steps = trainer.flush, trainer._steps

        def watched_flush() -> None:
            self.flushed.append([p.step for p in trainer.pending])
            self.in_flush = True
            try:
                flush()
            finally:
                self.in_flush = False

        def watched_steps() -> None:
            self.in_steps = True
            try:
                steps()
            finally:
                self.in_steps = False

        trainer.flush, trainer._steps = watched_flush, watched_steps

    def step_counter(self, tensor: torch.Tensor) -> bool:
        # torch's Adam keeps its step count in a CPU tensor and reads it with .item(), by design:
        # a CPU scalar, also when the parameters are on a GPU, so no wait for the device.
        return any(tensor is state.get("step") for state in self.trainer.optimizer.state.values())

    def wrap(self, name: str) -> Callable:
        original = getattr(torch.Tensor, name)

        def read(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
            if self.in_steps and not self.in_flush and not self.step_counter(tensor):
                caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                # The input path turns the data order's index batches (CPU tensors drawn by a CPU
                # generator, on every device) into numpy indices: nothing waits for a device.
                if name == "numpy" and tensor.device.type == "cpu" and Path(caller.filename).parts[-3:] == (
                        "flowkit", "runs", "data.py"):
                    return original(tensor, *args, **kwargs)
                self.reads[(name, f"{Path(caller.filename).name}:{caller.lineno}")] += 1
            return original(tensor, *args, **kwargs)

        return read


@pytest.fixture
def watch_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Trainer], Watch]]:
    def install(trainer: Trainer) -> Watch:
        watch = Watch(trainer)
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, watch.wrap(name))
        return watch

    yield install


@pytest.mark.parametrize("recipe", ["glow.toml", "wavelet_flow_affine.toml"])
def test_a_step_reads_nothing_back_and_a_flush_reads_the_steps_since_the_last(
    plugins: Plugins, tmp_path: Path, watch_reads: Callable[[Trainer], Watch], recipe: str,
) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", recipe, "train.steps=10", "train.log_every=5")
    trainer.flush_seconds = math.inf  # no flush by the clock: only the log points' and the end's
    watch = watch_reads(trainer)
    trainer.train()
    assert watch.reads == Counter(), f"host reads inside a training step: {dict(watch.reads)}"
    assert [steps for steps in watch.flushed if steps] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


def test_the_watch_sees_a_host_read_inside_a_step(
    plugins: Plugins, tmp_path: Path, watch_reads: Callable[[Trainer], Watch],
) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "glow.toml", "train.steps=3", "train.log_every=5")
    clip = trainer.clip

    def clip_and_read() -> list[torch.Tensor]:
        norms = clip()
        norms[0].item()  # what the loop did before: a read of the norms every step
        return norms

    trainer.clip = clip_and_read
    watch = watch_reads(trainer)
    trainer.train()
    assert watch.reads == Counter({("item", "test_trainer_sync.py:" + str(clip_and_read.__code__.co_firstlineno + 2)): 3})


def test_a_clock_flush_keeps_the_progress_moving_between_log_points(plugins: Plugins, tmp_path: Path) -> None:
    seen: list[int] = []

    class Progress(SilentReporter):
        def step(self, step: int, metrics: dict[str, float]) -> None:
            seen.append(step)

    trainer = make_trainer(plugins, tmp_path / "run", "glow.toml", "train.steps=4", "train.log_every=100")
    trainer.reporter = Progress()
    trainer.flush_seconds = 0.0  # a flush after every step
    flushes: list[list[int]] = []
    flush = trainer.flush
    trainer.flush = lambda: (flushes.append([p.step for p in trainer.pending]), flush())[1]
    trainer.train()
    assert [steps for steps in flushes if steps] == [[1], [2], [3], [4]]
    assert seen == [1, 2, 3, 4]


def test_the_metrics_lines_are_those_of_every_log_point(plugins: Plugins, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "glow.toml", "train.steps=6", "train.log_every=3")
    trainer.flush_seconds = math.inf
    bpd: list[float] = []

    class Record(SilentReporter):
        def step(self, step: int, metrics: dict[str, float]) -> None:
            bpd.append(metrics["bpd"])

    trainer.reporter = Record()
    trainer.train()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]
    for line, window in zip(lines, (bpd[:3], bpd[3:]), strict=True):
        assert line["train_bpd"] == pytest.approx(sum(window) / 3, rel=1e-12)
        assert line["images_per_s"] > 0 and line.keys() == {"step", "train_bpd", "lr", "images_per_s", "train_seconds"}
    assert lines[-1]["train_seconds"] == round(trainer.state.train_seconds, 3)
    assert trainer.state.recent == bpd


def test_the_progress_rate_of_each_step_is_its_flush_windows(plugins: Plugins, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a step only enqueues its work and the flush waits for all of it: every step of a
    window reports the window's images over its seconds, not its own enqueue time (with the whole
    wait on the last). The wait is made here: 0.2 s in the flush's read-back."""
    trainer = make_trainer(plugins, tmp_path / "run", "glow.toml", "train.steps=6", "train.log_every=3")
    trainer.flush_seconds = math.inf
    seen: list[dict[str, float]] = []

    class Record(SilentReporter):
        def step(self, step: int, metrics: dict[str, float]) -> None:
            seen.append(metrics)

    trainer.reporter = Record()
    in_flush, flush, tolist = [False], trainer.flush, torch.Tensor.tolist

    def flagged_flush() -> None:
        in_flush[0] = True
        try:
            flush()
        finally:
            in_flush[0] = False

    def slow_read(tensor: torch.Tensor) -> object:  # the flush's read-back, waiting as for a GPU
        if in_flush[0]:
            time.sleep(0.2)
        return tolist(tensor)

    trainer.flush = flagged_flush
    monkeypatch.setattr(torch.Tensor, "tolist", slow_read)
    trainer.train()
    batch = trainer.cfg.batch_size
    for window, before in ((seen[:3], 0.0), (seen[3:], seen[2]["train_seconds"])):
        rate = 3 * batch / (window[-1]["train_seconds"] - before)
        assert [m["images_per_s"] for m in window] == pytest.approx([rate] * 3, rel=1e-9), window


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["glow.toml", "wavelet_flow_affine.toml"])
def test_a_cuda_step_does_not_synchronise(plugins: Plugins, tmp_path: Path, recipe: str) -> None:
    """On a GPU, CUDA itself tells: syncs that no Python-level read shows (a copy to the host, an
    output whose size depends on the data) are errors while a step runs, allowed in a flush."""
    trainer = make_trainer(plugins, tmp_path / "run", recipe, "train.device=cuda", "train.steps=10",
                           "train.log_every=5")
    trainer.flush_seconds = math.inf
    flush, steps = trainer.flush, trainer._steps

    def flush_allowed() -> None:
        torch.cuda.set_sync_debug_mode(0)
        try:
            flush()
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def steps_watched() -> None:
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps()
        finally:
            torch.cuda.set_sync_debug_mode(0)

    trainer.flush, trainer._steps = flush_allowed, steps_watched
    trainer.train()
    assert trainer.state.step == 10
