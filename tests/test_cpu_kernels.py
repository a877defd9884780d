"""herd's CPU gemv kernels against a float64 reference, including ragged shapes (row and column tails)."""
from __future__ import annotations

import pytest
import torch

from model import cpu_kernels

SHAPES = [(1, 1), (3, 100), (7, 37), (13, 1541), (960, 576), (4099, 64)]


def available(dtype) -> bool:
    return ("gemv", dtype) in cpu_kernels._library() and ("rms_norm", dtype) in cpu_kernels._library()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_matches_float64_reference(dtype, n, k):
    if not available(dtype):
        pytest.skip(f"herd's {dtype} gemv is not available here (no AVX-512{'-BF16' if dtype == torch.bfloat16 else ''}, "
                    "no C compiler, or HERD_CPU_KERNELS=0)")
    g = torch.Generator().manual_seed(n * 7919 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(k, generator=g).to(dtype)
    ref = torch.mv(w.double(), x.double())
    y = cpu_kernels.gemv(w, x)
    assert y.dtype == dtype and y.shape == (n,)
    # fp32: accumulation order only; bf16: the output's rounding (8 bits of mantissa) on top.
    rel = 1e-5 if dtype == torch.float32 else 2 ** -8
    bound = rel * (w.double().abs() @ x.double().abs()) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


def test_gemv_declines_what_it_does_not_cover():
    w = torch.randn(8, 16)
    x = torch.randn(16)
    assert cpu_kernels.gemv(w.t().contiguous().t(), x) is None  # not row-major
    assert cpu_kernels.gemv(w, x.double()) is None  # dtypes differ
    assert cpu_kernels.gemv(w.double(), x.double()) is None  # no float64 kernel
    assert cpu_kernels.gemv(w.requires_grad_(), x) is None  # autograd needs torch's op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,d", [(1, 576), (3, 37), (20, 64), (1, 1)])
def test_rms_norm_matches_the_torch_path(dtype, rows, d):
    """The kernel computes what model.RMSNorm's torch ops compute (bf16: the same two roundings)."""
    from model.model import RMSNorm

    if not available(dtype):
        pytest.skip(f"herd's {dtype} kernels are not available here")
    g = torch.Generator().manual_seed(rows * 31 + d)
    norm = RMSNorm(d, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    x = (3 * torch.randn(rows, d, generator=g)).to(dtype)
    with torch.no_grad():
        got = cpu_kernels.rms_norm(x, norm.weight, norm.eps)
    with torch.enable_grad():
        ref = norm(x.requires_grad_())  # grad mode: torch's path
    assert got.dtype == dtype and got.shape == x.shape
    # fp32: summation order; bf16: at most one unit in the last place where that order flips a rounding.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
    torch.testing.assert_close(got, ref.detach(), **tol)
