"""Fused CPU batch-norm kernels with the contract of :mod:`bnlab.functional`.

Ioffe & Szegedy (2015): Algorithm 1 (training forward), Algorithm 2 (inference forward) and the
section 3 gradients, each as one Numba call that makes as few passes over memory as possible:

* training forward: one read of x for the statistics (shifted float64 sums in blocks merged
  with Chan's formula, see :mod:`bnlab.kernels._numba`), one read of x and one write of y to
  normalize (the memory traffic of 1.5 copies of x);
* backward: one read of x and dy for the two per-channel sums ``sum g`` and
  ``sum g (x - mu)``, one read of x and dy and one write of dx (the traffic of 2.5 copies);
* inference forward: one read, one write.

Every function also takes ``relu``: the output is ``max(BN(x), 0)`` and the backward masks ``dy``
with ``y > 0`` (the fused BN+ReLU). Supported inputs are decided by :func:`unsupported_reason`: a
CPU float32 or float64 tensor, contiguous (``(N, C)``, ``(N, C, *spatial)``) or channels_last
(``(N, *spatial, C)`` in memory), with parameters/statistics of the same dtype. Shapes and
statistic dtypes are those of :mod:`bnlab.functional` (statistics in the input's dtype). A
bfloat16 tensor of those layouts is taken too, with float32 parameters and statistics (the
backend's ``fused32`` path): read and written as it is, computed in float32, with float32
statistics and parameter gradients; its ``dy`` and ``y`` are bfloat16 as well.

The wrappers here hand the loops the addresses of the large tensors (x, y, dy, dx), after
checking that each is dense in the loop's layout (:func:`_layout`; outputs are made with x's
strides), and numpy views of the (C,) ones; the ``*_at`` loops of :mod:`bnlab.kernels._numba`
read them as arrays. A caller that runs the same shapes many times may call the compiled loops
themselves (:func:`compiled`, whose contracts are in :mod:`bnlab.kernels._numba`).
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from ..functional import _LAST

__all__ = [
    "unsupported_reason",
    "array_view",
    "dispatches_to_python",
    "layout_reason",
    "batch_norm_train_forward",
    "batch_norm_train_backward",
    "batch_norm_eval_forward",
    "batch_norm_eval_backward",
    "commit_supported",
    "commit_batch_stats",
    "lean_plan",
    "lean_train_forward",
    "lean_eval_forward",
    "lean_backward",
    "compiled",
    "warm_up",
]

_DTYPES = (torch.float32, torch.float64)


_threads = threading.local()  # Numba's thread count is per calling thread; so is this cache


def compiled():
    """The module of compiled loops, :mod:`bnlab.kernels._numba` (numpy arrays in, arrays
    filled), imported on first use so that ``import bnlab`` does not import numba.

    Every call also makes the kernels follow ``torch.set_num_threads``: Numba's parallel loops
    run on ``torch.get_num_threads()`` threads (capped by the pool Numba was started with,
    ``NUMBA_NUM_THREADS``), so one setting governs torch's operators and bnlab's kernels alike.
    The count is set on the first call in each Python thread and whenever torch's count has
    changed since; a direct ``numba.set_num_threads`` holds until then.

    Starting Numba's thread pool (the first ``follow_threads`` in the process) also sets the
    OpenMP thread count of the calling thread to the pool's size. Where Numba's OpenMP layer
    and torch load the same ``libgomp`` that is the count torch itself reads, and the user's
    ``torch.set_num_threads`` would be lost, for torch's operators as well as the kernels, so
    it is put back here. (Numba's layer asks for the system's ``libgomp.so.1.0.0`` by file
    name; a torch wheel that bundles its own ``libgomp.so.1`` then runs a second OpenMP
    runtime with a pool of its own, each pool's idle threads spinning while the other works.
    Measurements of both arrangements: docs/kernels.md.)
    """
    global _loops
    mod = _loops
    if mod is None:  # (kept in a global: an import statement costs more than the rest here)
        from . import _cache_lock

        _cache_lock.install()  # (before any loop compiles or loads: see _cache_lock)
        from . import _numba as mod

        _loops = mod
    n = torch.get_num_threads()
    if getattr(_threads, "n", None) != n:
        mod.follow_threads(n)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        _threads.n = n
    return mod


_loops = None  # bnlab.kernels._numba once imported (compiled)


def _channels_last_dense(shape, strides) -> bool:
    """Whether a tensor of ``shape`` and ``strides`` (at least 3 dimensions) is dense with its
    channels innermost, then its spatial dimensions last to first, then the batch (the memory
    order of ``torch.channels_last``); like torch, the strides of size-1 dimensions are not
    looked at."""
    expected = 1
    for d in (1, *range(len(shape) - 1, 1, -1), 0):
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def _layout(x: Tensor, shape=None) -> tuple[int, int, int] | None:
    """``(rows, C, S)``: x (at least 2 dimensions, at least one value) dense as ``(N, C, S)``
    with ``S > 1`` (contiguous: ``rows`` = N), or as ``(M, C)`` rows with ``S == 1``
    (contiguous with one value per (n, c), or channels innermost in torch's channels_last or
    channels_last_3d format: ``rows`` = M); None for any other strides (a dense ``(N, C, L)``
    tensor with its channels innermost, say: torch's output for it is contiguous, which the
    loops cannot write from it). The layouts of the loops (:mod:`bnlab.kernels._numba`), which
    take x's address: a tensor made by :func:`_empty_like` has the same layout."""
    shape = x.shape if shape is None else shape
    c = shape[1]
    if x.is_contiguous():
        n = shape[0]
        return n, c, math.prod(shape) // (n * c)
    if len(shape) in (4, 5) and _channels_last_dense(shape, x.stride()):
        return math.prod(shape) // c, c, 1
    return None


def unsupported_reason(x: Tensor, *params: Tensor | None) -> str | None:
    """Why the fused kernels cannot take ``x`` (and same-dtype ``params``), or None if they can."""
    # (cheap tests first: this runs on every call, and small layers feel each microsecond)
    if not x.is_cpu:
        return f"device {x.device} (CPU only)"
    dtype = x.dtype
    if dtype not in _DTYPES:
        return f"dtype {dtype} (float32/float64 only)"
    reason = subclass_reason(x, params)
    if reason is not None:
        return reason
    for p in params:
        if p is not None and (p.dtype != dtype or not p.is_cpu):
            return (
                f"a parameter/statistic of dtype {p.dtype} on {p.device} for an input of "
                f"dtype {dtype} on the CPU"
            )
        if p is not None and p.is_neg():
            return f"a parameter/statistic that is {_NEG}"
    return layout_reason(x)


