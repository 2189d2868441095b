"""ResNet-20 for 32x32 inputs (CIFAR-10), He et al. (2016), section 4.2.

Three stages of three basic blocks (3x3 conv - norm - ReLU - 3x3 conv - norm, plus shortcut, ReLU)
with 16, 32, 64 channels; the first block of stages 2 and 3 halves the resolution. Shortcuts are
the parameter-free "option A": identity, or stride-2 subsampling with zero-padded channels.
6n + 2 = 20 weighted layers for n = 3, 0.27M parameters.

With ``norm`` set (a registry name, e.g. ``"batchnorm2d"``) each conv is followed by that layer and
has no bias (beta makes it redundant, section 3.2 of the BN paper); with ``norm=None`` each conv has
a bias and there is no normalization, the reference for "BN removed at inference" (``bnlab.fold``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import get_layer, name_layers

__all__ = ["ResNet20", "BasicBlock"]


def _norm(norm: str | None, channels: int) -> nn.Module:
    return get_layer(norm)(channels) if norm is not None else nn.Identity()


class BasicBlock(nn.Module):
    """``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str | None) -> None:
        super().__init__()
        bias = norm is None
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=bias)
        self.bn2 = _norm(norm, c_out)
        self.subsample = stride != 1 or c_in != c_out
        self.pad = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.subsample:  # option A: (N, C, H, W) -> (N, 2C, H/2, W/2), new channels zero
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + x)


class ResNet20(nn.Module):
    """ResNet-20: (N, 3, 32, 32) -> (N, num_classes)."""

    def __init__(self, num_classes: int = 10, norm: str | None = "batchnorm2d") -> None:
        super().__init__()
        bias = norm is None
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=bias)
        self.bn = _norm(norm, 16)
        blocks: list[nn.Module] = []
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1, norm))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        name_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 64)
        return self.fc(x)
