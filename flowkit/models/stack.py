"""A stack of K flow steps, as every model assembles them."""

from __future__ import annotations

from typing import Any

from flowkit.contracts.transform import Sequential
from flowkit.params import PartRef, override_nested


def build_stack(build: Any, step: PartRef, depth: int, in_shape: tuple[int, ...],
                context_shape: tuple[int, ...] | None, *, alternate_parity: bool = True) -> Sequential:
    """``depth`` steps built from ``step``; couplings alternate ``parity`` step by step.

    Alternating parity matters when nothing mixes channels between couplings (a checkerboard
    coupling on a one-channel image, or ``invconv = "none"``): otherwise the same half would
    be transformed by every step.
    """
    steps = []
    for i in range(depth):
        ref = override_nested(step, "coupling", "parity", i % 2, build.default_params) if alternate_parity else step
        steps.append(build(ref, in_shape=tuple(in_shape), context_shape=context_shape))
    return Sequential(steps, context_shape=context_shape)
