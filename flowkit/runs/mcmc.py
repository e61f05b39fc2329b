r"""Annealed sampling by MCMC, as Wavelet Flow does: level by level, coarse to fine, a No-U-Turn
sampler in the latent space of each level.

At temperature T, with γ = 1/T², a level's target is its conditional density raised to γ,
p(part | given)^γ, pulled back to the level's latent z through the invertible map z -> part:

.. math::

    \log \pi(z) = γ \log p_\text{base}(z) + (1 - γ) \log\Big|\det \frac{\partial\,\text{part}}{\partial z}\Big|
        + \text{const},

because log p(part) = log p_base(z) − log|det ∂part/∂z| and the change of variables back to z
adds log|det ∂part/∂z| once. flowkit's log-det here is that of the latent-to-data map
(`Transform.inverse`); the authors' code writes the same target with the data-to-latent log-det
``ldj`` as ``gamma*ld_base + (gamma-1)*ldj``. At T = 1 the target is p_base(z), the distribution
plain sampling draws from; below 1 it sharpens the density of the image part, not only the latent.

Each level is annealed given the coarser levels already drawn, as the authors do; the product
of the annealed conditionals is not p(x)^γ, whose per-level normalisers depend on the coarser image.

The sampler is pyro's NUTS (multinomial, max tree depth 10) with dual-averaging step-size
adaptation aiming at acceptance 0.6 and no mass-matrix adaptation, started, like the
authors' chain, from a plain draw at temperature T. The ``n`` images of a call run as one chain
on their joint latent (n independent targets): one batched inverse per leapfrog step instead of
n, with one step size for all (the authors run one chain per image). The result is the chain's
last state.

References:
    Yu, Derpanis, Brubaker. "Wavelet Flow", NeurIPS 2020 (annealed sampling by MCMC).
    YorkUCVIL/Wavelet-Flow: src/models/shared/Single_scale_flow.py (``sample_latent_mcmc``:
    γ = 1/T², the target, NUTS with max tree depth 10, DualAveragingStepSizeAdaptation at 0.60)
    and src/scripts/mcmc_sample.py (step 0.01, 10 adaptation and 30 further iterations).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from flowkit.contracts.model import LatentLevel, LatentLevels
from flowkit.errors import FlowkitError
from flowkit.runs.rundir import grid_name, write_json_atomic

if TYPE_CHECKING:
    from flowkit.runs.session import Session

#: The acceptance probability the step-size adaptation aims at (the authors' target_accept_prob).
TARGET_ACCEPT = 0.6


@dataclass(frozen=True)
class MCMCSettings:
    """NUTS settings; the defaults are the authors' (see the module docstring).

    ``warmup`` iterations adapt the step size, then ``samples`` iterations run at the adapted
    step; ``max_depth`` bounds a NUTS trajectory at 2^max_depth - 1 leapfrog steps.
    """

    warmup: int = 10
    samples: int = 30
    step: float = 0.01
    max_depth: int = 10

    def __post_init__(self) -> None:
        problems = []
        if self.warmup < 0:
            problems.append(f"--mcmc-warmup = {self.warmup} must be >= 0")
        if self.samples < 1:
            problems.append(f"--mcmc-samples = {self.samples} must be >= 1")
        if not self.step > 0:
            problems.append(f"--mcmc-step = {self.step} must be > 0")
        if self.max_depth < 1:
            problems.append(f"--mcmc-max-depth = {self.max_depth} must be >= 1")
        if problems:
            raise FlowkitError("Invalid MCMC settings: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class LevelReport:
    """How the chain of one level went."""

    level: str
    dims: int  #: latent dimensions of one image
    step_size: float  #: after adaptation
    accept_prob: float  #: mean acceptance probability of the sampling iterations (adapted towards 0.6)
    moved: float  #: share of the sampling iterations that moved the chain (pyro's "acceptance rate")
    divergences: int
    gradient_evals: int  #: each one inverse pass of the level and its backward: the cost
    seconds: float

    def summary(self) -> str:
        return (f"{self.level}: step size {self.step_size:.3g}, acceptance {self.accept_prob:.2f} "
                f"(moved {self.moved:.0%}), {self.divergences} divergent, "
                f"{self.gradient_evals} gradient evaluations, {self.seconds:.1f} s")


def require_latent_levels(model: Any, model_name: str) -> LatentLevels:
    """``model`` as a `LatentLevels`, or a `FlowkitError` naming it."""
    if not isinstance(model, LatentLevels):
        raise FlowkitError(
            f"model {model_name} cannot be sampled by MCMC: annealed sampling needs a latent density and an "
            f"invertible map per level (the LatentLevels capability of flowkit.contracts.model), which "
            f"{model_name} does not implement; wavelet_flow and multiscale do. Sample it without --mcmc."
        )
    return model


def check_can_anneal(temperatures: Sequence[float]) -> None:
    """Fails before any sampling when pyro is missing or a temperature is not positive."""
    _pyro()
    bad = [t for t in temperatures if not t > 0]
    if bad:
        raise FlowkitError(f"Annealed sampling needs temperatures > 0 (its target uses 1/T²), got {bad[0]:g}.")


def annealed_log_target(level: LatentLevel, gamma: float) -> Callable[[Tensor], Tensor]:
    """z -> log π(z) per image, (B,): γ·log p_base(z) + (1 − γ)·log|det ∂part/∂z|."""

    def log_target(z: Tensor) -> Tensor:
        generated = level.generate(z)
        return gamma * generated.log_prob + (1.0 - gamma) * generated.logabsdet

    return log_target


def _pyro() -> tuple[type, type]:
    """pyro's MCMC runner and a NUTS whose adaptation starts at the given step."""
    try:
        from pyro.infer.mcmc import MCMC, NUTS
    except ImportError as exc:
        raise FlowkitError(
            "Annealed sampling (--mcmc) needs pyro-ppl, an optional dependency: install the extra with "
            "pip install -e '.[mcmc]' (or pip install 'flowkit[mcmc]'); it pins pyro-ppl 1.9.*, which keeps "
            "torch at 2.13.0."
        ) from exc

    class StartAtStepNUTS(NUTS):
        # pyro first doubles or halves the step until one leapfrog step crosses an acceptance
        # threshold; TFP's DualAveragingStepSizeAdaptation, the authors', starts at the given step.
        def _find_reasonable_step_size(self, z: dict[str, Tensor]) -> float:
            return self.step_size

    return MCMC, StartAtStepNUTS