_NEG = "a negative view (torch._neg_view: its memory holds -x, which the kernels would read)"


def layout_reason(x: Tensor) -> str | None:
    """Why the kernels cannot take ``x``'s shape, strides or memory (whatever its dtype), or
    None."""
    if x.dim() < 2 or x.numel() == 0:
        return f"shape {tuple(x.shape)} (need (N, C, ...) with N*C > 0)"
    if x.is_neg():
        return f"an input that is {_NEG}"
    if _layout(x) is None:
        return f"strides {x.stride()} (contiguous or channels_last only)"
    return None


_dispatch_keys = torch._C._dispatch_keys
_PYTHON_KEY = torch._C.DispatchKey.Python


def dispatches_to_python(t: Tensor) -> bool:
    """Whether ``t`` is a tensor subclass that runs torch's operators itself
    (``__torch_dispatch__``: ``FakeTensor``, ``DTensor``, wrapper subclasses). Such a tensor may
    have no memory of its own (its address 0), or memory that holds something else: the loops
    never read it."""
    return type(t) is not Tensor and _dispatch_keys(t).has(_PYTHON_KEY)


def subclass_reason(x: Tensor, params: tuple[Tensor | None, ...]) -> str | None:
    """Why the loops cannot take ``x`` or one of ``params`` because it runs torch's operators
    itself (:func:`dispatches_to_python`), or None."""
    if dispatches_to_python(x):
        return f"a {type(x).__name__} input, which runs torch's operators itself"
    for p in params:
        if p is not None and dispatches_to_python(p):
            return f"a {type(p).__name__} parameter/statistic, which runs torch's operators itself"
    return None


class _Memory:
    """A tensor's memory as numpy's array interface describes it (:func:`array_view`), and the
    tensor, which the view keeps as long as it lives."""

    __slots__ = ("__array_interface__", "tensor")


# numpy's type strings of the dtypes whose memory the loops take (bfloat16 as its uint16 bits;
# the integers of the counter and of values moved as bits)
_TYPESTR = {
    torch.float32: np.dtype(np.float32).str,
    torch.float64: np.dtype(np.float64).str,
    torch.bfloat16: np.dtype(np.uint16).str,
    torch.int16: np.dtype(np.int16).str,
    torch.int32: np.dtype(np.int32).str,
    torch.int64: np.dtype(np.int64).str,
}


def array_view(t: Tensor) -> np.ndarray:
    """numpy view of a CPU tensor's memory (float32, float64, integers of 2, 4 and 8 bytes;
    bfloat16 as its uint16 bits, which the loops read and write, see
    :mod:`bnlab.kernels._numba`); TypeError for any other tensor, as ``Tensor.numpy`` raises.
    Built from the tensor's address, not by ``Tensor.numpy``, which marks the storage as one
    that can never be resized again: the caller's parameters, buffers and gradients stay as
    torch leaves them (sharding tools such as ``fully_shard`` free and reallocate a parameter's
    storage between steps). The view keeps the tensor alive but not its memory, which whoever
    owns the tensor may free or reallocate: it is valid for the call that made it, and a kept
    plan's while its key holds (:func:`_state_key`)."""
    typestr = _TYPESTR.get(t.dtype)  # (real dtypes only: no conjugate views)
    if (
        typestr is None
        or not t.is_cpu
        or t.layout != torch.strided
        or t.is_neg()
        or dispatches_to_python(t)
    ):
        what = (" (a negative view)" if t.is_neg() else
                f" (a {type(t).__name__}, which runs torch's operators itself)"
                if dispatches_to_python(t) else "")  # fmt: skip
        raise TypeError(f"fused kernels: no view of a {t.dtype} {t.layout} tensor on {t.device}"
                        f"{what}")  # fmt: skip
    m = _Memory()
    m.tensor = t
    face = {"data": (t.data_ptr(), False), "shape": t.shape, "typestr": typestr, "version": 3}
    if not t.is_contiguous():
        face["strides"] = tuple(d * t.element_size() for d in t.stride())
    m.__array_interface__ = face
    return np.asarray(m)


