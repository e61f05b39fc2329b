"""Wavelet Flow against a reference built from its maths, with PyWavelets for the pyramid.

The module docstring of plugins/models/wavelet_flow.py states the model:

    log p(x) = log p(I_0) + Σ_{j=1..L} log p(D_{j-1} | I_{j-1}),  x = y - 1/2,

with an orthonormal DWT (log-det 0), where each flow models its variable divided by the DC
gain of its level, 2 per 2-D level: I_0 (L levels below x) by 2^L, D_{j-1} (split from I_j,
L - j levels below x) by g_j = 2^(L-j), so each term carries -D_j log g_j; the context of
level j is I_{j-1} divided by its own gain 2^(L-j+1).

The reference runs the generative direction: latents drawn from each level's prior, each
level's flow inverted coarse to fine, the result multiplied by its gain, and the pyramid
merged with ``pywt.idwt2(..., mode="periodization")`` per channel (not flowkit's DWT). Then
by the change of variables each term is

    log p_j = log π_j(z_j | ctx_j) - log|det ∂f_j⁻¹/∂z_j| - D_j log g_j,

and `log_prob_parts` of the image must give exactly these. A wrong gain moves a term by
D_j log 2, a band in the wrong channel or a context at the wrong scale by far more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt
import torch

import flowkit
from flowkit.testing import randomize_

C, SIDE, LEVELS = 2, 8, 2
TINY = {"levels": LEVELS, "depth": [2], "hidden": [8], "cond_channels": 4, "cond_depth": 1}


def tiny_model(wavelet: str) -> torch.nn.Module:
    model = flowkit.build("model", "wavelet_flow", in_shape=(C, SIDE, SIDE), decomposition={"use": wavelet},
                          **TINY).double()
    model.initialize(torch.rand(16, C, SIDE, SIDE, dtype=torch.float64))
    randomize_(model, 0.1)  # zero-initialised priors and coupling nets would make every level trivial
    return model.eval()


def idwt2(low: torch.Tensor, detail: torch.Tensor, wavelet: str) -> torch.Tensor:
    """PyWavelets' inverse DWT per image and channel; detail channel 3c + k is band (cH, cV, cD)[k] of c."""
    b, c = low.shape[:2]
    out = np.stack([
        np.stack([
            pywt.idwt2((low[i, ch].numpy(), tuple(detail[i, 3 * ch + k].numpy() for k in range(3))), wavelet,
                       mode="periodization")
            for ch in range(c)
        ])
        for i in range(b)
    ])
    return torch.from_numpy(out)


@torch.no_grad()
def generate(model, n: int, wavelet: str, temperature: float = 1.0):
    """Images y and the reference log-density of each term, from latents drawn level by level."""
    terms = {}
    base = model.flows["base"]
    z = base.prior.sample(n, None, temperature) if temperature else base.prior.mean(n, None)
    v, inv_logabsdet = base.flow.inverse(z)
    gain = 2.0**LEVELS
    low = v * gain  # I_0
    terms["base"] = base.prior.log_prob(z) - inv_logabsdet - v[0].numel() * math.log(gain)
    for j in range(1, LEVELS + 1):
        level = model.flows[f"level{j}"]
        context = level.context(low / 2.0 ** (LEVELS - j + 1))  # I_{j-1} over its own gain
        z = level.prior.sample(n, context, temperature) if temperature else level.prior.mean(n, context)
        v, inv_logabsdet = level.flow.inverse(z, context)
        gain = 2.0 ** (LEVELS - j)
        terms[f"level{j}"] = level.prior.log_prob(z, context) - inv_logabsdet - v[0].numel() * math.log(gain)
        low = idwt2(low, v * gain, wavelet)  # I_j from I_{j-1} and D_{j-1}
    return low + 0.5, terms


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_log_prob_parts_equal_the_change_of_variables_of_sampled_latents(wavelet):
    model = tiny_model(wavelet)
    y, reference = generate(model, 3, wavelet)
    assert y.shape == (3, C, SIDE, SIDE)
    parts = model.log_prob_parts(y)
    assert list(parts) == list(reference)
    for name, expected in reference.items():
        torch.testing.assert_close(parts[name], expected, atol=1e-10, rtol=1e-8,
                                   msg=lambda m, name=name: f"term {name}: {m}")
    torch.testing.assert_close(model.log_prob(y), sum(reference.values()), atol=1e-10, rtol=1e-8)


def test_each_level_carries_minus_its_dims_times_the_log_of_its_gain():
    """The terms with the gains taken out differ from log π - log|det| by exactly -D_j log 2^(L-j)."""
    model = tiny_model("haar")
    y, reference = generate(model, 2, "haar")
    parts = model.log_prob_parts(y)
    dims = model.part_dims()
    assert dims == {"base": C * 2 * 2, "level1": 3 * C * 2 * 2, "level2": 3 * C * 4 * 4}
    log_gains = {"base": LEVELS * math.log(2), "level1": (LEVELS - 1) * math.log(2), "level2": 0.0}
    for name, part in parts.items():
        without_gain = reference[name] + dims[name] * log_gains[name]
        torch.testing.assert_close(part + dims[name] * log_gains[name], without_gain, atol=1e-10, rtol=1e-8)
    # The finest level has gain 1: a model that applied the gain of the level above would be off by D log 2.
    assert dims["level1"] * math.log(2) > 1


def test_sample_at_temperature_zero_is_the_reference_decoding_of_the_prior_means():
    model = tiny_model("haar")
    y, _ = generate(model, 2, "haar", temperature=0.0)
    torch.testing.assert_close(model.sample(2, temperature=0.0), y, atol=1e-10, rtol=1e-8)


def test_superres_keeps_the_low_pass_image_pywt_gives():
    """Super-resolving from I_1 samples new detail only: pywt's analysis of the result gives back I_1."""
    model = tiny_model("haar")
    y = torch.rand(2, C, SIDE, SIDE, dtype=torch.float64)
    low = model.reduce(y, 1)
    x = (y - 0.5).numpy()
    expected = np.stack([[pywt.dwt2(x[i, c], "haar", mode="periodization")[0] for c in range(C)] for i in range(2)])
    torch.testing.assert_close(low, torch.from_numpy(expected), atol=1e-12, rtol=0)
    sampled = (model.superres(low, 1) - 0.5).numpy()
    again = np.stack([[pywt.dwt2(sampled[i, c], "haar", mode="periodization")[0] for c in range(C)]
                      for i in range(2)])
    torch.testing.assert_close(torch.from_numpy(again), low, atol=1e-12, rtol=0)
