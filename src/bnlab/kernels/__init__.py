"""Fused CPU batch-norm kernels with the contract of :mod:`bnlab.functional`.

Ioffe & Szegedy (2015): Algorithm 1 (training forward), Algorithm 2 (inference forward) and the
section 3 gradients, each as one Numba call that makes as few passes over memory as possible:

* training forward: one read of x for the statistics (shifted float64 sums in blocks merged
  with Chan's formula, see :mod:`bnlab.kernels._numba`), one read of x and one write of y to
  normalize (~1.5x a copy);
* backward: one read of x and dy for the two per-channel sums ``sum g`` and
  ``sum g (x - mu)``, one read of x and dy and one write of dx (~2.5x a copy);
* inference forward: one read, one write.

Every function also takes ``relu``: the output is ``max(BN(x), 0)`` and the backward masks ``dy``
with ``y > 0`` (the fused BN+ReLU). Supported inputs are decided by :func:`supports`: a CPU float32
or float64 tensor, contiguous (``(N, C)``, ``(N, C, *spatial)``) or channels_last
(``(N, *spatial, C)`` in memory), with parameters/statistics of the same dtype. Shapes and
statistic dtypes are those of :mod:`bnlab.functional` (statistics in the input's dtype).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "supports",
    "unsupported_reason",
    "batch_norm_train_forward",
    "batch_norm_train_backward",
    "batch_norm_eval_forward",
    "batch_norm_eval_backward",
    "commit_supported",
    "commit_batch_stats",
    "batch_norm_train_forward_commit",
    "grouped_cross_entropy",
    "DenseTrainStep",
    "warm_up",
]

_DTYPES = (torch.float32, torch.float64)


def _k():
    """The compiled loops, imported on first use (importing numba costs ~0.3 s)."""
    from . import _numba

    return _numba


def _kernel_view(t: Tensor) -> tuple[Tensor, str] | None:
    """A copy-free view of ``t`` as ``(N, C, S)`` ("ncs") or ``(M, C)`` ("mc"), or None."""
    if t.dim() == 2 and t.is_contiguous():  # the dense case, first: no view call (~2 us)
        return t, "mc"
    n, c = t.shape[0], t.shape[1]
    if t.is_contiguous():
        s = math.prod(t.shape[2:])
        if s == 1:
            return t.view(n, c), "mc"
        return t.view(n, c, s), "ncs"
    if t.dim() >= 3:
        p = t.permute(0, *range(2, t.dim()), 1)  # channels last in memory?
        if p.is_contiguous():
            return p.view(-1, c), "mc"
    return None


def unsupported_reason(x: Tensor, *params: Tensor | None) -> str | None:
    """Why the fused kernels cannot take ``x`` (and same-dtype ``params``), or None if they can."""
    # (cheap tests first: this runs on every call, and small layers feel each microsecond)
    if not x.is_cpu:
        return f"device {x.device} (CPU only)"
    dtype = x.dtype
    if dtype not in _DTYPES:
        return f"dtype {dtype} (float32/float64 only)"
    if x.dim() < 2 or x.numel() == 0:
        return f"shape {tuple(x.shape)} (need (N, C, ...) with N*C > 0)"
    for p in params:
        if p is not None and (p.dtype != dtype or not p.is_cpu):
            return (
                f"a parameter/statistic of dtype {p.dtype} on {p.device} for an input of "
                f"dtype {dtype} on the CPU"
            )
    if not (x.dim() == 2 and x.is_contiguous()) and _kernel_view(x) is None:
        return f"strides {x.stride()} (contiguous or channels_last only)"
    return None


def supports(x: Tensor, *params: Tensor | None) -> bool:
    """True if the fused kernels handle ``x`` with these parameters (:func:`unsupported_reason`)."""
    return unsupported_reason(x, *params) is None


def _np(t: Tensor):
    """numpy view of a CPU tensor (detach only when needed: ~1.5 us per call saved)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with exactly x's strides (a copy only if they differ, e.g. an expanded dy)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


