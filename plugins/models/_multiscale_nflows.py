"""The same multiscale Glow composed from nflows' own transforms: the reference of
``flowkit bench --against nflows``.

nflows (bayesiains/nflows 0.14) is the library flowkit's Transform contract comes from, so its
composition is the natural baseline: ``SqueezeTransform``, ``ActNorm``, ``OneByOneConvolution``
(LU), ``AffineCouplingTransform`` (or ``AdditiveCouplingTransform``), ``CompositeTransform``
per level, ``MultiscaleCompositeTransform`` across levels, a ``StandardNormal`` base and
``Flow``. Around them, a few small modules of this file:

- `GlowNet`: Glow's coupling network in plain torch (conv 3x3 -> actnorm -> ReLU -> conv 1x1
  -> actnorm -> ReLU -> zero-initialised conv 3x3, times ``exp(3 logs)``). It is this file's own
  code, not flowkit's ``glow_cnn``, so that work on flowkit's nets speeds up flowkit only and the
  reference stays where it is.
- `SplitPrior`: Glow's conditional Gaussian split prior written as an nflows coupling, the
  factored-out half standardised given the kept half, ``eps = (z - mean(h)) exp(-log_scale(h))``
  with log|det| ``= -sum log_scale``; then ``log N(eps; 0, I) + log|det| = log N(z; mean, sigma)``.
  A `Permutation` then puts ``eps`` first, because ``MultiscaleCompositeTransform`` factors out
  the *first* half of the channels where flowkit (and Glow) factor out the *second*.
- `StandardizeTop`: the learned top prior (Glow's ``learntop``) the same way.

Where nflows' formula differs from flowkit's, a subclass overrides only that formula, so both
compute the same function:

- `GlowAffineCoupling`: nflows computes ``x * scale + shift`` with ``scale = sigmoid(h + 2) +
  1e-3``; flowkit's ``coupling:affine`` computes ``(x + shift) * sigmoid(h + 2)`` (shift first,
  as Glow does; or ``exp(clamp tanh(h / clamp))`` with ``scale_fn = "exp_tanh"``).
- `GlowOneByOneConvolution`: nflows' LU weight is ``L U`` after a permutation of the input, with
  a positive diagonal ``softplus(u) + 1e-3``; Glow's (and flowkit's) is ``P L U`` with the
  permutation on the output and a signed diagonal ``sign * exp(log_s)``.
- nflows' ``ActNorm`` computes ``scale * x + shift`` and flowkit's ``(x + bias) * scale``: the
  same family, so the copy converts ``shift = bias * scale`` and no override is needed.

`nflows_glow` copies a built (and initialised) flowkit ``multiscale`` model's weights into the
composition, which the multiscale model offers as its reference ``"nflows"``
(`flowkit.contracts.model.HasReferences`); ``flowkit bench --against nflows`` checks that both give
the same log-likelihood (`flowkit.bench.likelihood`) and times them side by side. It lives with
the plugin it mirrors, so the core knows nothing of multiscale's insides.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.base import CompositeTransform, MultiscaleCompositeTransform
from nflows.transforms.base import Transform as NflowsTransform
from nflows.transforms.conv import OneByOneConvolution
from nflows.transforms.coupling import AdditiveCouplingTransform, AffineCouplingTransform
from nflows.transforms.normalization import ActNorm
from nflows.transforms.permutations import Permutation
from nflows.transforms.reshape import SqueezeTransform
from nflows.transforms.standard import PointwiseAffineTransform
from nflows.utils import torchutils
from torch import Tensor, nn

from flowkit.errors import FlowkitError

#: What nflows' transforms compose, in words, for the refusal message.
SUPPORTED = ('a multiscale Glow: splits = 1, no bottom or split-flow steps, squeeze = "squeeze", step.use = '
             '"glow" (invconv = "lu"), an affine or additive coupling with a channel mask and a glow_cnn net '
             '(blocks = 0, edge_bias = false), split_prior = "conditional_gaussian" (hidden = 0, edge_bias = '
             'false), top_prior = "learned_gaussian"')


def glow_problems(p: Any) -> list[str]:
    """Why the multiscale model of Params ``p`` is not a Glow that nflows' transforms can compose,
    one sentence per difference naming its recipe key (empty: it is)."""
    problems = []
    if p.splits != 1:
        problems.append(f"model.splits = {p.splits}: MultiscaleCompositeTransform factors out half the channels "
                        "once per level; use 1.")
    if p.bottom_depth:
        problems.append(f"model.bottom_depth = {p.bottom_depth}: steps before the first squeeze are not composed; use 0.")
    if p.split_flow:
        problems.append("model.split_flow = true: MaCow's split flow is not composed; use false.")
    if p.squeeze.use != "squeeze":
        problems.append(f'model.squeeze.use = "{p.squeeze.use}": nflows has SqueezeTransform only; use "squeeze".')
    if p.step.use != "glow":
        problems.append(f'model.step.use = "{p.step.use}" is not "glow".')
    else:
        step = p.step.params
        if step.invconv != "lu":
            problems.append(f'model.step.invconv = "{step.invconv}": nflows\' OneByOneConvolution is LU-decomposed; '
                            'use "lu".')
        coupling = step.coupling
        if coupling.use not in ("affine", "additive"):
            problems.append(f'model.step.coupling.use = "{coupling.use}" is not "affine" or "additive".')
        else:
            if coupling.params.mask != "channel":
                problems.append(f'model.step.coupling.mask = "{coupling.params.mask}": nflows\' couplings split '
                                'image channels only; use "channel".')
            if getattr(coupling.params, "scale_fn", None) == "scaled_tanh":
                problems.append('model.step.coupling.scale_fn = "scaled_tanh" is not composed; use "sigmoid" or '
                                '"exp_tanh".')
            net = coupling.params.net
            if net.use != "glow_cnn":
                problems.append(f'model.step.coupling.net.use = "{net.use}" is not "glow_cnn".')
            elif net.params.blocks or net.params.edge_bias:
                problems.append("model.step.coupling.net: blocks = 0 and edge_bias = false are composed, got "
                                f"blocks = {net.params.blocks}, edge_bias = {str(net.params.edge_bias).lower()}.")
    split = p.split_prior
    if split.use != "conditional_gaussian":
        problems.append(f'model.split_prior.use = "{split.use}" is not "conditional_gaussian".')
    elif split.params.hidden or split.params.edge_bias:
        problems.append("model.split_prior: hidden = 0 and edge_bias = false are composed, got "
                        f"hidden = {split.params.hidden}, edge_bias = {str(split.params.edge_bias).lower()}.")
    if p.top_prior.use != "learned_gaussian":
        problems.append(f'model.top_prior.use = "{p.top_prior.use}" is not "learned_gaussian".')
    return [f"nflows composes {SUPPORTED}; this model differs: {problem}" for problem in problems]


# -- the modules around nflows' transforms -------------------------------------------------

class GlowNet(nn.Module):
    """Glow's coupling network ``NN()`` in plain torch; ``forward(x, context=None)`` as nflows calls it.

    ``conv3x3 -> [actnorm] -> ReLU -> conv1x1 -> [actnorm] -> ReLU -> conv3x3 [* exp(3 logs)]``,
    actnorm being ``(h + bias) * exp(log_scale)`` per channel.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, *, actnorm: bool, output_scale: bool) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=not actnorm)
        self.conv_mid = nn.Conv2d(hidden, hidden, 1, bias=not actnorm)
        self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        self.norms = nn.ParameterList(
            nn.Parameter(torch.zeros(1, hidden, 1, 1)) for _ in range(4 if actnorm else 0))  # bias, log_scale x 2
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1)) if output_scale else None

    def _norm(self, index: int, h: Tensor) -> Tensor:
        if not len(self.norms):
            return h
        return (h + self.norms[2 * index]) * torch.exp(self.norms[2 * index + 1])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = F.relu(self._norm(0, self.conv_in(x)))
        h = F.relu(self._norm(1, self.conv_mid(h)))
        out = self.conv_out(h)
        return out * torch.exp(3.0 * self.logs) if self.logs is not None else out

    @torch.no_grad()
    def copy_from(self, net: nn.Module) -> None:
        """The weights of flowkit's ``glow_cnn`` (its attributes ``conv_in``, ``conv_mid``,
        ``norms`` (actnorm: ``bias``, ``log_scale``), ``conv_out``, ``logs``)."""
        try:
            pairs = [(self.conv_in, net.conv_in), (self.conv_mid, net.conv_mid), (self.conv_out, net.conv_out)]
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)
            for i, norm in enumerate(net.norms):
                self.norms[2 * i].copy_(norm.bias.view_as(self.norms[2 * i]))
                self.norms[2 * i + 1].copy_(norm.log_scale.view_as(self.norms[2 * i + 1]))
            if self.logs is not None:
                self.logs.copy_(net.logs)
        except (AttributeError, RuntimeError, IndexError) as exc:
            raise FlowkitError(f"flowkit's glow_cnn no longer has the layout plugins/models/_multiscale_nflows.py copies "
                               f"({type(exc).__name__}: {exc}); update GlowNet.copy_from.") from None