def _new(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
    """A new tensor for the loops to write and its numpy view: what a call returns is
    allocated by torch (a resizable storage, as torch's own results), not by numpy."""
    t = torch.empty(shape, dtype=dtype)
    return t, array_view(t)


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics, parameters and coefficients for an input of ``dtype``:
    float32 for bfloat16, else the input's."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


_NP = {torch.float32: np.float32, torch.float64: np.float64}
_TORCH = {np.float32: torch.float32, np.float64: torch.float64}


_THP = "/sys/kernel/mm/transparent_hugepage/"
THP_ENABLED = _THP + "enabled"


def thp_mode(thp_enabled: str) -> str:
    """The selected mode in the text of ``THP_ENABLED`` (``always [madvise] never`` ->
    ``madvise``), or "" if none is marked."""
    start = thp_enabled.find("[")
    end = thp_enabled.find("]", start + 1)
    return thp_enabled[start + 1 : end] if 0 <= start < end else ""


def advice_changes_pages(thp_enabled: str) -> bool:
    """Whether ``madvise(MADV_HUGEPAGE)`` changes how memory is mapped, given the text of
    ``THP_ENABLED``: only in ``madvise`` mode; ``never`` maps no huge pages, ``always`` maps
    them unasked."""
    return thp_mode(thp_enabled) == "madvise"


class _HugePages:
    """Transparent huge pages for large fresh outputs (Linux only).

    Every kernel output is a fresh tensor, and its pages are mapped in on first touch, inside the
    kernel: 4 KB at a time, a 51 MB output costs about 12,500 page faults, more than the pass
    over it. glibc serves a request of ``MIN_BYTES`` (32 MiB) or more with a fresh mapping
    unless its heap has a free chunk that large (its mmap threshold rises with frees, but not
    above 32 MiB on 64-bit systems); advising the kernel to back such an output with transparent
    huge pages (``madvise(MADV_HUGEPAGE)`` on its aligned interior, before anything touches it)
    maps it 2 MB at a time. Smaller outputs are not advised: glibc serves them from its heap,
    whose pages are already mapped in the steady state (the advice changes nothing there), and
    when the heap is trimmed and grows again, advised pages fault in with the kernel's
    synchronous compaction (THP ``defrag`` in its default ``madvise`` mode), which stalls a call
    for milliseconds. The advice changes no value and no layout; where it
    would change nothing it is skipped: another OS, THP set to ``never``, or to ``always``,
    where the kernel backs large allocations with huge pages unasked.
    """

    MIN_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit systems (see above)

    def __init__(self) -> None:
        self.size = 0  # huge-page size in bytes; 0: unavailable, skip
        self._madvise = None
        try:
            import ctypes
            import mmap
            import sys

            if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
                return
            with open(THP_ENABLED) as f:
                mode = f.read()
            if not advice_changes_pages(mode):
                return
            with open(_THP + "hpage_pmd_size") as f:
                size = int(f.read())
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            self._madvise, self._advice, self.size = fn, mmap.MADV_HUGEPAGE, size
        except (OSError, ValueError, AttributeError):
            self.size = 0

    def advise(self, t: Tensor, n: int) -> None:
        """Ask for huge pages under the whole huge pages inside ``t``'s ``n`` bytes (best
        effort; the caller decides which tensors are worth it, see ``MIN_BYTES``)."""
        if self.size == 0:
            return
        a = t.data_ptr()
        lo = -(-a // self.size) * self.size
        hi = (a + n) // self.size * self.size
        if hi > lo:
            self._madvise(lo, hi - lo, self._advice)  # (a failure leaves ordinary pages)


_huge: _HugePages | None = None


def _empty_like(x: Tensor, nbytes: int | None = None) -> Tensor:
    """``torch.empty_like(x)`` (x's strides: a gradient or a copy for the loops), on huge pages
    when large (:class:`_HugePages`); ``nbytes``: x's size in bytes, where the caller knows it."""
    return _advised(torch.empty_like(x), nbytes)


def _output_like(x: Tensor, nbytes: int | None = None, fmt=False) -> Tensor:
    """A forward's output for x (in a loop layout), as :func:`_empty_like` but with the
    strides torch gives its output: those of x's memory format (x's own, but where a size-1
    dimension's stride differs: the same addresses, so the same loop layout). ``fmt``: that
    format, or None where x's strides are known to be its own (:func:`_lean_layout`)."""
    if fmt is False:
        if x.is_contiguous():
            fmt = torch.contiguous_format
        else:  # (x is channels_last, or channels_last_3d: the loops' other layout)
            fmt = _LAST[len(x.shape)]
    y = torch.empty_like(x) if fmt is None else torch.empty_like(x, memory_format=fmt)
    return _advised(y, nbytes)


def _advised(y: Tensor, nbytes: int | None) -> Tensor:
    """``y``, advised onto huge pages when large (:class:`_HugePages`)."""
    global _huge
    if _huge is None:
        _huge = _HugePages()
    if _huge.size:  # (where no advice is given, not even the size is looked at)
        n = y.numel() * y.element_size() if nbytes is None else nbytes
        if n >= _HugePages.MIN_BYTES:
            _huge.advise(y, n)
    return y


def llc_bytes() -> int:
    """The size in bytes of the last-level cache of CPU 0 (Linux sysfs: its highest cache
    level), or 32 MiB where the system does not say."""
    best = (0, 32 << 20)
    try:
        base = "/sys/devices/system/cpu/cpu0/cache"
        for name in os.listdir(base):
            if not name.startswith("index"):
                continue
            with open(f"{base}/{name}/level") as f:
                level = int(f.read())
            with open(f"{base}/{name}/size") as f:
                text = f.read().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * unit
            best = max(best, (level, size))
    except (OSError, ValueError):
        pass
    return best[1]


# Outputs of at least this many bytes are stored non-temporally (see bnlab.kernels._numba,
# "streaming stores"): half the last-level cache, where a pass's input and output together no
# longer fit in it. Set on first use.
STREAM_BYTES: int | None = None


def _streams(y: Tensor) -> bool:
    """Whether the fresh output ``y`` is large enough to be stored non-temporally."""
    return _streams_bytes(y.numel() * y.element_size())


def _streams_bytes(nbytes: int) -> bool:
    """:func:`_streams` of an output of ``nbytes``."""
    global STREAM_BYTES
    if STREAM_BYTES is None:
        STREAM_BYTES = llc_bytes() // 2
    return nbytes >= STREAM_BYTES


def _readable_layout(x: Tensor) -> tuple[int, int, int] | None:
    """:func:`_layout` of a tensor whose memory the loops may read by address (on the CPU, at
    least 2 dimensions and one value, not a negative view, dense in a loop layout), else None;
    :func:`layout_reason` says why (or the device)."""
    lay = _lean_layout(x)
    return None if lay is None else lay[0]


def _lean_layout(x: Tensor):
    """``(layout, fmt)``: :func:`_readable_layout` of x (None where it is None) and the memory
    format its outputs take (:func:`_output_like`): None where x has no size-1 dimension, so
    its own strides are its format's (the outputs are made like x), else that format."""
    if not x.is_cpu or x.is_neg():
        return None
    shape = x.shape  # (every query of a tensor is a call into torch: the shape says the rest)
    if len(shape) < 2 or 0 in shape:
        return None
    lay = _layout(x, shape)
    if lay is None:
        return None
    if 1 not in shape:
        return lay, None
    return lay, torch.contiguous_format if x.is_contiguous() else _LAST[len(shape)]


def channels_inner_3d(x: Tensor) -> bool:
    """Whether a 3-D CPU tensor is dense with its channels innermost (``(N, L, C)`` memory
    order, as a transposed sequence is) and not contiguous: the layout whose gradient
    :func:`to_channels_inner` writes."""
    shape = x.shape
    return (
        len(shape) == 3
        and x.is_cpu
        and not x.is_contiguous()
        and 0 not in shape
        and _channels_last_dense(shape, x.stride())
    )


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# Up to this many channels the loop's blocks of eight channels beat torch's strided copy in
# this direction (4x at 32-64 channels, parity at 128); above it torch's copy was the faster
# (0.7-0.8x the loop's time at 256-512 channels; RESULTS.md "session 18").
SWAP_MAX_C = 128


def to_channels_inner(g: Tensor) -> Tensor | None:
    """A contiguous ``(N, C, L)`` CPU tensor ``g`` of at most :data:`SWAP_MAX_C` channels as a
    new tensor of its shape and values with its channels innermost (strides ``(L * C, 1, C)``),
    written by the loops (:func:`bnlab.kernels._numba.swap_inner`); None for any other ``g``."""
    shape = g.shape
    bits = _BITS.get(g.element_size())
    if (
        bits is None
        or len(shape) != 3
        or not g.is_cpu
        or not g.is_contiguous()
        or g.is_neg()
        or g.is_conj()
        or g.is_complex()
        or 0 in shape
        or shape[1] > SWAP_MAX_C
    ):
        return None
    n, c, length = shape
    out = torch.empty((n, length, c), dtype=g.dtype)
    compiled().swap_inner(
        array_view(g.view(bits)).reshape(-1), array_view(out.view(bits)).reshape(-1), n, c, length
    )
    return out.transpose(1, 2)


def _checked_layout(x: Tensor) -> tuple[int, int, int]:
    """:func:`_readable_layout` of an input the kernels take (also a float32, float64 or
    bfloat16 one); a ValueError naming what is wrong for any other: the loops read the tensors
    by address, so nothing else may reach them."""
    if not x.is_cpu or x.dtype not in _NONE:
        raise ValueError(f"fused kernels: a {x.dtype} tensor on {x.device} (CPU float32, "
                         "float64 or bfloat16 only)")  # fmt: skip
    lay = _readable_layout(x)
    if lay is None:
        raise ValueError(f"fused kernels: {layout_reason(x)}")
    return lay


def _vec(t: Tensor, c: int):
    """numpy view of a (C,) statistic or parameter (a contiguous copy if it is strided); a
    ValueError for a tensor of another size, which the loops would read (or write) past."""
    if t.numel() != c:
        raise ValueError(f"fused kernels: a per-channel tensor of {t.numel()} values for {c} "
                         "channels")  # fmt: skip
    return array_view(t if t.is_contiguous() else t.contiguous())


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (x's shape) in x's dtype and at x's addresses (x's strides, or others that differ
    only on size-1 dimensions), so x's layout: a copy only if they differ (an expanded dy, say)."""
    if t.dtype == x.dtype and t.is_cpu and not t.is_neg():
        if t.stride() == x.stride():
            return t
        lay = _layout(t)
        if lay is not None and lay == _layout(x):  # (the same addresses)
            return t
    return _empty_like(x).copy_(t)


# (see eval_fwd_at; by the input's dtype, each in its compute dtype)
_NO_STATS = {t: np.empty((0, 0), _NP[_compute(t)]) for t in (*_NP, torch.bfloat16)}

_ITEMSIZE = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2}

_NO_COUNT = np.zeros((), np.int64)  # (a counter for a training forward that commits nothing)

_NONE = {
    torch.float32: np.empty(0, np.float32),
    torch.float64: np.empty(0, np.float64),
    torch.bfloat16: np.empty(0, np.uint16),
}

# The floor of the backward's ReLU mask recomputed from x (``backward_ncs``): the pre-activation
# is let through where it is above this, which is where the forward's rounded output is above 0.
# A float32 value rounds to a bfloat16 zero up to 2^-134 (half the smallest subnormal, a tie
# rounded to even); float32 and float64 outputs are the value itself.
RELU_FLOOR = {
    torch.float32: np.float32(0.0),
    torch.float64: np.float64(0.0),
    torch.bfloat16: np.float32(2.0**-134),
}


@functools.lru_cache(maxsize=64)
def _mask_of_output(c: int, dt) -> np.ndarray:
    """The (2, C) mask coefficients (1, 0) that make the backward's ReLU mask ``y > 0`` read from
    the output y itself (``backward_ncs``), in the compute dtype ``dt``: one array per (C,
    dtype), shared, which the loops only read."""
    k = np.zeros((2, c), dt)
    k[0] = 1
    return k


def _param(p: Tensor | None, dtype: torch.dtype, c: int):
    """numpy view of a (C,) parameter (:func:`_vec`), or an empty placeholder of the dtype when
    absent."""
    if p is None:
        return _NONE[dtype], False
    return _vec(p, c), True


def batch_norm_train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool = False,
    return_coef: bool = False,
) -> tuple[Tensor, ...]:
    """Algorithm 1, fused. Returns ``(y, mean, var, invstd)``: y in x's layout (torch's strides
    for it, :func:`_output_like`), (C,) statistics in x's dtype (float32 for a bfloat16 x),
    ``var`` biased. With ``relu``, ``y = max(BN(x), 0)``. With ``return_coef``, a fifth value:
    the (2, C) coefficients ``(a, c)`` of the normalize pass ``a x + c``, from which the
    backward recomputes the ReLU's mask (``coef`` of :func:`batch_norm_train_backward`)."""
    k = compiled()
    rows, c, s = _checked_layout(x)
    y = _output_like(x)
    cdt = _compute(x.dtype)
    st, stats = _new((5, c), cdt)  # mean, var, invstd, 2 coefficients
    w, has_w = _param(weight, cdt, c)
    b, has_b = _param(bias, cdt, c)
    k.train_fwd_at(x.data_ptr(), y.data_ptr(), rows, c, s, w, b, has_w, has_b, float(eps),
                   bool(relu), stats, _NONE[cdt], _NONE[cdt], _NO_COUNT, False, False, 0.0,
                   _NONE[x.dtype], _streams(y))  # fmt: skip
    if return_coef:
        return y, st[0], st[1], st[2], st[3:5]
    return y, st[0], st[1], st[2]


