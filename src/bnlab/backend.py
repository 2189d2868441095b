"""Backend dispatch: the fused CPU kernels (:mod:`bnlab.kernels`) or the reference path
(:mod:`bnlab.functional`), for the training transform (Algorithm 1), the inference transform
(Algorithm 2) and their section 3 gradients, optionally followed by a ReLU.

Backends (process-wide; :func:`use_backend` sets one for a ``with`` block)::

    "auto"       fused kernels when they take the input (CPU, float32/float64, contiguous or
                 channels_last, parameters of the input's dtype: :func:`bnlab.kernels.
                 unsupported_reason`) and Numba is installed; for a bfloat16/float16 input
                 (with parameters of its dtype or float32, as under ``torch.autocast``) the
                 same kernels in float32 (path "fused32": statistics and arithmetic in
                 float32, the output rounded to the input's dtype; a bfloat16 tensor is read
                 and written by the kernels as it is, a float16 one converted once each way,
                 since a bfloat16 value widens to float32 by a shift and float16 does not);
                 the reference
                 path otherwise (other devices, other strides)
    "fused"      fused kernels only; an unsupported input raises ValueError naming the reason
    "reference"  always the pure-torch functions of bnlab.functional

The default is ``"auto"``, or the value of the ``BNLAB_BACKEND`` environment variable.

The choice is made once per forward call and recorded for its backward, so a forward and its
backward always run on the same path ("fused", "fused32" or "reference"). Functions here have
the signatures of :mod:`bnlab.functional` plus ``relu`` (forward) / ``y`` (backward: the ReLU
output, whose mask ``y > 0`` gates ``dy``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from . import functional as F
from . import kernels as K

__all__ = [
    "BACKENDS",
    "set_backend",
    "get_backend",
    "kernels_enabled",
    "use_backend",
    "choose",
    "train_forward",
    "train_backward",
    "lean_plan",
    "eval_forward",
    "eval_backward",
    "commit_stats",
]

BACKENDS = ("auto", "fused", "reference")
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"bnlab backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "fused" and not _HAVE_NUMBA:
        raise ValueError("bnlab backend 'fused' needs numba, which is not installed")
    return name


_backend = _check(os.environ.get("BNLAB_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"fused"`` or ``"reference"`` for every bnlab batch-norm call."""
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    """The selected backend name."""
    return _backend


def kernels_enabled() -> bool:
    """True when compiled kernels may be used: Numba is installed and the backend is not
    "reference". Code that calls compiled loops itself (rather than through the functions here)
    asks this, so that ``use_backend("reference")`` reaches it too."""
    return _backend != "reference" and _HAVE_NUMBA


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...`` selects a backend for the block, then restores."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def choose(x: Tensor, *params: Tensor | None) -> str:
    """The path ("fused", "fused32" or "reference") a call on ``x`` with these
    parameters/statistics takes under the selected backend. ValueError under "fused" when the
    kernels cannot take it (in its dtype or, for a 16-bit float input, in float32)."""
    if _backend == "reference" or not _HAVE_NUMBA:
        return "reference"
    reason = K.unsupported_reason(x, *params)
    if reason is None:
        return "fused"
    if x.dtype in _HALF and _upcast_reason(x, params) is None:
        return "fused32"
    if _backend == "fused":
        raise ValueError(
            f"bnlab backend 'fused' cannot take this input: {reason}; "
            "use set_backend('auto') to fall back to the reference path"
        )
    return "reference"


_HALF = (torch.float16, torch.bfloat16)


def _upcast_reason(x: Tensor, params: tuple[Tensor | None, ...]) -> str | None:
    """Why a 16-bit float CPU input cannot take the kernels in float32, or None: every
    parameter or statistic is of x's dtype or float32 and on the CPU, and x's shape and strides
    are ones the kernels take (its float32 copy keeps them)."""
    if not x.is_cpu:
        return f"device {x.device} (CPU only)"
    reason = K.subclass_reason(x, params)
    if reason is not None:
        return reason
    for p in params:
        if p is not None and (p.dtype not in (x.dtype, torch.float32) or not p.is_cpu):
            return f"a parameter/statistic of dtype {p.dtype} on {p.device}"
        if p is not None and p.is_neg():
            return f"a parameter/statistic that is {K._NEG}"
    return K.layout_reason(x)


def _f32(t: Tensor | None) -> Tensor | None:
    """``t`` as float32 (itself if it is; None stays None)."""
    return t if t is None or t.dtype == torch.float32 else t.float()


