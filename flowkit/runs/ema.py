"""Weight averaging for evaluation and sampling: an exponential moving average of the weights.

Flow++ evaluates, samples and reports with an EMA of its weights (decay 0.999,
aravindsrinivas/flowpp ``flows/flow_training.py``: ``tf.train.ExponentialMovingAverage`` applied
after every optimiser step, its shadow variables swapped in for validation and sampling).
`WeightAverage` keeps the same average; it is an ``nn.Module`` whose buffers are the averages,
so checkpoints carry it like any other module (key ``ema``) and resume continues it exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _key(module: str, parameter: str) -> str:
    return f"{module}__{parameter.replace('.', '__')}"


class WeightAverage(nn.Module):
    """``average <- decay * average + (1 - decay) * weight`` after every optimiser step.

    The average starts at the weights it is built from (after the data-dependent
    initialisation), as TensorFlow's ``ExponentialMovingAverage`` does without ``num_updates``.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"train.ema = {decay} must be in (0, 1).")
        self.decay = decay
        self._live: dict[str, nn.Parameter] = {}
        for name, module in modules.items():
            for pname, p in module.named_parameters():
                if p.requires_grad:
                    key = _key(name, pname)
                    self._live[key] = p
                    self.register_buffer(key, p.detach().clone())

    @torch.no_grad()
    def reset(self) -> None:
        """Sets the average to the current weights (after the data-dependent initialisation)."""
        for key, p in self._live.items():
            self.get_buffer(key).copy_(p)

    @torch.no_grad()
    def update(self) -> None:
        averages = [self.get_buffer(k) for k in self._live]
        torch._foreach_lerp_(averages, list(self._live.values()), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_weights(self) -> None:
        """Replaces the weights by their average, for good (a loaded run that evaluates or samples)."""
        for key, p in self._live.items():
            p.copy_(self.get_buffer(key))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in place of the trained ones for the duration of the block."""
        saved = {key: p.detach().clone() for key, p in self._live.items()}
        self.copy_to_weights()
        try:
            yield
        finally:
            with torch.no_grad():
                for key, p in self._live.items():
                    p.copy_(saved[key])


def weight_average(modules: dict[str, nn.Module], decay: float) -> WeightAverage | None:
    """The average a recipe's ``train.ema`` asks for, or None when it is off."""
    return WeightAverage(modules, decay) if decay > 0 else None
