"""Compiled code of Figure 1's training step (:mod:`bnlab.experiments.mnist_step`).

The classifier head of K stacked networks: the mean softmax cross-entropy of each network over
its mini-batch and its gradient, in one pass over the logits. Importing this module imports
Numba; :mod:`~bnlab.experiments.mnist_step` imports it only when the kernels are enabled
(:func:`bnlab.backend.kernels_enabled`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

__all__ = ["grouped_cross_entropy"]

# The flags of bnlab's kernels: reductions may reassociate (to vectorise), NaN/Inf still propagate.
_FM = {"reassoc", "contract", "arcp", "nsz"}


@njit(cache=True, fastmath=_FM, nogil=True)
def _grouped_cross_entropy(logits, target, loss, grad):
    """Mean softmax cross-entropy of each of K groups of N rows, and its gradient, in one pass.

    logits (K, N, C), target (K, N) class indices; fills loss (K,) and grad (K, N, C)::

        loss_k = 1/N sum_n (logsumexp(z_kn) - z_kn[t_kn])
        grad   = (softmax(z_kn) - onehot(t_kn)) / N

    Row maxima are subtracted before exp (no overflow); sums in float64. Returns False, having
    written nothing meaningful, if a target is outside [0, C).
    """
    K, N, C = logits.shape
    for k in range(K):
        for n in range(N):
            t = target[k, n]
            if t < 0 or t >= C:
                return False
    inv_n = 1.0 / N
    for k in range(K):
        total = 0.0
        for n in range(N):
            z = logits[k, n]
            g = grad[k, n]
            m = np.float64(z[0])
            for c in range(1, C):
                if z[c] > m:
                    m = np.float64(z[c])
            s = 0.0
            for c in range(C):
                e = math.exp(np.float64(z[c]) - m)
                g[c] = e
                s += e
            t = target[k, n]
            total += math.log(s) + m - z[t]
            scale = inv_n / s
            for c in range(C):
                g[c] = g[c] * scale
            g[t] -= inv_n
        loss[k] = total * inv_n
    return True


def grouped_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor] | None:
    """Mean softmax cross-entropy of each of K groups of N rows and its gradient in one compiled
    pass: ``logits (K, N, C)``, ``target (K, N)`` int64 -> ``(loss (K,), dL/dlogits (K, N, C))``
    with ``L = sum_k loss_k``. None when the kernel does not take the tensors (not CPU
    float32/float64 contiguous logits with contiguous int64 targets), so the caller uses tensor
    ops. ValueError for a target outside ``[0, C)``."""
    if not (
        logits.is_cpu
        and logits.dtype in (torch.float32, torch.float64)
        and logits.dim() == 3
        and logits.is_contiguous()
        and target.dtype == torch.int64
        and target.is_contiguous()
        and target.shape == logits.shape[:2]
    ):
        return None
    loss = torch.empty(logits.shape[0], dtype=logits.dtype)
    grad = torch.empty_like(logits)
    z = logits.detach().numpy() if logits.requires_grad else logits.numpy()
    if not _grouped_cross_entropy(z, target.numpy(), loss.numpy(), grad.numpy()):
        raise ValueError(
            f"cross-entropy: a target is outside [0, {logits.shape[2]}) "
            f"(min {int(target.min())}, max {int(target.max())})"
        )
    return loss, grad
