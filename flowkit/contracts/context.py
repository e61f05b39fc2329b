"""The two forms of context a conditioned part accepts, and how a net takes a vector.

A part built with ``context_shape`` is called with a context of shape ``(B, *context_shape)``
(`flowkit.contracts.transform` states the rules of presence and batch size). The shape says
which of two forms it is:

- **spatial**, ``(Cc, H, W)`` with the height and width of the part's input: a map that varies
  over pixels, such as the features of Wavelet Flow's low-pass image. A net usually
  concatenates it to its input.
- **vector**, ``(Cz,)``: one vector per image, the same at every pixel, such as the global
  latent z of the VAE-flow (Ma et al. 2021). A net adds a linear projection of it to a hidden
  feature map, ``h + W z`` broadcast over pixels (the reference code's ``global_linear``),
  with ``W`` zero-initialised so that a net built with a vector context computes, at
  initialisation, exactly what the same net without context computes: `VectorContext`.

Every part of a kind listed with both forms in `flowkit.kinds.KINDS` (``contexts``) accepts
either (nets, couplings, steps, transforms, priors); a coupling or step hands the context to
its net unchanged, which is how any coupling, a third-party one included, can be conditioned
on a global latent. A model that has both a spatial map and a vector concatenates the vector,
broadcast over pixels, to the map, and hands its parts one spatial context.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from flowkit.errors import ShapeError

Shape = tuple[int, ...]
ContextForm = Literal["spatial", "vector"]


def context_form(context_shape: Shape | None, in_shape: Shape, part: str) -> ContextForm | None:
    """``"spatial"``, ``"vector"`` or ``None`` (no context) for a part with input ``in_shape =
    (C, H, W)``; a `ShapeError` naming ``part`` for any other shape."""
    if context_shape is None:
        return None
    shape = tuple(int(s) for s in context_shape)
    if len(shape) == 1 and shape[0] >= 1:
        return "vector"
    if len(shape) == 3 and shape[0] >= 1 and shape[1:] == tuple(in_shape[1:]):
        return "spatial"
    _, height, width = in_shape
    raise ShapeError(
        f"{part} accepts a context of shape (Cc,) (a vector) or (Cc, {height}, {width}) (a map with the "
        f"same height and width as its input), got {shape}."
    )


class VectorContext(nn.Module):
    r"""A vector context as a per-image offset of a hidden feature map: ``z (B, Cz) -> W z + b``
    of shape ``(B, channels, 1, 1)``, to be added to ``(B, channels, H, W)`` features.

    ``W`` and ``b`` start at zero, so a net with a vector context is, at initialisation, the same
    function of its input as the net without context; the gradient reaches ``W`` at once, and
    through it the encoder of z.

    References:
        Ma, Kong, Zhang & Hovy, "Decoupling Global and Local Representations via Invertible
        Generative Flows", ICLR 2021 (XuezheMax/wolf: ``GlobalLinearCondNet``, added to the
        coupling net's hidden features after its 1x1 convolution).
    """

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.linear = nn.Linear(self.dim, channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, z: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        out = self.linear(z.to(self.linear.weight.dtype))
        out = out[:, :, None, None]
        return out if dtype is None else out.to(dtype)
