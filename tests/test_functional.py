"""The transform and its hand-written backward against float64 autograd oracles, on both
backends (the reference functions and the fused kernels, see conftest's ``backend``)."""

from __future__ import annotations

import pytest
import torch

from bnlab import backend as B
from bnlab import functional as F
from bnlab.autograd import batch_norm_eval, batch_norm_train
from conftest import SHAPES, to_format

pytestmark = pytest.mark.usefixtures("backend")  # every test once per backend (conftest)


def train_forward(x, weight, bias, eps):
    """batch_norm_train_forward on the selected backend: (y, mean, var, invstd)."""
    return B.train_forward(x, weight, bias, eps)[1:]


def reference_bn(x, weight, bias, eps):
    """Algorithm 1 written with autograd-tracked float64 ops (the oracle)."""
    dims = F.reduce_dims(x)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_train(shape, affine):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64, requires_grad=True) + 0.5 if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    if affine:
        w = w.detach().requires_grad_()
    inputs = (x, w, b, 1e-5)
    assert torch.autograd.gradcheck(lambda *a: batch_norm_train(*a)[0], inputs)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_eval(shape, affine):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(c, dtype=torch.float64)
    rv = torch.rand(c, dtype=torch.float64) + 0.5
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    assert torch.autograd.gradcheck(lambda *a: batch_norm_eval(*a), (x, rm, rv, w, b, 1e-5))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_autograd_oracle_float64(shape):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    w = torch.rand(c, dtype=torch.float64) + 0.5
    b = torch.randn(c, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)

    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    bs = [b.clone().requires_grad_() for _ in range(2)]
    y_ours, mean, var = batch_norm_train(xs[0], ws[0], bs[0], 1e-5)
    y_ref = reference_bn(xs[1], ws[1], bs[1], 1e-5)
    (y_ours * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-12, atol=1e-12)
    for a, r in [(xs[0].grad, xs[1].grad), (ws[0].grad, ws[1].grad), (bs[0].grad, bs[1].grad)]:
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
    dims = F.reduce_dims(x)
    torch.testing.assert_close(mean, x.mean(dims))
    torch.testing.assert_close(var, x.var(dims, unbiased=False))


def test_large_mean_variance_is_stable_in_float32():
    """Mean 1e4, std 1: E[x^2]-E[x]^2 would lose everything in float32; we must not."""
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(64, 16, 8, 8, dtype=torch.float64, generator=g) + 1e4
    y32, mean, var, _ = train_forward(x64.float(), None, None, 1e-5)
    dims = F.reduce_dims(x64)
    x32_as64 = x64.float().double()  # the float32 input, exactly, in float64
    ref_var = x32_as64.var(dims, unbiased=False)
    ref_mean = x32_as64.mean(dims)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    ref_y = (x32_as64 - ref_mean.view(1, -1, 1, 1)) / torch.sqrt(ref_var.view(1, -1, 1, 1) + 1e-5)
    # y is off by at most the float32 rounding of the mean itself: half an ulp at 1e4 is 4.9e-4,
    # in units of the std (1). (The reference path centres exactly and lands far below this.)
    torch.testing.assert_close(y32.double(), ref_y, rtol=0, atol=6e-4)


@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("shape", [(6, 3), (2, 2, 2, 2)])
def test_double_backward_matches_finite_differences(shape, relu):
    """A backward taken with create_graph=True (double backward, gradient penalties) is itself
    differentiable: gradgradcheck compares second derivatives with finite differences, for the
    training transform and the inference one, with and without the fused ReLU."""
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64)

    def train(x, w, b):
        return batch_norm_train(x, w, b, 1e-5, relu)[0]

    def infer(x, w, b):
        return batch_norm_eval(x, rm, rv + 0.5, w, b, 1e-5, relu)

    assert torch.autograd.gradgradcheck(train, (x, w, b))
    assert torch.autograd.gradgradcheck(infer, (x, w, b))
    # second derivative of a gradient penalty: matches the float64 autograd oracle
    (gx,) = torch.autograd.grad((train(x, w, b) ** 3).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), w)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    yr = reference_bn(xr, wr, b.detach(), 1e-5)
    yr = yr.clamp_min(0) if relu else yr
    (gxr,) = torch.autograd.grad((yr**3).sum(), xr, create_graph=True)
    (gwr,) = torch.autograd.grad(gxr.square().sum(), wr)
    torch.testing.assert_close(gw, gwr, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 3, 4, 3, 5)])
def test_channels_last_preserved(shape):
    x = to_format(torch.randn(shape), "channels_last")
    y, *_ = train_forward(x, torch.ones(3), torch.zeros(3), 1e-5)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt)
    assert not y.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_float32_statistics(dtype):
    x = (torch.randn(32, 4, 6, 6) * 2 + 3).to(dtype)
    y, mean, var, _ = train_forward(x, None, None, 1e-5)
    assert y.dtype == dtype and mean.dtype == torch.float32 and var.dtype == torch.float32
    xf = x.float()
    torch.testing.assert_close(mean, xf.mean((0, 2, 3)))
    torch.testing.assert_close(var, xf.var((0, 2, 3), unbiased=False))
