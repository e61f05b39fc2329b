"""Contract tests run on one torch thread, whatever an earlier test in the worker left behind.

`flowkit.runs.session.build_session` calls ``torch.set_num_threads(os.cpu_count())`` and never
restores it, so after an in-process CLI test each xdist worker runs on every core, two workers
oversubscribe the machine, and OpenMP's spinning makes these float64 Jacobians 20 times slower.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
