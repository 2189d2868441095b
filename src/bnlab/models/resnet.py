"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-(6n+2), e.g. ResNet-20 (n=3), ResNet-110
(n=18). Three stages of n basic blocks with 16, 32, 64 channels on 32x32, 16x16, 8x8 maps; a
normalization layer after every convolution (Ioffe & Szegedy 2015, section 3.2: per feature map).
Where the shape changes, the shortcut is He et al.'s CIFAR "option A" by default (stride-2
subsampling, new channels zero: no parameters) or ``shortcut="B"``, a strided 1x1 conv + norm.

``norm`` is a normalization family (:func:`bnlab.layers.make_norm`: ``"bn"``, ``"none"``, ...;
the layer names ``"batchnorm2d"`` work too), or None. With ``fuse_relu=True`` the norm layers
followed by a ReLU are built as ``norm(c, activation="relu")`` (bnlab's fused BN+ReLU) instead of
norm + ``nn.ReLU``. ``in_channels`` is 3 for CIFAR, 1 for (Fashion-)MNIST; any square input of
at least 8x8 works (global average pooling at the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import make_norm, name_layers

__all__ = ["ResNetCifar", "resnet20", "resnet110"]


def _norm_act(norm: str | None, c: int, relu: bool, fuse: bool) -> list[nn.Module]:
    """[norm, ReLU] as modules: fused into one layer when asked, identity when norm is None."""
    layer = make_norm(norm, c, 2, activation="relu") if relu and fuse else make_norm(norm, c, 2)
    if layer is None:
        return [nn.ReLU()] if relu else []
    if relu and fuse:
        return [layer]
    return [layer, nn.ReLU()] if relu else [layer]


class BasicBlock(nn.Module):
    """conv3x3 - norm - relu - conv3x3 - norm, + shortcut, relu."""

    def __init__(
        self, cin: int, cout: int, stride: int, norm: str | None, fuse: bool, shortcut: str = "A"
    ) -> None:
        super().__init__()
        bias = norm is None or norm == "none"
        self.stride = stride
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=bias),
            *_norm_act(norm, cout, True, fuse),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=bias),
            *_norm_act(norm, cout, False, fuse),
        )
        self.shortcut: nn.Module = nn.Identity()
        self.pad = 0  # option A: zero channels added to the subsampled input
        if stride != 1 or cin != cout:
            if shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=bias), *_norm_act(norm, cout, False, fuse)
                )
            else:
                self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.shortcut(x)
        if self.pad:  # option A: (N, C, H, W) -> (N, C + pad, H / s, W / s), new channels zero
            s, p = self.stride, self.pad
            short = F.pad(short[:, :, ::s, ::s], (0, 0, 0, 0, p // 2, p - p // 2))
        return torch.relu(self.body(x) + short)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2): ``(B, in_channels, H, W) -> (B, num_classes)`` logits (CIFAR: 3x32x32)."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        norm: str | None = "bn",
        fuse_relu: bool = False,
        shortcut: str = "A",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNetCifar: depth must be 6n+2 with n >= 1, got {depth!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"ResNetCifar: shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=norm is None or norm == "none"),
            *_norm_act(norm, 16, True, fuse_relu),
        ]
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(cin, cout, stride, norm, fuse_relu, shortcut))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        name_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet20(**kwargs) -> ResNetCifar:
    """ResNet-20 (n=3, 0.27M parameters)."""
    return ResNetCifar(20, **kwargs)


def resnet110(**kwargs) -> ResNetCifar:
    """ResNet-110 (n=18, 1.7M parameters)."""
    return ResNetCifar(110, **kwargs)