def _in32(t: Tensor) -> Tensor:
    """A 16-bit tensor as the kernels take it on the ``fused32`` path: bfloat16 as it is (the
    kernels widen each value exactly), float16 converted to float32."""
    return t if t.dtype == torch.bfloat16 else t.float()


def _grads32(dy: Tensor, x: Tensor, y: Tensor | None) -> tuple:
    """``(dy, x, y)`` as the kernels take them in a ``fused32`` backward: a bfloat16 x with a
    bfloat16 dy as they are (autograd hands a bfloat16 output's backward a bfloat16 gradient),
    anything else converted to float32."""
    if x.dtype == torch.bfloat16 and dy.dtype == torch.bfloat16:
        return dy, x, y
    return dy.float(), x.float(), None if y is None else y.float()


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool = False,
    keep_mask: bool = False,
) -> tuple:
    """Algorithm 1 [+ ReLU] on the chosen path. Returns ``(path, y, mean, var, invstd)``; with
    ``keep_mask`` a sixth value, what :func:`train_backward` takes as ``mask`` (None without
    ``relu``): where the kernels read x as it is (the fused path, and the fused32 path of a
    bfloat16 x) the forward's (2, C) normalize coefficients (the mask is recomputed from x, and
    the output need not be kept), elsewhere the output."""
    path = choose(x, weight, bias)
    coef_kept = keep_mask and relu and mask_from_coef(path, x)
    coef: list[Tensor] = []
    if path == "fused":
        y, mean, var, invstd, *coef = K.batch_norm_train_forward(
            x, weight, bias, eps, relu=relu, return_coef=coef_kept
        )
    elif path == "fused32":
        y, mean, var, invstd, *coef = K.batch_norm_train_forward(
            _in32(x), _f32(weight), _f32(bias), eps, relu=relu, return_coef=coef_kept
        )
        y = y.to(x.dtype)
    else:
        y, mean, var, invstd = F.batch_norm_train_forward(x, weight, bias, eps)
        if relu:
            y = y.clamp_min_(0)
        y = F.standard_strides(y)  # (torch's strides, as the kernels' outputs have)
    if not keep_mask:
        return path, y, mean, var, invstd
    return path, y, mean, var, invstd, coef[0] if coef else (y if relu else None)


def mask_from_coef(path: str, x: Tensor) -> bool:
    """Whether a fused ReLU on ``path`` recomputes its mask from x with the forward's normalize
    coefficients (the kernels' ``coef``) rather than reading it from the output: where the
    kernels read x as it is, the fused path and the fused32 path of a bfloat16 x (a float16 x is
    read through a float32 copy, whose mask could differ from that of the rounded output)."""
    return path == "fused" or (path == "fused32" and x.dtype == torch.bfloat16)


def _relu_mask(dy: Tensor, y: Tensor | None) -> Tensor:
    """dL/d(BN output) from dL/dy through y = max(., 0): dy where y > 0, else 0."""
    return dy if y is None else torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype))


def _from32(x: Tensor, weight: Tensor | None, grads: tuple) -> tuple:
    """Gradients computed in float32 for a 16-bit input: dx in x's dtype, dgamma/dbeta in the
    weight's (the ``fused32`` path)."""
    dx, dgamma, dbeta = grads
    if dx is not None:
        dx = dx.to(x.dtype)
    if weight is not None and dgamma is not None:
        dgamma, dbeta = dgamma.to(weight.dtype), dbeta.to(weight.dtype)
    return dx, dgamma, dbeta


