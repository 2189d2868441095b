"""The Batch Normalizing Transform and its backward pass, as pure functions.

Ioffe & Szegedy (2015), Algorithm 1 (training) and Algorithm 2 (inference), with the gradients of
section 3. Nothing here owns state or knows about ``nn.Module``; :mod:`bnlab.autograd` wires these
functions into ``torch.autograd`` and :mod:`bnlab.layers` owns the running statistics.

Shapes. The input ``x`` is ``(N, C)`` or ``(N, C, *spatial)``. Statistics are per channel ``C``:
per activation for ``(N, C)`` and per feature map for ``(N, C, L)``, ``(N, C, H, W)``,
``(N, C, D, H, W)``, i.e. reduced over ``N`` and every spatial position, so each statistic is an
average over ``m = N * prod(spatial)`` values (the paper's section 3.2 "effective mini-batch").

Notation (Algorithm 1)::

    mu     = 1/m  sum_i x_i                    mini-batch mean
    var    = 1/m  sum_i (x_i - mu)^2           mini-batch variance (biased)
    x_hat  = (x - mu) / sqrt(var + eps)        normalize
    y      = gamma * x_hat + beta              scale and shift

Precision. Statistics and accumulations are carried in :func:`acc_dtype` (float32 for
float16/bfloat16 inputs, else the input's dtype); the output has the input's dtype. The variance is
computed from centred values (never ``E[x^2] - E[x]^2``), so an input with mean 1e4 and standard
deviation 1 keeps its precision in float32.

Memory format. Every operation is elementwise or a reduction over logical dimensions, so
channels_last inputs stay channels_last.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "batch_norm_train_forward",
    "batch_norm_train_backward",
    "batch_norm_eval_forward",
    "batch_norm_eval_backward",
    "check_momentum",
    "is_real_number",
    "commit_running_stats",
    "per_channel",
    "pivot_values",
    "reduce_dims",
    "scale_shift",
    "standard_layout",
    "standard_strides",
    "format_strides",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/statistics dtype for an input dtype: float32 for 16-bit floats, else itself."""
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return torch.float32
    return dtype


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it already has that dtype (a call per tensor per
    layer call is overhead that small layers feel)."""
    if t.dtype == dtype:
        return t
    return t.to(dtype)


def reduce_dims(x: Tensor) -> list[int]:
    """Dimensions reduced for per-channel statistics: N and every spatial dim (all but dim 1)."""
    return [0] + [d for d in range(2, x.dim())]


def per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so it broadcasts against x: (1, C, 1, ..., 1); (C,) already
    broadcasts against (N, C)."""
    if x.dim() == 2:
        return t
    return t.view([1, -1] + [1] * (x.dim() - 2))


def pivot_values(x: Tensor) -> Tensor:
    """The first value of each channel, (C,) in x's dtype: the shift of :func:`_centre`."""
    pivot = x.select(0, 0)  # (C, *spatial) -> (C,)
    for _ in range(x.dim() - 2):
        pivot = pivot.select(1, 0)
    return pivot


