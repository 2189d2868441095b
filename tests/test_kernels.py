"""Fused kernels (bnlab.kernels) against the reference path and torch, dispatch, BN+ReLU.

Oracles: :mod:`bnlab.functional` (the reference path, same contract), ``torch.nn.BatchNorm*``
followed by ``torch.relu`` for the fused activation, float64 autograd (gradcheck).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import backend as B
from bnlab import functional as F
from bnlab import kernels as K
from bnlab.kernels import _numba
from conftest import family_classes, to_format

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=2e-5, atol=5e-5),
}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """contiguous, channels_last (rank 4 or 5: torch's formats; the kernels take no other
    channels-innermost layout, since torch's output for one is contiguous), or a
    non-contiguous slice of a larger tensor."""
    if layout == "channels_last" and x.dim() in (4, 5):
        perm = (0, *range(2, x.dim()), 1)
        inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return x.permute(perm).contiguous().permute(inv)
    if layout == "strided":
        big = torch.zeros(x.shape[0] * 2, *x.shape[1:], dtype=x.dtype)
        big[::2] = x
        return big[::2]
    return x.contiguous()


def _params(c, dtype, kind, gen):
    if kind == "none":
        return None, None
    w = torch.rand(c, dtype=dtype, generator=gen) + 0.5
    b = torch.randn(c, dtype=dtype, generator=gen) if kind == "affine" else None
    return w, b


def check_fused_matches_reference(x, w, b, relu, gen):
    """Train forward/backward and eval forward/backward: fused == reference (x's dtype tol)."""
    tol = TOL[x.dtype]
    dy = _layout(torch.randn(x.shape, dtype=x.dtype, generator=gen), "contiguous")
    with B.use_backend("fused"):
        path, y, mean, var, inv = B.train_forward(x, w, b, 1e-5, relu=relu)
        assert path == "fused"
        grads = B.train_backward(path, dy, x, mean, inv, w, y=y if relu else None)
        rm = mean + 0.1
        rv = var + 0.5
        _, ye, inve = B.eval_forward(x, rm, rv, w, b, 1e-5, relu=relu)
        egrads = B.eval_backward(path, dy, x, rm, inve, w, y=ye if relu else None)
    with B.use_backend("reference"):
        path, yr, meanr, varr, invr = B.train_forward(x, w, b, 1e-5, relu=relu)
        gradsr = B.train_backward(path, dy, x, meanr, invr, w, y=yr if relu else None)
        _, yer, inver = B.eval_forward(x, rm, rv, w, b, 1e-5, relu=relu)
        egradsr = B.eval_backward(path, dy, x, rm, inver, w, y=yer if relu else None)
    # layout preserved, with the format's own strides (torch's: where a size-1 dimension's
    # stride differs, the same addresses), and the gradient in x's strides (torch's)
    want = F.standard_strides(x).stride()
    assert y.stride() == want and ye.stride() == want and yr.stride() == want
    assert yer.stride() == want
    for a, r in [(y, yr), (mean, meanr), (var, varr), (inv, invr), (ye, yer), (inve, inver)]:
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, **tol)
    m = x.numel() // x.shape[1]
    for a, r in zip(grads + egrads, gradsr + egradsr, strict=True):
        assert (a is None) == (r is None)
        if a is not None:
            # dgamma/dbeta are sums of m terms: compare on that scale
            torch.testing.assert_close(a, r, rtol=tol["rtol"], atol=tol["atol"] * m**0.5)
            if a.dim() == x.dim():
                assert a.stride() == x.stride()


@settings(max_examples=60, deadline=None)
@given(
    rank=st.integers(2, 5),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    params=st.sampled_from(["affine", "scale", "none"]),
    relu=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_matches_reference_random_shapes(rank, data, dtype, layout, params, relu, seed):
    shape = tuple(data.draw(st.integers(1, 9), label=f"dim{i}") for i in range(rank))
    if torch.Size(shape).numel() // shape[1] < 2:
        shape = (shape[0] + 1, *shape[1:])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=gen) * 3 + 1
    x = _layout(x, layout)
    w, b = _params(shape[1], dtype, params, gen)
    check_fused_matches_reference(x, w, b, relu, gen)


@pytest.mark.parametrize(
    "shape",
    [
        (64, 1, 3, 3),  # C = 1
        (2, 4),  # N*H*W = 2, dense
        (1, 3, 2),  # N*L = 2
        (2, 5, 1, 1),  # HW = 1 (a (N, C) tensor in disguise)
        (1, 6, 1, 2),  # N*H*W = 2
        (3, 20000),  # huge C, dense
        (7, 1100),  # rows of a page or more (f32 and f64): groups of whole rows, none full for
        # the statistics (8 rows), one and three rows left for the gradient sums (4 rows)
        (100, 1088),  # the same, parallel: chunks of 64 and 36 rows, four rows left in the second
        (2, 1030, 3, 1),  # the same in channels_last: six rows of 1030 channels
        (2100, 1040),  # wide with few rows: 32 chunks of 66 rows (above _MIN_ROWS), 54 last
        (2, 20000, 1, 2),  # huge C, spatial
        (1000, 3),  # long dense, few channels
        (60, 300),  # dense, at most SERIAL_MAX values: the serial kernels
        (300, 300),  # dense above SERIAL_MAX: the chunked parallel kernels
        (16, 8, 512),  # (N, C, S) of exactly SERIAL_MAX values: the serial loops
        (16, 8, 513),  # one row value more: the parallel loops, chunks of (n, c) rows
        (3, 16, 41, 43),  # channels_last: 5,289 rows of 16, not a whole number of flat tiles
        (5, 32, 3, 7),  # channels_last: flat tiles of two 32-channel rows, one row left
        (3, 64, 5, 5),  # channels_last: a 64-channel row is one flat tile
        (8, 128, 9, 9),  # channels_last above SERIAL_MAX: 128-channel rows, parallel chunks
        (613, 192),  # dense: 192-channel rows, parallel chunks
        (70000, 1),  # long dense, one channel (several row chunks)
        (3, 2, 70000),  # long rows
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_odd_sizes(shape, layout, dtype):
    gen = torch.Generator().manual_seed(3)
    x = _layout(torch.randn(shape, dtype=dtype, generator=gen) * 2 - 1, layout)
    w, b = _params(shape[1], dtype, "affine", gen)
    check_fused_matches_reference(x, w, b, relu=False, gen=gen)
    check_fused_matches_reference(x, w, None, relu=True, gen=gen)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(4, 3, 1, generator=g).transpose(1, 2),  # (4, 1, 3), strides (3, 1, 1)
        lambda g: torch.randn(5, 1, 3, 4, generator=g).transpose(0, 1),  # (1, 5, 3, 4), N stride 12
        lambda g: torch.randn(4, 1, 1, 6, generator=g).permute(0, 3, 1, 2),  # (4, 6, 1, 1), both
        lambda g: torch.randn(3, 1, generator=g).t().expand(1, 3).contiguous().t(),  # (3, 1)
    ],
    ids=["C=1", "N=1", "HW=1", "dense"],
)
def test_contiguous_inputs_with_unusual_size_one_strides(make):
    """torch calls a tensor contiguous whatever the strides of its size-1 dimensions; the kernels'
    numpy views of such inputs and of their outputs must still be views (not copies the kernel
    would write into unseen), and the outputs keep the input's strides."""
    gen = torch.Generator().manual_seed(5)
    x = make(gen) * 2 + 1
    assert x.is_contiguous()
    w, b = _params(x.shape[1], x.dtype, "affine", gen)
    check_fused_matches_reference(x, w, b, relu=False, gen=gen)
    check_fused_matches_reference(x, w, None, relu=True, gen=gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_large_mean_is_stable_in_float32_both_layouts(layout, offset):
    """Mean 1e4, std 1 in float32 (the foundation's test) on each kernel layout, plus a check
    against float64 statistics of the exact float32 input."""
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(64, 16, 8, 8, dtype=torch.float64, generator=g) + offset
    x = to_format(x64.float(), layout)
    with B.use_backend("fused"):
        _, y, mean, var, _ = B.train_forward(x, None, None, 1e-5)
    xe = x.double()
    dims = F.reduce_dims(xe)
    torch.testing.assert_close(var.double(), xe.var(dims, unbiased=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), xe.mean(dims), rtol=1e-7, atol=0)
    centred = xe - xe.mean(dims, keepdim=True)
    ref = centred / torch.sqrt(xe.var(dims, keepdim=True, unbiased=False))
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("rows", [60, 400], ids=["serial-kernel", "chunked-kernel"])
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_large_mean_is_stable_in_float32_dense(rows, offset):
    """The same for a dense (N, C) input on both the serial kernel and the chunked
    one, forward and backward (float64 oracle on the exact float32 input)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(rows, 300, dtype=torch.float64, generator=g) + offset).float()
    dy = torch.randn(rows, 300, generator=g)
    assert (x.numel() <= _numba.SERIAL_MAX) == (rows == 60)
    with B.use_backend("fused"):
        path, y, mean, var, invstd = B.train_forward(x, None, None, 1e-5)
        dx, _, _ = B.train_backward(path, dy, x, mean, invstd, None)
    xe = x.double()
    torch.testing.assert_close(var.double(), xe.var(0, unbiased=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), xe.mean(0), rtol=1e-7, atol=0)
    xr = xe.clone().requires_grad_()
    ref = (xr - xr.mean(0)) / torch.sqrt(xr.var(0, unbiased=False) + 1e-5)
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=2e-3)
    torch.testing.assert_close(dx.double(), xr.grad, rtol=0, atol=2e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float64_huge_offset_keeps_variance(layout):
    """mean 1e9, std 1e-3 in float64: a one-pass E[x^2]-E[x]^2 would return garbage."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 3, 50, dtype=torch.float64, generator=g) * 1e-3 + 1e9
    x = _layout(x, layout)
    with B.use_backend("fused"):
        _, _, mean, var, _ = B.train_forward(x, None, None, 1e-12)
    xc = x - 1e9  # exact (Sterbenz): the oracle sees the true deviations
    xc = xc - xc.mean((0, 2), keepdim=True)
    torch.testing.assert_close(var, (xc * xc).mean((0, 2)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_outlier_first_value_keeps_variance(layout):
    """The statistics shift by each channel's first value; a first value 1000 sigma out must
    not cost precision (shifted-sum error ~1e-16 * 1000^2 relative)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, 30, 40, dtype=torch.float64, generator=g)
    x[0, :, 0, 0] = 1000.0
    x = to_format(x, layout)
    with B.use_backend("fused"):
        _, _, mean, var, _ = B.train_forward(x, None, None, 1e-5)
    xc = x - x.mean((0, 2, 3), keepdim=True)
    torch.testing.assert_close(var, (xc * xc).mean((0, 2, 3)), rtol=1e-9, atol=0)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=0, atol=1e-11)


# ------------------------------------------------------------------------- dispatch
def test_choose_and_fallbacks():
    x = torch.randn(4, 3, 5, 5)
    with bnlab.use_backend("auto"):
        assert B.choose(x) == "fused"
        assert B.choose(to_format(x, "channels_last")) == "fused"
        assert B.choose(x[:, :, ::2]) == "reference"  # unsupported strides
        # 16-bit floats: the kernels in float32, with parameters of their dtype or float32
        assert B.choose(x.bfloat16()) == "fused32"
        assert B.choose(x.half(), torch.ones(3), torch.ones(3, dtype=torch.half)) == "fused32"
        assert B.choose(x.bfloat16(), torch.ones(3, dtype=torch.float64)) == "reference"
        assert B.choose(x.bfloat16()[:, :, ::2]) == "reference"
        assert B.choose(x, torch.ones(3, dtype=torch.float64)) == "reference"  # mixed dtypes
    with bnlab.use_backend("reference"):
        assert B.choose(x) == "reference"
    with bnlab.use_backend("fused"):
        assert B.choose(x.bfloat16()) == "fused32"
        with pytest.raises(ValueError, match="bfloat16"):
            B.choose(x.bfloat16()[:, :, ::2])
        with pytest.raises(ValueError, match="strides"):
            B.choose(x[:, :, ::2])
        # the layer takes it as torch does: copied into torch's output layout, which the kernels
        # read (and the kernels themselves refuse it)
        with pytest.raises(ValueError, match="strides"):
            K.batch_norm_train_forward(x[:, :, ::2], None, None, 1e-5)
        y = bnlab.BatchNorm2d(3)(x[:, :, ::2])
        want = torch.nn.BatchNorm2d(3)(x[:, :, ::2])
        torch.testing.assert_close(y, want)
        assert y.stride() == want.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("params", ["float32", "input"])
def test_16_bit_inputs_take_the_kernels_in_float32(dtype, layout, relu, params):
    """A bf16/fp16 input (parameters float32, as under autocast, or of the input's dtype) on the
    "fused32" path. Oracle: torch's BatchNorm2d (+ ReLU) in float32 on the same values, results
    rounded once to the 16-bit dtype (what the path claims); outputs also against torch's own
    16-bit BatchNorm2d (torch's parameter gradients in 16-bit parameters come out of other
    roundings and are not the oracle). Training (outputs, gradients, running statistics), then
    eval."""
    g = torch.Generator().manual_seed(8)
    x = _layout(torch.randn(6, 5, 7, 9, generator=g) * 3 + 2, layout).to(dtype)
    dy = _layout(torch.randn(x.shape, generator=g), layout).to(dtype)
    p_dtype = torch.float32 if params == "float32" else dtype
    ours = bnlab.BatchNorm2d(5, activation="relu" if relu else None).to(p_dtype)
    ref = torch.nn.BatchNorm2d(5)  # float32
    native = torch.nn.BatchNorm2d(5).to(p_dtype)  # torch's 16-bit kernel
    w, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    w, b = w.to(p_dtype).float(), b.to(p_dtype).float()  # the oracle gets the rounded values
    with torch.no_grad():
        for m in (ours, ref, native):
            m.weight.copy_(w)
            m.bias.copy_(b)
    assert B.choose(x, ours.weight, ours.bias, ours.running_mean) == "fused32"
    one = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    for train in (True, False):
        for m in (ours, ref, native):
            m.train(train)
        xo, xr = x.clone().requires_grad_(), x.float().requires_grad_()
        yo = ours(xo)
        zr = ref(xr)
        yr = torch.relu(zr) if relu else zr
        assert yo.dtype == dtype and yo.stride() == x.stride()
        torch.testing.assert_close(yo, yr.to(dtype), **one)
        with torch.no_grad():
            yn = native(x)
            torch.testing.assert_close(yo, torch.relu(yn) if relu else yn, rtol=3e-2, atol=4e-2)
        yo.backward(dy)
        yr.backward(dy.float())
        assert xo.grad.dtype == dtype and ours.weight.grad.dtype == p_dtype
        # (where the BN output rounds to 0 in fp16 but not in float32, the masks differ: left out)
        keep = (zr.detach().abs() > one["atol"]) | (not relu)
        torch.testing.assert_close(xo.grad[keep], xr.grad.to(dtype)[keep], **one)
        for a, r in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            torch.testing.assert_close(a.grad, r.grad.to(p_dtype), rtol=one["rtol"], atol=0.1)
            a.grad = r.grad = None
        torch.testing.assert_close(ours.running_mean.float(), ref.running_mean, **one)
        torch.testing.assert_close(ours.running_var.float(), ref.running_var, **one)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape",
    [(6, 5, 7, 9), (16, 8, 32, 33), (12, 192, 5, 6), (3, 2064, 5, 7)],
    ids=["serial", "parallel", "blocks", "wide"],
)  # (in channels_last, blocks: column blocks of 64 channels; wide: rows of 4 KB or more in
# bfloat16 and float32, groups of rows)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_bfloat16_is_read_as_it_is_and_matches_its_float32_copy(layout, shape, relu):
    """The kernels read bfloat16 bits directly. Oracle: the same kernels on the float32 copy of
    the input (exact: a bfloat16 value widens to float32 without rounding), outputs rounded once
    by torch. The loops are compiled with reassociation and contraction allowed, so the two
    specializations may round an intermediate differently in its last bit: statistics and
    parameter gradients agree to float32 rounding, outputs and dx to one bfloat16 rounding step
    (nearly all identical). Also the backend's backward with a float32 gradient for a bfloat16
    input (converted to float32 whole), against the same oracle."""
    g = torch.Generator().manual_seed(11)
    x = _layout(torch.randn(shape, generator=g) * 3 + 2, layout).bfloat16()
    dy = _layout(torch.randn(shape, generator=g), layout).bfloat16()
    c = shape[1]
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    x32 = x.float()
    f32 = dict(rtol=2e-6, atol=2e-6)

    def same_bf16(a, r32):
        """a (bfloat16) is r32 rounded, or one rounding step away where r32 sits at a tie."""
        r = r32.bfloat16()
        assert a.dtype == torch.bfloat16 and a.stride() == x.stride()
        torch.testing.assert_close(a.float(), r.float(), rtol=2**-7, atol=1e-30)
        assert (a != r).float().mean() < 1e-3

    y, mean, var, inv = K.batch_norm_train_forward(x, w, b, 1e-5, relu=relu)
    y32, mean32, var32, inv32 = K.batch_norm_train_forward(x32, w, b, 1e-5, relu=relu)
    same_bf16(y, y32)
    for a, r in ((mean, mean32), (var, var32), (inv, inv32)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, **f32)
    dx, dw, db = K.batch_norm_train_backward(dy, x, mean, inv, w, y=y if relu else None)
    ref = K.batch_norm_train_backward(
        dy.float(), x32, mean, inv, w, y=y.float() if relu else None
    )  # (same statistics and the same rounded output's mask on both sides)
    same_bf16(dx, ref[0])
    m = x.numel() // c
    for a, r in ((dw, ref[1]), (db, ref[2])):
        torch.testing.assert_close(a, r, rtol=2e-6, atol=2e-6 * m**0.5)
    got = B.train_backward("fused32", dy.float(), x, mean, inv, w, y=y if relu else None)
    assert torch.equal(got[0], ref[0].bfloat16())  # (the float32 kernels themselves)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    ye, _ = K.batch_norm_eval_forward(x, mean + 0.1, var + 0.5, w, b, 1e-5, relu=relu)
    ye32, _ = K.batch_norm_eval_forward(x32, mean + 0.1, var + 0.5, w, b, 1e-5, relu=relu)
    same_bf16(ye, ye32)


def test_bfloat16_conversions_are_torchs():
    """The loops' element conversions against torch's: every one of the 65,536 bfloat16 bit
    patterns widened to float32, and float32 values (ties, subnormals, the largest finite,
    infinities, NaN, random) rounded to bfloat16."""
    import numba
    import numpy as np

    @numba.njit
    def widen(src, dst):
        for i in range(src.size):
            dst[i] = _numba._ld(src[i])

    @numba.njit
    def narrow(src, dst):
        for i in range(src.size):
            dst[i] = _numba._st(src[i], dst)

    bits = torch.arange(65536, dtype=torch.int32).to(torch.uint16)
    out = np.empty(65536, np.float32)
    widen(bits.numpy(), out)
    expect = bits.view(torch.bfloat16).float()
    got = torch.from_numpy(out)
    nan = expect.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), expect[~nan].view(torch.int32))

    g = torch.Generator().manual_seed(2)
    specials = torch.tensor(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8),
         3.4028235e38, -3.4028235e38, 1e-40, -1e-40, 1e-45, float("inf"), float("-inf"),
         float("nan")], dtype=torch.float32,
    )  # fmt: skip
    src = torch.cat([specials, torch.randn(10000, generator=g) * 10 ** torch.randint(
        -30, 30, (10000,), generator=g).float()])  # fmt: skip
    dst = np.empty(src.numel(), np.uint16)
    narrow(src.numpy(), dst)
    got = torch.from_numpy(dst).view(torch.bfloat16)
    expect = src.bfloat16()
    nan = expect.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), expect[~nan].view(torch.int16))


@pytest.mark.parametrize("run", [49, 16, 5])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_bfloat16_runs_round_as_torch(run, relu):
    """The normalize pass of NCHW runs (a vector of 16 values at a time, the rest one by one, each
    rounded to bfloat16 by the pass itself) against torch: every bfloat16 bit pattern times a
    scale (so products fall on ties, between them, on infinities and NaN), in runs of ``run``
    values. ``a x + 0`` in float32 is the product rounded once, as torch's ``x.float() * a``."""
    import numba
    import numpy as np

    @numba.njit
    def runs(src, dst, n, a, relu):
        for i in range(src.size // n):
            _numba._affine_run(src, dst, i * n, n, a, np.float32(0.0), relu)

    bits = torch.arange(65536 // run * run, dtype=torch.int32).to(torch.uint16)
    x = bits.view(torch.bfloat16).float()
    for a in (1.0, 1.0 + 2**-9, 3.0, -0.7):
        dst = np.empty(bits.numel(), np.uint16)
        runs(bits.numpy(), dst, run, np.float32(a), relu)
        got = torch.from_numpy(dst).view(torch.bfloat16).float()
        expect = (x * torch.tensor(a, dtype=torch.float32)).bfloat16().float()
        if relu:
            expect = torch.where(expect > 0, expect, torch.zeros_like(expect))
        nan = expect.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan], expect[~nan])  # (values: the sign of a zero may differ)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_bfloat16_vectors_round_bit_for_bit_as_single_values(relu):
    """The vector stores of bfloat16 outputs (the conversion instruction where the CPU has one,
    the integer rounding elsewhere and for vectors holding a NaN or a nonzero subnormal) give
    the bits the one-value store gives (``_st``, torch's rounding), stored as usual and
    streamed: every bfloat16 bit pattern times a scale, in one run of whole vectors, so every
    vector of normal values sits beside vectors of subnormals, zeros, infinities and NaN, and
    some vectors mix them."""
    import numba
    import numpy as np

    @numba.njit
    def vectors(src, dst, a, relu):
        _numba._affine_run(src, dst, 0, src.size, a, np.float32(0.0), relu)

    @numba.njit
    def streamed(src, dst, a, relu):  # (whole 64-byte lines of 32 values, stored non-temporally)
        _numba._stream_run(src, dst, 0, src.size, a, np.float32(0.0), relu)

    @numba.njit
    def singles(src, dst, a, relu):
        for i in range(src.size):
            v = _numba._ld(src[i]) * a
            if relu and not v > 0:
                v = np.float32(0.0)
            dst[i] = _numba._st(v, dst)

    g = torch.Generator().manual_seed(4)
    bits = torch.arange(65536, dtype=torch.int32).to(torch.uint16).numpy()
    shuffled = bits[torch.randperm(65536, generator=g).numpy()]  # (mixed vectors)
    for src in (bits, shuffled):
        for a in (1.0, 1.0 + 2**-9, 3.0, -0.7, 2.0**-100, 2.0**100):
            expect = np.empty_like(src)
            singles(src, expect, np.float32(a), relu)
            # (a zero's sign is the arithmetic's, which may drop the pass's "+ 0": not the store's)
            expect[expect == 0x8000] = 0
            for kernel in (vectors, streamed):
                got = np.empty_like(src)
                kernel(src, got, np.float32(a), relu)
                got[got == 0x8000] = 0
                assert np.array_equal(got, expect), (a, np.flatnonzero(got != expect)[:5])


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_float32_runs_give_the_same_bits_wherever_they_start(relu):
    """The normalize and dx passes store a float32 run's first values one by one until the
    output reaches a 64-byte line, then whole vectors, from every start in a line (lengths
    around the vector's, a 7x7 and a 14x14 map's): the float64 computation's values, nothing
    written outside the run, and for the normalize pass (one multiply-add, the same in a vector
    and alone) the same bits from every start. (The dx pass may reassociate its terms, in a
    vector and alone differently.)"""
    import numba
    import numpy as np

    @numba.njit
    def affine(x, y, start, n, a, c, relu):
        _numba._affine_run(x, y, start, n, a, c, relu)

    @numba.njit
    def dx(g, x, m, d, start, n, co, relu):
        _numba._dx_run(g, x, m, d, start, n, co[0], co[1], co[2], co[3], co[4], co[5],
                       np.float32(0.0), relu)  # fmt: skip

    rng = np.random.default_rng(6)
    co = rng.normal(size=6).astype(np.float32)
    a, c = co[4], co[5]
    for n in (0, 1, 5, 15, 16, 17, 31, 33, 49, 196):
        xs, gs = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
        pre = xs.astype(np.float64) * a + c
        ref_y = np.where(pre > 0, pre, 0.0) if relu else pre
        keep = (pre > 0) if relu else np.ones(n, bool)
        ref_d = (co[1] * np.where(keep, gs, 0.0).astype(np.float64)
                 - co[2] * (xs.astype(np.float64) - co[0]) - co[3])  # fmt: skip
        first = None
        for offset in range(17):  # (a fresh float32 array starts on a 64-byte line)
            buf = [np.zeros(offset + n + 16, np.float32) for _ in range(5)]
            x, y, g, d, m = buf
            x[offset:offset + n], g[offset:offset + n], m[offset:offset + n] = xs, gs, xs
            affine(x, y, offset, n, a, c, relu)
            dx(g, x, m, d, offset, n, co, relu)
            got = (y[offset:offset + n].copy(), d[offset:offset + n].copy())
            assert not y[:offset].any() and not y[offset + n:].any()  # (nothing else written)
            assert not d[:offset].any() and not d[offset + n:].any()
            np.testing.assert_allclose(got[0], ref_y, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got[1], ref_d, rtol=1e-5, atol=1e-5)
            first = got[0] if first is None else first
            assert np.array_equal(got[0].view(np.int32), first.view(np.int32)), (n, offset)


def test_set_backend_validates_and_context_restores():
    before = bnlab.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        bnlab.set_backend("cuda")
    with bnlab.use_backend("reference"):
        assert bnlab.get_backend() == "reference"
        with bnlab.use_backend("fused"):
            assert bnlab.get_backend() == "fused"
        assert bnlab.get_backend() == "reference"
    assert bnlab.get_backend() == before


@pytest.mark.parametrize("layout", ["strided", "channels_last"])
@pytest.mark.usefixtures("backend")
def test_non_contiguous_inputs_and_gradients(layout, backend):
    """A strided input falls back (auto); a dy of other strides than x (expanded, transposed) is
    handled by the fused backward; results match torch either way."""
    gen = torch.Generator().manual_seed(5)
    ours = bnlab.BatchNorm2d(4)
    ref = torch.nn.BatchNorm2d(4)
    if layout == "strided":  # every other sample of a bigger batch
        base = torch.randn(12, 4, 5, 7, generator=gen)
        bo, br = base.clone().requires_grad_(), base.clone().requires_grad_()
        xo, xr = bo[::2], br[::2]
        assert B.choose(xo) == "reference"
    else:
        x = _layout(torch.randn(6, 4, 5, 7, generator=gen), layout)
        bo, br = x.clone().requires_grad_(), x.clone().requires_grad_()
        xo, xr = bo, br
        assert B.choose(xo) == ("fused" if backend == "auto" else "reference")
    yo, yr = ours(xo), ref(xr)
    torch.testing.assert_close(yo, yr)
    # sum() hands backward an expanded (stride-0) dy
    (yo * 2).sum().backward()
    (yr * 2).sum().backward()
    torch.testing.assert_close(bo.grad, br.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)
    dy = torch.randn(6, 4, 7, 5, generator=gen).transpose(2, 3)  # transposed dy
    bo.grad = br.grad = None
    ours(xo).backward(dy)
    ref(xr).backward(dy)
    torch.testing.assert_close(bo.grad, br.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_statistics_propagate_non_finite(bad, layout):
    """The kernels are compiled without no-NaN/no-Inf assumptions: the layer's check still fires."""
    bn = bnlab.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 0, 4] = bad
    with bnlab.use_backend("fused"), pytest.raises(FloatingPointError, match="BatchNorm2d"):
        bn(to_format(x, layout))
    assert bn.num_batches_tracked.item() == 0


# ------------------------------------------------------------------------- BN + ReLU
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("shape", [(16, 6), (4, 3, 7), (4, 3, 5, 6), (2, 3, 4, 3, 5)])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bn_relu_matches_torch_bn_then_relu(shape, fmt, dtype):
    ours_cls, torch_cls = family_classes(shape)
    ours = ours_cls(shape[1], activation="relu", dtype=dtype)
    ref = torch_cls(shape[1], dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(shape[1]) + 0.5)
        ours.bias.copy_(torch.randn(shape[1]))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    tol = TOL[dtype]
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x = to_format(torch.randn(shape, dtype=dtype) * 2 + 0.5, fmt)
        dy = torch.randn(shape, dtype=dtype)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), torch.relu(ref(xr))
        assert (yo == 0).any()  # the mask is exercised
        torch.testing.assert_close(yo, yr, **tol)
        yo.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xo.grad, xr.grad, **tol)
        for po, pr in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(po.grad, pr.grad, **tol)
            po.grad = pr.grad = None
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, **tol)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("train", [True, False])
def test_bn_relu_gradcheck(train):
    x = (torch.randn(5, 3, 4, dtype=torch.float64) * 2).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    if train:
        fn = lambda x, w, b: bnlab.batch_norm_train(x, w, b, 1e-5, "relu")[0]  # noqa: E731
    else:
        rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
        fn = lambda x, w, b: bnlab.batch_norm_eval(x, rm, rv, w, b, 1e-5, "relu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_activation_argument_and_repr():
    for cls in (bnlab.BatchNorm1d, bnlab.BatchNorm2d, bnlab.BatchNorm3d):
        layer = cls(4, activation="relu")
        assert repr(layer).endswith("track_running_stats=True, activation='relu')")
        assert "activation" not in repr(cls(4))
        with pytest.raises(ValueError, match=rf"{cls.__name__}: activation must be"):
            cls(4, activation="gelu")
    with pytest.raises(ValueError, match="activation must be"):
        bnlab.batch_norm_train(torch.randn(4, 3), None, None, 1e-5, "tanh")


def test_convert_to_torch_refuses_to_drop_fused_relu():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnlab.BatchNorm1d(4, activation="relu"))
    with pytest.raises(ValueError, match=r"layer '1' has activation='relu'"):
        bnlab.convert(model, to="torch")


def _relu_mask_oracle(layer, x, dy, training):
    """(dx, dgamma, dbeta) of ``layer``'s BN for the gradient ``dy`` gated by the layer's own
    output (``y > 0``, as a ReLU's backward reads it), in float64 autograd through torch's
    batch_norm with the layer's statistics and parameters; and the layer's output."""
    y = layer(x)
    g = dy.double() * (y > 0)
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    rm = None if training else layer.running_mean.double()
    rv = None if training else layer.running_var.double()
    z = torch.nn.functional.batch_norm(x64, rm, rv, w64, b64, training, 0.0, layer.eps)
    z.backward(g)
    return (x64.grad, w64.grad, b64.grad), y


# Layouts the backward reaches by different loops: NCHW runs (vectors and a rest), channels_last
# rows of 16 channels (tiles in registers), 48 (the array loop, two tiles a sweep), 192 (column
# blocks of 64 channels down chunks of rows, the last chunk short; the float64 dx pass, rows of
# 1.5 KB, a row at a time), 1040 (wide rows), a dense (M, C) input, and inputs above SERIAL_MAX
# (parallel chunks).
_MASK_CASES = [
    ((6, 40, 5, 7), "contiguous"),
    ((6, 16, 5, 7), "channels_last"),
    ((6, 48, 5, 7), "channels_last"),
    ((12, 192, 5, 6), "channels_last"),
    ((8, 1040, 3, 3), "channels_last"),
    ((300, 40), "contiguous"),
    ((64, 40, 8, 8), "contiguous"),
    ((64, 48, 8, 8), "channels_last"),
]


@pytest.mark.parametrize("shape, fmt", _MASK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["layer", "functions", "operators"])
def test_fused_relu_backward_masks_exactly_where_the_output_is_positive(
    shape, fmt, dtype, training, stream, route, monkeypatch
):
    """The fused layer's backward recomputes the ReLU's mask from x (it keeps no output): at
    values whose pre-activation lands within rounding of 0 it must still pass the gradient
    exactly where the forward's output is positive. Each channel's x is pairs +-v (mean 0)
    with v on the input's grid a few ulps above 1, gamma has a mantissa full of bits, and beta
    is -a v to a quarter of x's ulp, so that ``a x + beta`` is within an ulp of 0 for many
    values, on both sides; a mask computed with another rounding than the forward's differs
    there by whole values of dy, far above the tolerance (a mask with ``c`` one ulp off fails
    every float32 and float64 case). Every layout's loops, both modes, float32, float64 and
    bfloat16 (whose output is rounded: zero below 2^-134), dx stored as usual and streamed;
    through the layer's short path, the general autograd Functions (the functional API's,
    which keep the forward's coefficients instead of the output) and the custom operators (the
    training one returns its coefficients for the backward's mask)."""
    monkeypatch.setattr(K, "STREAM_BYTES", 0 if stream else 1 << 62)
    c = shape[1]
    cdt = torch.float32 if dtype == torch.bfloat16 else dtype
    ours_cls, _ = family_classes(shape)
    layer = ours_cls(c, activation="relu", dtype=cdt).train(training)
    n = math.prod(shape) // c // 2
    j = torch.arange(n, dtype=torch.float64)
    step = torch.finfo(dtype).eps / 8  # (several values per ulp of v)
    v = (1 + j * step).to(dtype).double()  # rounded: bfloat16 repeats values
    per_channel = torch.cat([v, -v])[torch.randperm(2 * n)]
    flat = per_channel.repeat(c, 1).t()  # (m, C): every channel the same values
    if len(shape) > 2:
        x = flat.reshape(shape[0], -1, c).permute(0, 2, 1).reshape(shape)
    else:
        x = flat
    x = to_format(x.to(dtype), fmt)
    gamma = 0.8123
    a = gamma / math.sqrt(float((x.double() ** 2).mean()) + layer.eps)  # (mean 0)
    ulp = torch.finfo(dtype).eps
    with torch.no_grad():
        layer.weight.fill_(gamma)
        layer.bias.copy_(torch.tensor([-a * (1 + (k % 24 - 4) * ulp / 4) for k in range(c)],
                                      dtype=torch.float64))  # fmt: skip
        if not training:
            layer.running_mean.zero_()
            layer.running_var.fill_(float((x.double() ** 2).mean()))
    dy = torch.rand(shape, dtype=torch.float64) + 0.5  # (positive: a wrong value cannot cancel)
    dy = to_format(dy.to(dtype), fmt)
    with bnlab.use_backend("fused"):
        want, y = _relu_mask_oracle(layer, x, dy, training)
        assert (y > 0).any() and (y == 0).any()
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        if route == "layer":
            out = layer(xg)
        elif route == "operators" and training:
            out = torch.ops.bnlab.batch_norm_train(xg, layer.weight, layer.bias, layer.eps,
                                                   True)[0]  # fmt: skip
        elif route == "operators":
            out = torch.ops.bnlab.batch_norm_eval(xg, layer.running_mean, layer.running_var,
                                                  layer.weight, layer.bias, layer.eps, True)
        elif training:
            out = bnlab.autograd.batch_norm_train(xg, layer.weight, layer.bias, layer.eps,
                                                  "relu")[0]  # fmt: skip
        else:
            out = bnlab.autograd.batch_norm_eval(xg, layer.running_mean, layer.running_var,
                                                 layer.weight, layer.bias, layer.eps, "relu")
        assert torch.equal(out, y)
        out.backward(dy)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    got = (xg.grad.double(), layer.weight.grad.double(), layer.bias.grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize(
    "shape, fmt",
    [((4, 16, 3, 3), "channels_last"), ((4, 48, 3, 3), "channels_last"),
     ((4, 16, 3, 3), "contiguous"), ((40, 48), "contiguous")],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_mask_floor_follows_the_output_rounding(shape, fmt, dtype, training):
    """With gamma = 0 a channel's pre-activation is its beta exactly: betas at the edges of
    the output's rounding (tiny positive subnormals, 2^-134 and its neighbours, which a
    bfloat16 output rounds to 0 or to its smallest subnormal, zeros of both signs) pass the
    gradient exactly where the output is positive, in both modes (dbeta and dgamma are the sums
    the mask selects), through the NCHW runs, the channels_last tiles and array loops."""
    c = shape[1]
    cdt = torch.float32 if dtype == torch.bfloat16 else dtype
    ours_cls, _ = family_classes(shape)
    layer = ours_cls(c, activation="relu", dtype=cdt).train(training)
    tiny = [0.0, -0.0, 2.0**-149, 2.0**-140, 2.0**-134, 2.0**-134 + 2.0**-149, 2.0**-133,
            -(2.0**-140), 1e-30, 1.0, -1.0, 2.0**-126, 5e-324, 2.0**-135, 2.0**-134 - 2.0**-149,
            3.0]  # fmt: skip
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor((tiny * 3)[:c], dtype=torch.float64))
    x = to_format(torch.randn(shape).to(dtype), fmt)
    dy = to_format((torch.rand(shape, dtype=torch.float64) + 0.5).to(dtype), fmt)
    with bnlab.use_backend("fused"):
        want, y = _relu_mask_oracle(layer, x, dy, training)
        assert (y > 0).any() and (y == 0).any()
        layer.zero_grad()
        layer(x.clone().requires_grad_()).backward(dy)
    torch.testing.assert_close(layer.bias.grad.double(), want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), want[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("route", ["layer", "untracked", "functions"])
def test_fused_relu_layer_keeps_its_input_and_not_its_output(training, fmt, route, dtype):
    """The fused layer's backward recomputes the ReLU's mask from x: autograd keeps x for it
    (and the parameters), never the output, where torch's BN + ReLU pair keeps both; so do a
    layer without running statistics and the general autograd Functions (the functional
    API's), in float32 and in bfloat16 (parameters too: the kernels read x as it is and
    compute in float32)."""
    layer = bnlab.BatchNorm2d(8, activation="relu", track_running_stats=route != "untracked")
    layer.train(training).to(dtype)
    x = to_format(torch.randn(4, 8, 5, 5, dtype=dtype), fmt).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    backend = "fused" if dtype == torch.float32 else "auto"
    with bnlab.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if route != "functions":
            y = layer(x)
        elif training:
            y = bnlab.autograd.batch_norm_train(x, layer.weight, layer.bias, 1e-5, "relu")[0]
        else:
            y = bnlab.autograd.batch_norm_eval(x, layer.running_mean, layer.running_var,
                                               layer.weight, layer.bias, 1e-5, "relu")  # fmt: skip
    params = {p.data_ptr() for p in layer.parameters()}
    kept = [t for t in saved if t.data_ptr() not in params]
    assert [t.data_ptr() for t in kept if t.numel() == x.numel()] == [x.data_ptr()]
    assert all(t.data_ptr() != y.data_ptr() for t in saved)
    y.sum().backward()  # (and the backward runs from what was kept)
    assert x.grad is not None


def test_resnet20_fused_relu_matches_unfused():
    """The model builder's fuse_relu path computes the same function as norm + nn.ReLU."""
    from bnlab.models import resnet20

    torch.manual_seed(0)
    plain = resnet20()
    torch.manual_seed(0)
    fused = resnet20(fuse_relu=True)
    x = torch.randn(4, 3, 32, 32)
    yp, yf = plain(x), fused(x)
    torch.testing.assert_close(yf, yp)
    yp.square().sum().backward()
    yf.square().sum().backward()
    gp = [p.grad for p in plain.parameters()]
    gf = [p.grad for p in fused.parameters()]
    for a, b in zip(gf, gp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kernel_calls_refuse_what_the_loops_cannot_read():
    """The kernels hand the loops tensor addresses, so a call with a tensor off the CPU (meta
    here), of another dtype or of strides the loops do not read, or a per-channel tensor of
    another size than C, raises a ValueError naming it before any loop runs (and commits
    nothing); a dy of other strides or dtype is brought to x's."""
    x = torch.randn(4, 3, 5, 5)
    w = torch.ones(3)
    for bad, what in [
        (x.to("meta"), "meta"),
        (x.half(), "float16"),
        (x.transpose(2, 3), "strides"),
        (x[:, :, :, :3].contiguous(memory_format=torch.channels_last)[:, :, :2], "strides"),
    ]:
        with pytest.raises(ValueError, match=what):
            K.batch_norm_train_forward(bad, w, w, 1e-5)
        with pytest.raises(ValueError, match=what):
            K.batch_norm_eval_forward(bad, w, w, w, w, 1e-5)
        with pytest.raises(ValueError, match=what):
            K.batch_norm_train_backward(x, bad, w, w, w)
    _, mean, _, invstd = K.batch_norm_train_forward(x, w, w, 1e-5)
    g = torch.randn(1, 3, 1, 5).expand(4, 3, 5, 5)  # (stride 0 along two dimensions)
    want = K.batch_norm_train_backward(g.contiguous(), x, mean, invstd, w)
    for dy in (g, g.double(), g.contiguous(memory_format=torch.channels_last)):
        got = K.batch_norm_train_backward(dy, x, mean, invstd, w)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    # per-channel tensors of another size than C, which the loops would read or write past
    short = torch.ones(2)
    for call in (
        lambda: K.batch_norm_train_forward(x, short, w, 1e-5),
        lambda: K.batch_norm_train_forward(x, w, short, 1e-5),
        lambda: K.batch_norm_eval_forward(x, short, w, w, w, 1e-5),
        lambda: K.batch_norm_eval_forward(x, w, short, w, w, 1e-5),
        lambda: K.batch_norm_eval_forward(x, w, w, short, w, 1e-5),
        lambda: K.batch_norm_train_backward(x, x, short, invstd, w),
        lambda: K.batch_norm_train_backward(x, x, mean, invstd, short),
        lambda: K.batch_norm_eval_backward(x, x, w, short, w),
    ):
        with pytest.raises(ValueError, match="2 values for 3 channels"):
            call()
    rm, rv, count = torch.zeros(2), torch.ones(2), torch.tensor(0)
    with pytest.raises(ValueError, match="2 and 2 values for 3 channels"):
        K.commit_batch_stats(mean, mean, rm, rv, count, 0.1, 100, True)
    assert rm.eq(0).all() and rv.eq(1).all() and count.item() == 0
    # the fused ReLU's coefficients must be a forward's: (2, C) in the compute dtype
    coef = K.batch_norm_train_forward(x, w, w, 1e-5, relu=True, return_coef=True)[4]
    assert coef.shape == (2, 3) and coef.dtype == x.dtype
    for bad in (coef.double(), coef[:, :2].contiguous(), coef.t().contiguous().t()):
        with pytest.raises(ValueError, match="coef"):
            K.batch_norm_train_backward(g, x, mean, invstd, w, coef=bad)


@pytest.mark.parametrize("C", [20, 48, 100, 200, 300])
@pytest.mark.parametrize("M", [7, 1003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_dense_elementwise_passes_in_runs_of_rows(C, M, dtype, relu):
    """Widths that do not divide a tile run the normalize and dx passes in runs of several rows
    (``_lane_rows``) with tiled coefficients: a training step and an inference forward of a
    dense ``(M, C)`` layer, the fused ReLU on and off, against torch's layer (with a ReLU after
    it) in float64, with fewer rows than a run (7) and with runs left over at the end of the
    input and of its chunks (1003 rows, parallel above ``SERIAL_MAX`` values); bfloat16 inputs
    with float32 parameters, as under autocast, to bfloat16's precision."""
    assert _numba._lane_rows(C) > 1  # (the widths are chosen for runs of several rows)
    gen = torch.Generator().manual_seed(C + M)
    x = (torch.randn(M, C, generator=gen) * 2 + 1).to(dtype)
    dy = torch.randn(M, C, generator=gen).to(dtype)
    ours = bnlab.BatchNorm1d(C, activation="relu" if relu else None)
    if dtype != torch.bfloat16:
        ours = ours.to(dtype)
    ref = torch.nn.BatchNorm1d(C).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, C))
            m.bias.copy_(torch.linspace(-1, 1, C))
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yr = ours(xa), ref(xb)
    if relu:
        yr = torch.relu(yr)
    y.backward(dy)
    yr.backward(dy.double())
    tol = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-9, "atol": 1e-9},
           torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}[dtype]
    torch.testing.assert_close(y.double(), yr, **tol)
    torch.testing.assert_close(xa.grad.double(), xb.grad, **tol)
    for a, b in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a.double(), b, **tol)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        ye, yre = ours(x), ref(x.double())
    torch.testing.assert_close(ye.double(), torch.relu(yre) if relu else yre, **tol)


@pytest.mark.parametrize("share", [0.6, 1.1])
def test_channels_last_training_on_either_side_of_the_column_blocks_bound(share):
    """A channels_last training step whose input is a share of the bytes above which the
    column blocks run only where they win from memory (``_BLOCKS_MAX_BYTES``; at 0.6 the
    statistics take the blocks and, where the bound is finite, the gradient sums and dx the
    flat tiles; at 1.1 every pass the flat tiles) against torch's layer in float64: output,
    running statistics and every gradient. Where the bound is above 40 MB, or unbounded, the
    shares are of 16 MB (the inputs stay small; the passes then take the blocks)."""
    bound = _numba._BLOCKS_MAX_BYTES
    target = share * bound if bound <= 40 << 20 else share * (16 << 20)
    n = max(1, round(target / (128 * 32 * 32 * 4)))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 128, 32, 32, generator=gen).mul_(2).add_(1)
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    ours, ref = bnlab.BatchNorm2d(128), torch.nn.BatchNorm2d(128).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 128))
            m.bias.copy_(torch.linspace(-1, 1, 128))
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yr = ours(xa), ref(xb)
    y.backward(dy)
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=1e-4, atol=1e-5)
    for a, b in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad),
                 (ours.running_mean, ref.running_mean), (ours.running_var, ref.running_var)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


