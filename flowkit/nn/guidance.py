r"""Classifier-free guidance of a class-conditional flow, as one wrapper around each net and prior.

TarFlow (apple/ml-tarflow, ``transformer_flow.py``, ``MetaBlock.reverse``) samples with guidance
by mixing each autoregressive step's conditional and unconditional parameters,
``h = h_c + w (h_c - h_u)``. For a coupling flow the same rule applies to every coupling net's
output: a class-conditional build (`flowkit.build.Builder` with a `Guidance`) puts `GuidedNet`
around every net and `GuidedPrior` around every prior, so no coupling, step or model has code of
its own for it.

How a guided draw runs: the model samples a doubled batch, the first half with the class's
context and the second with "no class" (`flowkit.models.conditional`). While `Guidance.weight`
is set, each `GuidedNet` computes its output for both halves, mixes them by the rule above and
returns the mixture for both, and each `GuidedPrior` draws the same noise for both halves and
mixes the two draws the same way: for a Gaussian, ``z = μ + T σ ε`` is linear in ``(μ, σ)``, so
mixing draws made from one ``ε`` is drawing from the mixed parameters
``μ_c + w (μ_c - μ_u)``, ``σ_c + w (σ_c - σ_u)``. The two halves therefore stay equal all the
way down, and everything computed from the context (a Wavelet Flow level's conditioning
features) is computed with each half's own class. ``w = 0`` is conditional sampling.

A guided sample has no exact density: the mixed parameters define no normalised model of the
data, and the run engine never reports a likelihood for one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from flowkit.contracts.prior import Prior
from flowkit.errors import ShapeError


class Guidance:
    """The guidance weight shared by the wrappers of one model; ``None``: not guiding (training,
    evaluation, plain conditional sampling), the wrappers pass everything through."""

    def __init__(self) -> None:
        self.weight: float | None = None

    @contextlib.contextmanager
    def guiding(self, weight: float) -> Iterator[None]:
        """While the block runs, every wrapper mixes the halves of its batch with ``weight``."""
        previous, self.weight = self.weight, float(weight)
        try:
            yield
        finally:
            self.weight = previous

    def mix(self, both: Tensor) -> Tensor:
        """``both`` = [conditional half; unconditional half] -> the guided mixture, for both halves."""
        if both.shape[0] % 2:
            raise ShapeError(f"guided sampling runs a doubled batch (class, then no class); got a batch of "
                             f"{both.shape[0]}.")
        cond, uncond = both.chunk(2)
        mixed = cond + self.weight * (cond - uncond)
        return torch.cat([mixed, mixed])


class GuidedNet(nn.Module):
    """A net whose output is mixed across the halves of a guided batch (`Guidance.mix`); the
    net itself, unchanged, is ``self.net`` (its parameters live there).

    Keyword arguments reach the net unchanged, so a net's other calls are guided too: TarFlow's
    sequential inverse calls its causal transformer one position at a time with a key/value
    cache (``net(x_t, context, cache=cache)``), and each of those outputs is mixed like a whole
    pass's. The cache then holds the keys of both halves, each computed from the mixture."""

    def __init__(self, net: nn.Module, guidance: Guidance) -> None:
        super().__init__()
        self.net = net
        self.guidance = guidance

    def forward(self, x: Tensor, context: Tensor | None = None, **kwargs: object) -> Tensor:
        out = self.net(x, context, **kwargs)
        return out if self.guidance.weight is None else self.guidance.mix(out)

    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        init = getattr(self.net, "initialize", None)
        if init is not None:
            init(x, context)

    def __getattr__(self, name: str) -> object:
        # The wrapped net's own attributes (out_channels, in_shape, ...) read through the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)


class GuidedPrior(Prior):
    """A prior whose draws are mixed across the halves of a guided batch, from shared noise."""

    def __init__(self, prior: Prior, guidance: Guidance) -> None:
        super().__init__()
        self.prior = prior
        self.guidance = guidance
        self.shape = prior.shape
        self.context_shape = prior.context_shape

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.prior.log_prob(z, context)

    def mean(self, n: int, context: Tensor | None = None) -> Tensor:
        out = self.prior.mean(n, context)
        return out if self.guidance.weight is None else self.guidance.mix(out)

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        if self.guidance.weight is None:
            return self.prior.sample(n, context, temperature)
        if n % 2:
            raise ShapeError(f"guided sampling draws a doubled batch; got {n}.")
        half = n // 2
        halves = (None, None) if context is None else context.chunk(2)
        # One noise for both halves: replay the generators' state for the second draw.
        state = torch.random.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        cond = self.prior.sample(half, halves[0], temperature)
        torch.random.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        uncond = self.prior.sample(half, halves[1], temperature)
        return self.guidance.mix(torch.cat([cond, uncond]))

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("prior"), name)
