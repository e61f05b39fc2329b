"""Data-dependent initialisation of a net's convolutions and linear layers (Flow++'s nets).

aravindsrinivas/flowpp ``flows/flows.py`` (``conv2d``, ``dense`` with ``vcfg.init``): on the
first batch each layer's output ``y = W x`` (no bias yet) is standardised per output channel,
``W <- W * s``, ``b <- -mean * s`` with ``s = init_scale / sqrt(var + 1e-8)``, layer by layer in
the order the forward pass reaches them, each layer seeing its inputs already initialised.
Layers meant to start at exactly zero (a `VectorContext`) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DDI_SCALE = "ddi_scale"  # attribute of a layer whose init_scale is not 1 (Flow++'s 0.1 output layers)


def mark(layer: nn.Module, scale: float) -> nn.Module:
    """Sets the scale `data_dependent_init` gives the layer's output."""
    setattr(layer, DDI_SCALE, scale)
    return layer


@torch.no_grad()
def _standardise(layer: nn.Conv2d | nn.Linear, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.view(-1, *([1] * (out.dim() - 2))) if isinstance(layer, nn.Conv2d) else layer.bias
    y = out - bias
    dims = [d for d in range(y.dim()) if d != (1 if isinstance(layer, nn.Conv2d) else y.dim() - 1)]
    mean, var = y.mean(dim=dims), y.var(dim=dims, unbiased=False)
    scale = getattr(layer, DDI_SCALE, 1.0) / torch.sqrt(var + 1e-8)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.view(shape))
    layer.bias.copy_(-mean * scale)
    view = (-1, *([1] * (out.dim() - 2))) if isinstance(layer, nn.Conv2d) else (-1,)
    return (y - mean.view(view)) * scale.view(view)


@torch.no_grad()
def data_dependent_init(net: nn.Module, forward: Callable[[], Any], skip: tuple[type, ...] = ()) -> None:
    """Runs ``forward()`` once with every conv and linear layer of ``net`` (with a bias, outside
    modules of the types in ``skip``) standardising its output and keeping the scale."""
    skipped = {id(m) for s in net.modules() if isinstance(s, skip) for m in s.modules()}
    layers = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None
              and id(m) not in skipped]
    handles = [layer.register_forward_hook(_standardise) for layer in layers]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
