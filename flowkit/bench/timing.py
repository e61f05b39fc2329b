"""Timing and memory of training steps, evaluation and sampling, implementations side by side.

Each implementation is a `Contender`: three callables (a training step on a batch, a
log-likelihood of a batch without gradients, a batch of samples; a model with more than one way
to sample, TarFlow's sequential and Jacobi inverses, adds the others by name) and its modules. `measure`
runs them in alternating rounds in one process (A, B, A, B, ...), because these machines are
noisy: a median can move 40% between runs, and only figures taken side by side compare. On
CUDA the timed regions are synchronised at their ends only; nothing inside a round waits.

Memory, measured on one training step after warm-up:

- CUDA: ``torch.cuda.max_memory_allocated`` during the step, less what the *other*
  contenders hold resident (so each figure counts its own model, optimiser state, activations
  and the batch);
- every device: the bytes autograd saves for backward in the forward pass of the training loss
  (`saved_for_backward`, on the step's first micro-batch), each storage counted once,
  parameters excluded: the activation memory that ``train.memory = "recompute"`` removes. The
  backward runs outside the count, so what recomputation saves there, one flow step at a time
  and freed at once, is not added up. On the CPU this is the memory figure (torch keeps no
  peak there).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Contender:
    """One implementation under test. ``train_loss``: the loss a training step differentiates, of
    a batch's first micro-batch, with autograd on (None: no saved-for-backward figure).
    ``sampler``: what ``sample`` does, in words (``sequential``: TarFlow's exact inverse);
    ``other_samplers``: more ways to sample, timed beside it (``jacobi``), by name."""

    name: str
    train_step: Callable[[Tensor], None]
    log_likelihood: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer | None = None
    dtype: str = "float32"
    compile: str = "off"
    train_loss: Callable[[Tensor], Tensor] | None = None
    sampler: str = ""
    other_samplers: dict[str, Callable[[int], Tensor]] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(p.numel() for m in self.modules for p in m.parameters())

    def held_bytes(self) -> int:
        """Bytes its parameters, gradients, buffers and optimiser state hold now (each storage once)."""
        tensors = [t for m in self.modules for t in (*m.parameters(), *m.buffers())]
        tensors += [p.grad for m in self.modules for p in m.parameters() if p.grad is not None]
        if self.optimizer is not None:
            tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def train_mode(self, mode: bool) -> None:
        for module in self.modules:
            module.train(mode)


@dataclass
class Figures:
    """What was measured of one contender; seconds per round, best = the fastest round."""

    name: str
    params: int
    batch: int
    steps: int  # training steps (and evaluation batches) per round
    sample_batches: int  # batches of ``batch`` samples per sampling round
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    sample_seconds: list[float] = field(default_factory=list)
    sampler: str = ""  # what sample_seconds time, in words ("" : the model's one way)
    other_sample_seconds: dict[str, list[float]] = field(default_factory=dict)  # by sampler name
    peak_memory_bytes: int | None = None  # CUDA only
    saved_bytes: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    compile: str = "off"
    threads: int = 1

    def _rate(self, seconds: list[float], per_round: int, pick: Callable[[list[float]], float]) -> float | None:
        return self.batch * per_round / pick(seconds) if seconds else None

    @property
    def train_images_per_s(self) -> float | None:
        return self._rate(self.train_seconds, self.steps, min)

    @property
    def train_images_per_s_median(self) -> float | None:
        return self._rate(self.train_seconds, self.steps, statistics.median)

    @property
    def ms_per_step(self) -> float | None:
        return 1000 * min(self.train_seconds) / self.steps if self.train_seconds else None

    @property
    def eval_images_per_s(self) -> float | None:
        return self._rate(self.eval_seconds, self.steps, min)

    @property
    def sample_images_per_s(self) -> float | None:
        return self._rate(self.sample_seconds, self.sample_batches, min)

    def other_sample_images_per_s(self, name: str) -> float | None:
        return self._rate(self.other_sample_seconds.get(name, []), self.sample_batches, min)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "params": self.params, "batch": self.batch, "steps_per_round": self.steps,
            "train_images_per_s": self.train_images_per_s, "train_images_per_s_median": self.train_images_per_s_median,
            "ms_per_step": self.ms_per_step, "eval_images_per_s": self.eval_images_per_s,
            "sample_images_per_s": self.sample_images_per_s, "sampler": self.sampler,
            **{f"sample_images_per_s_{name}": self.other_sample_images_per_s(name) for name in self.other_sample_seconds},
            "peak_memory_bytes": self.peak_memory_bytes,
            "saved_for_backward_bytes": self.saved_bytes, "device": self.device, "dtype": self.dtype,
            "compile": self.compile, "threads": self.threads, "train_round_seconds": self.train_seconds,
            "eval_round_seconds": self.eval_seconds, "sample_round_seconds": self.sample_seconds,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, run: Callable[[], object]) -> float:
    synchronize(device)
    tick = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - tick


def saved_for_backward(loss: Callable[[], Tensor], modules: Sequence[nn.Module]) -> int:
    """Bytes autograd saves for backward while ``loss`` computes the loss: each storage once,
    parameters excluded. The backward of that loss then runs outside the count: under
    recomputation (`flowkit.contracts.reversible`) it saves each flow step's activations again,
    one step at a time, which would otherwise be summed as if all were held at once."""
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a wrapper subclass)
            return t
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    value.backward()  # frees the graph as a step does; its gradients are the next step's to zero
    return sum(seen.values())


def _cuda_peak(device: torch.device, step: Callable[[], None], others: int) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device)) - others


class _Turns:
    """The batches in turn, round and round."""

    def __init__(self, batches: Sequence[Tensor]) -> None:
        self.batches, self.i = batches, 0

    def next(self) -> Tensor:
        self.i += 1
        return self.batches[self.i % len(self.batches)]


@contextlib.contextmanager
def _eval_mode(contenders: Sequence[Contender]) -> Iterator[None]:
    for c in contenders:
        c.train_mode(False)
    try:
        yield
    finally:
        for c in contenders:
            c.train_mode(True)


def measure(contenders: Sequence[Contender], batches: Sequence[Tensor], *, rounds: int, steps: int,
            sample_batches: int = 1, warmup: int = 1) -> list[Figures]:
    """Warm-up, memory, then ``rounds`` alternating rounds of ``steps`` training steps, of
    ``steps`` evaluation batches and of ``sample_batches`` sampling batches per contender.

    ``batches``: integer images already on the device, used in turn. A CUDA peak excludes
    what the other contenders hold at the time (`Contender.held_bytes`).
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds = {rounds} and steps = {steps} must be >= 1.")
    device = batches[0].device
    batch = len(batches[0])
    turn = _Turns(batches)
    figures = {c.name: Figures(c.name, c.params, batch, steps, sample_batches, device=str(device), dtype=c.dtype,
                               compile=c.compile, threads=torch.get_num_threads(), sampler=c.sampler,
                               other_sample_seconds={name: [] for name in c.other_samplers}) for c in contenders}
    for c in contenders:
        c.train_mode(True)
        for _ in range(warmup):
            c.train_step(turn.next())
        fig = figures[c.name]
        if device.type == "cuda":
            others = sum(o.held_bytes() for o in contenders if o is not c)
            fig.peak_memory_bytes = _cuda_peak(device, lambda c=c: c.train_step(turn.next()), others)
        if c.train_loss is not None:
            fig.saved_bytes = saved_for_backward(lambda c=c: c.train_loss(turn.next()), c.modules)
    for _ in range(rounds):
        for c in contenders:
            figures[c.name].train_seconds.append(
                _timed(device, lambda c=c: [c.train_step(turn.next()) for _ in range(steps)]))
    with torch.no_grad(), _eval_mode(contenders):
        for c in contenders:  # warm-up
            c.log_likelihood(turn.next())
            c.sample(batch)
            for other in c.other_samplers.values():
                other(batch)
        for _ in range(rounds):
            for c in contenders:
                figures[c.name].eval_seconds.append(
                    _timed(device, lambda c=c: [c.log_likelihood(turn.next()) for _ in range(steps)]))
            for c in contenders:
                figures[c.name].sample_seconds.append(
                    _timed(device, lambda c=c: [c.sample(batch) for _ in range(sample_batches)]))
                for name, other in c.other_samplers.items():
                    figures[c.name].other_sample_seconds[name].append(
                        _timed(device, lambda other=other: [other(batch) for _ in range(sample_batches)]))
    return [figures[c.name] for c in contenders]


def train_images_per_s(step: Callable[[Tensor], None], batches: Sequence[Tensor], *, warmup: int = 2,
                       min_seconds: float = 2.0, min_steps: int = 3, max_steps: int = 50) -> tuple[float, int]:
    """One contender alone (the GPU suite's rows): after ``warmup`` steps, ``min_steps`` steps
    estimate the step time, then enough steps for ``min_seconds`` (``min_steps`` to
    ``max_steps``) are timed in one synchronised region. Returns images/s and the steps timed."""
    device = batches[0].device
    turn = _Turns(batches)
    for _ in range(warmup):
        step(turn.next())
    estimate = _timed(device, lambda: [step(turn.next()) for _ in range(min_steps)]) / min_steps
    n = max(min_steps, min(max_steps, math.ceil(min_seconds / max(estimate, 1e-9))))
    seconds = _timed(device, lambda: [step(turn.next()) for _ in range(n)])
    return len(batches[0]) * n / seconds, n


def host_syncs(step: Callable[[Tensor], None], batches: Sequence[Tensor], steps: int = 2) -> str | None:
    """None when ``steps`` training steps on CUDA make no host synchronisation, else the first
    one torch reports (``torch.cuda.set_sync_debug_mode("error")``). Run after warm-up."""
    device = batches[0].device
    if device.type != "cuda":
        raise ValueError("host_syncs needs a CUDA device: host synchronisation is a CUDA notion.")
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(steps):
            step(batches[i % len(batches)])
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    synchronize(device)
    return None
