"""``step:realnvp``: one coupling layer of RealNVP, the coupling then a normalisation of its output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowkit import PartRef, Sequential, Transform, hookimpl, param, part_field

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class RealNVPStepParams:
    coupling: PartRef = part_field(
        "coupling", {"use": "affine", "scale_fn": "scaled_tanh", "net": {"use": "realnvp_resnet"}},
        "the coupling (RealNVP: affine, exp(a tanh(s)) with a learned a, a residual net)")
    actnorm: bool = param(True, "normalise the coupling's output (where RealNVP has its batch norm, actnorm)")


class RealNVPStep(Sequential):
    r"""A RealNVP coupling layer: ``coupling -> actnorm``.

    tensorflow/models research/real_nvp (``masked_conv_aff_coupling``, ``conv_ch_aff_coupling``)
    ends each coupling with a batch normalisation of its output (``bn_out``), a flow layer with
    log-det ``-½ Σ log(σ² + ε)`` over the transformed entries. Batch statistics make an image's
    density depend on the rest of its batch and the inverse inexact, so flowkit puts actnorm
    there, on every entry (data-dependent initialisation, then learned; Glow's replacement).

    .. math:: \log|\det J| = \log|\det J_\text{coupling}| + H W \sum_c \text{log\_scale}_c

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017 (section 3.7).

    Example:
        >>> import flowkit
        >>> step = flowkit.build("step", "realnvp", in_shape=(4, 8, 8),
        ...                      coupling={"net": {"use": "realnvp_resnet", "hidden": 8, "blocks": 1}})
    """

    def __init__(
        self, params: RealNVPStepParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any
    ) -> None:
        shapes = {"in_shape": tuple(in_shape), "context_shape": context_shape}
        parts: list[Transform] = [build(params.coupling, **shapes)]
        if params.actnorm:
            parts.append(build(PartRef("transform", "actnorm"), **shapes))
        super().__init__(parts, context_shape=context_shape)
        self.in_shape = tuple(in_shape)


@hookimpl
def flowkit_register_steps(register: Any) -> None:
    register("realnvp", RealNVPStep, params=RealNVPStepParams,
             summary="RealNVP coupling layer: a coupling, then actnorm where the reference has batch norm")