def train_backward(
    path: str,
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
    y: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Algorithm 1 on the path the forward took; ``y`` is the ReLU output or None,
    or ``mask`` is what :func:`train_forward` kept for it (``keep_mask``)."""
    coef = mask if mask_from_coef(path, x) else None
    if mask is not None and coef is None:
        y = mask
    if path == "fused":
        return K.batch_norm_train_backward(
            dy, x, mean, invstd, weight, need_dx=need_dx, need_dparams=need_dparams, y=y,
            coef=coef,
        )  # fmt: skip
    if path == "fused32":
        g, x32, y32 = _grads32(dy, x, y)
        return _from32(x, weight, K.batch_norm_train_backward(
            g, x32, mean, invstd, _f32(weight), need_dx=need_dx, need_dparams=need_dparams,
            y=y32, coef=coef,
        ))  # fmt: skip
    return F.batch_norm_train_backward(
        _relu_mask(dy, y), x, mean, invstd, weight, need_dx=need_dx, need_dparams=need_dparams
    )


def eval_fast(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool = False,
    views: list | None = None,
) -> Tensor | None:
    """The fused inference forward of a common eager call (:func:`K.eval_forward_fast`, with
    its cache ``views``), or None when the reference backend is selected or the call is not a
    common one; the caller then takes :func:`eval_forward`'s general path."""
    if _backend == "reference" or not _HAVE_NUMBA:
        return None
    return K.eval_forward_fast(x, running_mean, running_var, weight, bias, eps, relu, views)


new_views = K.new_views  # (the cache the lean calls keep between calls)


def lean_plan(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    views: list | None = None,
):
    """The plan of a lean fused call (:func:`K.lean_plan`: a training call with the counter
    ``num_batches_tracked``, an inference call without; ``views`` its cache), or None when the
    reference backend is selected or the call is not a common one; the caller then takes the
    general path (:func:`train_forward`, :func:`eval_forward`)."""
    if _backend == "reference" or not _HAVE_NUMBA:
        return None
    return K.lean_plan(x, weight, bias, running_mean, running_var, num_batches_tracked, views)


def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool = False,
    keep_mask: bool = False,
    reference: bool = False,
) -> tuple:
    """Algorithm 2 [+ ReLU] on the chosen path (``reference``: the reference path, in standard
    ops, whatever the backend). Returns ``(path, y, invstd)``, and with ``keep_mask`` the
    ReLU's ``mask`` for :func:`eval_backward` as :func:`train_forward` does."""
    path = "reference" if reference else choose(x, running_mean, running_var, weight, bias)
    coef_kept = keep_mask and relu and mask_from_coef(path, x)
    coef: list[Tensor] = []
    if path == "fused":
        y, invstd, *coef = K.batch_norm_eval_forward(
            x, running_mean, running_var, weight, bias, eps, relu=relu, return_coef=coef_kept,
        )  # fmt: skip
    elif path == "fused32":
        y, invstd, *coef = K.batch_norm_eval_forward(
            _in32(x), _f32(running_mean), _f32(running_var), _f32(weight), _f32(bias), eps,
            relu=relu, return_coef=coef_kept,
        )  # fmt: skip
        y = y.to(x.dtype)
    else:
        y, invstd = F.batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps)
        if relu:
            y = y.clamp_min_(0)
        y = F.standard_strides(y)  # (torch's strides, as the kernels' outputs have)
    if not keep_mask:
        return path, y, invstd
    return path, y, invstd, coef[0] if coef else (y if relu else None)


def eval_backward(
    path: str,
    dy: Tensor,
    x: Tensor,
    running_mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
    y: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the inference transform on the path the forward took (``y``, ``mask``: as
    in :func:`train_backward`)."""
    coef = mask if mask_from_coef(path, x) else None
    if mask is not None and coef is None:
        y = mask
    if path == "fused":
        return K.batch_norm_eval_backward(
            dy, x, running_mean, invstd, weight, need_dx=need_dx, need_dparams=need_dparams, y=y,
            coef=coef,
        )  # fmt: skip
    if path == "fused32":
        g, x32, y32 = _grads32(dy, x, y)
        return _from32(x, weight, K.batch_norm_eval_backward(
            g, x32, _f32(running_mean), invstd, _f32(weight), need_dx=need_dx,
            need_dparams=need_dparams, y=y32, coef=coef,
        ))  # fmt: skip
    return F.batch_norm_eval_backward(
        _relu_mask(dy, y), x, running_mean, invstd, weight, need_dx=need_dx,
        need_dparams=need_dparams,
    )  # fmt: skip


def commit_stats(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    m: int,
    update: bool,
    reference: bool = False,
) -> bool:
    """:func:`bnlab.functional.commit_running_stats` (finiteness check, then the moving averages
    when ``update``), in one compiled call when the kernels take the tensors (CPU float32/float64;
    backend not "reference", nor ``reference`` asked), else with tensor ops. False, touching
    nothing, for non-finite statistics; an empty batch (``m = 0``) is only counted."""
    args = (mean, var, running_mean, running_var, num_batches_tracked, momentum, m, update)
    if (
        m > 0
        and not reference
        and _backend != "reference"
        and _HAVE_NUMBA
        and K.commit_supported(mean, var, running_mean, running_var)
    ):
        return K.commit_batch_stats(*args)
    return F.commit_running_stats(*args)