# (48: a tile is not _TILE values, the array loop; 128, 192 and 320: column blocks of _TILE
# channels, the last chunk of rows short; 1040 and 2056: rows of a page or more, in groups of
# rows, for float32 and float64, and 2056 for bfloat16; with few rows, every width above a tile
# in groups of rows but the gradient sums of 128 and 192 float32 channels, in blocks; 100 and
# 1000, with many rows, the array loop)
@pytest.mark.parametrize("C", [1, 16, 64, 48, 100, 128, 192, 320, 1000, 1040, 2056])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("rows", ["many", "few"])
def test_channels_last_sums_match_float64_sums(C, dtype, rows):
    """The channels_last reductions, narrow layers' vector sweeps held in registers included,
    against float64 sums by numpy over rows [r0, r1) of an (M, C) array (bfloat16 as its bits,
    summed as their exact float32 values): the statistics' shifted sums and the backward's
    gradient sums, with and without the ReLU mask, from an offset and with rows left over
    after the last whole tile or group, with and without software prefetch; ``few`` rows make
    arrays small enough for the groups of rows whatever their width (``_wide_rows``)."""
    import numpy as np

    if rows == "few" and C <= 64:
        pytest.skip("rows of at most a tile: the flat tiles, however few")
    rng = np.random.default_rng(C)
    if rows == "many":
        M, r0, r1 = (3001, 3, 2994) if C < 1000 else (303, 3, 294)  # (291 rows: 8 * 36 + 3)
    else:
        M, r0, r1 = 40, 2, 37  # (35 rows: 8 * 4 + 3, 4 * 8 + 3)
    x32, g32, y32 = (rng.standard_normal((M, C), dtype=np.float32) * 2 + 1 for _ in range(3))
    if dtype == "bfloat16":  # (the bits of values exact in bfloat16)
        x, g, y = ((a.view(np.uint32) >> 16).astype(np.uint16) for a in (x32, g32, y32))
        x32, g32, y32 = ((a.astype(np.uint32) << 16).view(np.float32) for a in (x, g, y))
    else:
        x, g, y = (a.astype(dtype) for a in (x32, g32, y32))
    x64, g64, y64 = (a.astype(np.float64) for a in ((x, g, y) if dtype == "float64" else
                                                    (x32, g32, y32)))  # fmt: skip
    if rows == "few":  # (the case is what it is named for: the statistics in groups of rows)
        assert _numba._wide_rows(C, x.itemsize, x.nbytes)
    reps = max(1, 64 // C)
    x0 = x64[r0]
    z = np.tile(x0, reps)
    cmean, cm2 = np.zeros(C), np.zeros(C)
    _numba._mc_sums(x, z, r0, r1, cmean, cm2)
    d = x64[r0:r1] - x0
    np.testing.assert_allclose(cmean, d.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cm2, ((d - d.mean(0)) ** 2).sum(0), rtol=1e-10)
    mean = x64[r0:r1].mean(0).astype(np.float64 if dtype == "float64" else np.float32)
    for relu in (False, True):
        s1, s2 = np.zeros(C), np.zeros(C)
        # (the mask read from y: coefficients (1, 0), floor 0)
        u = np.tile(np.stack([mean, np.ones_like(mean), np.zeros_like(mean)]), reps)
        _numba._mc_gsums(g, x, y, relu, u, mean.dtype.type(0), r0, r1, s1, s2)
        gm = g64[r0:r1] * (y64[r0:r1] > 0) if relu else g64[r0:r1]
        # (the vector sweeps, column blocks and wide rows add every value in float64; the array
        # loop adds pairs first)
        exact = (64 % C == 0 or _numba._column_blocks(C, 2 * x.nbytes)
                 or _numba._wide_gsum_rows(C, x.itemsize, x.nbytes))
        np.testing.assert_allclose(s1, gm.sum(0), rtol=1e-12 if exact else 1e-6, atol=1e-9)
        terms = gm * (x64[r0:r1] - mean.astype(np.float64))
        if exact:  # (x - mean rounded once to the compute type, the rest in float64)
            ulp = np.finfo(mean.dtype).eps
            assert (np.abs(s2 - terms.sum(0)) <= ulp * np.abs(terms).sum(0) + 1e-12).all()
        else:
            np.testing.assert_allclose(s2, terms.sum(0), rtol=1e-6,
                                       atol=1e-4 * np.abs(gm).sum(0).max())  # fmt: skip


@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((3, 7, 16, 16), "contiguous"),  # rows of 256 values: whole lines, streamed
        ((2, 16, 4, 4), "contiguous"),  # rows of exactly one line (float32)
        ((3, 5, 7, 9), "contiguous"),  # rows of 63 values: lines streamed, head and tail not
        ((2, 16, 4, 4), "channels_last"),  # rows of 16 channels: one line
        ((4, 48, 3, 5), "channels_last"),  # three lines a row
        ((5, 20, 3, 3), "channels_last"),  # 20 channels: not whole lines
        ((3, 32, 3, 3), "channels_last"),  # 32 channels: one bfloat16 line, two float32
        ((64, 32), "contiguous"),  # dense (N, C)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_streamed_outputs_hold_the_same_values(shape, fmt, dtype, monkeypatch):
    """Outputs large enough to stream (non-temporal stores; forced here for small tensors with
    ``STREAM_BYTES = 0``) hold the values of the usual stores, in every layout, dtype (bfloat16
    rounded as the usual stores round it) and with the fused ReLU: the forward outputs (one
    multiply-add a value) exactly; dx, whose multiply-adds LLVM may contract in either order in
    either loop, to a few units in the last place."""
    gen = torch.Generator().manual_seed(7)
    x = to_format((torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype), fmt)
    dy = to_format(torch.randn(shape, generator=gen).to(dtype), fmt)
    cdt = torch.float32 if dtype == torch.bfloat16 else dtype
    w = torch.rand(shape[1], generator=gen).to(cdt) + 0.5
    b = torch.randn(shape[1], generator=gen).to(cdt)
    out = {}
    for limit in (1 << 62, 0):
        monkeypatch.setattr(K, "STREAM_BYTES", limit)
        forward, backward = [], []
        for relu in (False, True):
            y, mean, var, inv = K.batch_norm_train_forward(x, w, b, 1e-5, relu=relu)
            forward += [y, mean, var, inv]
            forward.append(K.batch_norm_eval_forward(x, mean, var, w, b, 1e-5, relu=relu)[0])
            forward.append(K.eval_forward_fast(x, mean, var, w, b, 1e-5, relu))
            gy = y if relu else None
            backward += K.batch_norm_train_backward(dy, x, mean, inv, w, y=gy)
            backward += K.batch_norm_eval_backward(dy, x, mean, inv, w, y=gy)
        out[limit] = forward, backward
    (f_usual, b_usual), (f_streamed, b_streamed) = out[1 << 62], out[0]
    for usual, streamed in zip(f_usual, f_streamed, strict=True):
        assert streamed.stride() == usual.stride()
        assert torch.equal(streamed, usual)
    ulp = torch.finfo(x.dtype).eps
    for usual, streamed in zip(b_usual, b_streamed, strict=True):
        assert streamed.stride() == usual.stride()
        atol = 8 * ulp * float(usual.abs().max())
        torch.testing.assert_close(streamed, usual, rtol=0, atol=atol)


def test_a_kept_inference_plan_is_taken_again_only_for_the_same_call():
    """A lean plan kept in a cache (a layer's ``views``) with its loops' entry points: the same
    call again takes the same plan (for any eps or relu, which it does not hold); a call that
    differs in x's shape, strides, dtype, device or sign bit, or in a statistic or parameter's
    address, size, strides, dtype or sign bit plans again (or is refused, as without a cache);
    and every call gives exactly the output of the same call without a cache. Values changed
    in place are read through the plan."""
    g = torch.Generator().manual_seed(3)
    c = 6
    rm, w, b = (torch.randn(c, generator=g) for _ in range(3))
    rv = torch.rand(c, generator=g) + 0.5
    x = torch.randn(4, c, 5, 3, generator=g) * 2 + 1
    views = K.new_views()

    def call(x=x, rm=rm, rv=rv, w=w, b=b, eps=1e-5, relu=False):
        y = K.eval_forward_fast(x, rm, rv, w, b, eps, relu, views)
        want = K.eval_forward_fast(x, rm, rv, w, b, eps, relu)
        if want is None:
            assert y is None
            return None
        assert torch.equal(y, want) and y.stride() == want.stride()
        return views[0][1]

    plan = call(x)
    assert plan is not None and call(x) is plan
    assert call(eps=1e-3) is plan and call(relu=True) is plan
    with torch.no_grad():
        w.mul_(3)
        rv.add_(1)
    assert call(x) is plan  # (read through the plan's views)
    torch.testing.assert_close(
        K.eval_forward_fast(x, rm, rv, w, b, 1e-5, False, views),
        torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5),
    )
    changed = [
        dict(x=x[:3]), dict(x=x.contiguous(memory_format=torch.channels_last)),
        dict(x=x.transpose(2, 3)), dict(x=torch._neg_view(x)), dict(x=x.double()),
        dict(x=x.double(), rm=rm.double(), rv=rv.double(), w=w.double(), b=b.double()),
        dict(x=x.bfloat16()), dict(w=w.clone()), dict(b=torch._neg_view(b)),
        dict(rm=rm.as_strided((c,), (0,))), dict(rv=rv[:5]), dict(w=w.double()),
        dict(x=x.to("meta")),
    ]  # fmt: skip
    planned = 0
    for change in changed:
        new = call(**change)
        if new is None:  # (refused, with or without a cache: the plan kept)
            assert views[0][1] is plan and call(x) is plan, change
            continue
        planned += 1
        assert new is not plan, change
        plan = call(x)  # (back to the first call: planned again)
        assert plan is not new
    assert planned == 5