_NONE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _param(p: Tensor | None, dtype: torch.dtype):
    """numpy view of a (C,) parameter, or an empty placeholder of the dtype when absent."""
    if p is None:
        return _NONE[dtype], False
    return _np(p if p.is_contiguous() else p.contiguous()), True


def batch_norm_train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1, fused. Returns ``(y, mean, var, invstd)``: y like x (same strides), (C,)
    statistics in x's dtype, ``var`` biased. With ``relu``, ``y = max(BN(x), 0)``."""
    k = _k()
    xv, kind = _kernel_view(x)
    y = torch.empty_like(x)
    yv = y if xv is x else _kernel_view(y)[0]
    stats = torch.empty(6, x.shape[1], dtype=x.dtype)  # mean, var, invstd, 3 coefficients
    w, has_w = _param(weight, x.dtype)
    b, has_b = _param(bias, x.dtype)
    if kind == "ncs":
        fn = k.train_fwd_ncs
    else:
        fn = k.train_fwd_small if x.numel() <= k.SMALL else k.train_fwd_mc
    fn(_np(xv), w, b, has_w, has_b, float(eps), bool(relu), yv.numpy(), stats.numpy())
    return y, stats[0], stats[1], stats[2]


def batch_norm_eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool = False,
) -> tuple[Tensor, Tensor]:
    """Algorithm 2, fused: ``y = (x - E[x]) * gamma / sqrt(Var[x] + eps) + beta`` in one pass.
    Returns ``(y, invstd)``."""
    k = _k()
    xv, kind = _kernel_view(x)
    y = torch.empty_like(x)
    stats = torch.empty(4, x.shape[1], dtype=x.dtype)  # invstd, 3 coefficients
    w, has_w = _param(weight, x.dtype)
    b, has_b = _param(bias, x.dtype)
    fn = k.eval_fwd_ncs if kind == "ncs" else k.eval_fwd_mc
    fn(
        _np(xv), _np(running_mean.contiguous()), _np(running_var.contiguous()), w, b,
        has_w, has_b, float(eps), bool(relu), _np(_kernel_view(y)[0]), _np(stats),
    )  # fmt: skip
    return y, stats[0]


def _backward(dy, x, mean, invstd, weight, need_dx, need_dparams, y, train):
    k = _k()
    xv, kind = _kernel_view(x)
    shape = xv.shape
    dyv = _like(dy, x).view(shape) if kind == "ncs" else _kernel_view(_like(dy, x))[0]
    yv = xv if y is None else (_kernel_view(_like(y, x))[0])
    need_sums = need_dparams and weight is not None
    dx = torch.empty_like(x) if need_dx else None
    dxv = _np(_kernel_view(dx)[0]) if need_dx else _NONE[x.dtype].reshape((0,) * len(shape))
    grads = torch.empty(2, x.shape[1], dtype=x.dtype)  # dgamma, dbeta
    w, has_w = _param(weight, x.dtype)
    if kind == "ncs":
        fn = k.backward_ncs
    else:
        fn = k.backward_small if x.numel() <= k.SMALL else k.backward_mc
    fn(
        _np(dyv), _np(xv), _np(yv), y is not None,
        _np(mean if mean.is_contiguous() else mean.contiguous()),
        _np(invstd if invstd.is_contiguous() else invstd.contiguous()),
        w, has_w, train, need_sums, need_dx, dxv, grads.numpy(),
    )  # fmt: skip
    if not need_sums:
        return dx, None, None
    return dx, grads[0], grads[1]  # in x's dtype, which is the weight's (see supports)


