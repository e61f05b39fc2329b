"""``model:flowpp``: the Flow++ architecture (Ho et al. 2019) assembled from registered parts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from flowkit import (
    Copies,
    DecompositionLayer,
    Derive,
    DensityModel,
    PartRef,
    Sequential,
    ShapeError,
    Transform,
    hookimpl,
    param,
    part_field,
)
from flowkit.contracts.transform import logdet_dtype, zeros_logabsdet

Shape = tuple[int, int, int]

#: Flow++ on CIFAR-10 (the official run_cifar.py): 4 checkerboard couplings, a squeeze,
#: 2 channel couplings, 3 checkerboard couplings; one Gaussian prior on the result.
CIFAR_LAYOUT = ("checkerboard",) * 4 + ("squeeze",) + ("channel",) * 2 + ("checkerboard",) * 3
LAYOUT_ITEMS = ("checkerboard", "columns", "channel", "squeeze")


@dataclass(frozen=True, kw_only=True)
class FlowPPParams:
    layout: tuple[str, ...] = param(
        CIFAR_LAYOUT, 'the steps in order: "checkerboard", "columns" or "channel" (a coupling step with that '
        'mask; "columns" is the even/odd column split of the released code) or "squeeze"'
    )
    step: PartRef = part_field(
        "step", {"use": "glow", "coupling": {"use": "mixlogistic"}}, "each coupling step: glow = actnorm, 1x1 conv, coupling (mixlogistic, or affine for the "
        "ablation); its coupling's mask and parity come from the layout"
    )
    squeeze: PartRef = part_field("decomposition", "squeeze", "space-to-depth at each squeeze of the layout")
    prior: PartRef = part_field("prior", "gaussian", "base distribution of the final latent")
    logit_alpha: float = param(0.05, "logit preprocessing: z = logit(alpha + (1 - 2 alpha) y), Flow++ uses 0.05")
    checkpoint: bool = param(False, "recompute each step in the backward pass (gradient checkpointing)")

    def __post_init__(self) -> None:
        bad = [item for item in self.layout if item not in LAYOUT_ITEMS]
        if bad or not any(item != "squeeze" for item in self.layout):
            raise ValueError(
                f"layout = {list(self.layout)} must list coupling steps from {', '.join(LAYOUT_ITEMS)}"
                + (f"; {bad[0]!r} is not one of them." if bad else ", with at least one coupling step.")
            )
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha = {self.logit_alpha} must be in [0, 0.5).")

    def copies(self) -> dict[str, Copies]:
        """One copy of ``step`` per coupling entry of the layout: its coupling's mask is the
        entry, and its parity alternates within a run of one mask (Flow++'s TupleFlip)."""
        masks, parities = [], []
        previous, parity = None, 0
        for item in self.layout:
            if item == "squeeze":
                previous = None
                continue
            parity = 1 - parity if item == previous else 0
            previous = item
            masks.append(item)
            parities.append(parity)
        return {"step": Copies(len(masks), (
            Derive("coupling", "mask", tuple(masks), "model.layout"),
            Derive("coupling", "parity", tuple(parities), "alternates within a run of one mask"),
        ))}


class LogitPreprocess(Transform):
    r"""``z = logit(α + (1 - 2α) y)``: images in [0, 1) to the real line (Flow++'s ImgProc).

    .. math:: \log|\det| = \sum_i \big[\log(1 - 2α) - \log p_i - \log(1 - p_i)\big],\ p = α + (1 - 2α) y
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        p = self.alpha + (1 - 2 * self.alpha) * x.to(logdet_dtype(x))
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        logabsdet = (math.log1p(-2 * self.alpha) - log_p - log_1mp).flatten(1).sum(1)
        return (log_p - log_1mp).to(x.dtype), logabsdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        zf = z.to(logdet_dtype(z))
        x = (torch.sigmoid(zf) - self.alpha) / (1 - 2 * self.alpha)
        log_deriv = F.logsigmoid(zf) + F.logsigmoid(-zf) - math.log1p(-2 * self.alpha)
        return x.to(z.dtype), log_deriv.flatten(1).sum(1)


class FlowPP(DensityModel):
    r"""Flow++: logit preprocessing, then coupling steps and squeezes, then a Gaussian prior.

    Each coupling step is a copy of ``step`` (default: a Glow step, actnorm -> invertible 1x1
    convolution -> coupling) whose coupling's ``mask`` is its layout entry; consecutive steps
    of one mask alternate the parity, as Flow++'s TupleFlip does (`FlowPPParams.copies`). ``log p(y) = log N(z) + Σ log|det|``
    where the first term of the sum is the logit preprocessing. There is no factoring-out of
    latents: the prior covers the whole squeezed latent, as in the paper's CIFAR-10 model.

    With ``checkpoint`` each step's activations are recomputed in the backward pass
    (`torch.utils.checkpoint`, non-reentrant; dropout masks are replayed), so the memory of a
    training step is one step's activations plus the step inputs.

    With the default step (a Glow step) actnorm is per channel and the 1x1 convolution acts on
    the whole image; the official code's step (per position and channel, one matrix per half)
    is ``step:flowpp``, which the ``paper`` preset uses with the released split (``"columns"``)
    and squeeze order (``squeeze.order = "space_to_depth"``).

    References:
        Ho et al., "Flow++", ICML 2019; github.com/aravindsrinivas/flowpp, flows/run_cifar.py.
    """

    def __init__(self, in_shape: Shape, params: FlowPPParams, build: Any) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.checkpoint = params.checkpoint
        transforms: list[Transform] = [LogitPreprocess(params.logit_alpha)]
        shape = self.in_shape
        steps = iter(build.copies(params, "step"))
        for index, item in enumerate(params.layout):
            c, h, w = shape
            if item == "squeeze":
                if h % 2 or w % 2:
                    raise ShapeError(f"layout[{index}] squeezes a ({c}, {h}, {w}) image; height and width must be even.")
                layer = DecompositionLayer(build(params.squeeze), shape)
                transforms.append(layer)
                shape = layer.out_shape
                continue
            transforms.append(build(next(steps), in_shape=shape, context_shape=None))
        self.latent_shape = shape
        self.flow = Sequential(transforms)
        self.prior = build(params.prior, in_shape=shape, context_shape=None)

    @classmethod
    def from_params(cls, params: FlowPPParams, *, in_shape: Shape, build: Any) -> FlowPP:
        """Flow++: logistic-mixture couplings with attention nets, checkerboard and channel masks."""
        return cls(in_shape, params, build)

    def _check(self, y: Tensor) -> None:
        if y.dim() != 4 or tuple(y.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise ShapeError(f"Flow++ expected images of shape (B, {c}, {h}, {w}), got {tuple(y.shape)}.")

    def encode(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, Σ log|det|)``: the latent of images ``y`` in [0, 1) and the flow's log-det."""
        self._check(y)
        if self.flow.recompute and torch.is_grad_enabled():
            # train.memory = "recompute": the whole chain at once (`Sequential.forward`), so the
            # memory for backward is one step's, not one output per step as the loop keeps.
            return self.flow(y)
        z, total = y, zeros_logabsdet(y)
        recompute = self.checkpoint and torch.is_grad_enabled()
        for transform in self.flow.transforms:
            if recompute and isinstance(transform, Sequential):
                z, logabsdet = checkpoint(transform, z, use_reentrant=False)
            else:
                z, logabsdet = transform(z)
            total = total + logabsdet
        return z, total

    def log_prob_parts(self, y: Tensor) -> dict[str, Tensor]:
        z, logabsdet = self.encode(y)
        return {"total": self.prior.log_prob(z) + logabsdet}

    def part_dims(self) -> dict[str, int]:
        c, h, w = self.in_shape
        return {"total": c * h * w}

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        z = self.prior.sample(n, temperature=temperature)
        return self.flow.inverse(z)[0]

    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """Data-dependent initialisation (actnorm) of every step, in order, on the batch ``y``."""
        self._check(y)
        self.flow.initialize(y)


@hookimpl
def flowkit_register_models(register: Any) -> None:
    register("flowpp", FlowPP.from_params, params=FlowPPParams,
             summary="Flow++: logistic-mixture couplings, attention nets, checkerboard and channel steps")
