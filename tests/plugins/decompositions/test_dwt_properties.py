"""Orthonormality, log-det, gradients, dtypes and shape errors of the wavelet decompositions."""

from __future__ import annotations

import pytest
import pywt
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkit import NoParams, ShapeError
from flowkit.testing import check_decomposition
from flowkit_plugins.decompositions.daubechies import DaubechiesDecomposition
from flowkit_plugins.decompositions.haar import HaarDecomposition

DECOMPOSITIONS = {"haar": HaarDecomposition(NoParams())} | {
    f"db{order}": DaubechiesDecomposition(order) for order in range(2, 9)
}
NAMES = sorted(DECOMPOSITIONS)


@pytest.mark.parametrize("size", [(4, 4), (2, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_contract_round_trip_and_brute_force_logabsdet(name, size):
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    check_decomposition(DECOMPOSITIONS[name], x, atol=1e-10)


@settings(deadline=None, max_examples=25)
@given(
    name=st.sampled_from(NAMES),
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    half_h=st.integers(1, 12),
    half_w=st.integers(1, 12),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_norm_is_preserved(name, batch, channels, half_h, half_w, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(batch, channels, 2 * half_h, 2 * half_w, dtype=torch.float64, generator=generator)
    decomposition = DECOMPOSITIONS[name]
    low, detail, _ = decomposition.split(x)
    squared = low.pow(2).sum((1, 2, 3)) + detail.pow(2).sum((1, 2, 3))
    torch.testing.assert_close(squared, x.pow(2).sum((1, 2, 3)), atol=0, rtol=1e-12)
    x_back, _ = decomposition.merge(low, detail)
    torch.testing.assert_close(x_back, x, atol=1e-12 * scale, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_of_squared_norm_is_2x(name):
    # ||split(x)||^2 = ||x||^2 for an orthonormal map, so its gradient is exactly 2x.
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    low, detail, _ = DECOMPOSITIONS[name].split(x)
    (low.pow(2).sum() + detail.pow(2).sum()).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, 2 * x.detach(), atol=1e-12, rtol=0)

    low = low.detach().requires_grad_()
    detail = detail.detach().requires_grad_()
    x_back, _ = DECOMPOSITIONS[name].merge(low, detail)
    x_back.pow(2).sum().backward()
    torch.testing.assert_close(low.grad, 2 * low.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(detail.grad, 2 * detail.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["haar", "db4", "db8"])
def test_float32_input_gives_float32_outputs_close_to_float64(name):
    decomposition = DECOMPOSITIONS[name]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    low32, detail32, logabsdet32 = decomposition.split(x.float())
    low64, detail64, _ = decomposition.split(x)
    assert low32.dtype == detail32.dtype == logabsdet32.dtype == torch.float32
    torch.testing.assert_close(low32.double(), low64, atol=1e-5, rtol=0)
    torch.testing.assert_close(detail32.double(), detail64, atol=1e-5, rtol=0)
    x_back, logabsdet = decomposition.merge(low32, detail32)
    assert x_back.dtype == logabsdet.dtype == torch.float32
    torch.testing.assert_close(x_back, x.float(), atol=1e-5, rtol=0)


def test_autocast_does_not_lower_the_precision():
    decomposition = DECOMPOSITIONS["db4"]
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, detail, _ = decomposition.split(x)
        x_back, _ = decomposition.merge(low, detail)
    assert low.dtype == x_back.dtype == torch.float32
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=0)


def test_filters_are_pywt_buffers_outside_the_state_dict():
    decomposition = DaubechiesDecomposition(4)
    assert decomposition.dec_lo.tolist() == pywt.Wavelet("db4").dec_lo
    assert decomposition.dec_hi.tolist() == pywt.Wavelet("db4").dec_hi
    assert dict(decomposition.named_buffers()).keys() == {"dec_lo", "dec_hi"}
    assert decomposition.orthonormal is True
    assert dict(decomposition.state_dict()) == {}
    assert list(decomposition.parameters()) == []


def test_output_shape_halves_h_and_w():
    assert DECOMPOSITIONS["db2"].output_shape((3, 8, 6)) == ((3, 4, 3), (9, 4, 3))


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 4, 7), (2, 3, 0, 4), (3, 4, 4)])
def test_split_rejects_bad_shapes_naming_them(shape):
    with pytest.raises(ShapeError, match=re_shape(shape)):
        DECOMPOSITIONS["haar"].split(torch.zeros(shape))


def test_output_shape_rejects_odd_sizes_naming_them():
    with pytest.raises(ShapeError, match=r"\(3, 9, 8\).*even"):
        DECOMPOSITIONS["db3"].output_shape((3, 9, 8))


def test_merge_rejects_mismatched_bands():
    with pytest.raises(ShapeError, match=r"\(2, 3, 4, 4\).*\(2, 6, 4, 4\)"):
        DECOMPOSITIONS["haar"].merge(torch.zeros(2, 3, 4, 4), torch.zeros(2, 6, 4, 4))


def test_integer_input_is_rejected():
    with pytest.raises(ShapeError, match="floating-point"):
        DECOMPOSITIONS["haar"].split(torch.zeros(1, 1, 4, 4, dtype=torch.int64))


def re_shape(shape: tuple[int, ...]) -> str:
    return "\\(" + ", ".join(str(n) for n in shape) + "\\)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["haar", "db8"])
def test_cuda_matches_cpu(name):
    decomposition = DECOMPOSITIONS[name]
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    low, detail, _ = decomposition.split(x)
    low_gpu, detail_gpu, logabsdet = decomposition.to("cuda").split(x.cuda())
    assert logabsdet.device.type == "cuda"
    torch.testing.assert_close(low_gpu.cpu(), low, atol=1e-10, rtol=0)
    torch.testing.assert_close(detail_gpu.cpu(), detail, atol=1e-10, rtol=0)
    x_back, _ = decomposition.merge(low_gpu, detail_gpu)
    torch.testing.assert_close(x_back.cpu(), x, atol=1e-10, rtol=0)
    # float32 stays exact to float32 round-off: no TF32 anywhere (a cuDNN convolution would use it).
    x32 = x.float().cuda()
    x_back32, _ = decomposition.merge(*decomposition.split(x32)[:2])
    torch.testing.assert_close(x_back32, x32, atol=1e-5, rtol=0)
    decomposition.to("cpu")
