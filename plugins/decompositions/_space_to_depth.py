"""Space-to-depth by a factor f and its inverse: the one implementation that ``squeeze`` (f = 2)
and ``patchify`` (f = p) share.

Two channel orders of the ``f x f`` block of pixel ``(i, j)`` of channel ``c``:

- channel first: ``s[:, c f² + i f + j, h, w] = x[:, c, f h + i, f w + j]``, torch's
  ``F.unfold(x, f, stride=f)`` (TarFlow's ``patchify``) and, at f = 2, openai/glow's ``squeeze2d``;
- pixel first: ``s[:, (i f + j) C + c, h, w]``, ``tf.space_to_depth`` on NHWC (Flow++'s released
  ``SpaceToDepth``) and big_vision's ``einops.rearrange(x, "b (h hp) (w wp) c -> b (h w) (hp wp c)")``
  (Jet's patches).

Both are permutations of the entries: log|det| = 0.
"""

from __future__ import annotations

from torch import Tensor

from flowkit.errors import ShapeError


def check_blocks(owner: str, shape: tuple[int, ...], factor: int, *, batched: bool) -> None:
    """Raises `ShapeError` unless ``shape`` is ``(B, C, H, W)`` (or ``(C, H, W)``) with H and W
    multiples of ``factor``."""
    layout = "(B, C, H, W)" if batched else "(C, H, W)"
    if len(shape) != (4 if batched else 3):
        raise ShapeError(f"{owner} expects an input of shape {layout}, but got a tensor of shape {tuple(shape)}.")
    height, width = shape[-2], shape[-1]
    if height < factor or width < factor or height % factor or width % factor:
        raise ShapeError(
            f"{owner} cuts the image into {factor}x{factor} blocks, so H and W must be multiples of {factor}, but "
            f"got shape {tuple(shape)} (H={height}, W={width}); crop or pad the image, or choose another factor."
        )


def space_to_depth(x: Tensor, factor: int, *, pixel_first: bool = False) -> Tensor:
    """``(B, C, H, W) -> (B, f²C, H/f, W/f)`` in the order of the module docstring."""
    batch, channels, height, width = x.shape
    f = factor
    s = x.reshape(batch, channels, height // f, f, width // f, f)
    # (B, c, h, i, w, j) -> channel first (B, c, i, j, h, w) or pixel first (B, i, j, c, h, w)
    s = s.permute(0, 3, 5, 1, 2, 4) if pixel_first else s.permute(0, 1, 3, 5, 2, 4)
    return s.reshape(batch, f * f * channels, height // f, width // f)


def depth_to_space(s: Tensor, factor: int, *, pixel_first: bool = False) -> Tensor:
    """``(B, f²C, h, w) -> (B, C, f h, f w)``, the inverse of `space_to_depth`."""
    batch, depth, height, width = s.shape
    f = factor
    if s.dim() != 4 or depth % (f * f):
        raise ShapeError(f"depth to space by {f} expects a tensor of shape (B, {f * f}C, h, w), but got shape "
                         f"{tuple(s.shape)}.")
    channels = depth // (f * f)
    if pixel_first:
        x = s.reshape(batch, f, f, channels, height, width).permute(0, 3, 4, 1, 5, 2)
    else:
        x = s.reshape(batch, channels, f, f, height, width).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(batch, channels, f * height, f * width)