def batch_norm_eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool = False,
    return_coef: bool = False,
) -> tuple[Tensor, ...]:
    """Algorithm 2, fused: ``y = (x - E[x]) * gamma / sqrt(Var[x] + eps) + beta`` in one pass.
    Returns ``(y, invstd)``, and with ``return_coef`` the (2, C) normalize coefficients as
    :func:`batch_norm_train_forward` does."""
    k = compiled()
    rows, c, s = _checked_layout(x)
    y = _output_like(x)
    cdt = _compute(x.dtype)
    w, has_w = _param(weight, cdt, c)
    b, has_b = _param(bias, cdt, c)
    st, stats = _new((3, c), cdt)  # invstd, 2 coefficients
    k.eval_fwd_at(
        x.data_ptr(), y.data_ptr(), rows, c, s, _vec(running_mean, c), _vec(running_var, c), w, b,
        has_w, has_b, float(eps), bool(relu), stats, _NONE[x.dtype], _streams(y),
    )  # fmt: skip
    if return_coef:
        return y, st[0], st[1:3]
    return y, st[0]


def _fast_vec(t: Tensor, dt: torch.dtype, c: int):
    """:func:`array_view` of a contiguous (c,) CPU tensor of dtype ``dt``, else None."""
    if t.dtype != dt or t.dim() != 1 or t.shape[0] != c or not t.is_contiguous():
        return None
    return array_view(t)  # (TypeError for a tensor off the CPU: the caller's fallback)