def batch_norm_train_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
    y: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Section 3 gradients, fused: one pass for the per-channel sums, one for dx::

        g       = dy            (or dy * (y > 0) when y, the fused ReLU output, is given)
        dbeta   = sum g,        dgamma = invstd * sum g (x - mu)
        dx      = gamma invstd (g - dbeta / m - (x - mu) invstd^2 sum g (x - mu) / m)

    Same contract as :func:`bnlab.functional.batch_norm_train_backward`; mean/invstd as returned
    by :func:`batch_norm_train_forward` (x's dtype).
    """
    return _backward(dy, x, mean, invstd, weight, need_dx, need_dparams, y, True)


def batch_norm_eval_backward(
    dy: Tensor,
    x: Tensor,
    running_mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
    y: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the inference transform (statistics constant), fused::

    dx = g * gamma * invstd,   dgamma = invstd * sum g (x - E[x]),   dbeta = sum g
    """
    return _backward(dy, x, running_mean, invstd, weight, need_dx, need_dparams, y, False)


_NO_COUNT = np.zeros((), np.int64)


def commit_supported(*stats: Tensor | None) -> bool:
    """True if :func:`commit_batch_stats` takes these (C,) statistics and buffers: CPU, float32 or
    float64, contiguous (``None`` buffers allowed)."""
    return all(
        t is None or (t.is_cpu and t.dtype in _DTYPES and t.is_contiguous()) for t in stats
    )


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
    both moving averages): False, touching nothing, for non-finite statistics. ``momentum`` is
    None (cumulative average) or a finite real number of any sign or size."""
    has = running_mean is not None
    empty = _NONE[mean.dtype]
    return _k().commit_stats(
        mean.detach().numpy(), var.detach().numpy(),
        running_mean.numpy() if has else empty, running_var.numpy() if has else empty,
        num_batches_tracked.numpy() if has else _NO_COUNT, bool(update and has),
        momentum is None, 0.0 if momentum is None else float(momentum), float(m),
    )  # fmt: skip


def batch_norm_train_forward_commit(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    update: bool,
) -> tuple[bool, Tensor, Tensor, Tensor, Tensor]:
    """:func:`batch_norm_train_forward` then :func:`commit_batch_stats`, as one compiled call for
    a small dense input (the layers of an MLP, where each crossing into compiled code costs
    about as much as the arithmetic). Returns ``(ok, y, mean, var, invstd)``; ``ok`` False
    means non-finite statistics, running buffers untouched (y is then undefined)."""
    has = running_mean is not None
    if not (
        x.dim() == 2
        and x.is_contiguous()
        and x.numel() <= _k().SMALL
        and commit_supported(running_mean, running_var)
    ):
        y, mean, var, invstd = batch_norm_train_forward(x, weight, bias, eps, relu)
        m = x.numel() // x.shape[1]
        ok = commit_batch_stats(
            mean, var, running_mean, running_var, num_batches_tracked, momentum, m, update
        )
        return ok, y, mean, var, invstd
    y = torch.empty_like(x)
    stats = torch.empty(6, x.shape[1], dtype=x.dtype)  # as batch_norm_train_forward
    w, has_w = _param(weight, x.dtype)
    b, has_b = _param(bias, x.dtype)
    empty = _NONE[x.dtype]
    ok = _k().train_fwd_commit_small(
        _np(x), w, b, has_w, has_b, float(eps), bool(relu), y.numpy(), stats.numpy(),
        running_mean.numpy() if has else empty, running_var.numpy() if has else empty,
        num_batches_tracked.numpy() if has else _NO_COUNT, bool(update and has),
        momentum is None, 0.0 if momentum is None else float(momentum),
    )  # fmt: skip
    return ok, y, stats[0], stats[1], stats[2]


def _layout(t: Tensor | None) -> tuple | None:
    """What a numpy view of ``t`` depends on: its storage address, dtype and shape."""
    return None if t is None else (t.data_ptr(), t.dtype, t.shape)


class DenseTrainStep:
    """Repeated training-mode calls on one small dense ``(N, C)`` input buffer ``x``, which the
    caller refills between calls: :func:`batch_norm_train_forward_commit` and the training
    backward, with the same compiled kernels (same numbers), minus the per-call overhead that
    dominates at this size (the stacked MLP's hidden layers, 50,000 steps).

    Cached, and why it stays valid:

    * the outputs ``y``, ``dx``, the statistics (``mean``, ``var``, ``invstd``) and the parameter
      gradients (``dgamma``, ``dbeta``) are allocated once and OVERWRITTEN by every call (results
      are valid until the next call), with numpy views of them and of ``x`` made once: these
      tensors belong to this object, so the views never go stale;
    * the numpy views of the caller's weight, bias and running buffers, made on first use and
      reused while the same tensor objects keep the same storage address, dtype and shape
      (checked on every call: ~0.2 us per tensor, against ~1 us per conversion). A replaced
      tensor (a new Parameter, ``model.double()`` swapping ``param.data``) is converted again;
      ``load_state_dict`` copies in place, so the views stay right.
    """

    def __init__(self, x: Tensor) -> None:
        if not self.takes(x):
            raise ValueError(f"DenseTrainStep: not a small dense CPU input: {tuple(x.shape)}")
        c = x.shape[1]
        self.x, self.y, self.dx = x, torch.empty_like(x), torch.empty_like(x)
        stats = torch.empty(6, c, dtype=x.dtype)  # mean, var, invstd, 3 coefficients
        grads = torch.empty(2, c, dtype=x.dtype)  # dgamma, dbeta
        self.mean, self.var, self.invstd = stats[0], stats[1], stats[2]
        self.dgamma, self.dbeta = grads[0], grads[1]
        self._x, self._y, self._dx = x.numpy(), self.y.numpy(), self.dx.numpy()
        self._stats, self._grads = stats.numpy(), grads.numpy()
        self._k = _k()  # the compiled kernels module
        self._tensors: tuple = ()  # weight, bias, running_mean, running_var, num_batches_tracked
        self._layouts: tuple = ()
        self._views: tuple | None = None
        self._dy: tuple = (None, None, None)  # the last dy, its layout and its numpy view

    @staticmethod
    def takes(x: Tensor) -> bool:
        """True for the inputs of the small dense kernels: CPU float32/float64 ``(N, C)``,
        contiguous, at most ``SMALL`` values, no autograd history."""
        return (
            x.is_cpu
            and x.dtype in _DTYPES
            and x.dim() == 2
            and x.is_contiguous()
            and 0 < x.numel() <= _k().SMALL
            and not x.requires_grad
        )

    def bind(self, weight, bias, running_mean, running_var, num_batches_tracked) -> bool:
        """Take these parameters and buffers for the next :meth:`forward_commit`; False (nothing
        bound) when the kernels cannot take them (another dtype or device, not contiguous)."""
        tensors = (weight, bias, running_mean, running_var, num_batches_tracked)
        layouts = tuple(_layout(t) for t in tensors)
        if layouts == self._layouts and all(
            a is b for a, b in zip(tensors, self._tensors, strict=True)
        ):
            return self._views is not None
        self._tensors, self._layouts, self._views = tensors, layouts, None
        dtype = self.x.dtype
        if unsupported_reason(self.x, weight, bias, running_mean, running_var) is not None or not (
            all(t is None or t.is_contiguous() for t in tensors[:4])
        ):
            return False
        has = running_mean is not None
        empty = _NONE[dtype]
        self._views = (
            _np(weight) if weight is not None else empty, weight is not None,
            _np(bias) if bias is not None else empty, bias is not None,
            running_mean.numpy() if has else empty, running_var.numpy() if has else empty,
            num_batches_tracked.numpy() if has else _NO_COUNT, has,
        )  # fmt: skip
        return True

    def forward_commit(self, eps: float, relu: bool, momentum: float | None, update: bool) -> bool:
        """:func:`batch_norm_train_forward_commit` of ``x`` with the bound tensors into ``y`` and
        the statistics; False: non-finite statistics, running buffers untouched."""
        w, has_w, b, has_b, rm, rv, nbt, has = self._views
        return self._k.train_fwd_commit_small(
            self._x, w, b, has_w, has_b, float(eps), bool(relu), self._y, self._stats,
            rm, rv, nbt, bool(update and has), momentum is None,
            0.0 if momentum is None else float(momentum),
        )  # fmt: skip

    def backward(self, dy: Tensor, relu: bool, need_dparams: bool) -> bool:
        """The training backward of the last :meth:`forward_commit` into ``dx`` (and ``dgamma``,
        ``dbeta`` when ``need_dparams`` and there is a weight: the return value), with the bound
        weight's values as of now. ``dy``: x's shape; its numpy view is reused while it is the
        same tensor."""
        weight = self._tensors[0]
        if _layout(weight) != self._layouts[0] and not self.bind(*self._tensors):
            raise RuntimeError("DenseTrainStep: the weight changed dtype or device since forward")
        if self._dy[0] is not dy or self._dy[1] != _layout(dy):
            if dy.shape != self.x.shape:
                raise ValueError(
                    f"DenseTrainStep: dy of shape {tuple(dy.shape)} for x of {tuple(self.x.shape)}"
                )
            dy = dy.to(self.x.dtype).contiguous()
            self._dy = (dy, _layout(dy), _np(dy))
        w, has_w = self._views[0], self._views[1]
        sums = need_dparams and has_w
        self._k.backward_small(
            self._dy[2], self._x, self._y if relu else self._x, relu, self._stats[0],
            self._stats[2], w, has_w, True, sums, True, self._dx, self._grads,
        )  # fmt: skip
        return sums


def grouped_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor] | None:
    """Mean softmax cross-entropy of each of K groups of N rows and its gradient in one compiled
    pass: ``logits (K, N, C)``, ``target (K, N)`` int64 -> ``(loss (K,), dL/dlogits (K, N, C))``
    with ``L = sum_k loss_k``. None when the kernel does not take the tensors (not CPU
    float32/float64 contiguous logits with int64 targets), so the caller uses tensor ops.
    ValueError for a target outside ``[0, C)``."""
    if not (
        logits.is_cpu
        and logits.dtype in _DTYPES
        and logits.dim() == 3
        and logits.is_contiguous()
        and target.dtype == torch.int64
        and target.is_contiguous()
    ):
        return None
    loss = torch.empty(logits.shape[0], dtype=logits.dtype)
    grad = torch.empty_like(logits)
    if not _k().grouped_cross_entropy(_np(logits), target.numpy(), loss.numpy(), grad.numpy()):
        raise ValueError(
            f"cross-entropy: a target is outside [0, {logits.shape[2]}) "
            f"(min {int(target.min())}, max {int(target.max())})"
        )
    return loss, grad


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel for float32 and float64."""
    for dtype in _DTYPES:
        for shape in [(4, 3), (2, 3, 4), (2, 3, 2, 2)]:
            for cl in (False, True):
                x = torch.randn(shape, dtype=dtype)
                if cl:
                    x = x.permute(0, *range(2, x.dim()), 1).contiguous()
                    x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
                w = torch.ones(shape[1], dtype=dtype)
                y, mean, _, inv = batch_norm_train_forward(x, w, w, 1e-5, relu=True)
                batch_norm_train_backward(y, x, mean, inv, w, y=y)
                ye, inv = batch_norm_eval_forward(x, mean, inv, w, None, 1e-5)
                batch_norm_eval_backward(ye, x, mean, inv, w)
        rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
        commit_batch_stats(mean, inv, rm, rv, torch.tensor(0), None, 4, True)
        batch_norm_train_forward_commit(
            torch.randn(4, 3, dtype=dtype), w, w, 1e-5, False, rm, rv, torch.tensor(0), 0.1, True
        )
        target = torch.zeros(2, 3, dtype=torch.int64)
        grouped_cross_entropy(torch.randn(2, 3, 4, dtype=dtype), target)
