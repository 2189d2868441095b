"""``torch.autograd.Function`` wiring over :mod:`bnlab.functional`.

Two functions, one per behaviour of the paper:

* :class:`BatchNormTrain` - Algorithm 1 with mini-batch statistics; returns ``y`` and, as
  non-differentiable outputs, the per-channel ``mean`` and biased ``var`` so the caller can update
  running statistics (Algorithm 2) without computing them twice.
* :class:`BatchNormEval` - the inference transform with given population statistics.

Both are differentiable once: their backward is the hand-written one of section 3, not autograd's
tape, so a double backward raises a clear error (``once_differentiable``) rather than returning
wrong numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional as F

__all__ = ["BatchNormTrain", "BatchNormEval", "batch_norm_train", "batch_norm_eval"]


class BatchNormTrain(torch.autograd.Function):
    """y, mean, var = BN_train(x, gamma, beta); gradients flow to x, gamma, beta only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        y, mean, var, invstd = F.batch_norm_train_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):
        x, weight, mean, invstd = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dparams = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dgamma, dbeta = F.batch_norm_train_backward(
            dy, x, mean, invstd, weight, need_dx=need_dx, need_dparams=need_dparams
        )
        return dx, dgamma, dbeta if ctx.has_bias else None, None


class BatchNormEval(torch.autograd.Function):
    """y = BN_inference(x; E[x], Var[x], gamma, beta); statistics are constants."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ):
        y, invstd = F.batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps)
        ctx.save_for_backward(x, running_mean, invstd, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, running_mean, invstd, weight = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dparams = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dx, dgamma, dbeta = F.batch_norm_eval_backward(
            dy, x, running_mean, invstd, weight, need_dx=need_dx, need_dparams=need_dparams
        )
        return dx, None, None, dgamma, dbeta if ctx.has_bias else None, None


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable Algorithm 1: returns ``(y, mean, biased_var)``."""
    return BatchNormTrain.apply(x, weight, bias, eps)


def batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Differentiable inference transform with population statistics."""
    return BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps)