def _state_key(running_mean, running_var, weight, bias, count=None) -> tuple:
    """What a kept plan's numpy views of these tensors (:func:`_fast_params`,
    :func:`_lean_plan`) depend on: each one's address, shape, strides, dtype and sign bit, flat
    (an absent one as None), and the running statistics' and counter's identities. A view is an
    address read a way (:func:`array_view`): an equal key means the tensors have that memory now,
    whatever happened since (a new tensor, ``.data``, ``.to()``, a storage freed and allocated
    again), and values changed in place are read through the views. The identities are those
    of the tensors a training plan holds, whose version counters its calls advance."""
    rm, rv = running_mean, running_var
    key = (
        id(rm), rm.data_ptr(), rm.shape, rm.stride(), rm.dtype, rm.is_neg(),
        id(rv), rv.data_ptr(), rv.shape, rv.stride(), rv.dtype, rv.is_neg(), id(count),
    )  # fmt: skip
    for t in (weight, bias, count):
        key += (None,) if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_neg())
    return key


def _fast_params(dt, c, running_mean, running_var, weight, bias, count=None):
    """numpy views ``(rm, rv, w, b)`` of the statistics and parameters (placeholders for absent
    ones), and of ``count`` (``num_batches_tracked``, a 0-d int64 CPU tensor) as a fifth when
    given, for a lean plan (:func:`_lean_plan`); or None if one is not a contiguous (c,) CPU
    tensor of dtype ``dt`` (or ``count`` not such a counter)."""
    if count is not None and (count.dtype != torch.int64 or count.dim() != 0 or count.is_neg()):
        return None
    arrays = (
        _fast_vec(running_mean, dt, c),
        _fast_vec(running_var, dt, c),
        _NONE[dt] if weight is None else _fast_vec(weight, dt, c),
        _NONE[dt] if bias is None else _fast_vec(bias, dt, c),
    )
    if count is not None:
        arrays += (array_view(count),)
    if any(a is None for a in arrays):
        return None
    return arrays


def new_views() -> list:
    """An empty cache for the lean calls' ``views`` argument (:func:`lean_plan`): item 0 holds
    the plan of an inference call, item 1 that of a training call."""
    return [None, None]


def _entry(dispatcher, args):
    """The compiled function Numba's ``dispatcher`` runs for ``args``: its overload's entry
    point, which converts each argument to the overload's type without the dispatcher's
    resolution of the types and choice of the overload (compiled, or loaded from the cache, if
    it is not yet); or the dispatcher itself where Numba does not give one. Every call of it
    must pass arguments of exactly these types: ints, bools and floats as Python's, and arrays
    of the same dtype, rank and layout."""
    import numba

    try:
        return dispatcher.compile(tuple(numba.typeof(a) for a in args))
    except Exception:  # (any reason at all: the dispatcher takes the call as it always can)
        return dispatcher


def eval_forward_fast(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    views: list | None = None,
) -> Tensor | None:
    """:func:`batch_norm_eval_forward` for the common call, in fewer steps: a contiguous or
    channels_last float32/float64 CPU input with at least one value, statistics and parameters
    of its dtype, contiguous, on the CPU, with one value per channel; or such a bfloat16 input
    with float32 statistics and parameters (as under ``torch.autocast``; the ``fused32`` path
    of :mod:`bnlab.backend`, which reads bfloat16 as it is). Returns y, or None for
    any other call, which the general path then takes with its checks and errors (nothing here
    raises for a call it does not take, and nothing here changes any state but ``views``, the
    cache of plans the caller keeps, see :func:`lean_plan`).

    An inference layer runs between other layers, which leave the caches full of their own
    data and code: there every step of the Python path costs many times what it costs in a
    loop of calls, so the common call takes as few as possible. x and y go to the loop as
    addresses (:func:`bnlab.kernels._numba.eval_fwd_at`), checked to be dense in the loop's
    layout: y is made in that layout (:func:`_output_like`), and both stay referenced for the
    call."""
    plan = _lean_plan(x, running_mean, running_var, weight, bias, views, None, 0)
    if plan is None:
        return None
    rows, c, s, p, dt, n, _, fmt, stream, run, _ = plan
    compiled()  # (the thread count follows torch's)
    y = torch.empty_like(x) if fmt is None else torch.empty_like(x, memory_format=fmt)
    if n >= _HugePages.MIN_BYTES:
        _advised(y, n)
    run[0](
        x.data_ptr(), y.data_ptr(), rows, c, s, p[0], p[1], p[2], p[3], weight is not None,
        bias is not None, float(eps), bool(relu), _NO_STATS[dt], _NONE[dt], stream,
    )  # fmt: skip
    return y


