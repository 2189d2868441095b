"""Property-based checks over random shapes: bnlab == torch.nn.BatchNorm* (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab

CLASSES = {
    2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
    3: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
    4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d),
    5: (bnlab.BatchNorm3d, torch.nn.BatchNorm3d),
}


@st.composite
def inputs(draw):
    rank = draw(st.integers(2, 5))
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 9))
    spatial = [draw(st.integers(1, 5)) for _ in range(rank - 2)]
    shape = (n, c, *spatial)
    if n * int(torch.tensor(spatial).prod().item() if spatial else 1) < 2:
        shape = (n + 1, c, *spatial)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    shift = draw(st.sampled_from([0.0, -3.0, 100.0]))
    momentum = draw(st.sampled_from([0.1, 0.5, None]))
    affine = draw(st.booleans())
    return shape, seed, scale, shift, momentum, affine


@settings(max_examples=60, deadline=None)
@given(inputs())
def test_random_shapes_match_torch(params):
    shape, seed, scale, shift, momentum, affine = params
    g = torch.Generator().manual_seed(seed)
    ours_cls, torch_cls = CLASSES[len(shape)]
    ours = ours_cls(shape[1], momentum=momentum, affine=affine, dtype=torch.float64)
    ref = torch_cls(shape[1], momentum=momentum, affine=affine, dtype=torch.float64)
    for _ in range(2):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr, rtol=1e-9, atol=1e-9)
        yo.backward(dy)
        yr.backward(dy)
        # dx scales like 1/std of the input
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-7, atol=1e-9 / scale)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-10, atol=1e-12)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-9)
    ours.eval()
    ref.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-9)
