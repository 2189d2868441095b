"""Numba loops of the fused batch-norm kernels (Ioffe & Szegedy 2015, Algorithm 1, section 3).

Two memory layouts, both viewed without copying by :mod:`bnlab.kernels`:

* ``ncs`` - ``(N, C, S)`` with ``S = prod(spatial) > 1``: a contiguous NCHW/NCDHW/NCL tensor.
  Each ``(n, c)`` row of ``S`` values is contiguous; work is split over the ``N * C`` rows.
* ``mc``  - ``(M, C)`` with channels innermost: a dense ``(N, C)`` input (``M = N``) or a
  channels_last input (``M = N * prod(spatial)``). Work is split over chunks of rows.

Statistics (numerically stable, one read of x). Every value is first shifted by its channel's
first value ``x_0`` and accumulated in float64 (for float32 inputs too), one block at a time (one
``(n, c)`` row for ``ncs``, a chunk of rows for ``mc``)::

    d = x - x_0,   s1 = sum_b d,   s2 = sum_b d^2,   mean_b = s1 / n_b,   M2_b = s2 - s1 mean_b

This is the shifted-data algorithm: its relative error in ``M2_b`` is about
``1e-16 * ((mean_b - x_0) / std_b)^2``, i.e. below 1e-12 unless the channel's first value is
more than ~100 standard deviations from the rest, far below float32 resolution in any case, and
hardly dependent on the block length (the sums are float64). It reads x once; an exact two-pass
per block would read it twice and make the forward compute-bound instead of memory-bound
(figures in docs/kernels.md).

Blocks are then merged per channel (Chan et al.'s pairwise formula)::

    mean = x_0 + sum_b n_b mean_b / m                   (mean_b of the shifted values)
    M2   = sum_b M2_b + sum_b n_b (mean_b - mean)^2          var = M2 / m  (biased)

so no ``E[x^2] - E[x]^2`` cancellation at full magnitude appears anywhere (an input with mean
1e4 and std 1 keeps its precision in float32; mean 1e9 and std 1e-3 in float64 is tested).
Gradient sums are accumulated in float64 as well.

Elementwise passes run in the input's dtype with per-channel coefficients precomputed in float64
and rounded once (``coef`` arrays).

Small inputs run serially. A parallel region costs a launch and a join (waking every thread of
the pool, then waiting for the slowest), a fixed cost of the order of the whole work of a few
tens of thousands of values, and a thread gets no more than its own chunk of at least
``_MIN_CHUNK`` values. So ``(M, C)`` inputs of at most ``SERIAL_MAX`` values take the serial
``*_serial`` kernels: the same statistics with one block (the whole input) and the same
coefficients, no parallel region, no scratch arrays beyond the (C,) sums.
:func:`mc_train_loops` makes the choice.

Floating-point flags: reductions need reassociation to vectorise, so the loops are compiled with
``reassoc``/``contract``/``arcp``/``nsz`` but *not* ``nnan``/``ninf``: NaN and Inf still propagate
to the statistics, which the layer checks.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

__all__ = [
    "train_fwd_ncs",
    "train_fwd_mc",
    "eval_fwd_ncs",
    "eval_fwd_mc",
    "backward_ncs",
    "backward_mc",
    "commit_stats",
    "train_fwd_serial",
    "backward_serial",
    "SERIAL_MAX",
    "mc_rows_per_chunk",
    "mc_train_loops",
    "follow_threads",
]


def follow_threads(n: int) -> None:
    """Run the parallel loops called from this thread on ``n`` threads, at most the pool size
    Numba was started with (``NUMBA_NUM_THREADS``) and at least one."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


_FM = {"reassoc", "contract", "arcp", "nsz"}
_OPTS = dict(parallel=True, cache=True, fastmath=_FM, nogil=True)
# Per-channel loops (C values) and the serial kernels: no parallel region to launch.
_SERIAL = dict(cache=True, fastmath=_FM, nogil=True)