class GlowAffineCoupling(AffineCouplingTransform):
    r"""nflows' affine coupling with flowkit's formula: ``z_t = (x_t + shift) * scale``.

    ``scale = sigmoid(h + 2)`` (Glow) or ``exp(clamp * tanh(h / clamp))``; nflows' own is
    ``x_t * (sigmoid(h + 2) + 1e-3) + shift``. The net's first half is the shift in both.
    """

    def __init__(self, mask: Tensor, transform_net_create_fn: Any, *, scale_fn: str = "sigmoid",
                 clamp: float = 2.0) -> None:
        super().__init__(mask, transform_net_create_fn)
        self.scale_fn, self.clamp = scale_fn, clamp

    def _shift_log_scale(self, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        shift = transform_params[:, : self.num_transform_features]
        raw = transform_params[:, self.num_transform_features :]
        if self.scale_fn == "sigmoid":
            return shift, F.logsigmoid(raw + 2.0)
        return shift, self.clamp * torch.tanh(raw / self.clamp)

    def _coupling_transform_forward(self, inputs: Tensor, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(transform_params)
        return (inputs + shift) * torch.exp(log_scale), torchutils.sum_except_batch(log_scale)

    def _coupling_transform_inverse(self, inputs: Tensor, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(transform_params)
        return inputs * torch.exp(-log_scale) - shift, -torchutils.sum_except_batch(log_scale)


class GlowOneByOneConvolution(OneByOneConvolution):
    r"""nflows' LU 1x1 convolution with Glow's parametrisation ``W = P L (U + diag(sign * exp(log_s)))``.

    Overridden: the diagonal (nflows: ``softplus(u) + 1e-3``, always positive; here
    ``sign * exp(u)`` with a fixed sign, so ``log|det W| = sum u``) and where the fixed
    permutation acts (nflows permutes the input, Glow's ``P`` the output).
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels, using_cache=False, identity_init=True)
        self.register_buffer("sign", torch.ones(num_channels))

    @property
    def upper_diag(self) -> Tensor:
        return self.sign * torch.exp(self.unconstrained_upper_diag)

    def logabsdet(self) -> Tensor:
        return self.unconstrained_upper_diag.sum()

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        outputs, logabsdet = self._lu_forward_inverse(inputs, inverse=False)
        return self.permutation(outputs)[0], logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        inputs, _ = self.permutation.inverse(inputs)
        return self._lu_forward_inverse(inputs, inverse=True)

    @torch.no_grad()
    def copy_weight(self, weight: Tensor) -> None:
        """Sets the parameters so that the transform multiplies by ``weight`` (``C x C``)."""
        perm, lower, upper = torch.linalg.lu(weight.detach().double().cpu())
        diag = torch.diagonal(upper)
        dtype = self.lower_entries.dtype
        self.lower_entries.copy_(lower[self.lower_indices].to(dtype))
        self.upper_entries.copy_(upper[self.upper_indices].to(dtype))
        self.unconstrained_upper_diag.copy_(diag.abs().log().to(dtype))
        self.sign.copy_(torch.sign(diag).to(dtype))
        self.bias.zero_()
        # (P y)_i = y_j where P_ij = 1: nflows' index_select with index j for output i.
        self.permutation._permutation.copy_(perm.argmax(dim=1))


class _PriorNet(nn.Module):
    """The split prior's zero-initialised 3x3 convolution (times ``exp(3 logs)``), as nflows calls a net."""

    def __init__(self, in_channels: int, out_channels: int, output_scale: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1)) if output_scale else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        out = self.conv(x)
        return out * torch.exp(3.0 * self.logs) if self.logs is not None else out


class SplitPrior(AffineCouplingTransform):
    r"""Glow's split prior as an nflows coupling: the transformed (factored-out) channels ``z``
    become ``eps = (z - mean) * exp(-log_scale)``, ``(mean, log_scale)`` from the kept ones.

    .. math:: \log|\det \partial \epsilon / \partial z| = -\sum \text{log\_scale}
    """

    def _mean_log_scale(self, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        return (transform_params[:, : self.num_transform_features],
                transform_params[:, self.num_transform_features :])

    def _coupling_transform_forward(self, inputs: Tensor, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_scale = self._mean_log_scale(transform_params)
        return (inputs - mean) * torch.exp(-log_scale), -torchutils.sum_except_batch(log_scale)

    def _coupling_transform_inverse(self, inputs: Tensor, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_scale = self._mean_log_scale(transform_params)
        return inputs * torch.exp(log_scale) + mean, torchutils.sum_except_batch(log_scale)


class StandardizeTop(NflowsTransform):
    r"""The learned top prior as a transform to N(0, I): ``eps = (z - loc) * exp(-log_scale)``.

    ``loc`` and ``log_scale`` have shape ``(C, 1, 1)`` (per channel) or ``(C, H, W)``.
    """

    def __init__(self, param_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(param_shape))
        self.log_scale = nn.Parameter(torch.zeros(param_shape))

    def _logabsdet(self, inputs: Tensor) -> Tensor:
        return self.log_scale.expand(inputs.shape[1:]).sum().expand(inputs.shape[0])

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (inputs - self.loc) * torch.exp(-self.log_scale), -self._logabsdet(inputs)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return inputs * torch.exp(self.log_scale) + self.loc, self._logabsdet(inputs)


# -- the composition ----------------------------------------------------------------------

class NflowsGlow(nn.Module):
    """An nflows ``Flow`` over images ``y`` in ``[0, 1)^D`` (centred by ``y - 1/2`` first, as
    flowkit's multiscale does), with its own uniform dequantization for training."""

    def __init__(self, flow: Flow, in_shape: tuple[int, int, int], n_bits: int) -> None:
        super().__init__()
        self.flow = flow
        self.in_shape = in_shape
        self.n_bits = n_bits

    def log_prob(self, y: Tensor) -> Tensor:
        return self.flow.log_prob(y)

    def loss(self, x: Tensor) -> Tensor:
        """Mean bits/dim of integer images ``x`` with uniform dequantization (log q = 0)."""
        levels = 2.0**self.n_bits
        y = (x.float() + torch.rand(x.shape, device=x.device)) / levels
        dims = math.prod(self.in_shape)
        nats = -self.log_prob(y) + dims * math.log(levels)
        return (nats / (dims * math.log(2.0))).mean()

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images: the inverse of the composition from the N(0, I) base (temperature 1)."""
        with warnings.catch_warnings():  # nflows' LU inverse calls the deprecated torch.triangular_solve
            warnings.filterwarnings("ignore", message="torch.triangular_solve is deprecated")
            return self.flow.sample(n)


def _channel_mask(channels: int, params: Any) -> Tensor:
    """nflows' coupling mask (1: transformed) for flowkit's channel mask with this parity and factor."""
    first = channels - channels // params.factor if params.factor else channels // 2
    mask = torch.zeros(channels, dtype=torch.long)
    if params.parity == 0:
        mask[first:] = 1
    else:
        mask[:first] = 1
    return mask


def _coupling(channels: int, coupling_ref: Any, net: nn.Module) -> NflowsTransform:
    params, net_params = coupling_ref.params, coupling_ref.params.net.params
    mask = _channel_mask(channels, params)

    def make_net(in_channels: int, out_channels: int) -> GlowNet:
        made = GlowNet(in_channels, out_channels, net_params.hidden, actnorm=net_params.actnorm,
                       output_scale=net_params.output_scale)
        made.copy_from(net)
        return made

    if coupling_ref.use == "additive":
        return AdditiveCouplingTransform(mask, make_net)  # z_t = x_t + shift: nflows' formula is flowkit's
    return GlowAffineCoupling(mask, make_net, scale_fn=params.scale_fn, clamp=params.clamp)


@torch.no_grad()
def _actnorm(flowkit_actnorm: nn.Module, channels: int) -> ActNorm:
    # flowkit: (x + bias) * exp(log_scale); nflows: exp(log_scale) * x + shift.
    made = ActNorm(channels)
    log_scale = flowkit_actnorm.log_scale.detach().reshape(-1)
    made.log_scale.copy_(log_scale)
    made.shift.copy_(flowkit_actnorm.bias.detach().reshape(-1) * torch.exp(log_scale))
    made.initialized.fill_(True)
    return made


@torch.no_grad()
def _split_prior(prior: nn.Module, keep: int, channels: int, output_scale: bool) -> list[NflowsTransform]:
    mask = torch.zeros(channels, dtype=torch.long)
    mask[keep:] = 1

    def make_net(in_channels: int, out_channels: int) -> _PriorNet:
        made = _PriorNet(in_channels, out_channels, output_scale)
        made.conv.weight.copy_(prior.net.weight)
        made.conv.bias.copy_(prior.net.bias)
        if made.logs is not None:
            made.logs.copy_(prior.logs)
        return made

    # eps to the front: MultiscaleCompositeTransform factors out the first half.
    front = torch.cat([torch.arange(keep, channels), torch.arange(keep)])
    return [SplitPrior(mask, make_net), Permutation(front, dim=1)]


def nflows_glow(model: nn.Module, n_bits: int, dtype: torch.dtype = torch.float32) -> NflowsGlow:
    """The nflows composition of the flowkit ``multiscale`` ``model``, with its current weights
    (on any device; the result is on the CPU in ``dtype``, which the copied weights are rounded
    to). ``glow_problems(model.params)`` must be empty."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the modules are made in dtype, so the copies round only once
    try:
        return _compose(model, n_bits)
    finally:
        torch.set_default_dtype(default)


@torch.no_grad()
def _compose(model: nn.Module, n_bits: int) -> NflowsGlow:
    p = model.params
    in_shape = tuple(model.in_shape)
    step_params = p.step.params
    multiscale = MultiscaleCompositeTransform(num_transforms=p.levels, split_dim=1)
    shape = tuple(in_shape)
    # multiscale's walker (flowkit.models.LayoutFlow): per level one chain (centring, squeeze, the
    # level's K steps last), then its split; the top level's chain ends the flow.
    levels, splits = model.flow.chains(), model.flow.splits()
    for index, level in enumerate(levels):
        c, h, w = shape
        channels, shape = 4 * c, (4 * c, h // 2, w // 2)
        parts: list[NflowsTransform] = [SqueezeTransform(factor=2)]
        for step in level.transforms[-1].transforms:
            units = list(step.transforms)
            if step_params.actnorm:
                parts.append(_actnorm(units.pop(0), channels))
            conv = GlowOneByOneConvolution(channels)
            conv.copy_weight(units.pop(0).weight_matrix())
            parts.append(conv)
            (coupling,) = units
            parts.append(_coupling(channels, p.step.params.coupling, coupling.net))
        if index < len(levels) - 1:
            parts += _split_prior(splits[index].prior, splits[index].keep, channels, p.split_prior.params.output_scale)
        else:
            top = StandardizeTop(tuple(model.top_prior.loc.shape))
            top.loc.copy_(model.top_prior.loc)
            top.log_scale.copy_(model.top_prior.log_scale)
            parts.append(top)
        hidden = multiscale.add_transform(CompositeTransform(parts), shape)
        shape = hidden if hidden is not None else shape
    transform = CompositeTransform([PointwiseAffineTransform(shift=-0.5, scale=1.0), multiscale])
    flow = Flow(transform, StandardNormal([math.prod(in_shape)]))
    return NflowsGlow(flow, in_shape, n_bits)