def test_a_plan_runs_the_loops_entry_points_or_their_dispatchers():
    """A kept plan calls its loops' compiled entry points (no type resolution per call); one
    made for a single call, or a dispatcher that gives no entry point, calls the dispatcher
    itself, which takes any call."""
    x, w = torch.randn(4, 3, 2, 2), torch.ones(3)
    k = K.compiled()
    kept = K.lean_plan(x, w, w, w.clone(), w.clone(), torch.zeros((), dtype=torch.int64),
                       K.new_views())  # fmt: skip
    single = K.lean_plan(x, w, w, w.clone(), w.clone(), torch.zeros((), dtype=torch.int64))
    assert single[9] == (k.train_fwd_at, k.backward_at)
    assert all(type(r) is not type(k.train_fwd_at) and callable(r) for r in kept[9])

    class NoEntry:
        def compile(self, sig):
            raise RuntimeError("compilation disabled")

    no_entry = NoEntry()
    assert K._entry(no_entry, (1, 2.0)) is no_entry


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_a_kept_training_plan_gives_the_outputs_and_state_of_a_new_one(fmt):
    """Training calls through a kept plan (its compiled loops' entry points) and through a plan
    made for each call give the same y, running statistics, counter, dx, dgamma and dbeta bit
    for bit, call after call (the second and later calls take the kept plan), with and without
    the fused ReLU, with a momentum and with None (the cumulative average)."""
    g = torch.Generator().manual_seed(4)
    c = 5
    x = to_format(torch.randn(6, c, 4, 3, generator=g) * 2 + 1, fmt)
    dy = to_format(torch.randn(6, c, 4, 3, generator=g), fmt)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    state = [(torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.int64)) for _ in "ab"]
    views = K.new_views()
    for relu, momentum in [(False, 0.1), (False, 0.1), (True, None), (False, 0.3)]:
        outs = []
        for (rm, rv, count), cache in zip(state, (views, None), strict=True):
            plan = K.lean_plan(x, w, b, rm, rv, count, cache)
            y, stats, ok = K.lean_train_forward(x, plan, 1e-5, relu, momentum)
            grads = K.lean_backward(dy, x, w, None, relu, plan, stats, True, True, True)
            outs.append((y, rm.clone(), rv.clone(), count.clone(), *grads))
            assert ok
        assert views[1][1] is K.lean_plan(x, w, b, *state[0], views)  # (kept)
        for got, want in zip(*outs, strict=True):
            assert torch.equal(got, want) and got.stride() == want.stride()