def _lean_plan(x, running_mean, running_var, weight, bias, views, count, slot):
    """``(rows, C, S, arrays, dtype, nbytes, buffers, fmt, stream, run, at)`` for a lean call on
    ``x``: its loop layout (:func:`_layout`), the numpy views of :func:`_fast_params`, x's
    dtype and its size in bytes (which its outputs share), for a training call (``count``
    given) the running statistics and counter it updates, the outputs' memory format
    (:func:`_lean_layout`), whether they are stored non-temporally (:func:`_streams`) and the
    loops the call runs (``(forward, backward)``: entry points, :func:`_entry`, when the plan
    is kept; Numba's dispatchers otherwise); or None unless x is a float32/float64 CPU tensor
    the loops can read with statistics and parameters of its dtype, or such a bfloat16 one
    with float32 statistics and parameters (the ``fused32`` path of :mod:`bnlab.backend`, which
    reads bfloat16 as it is). Raises nothing.

    With ``views``, the plan is kept in ``views[slot]`` with its key: x's shape, strides,
    dtype, device and sign bit and the tensors' :func:`_state_key`; a call with the same key
    takes the same plan, any other plans again. The item is replaced whole, so threads sharing
    a layer never pair a key with another key's plan."""
    if views is not None:
        try:  # (a tensor without memory, say: the general path says what it is)
            key = (x.shape, x.stride(), x.dtype, x.is_cpu, x.is_neg(),
                   *_state_key(running_mean, running_var, weight, bias, count))  # fmt: skip
        except RuntimeError:
            return None
        kept = views[slot]
        if kept is not None and kept[0] == key:
            return kept[1]
    dt = x.dtype
    if dt in _NP:
        pdt = dt  # the statistics' and parameters' dtype, and the computation's
    elif dt == torch.bfloat16:
        pdt = torch.float32
    else:
        return None
    lay = _lean_layout(x)
    if lay is None:
        return None
    (rows, c, s), fmt = lay
    try:
        p = _fast_params(pdt, c, running_mean, running_var, weight, bias, count)
    except (TypeError, RuntimeError):  # (a parameter off the CPU)
        return None
    if p is None:
        return None
    n = rows * c * s * _ITEMSIZE[dt]
    stream = _streams_bytes(n)
    k = compiled()
    fwd = k.eval_fwd_at if count is None else k.train_fwd_at
    run = (fwd, k.backward_at)
    if views is not None:  # (the entry points, for arguments of the types the calls pass)
        cdt = p[0].dtype
        floor, like = RELU_FLOOR[dt], _NONE[dt]
        if count is None:
            stats = np.empty((3, c), cdt)
            f = (0, 0, rows, c, s, *p, True, True, 0.0, False, stats, like, False)
            coef, mean, invstd = stats[1:3], p[0], stats[0]
        else:
            stats = np.empty((5, c), cdt)
            f = (0, 0, rows, c, s, p[2], p[3], True, True, 0.0, False, stats, *p[:2], p[4],
                 True, True, 0.0, like, False)  # fmt: skip
            coef, mean, invstd = stats[3:5], stats[0], stats[2]
        b = (0, 0, 0, False, coef, floor, rows, c, s, mean, invstd, p[2], True, True, True, 0,
             0, 0, like, False)  # fmt: skip
        run = (_entry(fwd, f), _entry(k.backward_at, b))
    buffers = None if count is None else (running_mean, running_var, count)
    at = running_mean.data_ptr(), 0 if weight is None else weight.data_ptr()
    plan = rows, c, s, p, dt, n, buffers, fmt, stream, run, at
    if views is not None:
        views[slot] = (key, plan)
    return plan


def lean_plan(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    views: list | None = None,
):
    """The plan of a lean call on ``x``, or None for a call the general path must take (the
    ``batch_norm_*`` functions and :func:`commit_batch_stats` through the backend, with their
    checks and errors). It takes the inputs :func:`eval_forward_fast` takes. With a counter
    ``num_batches_tracked`` (a 0-d int64 tensor) it plans a training call
    (:func:`lean_train_forward`, :func:`lean_backward`), the running
    statistics being the buffers to update; with None, an inference call with them as the
    population statistics (:func:`lean_eval_forward`, :func:`eval_forward_fast`,
    :func:`lean_backward`). ``views`` (:func:`new_views`, kept by the caller) keeps the last
    plan of each kind, found again by its key (:func:`_lean_plan`).

    A layer runs between other layers: the general path's steps (choosing a backend, checking
    every tensor, numpy views of each statistic and parameter, the statistics as tensors, a
    second wrapper for the running averages) cost more than a small call's loops, and the lean
    calls take the loops with what the plan holds."""
    slot = 0 if num_batches_tracked is None else 1
    return _lean_plan(x, running_mean, running_var, weight, bias, views, num_batches_tracked,
                      slot)  # fmt: skip


def lean_train_forward(x: Tensor, plan, eps: float, relu: bool, momentum: float | None):
    """Algorithm 1 [+ ReLU] of a planned training call, then the batch's statistics committed
    to the plan's running averages and counter as :func:`commit_batch_stats` does (an update:
    ``momentum`` None or a finite float), in one call of the loops. Returns ``(y, stats,
    ok)``: y in x's layout, ``stats`` the (5, C) array of :func:`bnlab.kernels._numba.train_fwd_at`
    (mean, biased var, invstd, then the coefficients) in the compute dtype, ``ok`` False for
    non-finite statistics (nothing updated). Same values as :func:`batch_norm_train_forward`
    and :func:`commit_batch_stats`."""
    rows, c, s, p, dt, n, _, fmt, stream, run, _ = plan
    y = _output_like(x, n, fmt)
    stats = np.empty((5, c), p[0].dtype)
    compiled()  # (the thread count follows torch's)
    ok = run[0](
        x.data_ptr(), y.data_ptr(), rows, c, s, p[2], p[3], p[2].size > 0, p[3].size > 0,
        float(eps), bool(relu), stats, p[0], p[1], p[4], True, momentum is None,
        0.0 if momentum is None else float(momentum), _NONE[dt], stream,
    )  # fmt: skip
    if ok:  # (written through their memory: autograd is told, as by an in-place operation)
        increment_version(plan[6])  # (the buffers)
    return y, stats, ok


def lean_eval_forward(x: Tensor, plan, eps: float, relu: bool):
    """The inference transform [+ ReLU] of a planned inference call: ``(y, stats)``, y in x's
    layout, ``stats`` the (3, C) array of :func:`bnlab.kernels._numba.eval_fwd_at` (invstd,
    then the coefficients). Same values as :func:`batch_norm_eval_forward`."""
    rows, c, s, p, dt, n, _, fmt, stream, run, _ = plan
    y = _output_like(x, n, fmt)
    stats = np.empty((3, c), p[0].dtype)
    compiled()  # (the thread count follows torch's)
    run[0](
        x.data_ptr(), y.data_ptr(), rows, c, s, p[0], p[1], p[2], p[3], p[2].size > 0,
        p[3].size > 0, float(eps), bool(relu), stats, _NONE[dt], stream,
    )  # fmt: skip
    return y, stats