# Rows per chunk for the (M, C) layout: at most 64 chunks (enough for any thread count here),
# each at least ~16K values when possible and at most ~256K values (bounded partial-sum arrays,
# and chunks that stay in L2 between the statistics and the normalize pass when M*C is small).
_MIN_CHUNK = 1 << 14
_MAX_CHUNK = 1 << 18
_MAX_CHUNKS = 64

# (M, C) inputs of at most this many values take the serial kernels (module docstring): four
# minimum-size chunks, too little work per thread to pay for a parallel region.
SERIAL_MAX = 4 * _MIN_CHUNK


@njit(cache=True)
def mc_rows_per_chunk(M: int, C: int) -> int:
    """Rows per chunk for an (M, C) layout (see module docstring)."""
    r = max((M + _MAX_CHUNKS - 1) // _MAX_CHUNKS, _MIN_CHUNK // C)
    r = min(r, max(1, _MAX_CHUNK // C))
    return max(1, min(r, M))


# ----------------------------------------------------------------------------------- statistics
@njit(**_SERIAL)
def _finish_stats(mean, var, w, b, has_w, has_b, eps, stats):
    """From (C,) float64 mean/var, fill stats (6, C) in the input dtype::

    stats[0:3] = mean, var, invstd = 1 / sqrt(var + eps)
    stats[3:6] = mean, gamma * invstd, beta          (the normalize coefficients)
    """
    C = mean.shape[0]
    for c in range(C):
        inv = 1.0 / math.sqrt(var[c] + eps)
        stats[0, c] = mean[c]
        stats[1, c] = var[c]
        stats[2, c] = inv
        stats[3, c] = mean[c]
        stats[4, c] = inv * w[c] if has_w else inv
        stats[5, c] = b[c] if has_b else 0.0


@njit(**_OPTS)
def _normalize_ncs(x, coef, relu, y):
    """y = (x - mean) * (gamma * invstd) + beta [then max(., 0)], rows (n, c) in parallel."""
    N, C, S = x.shape
    for i in prange(N * C):
        n = i // C
        c = i - n * C
        mu = coef[0, c]
        a = coef[1, c]
        bb = coef[2, c]
        xr = x[n, c]
        yr = y[n, c]
        if relu:
            for k in range(S):
                v = (xr[k] - mu) * a + bb
                yr[k] = v if v > 0 else 0.0
        else:
            for k in range(S):
                yr[k] = (xr[k] - mu) * a + bb


@njit(**_OPTS)
def _normalize_mc(x, coef, relu, y, R):
    """Same as :func:`_normalize_ncs` for an (M, C) layout, chunks of R rows in parallel."""
    M, C = x.shape
    K = (M + R - 1) // R
    mu = coef[0]
    a = coef[1]
    bb = coef[2]
    for k in prange(K):
        for r in range(k * R, min(M, (k + 1) * R)):
            xr = x[r]
            yr = y[r]
            if relu:
                for c in range(C):
                    v = (xr[c] - mu[c]) * a[c] + bb[c]
                    yr[c] = v if v > 0 else 0.0
            else:
                for c in range(C):
                    yr[c] = (xr[c] - mu[c]) * a[c] + bb[c]


@njit(**_OPTS)
def train_fwd_ncs(x, w, b, has_w, has_b, eps, relu, y, stats):
    """Training forward on (N, C, S): fills y (N, C, S) and stats (6, C) in x's dtype: rows
    mean, biased var, invstd, then the normalize coefficients (see :func:`_finish_stats`)."""
    N, C, S = x.shape
    mean = np.empty(C, np.float64)
    var = np.empty(C, np.float64)
    bmean = np.empty((N, C), np.float64)
    bm2 = np.empty((N, C), np.float64)
    for i in prange(N * C):  # shifted sums of each row
        n = i // C
        c = i - n * C
        xr = x[n, c]
        x0 = np.float64(x[0, c, 0])  # the channel's shift (see module docstring)
        s = 0.0
        q = 0.0
        for k in range(S):
            d = xr[k] - x0
            s += d
            q += d * d
        mb = s / S  # block mean - x0
        bmean[n, c] = mb
        bm2[n, c] = max(q - s * mb, 0.0)
    for c in prange(C):  # merge the N rows of each channel (equal counts S)
        s = 0.0
        for n in range(N):
            s += bmean[n, c]
        mu = s / N
        q = 0.0
        for n in range(N):
            d = bmean[n, c] - mu
            q += bm2[n, c] + S * d * d
        mean[c] = x[0, c, 0] + mu
        var[c] = q / (N * S)
    _finish_stats(mean, var, w, b, has_w, has_b, eps, stats)
    _normalize_ncs(x, stats[3:], relu, y)


@njit(**_OPTS)
def train_fwd_mc(x, w, b, has_w, has_b, eps, relu, y, stats):
    """Training forward on (M, C), channels innermost; same outputs as :func:`train_fwd_ncs`."""
    M, C = x.shape
    mean = np.empty(C, np.float64)
    var = np.empty(C, np.float64)
    R = mc_rows_per_chunk(M, C)
    K = (M + R - 1) // R
    cmean = np.empty((K, C), np.float64)
    cm2 = np.empty((K, C), np.float64)
    for k in prange(K):  # shifted sums of each chunk of rows
        r0 = k * R
        r1 = min(M, r0 + R)
        # One pass of shifted sums (see module docstring): s1 = sum d, s2 = sum d^2 with
        # d = x - x0 in float64, then M2 = s2 - s1^2 / n for the chunk.
        x0 = x[0].astype(np.float64)
        s1 = np.zeros(C, np.float64)
        s2 = np.zeros(C, np.float64)
        r = r0
        while r + 4 <= r1:  # 4 rows per sweep: 4x fewer accumulator loads/stores
            xa = x[r]
            xb = x[r + 1]
            xc = x[r + 2]
            xd = x[r + 3]
            for c in range(C):
                z = x0[c]
                da = xa[c] - z
                db = xb[c] - z
                dc = xc[c] - z
                dd = xd[c] - z
                s1[c] += (da + db) + (dc + dd)
                s2[c] += (da * da + db * db) + (dc * dc + dd * dd)
            r += 4
        for rr in range(r, r1):
            xr = x[rr]
            for c in range(C):
                d = xr[c] - x0[c]
                s1[c] += d
                s2[c] += d * d
        inv_n = 1.0 / (r1 - r0)
        for c in range(C):
            cmean[k, c] = s1[c] * inv_n  # chunk mean - x0
            cm2[k, c] = max(s2[c] - s1[c] * s1[c] * inv_n, 0.0)
    for c in prange(C):  # merge chunks (the last may be shorter)
        s = 0.0
        for k in range(K):
            s += cmean[k, c] * (min(M, (k + 1) * R) - k * R)
        mu = s / M
        q = 0.0
        for k in range(K):
            d = cmean[k, c] - mu
            q += cm2[k, c] + (min(M, (k + 1) * R) - k * R) * d * d
        mean[c] = x[0, c] + mu
        var[c] = q / M
    _finish_stats(mean, var, w, b, has_w, has_b, eps, stats)
    _normalize_mc(x, stats[3:], relu, y, R)


# ----------------------------------------------------------------------------------- inference
@njit(**_SERIAL)
def _eval_coef(rm, rv, w, b, has_w, has_b, eps, stats):
    """stats (4, C): invstd, then the normalize coefficients (mean, gamma invstd, beta)."""
    C = rm.shape[0]
    for c in range(C):
        inv = 1.0 / math.sqrt(np.float64(rv[c]) + eps)
        stats[0, c] = inv
        stats[1, c] = rm[c]
        stats[2, c] = inv * w[c] if has_w else inv
        stats[3, c] = b[c] if has_b else 0.0


@njit(cache=True, nogil=True)
def eval_fwd_ncs(x, rm, rv, w, b, has_w, has_b, eps, relu, y, stats):
    """Inference forward on (N, C, S) with population statistics (Algorithm 2)."""
    _eval_coef(rm, rv, w, b, has_w, has_b, eps, stats)
    _normalize_ncs(x, stats[1:], relu, y)


@njit(cache=True, nogil=True)
def eval_fwd_mc(x, rm, rv, w, b, has_w, has_b, eps, relu, y, stats):
    """Inference forward on (M, C) with population statistics (Algorithm 2)."""
    _eval_coef(rm, rv, w, b, has_w, has_b, eps, stats)
    _normalize_mc(x, stats[1:], relu, y, mc_rows_per_chunk(x.shape[0], x.shape[1]))


# ----------------------------------------------------------------------------------- backward
@njit(**_SERIAL)
def _bwd_coef(sums, mean, invstd, w, has_w, train, m, coef, grads):
    """From the sums: grads = (dgamma, dbeta) and the dx coefficients (mean, A, B, D)."""
    C = mean.shape[0]
    for c in range(C):
        inv = np.float64(invstd[c])
        s1 = sums[0, c]
        s2 = sums[1, c]
        grads[0, c] = s2 * inv  # dL/dgamma = sum g x_hat
        grads[1, c] = s1  # dL/dbeta = sum g
        a = inv * w[c] if has_w else inv
        coef[0, c] = mean[c]
        coef[1, c] = a
        coef[2, c] = a * inv * inv * s2 / m if train else 0.0
        coef[3, c] = a * s1 / m if train else 0.0


@njit(**_OPTS)
def _sums_ncs(dy, x, y, relu, mean, sums):
    """sums[0] = sum g, sums[1] = sum g (x - mean) per channel, float64; rows in parallel.
    ``g = dy`` or, for the fused ReLU, ``g = dy * (y > 0)``."""
    N, C, S = x.shape
    p1 = np.empty((N, C), np.float64)
    p2 = np.empty((N, C), np.float64)
    for i in prange(N * C):
        n = i // C
        c = i - n * C
        mu = mean[c]
        xr = x[n, c]
        gr = dy[n, c]
        s1 = 0.0
        s2 = 0.0
        if relu:
            yr = y[n, c]
            for k in range(S):
                g = gr[k] if yr[k] > 0 else 0.0
                s1 += g
                s2 += g * (xr[k] - mu)
        else:
            for k in range(S):
                g = gr[k]
                s1 += g
                s2 += g * (xr[k] - mu)
        p1[n, c] = s1
        p2[n, c] = s2
    for c in prange(C):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            s1 += p1[n, c]
            s2 += p2[n, c]
        sums[0, c] = s1
        sums[1, c] = s2


@njit(**_OPTS)
def _sums_mc(dy, x, y, relu, mean, sums):
    """(M, C) version of :func:`_sums_ncs`, chunks of rows in parallel."""
    M, C = x.shape
    R = mc_rows_per_chunk(M, C)
    K = (M + R - 1) // R
    p1 = np.zeros((K, C), np.float64)
    p2 = np.zeros((K, C), np.float64)
    for k in prange(K):
        s1 = p1[k]
        s2 = p2[k]
        r0 = k * R
        r1 = min(M, (k + 1) * R)
        if not relu:  # 2 rows per sweep: half the accumulator loads/stores
            while r0 + 2 <= r1:
                xa = x[r0]
                xb = x[r0 + 1]
                ga = dy[r0]
                gb = dy[r0 + 1]
                for c in range(C):
                    s1[c] += ga[c] + gb[c]
                    s2[c] += ga[c] * (xa[c] - mean[c]) + gb[c] * (xb[c] - mean[c])
                r0 += 2
        for r in range(r0, r1):
            xr = x[r]
            gr = dy[r]
            if relu:
                yr = y[r]
                for c in range(C):
                    g = gr[c] if yr[c] > 0 else 0.0
                    s1[c] += g
                    s2[c] += g * (xr[c] - mean[c])
            else:
                for c in range(C):
                    g = gr[c]
                    s1[c] += g
                    s2[c] += g * (xr[c] - mean[c])
    for c in prange(C):
        s1 = 0.0
        s2 = 0.0
        for k in range(K):
            s1 += p1[k, c]
            s2 += p2[k, c]
        sums[0, c] = s1
        sums[1, c] = s2


@njit(**_OPTS)
def _dx_ncs(dy, x, y, relu, coef, dx):
    """dx = A g - B (x - mean) - D per channel, coef rows (mean, A, B, D); (N, C, S) rows.

    Training (section 3, collected): A = gamma invstd, B = A invstd^2 sum(g (x-mu)) / m,
    D = A sum(g) / m.  Inference: B = D = 0.
    """
    N, C, S = x.shape
    for i in prange(N * C):
        n = i // C
        c = i - n * C
        mu = coef[0, c]
        a = coef[1, c]
        bb = coef[2, c]
        d = coef[3, c]
        xr = x[n, c]
        gr = dy[n, c]
        dr = dx[n, c]
        if relu:
            yr = y[n, c]
            for k in range(S):
                g = gr[k] if yr[k] > 0 else 0.0
                dr[k] = a * g - bb * (xr[k] - mu) - d
        else:
            for k in range(S):
                dr[k] = a * gr[k] - bb * (xr[k] - mu) - d


@njit(**_OPTS)
def _dx_mc(dy, x, y, relu, coef, dx):
    """(M, C) version of :func:`_dx_ncs`."""
    M, C = x.shape
    R = mc_rows_per_chunk(M, C)
    K = (M + R - 1) // R
    mu = coef[0]
    a = coef[1]
    bb = coef[2]
    d = coef[3]
    for k in prange(K):
        for r in range(k * R, min(M, (k + 1) * R)):
            xr = x[r]
            gr = dy[r]
            dr = dx[r]
            if relu:
                yr = y[r]
                for c in range(C):
                    g = gr[c] if yr[c] > 0 else 0.0
                    dr[c] = a[c] * g - bb[c] * (xr[c] - mu[c]) - d[c]
            else:
                for c in range(C):
                    dr[c] = a[c] * gr[c] - bb[c] * (xr[c] - mu[c]) - d[c]


@njit(cache=True, nogil=True)
def backward_ncs(dy, x, y, relu, mean, invstd, w, has_w, train, need_sums, need_dx, dx, grads):
    """Backward on (N, C, S): grads (2, C) = (dgamma, dbeta) when need_sums or train, dx when
    need_dx. ``train`` selects Algorithm 1's gradient (batch statistics) over the inference one."""
    C = mean.shape[0]
    sums = np.zeros((2, C), np.float64)
    if need_sums or train:
        _sums_ncs(dy, x, y, relu, mean, sums)
    coef = np.empty((4, C), x.dtype)
    _bwd_coef(sums, mean, invstd, w, has_w, train, x.size // C, coef, grads)
    if need_dx:
        _dx_ncs(dy, x, y, relu, coef, dx)


@njit(cache=True, nogil=True)
def backward_mc(dy, x, y, relu, mean, invstd, w, has_w, train, need_sums, need_dx, dx, grads):
    """(M, C) version of :func:`backward_ncs`."""
    C = mean.shape[0]
    sums = np.zeros((2, C), np.float64)
    if need_sums or train:
        _sums_mc(dy, x, y, relu, mean, sums)
    coef = np.empty((4, C), x.dtype)
    _bwd_coef(sums, mean, invstd, w, has_w, train, x.size // C, coef, grads)
    if need_dx:
        _dx_mc(dy, x, y, relu, coef, dx)


# ----------------------------------------------------------------------------- running statistics
@njit(cache=True, nogil=True)
def commit_stats(mean, var, rm, rv, nbt, update, cumulative, momentum, m):
    """Accept a batch's (C,) statistics: False, touching nothing, if any is NaN or Inf; else, with
    ``update``, fold them into the running averages (Algorithm 2's population estimates)::

        nbt += 1;  f = 1 / nbt if cumulative (torch's momentum=None) else momentum (any float)
        rm <- rm + f (mean - rm),   rv <- rv + f (m / (m - 1) var - rv)     (float64 arithmetic)

    One serial loop over C values: the check and both averages in one call instead of a
    handful of tensor ops.
    """
    C = mean.shape[0]
    for c in range(C):
        if not (math.isfinite(mean[c]) and math.isfinite(var[c])):
            return False
    if update:
        nbt[()] += 1
        f = 1.0 / nbt[()] if cumulative else momentum
        unbias = m / (m - 1.0)
        for c in range(C):
            mu = np.float64(mean[c])
            v = np.float64(var[c]) * unbias
            rm[c] = rm[c] + f * (mu - rm[c])
            rv[c] = rv[c] + f * (v - rv[c])
    return True


# ---------------------------------------------------------------------------- small (M, C) inputs
@njit(**_SERIAL)
def _stats_serial(x, w, b, has_w, has_b, eps, stats):
    """Statistics and coefficients of a small (M, C) input into stats (6, C), as
    :func:`train_fwd_mc` computes them with one block (the whole batch), serial."""
    M, C = x.shape
    s1 = np.zeros(C, np.float64)
    s2 = np.zeros(C, np.float64)
    x0 = x[0]
    for r in range(M):
        xr = x[r]
        for c in range(C):
            d = np.float64(xr[c]) - x0[c]
            s1[c] += d
            s2[c] += d * d
    mean = np.empty(C, np.float64)
    var = np.empty(C, np.float64)
    for c in range(C):
        mu = s1[c] / M  # mean - x0
        mean[c] = x0[c] + mu
        var[c] = max(s2[c] - s1[c] * mu, 0.0) / M
    _finish_stats(mean, var, w, b, has_w, has_b, eps, stats)


@njit(**_SERIAL)
def _normalize_serial(x, coef, relu, y):
    """y = (x - mean) * (gamma * invstd) + beta [then max(., 0)], serial."""
    M, C = x.shape
    mu = coef[0]
    a = coef[1]
    bb = coef[2]
    for r in range(M):
        xr = x[r]
        yr = y[r]
        if relu:
            for c in range(C):
                v = (xr[c] - mu[c]) * a[c] + bb[c]
                yr[c] = v if v > 0 else 0.0
        else:
            for c in range(C):
                yr[c] = (xr[c] - mu[c]) * a[c] + bb[c]


@njit(**_SERIAL)
def train_fwd_serial(x, w, b, has_w, has_b, eps, relu, y, stats):
    """:func:`train_fwd_mc` for a small (M, C) input (at most ``SERIAL_MAX`` values), serial."""
    _stats_serial(x, w, b, has_w, has_b, eps, stats)
    _normalize_serial(x, stats[3:], relu, y)


@njit(**_SERIAL)
def backward_serial(dy, x, y, relu, mean, invstd, w, has_w, train, need_sums, need_dx, dx, grads):
    """:func:`backward_mc` for a small (M, C) input, serial."""
    M, C = x.shape
    sums = np.zeros((2, C), np.float64)
    if need_sums or train:
        s1 = sums[0]
        s2 = sums[1]
        for r in range(M):
            xr = x[r]
            gr = dy[r]
            if relu:
                yr = y[r]
                for c in range(C):
                    g = gr[c] if yr[c] > 0 else 0.0
                    s1[c] += g
                    s2[c] += g * (xr[c] - mean[c])
            else:
                for c in range(C):
                    g = gr[c]
                    s1[c] += g
                    s2[c] += g * (xr[c] - mean[c])
    coef = np.empty((4, C), x.dtype)
    _bwd_coef(sums, mean, invstd, w, has_w, train, M, coef, grads)
    if need_dx:
        mu = coef[0]
        a = coef[1]
        bb = coef[2]
        d = coef[3]
        for r in range(M):
            xr = x[r]
            gr = dy[r]
            dr = dx[r]
            if relu:
                yr = y[r]
                for c in range(C):
                    g = gr[c] if yr[c] > 0 else 0.0
                    dr[c] = a[c] * g - bb[c] * (xr[c] - mu[c]) - d[c]
            else:
                for c in range(C):
                    dr[c] = a[c] * gr[c] - bb[c] * (xr[c] - mu[c]) - d[c]


def mc_train_loops(size: int):
    """``(forward, backward)``: the compiled training loops for an ``(M, C)`` input of ``size``
    values, :func:`train_fwd_serial` / :func:`backward_serial` up to ``SERIAL_MAX`` values, else
    :func:`train_fwd_mc` / :func:`backward_mc` (each pair takes the same arguments)."""
    if size <= SERIAL_MAX:
        return train_fwd_serial, backward_serial
    return train_fwd_mc, backward_mc
