"""``flowkit bench``'s measurement: flowkit's training step, and with ``against`` a reference
implementation the model offers (nflows' Glow for multiscale), timed in alternating rounds in one
process."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowkit.bench.harness import Prepared, flowkit_contender, prepared, reference_contender
from flowkit.bench.likelihood import LikelihoodCheck, compare_log_likelihoods
from flowkit.bench.timing import Figures, measure
from flowkit.contracts.model import HasReferences
from flowkit.errors import FlowkitError, RecipeError
from flowkit.plugins import Plugins

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
    """Builds, initialises and times the recipe; with ``against`` also the reference of that name
    the model offers (`flowkit.contracts.model.HasReferences`: multiscale offers nflows' Glow),
    its weights copied from flowkit's after initialisation, checked to compute the same
    log-likelihood, and timed in alternating rounds."""
    if rounds < 1 or steps < 1:
        raise FlowkitError(f"--rounds {rounds} and --steps {steps} must be at least 1.")
    with prepared(path, plugins, preset=preset, overrides=overrides, shape=shape, batch=batch,
                  device=device) as prep:
        contenders = [flowkit_contender(prep)]
        check = None
        if against:
            model = prep.session.model
            check_reference(prep, against)  # before anything is timed
            reference = model.reference(against, prep.recipe.data.params.n_bits)
            fixed = torch.Generator().manual_seed(1)
            x = prep.batches[0][:CHECK_IMAGES].cpu()
            y = ((x.float() + torch.rand(x.shape, generator=fixed)) / 2.0**prep.recipe.data.params.n_bits)
            check = compare_log_likelihoods(model, reference, y.to(prep.session.device))
            contenders.append(reference_contender(against, reference, prep.recipe, prep.session.device))
        figures = measure(contenders, prep.batches, rounds=rounds, steps=steps)
        return BenchResult(str(path), preset or "", list(overrides), prep.shape, rounds, figures, check, machine())


def check_reference(prep: Prepared, name: str) -> None:
    """A `RecipeError` naming every reason the recipe's model has no reference ``name``: the model
    offers none of that name, or its configuration is one the reference does not compose, or a
    learned dequantizer (the reference dequantizes uniformly, so the two would train different
    objectives)."""
    recipe, session = prep.recipe, prep.session
    model = session.model
    if not isinstance(model, HasReferences) or name not in model.references():
        offered = ", ".join(model.references()) if isinstance(model, HasReferences) else "none"
        raise RecipeError(f'--against {name}: model.use = "{recipe.model.use}" offers no reference "{name}" '
                          f"(its references: {offered}).", recipe.source)
    problems = [f"--against {name}: {problem}" for problem in model.reference_problems(name)]
    if any(p.requires_grad for p in session.dequantizer.parameters()):
        problems.append(f'--against {name}: the reference dequantizes uniformly; dequantizer.use = '
                        f'"{recipe.dequantizer.use}" is learned. Use "uniform".')
    if problems:
        raise RecipeError(problems, recipe.source)