def lean_backward(dy: Tensor, x: Tensor, weight: Tensor | None, running_mean: Tensor | None,
                  relu: bool, plan, stats, train: bool, need_dx: bool,
                  need_dparams: bool):  # fmt: skip
    """:func:`batch_norm_train_backward` (``train``) or :func:`batch_norm_eval_backward` of a
    planned call (with the fused ReLU when ``relu``), from its forward's ``stats`` and the
    tensors it saved, ``weight`` and, at inference, ``running_mean``: ``(dx, dgamma,
    dbeta)``. The plan's views of these serve while the tensors keep the memory they had in the
    forward; a tool that frees a parameter's memory after the forward and gathers it again for
    the backward (``fully_shard``) hands them back elsewhere, and they are viewed there. ``dy``
    is taken in x's dtype and layout (autograd hands an output's backward a gradient of that
    output's dtype). The ReLU's mask is recomputed from x with the forward's normalize
    coefficients, bit for bit the forward's ``y > 0`` (``_numba.backward_ncs``), so the output
    is neither kept nor read."""
    rows, c, s, p, dt, n, _, _, stream, run, (rm_at, w_at) = plan
    w = p[2] if weight is None or weight.data_ptr() == w_at else array_view(weight)
    if train:
        mean, invstd = stats[0], stats[2]
    else:
        mean = p[0] if running_mean.data_ptr() == rm_at else array_view(running_mean)
        invstd = stats[0]
    dy = _like(dy, x)  # (x's layout, so the loops may read it by address)
    dx = _empty_like(x, n) if need_dx else None
    has_w = w.size > 0
    need_sums = need_dparams  # (also without a weight: a bias alone has its gradient)
    cdt = _TORCH[stats.dtype.type]
    dgamma, dbeta = torch.empty(c, dtype=cdt), torch.empty(c, dtype=cdt)
    xp = x.data_ptr()
    compiled()  # (the thread count follows torch's)
    run[1](
        dy.data_ptr(), xp, xp, bool(relu), stats[3:5] if train else stats[1:3], RELU_FLOOR[dt],
        rows, c, s, mean, invstd, w, has_w, bool(train), bool(need_sums),
        0 if dx is None else dx.data_ptr(), dgamma.data_ptr(), dbeta.data_ptr(), _NONE[dt],
        dx is not None and stream,
    )  # fmt: skip
    if not need_sums:
        return dx, None, None
    return dx, dgamma, dbeta


def _relu_coef(coef: Tensor, c: int, dt) -> np.ndarray:
    """The (2, C) coefficients a forward returned (``return_coef``) as the loops read them,
    refused if they cannot be that forward's."""
    if coef.shape != (2, c) or coef.dtype != dt or not coef.is_contiguous() or not coef.is_cpu:
        raise ValueError(
            f"coef: expected the forward's (2, {c}) {dt} coefficients, got "
            f"{tuple(coef.shape)} {coef.dtype}"
        )
    return array_view(coef)


def _backward(dy, x, mean, invstd, weight, need_dx, need_dparams, y, train, coef=None):
    k = compiled()
    rows, c, s = _checked_layout(x)
    dy = _like(dy, x)  # (x's layout, so the loops may read it by address)
    cdt = _compute(x.dtype)
    xp = x.data_ptr()
    if coef is not None:  # the mask recomputed from x, bit for bit the forward's y > 0
        mp, relu, k2, floor = xp, True, _relu_coef(coef, c, cdt), RELU_FLOOR[x.dtype]
    elif y is not None:  # the mask read from the output (coefficients (1, 0), floor 0)
        y = _like(y, x)
        mp, relu, k2, floor = y.data_ptr(), True, _mask_of_output(c, _NP[cdt]), RELU_FLOOR[cdt]
    else:
        mp, relu, k2, floor = xp, False, _mask_of_output(c, _NP[cdt]), RELU_FLOOR[cdt]
    dx = _empty_like(x) if need_dx else None
    need_sums = need_dparams  # (also without a weight: a bias alone has its gradient)
    dgamma, dbeta = torch.empty(c, dtype=cdt), torch.empty(c, dtype=cdt)
    w, has_w = _param(weight, cdt, c)
    k.backward_at(
        dy.data_ptr(), xp, mp, relu, k2, floor, rows, c, s, _vec(mean, c), _vec(invstd, c), w,
        has_w, train, need_sums, 0 if dx is None else dx.data_ptr(), dgamma.data_ptr(),
        dbeta.data_ptr(), _NONE[x.dtype], dx is not None and _streams(dx),
    )  # fmt: skip
    if not need_sums:
        return dx, None, None
    # (in the compute dtype: x's, which is the weight's, or float32 for bfloat16)
    return dx, dgamma, dbeta


