"""Bits per dimension, exactly.

For integer images x with K = 2^n_bits levels, dequantized to y = (x + u) / K in [0, 1)^D
with u ~ q(u | x), the model's continuous density p(y) gives the bound (Theis et al. 2016;
Ho et al. 2019, eq. 4)

    log P(x) >= E_q[ log p(y) - D log K - log q(u | x) ],

and we report bits/dim = -(that bound) / (D log 2) = (-log p(y) + D log K + log q) / (D log 2).
Uniform dequantization has log q = 0. This is an upper bound on the discrete model's
bits/dim (the number papers report as "bits/dim"); with k importance samples the bound
tightens (Flow++'s reported figures).

Only noise that stays in each integer's bin gives that bound. A dequantizer whose noise leaves
the bin (``figure = "noisy_nll"``: Gaussian noise augmentation) makes the same arithmetic the
negative log-likelihood of the noisy image ``K y`` in bits per dimension, a continuous density
of other data; the run engine names it ``noisy_nll`` wherever it names the bound ``bpd``
(`figure_key`), so it is never reported as the images' bits/dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


#: The key of a run's figure in metrics.jsonl, summary.json, reports and evaluation results, by
#: the dequantizer's ``figure`` (`flowkit.contracts.dequantizer`), and its name in words.
FIGURE_KEYS = {"bits_per_dim": "bpd", "noisy_nll": "noisy_nll"}
FIGURE_NAMES = {"bits_per_dim": "bits/dim", "noisy_nll": "noisy-data NLL"}


def figure_key(figure: str) -> str:
    """``"bpd"`` for the dequantized bound, ``"noisy_nll"`` for noisy images (module docstring)."""
    return FIGURE_KEYS[figure]


def nats_to_bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Nats over ``num_dims`` dimensions as bits per dimension: ``nats / (D log 2)``."""
    return nats / (num_dims * math.log(2.0))


def bits_per_dim_to_nats(bpd: Tensor | float, num_dims: int) -> Tensor | float:
    """The inverse of `nats_to_bits_per_dim`: ``bpd * D log 2``."""
    return bpd * (num_dims * math.log(2.0))


def discrete_nll(log_p: Tensor, num_dims: int, n_bits: int, log_q: Tensor | float = 0.0) -> Tensor:
    """The dequantized bound on -log P(x) in nats: ``-log p(y) + D log 2^n_bits + log q(u | x)``,
    for the continuous density ``log_p`` of y = (x + u) / 2^n_bits over ``num_dims`` dims."""
    return -log_p + log_q + num_dims * n_bits * math.log(2.0)


def bits_per_dim(log_p: Tensor, num_dims: int, n_bits: int, log_q: Tensor | float = 0.0) -> Tensor:
    """Per-image bits/dim of the dequantized bound (the module docstring): `discrete_nll` in bits
    per dimension."""
    return nats_to_bits_per_dim(discrete_nll(log_p, num_dims, n_bits, log_q), num_dims)


def reduce_bits(x: Tensor, n_bits: int, max_value: int = 255) -> Tensor:
    """uint8 images with values 0..max_value → integers 0..2^n_bits - 1 (Glow's 5-bit data)."""
    if n_bits == 8 and max_value == 255:
        return x
    levels = 2**n_bits
    return torch.div(x.long() * levels, max_value + 1, rounding_mode="floor").to(torch.uint8)
