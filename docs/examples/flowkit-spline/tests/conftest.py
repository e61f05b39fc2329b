"""One torch thread and a fixed seed per test: these tensors are tiny, and with several threads
(and other processes on the machine) OpenMP's spinning makes the float64 Jacobians ten times slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_seeded() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_num_threads(threads)
