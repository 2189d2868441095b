"""A small Inception network for 28x28 and 32x32 images: the network of Ioffe & Szegedy (2015),
section 4.2, scaled down for a CPU.

The paper's Inception variant (its section 4.2 and Szegedy et al. 2014) is built of *mixed*
modules whose branches run side by side and are concatenated along channels: a 1x1 convolution,
a 1x1 reduction then a 3x3, a 1x1 reduction then *two* 3x3 (the paper's replacement for the 5x5),
and a pooling branch (3x3 average pool then a 1x1 projection). Where the maps shrink, a reduction
module has stride-2 3x3 and double-3x3 branches and a stride-2 max-pool pass-through. This one::

    stem      conv3x3 in -> 2w, max pool 3x3/2        (N, 2w, 14, 14)  [16x16 for 32x32 input]
    mixed 3a  1x1 | 1x1-3x3 | 1x1-3x3-3x3 | avg-1x1   (N, 4w, 14, 14)
    mixed 3b                                          (N, 5.5w, 14, 14)
    reduce 3c 1x1-3x3/2 | 1x1-3x3-3x3/2 | max/2       (N, 8.5w, 7, 7)   [8x8]
    mixed 4a                                          (N, 9w, 7, 7)
    mixed 4b                                          (N, 10w, 7, 7)
    head      global average pool, dropout, linear    (N, num_classes)

(``w = width``, 16 by default; 16 convolution layers on the longest path.) Every convolution is a
:class:`ConvUnit`: ``act(norm(conv(x)))`` with the normalization before the nonlinearity, as the
paper puts it (section 3.2: ``z = g(BN(Wu))``, per feature map for convolutions); the convolution
has no bias when a normalization follows, since the normalization's shift replaces it.

``norm``: a normalization family of :func:`bnlab.layers.make_norm` (``"bn"``, ``"none"``, layer
names, any family registered later); ``act``: ``"relu"`` or ``"sigmoid"``; ``dropout``: the
probability before the final linear layer (the paper's Inception baseline has dropout, its BN-x5
removes it). ``fuse_relu=True`` asks the normalization for its fused ReLU
(``make_norm(..., activation="relu")``: bnlab's BN+ReLU in one kernel; a family without it
refuses with a TypeError naming the family).

Initialization: convolutions and the linear layer get He (fan-in) normal weights for ReLU and
Glorot normal weights for sigmoid, so neither nonlinearity starts handicapped without a
normalization; biases start at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import make_norm, name_layers

__all__ = ["ACTIVATIONS", "ConvUnit", "Mixed", "Reduction", "SmallInception"]

#: The nonlinearities ``act=`` accepts.
ACTIVATIONS = ("relu", "sigmoid")


def _has_norm(norm: str | None) -> bool:
    return norm is not None and norm.lower() != "none"


class ConvUnit(nn.Module):
    """``act(norm(conv(x)))``: a ``k x k`` convolution (``stride``, 'same' padding), the
    normalization of family ``norm`` over its ``cout`` feature maps (or none), then ``act``.
    Attributes ``conv``, ``norm`` (None without one) and ``act`` (``nn.Identity`` when the
    ReLU is fused into ``norm``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, norm: str | None, act: str,
                 fuse_relu: bool = False) -> None:
        super().__init__()
        has_norm = _has_norm(norm)
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=not has_norm)
        fuse = fuse_relu and act == "relu" and has_norm
        self.norm = (make_norm(norm, cout, 2, activation="relu") if fuse
                     else make_norm(norm, cout, 2))
        self.act: nn.Module = (nn.Identity() if fuse
                               else nn.ReLU(inplace=True) if act == "relu" else nn.Sigmoid())
        self.fused = fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x)


