"""Independent terms trained concurrently: Wavelet Flow's levels, in threads of one process.

Wavelet Flow's point is that log p(x) = log p(I_0) + Σ log p(D_j | I_j) is a sum of terms that
share no parameters, so the levels can be trained in parallel (Yu et al. 2020 train each on
its own GPU). On a few CPU cores the same independence pays off differently: torch's
intra-op threads speed up the tiny 7x7 and 14x14 convolutions of an MNIST-sized pyramid by
only ~1.2x on 2 cores, while running the levels side by side, each single-threaded, keeps
every core busy (the GIL is released inside each convolution).

Gradients do not depend on how terms are grouped: each parameter receives gradient from its
own term only, and a loss affine in ``Σ_t log p_t`` (bits/dim) splits into per-group losses
with the same gradients, so one backward per thread group is exactly the joint backward. The
terms are balanced over the threads by a timing of one forward and backward each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from flowkit.contracts.model import IndependentTerms


def balance(costs: dict[str, float], n: int) -> list[list[str]]:
    """Greedy longest-first assignment of terms to at most ``n`` groups of similar total cost."""
    groups: list[list[str]] = [[] for _ in range(min(n, len(costs)))]
    totals = [0.0] * len(groups)
    for name in sorted(costs, key=costs.get, reverse=True):
        k = totals.index(min(totals))
        groups[k].append(name)
        totals[k] += costs[name]
    return [g for g in groups if g]


class TermThreads:
    """Runs forward and backward of disjoint groups of a model's terms in a thread pool."""

    def __init__(self, model: IndependentTerms, threads: int, loss: Callable[[dict[str, Tensor]], Tensor],
                 terms: Callable[[Tensor, list[str], Tensor | None], dict[str, Tensor]] | None = None) -> None:
        """``loss(terms)``: the scalar loss of a group of terms, affine in their sum; ``terms(y, names,
        labels)`` computes them (default ``model.log_prob_terms``, unconditional; the trainer passes
        `Objective.terms`, which conditions on the labels and enters train.amp's autocast in the
        worker thread, where autocast state lives)."""
        self.model = model
        self.terms = terms or (lambda y, names, labels: model.log_prob_terms(y, names))
        self.threads = threads
        self.loss = loss
        # torch's thread count is process-wide: one per term thread while training, restored
        # by `close` for the evaluation, where large batches use the cores better.
        self.restore_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="flowkit-term")
        self.groups: list[list[str]] = []
        self.order: list[str] = []  # the model's term order, which `backward` returns

    def _term_backward(self, y: Tensor, names: list[str], labels: Tensor | None = None) -> dict[str, Tensor]:
        terms = self.terms(y, names, labels)
        self.loss(terms).backward()
        return {name: term.detach() for name, term in terms.items()}

    def plan(self, y: Tensor, labels: Tensor | None = None) -> list[list[str]]:
        """Times one forward and backward of each term on ``y`` and balances them over the threads.

        Leaves gradients behind: call before ``zero_grad``. Buffers (running state such as
        the crop generators) are restored, so planning does not change the trajectory and a
        resumed run, which plans again, continues exactly.
        """
        saved = {name: b.clone() for name, b in self.model.named_buffers()}
        self.order = list(self.model.part_dims())
        costs = {}
        for name in self.order:
            tick = time.perf_counter()
            self.pool.submit(self._term_backward, y, [name], labels).result()
            costs[name] = time.perf_counter() - tick
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(saved[name])
        self.groups = balance(costs, self.threads)
        return self.groups

    def backward(self, y: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Backward of every term (gradients accumulate as from the joint loss), each conditioned on
        ``labels`` where the model is; returns the terms."""
        if not self.groups:
            self.plan(y, labels)
            self.model.zero_grad(set_to_none=True)
        futures = [self.pool.submit(self._term_backward, y, names, labels) for names in self.groups]
        terms: dict[str, Tensor] = {}
        for future in futures:
            terms.update(future.result())
        return {name: terms[name] for name in self.order}

    @contextlib.contextmanager
    def all_cores(self) -> Iterator[None]:
        """torch's own thread count for a while (a periodic evaluation), then one again."""
        torch.set_num_threads(self.restore_threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        torch.set_num_threads(self.restore_threads)