def nuts(log_target: Callable[[Tensor], Tensor], initial: Tensor, settings: MCMCSettings,
         name: str = "latent") -> tuple[Tensor, LevelReport]:
    """The last state of a NUTS chain on ``Σ log_target(z)`` started at ``initial``, and its report."""
    mcmc_cls, nuts_cls = _pyro()
    evaluations = 0

    def potential(params: dict[str, Tensor]) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        return -log_target(params["z"]).sum()

    kernel = nuts_cls(potential_fn=potential, step_size=settings.step, adapt_step_size=True,
                      adapt_mass_matrix=False, target_accept_prob=TARGET_ACCEPT, max_tree_depth=settings.max_depth)
    state: dict[str, Any] = {}

    def record(kernel: Any, params: dict[str, Tensor], stage: str, i: int) -> None:
        # The kernel resets its statistics when the run ends: read them after the last iteration.
        # _mean_accept_prob is the running mean over the sampling iterations (pyro 1.9, pinned).
        if stage == "Sample" and i == settings.samples - 1:
            state.update(kernel.diagnostics(), step_size=kernel.step_size, accept_prob=kernel._mean_accept_prob)

    chain = mcmc_cls(kernel, num_samples=settings.samples, warmup_steps=settings.warmup,
                     initial_params={"z": initial.detach().clone()}, hook_fn=record, disable_progbar=True)
    start = time.perf_counter()
    with torch.enable_grad():
        chain.run()
    z = chain.get_samples()["z"][-1]
    return z, LevelReport(
        level=name, dims=initial[0].numel(), step_size=float(state["step_size"]),
        accept_prob=float(state["accept_prob"]), moved=float(state["acceptance rate"]),
        divergences=len(state["divergences"]), gradient_evals=evaluations,
        seconds=time.perf_counter() - start,
    )


def annealed_sample(model: LatentLevels, n: int, temperature: float, settings: MCMCSettings, *,
                    given: Tensor | None = None, levels: Sequence[str] | None = None,
                    on_level: Callable[[float, LevelReport], None] | None = None,
                    ) -> tuple[Tensor, list[LevelReport]]:
    """``n`` images sampled level by level at ``temperature``, each level's latent by NUTS on its
    annealed target; and one report per level, also given to ``on_level(temperature, report)``
    as each level ends. ``given`` and ``levels`` start part-way (for super-resolution: the
    low-pass image and the levels that remain)."""
    check_can_anneal([temperature])
    gamma = 1.0 / temperature**2
    names = model.latent_levels() if levels is None else list(levels)
    if not names:
        raise FlowkitError("Annealed sampling was given no level to sample.")
    reports = []
    for name in names:
        with torch.no_grad():
            level = model.latent_level(name, given, n)
            initial = level.draw(temperature)
        z, report = nuts(annealed_log_target(level, gamma), initial, settings, name)
        with torch.no_grad():
            given = level.generate(z).out
        reports.append(report)
        if on_level is not None:
            on_level(temperature, report)
    return cast(Tensor, given), reports  # a level ran, so given is its output


def annealed_grids(session: Session, out_dir: Path, *, n: int, temperatures: Sequence[float], seed: int,
                   settings: MCMCSettings, prefix: str = "sample-mcmc",
                   on_level: Callable[[float, LevelReport], None] | None = None,
                   ) -> tuple[list[Path], dict[str, int], dict[str, list[LevelReport]]]:
    """`sample_grids` with annealed sampling: ``<prefix>-T<temperature>.png`` (and ``.npy``), plus
    ``<prefix>-T<temperature>.json`` with the settings and each level's report (``on_level``:
    see `annealed_sample`)."""
    from flowkit.runs.sampling import sample_grids

    model = require_latent_levels(session.model, session.recipe.model.use)
    check_can_anneal(temperatures)
    reports: dict[str, list[LevelReport]] = {}

    def draw(temperature: float) -> Tensor:
        y, reports[f"T{temperature:g}"] = annealed_sample(model, n, temperature, settings, on_level=on_level)
        return y

    paths, overflowed = sample_grids(session, out_dir, n=n, temperatures=tuple(temperatures), seed=seed,
                                     prefix=prefix, draw=draw)
    for temperature in temperatures:
        key = f"T{temperature:g}"
        write_report(out_dir / grid_name(prefix, temperature, ".json"), temperature=temperature, n=n, seed=seed, settings=settings,
                     levels=reports[key], overflowed=overflowed[key])
    return paths, overflowed, reports


def write_report(path: Path, *, temperature: float, levels: Sequence[LevelReport], settings: MCMCSettings,
                 **extra: Any) -> Path:
    """The JSON written next to an annealed sample's PNG."""
    record = {"temperature": temperature, "gamma": 1.0 / temperature**2, **extra,
              "settings": {**asdict(settings), "target_accept_prob": TARGET_ACCEPT},
              "levels": [asdict(report) for report in levels]}
    write_json_atomic(path, record)
    return path
