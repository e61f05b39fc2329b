"""The training loop: warm-up, clipping per parameter group, budgets, checkpoints, resume.

Exact resume: the data order is a function of (seed, epoch), the dequantization noise comes
from the global torch RNG whose state is checkpointed, and the learning rate is a function of
the step, so ``--resume`` continues the same trajectory as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from flowkit.errors import TrainingError
from flowkit.runs.checkpoint import latest_checkpoint, latest_step, load_checkpoint, save_checkpoint
from flowkit.runs.evaluate import evaluate
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import Session
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


def batches(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[torch.Tensor]:
    """Index batches of a fresh permutation per epoch, from step ``start_step`` on."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b in range(index, per_epoch):
            yield perm[b * batch_size : (b + 1) * batch_size]
        step = (epoch + 1) * per_epoch


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    cls = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return cls(groups, lr=lr, weight_decay=weight_decay)


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


class Trainer:
    """Trains a `Session`'s model and dequantizer, writing into a `RunDir`."""

    def __init__(self, session: Session, rundir: RunDir, reporter: Reporter | None = None) -> None:
        self.s = session
        self.rundir = rundir
        self.reporter = reporter or SilentReporter()
        self.cfg = session.recipe.train
        self.objective = session.objective
        self.groups, self.parts = self._select_groups()
        self.optimizer = make_optimizer(
            self.cfg.optimizer, [{"params": p, "name": n} for n, p in self.groups.items()],
            self.cfg.lr, self.cfg.weight_decay,
        )
        self.state = TrainState()
        self.term_threads: TermThreads | None = None  # only while train() runs
        self.next_eval_seconds = math.inf  # train.eval_every_seconds: when the next curve point is due

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
        return TermThreads(self.s.model, threads, lambda terms: self.objective.bits_per_dim(terms, 0.0).mean())

    # -- budget and schedule ------------------------------------------------------------
    def lr_at(self, step: int, elapsed: float) -> float:
        cfg = self.cfg
        scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.decay == "cosine":
            progress = step / cfg.steps if cfg.steps else elapsed / (cfg.minutes * 60)
            scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr * scale

    def done(self) -> bool:
        cfg, st = self.cfg, self.state
        return bool((cfg.steps and st.step >= cfg.steps) or (cfg.minutes and st.train_seconds >= cfg.minutes * 60))

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self) -> None:
        tensors = {"torch_rng": torch.get_rng_state()}
        if self.s.device.type == "cuda":
            tensors["cuda_rng"] = torch.cuda.get_rng_state(self.s.device)
        st = self.state
        save_checkpoint(self.rundir.checkpoints, st.step, self.s.modules(), self.optimizer, tensors,
                        {"train_seconds": st.train_seconds, "images": st.images, "recent": st.recent})

    def resume(self) -> None:
        path = latest_checkpoint(self.rundir.checkpoints)
        tensors, state = load_checkpoint(path, self.s.modules(), self.optimizer, self.s.device)
        torch.set_rng_state(tensors["torch_rng"])
        if "cuda_rng" in tensors and self.s.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["cuda_rng"], self.s.device)
        self.state = TrainState(state["step"], state["train_seconds"], state["images"], list(state["recent"]))
        self.reporter.message(f"Resumed from {path} at step {self.state.step}.")

    @torch.no_grad()
    def initialize(self) -> None:
        """Data-dependent initialisation (actnorm) on a seeded random batch."""
        n = min(self.cfg.init_batch_size, len(self.s.train_x))
        idx = torch.randperm(len(self.s.train_x), generator=torch.Generator().manual_seed(self.cfg.seed))[:n]
        x = self.s.train_x[idx].to(self.s.device)
        self.s.dequantizer.initialize(x, self.s.n_bits)
        y, _ = self.objective.dequantize(x)
        self.s.model.initialize(y)

    # -- the loop ----------------------------------------------------------------------
    def backward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (mean bits/dim, detached) and terms of a batch; gradients accumulated. The loss is
        the whole image's bits/dim, or train.level's term alone over its own dimensions."""
        if self.term_threads is None:
            loss, terms = self.objective.loss(x, self.parts)
            loss.backward()
            return loss.detach(), terms
        y, log_q = self.objective.dequantize(x)
        terms = self.term_threads.backward(y)
        return self.objective.bits_per_dim(terms, log_q).mean(), terms

    def fail(self, step: int, what: str, terms: dict[str, torch.Tensor]) -> None:
        bad = [n for n, t in terms.items() if not torch.isfinite(t).all()] or list(terms)
        pointer = self.rundir.checkpoints / "latest.json"
        kept = f"the last good checkpoint is kept in {self.rundir.checkpoints}" if pointer.exists() \
            else "no checkpoint had been written yet"
        message = f"{what} at step {step} in {', '.join(bad)}; training stopped and {kept}."
        self.rundir.log({"step": step, "error": message})
        self.rundir.write_summary({**self.rundir.read_summary(), "status": "failed", "error": message})
        raise TrainingError(message)

    def train(self, *, resume: bool = False) -> None:
        cfg, s, st = self.cfg, self.s, self.state
        if resume:
            self.resume()
            st = self.state
        else:
            self.initialize()
        self.reporter.start(cfg.steps or None, cfg.minutes * 60 or None, st.step)
        s.model.train()
        s.dequantizer.train()
        self.term_threads = self._term_threads()
        try:
            self._steps()
        finally:  # a failed run, too, gives back torch's thread count and the pool's threads
            if self.term_threads is not None:
                self.term_threads.close()
                self.term_threads = None
        if latest_step(self.rundir.checkpoints) != self.state.step:  # a periodic one may have saved it
            self.checkpoint()
        self.reporter.finish()

    def periodic_evaluation(self) -> None:
        """The test bits/dim during training, on the first ``eval_images`` test images (a fixed
        subset and fixed noise, so points of a curve are comparable), logged with the step, the
        training seconds and the images seen; its own time is not training time."""
        cfg, s, st = self.cfg, self.s, self.state
        x = s.test_x[: cfg.eval_images] if cfg.eval_images else s.test_x
        with self.term_threads.all_cores() if self.term_threads else contextlib.nullcontext():
            result = evaluate(s, x, batch_size=cfg.eval_batch_size, seed=cfg.seed + 1,
                              alone=self.parts[0] if self.parts else None)
        self.rundir.log({"step": st.step, "train_seconds": round(st.train_seconds, 3), "images": st.images,
                         "eval_images": len(x), **{f"test_{k}": v for k, v in result.items()}})
        self.reporter.message(f"step {st.step}: test " + ", ".join(
            f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        if cfg.eval_every_seconds:
            self.next_eval_seconds = (math.floor(st.train_seconds / cfg.eval_every_seconds) + 1) * cfg.eval_every_seconds

    def _steps(self) -> None:
        """Training steps until the budget is spent."""
        cfg, s, st = self.cfg, self.s, self.state
        every = cfg.eval_every_seconds
        self.next_eval_seconds = (math.floor(st.train_seconds / every) + 1) * every if every else math.inf
        data = batches(len(s.train_x), cfg.batch_size, cfg.seed, st.step)
        window = 0.0
        while not self.done():
            tick = time.perf_counter()
            lr = self.lr_at(st.step, st.train_seconds)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x = s.train_x[next(data)].to(s.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss, terms = self.backward(x)
            norms = [torch.nn.utils.clip_grad_norm_(p, cfg.grad_clip or float("inf")) for p in self.groups.values()]
            values = torch.stack([loss.detach().float()] + [n.float() for n in norms]).tolist()
            if not math.isfinite(values[0]):
                self.fail(st.step + 1, f"the loss became {values[0]}", terms)
            if not all(math.isfinite(v) for v in values[1:]):
                self.fail(st.step + 1, "a gradient became NaN or Inf", {
                    n: torch.tensor([v]) for n, v in zip(self.groups, values[1:], strict=True)})
            self.optimizer.step()
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            st.step += 1
            st.images += len(x)
            dt = time.perf_counter() - tick
            st.train_seconds += dt
            window += dt
            st.recent = (st.recent + [values[0]])[-100:]
            metrics = {"bpd": values[0], "lr": lr, "images_per_s": len(x) / max(dt, 1e-9),
                       "train_seconds": st.train_seconds}
            self.reporter.step(st.step, metrics)
            if st.step % cfg.log_every == 0:
                self.rundir.log({"step": st.step, "train_bpd": sum(st.recent[-cfg.log_every:]) / min(len(st.recent), cfg.log_every),
                                 "lr": lr, "images_per_s": cfg.log_every * len(x) / max(window, 1e-9),
                                 "train_seconds": round(st.train_seconds, 3)})
                window = 0.0
            by_steps = cfg.eval_every and st.step % cfg.eval_every == 0
            by_time = cfg.eval_every_seconds and st.train_seconds >= self.next_eval_seconds
            if (by_steps or by_time) and not self.done():
                self.periodic_evaluation()
            if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                self.checkpoint()
