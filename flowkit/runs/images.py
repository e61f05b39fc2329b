"""PNG grids and strips of images (Pillow; no matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_levels(y: Tensor, n_bits: int) -> Tensor:
    """Continuous images in [0, 1) → the data level each value falls in, 0..2^n_bits - 1, as a
    float tensor on the CPU (the inverse of dequantization, y = (x + u) / 2^n_bits)."""
    levels = 2**n_bits
    return torch.clamp(torch.floor(y.detach().float().cpu() * levels), 0, levels - 1)


def to_uint8(y: Tensor, n_bits: int) -> np.ndarray:
    """Continuous images in [0, 1) → the nearest data level, shown on 0..255. (N,C,H,W) → NHWC."""
    levels = 2**n_bits
    q = to_levels(y, n_bits)
    pixels = torch.round(q * (255.0 / (levels - 1))).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = images[i]
    return canvas


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> Path:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
