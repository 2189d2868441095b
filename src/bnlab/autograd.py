"""``torch.autograd.Function`` wiring over :mod:`bnlab.functional`.

Two functions, one per behaviour of the paper:

* :class:`BatchNormTrain` - Algorithm 1 with mini-batch statistics; returns ``y`` and, as
  non-differentiable outputs, the per-channel ``mean`` and biased ``var`` so the caller can update
  running statistics (Algorithm 2) without computing them twice.
* :class:`BatchNormEval` - the inference transform with given population statistics.

Both are differentiable once: their backward is the hand-written one of section 3, not autograd's
tape, so a double backward raises a clear error (``once_differentiable``) rather than returning
wrong numbers.

Each forward runs on the path :mod:`bnlab.backend` chooses (fused CPU kernels or the reference
functions) and its backward on the same path. ``activation="relu"`` fuses ``max(., 0)`` into the
output; the backward then gates ``dy`` with the saved output's mask ``y > 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend as B

__all__ = ["BatchNormTrain", "BatchNormEval", "batch_norm_train", "batch_norm_eval"]


def _relu_flag(activation: str | None) -> bool:
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _needs_graph(*tensors: Tensor | None) -> bool:
    """True when autograd would record the call (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class BatchNormTrain(torch.autograd.Function):
    """y, mean, var = BN_train(x, gamma, beta) [then ReLU]; gradients flow to x, gamma, beta."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool):
        path, y, mean, var, invstd = B.train_forward(x, weight, bias, eps, relu=relu)
        ctx.save_for_backward(x, weight, mean, invstd, y if relu else None)
        ctx.has_bias = bias is not None
        ctx.path = path
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):
        x, weight, mean, invstd, y = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dparams = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dgamma, dbeta = B.train_backward(
            ctx.path, dy, x, mean, invstd, weight, need_dx=need_dx, need_dparams=need_dparams, y=y
        )
        return dx, dgamma, dbeta if ctx.has_bias else None, None, None


class BatchNormEval(torch.autograd.Function):
    """y = BN_inference(x; E[x], Var[x], gamma, beta) [then ReLU]; statistics are constants."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        relu: bool,
    ):
        path, y, invstd = B.eval_forward(x, running_mean, running_var, weight, bias, eps, relu=relu)
        ctx.save_for_backward(x, running_mean, invstd, weight, y if relu else None)
        ctx.has_bias = bias is not None
        ctx.path = path
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, running_mean, invstd, weight, y = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dparams = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dx, dgamma, dbeta = B.eval_backward(
            ctx.path, dy, x, running_mean, invstd, weight, need_dx=need_dx,
            need_dparams=need_dparams, y=y,
        )  # fmt: skip
        return dx, None, None, dgamma, dbeta if ctx.has_bias else None, None, None


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable Algorithm 1: returns ``(y, mean, biased_var)``; ``activation="relu"`` returns
    ``max(y, 0)`` (fused on the kernel path)."""
    relu = _relu_flag(activation)
    if not _needs_graph(x, weight, bias):  # no autograd bookkeeping when nothing needs it
        return B.train_forward(x, weight, bias, eps, relu=relu)[1:4]
    return BatchNormTrain.apply(x, weight, bias, eps, relu)


def batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None = None,
) -> Tensor:
    """Differentiable inference transform with population statistics [then ReLU]."""
    relu = _relu_flag(activation)
    if not _needs_graph(x, weight, bias):
        return B.eval_forward(x, running_mean, running_var, weight, bias, eps, relu=relu)[1]
    return BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps, relu)
