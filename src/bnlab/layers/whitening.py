"""Batch whitening: decorrelate and standardize features over the mini-batch (ZCA), the "full
whitening" that Ioffe & Szegedy (2015) set aside in section 3 ("costly and not everywhere
differentiable") for per-feature standardization; in the form of Huang et al. (2018),
"Decorrelated Batch Normalization": ZCA whitening per group of features with backpropagation
through the whitening matrix, then a per-feature affine map.

For the ``M = N * prod(spatial)`` values of a group's ``g`` features (rows of ``X``, ``(M, g)``)::

    mu    = (1/M) sum_i x_i
    Sigma = (1/M) (X - mu)^T (X - mu)                       (biased, as BN's sigma_B^2)
    W     = (Sigma + eps I)^(-1/2) = U diag((lambda + eps)^(-1/2)) U^T      (ZCA, symmetric)
    y_i   = gamma * (W (x_i - mu)) + beta                   (gamma, beta per feature)

so the output's covariance over the batch is ``I`` up to ``eps`` (on the batch's span: with
``M <= g`` the covariance is singular, section 3 of the paper, and the directions the batch does
not span come out as zero). The running averages, used at inference, follow BN's convention
(``f = momentum``, torch's meaning)::

    running_mean <- (1 - f) running_mean + f mu
    running_cov  <- (1 - f) running_cov  + f M/(M-1) Sigma      (unbiased, Algorithm 2 of the paper)

**Gradient.** ``W = f(Sigma)`` with ``f(s) = (s + eps)^(-1/2)`` on the eigenvalues. Its derivative
(Daleckii-Krein) is ``dW = U (L o (U^T dSigma U)) U^T`` with the Loewner matrix of divided
differences ``L_jk = (f(l_j) - f(l_k)) / (l_j - l_k)``; written with ``s_j = sqrt(l_j + eps)`` it is
``L_jk = -1 / (s_j s_k (s_j + s_k))``, which has no cancellation and is exact at ``l_j = l_k``
(``f'(l)``). Autograd's own ``eigh`` backward divides by ``l_j - l_k`` and is undefined for repeated
eigenvalues, which a singular batch covariance always has; this one is not.

``BatchWhitening`` is registered as the normalization family ``"whiten"``
(``make_norm("whiten", C, dims, group_size=16)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops import check_shapes
from .registry import register_norm

__all__ = ["BatchWhitening", "inverse_sqrt_psd"]


class _InverseSqrtPSD(torch.autograd.Function):
    """``(A + eps I)^(-1/2)`` of symmetric positive semi-definite ``A`` (batched ``(..., g, g)``),
    computed in float64 by ``eigh``; backward by the Loewner matrix (module docstring)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, eps: float) -> Tensor:
        a64 = a.detach().to(torch.float64)
        a64 = 0.5 * (a64 + a64.transpose(-1, -2))
        lam, u = torch.linalg.eigh(a64)
        # a PSD matrix's rounding may give eigenvalues of -1e-17; only a matrix that is not PSD
        # (eigenvalue below -eps) reaches the floor, which keeps the result finite
        s = (lam + eps).clamp_min(1e-3 * eps).sqrt()
        w = (u / s.unsqueeze(-2)) @ u.transpose(-1, -2)
        ctx.save_for_backward(u, s)
        ctx.dtype = a.dtype
        return w.to(a.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        u, s = ctx.saved_tensors
        g = grad.to(torch.float64)
        g = 0.5 * (g + g.transpose(-1, -2))
        loewner = -1.0 / (s.unsqueeze(-1) * s.unsqueeze(-2) * (s.unsqueeze(-1) + s.unsqueeze(-2)))
        inner = u.transpose(-1, -2) @ g @ u
        da = u @ (loewner * inner) @ u.transpose(-1, -2)
        return da.to(ctx.dtype), None


def inverse_sqrt_psd(a: Tensor, eps: float) -> Tensor:
    """``(a + eps I)^(-1/2)`` for symmetric positive semi-definite ``a`` (``(..., g, g)``),
    differentiable everywhere, repeated eigenvalues included (see the module docstring)."""
    if not eps > 0:
        raise ValueError(f"inverse_sqrt_psd: eps must be > 0, got {eps!r}")
    return _InverseSqrtPSD.apply(a, float(eps))


class BatchWhitening(nn.Module):
    """ZCA whitening over the mini-batch, per group of ``group_size`` features (None: all
    ``num_features`` in one group: full whitening), then ``gamma * . + beta`` per feature.

    Input ``(N, C)`` or ``(N, C, *spatial)`` (features are channels; batch and spatial positions
    are the samples, as in BN's convolutional form). Training mode: batch statistics, running
    averages updated (``momentum`` as in torch's BatchNorm; None: cumulative average);
    eval mode: the running averages. A batch with non-finite statistics raises
    ``FloatingPointError`` naming the layer before any buffer changes.
    """

    def __init__(
        self,
        num_features: int,
        group_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        g = num_features if group_size is None else group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or num_features % g:
            raise ValueError(f"{name}: group_size must be a positive int dividing num_features "
                             f"({num_features}), got {group_size!r}")
        if not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features, self.group_size, self.groups = num_features, g, num_features // g
        self.eps, self.momentum, self.affine = eps, momentum, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, dtype=dtype))
        eye = torch.eye(g, dtype=dtype).expand(self.groups, g, g).clone()
        self.register_buffer("running_cov", eye)  # (groups, g, g)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, group_size={self.group_size}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}")

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_cov.copy_(torch.eye(self.group_size, dtype=self.running_cov.dtype))
        self.num_batches_tracked.zero_()

    def _rows(self, x: Tensor) -> Tensor:
        """``(N, C, *spatial)`` -> ``(M, C)`` samples x features."""
        name = type(self).__name__
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}({self.num_features}): expected a floating-point Tensor")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{name}({self.num_features}): expected input (N, "
                             f"{self.num_features}, ...), got shape {tuple(x.shape)}")
        return x.movedim(1, -1).reshape(-1, self.num_features)

    def _check_state(self) -> None:
        """Refuse, naming the layer, a parameter or buffer of another shape than the layer's
        (reassigned through ``.data``, say), before the forward changes anything: the
        running averages would otherwise move before the affine step failed, or a (C, 1)
        weight broadcast against M = C rows without an error."""
        c, k, g = self.num_features, self.groups, self.group_size
        check_shapes(f"{type(self).__name__}({c})", (
            ("weight", self.weight, (c,)), ("bias", self.bias, (c,)),
            ("running_mean", self.running_mean, (c,)),
            ("running_cov", self.running_cov, (k, g, g)),
        ))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        rows = self._rows(x)  # (M, C)
        self._check_state()
        m, g, k = rows.shape[0], self.group_size, self.groups
        if self.training:
            if m < 2:
                raise ValueError(f"{type(self).__name__}({self.num_features}): batch statistics "
                                 f"need more than 1 value per feature, got shape "
                                 f"{tuple(x.shape)}")
            mean = rows.mean(0)
            xc = (rows - mean).reshape(m, k, g).transpose(0, 1)  # (groups, M, g)
            cov = xc.transpose(1, 2) @ xc / m  # (groups, g, g), biased
            if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
                raise FloatingPointError(
                    f"{type(self).__name__}({self.num_features}): non-finite batch statistics "
                    f"(NaN or Inf in the input of shape {tuple(x.shape)}); running statistics "
                    "were left unchanged")
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else float(self.momentum))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), f)
                unbiased = cov.detach() * (m / (m - 1))
                self.running_cov.lerp_(unbiased.to(self.running_cov.dtype), f)
        else:
            mean = self.running_mean.to(rows.dtype)
            xc = (rows - mean).reshape(m, k, g).transpose(0, 1)
            cov = self.running_cov.to(rows.dtype)
        w = inverse_sqrt_psd(cov, self.eps)  # (groups, g, g), symmetric
        y = (xc @ w).transpose(0, 1).reshape(m, self.num_features)
        if self.affine:
            y = y * self.weight + self.bias
        shape = (x.shape[0], *x.shape[2:], self.num_features)
        return y.reshape(shape).movedim(-1, 1)


def _whiten(num_features: int, dims: int, **kwargs: Any) -> nn.Module:
    """Batch whitening for any input rank (features are channels)."""
    if dims not in (0, 1, 2, 3):
        raise ValueError(f"whiten: dims must be 0, 1, 2 or 3, got {dims!r}")
    return BatchWhitening(num_features, **kwargs)


register_norm("whiten", _whiten)
