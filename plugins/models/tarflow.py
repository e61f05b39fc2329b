"""Model ``tarflow``: TarFlow (Zhai et al., ICML 2025), autoregressive flows over image patches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowkit import Copies, Derive, PartRef, hookimpl, param, part_field
from flowkit.models import LayoutFlow, LayoutModel, Rescale, Squeeze, Step
from flowkit.params import MAX_COPIES

Shape = tuple[int, int, int]

#: TarFlow's ``Model.VAR_LR``: the rate of the EMA of the latent's second moment (nvp = false).
VAR_RATE = 0.1


@dataclass(frozen=True, kw_only=True)
class TarFlowParams:
    blocks: int = param(4, "autoregressive flow blocks (TarFlow's blocks; its train.py default 4), each a copy of step")
    nvp: bool = param(True, "affine blocks (TarFlow's nvp, its default) or shift-only blocks with a second moment of "
                            "the latent tracked for sampling (nvp = false)")
    patchify: PartRef = part_field("decomposition", {"use": "patchify", "patch": 4},
                                   "the image into a grid of p x p patches, the blocks' tokens (TarFlow: unfold order)")
    step: PartRef = part_field(
        "step", "tarflow", "each block (step:tarflow: causal transformer, shift by one token, affine); its order "
        "(identity, flip, identity, ...) and nvp are derived")
    prior: PartRef = part_field("prior", "gaussian", "the latent's density: N(0, I), as TarFlow's loss 0.5 z^2")

    def __post_init__(self) -> None:
        if not 1 <= self.blocks <= MAX_COPIES:
            raise ValueError(f"blocks = {self.blocks} must be in 1..{MAX_COPIES}.")

    def copies(self) -> dict[str, Copies]:
        """One step per block: the token order alternates identity, flip (TarFlow's
        ``permutations[i % 2]``), and every block has the model's ``nvp``."""
        return {"step": Copies(self.blocks, (
            Derive("step", "order", tuple("identity" if i % 2 == 0 else "flip" for i in range(self.blocks)),
                   "alternates block by block"),
            Derive("step", "nvp", (self.nvp,) * self.blocks, "model.nvp"),
        ))}


class TarFlow(LayoutModel):
    r"""TarFlow: images to ``[-1, 1)``, patches as tokens, then ``blocks`` autoregressive affine
    flows (`flowkit_plugins`' ``step:tarflow``), the token order reversed every other block, and
    N(0, I) on the latent:

    .. math::

        \log p(y) = \log \mathcal{N}(z; 0, I) + D \log 2 - \sum_{k} \sum_{t, d} a^{(k)}_{t, d}

    (``D log 2`` is the map to ``[-1, 1)``; each block's log-det is ``-Σ a``). The layout is
    ``Rescale(2, -1)``, ``patchify``, the blocks, walked by `flowkit.models.LayoutFlow`.

    Differences from apple/ml-tarflow ``transformer_flow.py`` (``Model``) that decide a figure:
    its log-det is a mean per dimension and its loss ``0.5 z² - logdet`` a mean without the
    Gaussian's constant; flowkit sums to a per-image log-density. Its ``var`` is no density term:
    with ``nvp = false`` it is an exponential moving average (rate 0.1) of the latent's second
    moment per entry, updated by every training pass and used only to scale the latent when
    sampling (``x = z sqrt(var)``), as here (the buffer ``var``); the density stays N(0, I), as
    in the reference's loss. With ``nvp = true`` (the reference's default and every preset's)
    ``var`` stays 1.

    Conditioning: a vector context (a class one-hot, `flowkit.models.conditional`) reaches every
    block's net, which adds its projection to every token; guidance mixes each block's net outputs.

    References:
        Zhai et al., "Normalizing Flows are Capable Generative Models", ICML 2025;
        github.com/apple/ml-tarflow (``transformer_flow.py``, ``train.py``, ``train_local.ipynb``).
    """

    def __init__(self, params: TarFlowParams, *, in_shape: Shape, build: Callable[..., Any],
                 context_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        self.nvp = params.nvp
        layout = [Step(Rescale(2.0, -1.0, self.context_shape)), Squeeze(params.patchify)]
        layout += [Step(ref) for ref in build.copies(params, "step")]
        self.flow = LayoutFlow(layout, in_shape=self.in_shape, prior=params.prior, build=build, top="total",
                               name="tarflow", context_shape=self.context_shape)
        self.register_buffer("var", torch.ones(self.flow.out_shape))

    def log_prob_parts(self, y: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        if not (self.training and not self.nvp and torch.is_grad_enabled()):
            return self.flow.log_prob_parts(y, context)
        # nvp = false, training: the same terms, and the EMA of z² (TarFlow's update_prior).
        (z,), logabsdet = self.flow.encode(y, context)
        with torch.no_grad():
            self.var.lerp_(z.detach().square().mean(0).to(self.var.dtype), VAR_RATE)
        prior_context = context if self.flow.prior.context_shape is not None else None
        return {"total": logabsdet + self.flow.prior.log_prob(z, prior_context)}

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        if self.nvp:
            return self.flow.sample(n, temperature, context)
        z = self.flow.draw_top(n, temperature, context) * self.var.sqrt().to(self.var.dtype)
        return self.flow.decode([z], context)[0]


@hookimpl
def flowkit_register_models(register: Any) -> None:
    register("tarflow", TarFlow, params=TarFlowParams, contexts=("vector",),
             summary="TarFlow: autoregressive affine flows over patch tokens, causal transformers, order flipped "
                     "block by block")