class Mixed(nn.Module):
    """A mixed module at constant resolution: branches 1x1 (``c1``), 1x1 (``c3r``) -> 3x3
    (``c3``), 1x1 (``cdr``) -> 3x3 (``cd``) -> 3x3 (``cd``), and 3x3 average pool -> 1x1
    (``cp``); outputs concatenated: ``(N, cin, H, W) -> (N, c1 + c3 + cd + cp, H, W)``."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, cdr: int, cd: int, cp: int,
                 **unit) -> None:
        super().__init__()
        self.b1 = ConvUnit(cin, c1, 1, 1, **unit)
        self.b3 = nn.Sequential(ConvUnit(cin, c3r, 1, 1, **unit), ConvUnit(c3r, c3, 3, 1, **unit))
        self.bd = nn.Sequential(ConvUnit(cin, cdr, 1, 1, **unit), ConvUnit(cdr, cd, 3, 1, **unit),
                                ConvUnit(cd, cd, 3, 1, **unit))
        self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                ConvUnit(cin, cp, 1, 1, **unit))
        self.out_channels = c1 + c3 + cd + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.bd(x), self.bp(x)], 1)


class Reduction(nn.Module):
    """A stride-2 reduction module: 1x1 (``c3r``) -> 3x3/2 (``c3``), 1x1 (``cdr``) -> 3x3 (``cd``)
    -> 3x3/2 (``cd``), and a 3x3/2 max pool passing the input through:
    ``(N, cin, H, W) -> (N, c3 + cd + cin, ceil(H/2), ceil(W/2))``."""

    def __init__(self, cin: int, c3r: int, c3: int, cdr: int, cd: int, **unit) -> None:
        super().__init__()
        self.b3 = nn.Sequential(ConvUnit(cin, c3r, 1, 1, **unit), ConvUnit(c3r, c3, 3, 2, **unit))
        self.bd = nn.Sequential(ConvUnit(cin, cdr, 1, 1, **unit), ConvUnit(cdr, cd, 3, 1, **unit),
                                ConvUnit(cd, cd, 3, 2, **unit))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.out_channels = c3 + cd + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b3(x), self.bd(x), self.pool(x)], 1)


def _ch(width: int, units: float) -> int:
    """Channels of a layer given as ``units`` at the default width 16: ``round(width * units /
    16)``, at least 1."""
    return max(1, round(width * units / 16))


class SmallInception(nn.Module):
    """The scaled-down Inception of the module docstring:
    ``(N, in_channels, H, W) -> (N, num_classes)`` logits, for ``H, W >= 8`` (made for 28x28 and
    32x32).

    ``width`` scales every layer's channels (16: 0.12M parameters on 1x28x28 inputs)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        norm: str | None = "bn",
        act: str = "relu",
        dropout: float = 0.0,
        width: int = 16,
        fuse_relu: bool = False,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"SmallInception: act must be one of {ACTIVATIONS}, got {act!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"SmallInception: width must be a positive int, got {width!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SmallInception: dropout must be in [0, 1), got {dropout!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(
                f"SmallInception: in_channels must be a positive int, got {in_channels!r}"
            )
        self.norm_name, self.act_name = norm, act
        unit = {"norm": norm, "act": act, "fuse_relu": fuse_relu}
        c = lambda u: _ch(width, u)  # noqa: E731  channels at width 16, scaled
        stem = c(32)
        m3a = Mixed(stem, c(16), c(16), c(24), c(8), c(12), c(12), **unit)
        m3b = Mixed(m3a.out_channels, c(24), c(24), c(32), c(12), c(16), c(16), **unit)
        r3c = Reduction(m3b.out_channels, c(24), c(32), c(12), c(16), **unit)
        m4a = Mixed(r3c.out_channels, c(48), c(24), c(48), c(16), c(24), c(24), **unit)
        m4b = Mixed(m4a.out_channels, c(48), c(32), c(56), c(16), c(24), c(32), **unit)
        self.features = nn.Sequential(
            ConvUnit(in_channels, stem, 3, 1, **unit),
            nn.MaxPool2d(3, 2, 1),
            m3a, m3b, r3c, m4a, m4b,
        )  # fmt: skip
        self.num_features = m4b.out_channels
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(self.num_features, num_classes),
        )  # fmt: skip
        self.reset_parameters()
        name_layers(self)

    def reset_parameters(self) -> None:
        """He normal (ReLU) or Glorot normal (sigmoid) weights, zero biases (norm layers keep
        their own initialization: scale 1, shift 0 for BN)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                if self.act_name == "relu" and isinstance(m, nn.Conv2d):
                    std = math.sqrt(2.0 / fan_in)
                else:
                    fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
                    std = math.sqrt(2.0 / (fan_in + fan_out))
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def units(self) -> list[ConvUnit]:
        """Every conv + norm + nonlinearity unit, in module order."""
        return [m for m in self.modules() if isinstance(m, ConvUnit)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
