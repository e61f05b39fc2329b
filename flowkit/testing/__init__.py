"""Contract checks for every kind of part, for flowkit's tests and third-party plugins.

Usage in a plugin's own tests::

    from flowkit.testing import check_transform, randomize_
    t = MyCoupling(...).double(); randomize_(t)
    check_transform(t, torch.randn(2, 4, 4, 4, dtype=torch.float64))

One check per kind (`flowkit.kinds.KINDS`): `check_transform` (transforms, couplings, steps),
`check_decomposition`, `check_net`, `check_prior`, `check_dequantizer`, `check_model` and
`check_dataset`. Each raises ``AssertionError`` with the measured discrepancy. Zero-initialised
layers make many parts trivial (a coupling is the identity, a conditional prior ignores its
context), and a check of a trivial part cannot fail: perturb with `randomize_` first.

Tolerances mean what they say: every comparison passes when ``|actual - expected| <= atol +
rtol * |expected|`` with ``atol`` and ``rtol`` exactly as given, no hidden factor. Give one and
the other is 0 (``atol=1e-6`` allows 1e-6, not 1e-6 plus a relative slack). Give neither and
both default by dtype (`default_tolerances`):

===========  ========  ========
dtype        atol      rtol
===========  ========  ========
float64      1e-10     1e-8
float32      1e-5      1e-4
bfloat16     5e-2      5e-2
float16      1e-2      1e-2
===========  ========  ========

Float64 round-off on the tiny inputs these checks want (B = 2, D <= 64, a few dozen layers) is
1e-14 to 1e-12, and a brute-force ``slogdet`` of a D x D Jacobian adds about D·eps·cond; the
float64 defaults leave two orders of margin above that, yet fail when any step of a float64
computation silently runs in float32 (relative error ~1e-7) or a log-det term is off. The
float32 defaults are ~100 ulps relative. A part that is exact only up to a tolerance of its
own (a bisection inverse with ``tol = 1e-6``) needs an explicit, looser ``atol`` at the call
site, with a comment saying why; better, build it with a tighter ``tol`` for the check.
On CUDA, cuDNN runs float32 convolutions in TF32 by default (relative error ~1e-3): run the
checks in float64 there, or set ``torch.backends.cudnn.allow_tf32 = False``.
"""


from __future__ import annotations

from flowkit.testing._common import TOLERANCES, SIGMAS, default_tolerances, randomize_, jacobian_logabsdet, check_rows_independent, check_gradients
from flowkit.testing.transforms import check_transform, check_decomposition, check_net
from flowkit.testing.densities import check_prior, check_dequantizer
from flowkit.testing.models import check_model, check_dataset

__all__ = [
    "SIGMAS",
    "TOLERANCES",
    "check_gradients",
    "check_rows_independent",
    "default_tolerances",
    "jacobian_logabsdet",
    "randomize_",
    "check_decomposition",
    "check_net",
    "check_transform",
    "check_dequantizer",
    "check_prior",
    "check_dataset",
    "check_model",
]