@pytest.mark.skipif(sys.platform == "win32", reason="the cache lock is flock (POSIX)")
def test_numbas_cache_saves_and_loads_hold_the_directory_lock(tmp_path, monkeypatch):
    """Once the kernels are loaded, every save to Numba's on-disk cache holds an exclusive lock
    on the cache's directory while it reads and writes the index and writes the data (another
    open of the directory cannot lock it), and every load a shared one (another shared lock is
    granted, an exclusive one is not): processes compiling the same functions at once cannot
    interleave a save with another save or a load."""
    import fcntl
    import os

    from numba.core.caching import IndexDataCacheFile

    K.compiled()  # (installs the lock)
    seen = []

    def try_lock(how):
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    for step in ("_load_index", "_save_index", "_save_data"):
        real = getattr(IndexDataCacheFile, step)

        def probe(self, *args, _real=real, _step=step):
            seen.append((_step, try_lock(fcntl.LOCK_EX), try_lock(fcntl.LOCK_SH)))
            return _real(self, *args)

        monkeypatch.setattr(IndexDataCacheFile, step, probe)
    cache = IndexDataCacheFile(str(tmp_path), "f-1.py311", ("stamp", 1))
    cache.save(("sig", "target"), b"compiled code")
    assert seen == [(step, False, False) for step in ("_load_index", "_save_index", "_save_data")]
    seen.clear()
    assert cache.load(("sig", "target")) == b"compiled code"
    assert seen == [("_load_index", False, True)]
    assert try_lock(fcntl.LOCK_EX)  # (released after each)


