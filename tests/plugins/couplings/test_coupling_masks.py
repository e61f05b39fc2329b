"""The shared mask helpers of the couplings."""

from __future__ import annotations

import torch

from flowkit.nn.masks import checkerboard


def test_checkerboard_parities_are_complementary_and_alternate():
    even, odd = checkerboard(4, 6, 0), checkerboard(4, 6, 1)
    assert even.shape == (1, 1, 4, 6) and even.dtype == torch.bool
    assert bool((even ^ odd).all())
    assert bool(even[0, 0, 0, 0]) and not bool(even[0, 0, 0, 1]) and not bool(even[0, 0, 1, 0])
    assert int(even.sum()) == 12
