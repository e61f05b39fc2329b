"""The multiscale model against its generative process: latents drawn from the priors, decoded.

The class docstring of plugins/models/multiscale.py states the density,

    log p(y) = Σ_{l<L} [log|det J_l| + Σ log p(z_l | h_l)] + log|det J_L| + log p_top(z_L),

with ``level1 .. level{L-1}`` and ``top`` its terms and the bottom steps counting in
``level1``. The reference runs it backwards, as a sampler would: z_L from the top prior, then
level by level from the top each factored-out part z_l from its prior given the part h_l
generated so far, then the inverses of the level's steps and squeeze. Each term is then
``Σ log p(z_l | h_l) - Σ log|det ∂f⁻¹/∂·|`` of its level, accumulated in the generative
direction, which `log_prob` (the data-to-latent direction) never runs; and the whole density
is checked once more with the log-det of `decode` taken by brute force (autograd), so
neither the steps' own log-dets nor the model's bookkeeping are trusted.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.testing import jacobian_logabsdet, randomize_

TINY_NET = {"use": "glow_cnn", "hidden": 8}
GLOW = {"use": "glow", "coupling": {"use": "affine", "net": TINY_NET}}
MACOW = {"use": "macow", "units": 1, "glow": GLOW}

CONFIGS = {
    "glow": ((1, 8, 8), {"levels": 2, "depth": 1, "step": GLOW}),
    "glow_one_level": ((1, 4, 4), {"levels": 1, "depth": 2, "step": GLOW}),
    "macow_fine": ((2, 4, 4), {"levels": 2, "depth": 1, "step": MACOW, "bottom_step": MACOW, "splits": 2,
                               "bottom_depth": 1}),
}


def tiny_model(name: str):
    in_shape, params = CONFIGS[name]
    model = flowkit.build("model", "multiscale", in_shape=in_shape, **params).double()
    model.initialize(torch.rand(16, *in_shape, dtype=torch.float64))
    randomize_(model, 0.05)  # zero-initialised split priors and nets would make the check trivial
    return model.eval(), in_shape


@torch.no_grad()
def generate(model, n: int, temperature: float = 1.0):
    """``(y, latents in encode's order, reference terms, Σ prior log-densities)`` from the
    model's generative process, run over the modules the walker built: its chains (the
    transforms between two splits; the first one starts with the centring and the bottom
    steps) and its splits, from the top."""

    def draw(prior, context):
        return prior.sample(n, context, temperature=temperature) if temperature else prior.mean(n, context)

    top = h = draw(model.top_prior, None)
    terms = {"top": model.top_prior.log_prob(top)}
    priors = terms["top"]
    factored = []  # in generation order: the last factored out first
    chains, splits = model.flow.chains(), model.flow.splits()
    chain_terms = [split.term for split in splits] + ["top"]  # level l's chains end in its splits
    assert chain_terms[:-1] == sorted(chain_terms[:-1]) and all(t.startswith("level") for t in chain_terms[:-1])
    for index in reversed(range(len(chains))):
        term = terms.get(chain_terms[index], torch.zeros(n, dtype=torch.float64))
        if index < len(splits):
            split = splits[index]
            context = h if split.prior.context_shape is not None else None
            out = draw(split.prior, context)
            log_p = split.prior.log_prob(out, context)
            term, priors = term + log_p, priors + log_p
            factored.append(out)
            h = torch.cat([h, out], dim=1)
        for transform in reversed(chains[index].transforms):
            h, inv_logabsdet = transform.inverse(h)
            term = term - inv_logabsdet
        terms[chain_terms[index]] = term
    return h, [*reversed(factored), top], terms, priors


@pytest.mark.parametrize("name", CONFIGS)
def test_log_prob_parts_equal_the_generative_change_of_variables(name):
    model, in_shape = tiny_model(name)
    y, latents, reference, _ = generate(model, 3)
    assert y.shape == (3, *in_shape)
    parts = model.log_prob_parts(y)
    assert list(parts) == list(model.part_dims())
    assert set(parts) == set(reference)
    for term, expected in reference.items():
        torch.testing.assert_close(parts[term], expected, atol=1e-10, rtol=1e-8,
                                   msg=lambda m, term=term: f"term {term}: {m}")
    # The latents are the ones encode finds, and decode maps them back to the image.
    encoded, _ = model.encode(y)
    assert len(encoded) == len(latents)
    for found, drawn in zip(encoded, latents, strict=True):
        torch.testing.assert_close(found, drawn, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(model.decode(latents), y, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["glow", "macow_fine"])
def test_log_prob_is_the_priors_minus_the_brute_force_log_det_of_decode(name):
    model, in_shape = tiny_model(name)
    y, latents, _, priors = generate(model, 2)
    shapes = [z.shape[1:] for z in latents]
    sizes = [math.prod(s) for s in shapes]
    assert sum(sizes) == math.prod(in_shape)

    def decode_flat(flat):
        pieces = flat.split(sizes, dim=1)
        return model.decode([p.reshape(-1, *s) for p, s in zip(pieces, shapes, strict=True)]).flatten(1)

    flat = torch.cat([z.flatten(1) for z in latents], dim=1)
    log_det_decode = jacobian_logabsdet(decode_flat, flat)
    torch.testing.assert_close(model.log_prob(y), priors - log_det_decode, atol=1e-10, rtol=1e-8)


def test_sample_at_temperature_zero_is_the_decoding_of_the_prior_means():
    model, _ = tiny_model("macow_fine")
    with torch.no_grad():  # non-zero prior means, so the check is not the decoding of zeros
        model.top_prior.loc.copy_(0.3 * torch.randn_like(model.top_prior.loc))
    y, latents, _, _ = generate(model, 2, temperature=0.0)
    assert latents[-1].abs().max() > 0.01
    torch.testing.assert_close(model.sample(2, temperature=0.0), y, atol=1e-10, rtol=1e-8)
