"""The squeeze decomposition: Glow's space-to-depth layout and its split into sub-pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowkit import ShapeError
from flowkit.testing import check_decomposition
from flowkit_plugins.decompositions.squeeze import SqueezeDecomposition, SqueezeParams


def test_squeeze_layout_on_a_hand_made_2x2_image():
    # Two channels: p q / r s = 1 2 / 3 4 and 5 6 / 7 8.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    s = SqueezeDecomposition(SqueezeParams()).squeeze(x)
    assert s.shape == (1, 8, 1, 1)
    # s[:, 4c + 2i + j] = x[:, c, i, j]
    assert s.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    low, detail, logabsdet = SqueezeDecomposition(SqueezeParams()).split(x)
    assert low.flatten().tolist() == [1.0, 5.0]
    assert detail.flatten().tolist() == [2.0, 3.0, 4.0, 6.0, 7.0, 8.0]
    assert logabsdet.tolist() == [0.0]


def test_squeeze_matches_strided_slices():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    s = SqueezeDecomposition(SqueezeParams()).squeeze(x)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(s[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2], atol=0, rtol=0)
    low, detail, _ = SqueezeDecomposition(SqueezeParams()).split(x)
    torch.testing.assert_close(low, x[:, :, 0::2, 0::2], atol=0, rtol=0)
    for k, (i, j) in enumerate([(0, 1), (1, 0), (1, 1)]):
        torch.testing.assert_close(detail[:, k::3], x[:, :, i::2, j::2], atol=0, rtol=0)


def test_unsqueeze_inverts_squeeze():
    squeeze = SqueezeDecomposition(SqueezeParams())
    x = torch.randn(2, 3, 6, 4)
    s = squeeze.squeeze(x)
    assert s.shape == (2, 12, 3, 2)
    torch.testing.assert_close(squeeze.unsqueeze(s), x, atol=0, rtol=0)
    torch.testing.assert_close(squeeze.squeeze(squeeze.unsqueeze(s)), s, atol=0, rtol=0)


def test_contract_round_trip_and_brute_force_logabsdet():
    check_decomposition(SqueezeDecomposition(SqueezeParams()), torch.randn(2, 3, 4, 2, dtype=torch.float64),
                        atol=1e-12)
    assert SqueezeDecomposition.orthonormal is True


def test_output_shape_and_errors():
    squeeze = SqueezeDecomposition(SqueezeParams())
    assert squeeze.output_shape((3, 8, 6)) == ((3, 4, 3), (9, 4, 3))
    with pytest.raises(ShapeError, match=r"\(1, 3, 5, 4\)"):
        squeeze.split(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ShapeError, match=r"\(1, 6, 2, 2\)"):
        squeeze.unsqueeze(torch.zeros(1, 6, 2, 2))
    with pytest.raises(ShapeError, match=r"\(1, 3, 2, 2\).*\(1, 3, 2, 2\)"):
        squeeze.merge(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


def tf_space_to_depth(x: np.ndarray, block: int = 2) -> np.ndarray:
    """TensorFlow's space_to_depth on NHWC, transcribed from its documentation: output depth index
    (i * block + j) * C + c holds input pixel (block h + i, block w + j) of channel c."""
    b, h, w, c = x.shape
    y = x.reshape(b, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h // block, w // block, block * block * c)


def test_space_to_depth_order_is_flowpps_tf_space_to_depth() -> None:
    """aravindsrinivas/flowpp flows/flows.py SpaceToDepth: tf.space_to_depth(x, 2) on NHWC."""
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    squeeze = SqueezeDecomposition(SqueezeParams(order="space_to_depth"))
    s = squeeze.squeeze(x)
    expected = tf_space_to_depth(x.permute(0, 2, 3, 1).numpy()).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(s.numpy(), expected)
    torch.testing.assert_close(squeeze.unsqueeze(s), x, atol=0, rtol=0)
    # The same pixels as Glow's order, in another channel order; the decomposition view is the same.
    glow = SqueezeDecomposition(SqueezeParams()).squeeze(x)
    assert not torch.equal(s, glow) and torch.equal(s.sort(dim=1).values, glow.sort(dim=1).values)
    for a, b in zip(squeeze.split(x), SqueezeDecomposition(SqueezeParams()).split(x), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def realnvp_squeeze_2x2_ordered(x: np.ndarray) -> np.ndarray:
    """RealNVP's squeeze_2x2_ordered on NHWC (tensorflow/models research/real_nvp/real_nvp_utils.py),
    transcribed from what it computes: a stride-2 2x2 convolution whose kernel sends pixel (i, j) of
    each block of channel c to output channel 4c + k, k = 0, 2, 3, 1 for (0, 0), (0, 1), (1, 0),
    (1, 1) (its SQUEEZE_MATRIX), then the channels reordered as [4c for c] + [4c + 1 for c] + ..."""
    b, h, w, c = x.shape
    k_of = {(0, 0): 0, (0, 1): 2, (1, 0): 3, (1, 1): 1}
    conv = np.zeros((b, h // 2, w // 2, 4 * c))
    for (i, j), k in k_of.items():
        for ch in range(c):
            conv[..., 4 * ch + k] = x[:, i::2, j::2, ch]
    shuffle = [4 * ch + k for k in range(4) for ch in range(c)]
    return conv[..., shuffle]


def test_realnvp_order_is_squeeze_2x2_ordered_and_keeps_a_checkerboard_in_its_first_half() -> None:
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    squeeze = SqueezeDecomposition(SqueezeParams(order="realnvp"))
    s = squeeze.squeeze(x)
    expected = realnvp_squeeze_2x2_ordered(x.permute(0, 2, 3, 1).numpy()).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(s.numpy(), expected)
    torch.testing.assert_close(squeeze.unsqueeze(s), x, atol=0, rtol=0)
    # First half: the pixels with i + j even ((0, 0) then (1, 1) of every block), all channels.
    torch.testing.assert_close(s[:, :3], x[:, :, 0::2, 0::2], atol=0, rtol=0)
    torch.testing.assert_close(s[:, 3:6], x[:, :, 1::2, 1::2], atol=0, rtol=0)
    torch.testing.assert_close(s[:, 6:9], x[:, :, 0::2, 1::2], atol=0, rtol=0)
    torch.testing.assert_close(s[:, 9:], x[:, :, 1::2, 0::2], atol=0, rtol=0)
    check_decomposition(squeeze, x, atol=1e-12)
