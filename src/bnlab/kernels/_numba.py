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
and rounded once (``coef`` arrays). The normalize pass applies ``y = a x + c`` (one fused
multiply-add): against the centred form ``(x - mean) a + beta``, one coefficient fewer to load
per value where channels are innermost, at the same precision (:func:`_affine`). The dx pass
keeps the centred form ``A g - B (x - mean) - D``: folded the same way, its ``B x`` and ``B mean``
would cancel to far less than either where a channel's variance is tiny (``B`` grows as
``invstd^3``), which costs precision the centred form keeps.

A bfloat16 input comes as a uint16 array of its bits; the loops read and write every element
through ``_ld``/``_st`` (below), so it is computed as its float32 copy would be (coefficients,
statistics and sums in float32/float64), outputs rounded once to bfloat16.

Serial or parallel. Each loop is written once, over a range of rows; a parallel call runs it
per chunk inside ``prange``, a serial call once over the whole input, so both give the same
statistics up to the float64 rounding of the block merge. A parallel region costs a launch and a
join (waking every thread of the pool, then waiting for the slowest), a fixed cost of the order
of the whole work of a few tens of thousands of values, and a thread gets no more than its own
chunk. So a call on at most ``SERIAL_MAX`` values runs serially (:func:`use_serial`). The
public kernels are plain (non-parallel) functions that make that choice and call the ``*_par``
loops when it pays. A serial call gives its first row as ``np.intp(0)``, not ``0``: Numba types a
literal argument as ``Literal[int](0)`` and would compile the loop a second time for it.

Floating-point flags: reductions need reassociation to vectorise, so the loops are compiled with
``reassoc``/``contract``/``arcp``/``nsz`` but *not* ``nnan``/``ninf``: NaN and Inf still propagate
to the statistics, which the layer checks.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange

try:  # the thread count inside compiled code, as a call Numba's on-disk cache can keep
    from numba.np.ufunc.parallel import _iget_num_threads as _num_threads
except ImportError:  # pragma: no cover (a Numba without it: the same count, uncached loops)
    from numba import get_num_threads as _num_threads
from numba.core import cgutils, types
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

__all__ = [
    "train_fwd_ncs",
    "train_fwd_mc",
    "eval_fwd_ncs",
    "eval_fwd_mc",
    "backward_ncs",
    "backward_mc",
    "commit_stats",
    "SERIAL_MAX",
    "use_serial",
    "mc_rows_per_chunk",
    "follow_threads",
    "train_fwd_at",
    "eval_fwd_at",
    "backward_at",
]


def follow_threads(n: int) -> None:
    """Run the parallel loops called from this thread on ``n`` threads, at most the pool size
    Numba was started with (``NUMBA_NUM_THREADS``) and at least one."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


# -------------------------------------------------------------------------------- bfloat16 values
# A bfloat16 tensor comes in as a uint16 array of its bits (Numba has no 16-bit float type). Every
# loop reads its inputs through _ld and writes its outputs through _st, which are the identity for
# float32/float64 arrays and, for bfloat16 bits, the exact widening to float32 (the bits are the
# top half of a float32) and float32 -> bfloat16 rounding to nearest even (NaN -> 0x7FC0), as
# torch rounds. Statistics, coefficients and sums are float32/float64 as for a float32 input, so
# a bfloat16 input gives what its float32 copy would, rounded once at the output (up to the last
# bit of an intermediate: reassociation and contraction are allowed, and LLVM may vectorize the
# two specializations differently). They are plain overloads, which LLVM inlines: inlining them in
# Numba's IR as well compiled the bfloat16 loops about a quarter slower, for the same machine code
# speed.
@intrinsic
def _bits_f32(typingctx, u):
    """float32 with the bits of the low 32 bits of the integer ``u``."""
    if not isinstance(u, types.Integer) or u.bitwidth < 32:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if u.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def _f32_bits(typingctx, f):
    """The bits of float32 ``f`` as a uint32."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _ld(v):
    """A loaded element as a float (see above)."""


def _st(v, dst):
    """``v`` as an element of the array ``dst`` (see above)."""


@intrinsic
def _keep(typingctx, v, keep):
    """``v`` if ``keep`` else zero, in ``v``'s own float type: ``v if keep else 0.0`` would
    widen a float32 ``v`` to float64 and with it the arithmetic that follows (the ReLU masks of
    the elementwise passes, which run in the input's dtype)."""
    if not isinstance(v, types.Float) or keep != types.boolean:
        return None

    def codegen(context, builder, sig, args):
        return builder.select(args[1], args[0], ir.Constant(args[0].type, 0.0))

    return v(v, keep), codegen


@overload(_ld)
def _ld_impl(v):
    if v == types.uint16:
        return lambda v: _bits_f32(np.uint32(v) << np.uint32(16))
    return lambda v: v


@overload(_st)
def _st_impl(v, dst):
    if dst.dtype == types.uint16:

        def to_bf16(v, dst):
            u = _f32_bits(np.float32(v))
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                return np.uint16(0x7FC0)
            return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> 16)

        return to_bf16
    return lambda v, dst: v


_FM = {"reassoc", "contract", "arcp", "nsz"}
_OPTS = dict(parallel=True, cache=True, fastmath=_FM, nogil=True)
# Per-channel loops (C values) and the serial kernels: no parallel region to launch.
_SERIAL = dict(cache=True, fastmath=_FM, nogil=True)
# The layout kernels between an address entry point (``*_at``) and the loops they call
# (``train_fwd_mc``, ``backward_ncs``, ``_mc_norm``, ...) are inlined into their callers as Numba
# IR. Numba compiles every function into a module of its own, links its callees' modules in
# and optimizes the result again, so each level of calls re-optimizes all the code beneath it;
# these levels hold little code of their own, and inlining them takes a level off every loop's
# compile. (Not the row loops: they are called both serially and inside the parallel loops,
# and inlined they would be optimized once per call site.) Called from Python, each still
# compiles as a function of its own.
_INLINE = dict(_SERIAL, inline="always")

# Software prefetch. The channels_last statistics of narrow layers do two float64 multiply-adds
# per value read and load and store their accumulators every sweep; with their input out of the
# caches the hardware prefetchers did not keep that loop fed, and it read far below a plain
# read's speed. So it names each line it will read ``_AHEAD_BYTES`` ahead of its sweep
# (``_prefetch``: a hint, which changes no value and cannot fault). Where the data is in the
# caches already the hints are pure cost, a small one (figures in docs/kernels.md). The gradient
# sums read two arrays (dy and x) at a float64 multiply-add per value, and on a CPU whose one
# core keeps few lines in flight (a 2-core slice of an Intel Xeon) they read from memory well
# below a plain two-array read's speed; they name the lines of both ``_AHEAD_BYTES`` ahead too
# (NCHW runs; the channels_last column blocks), and so do the statistics (NCHW runs, the column
# blocks). The NCHW dx pass did not gain from them there; the other passes were not measured
# with them on that CPU.
_AHEAD_BYTES = 4096
_LINE_BYTES = 64


@intrinsic
def _prefetch(typingctx, a, i):
    """Hint that ``a[i]`` (a 1-d array, ``0 <= i < a.size``) will be read soon: ``llvm.prefetch``
    for reading, into all cache levels."""
    if not isinstance(a, types.Array) or a.ndim != 1 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        _prefetch_at(builder, ptr, ir.IntType(64)(0))
        return context.get_dummy_value()

    return types.void(a, i), codegen


def _prefetch_at(builder, ptr_elem, index):
    """``llvm.prefetch`` of ``ptr_elem[index]`` for reading, into all cache levels (the code of
    :func:`_prefetch`, for intrinsics)."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
    # (read, highest locality, data cache)
    builder.call(fn, [builder.bitcast(builder.gep(ptr_elem, [index]), i8p), i32(0), i32(3),
                      i32(1)])  # fmt: skip


@intrinsic
def _at(typingctx, address, like):
    """A pointer to elements of ``like``'s dtype at the integer ``address``: the ``*_at``
    kernels take the large tensors as addresses (see :func:`train_fwd_at`)."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    sig = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return sig, codegen


@intrinsic
def _flat(typingctx, a):
    """The values of the C-contiguous array ``a`` as a 1-d array, borrowed (no reference of its
    own: valid while ``a`` is, as the loops use it inside one call). ``a.reshape(-1)`` is the
    same array but calls into Numba's helper library to check the strides, a call the chunked
    passes made for each array of each chunk (measured in docs/kernels.md)."""
    if not isinstance(a, types.Array) or a.layout != "C":
        return None
    sig = types.Array(a.dtype, 1, "C")(a)

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        out = context.make_array(sig.return_type)(context, builder)
        populate_array(out, data=src.data, shape=[src.nitems], strides=[src.itemsize],
                       itemsize=src.itemsize, meminfo=None)  # fmt: skip
        return out._getvalue()

    return sig, codegen


# Rows per chunk for the (M, C) layout: at most 64 chunks (enough for any thread count here),
# each at least ~16K values and _MIN_ROWS rows when possible and at most ~256K values (bounded
# partial-sum arrays, and chunks that stay in L2 between the statistics and the normalize pass
# when M*C is small). Each chunk of a reduction writes two float64 partial sums per channel, which
# the merge reads again: against R rows of float32 that is 16 / (4 R) of the pass's traffic, 25%
# on a 16-row chunk of a wide layer and 6% from _MIN_ROWS, and those lines move more than once
# (zeroed, added to, evicted by the stream of data, merged), so they cost short chunks more than
# that share (docs/kernels.md). So a chunk also takes up to _PARTIAL_ROWS rows where that leaves
# at least _MIN_CHUNKS chunks, above the ~256K values if need be; wide layers with few rows are
# the ones this changes. (The chunks may not depend on the thread count, so their number is a
# compromise: 32 split evenly over 2, 4, 8, 16 and 32 threads and within one chunk in eight over
# 3, 6 or 12, where 16 chunks would leave 12 threads half of the time idle.)
_MIN_CHUNK = 1 << 14
_MAX_CHUNK = 1 << 18
_MAX_CHUNKS = 64
_MIN_ROWS = 64
_PARTIAL_ROWS = 256
_MIN_CHUNKS = 32

# Inputs of at most this many values (any layout) run serially (module docstring, use_serial):
# four minimum-size chunks, too little work per thread to pay for a parallel region.
SERIAL_MAX = 4 * _MIN_CHUNK


