"""Base distributions of flows, optionally conditioned on a context tensor."""

from __future__ import annotations

from torch import Tensor, nn

Shape = tuple[int, ...]


class Prior(nn.Module):
    """A density on latents of shape ``(B, *shape)``.

    - ``log_prob(z, context=None) -> (B,)`` in at least float32.
    - ``sample(n, context=None, temperature=1.0) -> (n, *shape)``: the temperature scales the
      standard deviation (Glow's convention: sampling from p(z)^(1/T²) for a Gaussian).
      With context, ``n`` must equal the context's batch size.
    - ``mean(n, context=None)``: the mode, used for temperature-0 sampling.
    """

    shape: Shape
    context_shape: Shape | None = None

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError

    def mean(self, n: int, context: Tensor | None = None) -> Tensor:
        return self.sample(n, context, temperature=0.0)