@pytest.mark.parametrize("processes", [0, -1, 2.0, "3", True])
def test_warm_up_refuses_a_count_of_processes_that_is_not_a_positive_int(processes):
    with pytest.raises(ValueError, match="warm_up: processes must be a positive int"):
        K.warm_up(processes=processes)


def test_warm_up_goes_on_in_this_process_when_a_compiling_process_fails(monkeypatch):
    """warm_up(processes=N): a process of its own that fails is named in a warning, and the
    kernels it was to compile are compiled (here: loaded) in the calling process."""
    import subprocess

    real = subprocess.Popen
    started = []

    def failing(cmd, **kw):
        started.append(cmd[-1])
        return real([sys.executable, "-c", "import sys; sys.exit('no compiler')"], **kw)

    monkeypatch.setattr(subprocess, "Popen", failing)
    with pytest.warns(RuntimeWarning) as caught:
        K.warm_up(processes=3)
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 3 and all("failed (exit 1)" in m and "no compiler" in m for m in said)
    assert "compiling [torch.float32] failed" in said[1], said
    assert len(started) == 3 and all("_warm_up_dtypes" in c for c in started)
    assert {d for c in started for d in ("float32", "float64", "bfloat16") if d in c} == {
        "float32", "float64", "bfloat16"}


def test_warm_up_compiles_every_kernel():
    """warm_up() compiles (or loads) the kernels a layer can reach, so that processes started
    after it (distributed ranks) do not compile them concurrently: each public kernel then has
    its float32, float64 and bfloat16 (uint16 bits) versions, the element type of its ``like``
    argument, the one before the streaming flag (the tensors go in as addresses). (Compiling a
    public kernel compiles the serial and parallel loops of both layouts it calls.)"""
    import numba

    K.warm_up()  # (raises if any kernel fails to compile or run)
    for name in ("train_fwd_at", "eval_fwd_at", "backward_at"):
        seen = {sig[-2].dtype for sig in getattr(_numba, name).signatures}
        assert {numba.float32, numba.float64, numba.uint16} <= seen, (name, seen)
    seen = {sig[0].dtype for sig in _numba.swap_inner.signatures}  # (the gradient's layout)
    assert {numba.int16, numba.int32, numba.int64} <= seen, seen
    # kept plans call the same overloads through their entry points: none is added
    names = ("train_fwd_at", "eval_fwd_at", "backward_at")
    before = {name: set(getattr(_numba, name).signatures) for name in names}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        pdt = torch.float32 if dtype == torch.bfloat16 else dtype
        inputs = [("contiguous", (4, 3)), ("contiguous", (2, 3, 4)),
                  ("contiguous", (2, 3, 2, 2)), ("channels_last", (2, 3, 2, 2))]  # fmt: skip
        for fmt, shape in inputs:
            x = to_format(torch.randn(shape).to(dtype), fmt)
            w = torch.ones(3, dtype=pdt)
            for count in (None, torch.zeros((), dtype=torch.int64)):
                plan = K.lean_plan(x, w, w, w.clone(), w.clone(), count, K.new_views())
                assert plan is not None and all(r is not None for r in plan[9])
    assert {name: set(getattr(_numba, name).signatures) for name in names} == before


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0, -0.5, 1.5, 2])
@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize(
    "buffers", [torch.float32, torch.float64, None], ids=["f32", "f64", "none"]
)
def test_commit_kernel_matches_reference(momentum, update, buffers):
    """The compiled finiteness check + moving averages against functional's tensor ops, over a
    few batches (float32 statistics; buffers float32, float64 or absent)."""
    g = torch.Generator().manual_seed(6)
    state = {}
    for name, fn in [("kernel", K.commit_batch_stats), ("reference", F.commit_running_stats)]:
        if buffers is None:
            rm = rv = nbt = None
        else:
            rm = torch.zeros(7, dtype=buffers)
            rv = torch.ones(7, dtype=buffers)
            nbt = torch.tensor(3)
        g.manual_seed(6)
        for _ in range(4):
            mean, var = torch.randn(7, generator=g), torch.rand(7, generator=g)
            assert fn(mean, var, rm, rv, nbt, momentum, 12, update) is True
        state[name] = (rm, rv, nbt)
    if buffers is not None:
        for a, b in zip(state["kernel"], state["reference"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert int(state["kernel"][2]) == (7 if update else 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["mean", "var"])
def test_commit_kernel_refuses_non_finite_and_touches_nothing(bad, where):
    rm, rv, nbt = torch.zeros(5), torch.ones(5), torch.tensor(2)
    mean, var = torch.zeros(5), torch.ones(5)
    {"mean": mean, "var": var}[where][3] = bad
    assert K.commit_batch_stats(mean, var, rm, rv, nbt, 0.1, 8, True) is False
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5)) and int(nbt) == 2