def _centre(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean (C,) and the centred values ``x - mean`` (x's shape), in acc dtype.

    Shifted two-pass: subtract a per-channel pivot (the channel's first value) first, so the
    values summed are small and their differences exact (Sterbenz), then centre on their mean::

        d = x - K;   mean = K + mean(d);   x - mean = d - mean(d)

    This keeps an input with mean 1e4 and std 1 accurate in float32, where E[x^2] - E[x]^2 or even
    a plain float32 mean of 1e4-sized values loses the digits that matter. ``x`` has at least one
    value per channel.
    """
    xa = _as(x, acc_dtype(x.dtype))
    pivot = pivot_values(xa)
    d = xa - per_channel(pivot, x)
    mean_d = d.mean(reduce_dims(x), keepdim=True)  # (1, C, 1, ...)
    xc = d - mean_d  # (out of place: decompositions must be functional)
    return pivot + mean_d.view(-1), xc


def batch_norm_train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1. Returns ``(y, mean, var, invstd)``; mean/var/invstd are (C,) in acc dtype.

    ``var`` is the biased mini-batch variance; the unbiased correction ``m / (m - 1)`` used for the
    population estimate (Algorithm 2, step 10) belongs to whoever updates running statistics.

    An empty batch (``N * prod(spatial) = 0``, which torch accepts) has no statistics: ``y`` is
    empty, mean 0 and var 1 are placeholders that nobody may commit (see
    :func:`commit_running_stats`), and y still depends on gamma and beta so that their gradients
    are zeros, as torch's.

    Written in TorchScript-compatible torch ops: it is also the decomposition that captured graphs
    (``torch.export``, ONNX, ``jit.trace``/``script``, ``torch.func``) contain.
    """
    if x.numel() == 0:
        c = x.shape[1]
        acc = acc_dtype(x.dtype)
        mean = torch.zeros(c, dtype=acc, device=x.device)
        var = torch.ones(c, dtype=acc, device=x.device)
        invstd = torch.rsqrt(var + eps)
        y = _as(scale_shift(_as(x, acc), invstd, weight, bias), x.dtype)
        return y, mean, var, invstd
    mean, xc = _centre(x)  # xc = x - mu
    var = (xc * xc).mean(reduce_dims(x))  # (C,)
    invstd = torch.rsqrt(var + eps)  # 1 / sqrt(var + eps), (C,)
    y = _as(scale_shift(xc, invstd, weight, bias), x.dtype)
    return y, mean, var, invstd


def scale_shift(xc: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = (x - mean) * (gamma * invstd) + beta, from the centred values ``xc``. Centring first
    (rather than folding the mean into the shift) keeps large-mean inputs exact."""
    scale = invstd if weight is None else invstd * _as(weight, invstd.dtype)
    if bias is None:
        return xc * per_channel(scale, xc)
    return torch.addcmul(per_channel(_as(bias, invstd.dtype), xc), xc, per_channel(scale, xc))


def batch_norm_eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Algorithm 2 (inference): normalize with population statistics E[x], Var[x].

    The transform is a fixed per-channel affine map ``y = gamma / sqrt(Var[x] + eps) * x +
    (beta - gamma * E[x] / sqrt(Var[x] + eps))``. Returns ``(y, invstd)``.
    """
    acc = acc_dtype(x.dtype)
    invstd = torch.rsqrt(_as(running_var, acc) + eps)
    xc = _as(x, acc) - per_channel(_as(running_mean, acc), x)
    y = _as(scale_shift(xc, invstd, weight, bias), x.dtype)
    return y, invstd


def batch_norm_train_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Algorithm 1 (the chain rule of section 3). Returns ``(dx, dgamma, dbeta)``.

    The paper writes, with ``m`` values per channel::

        dL/dx_hat = dL/dy * gamma
        dL/dvar   = sum_i dL/dx_hat_i * (x_i - mu) * (-1/2) * (var + eps)^(-3/2)
        dL/dmu    = sum_i dL/dx_hat_i * (-1 / sqrt(var + eps))
                    + dL/dvar * sum_i -2 (x_i - mu) / m          # second term is 0
        dL/dx_i   = dL/dx_hat_i / sqrt(var + eps) + dL/dvar * 2 (x_i - mu) / m + dL/dmu / m
        dL/dgamma = sum_i dL/dy_i * x_hat_i
        dL/dbeta  = sum_i dL/dy_i

    Substituting ``x_i - mu = x_hat_i / invstd`` and collecting terms gives the fused form used
    here, two per-channel sums and one elementwise pass::

        dL/dx_i = gamma * invstd / m * (m * dL/dy_i - dL/dbeta - x_hat_i * dL/dgamma)

    Sums are accumulated in ``acc_dtype``; dx has x's dtype, dgamma/dbeta the weight's dtype
    (without a weight ``acc_dtype``: a layer may have a bias alone).
    """
    acc = acc_dtype(x.dtype)
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    dya = _as(dy, acc)
    x_hat = (_as(x, acc) - per_channel(mean, x)) * per_channel(invstd, x)
    sum_dy = dya.sum(dims)  # dL/dbeta, (C,)
    sum_dy_xhat = (dya * x_hat).sum(dims)  # dL/dgamma, (C,)

    dx = None
    if need_dx:
        gamma = invstd if weight is None else invstd * _as(weight, acc)  # gamma * invstd, (C,)
        # dx = gamma*invstd * (dy - sum_dy/m - x_hat * sum_dy_xhat/m)
        dx = dya - per_channel(sum_dy / m, x)
        dx = dx.sub_(x_hat.mul_(per_channel(sum_dy_xhat / m, x)))
        dx = _as(dx.mul_(per_channel(gamma, x)), x.dtype)
    dgamma = dbeta = None
    if need_dparams:  # (also without a weight: a bias alone has its gradient)
        pdt = acc if weight is None else weight.dtype
        dgamma = _as(sum_dy_xhat, pdt)
        dbeta = _as(sum_dy, pdt)
    return dx, dgamma, dbeta


def batch_norm_eval_backward(
    dy: Tensor,
    x: Tensor,
    running_mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
    need_dparams: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the inference transform, where E[x] and Var[x] are constants::

    dL/dx     = dL/dy * gamma / sqrt(Var[x] + eps)
    dL/dgamma = sum_i dL/dy_i * x_hat_i,   dL/dbeta = sum_i dL/dy_i
    """
    acc = acc_dtype(x.dtype)
    dims = reduce_dims(x)
    dya = _as(dy, acc)
    dx = None
    if need_dx:
        scale = invstd if weight is None else invstd * _as(weight, acc)
        dx = _as(dya * per_channel(scale, x), x.dtype)
    dgamma = dbeta = None
    if need_dparams:  # (also without a weight: a bias alone has its gradient)
        pdt = acc if weight is None else weight.dtype
        x_hat = (_as(x, acc) - per_channel(_as(running_mean, acc), x)) * per_channel(invstd, x)
        dgamma = _as((dya * x_hat).sum(dims), pdt)
        dbeta = _as(dya.sum(dims), pdt)
    return dx, dgamma, dbeta


def is_real_number(value: object) -> bool:
    """Whether torch's batch norm reads ``value`` as a real number where it takes a float
    (momentum, eps): a Python or numpy real (a bool too), or a 0-d real tensor that does not
    require grad."""
    if type(value) is float or type(value) is int:  # (the common call, without the ABC check)
        return True
    if isinstance(value, torch.Tensor):
        return (
            value.dim() == 0
            and not value.requires_grad
            and not value.is_complex()
            and not value.is_meta
        )
    return isinstance(value, numbers.Real)


def check_momentum(momentum: object) -> float | None:
    """Refuse a momentum that cannot weigh a moving average, before any state is touched, and
    return it as a float (None stays None).

    Valid, as in ``torch.nn.BatchNorm`` (whose training forward passes it on as a number): None
    (cumulative average) or any finite real number, including values outside [0, 1] (the
    update ``(1 - f) * running + f * batch`` is defined for every ``f``): ``int``, ``float``,
    ``bool`` (True weighs the batch fully), numpy scalars, and a 0-d real tensor that does not
    require grad. TypeError for anything else (a string, a tensor of more dimensions or one
    that requires grad: torch counts the batch in ``num_batches_tracked`` before its update
    fails on them); ValueError for NaN or infinity (torch would write non-finite running
    statistics).
    """
    if momentum is None:
        return None
    if not is_real_number(momentum):
        raise TypeError(
            f"momentum must be None or a real number, got {type(momentum).__name__} "
            f"{momentum!r}"
        )
    value = float(momentum)
    # (math.isfinite as a comparison, which a compiler that made the momentum symbolic,
    # torch.compile(dynamic=True), can guard on)
    if not abs(value) < math.inf:
        raise ValueError(f"momentum must be finite, got {momentum!r}")
    return value


def shared_buffer(running_mean: Tensor | None, running_var: Tensor | None) -> str:
    """The name of the running statistic whose elements share memory (a stride of 0 over more
    than one element, as ``expand()`` makes), or "" if neither does. An in-place update refuses
    such a tensor, and its channels' averages would overwrite one another (torch's layer keeps
    the last channel's), so a training call refuses it before it writes anything."""
    names = ["running_mean", "running_var"]
    tensors = [running_mean, running_var]
    for k in range(2):
        t = tensors[k]
        if t is not None:
            sizes = t.size()
            strides = t.stride()
            for i in range(len(sizes)):
                if sizes[i] > 1 and strides[i] == 0:
                    return names[k]
    return ""


def shared_buffer_message(who: str, name: str) -> str:
    """The error for :func:`shared_buffer`'s ``name`` in a call by ``who``."""
    return (
        f"{who}: {name} has elements that share memory (a stride of 0, as expand() makes), so "
        f"its channels' running averages would overwrite one another; give it memory of its "
        f"own ({name}.clone()). Nothing was updated."
    )


def commit_running_stats(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    m: int,
    update: bool,
) -> bool:
    """Accept a batch's statistics: refuse non-finite ones, then fold them into the population
    estimates of Algorithm 2 as a moving average (``update``)::

        num_batches_tracked += 1
        f = momentum  (or 1 / num_batches_tracked when momentum is None: cumulative average)
        running_mean <- running_mean + f * (mu_B - running_mean)
        running_var  <- running_var  + f * (m / (m - 1) * sigma_B^2 - running_var)   (unbiased)

    As torch's layer does, the counter is counted whenever it is given (running averages or
    not), and without a counter a momentum of None means ``f = 0``.

    ``momentum`` is None or a finite real number (see :func:`check_momentum`; callers check it).
    Returns False, touching nothing, when ``var`` holds a NaN or Inf (it is computed from the
    centred input, so any NaN/Inf in the batch shows there; ``max`` propagates NaN: one reduction
    of C values).

    An empty batch (``m = 0``, which torch accepts in training) has no statistics: it is counted
    in ``num_batches_tracked`` and leaves the running averages as they are, as torch does. A
    running statistic whose elements share memory (:func:`shared_buffer`) raises RuntimeError
    before anything is written.
    """
    if update:
        shared = shared_buffer(running_mean, running_var)
        if shared:
            raise RuntimeError(shared_buffer_message("batch norm", shared))
    if m > 0 and not math.isfinite(float(var.detach().max())):
        return False
    if not update:
        return True
    with _updatable(running_mean, running_var, num_batches_tracked):
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        # (no counter and momentum None: torch's factor is 0, the averages stay as they are)
        if m > 0 and running_mean is not None and (momentum is not None or num_batches_tracked
                                                   is not None):  # fmt: skip
            f = 1.0 / float(num_batches_tracked.item()) if momentum is None else float(momentum)
            dtype = running_mean.dtype
            running_mean.lerp_(_as(mean.detach(), dtype), f)
            running_var.lerp_(_as(var.detach() * (m / (m - 1)), dtype), f)
    return True


def _updatable(*buffers: Tensor | None):
    """The context in which the buffers can be updated in place: inference mode if one of them
    is an inference tensor (made under ``torch.inference_mode()``, a model built there and
    trained outside it), which an in-place operation outside that mode refuses, else none. The
    fused kernels write such buffers through their memory, as torch's operator does under
    ``no_grad``; an update here either writes them all or, refused, none."""
    if not torch.is_inference_mode_enabled():
        for t in buffers:
            if t is not None and t.is_inference():
                return torch.inference_mode()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- output layout
def standard_layout(x: Tensor) -> Tensor:
    """``x`` in the memory layout torch's batch norm gives its output for ``x`` (eager, on the
    CPU), so that every path's output, which takes its input's layout, has torch's: ``x``
    itself when it is contiguous or channels_last (channels_last_3d), the common case (the
    outputs then get that format's own strides, see :func:`standard_strides`); for any other a
    copy in torch's format: channels_last if its strides look so as torch reads them (a slice of
    a channels_last tensor), else contiguous (a dense ``(N, L, C)`` tensor transposed to
    ``(N, C, L)``, say). Autograd records the copy, so gradients reach ``x`` as given."""
    if x.is_contiguous():
        return x
    shape = x.shape
    rank = len(shape)
    if rank not in (4, 5):
        return x.contiguous()
    fmt = _LAST[rank]
    if x.is_contiguous(memory_format=fmt):
        return x
    like = _strides_like_channels_last(shape, x.stride())
    return x.contiguous(memory_format=fmt if like else torch.contiguous_format)


def standard_strides(y: Tensor) -> Tensor:
    """``y``, contiguous or channels_last (channels_last_3d), with that format's own strides:
    ``y`` itself, or a view at the same addresses where a size-1 dimension's stride differs
    (as a channels_last ``(N, C, 1, 1)`` tensor's: torch's outputs have the contiguous ones);
    any other ``y`` as it is."""
    shape = y.shape
    if 1 not in shape:
        return y
    rank = len(shape)
    if y.is_contiguous():
        fmt = torch.contiguous_format
    elif rank in (4, 5) and y.is_contiguous(memory_format=_LAST[rank]):
        fmt = _LAST[rank]
    else:
        return y
    strides = format_strides(shape, fmt)
    if y.stride() == strides:
        return y
    return y.as_strided(shape, strides)


def format_strides(shape, fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides torch gives a tensor of ``shape`` in the memory format ``fmt``."""
    rank = len(shape)
    order = range(rank - 1, -1, -1)
    if fmt != torch.contiguous_format:
        order = (1, *range(rank - 1, 1, -1), 0)
    strides, step = [0] * rank, 1
    for d in order:
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _strides_like_channels_last(shape, strides) -> bool:
    """torch's reading of 4-D/5-D strides as channels_last (the channels innermost, then the
    spatial dimensions last to first, then the batch, each stride at least the extent of the
    ones inside it; ambiguous cases read as contiguous), which decides the layout of the
    output torch's batch norm makes for a tensor in neither format."""
    if strides[1] == 0:
        return False
    low = 0
    for d in (1, *range(len(shape) - 1, 1, -1), 0):
        if shape[d] == 0 or strides[d] < low:
            return False
        if d == 0 and low == strides[1]:
            return False
        low = strides[d] * (shape[d] if shape[d] > 1 else 1)
    return True
