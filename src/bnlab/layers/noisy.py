"""Santurkar et al. (2018), section 2.1 and Algorithm 1: "noisy" BN, a BN layer followed by random,
time-varying shifts and scales, to test whether BN works by removing "internal covariate shift".

:class:`ScaleShiftNoise` applies, in training mode only, at every forward (one training step)::

    for each channel j:          mu_t[j]    ~ U(-n_mu, n_mu)      sigma_t[j] ~ U(1, n_sigma)
    for each value (i, j, ...):  m ~ U(mu_t[j] - r_mu, mu_t[j] + r_mu)
                                 s ~ N(sigma_t[j], r_sigma^2)
                                 a <- s * a + m

with the paper's constants ``n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1``; for convolutions
the spatial positions count as batch dimensions (every value gets its own ``m`` and ``s``). The
noise is constant for the backward (``d a_out / d a_in = s``). In eval mode the layer is the
identity (plus the optional ReLU). Random numbers come from torch's global generator, so a seeded
training loop draws the same noise every time.

Two normalization families (:func:`bnlab.layers.make_norm`):

* ``"noisy-bn"``: bnlab's BatchNorm followed by the noise (the paper's noisy BN);
* ``"noise"``: the noise alone, no normalization (the paper's "same noise without BN").

Both accept ``activation="relu"`` (a model's ``fuse_relu=True``): the ReLU comes after the noise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .registry import register_norm

__all__ = ["ScaleShiftNoise", "noisy_batchnorm", "noise_only"]


class ScaleShiftNoise(nn.Module):
    """Random per-step shift and scale of each value (see the module docstring).

    ``num_features``: channels in dim 1 (``(N, C)`` or ``(N, C, *spatial)`` inputs);
    ``mean_noise`` (n_mu) > 0, ``scale_noise`` (n_sigma) >= 1, ``mean_jitter`` (r_mu) >= 0,
    ``scale_jitter`` (r_sigma, a standard deviation) >= 0; ``activation`` None or ``"relu"``.
    """

    def __init__(
        self,
        num_features: int,
        mean_noise: float = 0.5,
        scale_noise: float = 1.25,
        mean_jitter: float = 0.1,
        scale_jitter: float = 0.1,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"ScaleShiftNoise: num_features must be a positive int, got {num_features!r}"
            )
        if not mean_noise >= 0 or not scale_noise >= 1:
            raise ValueError(
                "ScaleShiftNoise: need mean_noise >= 0 and scale_noise >= 1, got "
                f"{mean_noise!r}, {scale_noise!r}"
            )
        if not mean_jitter >= 0 or not scale_jitter >= 0:
            raise ValueError(
                "ScaleShiftNoise: mean_jitter and scale_jitter must be >= 0, got "
                f"{mean_jitter!r}, {scale_jitter!r}"
            )
        if activation not in (None, "relu"):
            raise ValueError(
                f"ScaleShiftNoise: activation must be None or 'relu', got {activation!r}"
            )
        self.num_features = num_features
        self.mean_noise, self.scale_noise = float(mean_noise), float(scale_noise)
        self.mean_jitter, self.scale_jitter = float(mean_jitter), float(scale_jitter)
        self.activation = activation

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, mean_noise={self.mean_noise}, scale_noise="
                f"{self.scale_noise}, mean_jitter={self.mean_jitter}, scale_jitter="
                f"{self.scale_jitter}")
        return text if self.activation is None else f"{text}, activation={self.activation!r}"

    def sample(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One draw of ``(s, m)``, each of ``x``'s shape (consumes the global generator)."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ScaleShiftNoise({self.num_features}): expected an input of shape (N, "
                f"{self.num_features}, ...), got {tuple(x.shape)}"
            )
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)  # one draw per channel
        kw = {"dtype": x.dtype, "device": x.device}
        mu_t = (torch.rand(shape, **kw) * 2 - 1) * self.mean_noise
        sigma_t = 1 + torch.rand(shape, **kw) * (self.scale_noise - 1)
        m = mu_t + (torch.rand_like(x) * 2 - 1) * self.mean_jitter
        s = sigma_t + torch.randn_like(x) * self.scale_jitter
        return s, m

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            s, m = self.sample(x)
            x = torch.addcmul(m, s, x)  # s * x + m
        return torch.relu(x) if self.activation == "relu" else x


_BN = {0: BatchNorm1d, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def noisy_batchnorm(num_features: int, dims: int, activation: str | None = None,
                    **kwargs) -> nn.Module:
    """The ``"noisy-bn"`` family: ``Sequential(BatchNorm, ScaleShiftNoise)``; ``kwargs`` go to
    the BatchNorm layer."""
    if dims not in _BN:
        raise ValueError(f"noisy-bn: dims must be 0, 1, 2 or 3, got {dims!r}")
    return nn.Sequential(_BN[dims](num_features, **kwargs),
                         ScaleShiftNoise(num_features, activation=activation))


def noise_only(num_features: int, dims: int, activation: str | None = None) -> nn.Module:
    """The ``"noise"`` family: :class:`ScaleShiftNoise` without normalization."""
    if dims not in _BN:
        raise ValueError(f"noise: dims must be 0, 1, 2 or 3, got {dims!r}")
    return ScaleShiftNoise(num_features, activation=activation)


register_norm("noisy-bn", noisy_batchnorm)
register_norm("noise", noise_only)
