"""Priors p(z) over the VAE-flow's global latent z in R^d: N(0, I), or a small flow over z.

The flow follows the reference code's prior (XuezheMax/wolf, ``FlowPrior``): ``steps`` steps of
actnorm, an invertible linear map, and a unit of four affine couplings whose conditioners are
MLPs (the first half given the second and back, then the even entries given the odd ones and
back, with an actnorm between the pairs). Written here for flowkit; not the reference's code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(eps: Tensor) -> Tensor:
    """log N(eps; 0, I) per row of ``(B, d)``."""
    return -0.5 * (eps.square().sum(1) + eps.shape[1] * LOG_2PI)


class LatentPrior(nn.Module):
    """A density on ``(B, d)``: ``log_prob``, ``sample(n, temperature, like)`` (the temperature
    scales the standard deviation of the base noise; 0: the mode of the base mapped through),
    ``initialize(z)``; ``kl(mu, logvar)`` where KL(N(mu, diag exp(logvar)) || p) has a closed form."""

    closed_form_kl = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, temperature: float, like: Tensor) -> Tensor:
        raise NotImplementedError

    def kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, z: Tensor) -> None:
        """Data-dependent initialisation on draws from q(z | y); the default does nothing."""


class StandardNormalPrior(LatentPrior):
    r"""p(z) = N(0, I), with the closed-form KL of a diagonal Gaussian posterior:

    .. math:: \mathrm{KL} = \tfrac12 \sum_i (\mu_i^2 + e^{\lambda_i} - \lambda_i - 1), \quad \lambda = \log\sigma^2
    """

    closed_form_kl = True

    def log_prob(self, z: Tensor) -> Tensor:
        return standard_normal_log_prob(z)

    def sample(self, n: int, temperature: float, like: Tensor) -> Tensor:
        return temperature * torch.randn(n, self.dim, dtype=like.dtype, device=like.device)

    def kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0).sum(1)


class _ActNorm(nn.Module):
    """``(z + loc) * exp(log_scale)`` per entry; initialised to zero mean and unit variance."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return (z + self.loc) * self.log_scale.exp(), self.log_scale.sum().expand(z.shape[0])

    def inverse(self, eps: Tensor) -> Tensor:
        return eps * (-self.log_scale).exp() - self.loc

    @torch.no_grad()
    def initialize(self, z: Tensor) -> None:
        self.loc.copy_(-z.mean(0))
        self.log_scale.copy_(-torch.log(z.std(0) + 1e-6))


class _Linear(nn.Module):
    """``z W^T`` with W invertible (a random rotation at first); log|det| = log|det W|."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(dim, dim))[0])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z @ self.weight.T, torch.linalg.slogdet(self.weight).logabsdet.expand(z.shape[0])

    def inverse(self, eps: Tensor) -> Tensor:
        return torch.linalg.solve(self.weight, eps.T).T


class _Coupling(nn.Module):
    """Affine coupling of one part of z given the other: ``z_t * scale + shift`` with
    ``scale = 1 + tanh(s / 2)`` in (0, 2) (the reference's affine transform, alpha = 1); the
    MLP's last layer is zero, so the coupling starts as the identity."""

    def __init__(self, dim: int, hidden: int, split: str, parity: int) -> None:
        super().__init__()
        index = torch.arange(dim)
        if split == "halves":
            cond = index < dim // 2 if parity == 0 else index >= dim // 2
        else:
            cond = index % 2 == parity
        self.register_buffer("cond", cond.nonzero().flatten(), persistent=False)
        self.register_buffer("trans", (~cond).nonzero().flatten(), persistent=False)
        last = nn.Linear(hidden, 2 * len(self.trans))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Linear(len(self.cond), hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), last)

    def _shift_log_scale(self, z_cond: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(z_cond).chunk(2, dim=1)
        return shift, torch.log1p(torch.tanh(raw / 2))

    def _merge(self, z_cond: Tensor, z_trans: Tensor) -> Tensor:
        out = torch.empty(z_cond.shape[0], len(self.cond) + len(self.trans), dtype=z_cond.dtype, device=z_cond.device)
        out[:, self.cond] = z_cond
        out[:, self.trans] = z_trans
        return out

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_cond, z_trans = z[:, self.cond], z[:, self.trans]
        shift, log_scale = self._shift_log_scale(z_cond)
        return self._merge(z_cond, z_trans * log_scale.exp() + shift), log_scale.sum(1)

    def inverse(self, eps: Tensor) -> Tensor:
        e_cond, e_trans = eps[:, self.cond], eps[:, self.trans]
        shift, log_scale = self._shift_log_scale(e_cond)
        return self._merge(e_cond, (e_trans - shift) * (-log_scale).exp())


class FlowPrior(LatentPrior):
    r"""p(z) through a flow ``eps = f(z)`` to N(0, I): ``log p(z) = log N(f(z)) + log|det ∂f/∂z|``.

    Each of the ``steps`` steps is actnorm, an invertible linear map, then couplings on the
    halves (both ways), actnorm, couplings on the even/odd entries (both ways). The KL to a
    Gaussian posterior has no closed form here: the model uses the one-sample estimate
    ``log q(z | y) - log p(z)``.
    """

    def __init__(self, dim: int, steps: int, hidden: int) -> None:
        super().__init__(dim)
        layers: list[nn.Module] = []
        for _ in range(steps):
            layers += [_ActNorm(dim), _Linear(dim),
                       _Coupling(dim, hidden, "halves", 0), _Coupling(dim, hidden, "halves", 1),
                       _ActNorm(dim),
                       _Coupling(dim, hidden, "alternate", 0), _Coupling(dim, hidden, "alternate", 1)]
        self.layers = nn.ModuleList(layers)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, log|det ∂eps/∂z|)``, in at least float32 (autocast off: the prior is small, and its
        log-density enters the KL)."""
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        with torch.autocast(device_type=z.device.type, enabled=False):
            for layer in self.layers:
                z, logabsdet = layer(z)
                total = total + logabsdet
        return z, total

    def inverse(self, eps: Tensor) -> Tensor:
        with torch.autocast(device_type=eps.device.type, enabled=False):
            for layer in reversed(self.layers):
                eps = layer.inverse(eps)
        return eps

    def log_prob(self, z: Tensor) -> Tensor:
        eps, logabsdet = self(z)
        return standard_normal_log_prob(eps) + logabsdet

    def sample(self, n: int, temperature: float, like: Tensor) -> Tensor:
        eps = temperature * torch.randn(n, self.dim, dtype=like.dtype, device=like.device)
        return self.inverse(eps)

    @torch.no_grad()
    def initialize(self, z: Tensor) -> None:
        for layer in self.layers:
            if isinstance(layer, _ActNorm):
                layer.initialize(z)
            z, _ = layer(z)