def _numba_threads_after(call) -> int:
    """Numba's thread count in this thread right after ``call()`` ran a kernel."""
    import numba

    call()
    return numba.get_num_threads()


def test_kernels_follow_torch_set_num_threads():
    import threading

    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    x = torch.randn(64, 3, 8, 8)
    w = torch.ones(3)
    before = torch.get_num_threads()
    try:
        for n in sorted({1, min(2, pool), pool}):
            numba.set_num_threads(pool if n == 1 else 1)  # start from a different count
            torch.set_num_threads(n)
            assert _numba_threads_after(lambda: K.batch_norm_train_forward(x, w, w, 1e-5)) == n
        torch.set_num_threads(pool + 3)  # more than Numba's pool: capped at the pool
        got = _numba_threads_after(lambda: K.batch_norm_eval_forward(x, w, w, w, w, 1e-5))
        assert got == pool
        # the planned inference call (its compiled loop kept with the plan) as well
        views = K.new_views()
        for n in (1, min(2, pool), 1):
            torch.set_num_threads(n)
            got = _numba_threads_after(
                lambda: K.eval_forward_fast(x, w, w, w, w, 1e-5, False, views)
            )
            assert got == n and views[0] is not None
        # Numba's count is per Python thread: a new thread's first kernel call sets its own
        torch.set_num_threads(1)
        seen = []
        t = threading.Thread(
            target=lambda: seen.append(
                _numba_threads_after(lambda: K.batch_norm_train_forward(x, w, w, 1e-5))
            )
        )
        t.start()
        t.join()
        assert seen == [1]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "shape, fmt",
    [((16, 24, 18, 20), "contiguous"), ((16, 24, 18, 20), "channels_last"),
     ((9000, 24), "contiguous"), ((8, 128, 9, 9), "channels_last"), ((2100, 1040), "contiguous")],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_thread_gives_the_values_of_two(shape, fmt, dtype):
    """The parallel loops' chunks do not depend on the thread count: every output of a
    training step (y, the running statistics, dx, dgamma, dbeta) and of an inference call is
    bit for bit the same on one thread and on two, on inputs above SERIAL_MAX of both layouts
    (the channels_last reductions sum per chunk, then merge)."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a Numba pool of two threads")
    g = torch.Generator().manual_seed(8)
    x = _layout(torch.randn(shape, generator=g).to(dtype) * 3 + 1, fmt)
    assert x.numel() > _numba.SERIAL_MAX
    dy = _layout(torch.randn(shape, generator=g).to(dtype), fmt)
    c = shape[1]
    kind = bnlab.BatchNorm2d if len(shape) == 4 else bnlab.BatchNorm1d
    weight = torch.rand(c, generator=g) + 0.5
    bias = torch.rand(c, generator=g) - 0.5
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            layer = kind(c)  # (float32 parameters; a bfloat16 input as under autocast)
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(dy)
            layer.eval()
            with torch.no_grad():
                z = layer(x)
            results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                            layer.running_var, z))  # fmt: skip
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("C", [1, 16, 128, 1024, 2048, 20000])
@pytest.mark.parametrize("M", [1, 63, 64, 1000, 1568, 4096, 9000, 100352])
def test_chunk_rows_bound_the_chunk_count_and_the_partial_sums(M, C):
    """Rows per chunk of an (M, C) layout: at most 64 chunks unless a chunk holds its ~256K
    values, every chunk but the last whole, and at least min(_PARTIAL_ROWS, M / _MIN_CHUNKS)
    rows, so the float64 partial sums of each chunk stay a small part of its reads where the
    rows allow it."""
    R = _numba.mc_rows_per_chunk(M, C)
    assert 1 <= R <= M
    K = -(-M // R)
    assert (K - 1) * R < M
    assert K <= _numba._MAX_CHUNKS or R >= max(1, _numba._MAX_CHUNK // C)
    assert R >= min(_numba._PARTIAL_ROWS, -(-M // _numba._MIN_CHUNKS))


def test_spans_split_the_chunks_in_order():
    """Each thread's span of the parallel loops' chunks: contiguous, in order, covering every
    chunk once, lengths differing by at most one (the first ``K % T`` longer)."""
    for chunks in range(1, 70):
        for teams in range(1, min(chunks, 9) + 1):
            spans = [_numba._span(chunks, teams, t) for t in range(teams)]
            assert spans[0][0] == 0 and spans[-1][1] == chunks
            assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))
            lengths = [hi - lo for lo, hi in spans]
            q, r = divmod(chunks, teams)
            assert lengths == [q + (t < r) for t in range(teams)]


def test_spans_follow_the_thread_count():
    """The loops split their chunks into one span per thread Numba runs them on, read in the
    compiled code (so it follows ``numba.set_num_threads``, which the kernels set from torch's
    thread count), never more spans than chunks."""
    import numba

    before = numba.get_num_threads()
    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(n)
            assert _numba._teams(64) == n
            assert _numba._teams(1) == 1
    finally:
        numba.set_num_threads(before)


_KEEP_THREADS = """
import torch, bnlab, numba
torch.set_num_threads(1)
torch.get_num_threads()  # torch has read its count (as after any parallel torch operator)
x = torch.randn(8, 3, 4, 4)
bnlab.BatchNorm2d(3)(x)  # the first kernel call starts Numba's pool
print(torch.get_num_threads(), numba.get_num_threads())
torch.set_num_threads(2)
bnlab.BatchNorm2d(3)(x)
print(torch.get_num_threads(), numba.get_num_threads())
"""


def test_starting_the_kernels_keeps_torchs_thread_count():
    """In a fresh process with a pool of two Numba threads, a user who set torch to one thread
    keeps one thread for torch and the kernels after the first kernel call (starting Numba's
    OpenMP pool resets the OpenMP count torch reads), and a later setting still governs both."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src, NUMBA_NUM_THREADS="2")
    env.pop("OMP_NUM_THREADS", None)
    res = subprocess.run([sys.executable, "-c", _KEEP_THREADS], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "1", "2", "2"]


