"""Ghost Batch Normalization (Hoffer et al. 2017): ``GhostBatchNorm1d/2d/3d``.

In training mode the batch is cut along dim 0 into "ghost" (virtual) batches of
``virtual_batch_size`` examples, and each is normalized with its own statistics (Algorithm 1 of
Ioffe & Szegedy 2015 per ghost batch); the gradient is that of each ghost batch's BN. A large
batch then sees the normalization noise of small ones, which Hoffer et al. (section 4.1) use to
close the generalization gap of large-batch training; the same layer also simulates the
per-device statistics of data-parallel training (per-GPU BN) inside one process.

Ghost batches are consecutive: examples ``[0, v)``, ``[v, 2v)``, ...; a batch that is not a
multiple of ``v`` ends with a smaller ghost batch of the remaining examples, except that a
remainder with one value per channel (one example of an ``(N, C)`` input), which cannot be
normalized, joins the ghost batch before it. A batch of at most ``v`` examples is one ghost
batch: the layer is then exactly BatchNorm (statistics, output, gradient, running averages).

**Population statistics** are Algorithm 2's, with the ghost batches as the mini-batches: one
moving-average update per forward (same ``momentum`` meaning as BN, whatever ``v``), with

    mu_B     = mean of the whole batch         (= the count-weighted mean of the ghost means)
    var_unb  = sum_k sum_i (x_ki - mu_k)^2 / (M - K)     pooled within-ghost-batch variance

for ``K`` ghost batches of ``M`` values per channel in all; for ghost batches of equal size
``var_unb`` is the mean of their unbiased variances, Algorithm 2's ``m/(m-1) E_B[sigma_B^2]``.
So inference normalizes with the spread that training normalized with; it is BN's inference
transform, and :func:`bnlab.fold`, :func:`bnlab.freeze` and
:func:`bnlab.recompute_population_stats` treat the layer as BN (the latter, in its default
``mode="train"``, runs the ghost normalization while it collects).

State dict, constructor (+ ``virtual_batch_size``), checks and the refusal of non-finite
batches (``FloatingPointError`` naming the layer, no buffer changed) are BatchNorm's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..autograd import batch_norm_train
from ..ops import shape_text
from .batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_sizes"]


def ghost_sizes(n: int, virtual_batch_size: int, values_per_example: int = 2) -> list[int]:
    """Sizes of the consecutive ghost batches a batch of ``n`` examples is cut into: ``v``
    each and a smaller remainder, which joins the ghost batch before it when it would hold a
    single value per channel (``remainder * values_per_example == 1``)."""
    v = virtual_batch_size
    if n <= v:
        return [n]
    k, rest = divmod(n, v)
    sizes = [v] * k
    if rest and rest * values_per_example == 1:
        sizes[-1] += rest
    elif rest:
        sizes.append(rest)
    return sizes


class _GhostBatchNorm(_BatchNorm):
    """BatchNorm with statistics per ghost batch of ``virtual_batch_size`` examples in
    training (see the module docstring)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        virtual_batch_size: int = 32,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        v = virtual_batch_size
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size must be a positive int, got {v!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, activation=activation,
        )  # fmt: skip
        self.virtual_batch_size = v

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        weight, bias = self._affine()
        if torch.jit.is_scripting():
            name = self._describe()
        else:
            name = self._graph_describe()  # (a constant of the graph, when one is traced)
        return ghost_train(x, weight, bias, self.eps, self.activation, self.virtual_batch_size,
                           name)  # fmt: skip


@torch.fx.wrap  # (one node in a symbolic trace: the ghost batches depend on the batch's size)
def ghost_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None,
    virtual_batch_size: int,
    layer: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize each ghost batch of ``x`` with its own statistics (the module docstring);
    returns ``(y, mean, var)`` with the whole batch's mean and the biased-variance equivalent
    of the pooled within-ghost variance (``var * M / (M - 1) = var_unb``), which the
    running-average update expects. ``layer`` names the layer in errors."""
    # (Python ints: jit.trace gives sizes as tensors, and a trace is of one shape anyway)
    n, c, numel = int(x.shape[0]), int(x.shape[1]), int(x.numel())
    v = virtual_batch_size
    if n <= v or numel == 0:
        return batch_norm_train(x, weight, bias, eps, activation)
    per_example = numel // n // c
    if v * per_example == 1:
        raise ValueError(
            layer + ": virtual_batch_size=1 gives ghost batches of one value per channel for "
            "input of shape " + shape_text(list(x.shape)) + ", which cannot be normalized; "
            "use virtual_batch_size >= 2"
        )
    # the ghost batches of ghost_sizes(n, v, per_example): `full` of v examples, then `rest`
    # (counted, not listed, so that a compiler with a symbolic n guards on the remainder's
    # presence, not on the number of ghost batches)
    full, rest = n // v, n % v
    if rest > 0 and rest * per_example == 1:  # (joins the ghost batch before it)
        full, rest = full - 1, rest + v
    ys: list[Tensor] = []
    spatial: list[int] = list(x.shape[2:])
    # the count-weighted sums of the ghost batches' statistics, (C,) each
    mean_sum: Tensor | None = None
    var_sum: Tensor | None = None
    if full > 0:
        # (full*v, C, *S) -> (full, v, C, *S) -> (v, full, C, *S) -> (v, full*C, *S): each
        # (ghost batch, channel) pair becomes a channel of one BN call on bnlab's kernels
        xs = x[: full * v].reshape([full, v, c] + spatial).transpose(0, 1)
        xs = xs.reshape([v, full * c] + spatial)
        w: Tensor | None = None
        b: Tensor | None = None
        if weight is not None:
            w = weight.repeat(full)
        if bias is not None:
            b = bias.repeat(full)
        y, mean, var = batch_norm_train(xs, w, b, eps, activation)
        y = y.reshape([v, full, c] + spatial).transpose(0, 1).reshape([full * v, c] + spatial)
        ys.append(y)
        mean_sum = mean.view(full, c).sum(0) * (v * per_example)
        var_sum = var.view(full, c).sum(0) * (v * per_example)
    if rest > 0:  # the last ghost batch, of another size
        y, mean, var = batch_norm_train(x[full * v :], weight, bias, eps, activation)
        ys.append(y)
        count = rest * per_example
        mean_sum = mean * count if mean_sum is None else mean_sum + mean * count
        var_sum = var * count if var_sum is None else var_sum + var * count
    assert mean_sum is not None and var_sum is not None  # (n > v: at least one ghost batch)
    y = torch.cat(ys) if len(ys) > 1 else ys[0]
    # (the output in the input's layout, as BN's)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        y = y.contiguous(memory_format=torch.channels_last_3d)
    elif x.dim() > 2 and x.is_contiguous():
        y = y.contiguous()
    total = float(n * per_example)
    groups = full + (1 if rest > 0 else 0)
    mean = mean_sum / total
    # (var_sum: the sum of squared deviations from each ghost batch's own mean)
    var = var_sum * ((total - 1.0) / (total * (total - groups)))
    return y, mean, var


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost BN over ``(N, C)`` (per activation) or ``(N, C, L)`` (per channel)."""

    _valid_ranks = (2, 3)
    _rank_text = "2D (N, C) or 3D (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost BN over ``(N, C, H, W)``, per feature map."""

    _valid_ranks = (4,)
    _rank_text = "4D (N, C, H, W)"


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """Ghost BN over ``(N, C, D, H, W)``, per feature map."""

    _valid_ranks = (5,)
    _rank_text = "5D (N, C, D, H, W)"
