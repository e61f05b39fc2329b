"""Which entries of an image condition a coupling and which are transformed: the masks.

Public, for built-in and third-party couplings alike (the spline example uses `checkerboard`).
`flowkit.nn.coupling.MaskedCoupling` applies them. Three masks split an input ``(B, C, H, W)``:

- ``channel``: the channels in two halves, the first ``C // 2`` and the rest. ``parity=0``
  transforms the second half given the first (Glow's ``z2`` given ``z1``); ``parity=1`` the
  reverse. The net sees the conditioning half only. With ``factor = f > 0`` the second part is
  the last ``C // f`` channels instead (MaCow's split-prior coupling, ``NICE(factor=f)``).
- ``checkerboard``: pixels ``(i, j)`` with ``(i + j) % 2 == parity`` condition, the others are
  transformed (RealNVP). The net sees the masked input ``x * mask`` with all ``C`` channels.
- ``columns``: the columns ``j`` with ``j % 2 == parity`` condition, the others are transformed:
  what Flow++'s released ``CheckerboardSplit`` does (aravindsrinivas/flowpp ``flows/flows.py``:
  it pairs columns ``2m, 2m + 1`` in every row, so the halves are the even and the odd columns,
  not a checkerboard). Otherwise as ``checkerboard``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Shape = tuple[int, ...]
MaskKind = Literal["channel", "checkerboard", "columns"]
SPATIAL_MASKS = ("checkerboard", "columns")  # a pattern over the pixels; every channel on both sides


def checkerboard(height: int, width: int, parity: int) -> Tensor:
    """A ``(1, 1, H, W)`` bool mask, true where ``(i + j) % 2 == parity`` (the conditioning pixels)."""
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    return ((rows + cols) % 2 == parity).view(1, 1, height, width)


def columns(height: int, width: int, parity: int) -> Tensor:
    """A ``(1, 1, H, W)`` bool mask, true in the columns ``j`` with ``j % 2 == parity`` (the conditioning pixels)."""
    cols = torch.arange(width).view(1, -1).expand(height, -1)
    return (cols % 2 == parity).view(1, 1, height, width)


def spatial_mask(kind: str, height: int, width: int, parity: int) -> Tensor:
    """The ``(1, 1, H, W)`` conditioning pixels of a spatial mask ``kind`` (`SPATIAL_MASKS`)."""
    return (checkerboard if kind == "checkerboard" else columns)(height, width, parity)


def check_factor(factor: int) -> None:
    """Range check of the channel mask's ``factor`` (0: halves)."""
    if factor < 0 or factor == 1:
        raise ValueError(f"factor = {factor} must be 0 (halves) or >= 2 (the last C // factor channels).")


FACTOR_DOC = ("channel mask: 0 splits the channels in halves; f >= 2 makes the last C // f channels the second part "
              "(MaCow's split-prior coupling)")


def check_parity(parity: int) -> None:
    """Range check shared by the coupling Params (a ValueError, reported by the recipe loader)."""
    if parity not in (0, 1):
        raise ValueError(f"parity = {parity} must be 0 or 1.")
