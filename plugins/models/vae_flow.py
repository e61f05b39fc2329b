"""Model ``vae_flow``: the global/local VAE-flow of Ma et al. (ICLR 2021), and its commands
``flowkit swap`` and ``flowkit interpolate``.

An encoder gives a diagonal Gaussian q(z | y) over a global latent z; p(z) is N(0, I) or a
small flow over z; the decoder is a flow model of the registry (multiscale: Glow or MaCow
steps) built with a vector context, so that z conditions every coupling net
(`flowkit.contracts.context`). The decoder's own latent is the local latent. log p(y) has
no closed form: the model is a `flowkit.contracts.model.LatentVariable` and its terms are the
ELBO's. The commands come from this module through the ``flowkit_add_commands`` hook, as
``flowkit superres`` comes from the wavelet_flow plugin; the core knows nothing of them.

References:
    Ma, Kong, Zhang & Hovy, "Decoupling Global and Local Representations via Invertible
    Generative Flows", ICLR 2021; reference code github.com/XuezheMax/wolf (``wolf/wolf.py``,
    ``modules/discriminators/gaussian.py``, ``modules/discriminators/priors/flow.py``,
    ``modules/encoders/global_encoder.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from flowkit import DensityModel, FlowkitError, PartRef, ShapeError, hookimpl, param, part_field
from flowkit.contracts.model import LatentVariable
from flowkit.models import Centre
from flowkit_plugins.models._global_encoder import GlobalEncoder, Norm
from flowkit_plugins.models._latent_prior import LOG_2PI, FlowPrior, LatentPrior, StandardNormalPrior

Shape = tuple[int, int, int]



@dataclass(frozen=True, kw_only=True)
class VAEFlowParams:
    latent_dim: int = param(
        64, "dimensions of the global latent z (wolf on CIFAR-10: 64); 0: no z, the model is the decoder alone "
        "(wolf's glow-base)")
    encoder_hidden: tuple[int, ...] = param(
        (48, 96, 96), "channels of the encoder's residual levels, each halving height and width (wolf: 48, 96, 96)")
    encoder_out_channels: int = param(8, "channels of the encoder's last 1x1 convolution, flattened (wolf: 8)")
    encoder_norm: Norm = param("batch", "normalisation in the encoder's residual blocks (wolf: batch)")
    prior: Literal["gaussian", "flow"] = param(
        "flow", "p(z): N(0, I) with the closed-form KL, or a flow over z with a one-sample KL (wolf: flow)")
    prior_steps: int = param(2, "steps of the prior flow (wolf: 2)")
    prior_hidden: int = param(256, "width of the prior flow's coupling MLPs (wolf: 256)")
    decoder: PartRef = part_field(
        "model", "multiscale", "p(y | z): a flow model that takes a vector context in every coupling (multiscale)")

    def __post_init__(self) -> None:
        if self.latent_dim < 0:
            raise ValueError(f"latent_dim = {self.latent_dim} must be >= 0 (0: the decoder alone, without z).")
        if self.prior == "flow" and self.latent_dim == 1:
            raise ValueError('latent_dim = 1 leaves nothing to couple in prior = "flow"; use latent_dim >= 2 '
                             'or prior = "gaussian".')
        if any(h < 1 for h in self.encoder_hidden) or self.encoder_out_channels < 1:
            raise ValueError(f"encoder_hidden = {list(self.encoder_hidden)} and encoder_out_channels = "
                             f"{self.encoder_out_channels} must be >= 1.")
        if self.prior_steps < 1 or self.prior_hidden < 1:
            raise ValueError(f"prior_steps = {self.prior_steps} and prior_hidden = {self.prior_hidden} must be >= 1.")


@runtime_checkable
class ConditionalDecoder(Protocol):
    """What ``vae_flow`` asks of its decoder, a model built with ``context_shape = (latent_dim,)``
    (multiscale has all of it): the `DensityModel` methods with a ``context``, and the map
    between images and its latents (the local latent)."""

    context_shape: tuple[int, ...] | None

    def log_prob_parts(self, y: Tensor, context: Tensor | None = None) -> dict[str, Tensor]: ...

    def part_dims(self) -> dict[str, int]: ...

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor: ...

    def initialize(self, y: Tensor, context: Tensor | None = None) -> None: ...

    def encode(self, y: Tensor, context: Tensor | None = None) -> tuple[list[Tensor], Tensor]: ...

    def decode(self, latents: list[Tensor], context: Tensor | None = None) -> Tensor: ...


def build_decoder(build: Any, ref: PartRef, in_shape: Shape, latent_dim: int) -> ConditionalDecoder:
    """The decoder, conditioned on z; a clear error for a model that cannot be."""
    cannot = (f'model.decoder.use = "{ref.use}" cannot be the decoder of vae_flow: it must take the global '
              "latent as a vector context in every coupling and map images to latents and back, as "
              'multiscale (Glow or MaCow steps) does')
    if not build.accepts(ref, "vector"):  # declared when the model registers (contexts=("vector",))
        raise ShapeError(f"{cannot}; it takes no vector context.")
    decoder = build(ref, in_shape=in_shape, context_shape=(latent_dim,))
    if not isinstance(decoder, ConditionalDecoder) or decoder.context_shape != (latent_dim,):
        raise ShapeError(f"{cannot}.")
    if "kl" in decoder.part_dims():
        raise ShapeError(f'The decoder {ref.use} has a term named "kl", which vae_flow keeps for its KL term.')
    return decoder


class VAEFlow(DensityModel, LatentVariable):
    r"""Global/local VAE-flow: ``z ~ p(z)`` (global), then ``y = f_z^{-1}(u)`` with the decoder's
    latent ``u`` (local), every coupling net of ``f`` conditioned on z.

    The terms of `log_prob_parts` are the one-draw ELBO (`LatentVariable`): with
    ``z = mu + sigma * eps``, ``eps ~ N(0, I)`` (reparametrised),

    .. math::

        \text{ELBO}(y) = \underbrace{\log p(y \mid z)}_{\text{decoder terms, exact}}
            - \underbrace{\mathrm{KL}(q(z \mid y) \,\|\, p(z))}_{\text{term } kl},

    the KL in closed form for ``prior = "gaussian"`` and as ``log q(z | y) - log p(z)`` at the
    same z for ``prior = "flow"``. ``log_joint_sample`` is ``log p(y | z) + log p(z) - log
    q(z | y)``, one importance weight. Sampling draws z from p(z) and the local latent from the
    decoder's priors, both at the temperature (T = 0: both modes; the reference's synthesis
    scales the local latent only). `encode_global`, `encode_local` and `decode` split an image
    into its two latents and put them back together (``flowkit swap`` / ``interpolate``).

    Example:
        >>> import flowkit
        >>> model = flowkit.build("model", "vae_flow", in_shape=(1, 8, 8), latent_dim=4, encoder_hidden=[4],
        ...                       prior="gaussian", decoder={"use": "multiscale", "levels": 2, "depth": 1})
        >>> model.log_prob(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3])
    """

    def __init__(self, params: VAEFlowParams, in_shape: Shape, decoder: ConditionalDecoder) -> None:
        super().__init__()
        self.in_shape = in_shape
        self.params = params
        self.latent_dim = params.latent_dim
        self.encoder = GlobalEncoder(in_shape, hidden=params.encoder_hidden, out_channels=params.encoder_out_channels,
                                     latent_dim=params.latent_dim, norm=params.encoder_norm)
        self.prior: LatentPrior = (StandardNormalPrior(params.latent_dim) if params.prior == "gaussian"
                                   else FlowPrior(params.latent_dim, params.prior_steps, params.prior_hidden))
        self.decoder = decoder

    # -- q(z | y) ----------------------------------------------------------------------------
    def posterior(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of q(z | y), each ``(B, latent_dim)``."""
        if y.dim() != 4 or tuple(y.shape[1:]) != self.in_shape:
            raise ShapeError(f"vae_flow expected images of shape (B, {', '.join(map(str, self.in_shape))}), got "
                             f"{tuple(y.shape)}.")
        # Centred as the decoder's first step centres it (Glow's y - 1/2).
        mu, logvar = self.encoder(y - Centre.shift)
        # In at least float32 when the encoder runs under bf16 autocast: the KL and log q need it.
        dtype = torch.promote_types(y.dtype, torch.float32)
        return mu.to(dtype), logvar.to(dtype)

    def _draw(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(z, log q(z | y), mu, logvar)`` for one reparametrised draw per image."""
        mu, logvar = self.posterior(y)
        eps = torch.randn_like(mu)
        z = mu + (0.5 * logvar).exp() * eps
        log_q = -0.5 * (logvar + eps.square() + LOG_2PI).sum(1)
        return z, log_q, mu, logvar

    # -- DensityModel ------------------------------------------------------------------------
    def log_prob_parts(self, y: Tensor) -> dict[str, Tensor]:
        z, log_q, mu, logvar = self._draw(y)
        parts = dict(self.decoder.log_prob_parts(y, z))
        kl = self.prior.kl(mu, logvar) if self.prior.closed_form_kl else log_q - self.prior.log_prob(z)
        parts["kl"] = -kl.to(torch.promote_types(y.dtype, torch.float32))
        return parts

    def part_dims(self) -> dict[str, int]:
        return {**self.decoder.part_dims(), "kl": 0}

    def log_joint_sample(self, y: Tensor) -> Tensor:
        z, log_q, _, _ = self._draw(y)
        log_p_y = torch.stack(list(self.decoder.log_prob_parts(y, z).values())).sum(0)
        return log_p_y + self.prior.log_prob(z) - log_q

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        z = self.prior.sample(n, temperature, like=self.encoder.head.weight)
        return self.decoder.sample(n, temperature, context=z)

    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """The prior flow's and the decoder's actnorm, on draws from q(z | y) (N(0, I) at first)."""
        z, _, _, _ = self._draw(y)
        self.prior.initialize(z)
        self.decoder.initialize(y, z)

    # -- global and local latents --------------------------------------------------------------
    @torch.no_grad()
    def encode_global(self, y: Tensor, temperature: float = 0.0) -> Tensor:
        """z of each image: the posterior mean at ``temperature = 0``, else a draw from q(z | y)
        with its standard deviation scaled by the temperature."""
        mu, logvar = self.posterior(y)
        if temperature == 0:
            return mu
        return mu + temperature * (0.5 * logvar).exp() * torch.randn_like(mu)

    @torch.no_grad()
    def encode_local(self, y: Tensor, z: Tensor) -> list[Tensor]:
        """The decoder's latents of ``y`` given ``z``: the local latent."""
        return self.decoder.encode(y, z)[0]

    @torch.no_grad()
    def decode(self, local: list[Tensor], z: Tensor) -> Tensor:
        """Images from a local latent and a global one (unclamped, as `sample`)."""
        return self.decoder.decode(local, z)

    def extra_repr(self) -> str:
        p = self.params
        return f"in_shape={self.in_shape}, latent_dim={p.latent_dim}, prior={p.prior}"


def make_vae_flow(params: VAEFlowParams, *, in_shape: Shape, build: Any) -> DensityModel:
    """The global/local VAE-flow; with ``latent_dim = 0``, the decoder alone (no z), which is
    why the factory is a function: it does not always build a `VAEFlow`."""
    in_shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
    if params.latent_dim == 0:
        return build(params.decoder, in_shape=in_shape)
    return VAEFlow(params, in_shape, build_decoder(build, params.decoder, in_shape, params.latent_dim))


@hookimpl
def flowkit_register_models(register: Any) -> None:
    register("vae_flow", make_vae_flow, params=VAEFlowParams,
             summary="global/local VAE-flow (Ma et al. 2021): q(z|y), p(z), and a flow decoder conditioned on z")


# -- commands ---------------------------------------------------------------------------------


def _trained_vae_flow(ctx: Any, run_dir: Path) -> tuple[Any, Any, VAEFlow]:
    from flowkit.cli.public import load_trained

    rundir, session = load_trained(ctx, run_dir)
    if not isinstance(session.model, VAEFlow):
        raise FlowkitError(
            f"{run_dir} holds a {session.recipe.model.use} model without a global latent; swap and interpolate "
            "need a vae_flow model with latent_dim > 0.")
    session.model.eval()
    return rundir, session, session.model


def _temperatures(values: tuple[float, ...]) -> tuple[float, ...]:
    bad = [t for t in values if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise FlowkitError(f"--temperature {bad[0]} is not allowed; use a finite value >= 0 (0: the posterior mean).")
    return values or (0.0,)


@hookimpl
def flowkit_add_commands(cli: Any) -> None:
    import click

    from flowkit.cli.public import SamplingOptions, sampling_options

    # The options of every sampling command (flowkit/cli/sampling_options.py); T scales q(z | x)
    # here, and there is no --mcmc: z is drawn from the posterior, not from the model's latent density.
    temperature_help = "Temperature of q(z | x): its standard deviation scaled by T, 0 the posterior mean"

    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @sampling_options(n=8, n_aliases=("--images",), n_help="Test images: their z give the rows, their local "
                      "latents the columns.", temperatures=(0.0,), temperature_help=temperature_help, mcmc=False)
    @click.pass_context
    def swap(ctx: click.Context, run_dir: Path, sampling: SamplingOptions) -> None:
        """Write a grid that combines the global z of each row's image with the local latent of
        each column's image (the first row and column show the images; the diagonal
        reconstructs them): swap-T<temperature>.png in RUN_DIR/samples."""
        from flowkit.cli.public import console
        from flowkit.runs.rundir import grid_name
        from flowkit_plugins.models._vae_grids import pick_test_images, write_swap_grid

        rundir, session, model = _trained_vae_flow(ctx, run_dir)
        seed = sampling.seed_or(session.recipe.sample.seed)  # also chooses the test images
        x = pick_test_images(session, sampling.n, seed, "--images")
        for temperature in _temperatures(sampling.temperatures):
            path = write_swap_grid(session, model, x, rundir.samples / grid_name("swap", temperature, ".png"),
                                   temperature=temperature, seed=seed)
            console.print(f"wrote {path}")

    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @sampling_options(n=4, n_aliases=("--pairs",), n_help="Pairs of test images, one row each.",
                      temperatures=(0.0,), temperature_help=temperature_help, mcmc=False)
    @click.option("--steps", default=8, show_default=True, help="Interpolation points from the first image's "
                  "latent to the second's.")
    @click.pass_context
    def interpolate(ctx: click.Context, run_dir: Path, steps: int, sampling: SamplingOptions) -> None:
        """Write two grids per temperature for pairs of test images (a, b): z interpolated from
        a's to b's with a's local latent fixed (interpolate-z-T<t>.png), and the local latent
        interpolated with a's z fixed (interpolate-local-T<t>.png); each row starts with a and
        ends with b. In RUN_DIR/samples."""
        from flowkit.cli.public import console
        from flowkit_plugins.models._vae_grids import pick_test_images, write_interpolation_grids

        if steps < 2:
            raise FlowkitError(f"--steps {steps} is too few; an interpolation needs at least 2 points.")
        rundir, session, model = _trained_vae_flow(ctx, run_dir)
        seed, pairs = sampling.seed_or(session.recipe.sample.seed), sampling.n
        x = pick_test_images(session, 2 * pairs, seed, "--pairs", per_item=2)
        for temperature in _temperatures(sampling.temperatures):
            for path in write_interpolation_grids(session, model, x[:pairs], x[pairs:], rundir.samples,
                                                  steps=steps, temperature=temperature, seed=seed):
                console.print(f"wrote {path}")
