"""The training loop: warm-up, clipping per parameter group, budgets, checkpoints, resume.

Exact resume: the data order is a function of (seed, epoch) (`flowkit.runs.data.batches`), the
dequantization noise and the shift augmentation come from the global torch RNG whose state is
checkpointed, label dropout from a generator seeded by (seed, step), and the learning rate is a
function of the step, so ``--resume`` continues the same trajectory as an uninterrupted run.
Batches are read by `flowkit.runs.data.Prefetch` (train.prefetch batches ahead, in a thread that
only reads and copies); every random draw stays on the training thread.

No host synchronisation inside a step: a step only enqueues work, and keeps its loss and
gradient norms as device tensors. `Trainer.flush` reads the pending steps back in one batch
at log points, before a checkpoint or an evaluation, at the end, and otherwise about once a
second (so a progress display moves); it checks them in step order and fails naming the first
bad step before any checkpoint can hold its weights. Under torchrun (`flowkit.runs.distributed`)
each rank trains on its slice of every global batch; after every step the ranks agree on the
training time (rank 0's) and on a stop on a signal (`distributed.agree`, a CPU all-reduce that
waits for no GPU), and a flush is where they agree on the logged loss (their mean).
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from flowkit.errors import FlowkitError, TrainingError
from flowkit.runs import distributed
from flowkit.runs.bpd import figure_key
from flowkit.runs.checkpoint import checkpoint_to_resume, load_checkpoint, save_checkpoint
from flowkit.runs.data import Prefetch, batches, drop_labels
from flowkit.runs.evaluate import evaluate
from flowkit.runs.gradients import clip_grad_norm
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import Session
from flowkit.runs.signals import AbortedBySignal, RunInterrupted, StopOnSignal
from flowkit.runs.term_threads import TermThreads


class Reporter(Protocol):
    def start(self, total_steps: int | None, total_seconds: float | None, done_steps: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_steps: int | None, total_seconds: float | None, done_steps: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self) -> None: ...


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float,
                   betas: tuple[float, ...] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The recipe's optimiser in torch's fused kernels where torch has them (Adam, AdamW: one
    kernel per parameter instead of about ten ops: 11 -> 3 ms per step for 492 tensors of the
    Wavelet Flow default's sizes on 2 cores, 4.0 ms measured inside its training step), else
    multi-tensor (foreach). Same update rule; results differ
    from torch's default by float rounding only. A checkpoint restores the moments in their
    parameter's memory layout (`checkpoint._state_in_parameter_layout`), which the fused kernel
    needs for an exact resume (tests/runs/test_run_faults.py)."""
    # adamax_openai is torch's Adamax with the step size scaled in `Trainer.lr_at`.
    cls = {"adamax": torch.optim.Adamax, "adamax_openai": torch.optim.Adamax, "adam": torch.optim.Adam,
           "adamw": torch.optim.AdamW}[name]
    # The fused kernel walks each parameter's memory as one flat run: a strided view (a
    # parameter that is a slice of another tensor) would pair the wrong elements.
    groups = [{**group, "params": list(group["params"])} for group in groups]
    dense = all(p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)
                for group in groups for p in group["params"])
    fast = {"fused": True} if cls is not torch.optim.Adamax and dense else {"foreach": True}
    return cls(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), **fast)


