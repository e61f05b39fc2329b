"""``model:flowpp``: the Flow++ architecture (Ho et al. 2019) assembled from registered parts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from flowkit import (
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
InvConvKind = Literal["lu", "plain", "none"]

#: Flow++ on CIFAR-10 (the official run_cifar.py): 4 checkerboard couplings, a squeeze,
#: 2 channel couplings, 3 checkerboard couplings; one Gaussian prior on the result.
CIFAR_LAYOUT = ("checkerboard",) * 4 + ("squeeze",) + ("channel",) * 2 + ("checkerboard",) * 3
LAYOUT_ITEMS = ("checkerboard", "channel", "squeeze")


@dataclass(frozen=True, kw_only=True)
class FlowPPParams:
    layout: tuple[str, ...] = param(
        CIFAR_LAYOUT, 'the steps in order: "checkerboard" or "channel" (a coupling step) or "squeeze"'
    )
    coupling: PartRef = part_field(
        "coupling", "mixlogistic", "coupling of every step (needs mask and parity params); affine for the ablation"
    )
    net: PartRef = part_field("net", "gated_resnet", "conditioner of every coupling (replaces the coupling's own)")
    prior: PartRef = part_field("prior", "gaussian", "base distribution of the final latent")
    actnorm: bool = param(True, "actnorm before each coupling")
    invconv: InvConvKind = param("lu", "invertible 1x1 conv before each coupling: LU, plain matrix, or none")
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


class Squeeze(Transform):
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``, space to depth (channel ``4c + 2i + j``); log-det 0."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), zeros_logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return F.pixel_shuffle(z, 2), zeros_logabsdet(z)


def build_step(
    build: Any, shape: tuple[int, ...], *, mask: str, parity: int, coupling: PartRef, net: PartRef, actnorm: bool,
    invconv: InvConvKind, context_shape: tuple[int, ...] | None = None,
) -> Sequential:
    """actnorm -> invertible 1x1 conv -> coupling, each built by reference."""
    parts = []
    if actnorm:
        parts.append(build(PartRef("transform", "actnorm"), in_shape=shape, context_shape=context_shape))
    if invconv != "none":
        ref = build.with_params(PartRef("transform", "invconv"), who="Flow++", lu=invconv == "lu")
        parts.append(build(ref, in_shape=shape, context_shape=context_shape))
    ref = build.with_params(coupling, optional=("net",), who="Flow++", mask=mask, parity=parity, net=net)
    parts.append(build(ref, in_shape=shape, context_shape=context_shape))
    return Sequential(parts, context_shape=context_shape)


class FlowPP(DensityModel):
    r"""Flow++: logit preprocessing, then coupling steps and squeezes, then a Gaussian prior.

    Each coupling step is actnorm, an invertible 1x1 convolution and a coupling (``coupling``
    with ``net`` as its conditioner, ``mask`` from ``layout``); consecutive steps of one mask
    alternate the parity, as Flow++'s TupleFlip does. ``log p(y) = log N(z) + Σ log|det|``
    where the first term of the sum is the logit preprocessing. There is no factoring-out of
    latents: the prior covers the whole squeezed latent, as in the paper's CIFAR-10 model.

    With ``checkpoint`` each step's activations are recomputed in the backward pass
    (`torch.utils.checkpoint`, non-reentrant; dropout masks are replayed), so the memory of a
    training step is one step's activations plus the step inputs.

    Differences from the official code: actnorm is per channel (theirs is per position and
    channel), and the 1x1 convolution acts on the whole image (theirs on each half).

    References:
        Ho et al., "Flow++", ICML 2019; github.com/aravindsrinivas/flowpp, flows/run_cifar.py.
    """

    def __init__(
        self, in_shape: Shape, *, layout: tuple[str, ...], coupling: PartRef, net: PartRef, prior: PartRef,
        actnorm: bool, invconv: InvConvKind, logit_alpha: float, checkpoint: bool, build: Any,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.checkpoint = checkpoint
        transforms: list[Transform] = [LogitPreprocess(logit_alpha)]
        shape = self.in_shape
        previous, parity = None, 0
        for index, item in enumerate(layout):
            c, h, w = shape
            if item == "squeeze":
                if h % 2 or w % 2:
                    raise ShapeError(f"layout[{index}] squeezes a ({c}, {h}, {w}) image; height and width must be even.")
                transforms.append(Squeeze())
                shape, previous = (4 * c, h // 2, w // 2), None
                continue
            parity = 1 - parity if item == previous else 0
            previous = item
            transforms.append(build_step(build, shape, mask=item, parity=parity, coupling=coupling, net=net,
                                         actnorm=actnorm, invconv=invconv))
        self.latent_shape = shape
        self.flow = Sequential(transforms)
        self.prior = build(prior, in_shape=shape, context_shape=None)

    @classmethod
    def from_params(cls, params: FlowPPParams, *, in_shape: Shape, build: Any) -> FlowPP:
        """Flow++: logistic-mixture couplings with attention nets, checkerboard and channel masks."""
        return cls(in_shape, layout=params.layout, coupling=params.coupling, net=params.net, prior=params.prior,
                   actnorm=params.actnorm, invconv=params.invconv, logit_alpha=params.logit_alpha,
                   checkpoint=params.checkpoint, build=build)

    def _check(self, y: Tensor) -> None:
        if y.dim() != 4 or tuple(y.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise ShapeError(f"Flow++ expected images of shape (B, {c}, {h}, {w}), got {tuple(y.shape)}.")

    def encode(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, Σ log|det|)``: the latent of images ``y`` in [0, 1) and the flow's log-det."""
        self._check(y)
        z, total = y, zeros_logabsdet(y)
        recompute = self.checkpoint and torch.is_grad_enabled()
        for transform in self.flow.transforms:
            if recompute and isinstance(transform, Sequential):
                z, logabsdet = checkpoint(transform, z, use_reentrant=False)
            else:
                z, logabsdet = transform(z)
            total = total + logabsdet
        return z, total

    def log_prob_parts(self, y: Tensor, parts: list[str] | None = None) -> dict[str, Tensor]:
        z, logabsdet = self.encode(y)
        return {"total": self.prior.log_prob(z) + logabsdet}

    def part_dims(self) -> dict[str, int]:
        c, h, w = self.in_shape
        return {"total": c * h * w}

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        z = self.prior.sample(n, temperature=temperature)
        y, _ = self.flow.inverse(z)
        return y.clamp(0.0, 1.0 - torch.finfo(y.dtype).eps)

    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """Data-dependent initialisation (actnorm) of every step, in order, on the batch ``y``."""
        self._check(y)
        self.flow.initialize(y)


@hookimpl
def flowkit_register_models(register: Any) -> None:
    register("flowpp", FlowPP.from_params, params=FlowPPParams,
             summary="Flow++: logistic-mixture couplings, attention nets, checkerboard and channel steps")