@njit(cache=True)
def mc_rows_per_chunk(M: int, C: int) -> int:
    """Rows per chunk for an (M, C) layout (see module docstring)."""
    r = max((M + _MAX_CHUNKS - 1) // _MAX_CHUNKS, _MIN_CHUNK // C, _MIN_ROWS)
    r = min(r, max(1, _MAX_CHUNK // C))
    r = max(r, min(_PARTIAL_ROWS, (M + _MIN_CHUNKS - 1) // _MIN_CHUNKS))
    return max(1, min(r, M))


# ------------------------------------------------------------------------------- serial or parallel
@njit(cache=True)
def use_serial(size: int) -> bool:
    """True when a call on ``size`` values runs its loops serially: at most ``SERIAL_MAX``
    values, too little work per thread to pay for a parallel region. (On one thread a parallel
    region costs about a microsecond, a few percent of the work above that size. The choice
    and the chunks do not depend on the thread count, so neither do the values; inside the
    loops it only splits the chunks into spans, see :func:`_span`.)"""
    return size <= SERIAL_MAX


@njit(cache=True)
def _chunks(rows: int) -> tuple[int, int]:
    """``(R, K)``: K chunks of R consecutive (n, c) rows for the ``ncs`` parallel loops (at most
    ``_MAX_CHUNKS``; rows all have the same length, so equal chunks balance the threads)."""
    K = min(rows, _MAX_CHUNKS)
    R = (rows + K - 1) // K
    return R, (rows + R - 1) // R


# Passes in order. A layer's second pass over its input (the normalize pass after the statistics;
# the dx pass after the gradient sums) reads what the first has just read. Each thread takes a
# contiguous span of the chunks (:func:`_span`, one parallel iteration per thread): the first
# pass runs its span first to last, the second last to first, so it starts on the chunks the
# first pass read last, still in that core's caches, instead of the chunks longest evicted. The
# order changes no value: each chunk's sums go to its own slot, merged in chunk order. A pass
# with no pass before it in the call (inference) runs its chunks in order: run backwards, each
# chunk starts a new stream for the hardware prefetchers, with nothing in the caches to make up
# for it (measured slower, docs/kernels.md).
@njit(**_INLINE)
def _teams(K):
    """The number of spans the parallel loops split ``K`` chunks into: one per thread, at most
    ``K``."""
    return max(np.intp(1), min(np.intp(_num_threads()), np.intp(K)))


@njit(**_INLINE)
def _span(K, T, t):
    """``(lo, hi)``: span ``t`` of ``T`` contiguous spans of chunks [0, K), the first
    ``K % T`` one chunk longer."""
    t = np.intp(t)  # (a parallel loop's index may be unsigned)
    q = np.intp(K) // np.intp(T)
    r = np.intp(K) - q * np.intp(T)
    lo = t * q + min(t, r)
    return lo, lo + q + (np.intp(1) if t < r else np.intp(0))


@njit(**_INLINE)
def _nth(lo, hi, j, back):
    """The ``j``-th chunk a thread runs of its span [lo, hi): in order for ``back`` 0, last to
    first for 1 (an integer, and arithmetic rather than a branch: LLVM unswitched a branch on it
    and compiled the loop's body twice)."""
    return lo + j + back * (hi - 1 - lo - 2 * j)


# Channels-innermost loops read runs of rows ("tiles") as one flat vector, so the inner loop is
# long enough to vectorize well whatever C is (a 16-channel float32 row alone is one SIMD
# register), with per-channel values tiled to the same length. A tile is short: reductions keep
# two float64 accumulators per tile value (in registers where C divides _TILE, see the vector
# sweeps below; elsewhere read and written on every sweep), and longer tiles make more of them;
# a row of a wide layer (C >= _TILE) is a tile by itself, as without tiling.
_TILE = 64

# The array loops of the reductions sweep several tiles at once (fewer accumulator loads and
# stores) when a tile is short (at most _TILE values). A sweep over k rows reads k streams a row
# apart: in runs of a few hundred bytes to a few KB the hardware prefetchers (which track
# accesses within a page) follow them poorly, and one row per sweep (one sequential stream) is
# faster (measurements in docs/kernels.md).
#
# Rows of a memory page or more (_LONG_ROW bytes, so C >= _TILE) are reduced a group of rows at
# a time (:func:`_wide_sums`, :func:`_wide_gsums`): one array loop over the channels reads the
# same channel of every row of the group (a few sequential streams, which the hardware
# prefetchers follow), adds the group's values (or products) per channel in float64 registers,
# and updates the row of float64 accumulators once per group. A loop over one row at a time
# loads and stores both accumulators for every value, which made these reductions
# compute-bound at about a cycle per value; sweeping the group in column blocks of _TILE
# channels with the accumulators in registers (the vector sweeps below, with a stride of a row)
# read each row in 256-byte pieces a row apart, which the prefetchers did not follow, and ran
# at 1.6-3.1x a read of the input with cold caches against 1.2-2.2x for the groups
# (docs/kernels.md). The statistics read one array in groups of _WIDE_GROUP rows; the gradient
# sums read two or three, in groups of _WIDE_GSUM_GROUP rows (eight rows, 16-24 streams, were
# slower). The loops are written out for these group sizes.
#
# Shorter rows of more than a tile take the groups too when x has at most _GROUPED_MAX_BYTES (a
# core's L2 on current x86 CPUs): an array that small is usually in the caches, just written by
# the layer before, where the loop's arithmetic and its accumulator loads and stores set the
# pace, not the prefetchers, and the groups did the same sums in 0.5-0.75x the time of the flat
# tiles or the column blocks (but for the gradient sums of rows of whole tiles under
# _BLOCK_GSUM_ROW_BYTES, whose blocks were as fast). From memory, groups of short rows read runs
# of a few hundred bytes a row apart and were slower (docs/kernels.md).
_LONG_ROW = 4096
_GROUPED_MAX_BYTES = 1 << 20
_BLOCK_GSUM_ROW_BYTES = 1024
_WIDE_GROUP = 8
_WIDE_GSUM_GROUP = 4


@njit(cache=True)
def _multi_sweep(P: int) -> bool:
    """Whether the channels_last reductions sweep several tiles of ``P`` values at once (above)."""
    return P <= _TILE


@njit(cache=True)
def _wide_rows(C: int, itemsize: int, nbytes: int) -> bool:
    """Whether the statistics of an (M, C) layout of ``nbytes`` bytes (one array) run in groups
    of whole rows (above)."""
    return C * itemsize >= _LONG_ROW or (C > _TILE and nbytes <= _GROUPED_MAX_BYTES)


@njit(cache=True)
def _wide_gsum_rows(C: int, itemsize: int, nbytes: int) -> bool:
    """Whether the gradient sums of an (M, C) layout of ``nbytes`` bytes (one array) run in
    groups of whole rows: where the statistics do (:func:`_wide_rows`), but for rows of whole
    tiles shorter than ``_BLOCK_GSUM_ROW_BYTES``, whose column blocks keep both sums of a block
    in registers and were as fast as the groups or faster (docs/kernels.md)."""
    if C % _TILE == 0 and C * itemsize < _BLOCK_GSUM_ROW_BYTES:
        return False
    return _wide_rows(C, itemsize, nbytes)


# Layers wider than a tile whose channels come in whole tiles (C a multiple of _TILE, above 64)
# run the channels_last reductions in column blocks: the _TILE channels of a block down a chunk
# of rows, their accumulators in registers (the sweeps above, each tile a row apart), then the
# next block down the same rows, which the first block's sweep brought into the caches (every
# line of a row belongs to one block). A flat tile of C values instead runs LLVM's loop once per
# row, with its setup and overlap checks each time and its accumulators in memory, several
# times the narrow tiles' cost per value (figures in docs/kernels.md). Wide rows reduce in
# groups of rows (``_WIDE_GSUM_GROUP``). The normalize pass runs a row at a time
# (:func:`_affine_lanes`); the dx pass takes the blocks (coefficients in registers) on rows
# shorter than _ROW_DX_BYTES and a row at a time (:func:`_dx_lanes`) on longer ones: there a
# block's chunk holds only a few rows, read in 256-byte pieces a row apart, which made the pass
# 5-15% slower than a plain loop with the data in memory, while on short rows the blocks were
# faster with the data in the caches (docs/kernels.md).
#
# Where the arrays come from memory, not the caches, the blocks win on some CPUs and lose on
# others: a block's sweep reads 256-byte pieces of rows a row apart, and with the lines named
# ahead (software prefetch, above) an Intel Xeon read them at a plain read's speed, while on AMD
# Zen 4 the same sweeps took 1.4-2x the time of the flat tiles' one sequential stream per array
# (Zen 4 and Zen 5 preferred whole rows in earlier designs too; figures in docs/kernels.md). In
# the caches the blocks were faster on both. So arrays of at least ``_BLOCKS_MAX_BYTES`` (half
# the last-level cache, where streaming stores start too) take the blocks only on CPUs where
# they were measured to win from memory (:func:`_host_blocks_from_memory`), and the flat tiles
# elsewhere. A pass counts every array it reads or writes: x for the statistics, dy and x for
# the gradient sums, those and dx for the dx pass. A choice of speed: both sum in float64, the
# flat tiles' array loop in another order (the sums alike to their last places).
_BLOCK_BYTES = 16384  # a chunk's rows: about this many bytes of one array (two fit an L1)
_ROW_DX_BYTES = 1024


def _host_blocks_from_memory() -> bool:
    """Whether the CPU the loops are compiled for runs the column blocks on arrays in memory
    (above): an Intel CPU. Numba keys its on-disk cache by the host's CPU and features, so the
    choice compiled in belongs to the CPU it runs on; code compiled for another CPU
    (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``), or on a system that does not say its vendor,
    takes the flat tiles from memory, which every CPU's prefetchers follow."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip() == "GenuineIntel"
    except OSError:
        pass
    return False


def _blocks_max_bytes() -> int:
    """``_BLOCKS_MAX_BYTES`` (above): unbounded where the blocks win from memory, else half
    the last-level cache. Compiled loops keep the value they were compiled with: Numba's
    on-disk cache is keyed by the CPU, not by its cache size, so the bound of a cache built
    on a machine with the same CPU and another last-level cache is that machine's (a matter
    of speed only)."""
    if _host_blocks_from_memory():
        return 1 << 62
    from bnlab.kernels import llc_bytes

    return llc_bytes() // 2


_BLOCKS_MAX_BYTES = _blocks_max_bytes()


@njit(cache=True)
def _column_blocks(C: int, nbytes: int) -> bool:
    """Whether a pass over an (M, C) layout that moves ``nbytes`` bytes (its arrays together)
    runs in column blocks of ``_TILE`` channels (above)."""
    return C > _TILE and C % _TILE == 0 and nbytes < _BLOCKS_MAX_BYTES


@njit(cache=True)
def _block_rows(C: int, itemsize: int) -> int:
    """Rows per chunk of the column blocks: about ``_BLOCK_BYTES`` of one array."""
    return max(1, _BLOCK_BYTES // (C * itemsize))


@njit(cache=True)
def _ahead_rows(C: int, itemsize: int) -> int:
    """Rows ahead of a column block's sweep whose lines it names (software prefetch, above):
    about ``_AHEAD_BYTES`` of one array, at least one row."""
    return max(1, _AHEAD_BYTES // (C * itemsize))


@njit(cache=True)
def _tile_rows(C: int) -> int:
    """Rows per flat tile of an (M, C) layout: ``_TILE // C`` rows, at least one."""
    return max(1, _TILE // C)


# The elementwise passes (normalize, dx) of widths that are not whole tiles run one vector loop
# per run of values, with per-value coefficients (:func:`_affine_lanes`, :func:`_dx_lanes`). A
# run of one row pays the loop's setup and a masked tail every C values, which on rows of a
# few hundred values cost as much as the arithmetic with the data in the caches; runs of
# several rows, about _LANE_RUN values with the coefficients tiled alike, took 0.6-0.75x the
# time on rows of 100-200 float32 values. Longer runs were slower again for dx (its six rows
# of coefficients leave L1). Widths that divide _TILE keep their tiles (in registers), and
# multiples of _TILE a row per run: their rows end on whole vectors, and in runs their
# normalize pass was no faster with the data in the caches and slower from memory.
_LANE_RUN = 640


@njit(cache=True)
def _lane_rows(C: int) -> int:
    """Rows per run of the elementwise passes on an (M, C) layout (above): ``_tile_rows(C)``
    where C divides ``_TILE``, one where it is a multiple of ``_TILE``, else about
    ``_LANE_RUN`` values' worth, at least one."""
    if _TILE % C == 0:
        return _tile_rows(C)
    if C % _TILE == 0:
        return 1
    return max(1, _LANE_RUN // C)


# ---------------------------------------------------------------- tile sweeps held in registers
# The channels_last reductions of narrow layers (C divides _TILE, so a tile is exactly _TILE
# values) add every tile into _TILE float64 accumulators per sum. Written as array loops, those
# accumulators live in memory and are loaded and stored on every sweep (LLVM keeps no array of
# runtime length in registers), and with the data in the caches the sums took about twice a
# plain read of their input. The two sweeps below are built as LLVM vector code over a tile of
# _TILE values known at compile time: _TILE // _LANES vectors of _LANES values per sum, held in
# registers (16 of AVX-512's 32 vector registers; a CPU with fewer spills some, as the array
# loop spills all) and written back once per call. Each takes flat arrays, the offset of the
# first tile, the tile count and the step between tiles; the caller keeps every tile inside the
# arrays and gives per-lane arrays of _TILE values.
_LANES = 16


def _data(context, builder, aryty, ary):
    """The element pointer of the array value ``ary`` of type ``aryty``."""
    return context.make_array(aryty)(context, builder, ary).data


def _vec_of(builder, ptr_elem, index, n, align):
    """``n`` consecutive values from ``ptr_elem[index]`` as a vector (unaligned load)."""
    vty = ir.VectorType(ptr_elem.type.pointee, n)
    return builder.load(builder.bitcast(builder.gep(ptr_elem, [index]), vty.as_pointer()),
                        align=align)  # fmt: skip


def _widened(builder, v):
    """``v``, a value or vector loaded from an array, in its compute type: bfloat16 bits (i16)
    widened exactly to float32, as ``_ld`` widens them; float32 and float64 as they are."""
    n = v.type.count if isinstance(v.type, ir.VectorType) else None
    if not isinstance(v.type.element if n else v.type, ir.IntType):
        return v
    i32 = ir.IntType(32)
    wide = ir.VectorType(i32, n) if n else i32
    u = builder.shl(builder.zext(v, wide), ir.Constant(wide, [i32(16)] * n) if n else i32(16))
    return builder.bitcast(u, ir.VectorType(ir.FloatType(), n) if n else ir.FloatType())


def _wide_vec_of(builder, ptr_elem, index, n, align):
    """:func:`_vec_of` in the compute type (:func:`_widened`)."""
    return _widened(builder, _vec_of(builder, ptr_elem, index, n, align))


def _branch(builder, flag, emit):
    """``emit(True)`` where the i1 ``flag`` holds, ``emit(False)`` elsewhere: a loop built twice,
    each specialized, the test made once outside it."""
    with builder.if_else(flag) as (yes, no):
        with yes:
            emit(True)
        with no:
            emit(False)


def _lanes(context, builder, aryty, ary, index):
    """``_LANES`` values of the 1-d array ``ary`` from ``index`` as a vector of their compute
    type: float32 (for float32, and bfloat16 bits widened exactly as ``_ld`` does) or float64."""
    data = _data(context, builder, aryty, ary)
    return _wide_vec_of(builder, data, index, _LANES, aryty.dtype.bitwidth // 8)


def _wide(builder, v):
    """A vector of float32 or float64 values as float64."""
    if isinstance(v.type.element, ir.DoubleType):
        return v
    return builder.fpext(v, ir.VectorType(ir.DoubleType(), _LANES))


def _sweep(context, builder, sums, n, body):
    """Load the _TILE float64 accumulators of both arrays of ``sums`` (pairs of array type and
    value) into vector slots, run ``body(k, acc1, acc2)`` for tiles ``k < n`` (``acc1``,
    ``acc2``: the slots of each array, which LLVM keeps in registers), store them back."""
    vd = ir.VectorType(ir.DoubleType(), _LANES)
    accs = []
    for aryty, ary in sums:
        data = _data(context, builder, aryty, ary)
        slots = []
        for j in range(_TILE // _LANES):
            p = builder.bitcast(builder.gep(data, [ir.IntType(64)(j * _LANES)]), vd.as_pointer())
            slot = cgutils.alloca_once(builder, vd)
            builder.store(builder.load(p, align=8), slot)
            slots.append((slot, p))
        accs.append(slots)
    with cgutils.for_range(builder, n) as loop:
        body(loop.index, [s for s, _ in accs[0]], [s for s, _ in accs[1]])
    for slots in accs:
        for slot, p in slots:
            builder.store(builder.load(slot), p, align=8)


def _loop_arrays(*arrays):
    """Whether ``arrays`` are 1-d contiguous arrays of one element type the loops read (float32,
    float64, bfloat16 bits)."""
    dt = getattr(arrays[0], "dtype", None)
    return dt in (types.float32, types.float64, types.uint16) and all(
        isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dt
        for a in arrays
    )


def _compute_type(dtype):
    """The element type the loops compute in for arrays of ``dtype`` (float32 for bfloat16)."""
    return types.float32 if dtype == types.uint16 else dtype


@intrinsic
def _sweep_sums(typingctx, xf, z, a, n, step, ahead, s1, s2):
    """For tiles ``k < n`` of ``_TILE`` values of ``xf`` from ``a + k * step``:
    ``s1[p] += d``, ``s2[p] += d * d`` with ``d = x - z[p]`` in float64 (``z``: float64, ``_TILE``
    values), the statistics' shifted sums of :func:`_mc_sums`. ``ahead > 0``: each tile first
    names the lines ``ahead`` elements further on (software prefetch; the caller keeps them inside
    ``xf``)."""
    f64 = types.Array(types.float64, 1, "C")
    if not _loop_arrays(xf) or z != f64 or s1 != f64 or s2 != f64:
        return None
    if not all(isinstance(i, types.Integer) for i in (a, n, step, ahead)):
        return None
    sig = types.void(xf, z, types.intp, types.intp, types.intp, types.intp, s1, s2)
    # (a literal ``ahead`` builds one loop, not both: less code to compile)
    literal_ahead = getattr(ahead, "literal_value", None)

    def codegen(context, builder, sig, args):
        xfv, zv, av, nv, stepv, aheadv, s1v, s2v = args
        i64 = ir.IntType(64)
        zs = [_lanes(context, builder, sig.args[1], zv, i64(j * _LANES))
              for j in range(_TILE // _LANES)]  # fmt: skip
        itemsize = sig.args[0].dtype.bitwidth // 8
        data = _data(context, builder, sig.args[0], xfv)

        def body(prefetch):
            def run(k, acc1, acc2):
                base = builder.add(av, builder.mul(k, stepv))
                if prefetch:
                    for off in range(0, _TILE * itemsize, _LINE_BYTES):
                        at = builder.add(base, builder.add(aheadv, i64(off // itemsize)))
                        _prefetch_at(builder, data, at)
                for j in range(_TILE // _LANES):
                    v = _wide(builder, _lanes(context, builder, sig.args[0], xfv,
                                              builder.add(base, i64(j * _LANES))))  # fmt: skip
                    d = builder.fsub(v, zs[j])
                    builder.store(builder.fadd(builder.load(acc1[j]), d), acc1[j])
                    builder.store(builder.fadd(builder.load(acc2[j]), builder.fmul(d, d)),
                                  acc2[j])  # fmt: skip
            return run

        sums = ((sig.args[6], s1v), (sig.args[7], s2v))
        if literal_ahead is None:
            _branch(builder, builder.icmp_signed(">", aheadv, i64(0)),
                    lambda prefetch: _sweep(context, builder, sums, nv, body(prefetch)))
        else:
            _sweep(context, builder, sums, nv, body(literal_ahead > 0))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _sweep_gsums(typingctx, gf, xf, mf, mu, k0, k1, floor, a, n, step, relu, s1, s2, ahead):
    """For tiles ``k < n`` of ``_TILE`` values from ``a + k * step``: ``s1[p] += g``,
    ``s2[p] += g (x - mu[p])``, the sums of :func:`_mc_gsums` (``x - mu`` in the compute type,
    the product and sums in float64), ``g = dy`` or, with ``relu``, ``dy`` where
    ``k0[p] m + k1[p] > floor`` and 0 elsewhere (:func:`_gate`; ``mf`` is not read without
    it). ``ahead > 0``: each tile first names the lines of dy and x ``ahead`` elements further
    on (software prefetch, kept inside the arrays)."""
    f64 = types.Array(types.float64, 1, "C")
    if not _loop_arrays(gf, xf, mf) or s1 != f64 or s2 != f64:
        return None
    comp = _compute_type(gf.dtype)
    if not all(isinstance(v, types.Array) and v.ndim == 1 and v.layout == "C" and v.dtype == comp
               for v in (mu, k0, k1)) or floor != comp:  # fmt: skip
        return None
    if not all(isinstance(i, types.Integer) for i in (a, n, step, ahead)):
        return None
    if relu != types.boolean:
        return None
    sig = types.void(gf, xf, mf, mu, k0, k1, floor, types.intp, types.intp, types.intp, relu,
                     s1, s2, types.intp)  # fmt: skip
    literal_ahead = getattr(ahead, "literal_value", None)  # (as in _sweep_sums)

    def codegen(context, builder, sig, args):
        gv, xv, mv, muv, k0v, k1v, fl, av, nv, stepv, reluv, s1v, s2v, ah = args
        i64 = ir.IntType(64)
        size = sig.args[0].dtype.bitwidth // 8
        gd, xd = _data(context, builder, sig.args[0], gv), _data(context, builder, sig.args[1], xv)
        last = builder.sub(context.make_array(sig.args[0])(context, builder, gv).nitems, i64(1))
        mus, k0s, k1s = ([_lanes(context, builder, sig.args[i], v, i64(j * _LANES))
                          for j in range(_TILE // _LANES)]
                         for i, v in ((3, muv), (4, k0v), (5, k1v)))  # fmt: skip

        def body(masked, prefetch):
            def run(k, acc1, acc2):
                base = builder.add(av, builder.mul(k, stepv))
                for off in range(0, _TILE * size, _LINE_BYTES) if prefetch else ():
                    q = builder.add(base, builder.add(ah, i64(off // size)))
                    q = builder.select(builder.icmp_signed(">", q, last), last, q)
                    for d in (gd, xd):
                        _prefetch_at(builder, d, q)
                for j in range(_TILE // _LANES):
                    at = builder.add(base, i64(j * _LANES))
                    g = _lanes(context, builder, sig.args[0], gv, at)
                    if masked:
                        m = _lanes(context, builder, sig.args[2], mv, at)
                        g = _gate(builder, g, m, (k0s[j], k1s[j]), fl)
                    d = _wide(builder, builder.fsub(_lanes(context, builder, sig.args[1], xv, at),
                                                    mus[j]))  # fmt: skip
                    g = _wide(builder, g)
                    builder.store(builder.fadd(builder.load(acc1[j]), g), acc1[j])
                    builder.store(builder.fadd(builder.load(acc2[j]), builder.fmul(g, d)), acc2[j])
            return run

        sums = ((sig.args[11], s1v), (sig.args[12], s2v))

        def loops(prefetch):
            _branch(builder, reluv,
                    lambda masked: _sweep(context, builder, sums, nv, body(masked, prefetch)))

        if literal_ahead is None:
            _branch(builder, builder.icmp_signed(">", ah, i64(0)), loops)
        else:
            loops(literal_ahead > 0)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------- streaming (non-temporal) stores
# An output much larger than the caches is written with non-temporal stores: a normal store first
# reads the line it writes into the caches (so the pass moves three bytes per byte of output
# instead of two) and evicts other data for lines that will be read from memory anyway. Measured
# on channels_last inference of 16-51 MB tensors, the normalize pass alone took 0.51-0.80x the
# time (docs/kernels.md). The caller decides which outputs stream (``stream``: at least half the
# last-level cache, where input and output together no longer fit in it). In NCHW a channel's run
# streams its whole 64-byte lines and stores the values before and after them as usual; in
# channels_last a row of C values streams where every row is whole lines (C * itemsize a multiple
# of 64), and otherwise every value is stored as usual. Non-temporal stores are weakly ordered: a
# chunk fences once after them (a fence per run made short runs several times slower).
_LINE = 64


def _splat(builder, v, n):
    """A vector of ``n`` copies of the scalar ``v``."""
    vty = ir.VectorType(v.type, n)
    u = builder.insert_element(ir.Constant(vty, ir.Undefined), v, ir.IntType(32)(0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n)
    return builder.shuffle_vector(u, ir.Constant(vty, ir.Undefined), zeros)


def _store_stream(builder, v, ptr_elem, index):
    """Store the vector ``v`` (one 64-byte line once in the element type) at ``ptr_elem[index]``,
    aligned, non-temporal: computed values in the element type (:func:`_narrow`: bfloat16 bits
    rounded as the usual stores round them)."""
    v = _narrow(builder, v, ptr_elem.type.pointee)
    st = builder.store(v, builder.bitcast(builder.gep(ptr_elem, [index]), v.type.as_pointer()),
                       align=_LINE)  # fmt: skip
    st.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))


def _lines(builder, start, rows, row_len, lanes, body):
    """``body(at, o)`` for each vector of ``lanes`` values of ``rows`` rows of ``row_len`` values
    (a multiple of ``lanes``) from the flat index ``start``: ``at`` its flat index, ``o`` its
    offset in the row."""
    i64 = ir.IntType(64)
    with cgutils.for_range(builder, rows) as row:
        base = builder.add(start, builder.mul(row.index, row_len))
        with cgutils.for_range(builder, builder.udiv(row_len, i64(lanes))) as j:
            o = builder.mul(j.index, i64(lanes))
            body(builder.add(base, o), o)


def _run(builder, out, start, n, lanes, scalar, vector):
    """Over the ``n`` values from the flat index ``start`` of the output pointer ``out``:
    ``scalar(at)`` for the values before its first whole 64-byte line and after its last,
    ``vector(at)`` for each whole line between (``lanes`` values)."""
    i64 = ir.IntType(64)
    size = _LINE // lanes
    addr = builder.ptrtoint(builder.gep(out, [start]), i64)
    head = builder.udiv(builder.urem(builder.sub(i64(_LINE), builder.urem(addr, i64(_LINE))),
                                     i64(_LINE)), i64(size))  # fmt: skip
    head = builder.select(builder.icmp_signed("<", n, head), n, head)
    nvec = builder.sdiv(builder.sub(n, head), i64(lanes))
    with cgutils.for_range(builder, head) as k:
        scalar(builder.add(start, k.index))
    first = builder.add(start, head)
    with cgutils.for_range(builder, nvec) as j:
        vector(builder.add(first, builder.mul(j.index, i64(lanes))))
    done = builder.add(first, builder.mul(nvec, i64(lanes)))
    with cgutils.for_range(builder, builder.sub(builder.add(start, n), done)) as k:
        scalar(builder.add(done, k.index))


def _stream_rows_of(builder, relu, start, rows, row_len, lanes, vector_for):
    """The streamed rows of an intrinsic: ``vector_for(masked)`` gives the body ``(at, o)`` of
    :func:`_lines`, built with and without the ReLU mask (``relu``: i1), then one fence."""
    _branch(builder, relu, lambda masked: _lines(builder, start, rows, row_len, lanes,
                                                 vector_for(masked)))  # fmt: skip
    _fence(builder)


def _pre_activation(builder, v, a, c):
    """``a v + c`` (one fused multiply-add where the target has one): the normalize passes'
    value before the ReLU. The backward's ReLU mask recomputes it from x with the forward's
    coefficients (:func:`_gate`), so both must build it with these operations and flags."""
    return builder.fadd(builder.fmul(v, a, flags=["contract"]), c, flags=["contract"])


def _gate(builder, g, m, k, floor):
    """``g`` where the fused ReLU let its value through, else 0: where ``k[0] m + k[1]`` (``k``:
    the pair of coefficients of :func:`_pre_activation`, vectors or scalars as ``m``) is above
    ``floor`` (a scalar of the compute type; see :func:`backward_ncs`)."""
    r = _pre_activation(builder, m, k[0], k[1])
    if isinstance(r.type, ir.VectorType):
        floor = _splat(builder, floor, r.type.count)
    return builder.select(builder.fcmp_ordered(">", r, floor), g, ir.Constant(g.type, None))


def _affine_value(builder, v, a, c, relu):
    """``a v + c`` (:func:`_pre_activation`), then ``max(., 0)`` when ``relu`` (a Python bool)."""
    r = _pre_activation(builder, v, a, c)
    if relu:
        r = builder.select(builder.fcmp_ordered(">", r, ir.Constant(r.type, None)), r,
                           ir.Constant(r.type, None))  # fmt: skip
    return r


def _fence(builder):
    """Order the non-temporal stores before what follows (they are weakly ordered)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                        "llvm.x86.sse.sfence")  # fmt: skip
    builder.call(fn, [])


@intrinsic
def _stream_rows(typingctx, xf, a, c, yf, start, C, rows, relu):
    """``y = a[ch] x + c[ch]`` [then ``max(., 0)``] over ``rows`` rows of ``C`` channels of the
    flat arrays from ``start``, stored non-temporally: every row must start on a 64-byte line of
    ``yf`` (``C * itemsize`` a multiple of 64 and the first row aligned; the caller checks)."""
    if not _loop_arrays(xf, yf) or not _loop_arrays(a, c) or relu != types.boolean:
        return None
    if a.dtype != _compute_type(xf.dtype):
        return None
    sig = types.void(xf, a, c, yf, types.intp, types.intp, types.intp, relu)

    def codegen(context, builder, sig, args):
        xv, av, cv, yv, s, nc, nr, rl = args
        size = sig.args[0].dtype.bitwidth // 8
        lanes = _LINE // size
        xd, ad, cd, yd = (_data(context, builder, t, v)
                          for t, v in zip(sig.args[:4], (xv, av, cv, yv), strict=True))  # fmt: skip

        def vector_for(masked):
            def vector(at, o):
                r = _affine_value(builder, _wide_vec_of(builder, xd, at, lanes, size),
                                  _vec_of(builder, ad, o, lanes, size),
                                  _vec_of(builder, cd, o, lanes, size), masked)  # fmt: skip
                _store_stream(builder, r, yd, at)

            return vector

        _stream_rows_of(builder, rl, s, nr, nc, lanes, vector_for)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _stream_run(typingctx, xf, yf, start, n, a, c, relu):
    """``y = a x + c`` [then ``max(., 0)``] on the ``n`` values of the flat arrays from
    ``start`` (one channel's run: scalar ``a``, ``c``): the whole 64-byte lines of ``yf`` stored
    non-temporally, the values before and after them as usual (:func:`_run`); the caller fences
    once after its runs (:func:`_sfence`)."""
    if not _loop_arrays(xf, yf) or relu != types.boolean:
        return None
    if a != _compute_type(xf.dtype) or c != a:
        return None
    sig = types.void(xf, yf, types.intp, types.intp, a, c, relu)

    def codegen(context, builder, sig, args):
        xv, yv, s, n, av, cv, rl = args
        size = sig.args[0].dtype.bitwidth // 8
        lanes = _LINE // size
        xd, yd = _data(context, builder, sig.args[0], xv), _data(context, builder, sig.args[1], yv)
        va, vc = _splat(builder, av, lanes), _splat(builder, cv, lanes)
        elem = yd.type.pointee

        def loop(masked):
            def scalar(at):
                r = _affine_value(builder, _scalar_of(builder, xd, at), av, cv, masked)
                builder.store(_narrow(builder, r, elem), builder.gep(yd, [at]))

            def vector(at):
                v = _wide_vec_of(builder, xd, at, lanes, size)
                r = _affine_value(builder, v, va, vc, masked)
                _store_stream(builder, r, yd, at)

            _run(builder, yd, s, n, lanes, scalar, vector)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` type, which llvmlite's IR builder does not name (used only as the
    target of a conversion whose result is bitcast to i16 lanes at once)."""

    def __str__(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash(_BFloat)


def _host_converts_bf16() -> bool:
    """Whether the CPU the loops are compiled for converts float32 to bfloat16 in one
    instruction and classifies float32 values in another (AVX512-BF16 and AVX512-DQ). Numba
    compiles for the host and keys its on-disk cache by the host's CPU and features, so code
    built with the instructions never runs on a CPU without them; where Numba is told to
    compile for another CPU (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``) they are not used."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
        return bool(features.get("avx512bf16", False) and features.get("avx512dq", False))
    except Exception:  # (features unknown: the integer rounding, which every CPU runs)
        return False


_HW_BF16 = _host_converts_bf16()


def _narrow(builder, v, elem):
    """A float32/float64 value or vector as the output element type ``elem`` (an llvmlite type):
    itself, or for bfloat16 bits (i16) the float32 rounded to nearest even with NaN kept quiet,
    as ``_st`` rounds.

    Where the CPU has the conversion instruction (:func:`_host_converts_bf16`), a vector of
    ``_LANES`` float32 values (and each half of a streamed line of twice as many) takes it: it
    rounds to nearest even as the integer rounding does, but reads a subnormal input as zero
    and keeps a NaN's sign and payload. So a vector with a NaN or a nonzero subnormal lane (rare
    in an output: a subnormal result needs operands of about that size) takes the integer
    rounding instead, and every value is the same bits either way."""
    if not isinstance(elem, ir.IntType):
        return v
    n = v.type.count if isinstance(v.type, ir.VectorType) else None
    if _HW_BF16 and n in (_LANES, 2 * _LANES) and v.type.element == ir.FloatType():
        if n == _LANES:
            return _narrow_hw(builder, v, elem)
        # (a streamed line of 32 values: each half on its own, then the line again)
        i32 = ir.IntType(32)

        def positions(first, count):  # (shufflevector's lane indices)
            return ir.Constant(ir.VectorType(i32, count), [i32(first + j) for j in range(count)])

        halves = [_narrow_hw(builder, builder.shuffle_vector(v, v, positions(i, _LANES)), elem)
                  for i in (0, _LANES)]  # fmt: skip
        return builder.shuffle_vector(halves[0], halves[1], positions(0, n))
    return _narrow_int(builder, v, elem, n)


def _narrow_hw(builder, v, elem):
    """:func:`_narrow` of a vector of ``_LANES`` float32 values (one 512-bit register, as the
    classification intrinsic takes it) through the conversion instruction, with the integer
    rounding for a vector that holds a NaN or a nonzero subnormal."""
    n = v.type.count
    classify = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VectorType(ir.IntType(1), n), [v.type, ir.IntType(32)]),
        "llvm.x86.avx512.fpclass.ps.512",
    )
    # (the classes quiet NaN, subnormal and signalling NaN)
    odd = builder.call(classify, [v, ir.IntType(32)(0xA1)])
    any_odd = builder.icmp_unsigned("!=", builder.bitcast(odd, ir.IntType(n)), ir.IntType(n)(0))
    out = ir.VectorType(elem, n)
    with builder.if_else(any_odd, likely=False) as (rare, common):
        with rare:
            slow = _narrow_int(builder, v, elem, n)
            rare_block = builder.block
        with common:
            fast = builder.bitcast(builder.fptrunc(v, ir.VectorType(_BFloat(), n)), out)
            common_block = builder.block
    r = builder.phi(out)
    r.add_incoming(slow, rare_block)
    r.add_incoming(fast, common_block)
    return r


def _narrow_int(builder, v, elem, n):
    """:func:`_narrow` in integer operations: round to nearest even by adding 0x7FFF and the
    kept part's lowest bit, NaN to 0x7FC0."""
    i32 = ir.IntType(32)

    def k(value, ty=i32):
        return ir.Constant(ir.VectorType(ty, n), [ty(value)] * n) if n else ty(value)

    u = builder.bitcast(v, ir.VectorType(i32, n) if n else i32)
    nan = builder.icmp_unsigned(">", builder.and_(u, k(0x7FFFFFFF)), k(0x7F800000))
    odd = builder.and_(builder.lshr(u, k(16)), k(1))
    r = builder.lshr(builder.add(builder.add(u, k(0x7FFF)), odd), k(16))
    r = builder.select(nan, k(0x7FC0), r)
    return builder.trunc(r, ir.VectorType(elem, n) if n else elem)


def _scalar_of(builder, ptr_elem, index):
    """The element at ``ptr_elem[index]`` in its compute type (bfloat16 bits widened exactly)."""
    return _widened(builder, builder.load(builder.gep(ptr_elem, [index])))


def _vectors_then_rest(builder, start, n, vector, scalar):
    """Over the ``n`` values from the flat index ``start``: ``vector(at)`` for each whole vector
    of ``_LANES`` values, then ``scalar(at)`` for each value left."""
    i64 = ir.IntType(64)
    nvec = builder.sdiv(n, i64(_LANES))
    with cgutils.for_range(builder, nvec) as j:
        vector(builder.add(start, builder.mul(j.index, i64(_LANES))))
    done = builder.add(start, builder.mul(nvec, i64(_LANES)))
    with cgutils.for_range(builder, builder.sub(builder.add(start, n), done)) as k:
        scalar(builder.add(done, k.index))


def _aligned_vectors(builder, out, start, n, vector, scalar):
    """Over the ``n`` values from the flat index ``start`` of the output pointer ``out``, as
    :func:`_vectors_then_rest`; for float32 outputs, whose vectors of ``_LANES`` values are one
    64-byte line, first ``scalar(at)`` for the values before the first vector that starts on a
    line. A vector stored across two lines costs two stores, and on some CPUs (Intel's with
    512-bit vectors) a good deal more, which on rows whose length is not a multiple of 16 (7x7
    and 14x14 maps) is nearly every store. Narrower outputs (bfloat16: half a line per vector,
    split by half the misaligned stores) keep their vectors from ``start``: a head of up to 15
    single values, each rounded on its own, costs them more than the splits it saves."""
    if not isinstance(out.type.pointee, ir.FloatType):
        _vectors_then_rest(builder, start, n, vector, scalar)
        return
    i64 = ir.IntType(64)
    addr = builder.ptrtoint(builder.gep(out, [start]), i64)
    head = builder.udiv(builder.urem(builder.sub(i64(_LINE), builder.urem(addr, i64(_LINE))),
                                     i64(_LINE)), i64(4))  # fmt: skip
    head = builder.select(builder.icmp_signed("<", n, head), n, head)
    with cgutils.for_range(builder, head) as k:
        scalar(builder.add(start, k.index))
    _vectors_then_rest(builder, builder.add(start, head), builder.sub(n, head), vector, scalar)


def _store_vec(builder, v, ptr_elem, index, align):
    """Store the vector ``v`` at ``ptr_elem[index]`` (unaligned: ``align`` is the element's)."""
    builder.store(v, builder.bitcast(builder.gep(ptr_elem, [index]), v.type.as_pointer()),
                  align=align)  # fmt: skip


def _dx_run_sig(gf, xf, mf, df, mu, a, bb, d, k0, k1, floor, relu):
    """The signature of a dx intrinsic over one channel's run (:func:`_dx_run`,
    :func:`_stream_dx_run`): four flat arrays, start, count, four scalar coefficients, the
    ReLU mask's two coefficients and floor (:func:`_gate`), all in the compute type, the ReLU
    flag; None for other argument types."""
    if not _loop_arrays(gf, xf, mf, df) or relu != types.boolean:
        return None
    comp = _compute_type(gf.dtype)
    if any(v != comp for v in (mu, a, bb, d, k0, k1, floor)):
        return None
    return types.void(gf, xf, mf, df, types.intp, types.intp, *([comp] * 7), relu)


def _tile_vectors(context, builder, aryty, ary):
    """The ``_TILE`` values of the 1-d array ``ary`` as ``_TILE // _LANES`` vectors (per-lane
    coefficients of a flat tile, loaded once for a whole run of tiles)."""
    i64 = ir.IntType(64)
    return [_lanes(context, builder, aryty, ary, i64(j * _LANES)) for j in range(_TILE // _LANES)]


def _over_tiles(builder, start, n, body, step=None):
    """``body(at, j)`` for each vector ``j`` of each of the ``n`` tiles of ``_TILE`` values from
    the flat index ``start``, ``step`` values apart (an i64; None: consecutive tiles); ``at``:
    the vector's first index."""
    i64 = ir.IntType(64)
    step = i64(_TILE) if step is None else step
    with cgutils.for_range(builder, n) as k:
        base = builder.add(start, builder.mul(k.index, step))
        for j in range(_TILE // _LANES):
            body(builder.add(base, i64(j * _LANES)), j)


@intrinsic
def _affine_run(typingctx, xf, yf, start, n, a, c, relu):
    """``y = a x + c`` [then ``max(., 0)``] on the ``n`` values of the flat arrays from
    ``start`` (one channel's run: scalar ``a``, ``c`` in the compute type), in vectors of
    ``_LANES`` values and the rest one by one (float32: the vectors stored on whole lines,
    :func:`_aligned_vectors`). LLVM's own vector loop takes
    several vectors per iteration and leaves the rest of a run to a scalar loop, which on short
    runs (a 7x7 map: all 49 values) is most of the work; this takes a vector at a time."""
    if not _loop_arrays(xf, yf) or relu != types.boolean:
        return None
    if a != _compute_type(xf.dtype) or c != a:
        return None
    sig = types.void(xf, yf, types.intp, types.intp, a, c, relu)

    def codegen(context, builder, sig, args):
        xv, yv, s, nv, av, cv, rl = args
        yd = _data(context, builder, sig.args[1], yv)
        xd = _data(context, builder, sig.args[0], xv)
        elem = yd.type.pointee
        va, vc = _splat(builder, av, _LANES), _splat(builder, cv, _LANES)
        align = sig.args[1].dtype.bitwidth // 8

        def loop(masked):
            def vector(at):
                v = _lanes(context, builder, sig.args[0], xv, at)
                r = _narrow(builder, _affine_value(builder, v, va, vc, masked), elem)
                _store_vec(builder, r, yd, at, align)

            def scalar(at):
                r = _affine_value(builder, _scalar_of(builder, xd, at), av, cv, masked)
                builder.store(_narrow(builder, r, elem), builder.gep(yd, [at]))

            _aligned_vectors(builder, yd, s, nv, vector, scalar)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


def _affine_sig(xf, yf, a, c, relu):
    """The signature of a normalize intrinsic with per-value coefficients
    (:func:`_affine_tiles`, :func:`_affine_lanes`): two flat arrays, start, count, two arrays
    of coefficients in the compute type, the ReLU flag; None for other argument types."""
    if not _loop_arrays(xf, yf) or relu != types.boolean:
        return None
    comp = types.Array(_compute_type(xf.dtype), 1, "C")
    if a != comp or c != comp:
        return None
    return types.void(xf, yf, types.intp, types.intp, a, c, relu)


@intrinsic
def _affine_tiles(typingctx, xf, yf, start, n, a, c, relu):
    """``y = a[p] x + c[p]`` [then ``max(., 0)``] on ``n`` consecutive tiles of ``_TILE`` values of
    the flat arrays from ``start`` (``a``, ``c``: ``_TILE`` per-lane coefficients in the compute
    type, held in registers for the whole run): the channels_last normalize pass of a narrow
    layer, a vector at a time (LLVM's loop over one tile at a time checks its bounds and the
    arrays' overlap on every tile)."""
    sig = _affine_sig(xf, yf, a, c, relu)
    if sig is None:
        return None

    def codegen(context, builder, sig, args):
        xv, yv, s, nv, av, cv, rl = args
        yd = _data(context, builder, sig.args[1], yv)
        elem = yd.type.pointee
        align = sig.args[1].dtype.bitwidth // 8
        va = _tile_vectors(context, builder, sig.args[4], av)
        vc = _tile_vectors(context, builder, sig.args[5], cv)

        def loop(masked):
            def vector(at, j):
                v = _lanes(context, builder, sig.args[0], xv, at)
                r = _narrow(builder, _affine_value(builder, v, va[j], vc[j], masked), elem)
                _store_vec(builder, r, yd, at, align)

            _over_tiles(builder, s, nv, vector)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _affine_lanes(typingctx, xf, yf, start, n, a, c, relu):
    """``y = a[p] x + c[p]`` [then ``max(., 0)``] on the ``n`` values of the flat arrays from
    ``start``, ``p`` a value's index from ``start`` (``a``, ``c``: at least ``n`` per-value
    coefficients in the compute type): one tile of a channels_last normalize pass whose tile is
    not ``_TILE`` values (a wide row, or channels that do not divide ``_TILE``), a vector at a
    time with float32 outputs stored on whole lines (:func:`_aligned_vectors`) and bfloat16
    ones rounded by :func:`_narrow` (the conversion instruction where the CPU has one; LLVM
    vectorizes the scalar rounding of ``_st`` into a dozen integer operations a vector)."""
    sig = _affine_sig(xf, yf, a, c, relu)
    if sig is None:
        return None

    def codegen(context, builder, sig, args):
        xv, yv, s, nv, av, cv, rl = args
        xd = _data(context, builder, sig.args[0], xv)
        yd = _data(context, builder, sig.args[1], yv)
        ad = _data(context, builder, sig.args[4], av)
        cd = _data(context, builder, sig.args[5], cv)
        elem = yd.type.pointee
        align = sig.args[1].dtype.bitwidth // 8

        def loop(masked):
            def vector(at):
                p = builder.sub(at, s)
                v = _lanes(context, builder, sig.args[0], xv, at)
                va = _lanes(context, builder, sig.args[4], av, p)
                vc = _lanes(context, builder, sig.args[5], cv, p)
                r = _narrow(builder, _affine_value(builder, v, va, vc, masked), elem)
                _store_vec(builder, r, yd, at, align)

            def scalar(at):
                p = builder.sub(at, s)
                r = _affine_value(builder, _scalar_of(builder, xd, at), _scalar_of(builder, ad, p),
                                  _scalar_of(builder, cd, p), masked)  # fmt: skip
                builder.store(_narrow(builder, r, elem), builder.gep(yd, [at]))

            _aligned_vectors(builder, yd, s, nv, vector, scalar)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


def _dx_lanes_ok(gf, xf, mf, df, coefs, floor, relu) -> bool:
    """Whether a dx intrinsic with per-value coefficients (:func:`_dx_tiles`,
    :func:`_dx_lanes`) takes these types: four flat arrays of one element type, six arrays of
    coefficients and a floor in the compute type, the ReLU flag."""
    if not _loop_arrays(gf, xf, mf, df) or relu != types.boolean:
        return False
    comp = types.Array(_compute_type(gf.dtype), 1, "C")
    return all(v == comp for v in coefs) and floor == comp.dtype


@intrinsic
def _dx_tiles(typingctx, gf, xf, mf, df, start, n, step, mu, a, bb, d, k0, k1, floor, relu):
    """:func:`_ncs_dx`'s values on ``n`` tiles of ``_TILE`` values from ``start``, ``step``
    values apart (``mu``, ``a``, ``bb``, ``d`` and the mask's ``k0``, ``k1``: ``_TILE`` per-lane
    coefficients in the compute type, held in registers for the whole run), as
    :func:`_affine_tiles` for the normalize pass."""
    if not _dx_lanes_ok(gf, xf, mf, df, (mu, a, bb, d, k0, k1), floor, relu):
        return None
    sig = types.void(gf, xf, mf, df, types.intp, types.intp, types.intp, mu, a, bb, d, k0, k1,
                     floor, relu)  # fmt: skip

    def codegen(context, builder, sig, args):
        gv, xv, mv, dv, s, nv, stepv = args[:7]
        fl, rl = args[13], args[14]
        dd = _data(context, builder, sig.args[3], dv)
        elem = dd.type.pointee
        align = sig.args[3].dtype.bitwidth // 8
        mu, a, bb, d, k0, k1 = (_tile_vectors(context, builder, sig.args[7 + i], args[7 + i])
                                for i in range(6))  # fmt: skip

        def loop(masked):
            def vector(at, j):
                m = _lanes(context, builder, sig.args[2], mv, at) if masked else None
                g = _lanes(context, builder, sig.args[0], gv, at)
                x = _lanes(context, builder, sig.args[1], xv, at)
                r = _narrow(builder, _dx_value(builder, g, x, m, mu[j], a[j], bb[j], d[j],
                                               (k0[j], k1[j]), fl, masked), elem)  # fmt: skip
                _store_vec(builder, r, dd, at, align)

            _over_tiles(builder, s, nv, vector, stepv)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _dx_lanes(typingctx, gf, xf, mf, df, start, n, mu, a, bb, d, k0, k1, floor, relu):
    """:func:`_ncs_dx`'s values on the ``n`` values from ``start``, ``p`` a value's index from
    ``start`` (``mu``, ``a``, ``bb``, ``d`` and the mask's ``k0``, ``k1``: at least ``n``
    per-value coefficients in the compute type): one tile of a channels_last dx pass whose tile
    is not ``_TILE`` values and whose rows are not taken in column blocks, as
    :func:`_affine_lanes` for the normalize pass."""
    if not _dx_lanes_ok(gf, xf, mf, df, (mu, a, bb, d, k0, k1), floor, relu):
        return None
    sig = types.void(gf, xf, mf, df, types.intp, types.intp, mu, a, bb, d, k0, k1, floor, relu)

    def codegen(context, builder, sig, args):
        gv, xv, mv, dv, s, nv = args[:6]
        fl, rl = args[12], args[13]
        gd, xd, md, dd = (_data(context, builder, sig.args[i], args[i]) for i in range(4))
        cd = [_data(context, builder, sig.args[6 + i], args[6 + i]) for i in range(6)]
        elem = dd.type.pointee
        align = sig.args[3].dtype.bitwidth // 8

        def loop(masked):
            def vector(at):
                p = builder.sub(at, s)
                c = [_lanes(context, builder, sig.args[6 + i], args[6 + i], p) for i in range(6)]
                m = _lanes(context, builder, sig.args[2], mv, at) if masked else None
                g = _lanes(context, builder, sig.args[0], gv, at)
                x = _lanes(context, builder, sig.args[1], xv, at)
                r = _narrow(builder, _dx_value(builder, g, x, m, *c[:4], (c[4], c[5]), fl,
                                               masked), elem)  # fmt: skip
                _store_vec(builder, r, dd, at, align)

            def scalar(at):
                p = builder.sub(at, s)
                c = [_scalar_of(builder, q, p) for q in cd]
                m = _scalar_of(builder, md, at) if masked else None
                r = _dx_value(builder, _scalar_of(builder, gd, at), _scalar_of(builder, xd, at),
                              m, *c[:4], (c[4], c[5]), fl, masked)  # fmt: skip
                builder.store(_narrow(builder, r, elem), builder.gep(dd, [at]))

            _aligned_vectors(builder, dd, s, nv, vector, scalar)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


def _hsum(builder, v):
    """The sum of the lanes of the float vector ``v`` (pairwise halves)."""
    n = v.type.count
    while n > 1:
        n //= 2
        i32 = ir.IntType(32)
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n),
                                                      list(range(n, 2 * n))))  # fmt: skip
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.IntType(32)(0))


def _fpext(builder, v):
    """A float32 value or vector as float64 (float64 as it is)."""
    if isinstance(getattr(v.type, "element", v.type), ir.DoubleType):
        return v
    if isinstance(v.type, ir.VectorType):
        return builder.fpext(v, ir.VectorType(ir.DoubleType(), v.type.count))
    return builder.fpext(v, ir.DoubleType())


def _prefetcher(context, builder, aryty, ary, pointers, ahead):
    """``before(at)`` for :func:`_run_reduce`: where ``ahead > 0`` (an i64), hint the lines of a
    two-vector iteration's values ``ahead`` values further on in each of ``pointers`` (arrays of
    ``ary``'s size and element type), kept inside the arrays (``llvm.prefetch``)."""
    i64 = ir.IntType(64)
    size = aryty.dtype.bitwidth // 8
    last = builder.sub(context.make_array(aryty)(context, builder, ary).nitems, i64(1))
    has_ahead = builder.icmp_signed(">", ahead, i64(0))

    def before(at):
        with builder.if_then(has_ahead):
            for off in range(0, 2 * _LANES * size, _LINE_BYTES):
                k = builder.add(at, builder.add(ahead, i64(off // size)))
                k = builder.select(builder.icmp_signed(">", k, last), last, k)
                for d in pointers:
                    _prefetch_at(builder, d, k)

    return before


def _run_reduce(context, builder, start, n, step, before=None):
    """Two float64 sums over the ``n`` values from ``start``: ``step(at, vector)`` gives the two
    terms of the values at ``at`` (``_LANES`` of them as float64 vectors when ``vector``, else
    one). Whole vectors go to vector accumulators, two vectors per iteration into two sets (two
    chains of additions: one chain would wait on the adder's latency on long rows), then one
    more vector if a whole one is left, and the rest to scalars, with the lanes summed once in
    between; ``before(at)``, if given, is emitted at the start of each two-vector iteration.
    Returns the two sums."""
    i64 = ir.IntType(64)
    vd = ir.VectorType(ir.DoubleType(), _LANES)
    sets = [[cgutils.alloca_once_value(builder, ir.Constant(vd, None)) for _ in range(2)]
            for _ in range(2)]  # fmt: skip

    def add(accs, terms):
        for acc, t in zip(accs, terms, strict=True):
            builder.store(builder.fadd(builder.load(acc), t), acc)

    pairs = builder.sdiv(n, i64(2 * _LANES))
    with cgutils.for_range(builder, pairs) as j:
        at = builder.add(start, builder.mul(j.index, i64(2 * _LANES)))
        if before is not None:
            before(at)
        add(sets[0], step(at, True))
        add(sets[1], step(builder.add(at, i64(_LANES)), True))
    done = builder.add(start, builder.mul(pairs, i64(2 * _LANES)))
    left = builder.sub(builder.add(start, n), done)
    one = builder.icmp_signed(">=", left, i64(_LANES))
    with builder.if_then(one):
        add(sets[0], step(done, True))
    done = builder.select(one, builder.add(done, i64(_LANES)), done)
    sums = [cgutils.alloca_once_value(builder, _hsum(builder, builder.fadd(builder.load(a),
                                                                         builder.load(b))))
            for a, b in zip(*sets, strict=True)]  # fmt: skip
    with cgutils.for_range(builder, builder.sub(builder.add(start, n), done)) as k:
        add(sums, step(builder.add(done, k.index), False))
    return [builder.load(acc) for acc in sums]


def _pair(context, builder, values):
    """A Numba ``UniTuple(float64, 2)`` of two float64 values."""
    ty = types.UniTuple(types.float64, 2)
    return context.make_tuple(builder, ty, values)


@intrinsic
def _run_sums(typingctx, xf, start, n, x0, ahead):
    """``(sum d, sum d^2)`` with ``d = x - x0`` in float64 over the ``n`` values of the flat array
    from ``start`` (one row of :func:`_ncs_sums`), a vector of ``_LANES`` values at a time (as
    :func:`_affine_run`, for short rows); ``ahead > 0``: software prefetch as in
    :func:`_run_gsums`."""
    if not _loop_arrays(xf) or x0 != types.float64 or not isinstance(ahead, types.Integer):
        return None
    sig = types.UniTuple(types.float64, 2)(xf, types.intp, types.intp, x0, types.intp)

    def codegen(context, builder, sig, args):
        xv, s, nv, z, ah = args
        xd = _data(context, builder, sig.args[0], xv)
        vz = _splat(builder, z, _LANES)
        before = _prefetcher(context, builder, sig.args[0], xv, (xd,), ah)

        def step(at, vector):
            if vector:
                d = builder.fsub(_wide(builder, _lanes(context, builder, sig.args[0], xv, at)), vz)
            else:
                d = builder.fsub(_fpext(builder, _scalar_of(builder, xd, at)), z)
            return d, builder.fmul(d, d)

        return _pair(context, builder, _run_reduce(context, builder, s, nv, step, before))

    return sig, codegen


@intrinsic
def _run_gsums(typingctx, gf, xf, mf, start, n, mu, k0, k1, floor, relu, ahead):
    """``(sum g, sum g (x - mu))`` over the ``n`` values from ``start`` (one row of
    :func:`_ncs_gsums`: ``x - mu`` in the compute type, the product and sums in float64;
    ``g = dy``, or with ``relu`` 0 where ``k0 m + k1 <= floor``, :func:`_gate`), a vector at a
    time. ``ahead > 0``: each iteration first names the lines of dy and x ``ahead`` values
    further on (software prefetch, kept inside the arrays)."""
    if not _loop_arrays(gf, xf, mf) or relu != types.boolean:
        return None
    if any(v != _compute_type(gf.dtype) for v in (mu, k0, k1, floor)):
        return None
    if not isinstance(ahead, types.Integer):
        return None
    sig = types.UniTuple(types.float64, 2)(gf, xf, mf, types.intp, types.intp, mu, k0, k1,
                                           floor, relu, types.intp)  # fmt: skip

    def codegen(context, builder, sig, args):
        gv, xv, mv, s, nv, m, k0, k1, fl, rl, ah = args
        gd, xd, md = (_data(context, builder, sig.args[i], v) for i, v in enumerate((gv, xv, mv)))
        before = _prefetcher(context, builder, sig.args[0], gv, (gd, xd), ah)

        vm = _splat(builder, m, _LANES)
        vk = (_splat(builder, k0, _LANES), _splat(builder, k1, _LANES))
        out = [cgutils.alloca_once(builder, ir.DoubleType()) for _ in range(2)]

        def loop(masked):
            def step(at, vector):
                if vector:
                    g = _lanes(context, builder, sig.args[0], gv, at)
                    x = _lanes(context, builder, sig.args[1], xv, at)
                    if masked:
                        g = _gate(builder, g, _lanes(context, builder, sig.args[2], mv, at),
                                  vk, fl)  # fmt: skip
                    mu_ = vm
                else:
                    g, x = _scalar_of(builder, gd, at), _scalar_of(builder, xd, at)
                    if masked:
                        g = _gate(builder, g, _scalar_of(builder, md, at), (k0, k1), fl)
                    mu_ = m
                g = _fpext(builder, g)
                return g, builder.fmul(g, _fpext(builder, builder.fsub(x, mu_)))

            sums = _run_reduce(context, builder, s, nv, step, before)
            for o, v in zip(out, sums, strict=True):
                builder.store(v, o)

        _branch(builder, rl, loop)
        return _pair(context, builder, [builder.load(o) for o in out])

    return sig, codegen


@intrinsic
def _dx_run(typingctx, gf, xf, mf, df, start, n, mu, a, bb, d, k0, k1, floor, relu):
    """:func:`_ncs_dx`'s values on one channel's run of ``n`` values from ``start`` (scalar
    coefficients in the compute type), a vector of ``_LANES`` values at a time and the rest one by
    one (as :func:`_affine_run`, for short runs, float32 on whole lines); bfloat16 outputs
    rounded as ``_st`` rounds."""
    sig = _dx_run_sig(gf, xf, mf, df, mu, a, bb, d, k0, k1, floor, relu)
    if sig is None:
        return None

    def codegen(context, builder, sig, args):
        gv, xv, mv, dv, s, nv, mu, a, bb, d, k0, k1, fl, rl = args
        arrays = zip(sig.args[:4], (gv, xv, mv, dv), strict=True)
        gd, xd, md, dd = (_data(context, builder, ty, v) for ty, v in arrays)
        elem = dd.type.pointee
        co = [_splat(builder, v, _LANES) for v in (mu, a, bb, d)]
        vk = (_splat(builder, k0, _LANES), _splat(builder, k1, _LANES))
        align = sig.args[3].dtype.bitwidth // 8

        def loop(masked):
            def vector(at):
                m = _lanes(context, builder, sig.args[2], mv, at) if masked else None
                g = _lanes(context, builder, sig.args[0], gv, at)
                x = _lanes(context, builder, sig.args[1], xv, at)
                r = _narrow(builder, _dx_value(builder, g, x, m, *co, vk, fl, masked), elem)
                _store_vec(builder, r, dd, at, align)

            def scalar(at):
                m = _scalar_of(builder, md, at) if masked else None
                g, x = _scalar_of(builder, gd, at), _scalar_of(builder, xd, at)
                r = _dx_value(builder, g, x, m, mu, a, bb, d, (k0, k1), fl, masked)
                builder.store(_narrow(builder, r, elem), builder.gep(dd, [at]))

            _aligned_vectors(builder, dd, s, nv, vector, scalar)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


def _dx_value(builder, g, x, m, mu, a, bb, d, k, floor, relu):
    """``a g - bb (x - mu) - d`` with ``g`` gated by the ReLU mask of ``m`` (:func:`_gate`,
    coefficients ``k``) when ``relu`` (a Python bool), as :func:`_ncs_dx` computes it (the same
    operations and flags)."""
    fm = sorted(_FM)
    if relu:
        g = _gate(builder, g, m, k, floor)
    ag = builder.fmul(a, g, flags=fm)
    r = builder.fsub(ag, builder.fmul(bb, builder.fsub(x, mu, flags=fm), flags=fm), flags=fm)
    return builder.fsub(r, d, flags=fm)


@intrinsic
def _stream_dx_rows(typingctx, gf, xf, mf, t, floor, df, start, C, rows, relu):
    """:func:`_mc_dx`'s values on ``rows`` rows of ``C`` channels from ``start`` (``t``: the
    (6, >= C) coefficients mu, A, B, D and the ReLU mask's two (:func:`_gate`) per channel),
    stored non-temporally; every row must start on a 64-byte line of ``df`` (the caller
    checks)."""
    if not _loop_arrays(gf, xf, mf, df) or relu != types.boolean:
        return None
    comp = _compute_type(gf.dtype)
    if not (isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C"
            and t.dtype == comp) or floor != comp:  # fmt: skip
        return None
    sig = types.void(gf, xf, mf, t, floor, df, types.intp, types.intp, types.intp, relu)

    def codegen(context, builder, sig, args):
        gv, xv, mv, tv, fl, dv, s, nc, nr, rl = args
        size = sig.args[0].dtype.bitwidth // 8
        lanes = _LINE // size
        arrays = ((sig.args[0], gv), (sig.args[1], xv), (sig.args[2], mv), (sig.args[5], dv))
        gd, xd, md, dd = (_data(context, builder, ty, v) for ty, v in arrays)
        tary = context.make_array(sig.args[3])(context, builder, tv)
        stride = cgutils.unpack_tuple(builder, tary.shape, 2)[1]
        i64 = ir.IntType(64)

        def vector_for(masked):
            def vector(at, o):
                co = [_vec_of(builder, tary.data, builder.add(builder.mul(i64(k), stride), o),
                              lanes, size) for k in range(6 if masked else 4)]  # fmt: skip
                m = _wide_vec_of(builder, md, at, lanes, size) if masked else None
                g = _wide_vec_of(builder, gd, at, lanes, size)
                v = _wide_vec_of(builder, xd, at, lanes, size)
                r = _dx_value(builder, g, v, m, *co[:4], co[4:], fl, masked)
                _store_stream(builder, r, dd, at)

            return vector

        _stream_rows_of(builder, rl, s, nr, nc, lanes, vector_for)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _stream_dx_run(typingctx, gf, xf, mf, df, start, n, mu, a, bb, d, k0, k1, floor, relu):
    """:func:`_ncs_dx`'s values on one channel's run of ``n`` values from ``start`` (scalar
    coefficients), stored as :func:`_stream_run` stores its run."""
    sig = _dx_run_sig(gf, xf, mf, df, mu, a, bb, d, k0, k1, floor, relu)
    if sig is None:
        return None

    def codegen(context, builder, sig, args):
        gv, xv, mv, dv, s, n, mu, a, bb, d, k0, k1, fl, rl = args
        size = sig.args[0].dtype.bitwidth // 8
        lanes = _LINE // size
        arrays = zip(sig.args[:4], (gv, xv, mv, dv), strict=True)
        gd, xd, md, dd = (_data(context, builder, ty, v) for ty, v in arrays)
        co = [_splat(builder, v, lanes) for v in (mu, a, bb, d)]
        vk = (_splat(builder, k0, lanes), _splat(builder, k1, lanes))
        elem = dd.type.pointee

        def loop(masked):
            def scalar(at):
                m = _scalar_of(builder, md, at) if masked else None
                g, v = _scalar_of(builder, gd, at), _scalar_of(builder, xd, at)
                r = _dx_value(builder, g, v, m, mu, a, bb, d, (k0, k1), fl, masked)
                builder.store(_narrow(builder, r, elem), builder.gep(dd, [at]))

            def vector(at):
                m = _wide_vec_of(builder, md, at, lanes, size) if masked else None
                g = _wide_vec_of(builder, gd, at, lanes, size)
                v = _wide_vec_of(builder, xd, at, lanes, size)
                r = _dx_value(builder, g, v, m, *co, vk, fl, masked)
                _store_stream(builder, r, dd, at)

            _run(builder, dd, s, n, lanes, scalar, vector)

        _branch(builder, rl, loop)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _sfence(typingctx):
    """Order the non-temporal stores made so far before what follows."""

    def codegen(context, builder, sig, args):
        _fence(builder)
        return context.get_dummy_value()

    return types.void(), codegen


# ----------------------------------------------------------------------------------- statistics
@njit(**_SERIAL)
def _finish_stats(mean, var, w, b, has_w, has_b, eps, stats):
    """From (C,) float64 mean/var, fill stats (5, C) in the input dtype::

    stats[0:3] = mean, var, invstd = 1 / sqrt(var + eps)
    stats[3:5] = a, c  with  y = a x + c,  a = gamma invstd,  c = beta - mean a
                                                     (the normalize coefficients, _affine)
    """
    C = mean.shape[0]
    coef = stats[3:5]
    for c in range(C):
        inv = 1.0 / math.sqrt(var[c] + eps)
        stats[0, c] = mean[c]
        stats[1, c] = var[c]
        stats[2, c] = inv
        _affine(mean[c], inv * w[c] if has_w else inv, b[c] if has_b else 0.0, coef, c)


@njit(**_SERIAL)
def _affine(mean, a, beta, coef, c):
    """``coef[0, c], coef[1, c] = a, beta - mean * a``: BN's ``(x - mean) a + beta`` as the
    affine map ``a x + c`` that the elementwise loops apply (one fused multiply-add, two
    per-channel values to load where channels are innermost).

    ``c`` is computed in float64 from the *rounded* ``a``, so ``a x + c`` differs from
    ``(x - mean) a + beta`` by the rounding of ``c`` alone: at most half an ulp of
    ``|mean a|``, which is also what rounding ``mean`` to the input's dtype (the centred form's
    own coefficient) costs, and no more than the input itself carries (a value near ``mean``
    is known to half an ulp of ``mean``)."""
    coef[0, c] = a
    coef[1, c] = beta - mean * np.float64(coef[0, c])


# The loops proper work on a range of rows, ``(n, c)`` rows i0 <= i < i1 (i = n * C + c) for
# ``ncs`` and rows r0 <= r < r1 of (M, C) for ``mc``; a serial call runs one range over the whole
# input, a parallel one a range per chunk inside ``prange``. Same code, same results.
@njit(**_SERIAL)
def _ncs_sums(x, i0, i1, bmean, bm2):
    """Shifted sums of rows [i0, i1): ``bmean[n, c]`` = row mean - x_0, ``bm2[n, c]`` = the
    row's sum of squared deviations (one pass, see module docstring; a row's sums by
    :func:`_run_sums`)."""
    N, C, S = x.shape
    xf = _flat(x)
    n = i0 // C
    c = i0 - n * C
    ahead = _AHEAD_BYTES // x.itemsize
    for i in range(i0, i1):
        x0 = np.float64(_ld(x[0, c, 0]))  # the channel's shift (see module docstring)
        s, q = _run_sums(xf, i * S, S, x0, ahead)
        mb = s / S  # block mean - x0
        bmean[n, c] = mb
        bm2[n, c] = max(q - s * mb, 0.0)
        c += 1
        if c == C:
            n += 1
            c = 0


@njit(**_SERIAL)
def _merge(x0, bmean, bm2, counts, mean, var):
    """Merge blocks per channel (Chan's formula): block k of ``counts[k]`` values has mean
    ``x0 + bmean[k, c]`` and squared deviations ``bm2[k, c]``. Blocks outer, channels inner:
    contiguous reads, whatever the number of blocks."""
    K, C = bmean.shape
    m = 0.0
    for k in range(K):
        m += counts[k]
    mu = np.zeros(C, np.float64)
    for k in range(K):
        f = counts[k] / m
        for c in range(C):
            mu[c] += f * bmean[k, c]
    q = np.zeros(C, np.float64)
    for k in range(K):
        nk = counts[k]
        for c in range(C):
            d = bmean[k, c] - mu[c]
            q[c] += bm2[k, c] + nk * d * d
    for c in range(C):
        mean[c] = x0[c] + mu[c]
        var[c] = q[c] / m


@njit(**_SERIAL)
def _ncs_normalize(x, coef, relu, y, i0, i1, stream=False):
    """y = a x + c [then max(., 0)] on rows [i0, i1), coef rows (a, c) (:func:`_affine`);
    ``stream``: y's whole lines stored non-temporally (see above)."""
    N, C, S = x.shape
    if stream:
        xf = _flat(x)
        yf = _flat(y)
        for i in range(i0, i1):
            c = i % C
            _stream_run(xf, yf, i * S, S, coef[0, c], coef[1, c], relu)
        _sfence()
        return
    if x.itemsize <= 4:  # float32, bfloat16: a vector at a time (float64: LLVM's loop as fast)
        xf = _flat(x)
        yf = _flat(y)
        c = i0 % C
        for i in range(i0, i1):
            _affine_run(xf, yf, i * S, S, coef[0, c], coef[1, c], relu)
            c += 1
            if c == C:
                c = 0
        return
    for i in range(i0, i1):
        n = i // C
        c = i - n * C
        a = coef[0, c]
        cc = coef[1, c]
        xr = x[n, c]
        yr = y[n, c]
        if relu:  # (x a + c as _kept recomputes it in the backward)
            for k in range(S):
                v = _ld(xr[k]) * a + cc
                yr[k] = _st(_keep(v, v > 0), yr)
        else:
            for k in range(S):
                yr[k] = _st(_ld(xr[k]) * a + cc, yr)


@njit(**_SERIAL)
def _tile(v, dtype, lanes=False):
    """``v`` (K, C) with each row repeated ``_tile_rows(C)`` times (``lanes``: ``_lane_rows(C)``
    times), as ``dtype``: per-channel values for a flat tile of rows of an (M, C) layout (a run
    of the elementwise passes). Made once per call, shared by every chunk."""
    K, C = v.shape
    r = _lane_rows(C) if lanes else _tile_rows(C)
    t = np.empty((K, C * r), dtype)
    for i in range(K):
        for j in range(r):
            for c in range(C):
                t[i, j * C + c] = v[i, c]
    return t


@njit(**_SERIAL)
def _fold(t, C, out):
    """out[c] = sum over j of t[j * C + c]: a tiled accumulator (a whole number of rows of C
    values) back to (C,) values, each channel's terms added in j order. Row by row: indexing
    by ``k % C`` would pay a division per value, more than its addition, once per chunk of a
    parallel pass."""
    for c in range(C):
        out[c] = 0.0
    for j in range(t.shape[0] // C):
        for c in range(C):
            out[c] += t[j * C + c]


@njit(**_SERIAL)
def _wide_sums(x, z, r0, r1, s1, s2):
    """Add the shifted sums of rows [r0, r1) of the (M, C) ``x`` to ``s1[c]`` (sum d) and
    ``s2[c]`` (sum d^2), ``d = x - z[c]`` in float64 (``z``, ``s1``, ``s2``: (C,) float64): rows in
    groups of ``_WIDE_GROUP``, each group's values summed per channel in registers before one
    update of the accumulators (see _LONG_ROW)."""
    C = x.shape[1]
    i = r0
    while i + _WIDE_GROUP <= r1:
        x0, x1, x2, x3, x4, x5, x6, x7 = (x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5],
                                          x[i + 6], x[i + 7])  # fmt: skip
        for c in range(C):
            zc = z[c]
            d0 = _ld(x0[c]) - zc
            d1 = _ld(x1[c]) - zc
            d2 = _ld(x2[c]) - zc
            d3 = _ld(x3[c]) - zc
            d4 = _ld(x4[c]) - zc
            d5 = _ld(x5[c]) - zc
            d6 = _ld(x6[c]) - zc
            d7 = _ld(x7[c]) - zc
            s1[c] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            s2[c] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + (
                (d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7))  # fmt: skip
        i += _WIDE_GROUP
    for r in range(i, r1):
        xr = x[r]
        for c in range(C):
            d = _ld(xr[c]) - z[c]
            s1[c] += d
            s2[c] += d * d


@njit(**_SERIAL)
def _tile_sums(x, z, r0, r1, s1, s2):
    """Shifted sums ``s1[c] = sum d``, ``s2[c] = sum d^2`` (``d = x - x0`` in float64) of rows
    [r0, r1) of (M, C), read in tiles of ``_tile_rows(C)`` rows, each one flat vector of P values,
    with P accumulators (in registers when P is ``_TILE``: :func:`_sweep_sums`); ``z`` is x0
    tiled (:func:`_tile`)."""
    C = x.shape[1]
    xf = _flat(x)
    r = _tile_rows(C)
    P = r * C
    s1t = np.zeros(P, np.float64)
    s2t = np.zeros(P, np.float64)
    if _column_blocks(C, x.size * x.itemsize):
        rb = _block_rows(C, x.itemsize)
        ra = _ahead_rows(C, x.itemsize)
        for k in range((r1 - r0 + rb - 1) // rb):
            q = r0 + k * rb
            n = min(rb, r1 - q)
            ahead = ra * C if (q + n + ra) * C <= xf.shape[0] else 0  # (hints inside x)
            for o in range(0, C, _TILE):
                _sweep_sums(xf, z[o : o + _TILE], q * C + o, n, C, ahead, s1t[o : o + _TILE],
                            s2t[o : o + _TILE])  # fmt: skip
        _fold(s1t, C, s1)
        _fold(s2t, C, s2)
        return
    # (loops over tile counts, not strided while loops: a variable stride makes LLVM compute
    # trip counts with 128-bit division, which Numba cannot link)
    tiles = (r1 - r0) // r
    # (short tiles: software prefetch of the lines a sweep reads, _AHEAD_BYTES ahead; for wide
    # rows the test below never holds)
    ahead = _AHEAD_BYTES // x.itemsize if P <= _TILE else xf.shape[0]
    if P == _TILE:  # C divides _TILE: every whole tile in registers, prefetching while in range
        a = r0 * C
        near = min(tiles, max(0, (xf.shape[0] - a - ahead) // P))
        _sweep_sums(xf, z, a, near, P, ahead, s1t, s2t)
        _sweep_sums(xf, z, a + near * P, tiles - near, P, 0, s1t, s2t)
        quads = 0
        first = tiles
    else:
        quads = tiles // 4 if _multi_sweep(P) else 0
        first = 4 * quads
    line = _LINE_BYTES // x.itemsize
    for t in range(quads):  # 4 tiles per sweep: 4x fewer accumulator loads/stores
        a = (r0 + 4 * t * r) * C
        if a + ahead + 4 * P <= xf.shape[0]:
            for k in range(a + ahead, a + ahead + 4 * P, line):
                _prefetch(xf, k)
        xa = xf[a : a + P]
        xb = xf[a + P : a + 2 * P]
        xc = xf[a + 2 * P : a + 3 * P]
        xd = xf[a + 3 * P : a + 4 * P]
        for p in range(P):
            zp = z[p]
            da = _ld(xa[p]) - zp
            db = _ld(xb[p]) - zp
            dc = _ld(xc[p]) - zp
            dd = _ld(xd[p]) - zp
            s1t[p] += (da + db) + (dc + dd)
            s2t[p] += (da * da + db * db) + (dc * dc + dd * dd)
    for t in range(first, tiles):
        xa = xf[(r0 + t * r) * C : (r0 + (t + 1) * r) * C]
        for p in range(P):
            d = _ld(xa[p]) - z[p]
            s1t[p] += d
            s2t[p] += d * d
    xa = xf[(r0 + tiles * r) * C : r1 * C]  # fewer rows than a tile
    for q in range(xa.shape[0]):
        d = _ld(xa[q]) - z[q]
        s1t[q] += d
        s2t[q] += d * d
    _fold(s1t, C, s1)
    _fold(s2t, C, s2)


@njit(**_SERIAL)
def _mc_sums(x, z, r0, r1, cmean, cm2):
    """Shifted sums of rows [r0, r1) of (M, C) into ``cmean`` (C,) = mean - x0 and ``cm2`` (C,)
    = sum of squared deviations, float64: s1 = sum d, s2 = sum d^2 with d = x - x0, then
    M2 = s2 - s1^2 / n (see module docstring); in groups of rows where rows are wide or x is
    small (:func:`_wide_rows`, :func:`_wide_sums`), in flat tiles elsewhere
    (:func:`_tile_sums`). ``z`` is x0 tiled (:func:`_tile`)."""
    C = x.shape[1]
    s1 = np.zeros(C, np.float64)
    s2 = np.zeros(C, np.float64)
    if _wide_rows(C, x.itemsize, x.size * x.itemsize):
        _wide_sums(x, z, r0, r1, s1, s2)
    else:
        _tile_sums(x, z, r0, r1, s1, s2)
    inv_n = 1.0 / (r1 - r0)
    for c in range(C):
        cmean[c] = s1[c] * inv_n
        cm2[c] = max(s2[c] - s1[c] * s1[c] * inv_n, 0.0)


@njit(**_SERIAL)
def _mc_normalize(x, t, relu, y, r0, r1, stream=False):
    """:func:`_ncs_normalize` for rows [r0, r1) of an (M, C) layout, in flat runs of
    ``_lane_rows(C)`` rows; ``t`` holds the coefficients tiled alike (:func:`_tile` with
    ``lanes``). ``stream``: stored non-temporally where every row starts on a line."""
    C = x.shape[1]
    xf = _flat(x)
    yf = _flat(y)
    if stream and (C * x.itemsize) % _LINE == 0 and (
            y.ctypes.data + r0 * C * x.itemsize) % _LINE == 0:  # fmt: skip
        _stream_rows(xf, t[0], t[1], yf, r0 * C, C, r1 - r0, relu)
        return
    r = _lane_rows(C)
    a = t[0]
    cc = t[1]
    P = r * C
    first = 0
    if P == _TILE:  # C divides _TILE: whole tiles with the coefficients in registers
        first = (r1 - r0) // r
        _affine_tiles(xf, yf, r0 * C, first, a, cc, relu)
    for t in range(first, (r1 - r0 + r - 1) // r):  # whole runs, then the rows left
        base = (r0 + t * r) * C
        _affine_lanes(xf, yf, base, min(P, (r1 - r0 - t * r) * C), a, cc, relu)


@njit(**_OPTS)
def _ncs_sums_par(x, bmean, bm2):
    N, C, S = x.shape
    R, K = _chunks(N * C)
    T = _teams(K)
    for t in prange(T):
        lo, hi = _span(K, T, t)
        for k in range(lo, hi):
            _ncs_sums(x, k * R, min(N * C, (k + 1) * R), bmean, bm2)


@njit(**_OPTS)
def _ncs_normalize_par(x, coef, relu, y, back, stream=False):
    N, C, S = x.shape
    R, K = _chunks(N * C)
    T = _teams(K)
    s = np.intp(back)
    for t in prange(T):
        lo, hi = _span(K, T, t)
        for j in range(hi - lo):
            k = _nth(lo, hi, j, s)
            _ncs_normalize(x, coef, relu, y, k * R, min(N * C, (k + 1) * R), stream)


@njit(**_OPTS)
def _mc_sums_par(x, z, R, cmean, cm2):
    M = x.shape[0]
    K = cmean.shape[0]
    T = _teams(K)
    for t in prange(T):
        lo, hi = _span(K, T, t)
        for k in range(lo, hi):
            _mc_sums(x, z, k * R, min(M, (k + 1) * R), cmean[k], cm2[k])


@njit(**_OPTS)
def _mc_normalize_par(x, t, relu, y, R, back, stream=False):
    M = x.shape[0]
    K = (M + R - 1) // R
    T = _teams(K)
    s = np.intp(back)
    for i in prange(T):
        lo, hi = _span(K, T, i)
        for j in range(hi - lo):
            k = _nth(lo, hi, j, s)
            _mc_normalize(x, t, relu, y, k * R, min(M, (k + 1) * R), stream)


@njit(**_INLINE)
def _ncs_norm(x, coef, relu, y, back, stream=False):
    """The normalize pass on (N, C, S); ``back``: each thread's chunks last to first (after
    the statistics pass, see :func:`_span`). On one thread a pass in order (inference) is the
    serial loop: the same rows in the same order, without a parallel region to launch."""
    N, C, S = x.shape
    if use_serial(x.size) or (not back and _teams(_MAX_CHUNKS) == 1):
        _ncs_normalize(x, coef, relu, y, np.intp(0), N * C, stream)
    else:
        _ncs_normalize_par(x, coef, relu, y, back, stream)


@njit(**_INLINE)
def _mc_norm(x, coef, relu, y, back, stream=False):
    """:func:`_ncs_norm` on (M, C)."""
    M, C = x.shape
    t = _tile(coef, coef.dtype, True)
    if use_serial(x.size) or (not back and _teams(_MAX_CHUNKS) == 1):
        _mc_normalize(x, t, relu, y, np.intp(0), M, stream)
    else:
        _mc_normalize_par(x, t, relu, y, mc_rows_per_chunk(M, C), back, stream)


@njit(**_INLINE)
def train_fwd_ncs(x, w, b, has_w, has_b, eps, relu, y, stats, stream=False):
    """Training forward on (N, C, S): fills y (N, C, S) and stats (5, C) in x's dtype: rows
    mean, biased var, invstd, then the normalize coefficients (see :func:`_finish_stats`).
    Blocks are the (n, c) rows."""
    N, C, S = x.shape
    bmean = np.empty((N, C), np.float64)
    bm2 = np.empty((N, C), np.float64)
    if use_serial(x.size):
        _ncs_sums(x, np.intp(0), N * C, bmean, bm2)
    else:
        _ncs_sums_par(x, bmean, bm2)
    x0 = np.empty(C, np.float64)
    for c in range(C):
        x0[c] = _ld(x[0, c, 0])
    mean = np.empty(C, np.float64)
    var = np.empty(C, np.float64)
    _merge(x0, bmean, bm2, np.full(N, np.float64(S)), mean, var)
    _finish_stats(mean, var, w, b, has_w, has_b, eps, stats)
    _ncs_norm(x, stats[3:5], relu, y, True, stream)


@njit(**_INLINE)
def train_fwd_mc(x, w, b, has_w, has_b, eps, relu, y, stats, stream=False):
    """Training forward on (M, C), channels innermost; same outputs as :func:`train_fwd_ncs`.
    Blocks are chunks of ``mc_rows_per_chunk`` rows (one block, the whole input, when serial)."""
    M, C = x.shape
    x0 = np.empty(C, np.float64)
    for c in range(C):
        x0[c] = _ld(x[0, c])
    serial = use_serial(x.size)
    R = M if serial else mc_rows_per_chunk(M, C)
    K = (M + R - 1) // R
    cmean = np.empty((K, C), np.float64)
    cm2 = np.empty((K, C), np.float64)
    z = _tile(x0.reshape(1, C), np.float64)[0]
    if serial:
        _mc_sums(x, z, np.intp(0), M, cmean[0], cm2[0])
    else:
        _mc_sums_par(x, z, R, cmean, cm2)
    counts = np.empty(K, np.float64)
    for k in range(K):
        counts[k] = min(M, (k + 1) * R) - k * R  # the last chunk may be shorter
    mean = np.empty(C, np.float64)
    var = np.empty(C, np.float64)
    _merge(x0, cmean, cm2, counts, mean, var)
    _finish_stats(mean, var, w, b, has_w, has_b, eps, stats)
    _mc_norm(x, stats[3:5], relu, y, True, stream)


@njit(**_SERIAL)
def train_fwd_at(xp, yp, rows, C, S, w, b, has_w, has_b, eps, relu, stats, rm, rv, nbt,
                 commit, cumulative, momentum, like, stream):  # fmt: skip
    """:func:`train_fwd_ncs` (``S > 1``: ``rows`` = N) or :func:`train_fwd_mc` (``S == 1``:
    ``rows`` = M) on the tensors at the addresses ``xp`` and ``yp``: each ``rows * C * S``
    elements of ``like``'s dtype, dense in that layout, which the caller has checked and keeps
    alive for the call. Addresses rather than arrays save the caller two numpy views and their
    reshapes per tensor, which inside a model cost a small call more than its loops do.
    ``stream``: y is stored non-temporally (the caller's choice for large outputs).

    With ``commit``, the batch's statistics are then accepted into the running averages ``rm``,
    ``rv`` and the counter ``nbt`` in the same call, as :func:`commit_stats` with ``update``
    does (its ``cumulative`` and ``momentum``; ``rows * S`` values per channel): a training
    step of a small layer pays for each call from Python. Returns :func:`commit_stats`' answer
    (False: non-finite statistics, nothing updated), True without ``commit``; a caller that
    commits nothing passes placeholders of the same types, so both callers share one compiled
    signature."""
    if S > 1:
        train_fwd_ncs(carray(_at(xp, like), (rows, C, S)), w, b, has_w, has_b, eps, relu,
                      carray(_at(yp, like), (rows, C, S)), stats, stream)  # fmt: skip
    else:
        train_fwd_mc(carray(_at(xp, like), (rows, C)), w, b, has_w, has_b, eps, relu,
                     carray(_at(yp, like), (rows, C)), stats, stream)  # fmt: skip
    if not commit:
        return True
    return commit_stats(stats[0], stats[1], rm, rv, nbt, True, cumulative, momentum,
                        float(rows * S))  # fmt: skip


# ----------------------------------------------------------------------------------- inference
@njit(**_SERIAL)
def _eval_coef(rm, rv, w, b, has_w, has_b, eps, stats):
    """stats (3, C): invstd, then the normalize coefficients (a, c) of :func:`_affine`."""
    C = rm.shape[0]
    coef = stats[1:3]
    for c in range(C):
        inv = 1.0 / math.sqrt(np.float64(rv[c]) + eps)
        stats[0, c] = inv
        _affine(np.float64(rm[c]), inv * w[c] if has_w else inv, b[c] if has_b else 0.0, coef, c)


@njit(**_INLINE)
def eval_fwd_ncs(x, rm, rv, w, b, has_w, has_b, eps, relu, y, stats, stream=False):
    """Inference forward on (N, C, S) with population statistics (Algorithm 2)."""
    _eval_coef(rm, rv, w, b, has_w, has_b, eps, stats)
    _ncs_norm(x, stats[1:3], relu, y, False, stream)


@njit(**_INLINE)
def eval_fwd_mc(x, rm, rv, w, b, has_w, has_b, eps, relu, y, stats, stream=False):
    """Inference forward on (M, C) with population statistics (Algorithm 2)."""
    _eval_coef(rm, rv, w, b, has_w, has_b, eps, stats)
    _mc_norm(x, stats[1:3], relu, y, False, stream)


@njit(**_SERIAL)
def eval_fwd_at(xp, yp, rows, C, S, rm, rv, w, b, has_w, has_b, eps, relu, stats, like,
                stream):  # fmt: skip
    """:func:`eval_fwd_ncs` / :func:`eval_fwd_mc` on the tensors at addresses ``xp``, ``yp``
    (see :func:`train_fwd_at`); ``stats`` (3, C) as there, or an empty (0, 0) array when the
    caller does not need them (made here then, which costs less than in Python)."""
    if stats.shape[0] == 0:
        stats = np.empty((3, C), rm.dtype)
    _eval_coef(rm, rv, w, b, has_w, has_b, eps, stats)
    if S > 1:
        _ncs_norm(carray(_at(xp, like), (rows, C, S)), stats[1:3], relu,
                  carray(_at(yp, like), (rows, C, S)), False, stream)  # fmt: skip
    else:
        _mc_norm(carray(_at(xp, like), (rows, C)), stats[1:3], relu,
                 carray(_at(yp, like), (rows, C)), False, stream)  # fmt: skip


# ----------------------------------------------------------------------------------- backward
@njit(**_SERIAL)
def _bwd_coef(sums, mean, invstd, w, has_w, train, m, coef, dgamma, dbeta):
    """From the sums: dgamma, dbeta and the dx coefficients (mean, A, B, D)."""
    C = mean.shape[0]
    for c in range(C):
        inv = np.float64(invstd[c])
        s1 = sums[0, c]
        s2 = sums[1, c]
        dgamma[c] = s2 * inv  # dL/dgamma = sum g x_hat
        dbeta[c] = s1  # dL/dbeta = sum g
        a = inv * w[c] if has_w else inv
        coef[0, c] = mean[c]
        coef[1, c] = a
        coef[2, c] = a * inv * inv * s2 / m if train else 0.0
        coef[3, c] = a * s1 / m if train else 0.0


@njit(**_INLINE)
def _kept(m, k0, k1, floor):
    """Whether the fused ReLU let a value through: its pre-activation ``k0 m + k1`` above
    ``floor`` (see :func:`backward_ncs`), computed with the operations and flags of the
    normalize passes' ``x a + c`` (:func:`_ncs_normalize`, :func:`_pre_activation`)."""
    return m * k0 + k1 > floor


@njit(**_SERIAL)
def _ncs_gsums(dy, x, m, relu, mean, k, floor, i0, i1, p1, p2):
    """Per row of [i0, i1): ``p1[n, c]`` = sum g, ``p2[n, c]`` = sum g (x - mean), float64;
    ``g = dy`` or, for the fused ReLU, ``dy`` where :func:`_kept` (``k``: (2, C)) and 0
    elsewhere (a row's sums by :func:`_run_gsums`)."""
    N, C, S = x.shape
    xf = _flat(x)
    gf = _flat(dy)
    mf = _flat(m)
    n = i0 // C
    c = i0 - n * C
    ahead = _AHEAD_BYTES // x.itemsize
    for i in range(i0, i1):
        p1[n, c], p2[n, c] = _run_gsums(gf, xf, mf, i * S, S, mean[c], k[0, c], k[1, c], floor,
                                        relu, ahead)  # fmt: skip
        c += 1
        if c == C:
            n += 1
            c = 0


@njit(**_SERIAL)
def _gated(g, m, k0, k1, floor, relu):
    """``g`` as the gradient sums read it: ``dy`` or, with the fused ReLU, ``dy`` where
    :func:`_kept` and 0 elsewhere."""
    return _keep(_ld(g), not relu or _kept(_ld(m), k0, k1, floor))


@njit(**_SERIAL)
def _wide_gsums(dy, x, m, relu, u, floor, r0, r1, s1, s2):
    """:func:`_mc_gsums` for wide rows, in groups of ``_WIDE_GSUM_GROUP`` rows as
    :func:`_wide_sums` (``u``: (3, C) in the compute type, the mean and the mask's
    coefficients). Without the fused ReLU the loop reads dy and x only: a mask computed and
    discarded would cost a load and a compare per value."""
    if relu:
        _wide_gsums_of(dy, x, m, True, u, floor, r0, r1, s1, s2)
    else:
        _wide_gsums_of(dy, x, m, False, u, floor, r0, r1, s1, s2)


@njit(**_INLINE)
def _wide_gsums_of(dy, x, m, relu, u, floor, r0, r1, s1, s2):
    """The loop of :func:`_wide_gsums`, inlined with ``relu`` a constant."""
    C = x.shape[1]
    mu = u[0]
    k0 = u[1]
    k1 = u[2]
    i = r0
    while i + _WIDE_GSUM_GROUP <= r1:
        g0, g1, g2, g3 = dy[i], dy[i + 1], dy[i + 2], dy[i + 3]
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        m0, m1, m2, m3 = m[i], m[i + 1], m[i + 2], m[i + 3]
        for c in range(C):
            a, b, f = mu[c], k0[c], k1[c]
            v0 = _gated(g0[c], m0[c], b, f, floor, relu)
            v1 = _gated(g1[c], m1[c], b, f, floor, relu)
            v2 = _gated(g2[c], m2[c], b, f, floor, relu)
            v3 = _gated(g3[c], m3[c], b, f, floor, relu)
            w0, w1, w2, w3 = np.float64(v0), np.float64(v1), np.float64(v2), np.float64(v3)
            s1[c] += (w0 + w1) + (w2 + w3)
            s2[c] += (w0 * np.float64(_ld(x0[c]) - a) + w1 * np.float64(_ld(x1[c]) - a)) + (
                w2 * np.float64(_ld(x2[c]) - a) + w3 * np.float64(_ld(x3[c]) - a))  # fmt: skip
        i += _WIDE_GSUM_GROUP
    for r in range(i, r1):
        gr, xr, mr = dy[r], x[r], m[r]
        for c in range(C):
            v = _gated(gr[c], mr[c], k0[c], k1[c], floor, relu)
            s1[c] += v
            s2[c] += np.float64(v) * np.float64(_ld(xr[c]) - mu[c])


@njit(**_SERIAL)
def _mc_gsums(dy, x, m, relu, u, floor, r0, r1, s1, s2):
    """Add sum g and sum g (x - mean) over rows [r0, r1) of (M, C) to s1, s2 (C,) float64, in
    flat tiles of ``_tile_rows(C)`` rows with tiled accumulators (in registers when a tile is
    ``_TILE`` values: :func:`_sweep_gsums`), or in groups of rows where rows are wide or the
    arrays small (:func:`_wide_gsum_rows`, :func:`_wide_gsums`); ``u`` holds the mean and the
    ReLU mask's coefficients, tiled (:func:`_tile`)."""
    C = x.shape[1]
    if _wide_gsum_rows(C, x.itemsize, x.size * x.itemsize):
        _wide_gsums(dy, x, m, relu, u, floor, r0, r1, s1, s2)
        return
    xf = _flat(x)
    gf = _flat(dy)
    mf = _flat(m)
    r = _tile_rows(C)
    P = r * C
    mu = u[0]
    k0 = u[1]
    k1 = u[2]
    s1t = np.zeros(P, np.float64)
    s2t = np.zeros(P, np.float64)
    if _column_blocks(C, 2 * x.size * x.itemsize):  # (dy and x)
        rb = _block_rows(C, x.itemsize)
        ahead = _ahead_rows(C, x.itemsize) * C
        for k in range((r1 - r0 + rb - 1) // rb):
            q = r0 + k * rb
            n = min(rb, r1 - q)
            for o in range(0, C, _TILE):
                e = o + _TILE
                _sweep_gsums(gf, xf, mf, mu[o:e], k0[o:e], k1[o:e], floor, q * C + o, n, C,
                             relu, s1t[o:e], s2t[o:e], ahead)  # fmt: skip
        for c in range(C):
            s1[c] += s1t[c]
            s2[c] += s2t[c]
        return
    tiles = (r1 - r0) // r
    if P == _TILE:  # C divides _TILE: every whole tile in registers
        _sweep_gsums(gf, xf, mf, mu, k0, k1, floor, r0 * C, tiles, P, relu, s1t, s2t, 0)
        pairs = 0
        first = tiles
    else:
        pairs = tiles // 2 if _multi_sweep(P) else 0
        first = 2 * pairs
    for t in range(pairs):  # 2 tiles per sweep: half the accumulator loads/stores
        a = (r0 + 2 * t * r) * C
        xa = xf[a : a + P]
        xb = xf[a + P : a + 2 * P]
        ga = gf[a : a + P]
        gb = gf[a + P : a + 2 * P]
        if relu:
            ma = mf[a : a + P]
            mb = mf[a + P : a + 2 * P]
            for p in range(P):
                v = _keep(_ld(ga[p]), _kept(_ld(ma[p]), k0[p], k1[p], floor))
                w = _keep(_ld(gb[p]), _kept(_ld(mb[p]), k0[p], k1[p], floor))
                s1t[p] += v + w
                s2t[p] += v * (_ld(xa[p]) - mu[p]) + w * (_ld(xb[p]) - mu[p])
        else:
            for p in range(P):
                s1t[p] += _ld(ga[p]) + _ld(gb[p])
                s2t[p] += _ld(ga[p]) * (_ld(xa[p]) - mu[p]) + _ld(gb[p]) * (_ld(xb[p]) - mu[p])
    for t in range(first, (r1 - r0 + r - 1) // r):  # the other tiles, then the rows left
        base = (r0 + t * r) * C
        n = min(P, (r1 - r0 - t * r) * C)
        xs = xf[base : base + n]
        gs = gf[base : base + n]
        if relu:
            ms = mf[base : base + n]
            for p in range(n):
                g = _keep(_ld(gs[p]), _kept(_ld(ms[p]), k0[p], k1[p], floor))
                s1t[p] += g
                s2t[p] += g * (_ld(xs[p]) - mu[p])
        else:  # (a loop of its own: no mask loads and compares)
            for p in range(n):
                g = _ld(gs[p])
                s1t[p] += g
                s2t[p] += g * (_ld(xs[p]) - mu[p])
    t1 = np.empty(C, np.float64)
    t2 = np.empty(C, np.float64)
    _fold(s1t, C, t1)
    _fold(s2t, C, t2)
    for c in range(C):
        s1[c] += t1[c]
        s2[c] += t2[c]


@njit(**_SERIAL)
def _ncs_dx(dy, x, m, relu, coef, floor, dx, i0, i1, stream=False):
    """dx = A g - B (x - mean) - D per channel on rows [i0, i1), coef rows (mean, A, B, D, then
    the ReLU mask's two coefficients), ``g`` as in :func:`_ncs_gsums`.

    Training (section 3, collected): A = gamma invstd, B = A invstd^2 sum(g (x-mu)) / m,
    D = A sum(g) / m.  Inference: B = D = 0. ``stream``: as :func:`_ncs_normalize`.
    """
    N, C, S = x.shape
    gf = _flat(dy)
    xf = _flat(x)
    mf = _flat(m)
    df = _flat(dx)
    if stream:
        for i in range(i0, i1):
            c = i % C
            _stream_dx_run(gf, xf, mf, df, i * S, S, coef[0, c], coef[1, c], coef[2, c],
                           coef[3, c], coef[4, c], coef[5, c], floor, relu)  # fmt: skip
        _sfence()
        return
    c = i0 % C
    for i in range(i0, i1):  # (a vector at a time: _dx_run)
        _dx_run(gf, xf, mf, df, i * S, S, coef[0, c], coef[1, c], coef[2, c], coef[3, c],
                coef[4, c], coef[5, c], floor, relu)  # fmt: skip
        c += 1
        if c == C:
            c = 0


@njit(**_SERIAL)
def _mc_dx(dy, x, m, relu, t, floor, dx, r0, r1, stream=False):
    """:func:`_ncs_dx` for rows [r0, r1) of an (M, C) layout, in flat runs of
    ``_lane_rows(C)`` rows with the coefficients tiled alike (:func:`_tile` with ``lanes``).
    ``stream``: as :func:`_mc_normalize`."""
    C = x.shape[1]
    xf = _flat(x)
    gf = _flat(dy)
    mf = _flat(m)
    df = _flat(dx)
    if stream and (C * x.itemsize) % _LINE == 0 and (
            dx.ctypes.data + r0 * C * x.itemsize) % _LINE == 0:  # fmt: skip
        _stream_dx_rows(gf, xf, mf, t, floor, df, r0 * C, C, r1 - r0, relu)
        return
    r = _lane_rows(C)
    P = r * C
    mu = t[0]
    a = t[1]
    bb = t[2]
    d = t[3]
    k0 = t[4]
    k1 = t[5]
    if _column_blocks(C, 3 * x.size * x.itemsize) and C * x.itemsize < _ROW_DX_BYTES:
        rb = _block_rows(C, x.itemsize)
        for k in range((r1 - r0 + rb - 1) // rb):
            q = r0 + k * rb
            n = min(rb, r1 - q)
            for o in range(0, C, _TILE):
                e = o + _TILE
                _dx_tiles(gf, xf, mf, df, q * C + o, n, C, mu[o:e], a[o:e], bb[o:e], d[o:e],
                          k0[o:e], k1[o:e], floor, relu)  # fmt: skip
        return
    first = 0
    if P == _TILE:  # C divides _TILE: whole tiles with the coefficients in registers
        first = (r1 - r0) // r
        _dx_tiles(gf, xf, mf, df, r0 * C, first, _TILE, mu, a, bb, d, k0, k1, floor, relu)
    for t in range(first, (r1 - r0 + r - 1) // r):  # whole runs, then the rows left
        base = (r0 + t * r) * C
        _dx_lanes(gf, xf, mf, df, base, min(P, (r1 - r0 - t * r) * C), mu, a, bb, d, k0, k1,
                  floor, relu)  # fmt: skip


@njit(**_OPTS)
def _ncs_gsums_par(dy, x, m, relu, mean, k, floor, p1, p2):
    N, C, S = x.shape
    R, K = _chunks(N * C)
    T = _teams(K)
    for t in prange(T):
        lo, hi = _span(K, T, t)
        for j in range(lo, hi):
            _ncs_gsums(dy, x, m, relu, mean, k, floor, j * R, min(N * C, (j + 1) * R), p1, p2)


@njit(**_OPTS)
def _mc_gsums_par(dy, x, m, relu, u, floor, R, p1, p2):
    M = x.shape[0]
    K = p1.shape[0]
    T = _teams(K)
    for t in prange(T):
        lo, hi = _span(K, T, t)
        for k in range(lo, hi):
            _mc_gsums(dy, x, m, relu, u, floor, k * R, min(M, (k + 1) * R), p1[k], p2[k])


# (the dx passes follow the gradient sums: each thread's chunks last to first, see _span)
@njit(**_OPTS)
def _ncs_dx_par(dy, x, m, relu, coef, floor, dx, stream=False):
    N, C, S = x.shape
    R, K = _chunks(N * C)
    T = _teams(K)
    for t in prange(T):
        lo, hi = _span(K, T, t)
        for j in range(hi - lo):
            k = _nth(lo, hi, j, np.intp(1))
            _ncs_dx(dy, x, m, relu, coef, floor, dx, k * R, min(N * C, (k + 1) * R), stream)


@njit(**_OPTS)
def _mc_dx_par(dy, x, m, relu, t, floor, dx, R, stream=False):
    M = x.shape[0]
    K = (M + R - 1) // R
    T = _teams(K)
    for i in prange(T):
        lo, hi = _span(K, T, i)
        for j in range(hi - lo):
            k = _nth(lo, hi, j, np.intp(1))
            _mc_dx(dy, x, m, relu, t, floor, dx, k * R, min(M, (k + 1) * R), stream)


@njit(**_SERIAL)
def _add_rows(p1, p2, sums):
    """sums[0] = sum of p1's rows, sums[1] = sum of p2's rows (rows outer: contiguous reads)."""
    K, C = p1.shape
    for k in range(K):
        for c in range(C):
            sums[0, c] += p1[k, c]
            sums[1, c] += p2[k, c]


@njit(**_INLINE)
def backward_ncs(dy, x, m, relu, k, floor, mean, invstd, w, has_w, train, need_sums, need_dx,
                 dx, dgamma, dbeta, stream=False):  # fmt: skip
    """Backward on (N, C, S): dgamma and dbeta (C,) when need_sums or train, dx when
    need_dx. ``train`` selects Algorithm 1's gradient (batch statistics) over the inference one.

    With ``relu`` (the fused ReLU), ``dy`` counts where the forward let a value through: where
    ``k[0, c] m + k[1, c] > floor`` (:func:`_kept`, :func:`_gate`), ``m`` like x. Given x as
    ``m``, the forward's normalize coefficients as ``k`` and as ``floor`` 0, or for bfloat16
    outputs 2^-134 (the largest float32 that rounds to a bfloat16 zero), this is ``y > 0``
    recomputed bit for bit from the value the forward rounded into y, without reading y (the
    same multiply-add, so the same rounding); given y with ``k`` = (1, 0) and ``floor`` 0, it is
    ``y > 0`` read from y. ``k`` is (2, C) in the compute dtype, read only with ``relu``."""
    N, C, S = x.shape
    serial = use_serial(x.size)
    sums = np.zeros((2, C), np.float64)
    if need_sums or train:
        p1 = np.empty((N, C), np.float64)
        p2 = np.empty((N, C), np.float64)
        if serial:
            _ncs_gsums(dy, x, m, relu, mean, k, floor, np.intp(0), N * C, p1, p2)
        else:
            _ncs_gsums_par(dy, x, m, relu, mean, k, floor, p1, p2)
        _add_rows(p1, p2, sums)
    coef = np.empty((6, C), mean.dtype)  # (the compute dtype: float32 for bfloat16 bits)
    _bwd_coef(sums, mean, invstd, w, has_w, train, x.size // C, coef, dgamma, dbeta)
    coef[4:6] = k
    if need_dx:
        if serial:
            _ncs_dx(dy, x, m, relu, coef, floor, dx, np.intp(0), N * C, stream)
        else:
            _ncs_dx_par(dy, x, m, relu, coef, floor, dx, stream)


@njit(**_INLINE)
def backward_mc(dy, x, m, relu, k, floor, mean, invstd, w, has_w, train, need_sums, need_dx,
                dx, dgamma, dbeta, stream=False):  # fmt: skip
    """(M, C) version of :func:`backward_ncs`; partial sums per chunk of rows."""
    M, C = x.shape
    serial = use_serial(x.size)
    R = M if serial else mc_rows_per_chunk(M, C)
    sums = np.zeros((2, C), np.float64)
    if need_sums or train:
        v = np.empty((3, C), mean.dtype)
        v[0] = mean
        v[1:3] = k
        u = _tile(v, mean.dtype)
        if serial:
            _mc_gsums(dy, x, m, relu, u, floor, np.intp(0), M, sums[0], sums[1])
        else:
            K = (M + R - 1) // R
            p1 = np.zeros((K, C), np.float64)
            p2 = np.zeros((K, C), np.float64)
            _mc_gsums_par(dy, x, m, relu, u, floor, R, p1, p2)
            _add_rows(p1, p2, sums)
    coef = np.empty((6, C), mean.dtype)  # (the compute dtype: float32 for bfloat16 bits)
    _bwd_coef(sums, mean, invstd, w, has_w, train, M, coef, dgamma, dbeta)
    coef[4:6] = k
    if need_dx:
        t = _tile(coef, coef.dtype, True)
        if serial:
            _mc_dx(dy, x, m, relu, t, floor, dx, np.intp(0), M, stream)
        else:
            _mc_dx_par(dy, x, m, relu, t, floor, dx, R, stream)


@njit(**_SERIAL)
def backward_at(dyp, xp, mp, relu, k, floor, rows, C, S, mean, invstd, w, has_w, train,
                need_sums, dxp, gp, bp, like, stream):  # fmt: skip
    """:func:`backward_ncs` / :func:`backward_mc` on the tensors at the addresses ``dyp``,
    ``xp``, ``mp`` (the ReLU mask's source: x's or the fused ReLU's output's, with ``k`` and
    ``floor`` as there) and ``dxp`` (0: no dx), as :func:`train_fwd_at` takes them, writing
    dgamma and dbeta (C values each in the compute dtype, always written) at ``gp`` and ``bp``:
    the two new tensors a backward returns, as torch's does; ``stream``: dx stored
    non-temporally."""
    n = rows if dxp != 0 else 0  # (no dx: an empty array, never read)
    dgamma = carray(_at(gp, mean), (C,))
    dbeta = carray(_at(bp, mean), (C,))
    if S > 1:
        shape = (rows, C, S)
        backward_ncs(carray(_at(dyp, like), shape), carray(_at(xp, like), shape),
                     carray(_at(mp, like), shape), relu, k, floor, mean, invstd, w, has_w,
                     train, need_sums, dxp != 0, carray(_at(dxp, like), (n, C, S)), dgamma,
                     dbeta, stream)  # fmt: skip
    else:
        backward_mc(carray(_at(dyp, like), (rows, C)), carray(_at(xp, like), (rows, C)),
                    carray(_at(mp, like), (rows, C)), relu, k, floor, mean, invstd, w, has_w,
                    train, need_sums, dxp != 0, carray(_at(dxp, like), (n, C)), dgamma,
                    dbeta, stream)  # fmt: skip


# ----------------------------------------------------------------------------- running statistics
# (fastmath off explicitly: a callee compiled for a caller inherits the caller's flags unless it
# sets its own, and the averages must round as torch's formula does wherever they are computed)
@njit(cache=True, nogil=True, fastmath=False)
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


# ----------------------------------------------------------------------------- layout
@njit(parallel=True, cache=True, nogil=True)
def swap_inner(src, dst, N, A, B):
    """dst[n, b, a] = src[n, a, b] for flat contiguous ``(N, A, B)`` ``src`` and ``(N, B, A)``
    ``dst`` (any element type: the bits are moved). Blocks of eight ``a`` per job: each reads
    eight runs of ``src`` along ``b`` and writes eight adjacent values of ``dst`` per ``b``,
    the direction in which torch's strided copy is slowest (autograd's copy of a gradient into
    a channels-innermost leaf)."""
    nblocks = (A + 7) // 8
    for job in prange(N * nblocks):
        n = job // nblocks
        a0 = (job - n * nblocks) * 8
        s0 = n * A * B + a0 * B
        d0 = n * B * A + a0
        if a0 + 8 <= A:
            for b in range(B):
                d = d0 + b * A
                s = s0 + b
                dst[d] = src[s]
                dst[d + 1] = src[s + B]
                dst[d + 2] = src[s + 2 * B]
                dst[d + 3] = src[s + 3 * B]
                dst[d + 4] = src[s + 4 * B]
                dst[d + 5] = src[s + 5 * B]
                dst[d + 6] = src[s + 6 * B]
                dst[d + 7] = src[s + 7 * B]
        else:
            for a in range(a0, A):
                for b in range(B):
                    dst[d0 + (a - a0) + b * A] = src[s0 + (a - a0) * B + b]