def random_shift(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Each image translated by a uniform random amount of up to ``fraction`` of its side in each
    direction, bilinearly interpolated with the edge pixels repeated, then floored to integers:
    openai/glow's CIFAR-10 augmentation (``data_loaders/get_mnist_cifar.py``: keras'
    ``ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1)``, whose float images
    ``model.py`` ``preprocess`` floors). Draws from the global RNG, which checkpoints carry."""
    if fraction == 0:
        return x
    b, _, h, w = x.shape
    shift = (torch.rand(b, 2) * 2 - 1) * fraction * torch.tensor([w, h])  # pixels: (x, y)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2 * shift[:, 0] / max(w - 1, 1)  # align_corners=True: [-1, 1] spans w - 1 pixels
    theta[:, 1, 2] = 2 * shift[:, 1] / max(h - 1, 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=True)
    moved = torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                                            align_corners=True)
    # A convex combination of pixels stays within their range; the 1e-4 absorbs the sampler's
    # rounding, which would floor an exact integer such as 2.0 computed as 1.99999 to 1.
    return (moved + 1e-4).floor().to(x.dtype)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


@dataclass
class TrainState:
    step: int = 0
    train_seconds: float = 0.0
    images: int = 0
    recent: list[float] = field(default_factory=list)


@dataclass
class PendingStep:
    """A step whose loss and gradient norms are still where they were computed, until a flush."""

    step: int
    lr: float
    images: int  # of the global batch
    seconds: float  # the time it took to enqueue its work (all of it where nothing is asynchronous)
    values: torch.Tensor  # (1 + norms,) float32: the loss, then the gradient norms of `Trainer.clip`
    terms: dict[str, torch.Tensor]  # of its last micro-batch, for naming the term a non-finite loss came from


class Trainer:
    """Trains a `Session`'s model and dequantizer, writing into a `RunDir`.

    Under torchrun, rank 0 alone writes the run directory; the other ranks read it only to resume,
    and get None for a new run."""

    def __init__(self, session: Session, rundir: RunDir | None, reporter: Reporter | None = None) -> None:
        self.s = session
        self.world = distributed.world()
        if rundir is None and self.world.main:
            raise ValueError("rank 0 writes the run directory: give it one.")
        self.rundir = rundir
        self.reporter = reporter or SilentReporter()
        self.cfg = session.recipe.train
        self.objective = session.objective
        # The name of the loss in logs: "bpd", or "noisy_nll" where the noise leaves the bin.
        self.figure = figure_key(session.dequantizer.figure)
        if self.cfg.compile != "off":  # training's forward and backward; evaluation stays eager
            self.objective = self.objective.compiled(self.cfg.compile)
        self.groups, self.parts = self._select_groups()
        self.optimizer = make_optimizer(
            self.cfg.optimizer, [{"params": p, "name": n} for n, p in self.groups.items()],
            self.cfg.lr, self.cfg.weight_decay, self.cfg.betas,
        )
        self.state = TrainState()
        self.term_threads: TermThreads | None = None  # only while train() runs
        self.micro_weight = 1.0  # the current micro-batch's share of the batch (train.accumulate)
        self.saved_step: int | None = None  # the step of the checkpoint this process wrote or loaded last
        self.stop = StopOnSignal()  # SIGINT/SIGTERM: finish the step, checkpoint, RunInterrupted
        self.next_eval_seconds = math.inf  # train.eval_every_seconds: when the next curve point is due
        self.net: torch.nn.Module | None = None  # the objective under DDP while train() runs, with other ranks
        self.pending: list[PendingStep] = []  # steps done since the last flush
        self.flush_seconds = 1.0  # wall time between flushes at most, besides the log points
        self.last_flush = 0.0  # time.perf_counter() of the last flush
        self.flushed_seconds = 0.0  # state.train_seconds at the last flush
        self.log_window = 0.0  # training seconds since the last metrics.jsonl line
        self.stop_agreed = False  # under DDP: a rank had a stop signal by the last step's agreement

    def _select_groups(self) -> tuple[dict[str, list[torch.nn.Parameter]], list[str] | None]:
        groups = {n: p for n, p in self.s.model.parameter_groups().items() if p}
        deq = [p for p in self.s.dequantizer.parameters() if p.requires_grad]
        level = self.cfg.level
        if level < 0:
            if deq:
                groups["dequantizer"] = deq
            return groups, None
        name = list(self.s.model.parameter_groups())[level]  # build_session checked the capability and range
        return {name: groups[name]}, [name]

    def _term_threads(self) -> TermThreads | None:
        threads = self.cfg.level_threads
        if threads <= 1 or self.parts is not None:
            return None  # one term alone (train.level) has nothing to run side by side
        # build_session checked the fit. Each group's loss is the bits/dim of its terms: the
        # constant offset differs from the joint loss, the gradient does not.
        return TermThreads(self.s.model, threads,
                           lambda terms: self.objective.bits_per_dim(terms, 0.0).mean() * self.micro_weight,
                           terms=lambda y, names, labels: self.objective.terms(y, names, labels))

    # -- budget and schedule ------------------------------------------------------------
    def lr_at(self, step: int, elapsed: float) -> float:
        cfg = self.cfg
        scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.optimizer == "adamax_openai":
            # openai/glow optim.py adamax(): alpha_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t); torch's
            # Adamax divides by (1 - beta1^t) itself, so only the square root is the schedule's.
            scale *= math.sqrt(1.0 - cfg.betas[1] ** (step + 1))
        if cfg.decay == "exponential":  # MaCow: times decay_rate every step after the peak
            scale *= cfg.decay_rate ** max(0, step - max(cfg.warmup_steps - 1, 0))
        if cfg.decay == "cosine":
            progress = step / cfg.steps if cfg.steps else elapsed / (cfg.minutes * 60)
            scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr * scale

    def done(self) -> bool:
        cfg, st = self.cfg, self.state
        return bool((cfg.steps and st.step >= cfg.steps) or (cfg.minutes and st.train_seconds >= cfg.minutes * 60))

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Rank 0's weights, optimizer, RNG and counters; the pending steps are checked first, so a
        step with a non-finite loss or gradient fails before its weights are saved."""
        self.flush()
        st = self.state
        if self.world.main:
            tensors = {"torch_rng": torch.get_rng_state()}
            if self.s.device.type == "cuda":
                tensors["cuda_rng"] = torch.cuda.get_rng_state(self.s.device)
            save_checkpoint(self.rundir.checkpoints, st.step, self.s.modules(), self.optimizer, tensors,
                            {"train_seconds": st.train_seconds, "images": st.images, "recent": st.recent})
        self.saved_step = st.step

    def resume(self, from_checkpoint: str | None = None) -> bool:
        """Restores the checkpoint to continue from (`checkpoint_to_resume`: ``from_checkpoint``,
        else the latest); False when the run has none yet (it was stopped before its first)."""
        path = checkpoint_to_resume(self.rundir.checkpoints, from_checkpoint)
        if path is None:
            self.reporter.message(f"{self.rundir.path} has no checkpoint yet: starting it from the beginning "
                                  "with its recipe.toml.")
            if self.world.main:
                self.rundir.drop_metrics_after(0)
            return False
        self._restore(path)
        if self.world.main:
            self.rundir.drop_metrics_after(self.state.step)  # logged after this checkpoint: logged again
        self.reporter.message(f"Resumed from {path} at step {self.state.step}.")
        return True

    def _restore(self, path: Path) -> None:
        """The whole training state of checkpoint ``path``: weights, optimizer, RNG and counters."""
        tensors, state = load_checkpoint(path, self.s.modules(), self.optimizer, self.s.device)
        torch.set_rng_state(tensors["torch_rng"])
        if "cuda_rng" in tensors and self.s.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["cuda_rng"], self.s.device)
        self.state = TrainState(state["step"], state["train_seconds"], state["images"], list(state["recent"]))
        self.saved_step = self.state.step

    @torch.no_grad()
    def initialize(self) -> None:
        """Data-dependent initialisation (actnorm) on a seeded random batch (and its labels)."""
        n = min(self.cfg.init_batch_size, len(self.s.train_x))
        # int32: the same permutation as int64 (torch draws alike), half the memory per image.
        idx = torch.randperm(len(self.s.train_x), generator=torch.Generator().manual_seed(self.cfg.seed),
                             dtype=torch.int32)[:n].long()
        x = self.s.train_x[idx].to(self.s.device)
        labels = self.s.train_x.labels_at(idx)
        self.objective.initialize(x, labels.to(self.s.device) if labels is not None else None)
        if self.s.average is not None:
            self.s.average.reset()  # the average starts at the initialised weights

    # -- the loop ----------------------------------------------------------------------
    def backward(self, x: torch.Tensor, batch: int | None = None, labels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (mean bits/dim, detached) and terms of a batch; gradients accumulated over its
        ``train.accumulate`` micro-batches, so the step is that of the whole batch. The loss is
        the whole image's bits/dim, or train.level's term alone over its own dimensions.
        ``labels`` (or None) are split with the images and reach the objective beside them.

        Under DDP ``x`` is this rank's share of a global batch of ``batch`` images; DDP averages
        the ranks' gradients when the last micro-batch's backward ends (`no_sync` before it)."""
        weighted, terms = [], {}
        micros = x.chunk(self.cfg.accumulate)
        micro_labels = labels.chunk(self.cfg.accumulate) if labels is not None else [None] * len(micros)
        for i, (micro, micro_label) in enumerate(zip(micros, micro_labels, strict=True)):
            # Each micro-batch's mean weighted by its share of the batch: the batch's mean, also
            # when a dataset smaller than the batch leaves fewer or unequal micro-batches. DDP
            # divides the sum over ranks by their number, hence the world size.
            self.micro_weight = len(micro) * self.world.size / (batch or len(x))
            if self.net is not None:
                with self.net.no_sync() if i < len(micros) - 1 else contextlib.nullcontext():  # type: ignore[operator]
                    loss, terms = self.net(micro, micro_label)
                    (loss * self.micro_weight).backward()
            elif self.term_threads is None:
                loss, terms = self.objective.loss(micro, self.parts, micro_label)
                (loss * self.micro_weight).backward()
            else:
                y, log_q = self.objective.dequantize(micro)
                terms = self.term_threads.backward(y, micro_label)
                loss = self.objective.bits_per_dim(terms, log_q).mean()
            weighted.append(loss.detach().float() * self.micro_weight)
        return torch.stack(weighted).sum(), terms

    def train_step(self, x: torch.Tensor, batch: int | None = None, labels: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        """One optimiser step on the batch ``x`` (this rank's share of ``batch`` images) and its
        ``labels``: the batch to the device in the recipe's layout (already there when the prefetch
        thread copied it), gradients of its micro-batches, clipping, the update and train.ema's
        average. What `_steps` runs each step and what ``flowkit bench`` times; returns the loss,
        the terms and the gradient norms before clipping, all still on the device."""
        x = x.to(self.s.device, non_blocking=True)
        if labels is not None:
            labels = labels.to(self.s.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self.backward(x, batch, labels)
        norms = self.clip()
        self.optimizer.step()
        if self.s.average is not None:
            self.s.average.update()
        return loss, terms, norms

    def clip(self) -> list[torch.Tensor]:
        """Gradient norms before clipping: one per parameter group, or one over all of them
        (``grad_clip_scope = "global"``, Flow++'s single norm over model and dequantizer)."""
        limit = self.cfg.grad_clip or float("inf")
        if self.cfg.grad_clip_scope == "global":
            return [clip_grad_norm([p for ps in self.groups.values() for p in ps], limit)]
        return [clip_grad_norm(p, limit) for p in self.groups.values()]

    def fail(self, step: int, what: str, terms: dict[str, torch.Tensor]) -> None:
        """Stops training at ``step``, the first bad one. That step and the ones after it were
        already applied (a flush reads them back later), so the whole training state in memory
        (weights, optimizer, RNG, step, images, training seconds, recent losses) is put back to
        that of the last good checkpoint, the one a resume continues from. A checkpoint that
        cannot be loaded back is named in the message, with why; so is the lack of one (the
        state in memory then stays that after the bad steps)."""
        bad = [n for n, t in terms.items() if not torch.isfinite(t).all()] or list(terms)
        self.pending.clear()
        failed = f"{what} at step {step} in {', '.join(bad)}; training stopped"
        if self.rundir is None:  # a rank other than 0 of a new run: rank 0 reports it
            raise TrainingError(f"{failed}.")
        try:
            path = checkpoint_to_resume(self.rundir.checkpoints)
            if path is not None:
                self._restore(path)
        except FlowkitError as exc:  # a damaged checkpoint: the one before may be whole
            kept = (f"the last checkpoint in {self.rundir.checkpoints} could not be loaded back ({exc}); the "
                    "state in memory is that after the bad step")
        else:
            kept = (f"the state of the last good checkpoint, step {self.state.step} ({path}), is put back"
                    if path is not None else "no checkpoint had been written yet")
        message = f"{failed} and {kept}."
        if self.world.main:
            self.rundir.log({"step": step, "error": message})
            self.rundir.write_summary({**self.rundir.read_summary(), "status": "failed", "error": message})
        raise TrainingError(message)

    def train(self, *, resume: bool = False, from_checkpoint: str | None = None) -> None:
        """Trains until the budget is spent and checkpoints the last step. ``resume``: from the
        checkpoint `resume` picks, or from the beginning when there is none. A SIGINT or SIGTERM
        ends the step, checkpoints it and raises `RunInterrupted`; a second one raises it at once."""
        cfg, s = self.cfg, self.s
        if not (resume and self.resume(from_checkpoint)):
            self.initialize()
        if self.world.size > 1:
            # After the initialisation or the resume; DDP broadcasts rank 0's weights and buffers here.
            self.net = distributed.data_parallel(self.objective, self.parts, s.device)
        self.reporter.start(cfg.steps or None, cfg.minutes * 60 or None, self.state.step)
        s.model.train()
        s.dequantizer.train()
        self.term_threads = self._term_threads()
        run_dir = self.rundir.path if self.rundir is not None else Path(".")
        try:
            with self.stop:
                try:
                    self._steps()
                finally:  # a failed run, too, gives back torch's thread count and the pool's threads
                    if self.term_threads is not None:
                        self.term_threads.close()
                        self.term_threads = None
                if self.saved_step != self.state.step:  # unless a periodic save, or the resumed one, holds it
                    self.checkpoint()
        except AbortedBySignal as exc:
            raise RunInterrupted(exc.signum, run_dir, self.state.step, checkpointed=False) from None
        finally:
            self.net = None
            self.reporter.finish()
        if self.stopping():
            signum = self.stop.requested or signal.SIGTERM  # under DDP another rank's signal may have stopped it
            raise RunInterrupted(signum, run_dir, self.state.step, checkpointed=True)

    def stopping(self) -> bool:
        """A signal asked to stop; under DDP any rank's, as the ranks agreed after the last step
        (`distributed.agree`), so that they all stop after the same step."""
        return self.stop_agreed if self.world.size > 1 else self.stop.requested is not None

    def periodic_evaluation(self) -> None:
        """The test bits/dim during training, on the first ``eval_images`` test images (a fixed
        subset and fixed noise, so points of a curve are comparable), logged with the step, the
        training seconds and the images seen; its own time is not training time."""
        cfg, s, st = self.cfg, self.s, self.state
        self.flush()
        if self.world.main:  # rank 0 alone; the others wait for it in the next step's all-reduce
            x = s.test_x.first(cfg.eval_images)
            with self.term_threads.all_cores() if self.term_threads else contextlib.nullcontext(), \
                    s.evaluation_weights():
                result = evaluate(s, x, x.labels, batch_size=cfg.eval_batch_size, seed=cfg.seed + 1,
                                  alone=self.parts[0] if self.parts else None)
            self.rundir.log({"step": st.step, "train_seconds": round(st.train_seconds, 3), "images": st.images,
                             "eval_images": len(x), **{f"test_{k}": v for k, v in result.items()}})
            self.reporter.message(f"step {st.step}: test " + ", ".join(
                f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        if cfg.eval_every_seconds:
            self.next_eval_seconds = (math.floor(st.train_seconds / cfg.eval_every_seconds) + 1) * cfg.eval_every_seconds

    def _steps(self) -> None:
        """Training steps until the budget is spent. A step only enqueues work: its loss and norms
        stay on the device until `flush`. Every decision that needs the ranks to agree (the budget,
        the learning rate, when to flush, evaluate and stop) depends on the step and on the values
        the ranks agree on after each step (`distributed.agree`: rank 0's clock, any rank's stop)
        or at a flush."""
        cfg, s, st = self.cfg, self.s, self.state
        every = cfg.eval_every_seconds
        self.next_eval_seconds = (math.floor(st.train_seconds / every) + 1) * every if every else math.inf
        order = batches(len(s.train_x), cfg.batch_size, cfg.seed, st.step)
        # The prefetch thread copies to the device unless the shift augmentation, which draws
        # from the CPU's RNG and runs on the CPU, still has to move the images.
        with Prefetch(s.train_x, order, depth=cfg.prefetch, device=s.device, to_device=not cfg.shift_augment,
                      select=lambda indices: distributed.shard(indices, self.world)) as data:
            self._step_loop(data)

    def _step_loop(self, data: Prefetch) -> None:
        cfg, s, st = self.cfg, self.s, self.state
        self.pending, self.log_window, self.stop_agreed = [], 0.0, False
        self.last_flush, self.flushed_seconds = time.perf_counter(), st.train_seconds
        while not self.done() and not self.stopping():
            tick = time.perf_counter()
            lr = self.lr_at(st.step, st.train_seconds)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if not self.world.main:
                # Its own dequantization noise, a function of the step alone, so a resumed run
                # draws what an uninterrupted one drew; rank 0's stream is the one checkpoints carry.
                torch.manual_seed(distributed.rank_seed(cfg.seed, self.world.rank, st.step))
            indices, batch = next(data)  # the global batch's indices, the same on every rank; this rank's share
            x, labels = batch.images, batch.labels
            if cfg.shift_augment:
                x = random_shift(x, cfg.shift_augment)
            if labels is not None and cfg.label_dropout:  # drawn for the global batch, cut to this rank's share
                labels = drop_labels(labels, cfg.label_dropout, s.num_classes, cfg.seed, st.step,
                                     (distributed.shard_start(len(indices), self.world), len(indices)))
            loss, terms, norms = self.train_step(x, len(indices), labels)
            values = torch.stack([loss.detach().float()] + [n.detach().float() for n in norms])
            st.step += 1
            st.images += len(indices)
            dt = time.perf_counter() - tick
            st.train_seconds += dt
            if self.world.size > 1:  # the ranks' clocks differ: rank 0's counts, on every rank
                st.train_seconds, self.stop_agreed = distributed.agree(
                    st.train_seconds, self.stop_agreed or self.stop.requested is not None)
            self.pending.append(PendingStep(st.step, lr, len(indices), dt, values,
                                            {n: t.detach() for n, t in terms.items()}))
            by_steps = cfg.eval_every and st.step % cfg.eval_every == 0
            checkpoint_due = cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
            # Wall time decides a flush only in a process of its own: ranks must flush together.
            by_clock = self.world.size == 1 and time.perf_counter() - self.last_flush >= self.flush_seconds
            if st.step % cfg.log_every == 0 or by_steps or checkpoint_due or by_clock:
                self.flush()
            by_time = cfg.eval_every_seconds and st.train_seconds >= self.next_eval_seconds
            if (by_steps or by_time) and not self.done():
                self.periodic_evaluation()
            if checkpoint_due:
                self.checkpoint()
        self.flush()

    def flush(self) -> None:
        """Reads the pending steps' losses and gradient norms back in one batch (the one host
        synchronisation of the loop), checks them in step order, and reports and logs each step as
        it would have been right after it. Under DDP all ranks flush after the same steps, and one
        all-reduce also gives them the mean loss and rank 0's window, its wait for the queued
        work included.

        The progress display gets the window's rate for each of its steps (its images over its
        seconds): on a GPU the steps only enqueue work and the wait at the flush is theirs together."""
        if not self.pending:
            return
        cfg, st = self.cfg, self.state
        pending, self.pending = self.pending, []
        tick = time.perf_counter()
        values = torch.stack([p.values for p in pending])  # (steps, 1 + norms)
        local = sum(p.seconds for p in pending)
        if self.world.size > 1:
            if self.s.device.type == "cuda":
                torch.cuda.synchronize(self.s.device)  # the window ends when its work has run
            window = local + time.perf_counter() - tick
            extra = torch.tensor([window if self.world.main else 0.0], dtype=torch.float64, device=values.device)
            flat = distributed.sum_over_ranks(torch.cat([values.double().flatten(), extra])).tolist()
            rows = [[v / self.world.size for v in flat[i : i + values.shape[1]]]
                    for i in range(0, values.numel(), values.shape[1])]
            window = flat[-1]
        else:
            rows = values.tolist()
            window = local + time.perf_counter() - tick  # the read waits for the queued work: training time
        self.last_flush = time.perf_counter()
        base, elapsed = self.flushed_seconds, 0.0
        rate = sum(p.images for p in pending) / max(window, 1e-9)
        for i, (p, row) in enumerate(zip(pending, rows, strict=True)):
            if not math.isfinite(row[0]):
                self.fail(p.step, f"the loss became {row[0]}", p.terms)
            if not all(math.isfinite(v) for v in row[1:]):
                names = list(self.groups) if len(row) - 1 == len(self.groups) else ["all parameters"]
                self.fail(p.step, "a gradient became NaN or Inf", {
                    n: torch.tensor([v]) for n, v in zip(names, row[1:], strict=True)})
            # The last step of the window takes the wait for the queued work (and on rank 0 of a
            # DDP run the difference to the agreed window), so the steps add up to the window.
            seconds = p.seconds + (window - local if i == len(pending) - 1 else 0.0)
            elapsed += seconds
            self.log_window += seconds
            st.recent = (st.recent + [row[0]])[-100:]
            self.reporter.step(p.step, {self.figure: row[0], "lr": p.lr, "images_per_s": rate,
                                        "train_seconds": base + elapsed})
            if p.step % cfg.log_every == 0:
                if self.world.main:
                    self.rundir.log({"step": p.step, f"train_{self.figure}": sum(st.recent[-cfg.log_every:]) / min(len(st.recent), cfg.log_every),
                                     "lr": p.lr, "images_per_s": cfg.log_every * p.images / max(self.log_window, 1e-9),
                                     "train_seconds": round(base + elapsed, 3)})
                self.log_window = 0.0
        st.train_seconds = self.flushed_seconds = base + window
