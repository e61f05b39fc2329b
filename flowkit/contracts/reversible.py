"""Memory-saving gradients of invertible sequences: activations rebuilt by the inverse.

A chain of invertible transforms need not store its activations for backward: each unit's
input can be reconstructed from its output with the unit's inverse (Gomez et al., "The
Reversible Residual Network: Backpropagation Without Storing Activations", 2017; memcnn's
``InvertibleModuleWrapper`` does the same per module). `reversible_forward` runs the units
forward without building a graph and keeps only the final output; backward walks the units in
reverse, reconstructs each unit's input, runs that unit forward again with a graph, and
backpropagates through that one unit.
The memory a training step saves for backward then no longer grows with the number of units;
the price is one extra forward and one inverse of every unit in backward.

`flowkit.contracts.transform.Sequential` calls it when its ``recompute`` switch is on
(``train.memory = "recompute"``); the function itself knows nothing of Sequential.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from flowkit.contracts.transform import Transform


def reversible_forward(units: Sequence[Transform], x: Tensor,
                       context: Tensor | None) -> tuple[Tensor, Tensor]:
    r"""``units`` applied in order to ``x``, returning ``(z, Σ logabsdet)``, without storing activations.

    The values are those of running the units one after the other; so are the gradients (up
    to the round-off of the inverses: each unit's input is rebuilt from its output in
    backward), to ``x``, to ``context`` and to every parameter of the units that requires
    grad. The parameters are inputs of the underlying autograd function, so their ``.grad``
    accumulates as usual and distributed data parallel's hooks fire.

    What the units must satisfy (every flowkit transform does):

    - ``unit.inverse(unit(x, c)[0], c)[0] == x`` to round-off. A numerical inverse (the
      mixlogistic bisection) makes the gradients as exact as its tolerance.
    - Their output depends only on their input, the context, their parameters and constant
      buffers. A buffer changed by ``forward`` (a running statistic, a step counter) would be
      changed again by the recomputation and the gradients would be taken at another state;
      no flowkit transform has one (actnorm's initialisation is an explicit ``initialize``).
      A tensor that requires grad and reaches a unit otherwise than as its input, the context
      or its own parameter gets no gradient.
    - Random draws (dropout in a coupling net) are replayed: the RNG state before each unit's
      forward is kept and restored for its inverse and its recomputation, so a unit must draw
      the same numbers in the same order in both directions (a coupling calls its net once
      either way; MaCow's row-by-row inverse calls it many times, so do not combine it with
      dropout here).
    - Autocast is replayed in backward as it was in forward.

    Memory: backward holds the final output (saved for backward), the context and, while one
    unit is recomputed, that unit's activations. The RNG states (5 KB each on a CPU, kept only
    for modules in training mode) are held outside autograd's saved tensors.

    Args:
        units: the transforms, applied in order (data to latent); at least one.
        x: the input ``(B, ...)``.
        context: ``None`` or a tensor with leading dimension ``B``, handed to every unit; it
            may require grad (Wavelet Flow's conditioner), and its gradient sums over units.

    Returns:
        ``(z, logabsdet)`` as `flowkit.contracts.transform.Sequential` returns them.
    """
    if not units:
        raise ValueError("reversible_forward needs at least one unit.")
    params: list[nn.Parameter] = []
    index: dict[int, int] = {}
    for unit in units:
        for p in unit.parameters():
            if p.requires_grad and id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
    return _Reversible.apply(tuple(units), index, x, context, *params)


class _Replay:
    """The RNG and autocast state of one forward, to run a unit again exactly as it ran."""

    def __init__(self, device: torch.device, keep_rng: bool) -> None:
        self.device = device
        self.cpu_rng = torch.get_rng_state() if keep_rng else None
        self.cuda_rng = torch.cuda.get_rng_state(device) if keep_rng and device.type == "cuda" else None
        self.autocast = torch.is_autocast_enabled(device.type)
        self.autocast_dtype = torch.get_autocast_dtype(device.type)

    @contextlib.contextmanager
    def state(self) -> Iterator[None]:
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, enabled=self.cpu_rng is not None):
            if self.cpu_rng is not None:
                torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast):
                yield


class _Reversible(torch.autograd.Function):
    """Forward: every unit without a graph; backward: invert, recompute, backpropagate, unit by unit."""

    @staticmethod
    def forward(ctx: Any, units: tuple[Transform, ...], index: dict[int, int], x: Tensor,
                context: Tensor | None, *params: Tensor) -> tuple[Tensor, Tensor]:
        # autograd.Function.forward runs with grad disabled: no unit builds a graph.
        keep_rng = any(module.training for unit in units for module in unit.modules())
        replays = []
        logabsdet = None
        for unit in units:
            replays.append(_Replay(x.device, keep_rng))
            x, unit_logabsdet = unit(x, context)
            logabsdet = unit_logabsdet if logabsdet is None else logabsdet + unit_logabsdet
        ctx.units, ctx.index, ctx.replays = units, index, replays
        ctx.context_is_none = context is None
        ctx.save_for_backward(x, context)
        return x, logabsdet

    @staticmethod
    @once_differentiable  # the local graphs are built and consumed inside; no double backward
    def backward(ctx: Any, grad_z: Tensor, grad_logabsdet: Tensor) -> tuple[Tensor | None, ...]:
        z, context = ctx.saved_tensors
        context_needs_grad = not ctx.context_is_none and ctx.needs_input_grad[3]
        param_grads: list[Tensor | None] = [None] * (len(ctx.needs_input_grad) - 4)
        grad_context = None
        for unit, replay in zip(reversed(ctx.units), reversed(ctx.replays), strict=True):
            with torch.no_grad(), replay.state():
                x, _ = unit.inverse(z, context)
            own = [p for p in unit.parameters() if p.requires_grad]
            # A unit's parameters are unique within it but may be shared with another unit.
            own = list({id(p): p for p in own}.values())
            with torch.enable_grad(), replay.state():
                x = x.detach().requires_grad_(True)
                unit_context = context.detach().requires_grad_(True) if context_needs_grad else context
                z_again, logabsdet = unit(x, unit_context)
                outputs, grads = [z_again], [grad_z]
                if logabsdet.requires_grad:
                    outputs.append(logabsdet)
                    grads.append(grad_logabsdet)
                inputs = [x, *([unit_context] if context_needs_grad else []), *own]
                found = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
            grad_z = found[0] if found[0] is not None else torch.zeros_like(x)
            if context_needs_grad:
                grad_context = _add(grad_context, found[1])
            for p, g in zip(own, found[1 + context_needs_grad:], strict=True):
                slot = ctx.index[id(p)]
                param_grads[slot] = _add(param_grads[slot], g)
            z = x.detach()
        return (None, None, grad_z, grad_context, *param_grads)


def _add(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    if term is None:
        return total
    return term if total is None else total + term