def test_kernel_results_do_not_depend_on_the_thread_count():
    x = torch.randn(512, 7, 5, 5, dtype=torch.float64) * 3 + 2
    w, b = torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(K.batch_norm_train_forward(x, w, b, 1e-5))
    finally:
        torch.set_num_threads(before)
    ref = F.batch_norm_train_forward(x, w, b, 1e-5)
    for out in outs:
        torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)


def _smaps_field(addr: int, field: str) -> str | None:
    """The value of ``field`` in /proc/self/smaps for the mapping holding ``addr``, or None."""
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return None
    inside = False
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= addr < end
        elif inside and line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


@pytest.mark.parametrize(
    "text, advise",
    [("always [madvise] never", True), ("[always] madvise never", False),
     ("always madvise [never]", False)],
)  # fmt: skip
def test_huge_page_advice_only_where_it_changes_the_mapping(text, advise):
    assert K.advice_changes_pages(text) is advise


@pytest.mark.parametrize(
    "text, mode",
    [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
     ("always madvise [never]", "never"), ("always madvise never", ""), ("", "")],
)  # fmt: skip
def test_thp_mode_reads_the_selected_mode(text, mode, tmp_path, monkeypatch):
    """The mode that decides the advice, and that ``bnlab bench`` prints beside the CPU."""
    from bnlab import bench

    assert K.thp_mode(text) == mode
    f = tmp_path / "enabled"
    f.write_text(text)
    monkeypatch.setattr(bench, "THP_ENABLED", str(f))
    assert ("transparent huge pages " + mode in bench.machine_text()) is bool(mode)
    assert ("transparent huge pages" in bench.machine_text()) is bool(mode)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_fresh_outputs_are_advised_onto_huge_pages(layout):
    """Outputs of 32 MiB and more (fresh mappings from glibc) are advised onto transparent huge
    pages (their first touch maps them 2 MB at a time): on Linux with THP in "madvise" mode the
    mapping holding an output's aligned interior is THP-eligible, which only the advice makes
    it. The values are those of the ordinary path (the other tests)."""
    hp = K._HugePages()
    if hp.size == 0:
        pytest.skip("no transparent huge pages here")
    with open(K.THP_ENABLED) as f:
        if not K.advice_changes_pages(f.read()):  # ("always": eligible without the advice)
            pytest.skip("transparent huge pages not in madvise mode here")
    x = to_format(torch.randn(32, 64, 64, 64), layout)  # 32 MiB
    dy = torch.randn_like(x)
    y, mean, _, invstd = K.batch_norm_train_forward(x, None, None, 1e-5)
    dx, _, _ = K.batch_norm_train_backward(dy, x, mean, invstd, None)
    for out in (y, dx):
        assert out.stride() == x.stride()
        inner = -(-out.data_ptr() // hp.size) * hp.size
        eligible = _smaps_field(inner, "THPeligible")
        if eligible is None:
            pytest.skip("/proc/self/smaps has no THPeligible field on this kernel")
        assert eligible == "1"


def test_only_outputs_of_32_mib_and_more_are_advised(monkeypatch):
    """Smaller outputs come from glibc's heap, already mapped in the steady state; advice there
    changes nothing but makes the heap's regrowth stall on compaction (``_HugePages``). The
    advice goes to every output of at least ``MIN_BYTES``, whatever its layout."""
    advised = []

    class Recorder:
        size = 2 << 20

        def advise(self, t, n):
            advised.append((t.data_ptr(), n))

    monkeypatch.setattr(K, "_huge", Recorder())
    mib = 1 << 20
    small = torch.empty(mib // 4 * 32 - 1)  # one float32 short of 32 MiB
    large = torch.empty(8, 16, 256, 256).to(memory_format=torch.channels_last)  # 32 MiB
    assert K._empty_like(small).shape == small.shape and advised == []
    y = K._empty_like(large)
    assert y.stride() == large.stride()
    assert advised == [(y.data_ptr(), 32 * mib)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_to_channels_inner_writes_the_values_with_channels_innermost(dtype):
    """kernels.to_channels_inner: a contiguous (N, C, L) tensor copied with its channels
    innermost, value for value, for every element size and channel counts that are and are not
    multiples of the loop's blocks of eight; None where torch's own copy is left to do it."""
    for shape in [(2, 5, 7), (3, 8, 16), (2, 13, 3), (1, 1, 1), (4, 128, 2), (2, 70, 33)]:
        g = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
        out = K.to_channels_inner(g)
        assert torch.equal(out, g), shape
        assert out.stride() == (shape[1] * shape[2], 1, shape[1])
    g = torch.randn(2, 3, 4)
    assert K.to_channels_inner(g.transpose(1, 2).contiguous().transpose(1, 2)) is None
    assert K.to_channels_inner(torch.randn(2, K.SWAP_MAX_C + 1, 3)) is None
    assert K.to_channels_inner(torch.randn(2, 3)) is None
    assert K.to_channels_inner(torch.randn(2, 3, 4, dtype=torch.cfloat)) is None


def test_tensors_that_run_operators_themselves_are_never_read():
    """A ``__torch_dispatch__`` subclass (torch's test ``TwoTensor``: address 0, its values in
    two other tensors) gets no numpy view (TypeError naming its class, as for any tensor the
    loops cannot read), the kernels report why they cannot take it as the input or as a
    parameter, and the "fused" backend refuses it; a subclass without its own operators
    (``as_subclass``) is viewed as the plain tensor it is."""
    from torch.testing._internal.two_tensor import TwoTensor

    a = torch.randn(4, 3)
    two = TwoTensor(a, a * 2)
    with pytest.raises(TypeError, match="TwoTensor"):
        K.array_view(two)
    assert "TwoTensor input" in K.unsupported_reason(two)
    w = torch.ones(3)
    assert "TwoTensor parameter" in K.unsupported_reason(a, TwoTensor(w, w))
    with bnlab.use_backend("fused"), pytest.raises(ValueError, match="TwoTensor"):
        B.choose(a, TwoTensor(w, w))

    class Plain(torch.Tensor):
        pass

    view = K.array_view(a.as_subclass(Plain))
    view[0, 0] = 7.0
    assert a[0, 0] == 7.0
