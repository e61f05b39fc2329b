"""``model:flowpp``: the Flow++ architecture (Ho et al. 2019) assembled from registered parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from flowkit import Copies, Derive, PartRef, hookimpl, param, part_field
from flowkit.models import Entry, LayoutFlow, LayoutModel, Logit, Squeeze, Step, rename_state_dict_keys

if TYPE_CHECKING:
    from flowkit.contracts.prior import Prior

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


class FlowPP(LayoutModel):
    r"""Flow++: logit preprocessing, then coupling steps and squeezes, then a Gaussian prior.

    Each coupling step is a copy of ``step`` (default: a Glow step, actnorm -> invertible 1x1
    convolution -> coupling) whose coupling's ``mask`` is its layout entry; consecutive steps
    of one mask alternate the parity, as Flow++'s TupleFlip does (`FlowPPParams.copies`). ``log p(y) = log N(z) + Σ log|det|``
    where the first term of the sum is the logit preprocessing (`flowkit.models.Logit`). There
    is no factoring-out of latents: the prior covers the whole squeezed latent, as in the
    paper's CIFAR-10 model. The shared walker, `flowkit.models.LayoutFlow` (``self.flow``),
    builds and walks the layout.

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

    def __init__(self, params: FlowPPParams, *, in_shape: Shape, build: Any,
                 context_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        # A vector context (a class one-hot) reaches every step, hence every coupling net.
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        steps = iter(build.copies(params, "step"))
        layout: list[Entry] = [Step(Logit(params.logit_alpha, self.context_shape))]
        layout += [Squeeze(params.squeeze) if item == "squeeze" else Step(next(steps)) for item in params.layout]
        self.flow = LayoutFlow(layout, in_shape=self.in_shape, prior=params.prior, build=build, top="total",
                               name="Flow++", checkpoint=params.checkpoint, context_shape=self.context_shape)
        self.latent_shape = self.flow.out_shape
        # Checkpoints written before the walker (flow.transforms.<k>, prior) still load: the
        # transforms are those of the walker's one chain, in the same order.
        chain = self.flow.path(0).rsplit(".", 1)[0]  # "layers.0.transforms"
        rename_state_dict_keys(self, {"flow.transforms.": f"flow.{chain}.", "prior.": "flow.prior."})

    @property
    def prior(self) -> Prior:
        """The Gaussian prior of the latent."""
        return self.flow.prior

    def encode(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, Σ log|det|)``: the latent of images ``y`` in [0, 1) and the flow's log-det."""
        (z,), logabsdet = self.flow.encode(y, context)
        return z, logabsdet


@hookimpl
def flowkit_register_models(register: Any) -> None:
    register("flowpp", FlowPP, params=FlowPPParams, contexts=("vector",),
             summary="Flow++: logistic-mixture couplings, attention nets, checkerboard and channel steps")
