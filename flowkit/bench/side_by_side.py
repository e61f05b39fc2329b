"""``flowkit bench``'s measurement: flowkit's training step, and with ``against = "nflows"`` the
same Glow composed from nflows' transforms, timed in alternating rounds in one process."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowkit.bench.harness import flowkit_contender, nflows_contender, prepared
from flowkit.bench.nflows_glow import LikelihoodCheck, check_multiscale_glow, compare_log_likelihoods, nflows_glow
from flowkit.bench.timing import Figures, measure
from flowkit.errors import FlowkitError
from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe

#: Images of the fixed batch both log-likelihoods are compared on.
CHECK_IMAGES = 8


@dataclass
class BenchResult:
    """Everything ``flowkit bench`` prints, and writes with ``--json``."""

    recipe: str
    preset: str
    overrides: list[str]
    shape: tuple[int, int, int]
    rounds: int
    figures: list[Figures]
    check: LikelihoodCheck | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    def ratio(self, key: str) -> float | None:
        """flowkit's figure over nflows' (``key``: a `Figures` attribute), or None without both."""
        if len(self.figures) < 2:
            return None
        ours, theirs = (getattr(f, key) for f in self.figures[:2])
        return ours / theirs if ours and theirs else None

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "preset": self.preset, "overrides": self.overrides, "shape": list(self.shape),
                "rounds": self.rounds, "implementations": [f.to_dict() for f in self.figures],
                "train_speed_ratio": self.ratio("train_images_per_s"),
                "likelihood_check": self.check.to_dict() if self.check else None, "machine": self.machine}


def machine() -> dict[str, Any]:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host_cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_bench(path: str | Path, plugins: Plugins, *, preset: str | None = None, overrides: Sequence[str] = (),
              shape: tuple[int, int, int] | None = None, batch: int | None = None, device: str | None = None,
              against: str | None = None, rounds: int = 6, steps: int = 5) -> BenchResult:
    """Builds, initialises and times the recipe; with ``against = "nflows"`` also the same Glow
    from nflows' transforms, its weights copied from flowkit's after initialisation."""
    if against not in (None, "nflows"):
        raise FlowkitError(f'--against {against} is not known; the only reference is "nflows".')
    if rounds < 1 or steps < 1:
        raise FlowkitError(f"--rounds {rounds} and --steps {steps} must be at least 1.")
    if against:  # refuse before anything is built
        check_multiscale_glow(load_recipe(path, plugins.registries, preset=preset, overrides=overrides))
    with prepared(path, plugins, preset=preset, overrides=overrides, shape=shape, batch=batch,
                  device=device) as prep:
        contenders = [flowkit_contender(prep)]
        check = None
        if against:
            model = prep.session.model
            reference = nflows_glow(model, prep.recipe, prep.shape)
            fixed = torch.Generator().manual_seed(1)
            x = prep.batches[0][:CHECK_IMAGES].cpu()
            y = ((x.float() + torch.rand(x.shape, generator=fixed)) / 2.0**prep.recipe.data.params.n_bits)
            check = compare_log_likelihoods(model, reference, y.to(prep.session.device))
            contenders.append(nflows_contender(reference, prep.recipe, prep.session.device))
        figures = measure(contenders, prep.batches, rounds=rounds, steps=steps)
        return BenchResult(str(path), preset or "", list(overrides), prep.shape, rounds, figures, check, machine())
