"""Contract checks of priors and dequantizers: densities checked against their own samples."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowkit.contracts.dequantizer import Dequantizer
from flowkit.contracts.prior import Prior
from flowkit.testing._common import SIGMAS, check_gradients, check_rows_independent, _close, default_tolerances, _unchanged


def _repeat(context: Tensor | None, n: int) -> Tensor | None:
    return None if context is None else context[:1].expand(n, *context.shape[1:]).contiguous()


def _diagonal_gaussian_probe(
    prior: Prior, mean: Tensor, context: Tensor | None, delta: float, atol: float, rtol: float
) -> tuple[Tensor | None, str]:
    """Per-element ``sigma`` if ``log_prob`` is a diagonal Gaussian around ``mean`` (one row),
    read off the log-density's curvature alone; else ``(None, why not)``.

    For a diagonal Gaussian, ``log p(m) - log p(m ± δ e_i) = δ² / (2 σ_i²)`` exactly, the same
    at ``2δ`` times four, and moving along two axes at once costs the sum of the two.
    """
    d = mean[0].numel()
    flat = mean.reshape(1, d)
    eye = torch.eye(d, dtype=mean.dtype, device=mean.device)
    pairs = torch.randperm(d)[: 2 * (d // 2)].view(-1, 2)[:8]
    pair_rows = eye[pairs[:, 0]] + eye[pairs[:, 1]]
    probes = torch.cat([torch.zeros(1, d, dtype=mean.dtype, device=mean.device),
                        delta * eye, -delta * eye, 2 * delta * eye, delta * pair_rows])
    points = (flat + probes).reshape(-1, *mean.shape[1:])
    lp = prior.log_prob(points, _repeat(context, points.shape[0])).detach()
    lp0 = lp[0]
    plus, minus, twice = lp[1 : 1 + d], lp[1 + d : 1 + 2 * d], lp[1 + 2 * d : 1 + 3 * d]
    both = lp[1 + 3 * d :]
    drop = lp0 - plus
    if not bool((drop > 0).all()):
        return None, "log_prob does not peak at the mean"
    scale = float(drop.abs().max())
    tol = atol + rtol * (scale + float(lp0.abs()))
    checks = {
        "symmetric": (lp0 - minus - drop).abs().max(),
        "quadratic": (lp0 - twice - 4 * drop).abs().max(),
        "separable": (lp0 - both - drop[pairs[:, 0]] - drop[pairs[:, 1]]).abs().max() if len(pairs) else torch.zeros(()),
    }
    for name, err in checks.items():
        if float(err) > tol:
            return None, f"log_prob is not {name} around the mean (off by {float(err):.3g})"
    return delta / torch.sqrt(2 * drop), ""


def check_prior(
    prior: Prior, context: Tensor | None = None, *, n: int = 3, samples: int = 2000,
    diagonal_gaussian: bool | None = None, atol: float | None = None, rtol: float | None = None,
) -> None:
    """A prior: shapes, dtypes, the mode, temperature, row independence, gradients, and for a
    diagonal Gaussian its normaliser against its own curvature and its samples' spread.

    - ``sample(n, context)`` is ``(n, *prior.shape)``; ``log_prob`` is ``(n,)``, finite, in at
      least float32; ``mean(n)`` equals ``sample(n, temperature=0)``; rows are independent.
    - Temperature scales the spread about the mode: ``E|s_T - mean|² = T² E|s_1 - mean|²``
      (Monte Carlo over ``samples`` draws of one context row, within `SIGMAS` standard errors).
    - Diagonal Gaussian (``diagonal_gaussian=None`` detects it, ``True`` requires it, ``False``
      skips it): each
      ``σ_i`` is read off the curvature of ``log_prob`` alone (`_diagonal_gaussian_probe`);
      then ``log_prob(mean) = -Σ log σ_i - D/2 log 2π`` (the normaliser, an independent
      closed form) and the samples at temperature T have per-element mean ``mean`` and
      standard deviation ``T σ_i`` (Monte Carlo).
    - Every trainable parameter gets a finite gradient from ``-log_prob``.

    Pass ``context`` (``(B, *context_shape)``, B >= 2 for the row check) for a conditional
    prior. Perturb with `randomize_` first: a zero-initialised conditional prior is N(0, I)
    for every context, so its context rules could not fail.
    """
    batch = n if context is None else context.shape[0]
    z = prior.sample(batch, context)
    shape = tuple(prior.shape)
    assert tuple(z.shape) == (batch, *shape), f"sample gave shape {tuple(z.shape)}, expected {(batch, *shape)}"
    assert z.is_floating_point(), f"sample gave dtype {z.dtype}"
    atol, rtol = default_tolerances(z.dtype, atol, rtol)
    z = z.detach()
    lp = prior.log_prob(z, context)
    assert lp.shape == (batch,), f"log_prob has shape {tuple(lp.shape)}, not ({batch},)"
    expected_dtype = torch.promote_types(z.dtype, torch.float32)
    assert lp.dtype == expected_dtype, f"log_prob is {lp.dtype}, not the promoted {expected_dtype}"
    assert torch.isfinite(lp).all(), f"log_prob of its own samples is not finite: {lp.tolist()}"
    with torch.no_grad():
        mean = prior.mean(batch, context)
        cold = prior.sample(batch, context, temperature=0.0)
    assert tuple(mean.shape) == (batch, *shape), f"mean gave shape {tuple(mean.shape)}"
    _close(cold, mean, atol, rtol, "sample(temperature=0) != mean")
    check_rows_independent(lambda v, c=None: prior.log_prob(v, c), z, context, atol=atol, rtol=rtol)
    if context is not None:
        check_rows_independent(lambda c: prior.mean(batch, c), context, atol=atol, rtol=rtol)

    # Temperature scales the spread about the mode, whatever the family.
    ctx = _repeat(context, samples)
    with torch.no_grad():
        m = prior.mean(samples, ctx)
        spread = {t: (prior.sample(samples, ctx, temperature=t) - m).flatten(1) for t in (1.0, 0.5)}
    sq1, sq_half = (spread[t].square().sum(1) for t in (1.0, 0.5))
    ratio = (sq_half.mean() / sq1.mean()).item()
    se = 0.25 * math.sqrt((sq_half.var() / sq_half.mean() ** 2 + sq1.var() / sq1.mean() ** 2).item() / samples)
    assert abs(ratio - 0.25) <= SIGMAS * se + rtol, (
        f"temperature 0.5 should scale the squared spread about the mean by 0.25, got {ratio:.4f} "
        f"(standard error {se:.2g})")

    sigma, why = None, "not asked"
    if diagonal_gaussian is not False:
        sigma, why = _diagonal_gaussian_probe(prior, mean[:1].detach(), context, 0.5, atol, rtol)
    if diagonal_gaussian and sigma is None:
        raise AssertionError(f"the prior is not a diagonal Gaussian: {why}")
    if sigma is not None:
        d = sigma.numel()
        lp_mode = prior.log_prob(mean[:1].detach(), _repeat(context, 1)).detach()[0]
        closed = -torch.log(sigma).sum() - 0.5 * d * math.log(2 * math.pi)
        _close(lp_mode, closed, atol, rtol,
               "log_prob at the mean != -sum(log sigma) - D/2 log(2 pi), sigma from log_prob's curvature")
        for t, s in spread.items():
            u = s / (t * sigma.reshape(1, -1).to(s.dtype))
            mean_err = u.mean(0).abs().max().item()
            assert mean_err <= SIGMAS / math.sqrt(samples), (
                f"samples at temperature {t} are off the mean by {mean_err:.3g} sigma in some element "
                f"(allowed {SIGMAS / math.sqrt(samples):.3g})")
            # Var(u^2) = 2 for a normal u: the per-element mean of u^2 has standard error sqrt(2/N).
            var_err = (u.square().mean(0) - 1).abs().max().item()
            assert var_err <= SIGMAS * math.sqrt(2 / samples), (
                f"samples at temperature {t} have a variance off by a factor {1 + var_err:.4f} from "
                f"(T sigma)^2 in some element, sigma from log_prob's curvature")

    trainable = [p for p in prior.parameters() if p.requires_grad]
    if trainable:
        check_gradients(prior, -prior.log_prob(z, context).mean())


# -- dequantizers ---------------------------------------------------------------------------


def check_dequantizer(
    dequantizer: Dequantizer, x: Tensor, n_bits: int, *, samples: int = 16384, seed: int = 0,
) -> None:
    """A dequantizer: ``y`` in the bin of ``x``, ``log_q`` a normalised log-density, gradients.

    - ``figure`` is one of `flowkit.contracts.dequantizer.FIGURES`.
    - ``y`` has the shape of ``x`` and a floating dtype; ``log_q`` is ``(B,)``, finite.
    - ``figure = "bits_per_dim"``: ``0 <= y < 1`` and ``floor(y * 2^n_bits) == x`` exactly (in
      y's dtype). ``figure = "noisy_nll"`` (noise that leaves the bin): ``log_q`` is 0, and with
      ``samples`` the noise ``u = y K - x`` is centred in the bin on average (its mean within
      `SIGMAS` standard errors of [0, 1]) and, where ``noise_std`` is declared, has that
      standard deviation on y's scale.
    - Rows are independent (same seed, other rows changed); the input is unchanged.
    - ``figure = "bits_per_dim"``: ``log_q`` is the log-density of ``u = y K - x`` on the unit
      cube, checked by Monte Carlo on
      ``samples`` draws for the first image: ``E_q[log q] >= 0`` (the KL divergence to the
      uniform), and importance sampling of a central box ``B`` of volume 1/2,
      ``E_q[1{u in B} / q(u)] = |B|``, within `SIGMAS` standard errors. This needs a tiny
      image (D = C·H·W <= 16); pass ``samples=0`` to skip it for bigger ones.
    - Every trainable parameter gets a finite gradient.

    ``x`` holds integers in ``[0, 2^n_bits)``; include ``0`` and ``2^n_bits - 1`` (the top bin
    is where ``y < 1`` fails in float32). Call ``initialize(x, n_bits)`` and `randomize_` first.
    """
    from flowkit.contracts.dequantizer import FIGURES

    assert dequantizer.figure in FIGURES, f"figure = {dequantizer.figure!r} is not one of {FIGURES}"
    noisy = dequantizer.figure == "noisy_nll"
    levels = 2**n_bits
    if x.is_floating_point():
        assert bool((x == x.round()).all()), "x must hold integer values"
    x_before = x.clone()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        y, log_q = dequantizer(x, n_bits)
    _unchanged(x_before, x, "the dequantizer")
    assert y.shape == x.shape, f"y has shape {tuple(y.shape)}, expected {tuple(x.shape)}"
    assert y.is_floating_point(), f"y has dtype {y.dtype}, not a floating one"
    assert log_q.shape == (x.shape[0],), f"log_q has shape {tuple(log_q.shape)}, not ({x.shape[0]},)"
    assert log_q.is_floating_point() and torch.isfinite(log_q).all(), f"log_q is not finite: {log_q}"
    if noisy:
        assert torch.isfinite(y).all(), "y is not finite"
        assert bool((log_q == 0).all()), f"a noisy_nll dequantizer's log_q must be 0 (no bound), got {log_q.tolist()}"
    else:
        low, high = y.min().item(), y.max().item()
        assert low >= 0 and high < 1, f"y has values in [{low!r}, {high!r}], outside [0, 1)"
        bins = torch.floor(y.detach() * levels)
        wrong = (bins != x.to(y.dtype)).sum().item()
        assert wrong == 0, f"{wrong} values of y fall outside the bin of x: floor(y * {levels}) != x"

    def seeded(v: Tensor) -> tuple[Tensor, Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return dequantizer(v, n_bits)

    if x.shape[0] >= 2:
        was_training = dequantizer.training
        dequantizer.eval()
        try:
            base = seeded(x)
            x2 = x.clone()
            x2[1:] = ((x2[1:].long() + 1) % levels).to(x.dtype)  # long: 256 does not fit in uint8
            other = seeded(x2)
            for a, b, name in zip(other, base, ("y", "log_q"), strict=True):
                atol, rtol = default_tolerances(b.dtype)
                torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol,
                                           msg=lambda m, name=name: f"{name} row 0 depends on other rows: {m}")
        finally:
            dequantizer.train(was_training)

    trainable = [p for p in dequantizer.parameters() if p.requires_grad]
    if trainable:
        y, log_q = dequantizer(x, n_bits)
        check_gradients(dequantizer, (log_q + y.flatten(1).sum(1)).mean())

    if samples and noisy:
        _check_noise(dequantizer, x, n_bits, samples, seed)
    elif samples:
        dims = x[0].numel()
        if dims > 16:
            raise ValueError(f"the Monte Carlo check of log_q needs an image of at most 16 values, got {dims}; "
                             "pass a smaller x or samples=0.")
        one = x[:1].expand(samples, *x.shape[1:]).contiguous()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            y, log_q = dequantizer(one, n_bits)
        u = (y.double() * levels - one.double()).flatten(1)
        log_q = log_q.double()
        kl = log_q.mean().item()
        kl_se = log_q.std().item() / math.sqrt(samples)
        assert kl >= -SIGMAS * kl_se - 1e-12, (
            f"E_q[log q(u|x)] = {kl:.4g} (standard error {kl_se:.2g}) is negative, but it is the KL "
            "divergence from the uniform density on the unit cube: log_q is not normalised")
        # A central box with half the cube's volume: inside it every q that is positive on the
        # open cube is bounded below, so the importance weights 1/q have a finite variance, and
        # with 16384 draws an error of 0.05 nats in log_q is already ~10 standard errors.
        width = 2.0 ** (-1.0 / dims)
        lo = 0.5 - width / 2
        inside = ((u >= lo) & (u <= 1 - lo)).all(1)
        weights = torch.where(inside, torch.exp(-log_q), torch.zeros_like(log_q))
        volume = width**dims
        estimate = weights.mean().item()
        se = weights.std().item() / math.sqrt(samples)
        assert abs(estimate - volume) <= SIGMAS * se + 1e-12, (
            f"importance sampling gives {estimate:.4g} for the volume {volume:.4g} of a box in the unit "
            f"cube (standard error {se:.2g}): exp(log_q) is not the density of the noise it draws")


def _check_noise(dequantizer: Dequantizer, x: Tensor, n_bits: int, samples: int, seed: int) -> None:
    """Noise that leaves the bin: centred in the bin on average, and of its declared spread."""
    levels = 2**n_bits
    one = x[:1].expand(samples, *x.shape[1:]).contiguous()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        y, _ = dequantizer(one, n_bits)
    u = (y.double() * levels - one.double()).flatten(1)
    mean, se = u.mean(0), u.std(0) / math.sqrt(samples)
    off = torch.clamp(-mean, min=0) + torch.clamp(mean - 1, min=0)
    assert bool((off <= SIGMAS * se + 1e-12).all()), (
        f"the noise u = y K - x is not centred in the bin on average: its mean is {mean.tolist()}")
    if dequantizer.noise_std is not None:
        spread = y.double().flatten(1).std(0)
        # The standard deviation of a sample of N normals has a standard error of about sigma / sqrt(2N).
        err = (spread / dequantizer.noise_std - 1).abs().max().item()
        assert err <= SIGMAS / math.sqrt(2 * samples), (
            f"y's spread differs from the declared noise_std = {dequantizer.noise_std} by a factor {1 + err:.4f}")


# -- models ---------------------------------------------------------------------------------