def batch_norm_train_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
    y: Tensor | None = None,
    coef: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Section 3 gradients, fused: one pass for the per-channel sums, one for dx::

        g       = dy            (or dy * (y > 0) when y, the fused ReLU output, is given)
        dbeta   = sum g,        dgamma = invstd * sum g (x - mu)
        dx      = gamma invstd (g - dbeta / m - (x - mu) invstd^2 sum g (x - mu) / m)

    Same contract as :func:`bnlab.functional.batch_norm_train_backward`; mean/invstd as returned
    by :func:`batch_norm_train_forward` (x's dtype). For the fused ReLU give either its output
    ``y`` or, instead, the forward's coefficients ``coef`` (``return_coef``): the mask is then
    recomputed from x, bit for bit the forward's ``y > 0``, and the output need not be kept.
    """
    return _backward(dy, x, mean, invstd, weight, need_dx, need_dparams, y, True, coef)


def batch_norm_eval_backward(
    dy: Tensor,
    x: Tensor,
    running_mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
    y: Tensor | None = None,
    coef: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the inference transform (statistics constant), fused::

    dx = g * gamma * invstd,   dgamma = invstd * sum g (x - E[x]),   dbeta = sum g

    ``y`` or ``coef``: the fused ReLU's mask, as in :func:`batch_norm_train_backward`.
    """
    return _backward(dy, x, running_mean, invstd, weight, need_dx, need_dparams, y, False, coef)


def commit_supported(*stats: Tensor | None) -> bool:
    """True if :func:`commit_batch_stats` takes these (C,) statistics and buffers: CPU, float32 or
    float64, contiguous, not negative views (``None`` buffers allowed)."""
    for t in stats:  # (a loop, not all() over a generator: this runs on every training call)
        if t is not None and not (
            t.is_cpu and t.dtype in _DTYPES and t.is_contiguous() and not t.is_neg()
        ):
            return False
    return True


def commit_batch_stats(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    m: int,
    update: bool,
) -> bool:
    """:func:`bnlab.functional.commit_running_stats` in one compiled call (finiteness check, count,
    both moving averages; as there, the counter counted whenever given and, without one,
    momentum None a factor of 0): False, touching nothing, for non-finite statistics.
    ``momentum`` is None (cumulative average) or a finite real number of any sign or size."""
    has = running_mean is not None
    if has and not (running_mean.numel() == running_var.numel() == var.numel() == mean.numel()):
        raise ValueError(f"fused kernels: running statistics of {running_mean.numel()} and "
                         f"{running_var.numel()} values for {mean.numel()} channels")  # fmt: skip
    empty = _NONE[mean.dtype]
    count = num_batches_tracked is not None
    # (no counter and momentum None: torch's factor is 0, the averages stay as they are)
    averages = bool(update and has and (count or momentum is not None))
    if not averages:
        nbt = _NO_COUNT  # (not written)
    elif count:
        nbt = array_view(num_batches_tracked)
    else:  # (no counter: a scratch one for the loop to count)
        nbt = np.zeros((), np.int64)
    ok = compiled().commit_stats(
        array_view(mean), array_view(var),
        array_view(running_mean) if has else empty, array_view(running_var) if has else empty, nbt,
        averages, momentum is None, 0.0 if momentum is None else float(momentum), float(m),
    )  # fmt: skip
    if ok and averages:  # (written through their memory: autograd is told, as by an in-place op)
        increment_version((running_mean, running_var) + ((num_batches_tracked,) if count else ()))
    elif ok and update and count:  # (no averages to update: the counter alone, as torch counts)
        num_batches_tracked.add_(1)
    return ok


WARM_DTYPES = (*_DTYPES, torch.bfloat16)  # (bfloat16 with float32 parameters)


def warm_up(processes: int = 1) -> None:
    """Compile (or load from the on-disk cache) every kernel: float32 and float64 inputs, and
    bfloat16 ones with float32 parameters, both layouts, and the gradient's relayout of
    :func:`to_channels_inner` for 2-, 4- and 8-byte values. Compiling a public kernel compiles the
    loops it calls, serial and parallel alike, whatever the input's size; one call above
    ``SERIAL_MAX`` values also starts Numba's thread pool.

    Numba compiles on one core. With ``processes`` > 1 the dtypes are first compiled in up to
    that many fresh Python processes at once (one or more dtypes each), which write Numba's
    on-disk cache under its directory lock (:mod:`bnlab.kernels._cache_lock`); this process
    then loads them. A process that fails only costs time: what it did not write is compiled
    here, where any error is raised."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"warm_up: processes must be a positive int, got {processes!r}")
    compiled()
    from . import _cache_lock

    if processes > 1 and _cache_lock.install():
        _warm_up_in_processes(processes)
    _warm_up_dtypes(WARM_DTYPES)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):  # (2, 4 and 8 bytes)
        to_channels_inner(torch.zeros(2, 3, 4, dtype=dtype))
    # run the parallel loops once (above SERIAL_MAX values): starts Numba's thread pool
    x = torch.randn(compiled().SERIAL_MAX // 3 + 1, 3)
    w = torch.ones(3)
    y, mean, _, inv = batch_norm_train_forward(x, w, w, 1e-5, relu=True)
    batch_norm_train_backward(y, x, mean, inv, w, y=y)


def _warm_up_dtypes(dtypes) -> None:
    """The per-dtype part of :func:`warm_up`."""
    for dtype in dtypes:
        cdt = _compute(dtype)
        for shape in [(4, 3), (2, 3, 4), (2, 3, 2, 2)]:
            for cl in (False, len(shape) == 4):
                x = torch.randn(shape).to(dtype)
                if cl:
                    x = x.permute(0, *range(2, x.dim()), 1).contiguous()
                    x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
                w = torch.ones(shape[1], dtype=cdt)
                y, mean, _, inv = batch_norm_train_forward(x, w, w, 1e-5, relu=True)
                batch_norm_train_backward(y, x, mean, inv, w, y=y)
                ye, inv = batch_norm_eval_forward(x, mean, inv, w, None, 1e-5)
                batch_norm_eval_backward(ye, x, mean, inv, w)
                eval_forward_fast(x, mean, inv, w, None, 1e-5, False)
        rm, rv = torch.zeros(3, dtype=cdt), torch.ones(3, dtype=cdt)
        commit_batch_stats(mean, inv, rm, rv, torch.tensor(0), None, 4, True)


def _warm_up_in_processes(processes: int) -> None:
    """Run :func:`_warm_up_dtypes` for ``WARM_DTYPES`` split over up to ``processes`` fresh
    processes, all at once; warn (and go on) when one fails."""
    import subprocess
    import sys
    import warnings

    groups = [WARM_DTYPES[i::processes] for i in range(min(processes, len(WARM_DTYPES)))]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    children = []
    for group in groups:
        names = ", ".join(str(d) for d in group)  # ("torch.float32", ...)
        code = ("import torch\nfrom bnlab.kernels import _warm_up_dtypes\n"
                f"_warm_up_dtypes([{names}])")  # fmt: skip
        children.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True))  # fmt: skip
    for group, child in zip(groups, children, strict=True):
        _, err = child.communicate()
        if child.returncode != 0:
            warnings.warn(f"bnlab.kernels.warm_up: the process compiling {list(group)} failed "
                          f"(exit {child.returncode}); compiling here instead:\n{err[-2000:]}",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
