"""Shared fixtures: a seeded RNG for every test and a fresh plugin manager on request."""

from __future__ import annotations

from collections.abc import Iterator

import os

import pytest
import torch
from hypothesis import settings

from flowkit.plugins import Plugins, make_plugins

# CI runs the same hypothesis examples every time, so a red CI is reproducible; locally,
# hypothesis keeps exploring new examples (and its database replays any failure it found).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

torch.set_num_threads(1)  # tiny tensors: more threads only add contention (xdist runs 2 workers)


@pytest.fixture(autouse=True)
def _seeded_rng() -> Iterator[None]:
    """Every test starts from seed 0, and its draws do not leak into the next test."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    # A session sets torch's thread count for the whole process (train.threads = 0: all cores);
    # give the next test in this worker its one thread back.
    torch.set_num_threads(1)


@pytest.fixture
def plugins() -> Plugins:
    """A new plugin manager per test, with every installed entry point (as pluggy's ``pm``)."""
    return make_plugins()
