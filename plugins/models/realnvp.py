"""Model ``realnvp``: RealNVP's multi-scale architecture (Dinh, Sohl-Dickstein & Bengio, ICLR 2017)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowkit import Copies, Derive, PartRef, ShapeError, hookimpl, param, part_field
from flowkit.models import (
    Entry,
    LayoutFlow,
    LayoutModel,
    Logit,
    OneLatentLevel,
    Split,
    Squeeze,
    Step,
    Unsqueeze,
)

Shape = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class RealNVPParams:
    scales: int = param(2, "scales: each but the last 3 checkerboard steps, squeeze, 3 channel steps, factor out "
                           "half; the last 4 checkerboard steps (the paper's CIFAR-10 model: 2)")
    hidden: int = param(64, "feature maps of the first scale's checkerboard nets (base_dim), doubled per scale and "
                            "in the channel steps")
    checkerboard_step: PartRef = part_field(
        "step", {"use": "realnvp", "coupling": {"use": "affine", "scale_fn": "scaled_tanh", "scale_init": 0.0,
                                                 "mask_channel": True, "net": {"use": "realnvp_resnet", "in_gain": 2.0}}},
        "each checkerboard step (masked_conv_aff_coupling): its mask, parity and width are derived")
    channel_step: PartRef = part_field(
        "step", {"use": "realnvp", "coupling": {"use": "affine", "scale_fn": "scaled_tanh", "scale_init": 1.0,
                                                 "net": {"use": "realnvp_resnet"}}},
        "each channel step (conv_ch_aff_coupling): its mask, parity and width are derived")
    squeeze: PartRef = part_field("decomposition", "squeeze", "space to depth before the channel steps (squeeze_2x2)")
    factor_squeeze: PartRef = part_field(
        "decomposition", {"use": "squeeze", "order": "realnvp"},
        "space to depth before each factor-out, whose kept half is a checkerboard (squeeze_2x2_ordered)")
    split_prior: PartRef = part_field("prior", "gaussian", "prior of each factored-out half (N(0, I))")
    top_prior: PartRef = part_field("prior", "gaussian", "prior of the last latent (N(0, I))")
    logit_alpha: float = param(0.05, "preprocessing z = logit(alpha + (1 - 2 alpha) y); RealNVP uses 0.05")

    def __post_init__(self) -> None:
        # 16 scales halve an image 15 times: far beyond any image size; the bound keeps a typo finite.
        if not 1 <= self.scales <= 16 or self.hidden < 1:
            raise ValueError(f"scales = {self.scales} must be in 1..16 and hidden = {self.hidden} >= 1.")
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha = {self.logit_alpha} must be in [0, 0.5).")

    def copies(self) -> dict[str, Copies]:
        """Per scale s, three checkerboard steps of alternating parity (four at the last scale)
        with nets ``hidden * 2^s`` wide, and three channel steps of alternating parity, twice as
        wide (real_nvp_multiscale_dataset.py, rec_masked_conv_coupling: coupling_0..3 and 4..6)."""
        scales = range(self.scales)
        checker = [(s, parity) for s in scales for parity in ((0, 1, 0, 1) if s == self.scales - 1 else (0, 1, 0))]
        channel = [(s, parity) for s in scales[:-1] for parity in (0, 1, 0)]

        def rules(steps: list[tuple[int, int]], mask: str, width: int) -> Copies:
            return Copies(len(steps), (
                Derive("coupling", "mask", (mask,) * len(steps), f"{mask} steps"),
                Derive("coupling", "parity", tuple(p for _, p in steps), "alternates within a scale"),
                Derive("net", "hidden", tuple(width * self.hidden * 2**s for s, _ in steps),
                       f"model.hidden{' * 2' if width == 2 else ''} * 2^scale"),
            ))

        return {"checkerboard_step": rules(checker, "checkerboard", 1), "channel_step": rules(channel, "channel", 2)}


class RealNVP(OneLatentLevel, LayoutModel):
    r"""RealNVP: logit preprocessing, then per scale coupling steps and a factor-out of half the
    dimensions, each with an N(0, I) prior.

    A scale but the last is three checkerboard steps (alternating parity), a squeeze, three
    channel steps (alternating parity), an unsqueeze, and a squeeze in RealNVP's order after
    which the second half of the channels (the pixels with odd :math:`i + j`) is factored out;
    the last scale is four checkerboard steps. Every step is an affine coupling
    ``z = (x + t) exp(a tanh(s))`` with a residual net (``net:realnvp_resnet``), then actnorm
    where the reference has batch normalisation (``step:realnvp``). With the terms
    ``level1 .. level{scales-1}`` and ``top``,

    .. math::

        \log p(y) = \sum_{l} \Big[ \log|\det J_l| + \log \mathcal{N}(z_l; 0, I) \Big],

    where the first level's log-det includes the logit's. The model lists these entries
    (`layout`); the shared walker, `flowkit.models.LayoutFlow`, builds and walks them.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017
        (sections 3.3 to 3.6, 4.1); tensorflow/models research/real_nvp
        (real_nvp_multiscale_dataset.py, real_nvp_utils.py).
    """

    def __init__(self, params: RealNVPParams, *, in_shape: Shape, build: Callable[..., Any],
                 context_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
        # A vector context (a class one-hot) reaches every step, hence every coupling net.
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        _, height, width = self.in_shape
        factor = 2 ** (params.scales - 1)
        if height % factor or width % factor:
            raise ShapeError(f"realnvp with scales = {params.scales} halves the image {params.scales - 1} times, so "
                             f"height and width must be divisible by {factor}; got {height}x{width}.")
        self.params = params
        self.flow = LayoutFlow(self.layout(params, build, self.context_shape), in_shape=self.in_shape,
                               prior=params.top_prior, build=build, top="top", name="realnvp",
                               context_shape=self.context_shape)

    @staticmethod
    def layout(params: RealNVPParams, build: Callable[..., Any],
               context_shape: tuple[int, ...] | None = None) -> list[Entry]:
        """What RealNVP stacks, data side first (the class docstring)."""
        checker = iter(build.copies(params, "checkerboard_step"))
        channel = iter(build.copies(params, "channel_step"))
        layout: list[Entry] = [Step(Logit(params.logit_alpha, context_shape))]
        for scale in range(1, params.scales):
            layout += [Step(next(checker)) for _ in range(3)] + [Squeeze(params.squeeze)]
            layout += [Step(next(channel)) for _ in range(3)] + [Unsqueeze(params.squeeze)]
            layout += [Squeeze(params.factor_squeeze), Split(params.split_prior, term=f"level{scale}")]
        return layout + [Step(next(checker)) for _ in range(4)]


@hookimpl
def flowkit_register_models(register: Any) -> None:
    register("realnvp", RealNVP, params=RealNVPParams, contexts=("vector",),
             summary="RealNVP: checkerboard and channel affine couplings, multi-scale factor-outs, N(0, I) priors")
