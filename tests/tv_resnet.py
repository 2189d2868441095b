"""A ResNet-18 built the way torchvision builds ``torchvision.models.resnet18`` (He et al. 2016,
Table 1: 7x7/2 stem conv, BN, ReLU, 3x3/2 max-pool, four stages of two basic blocks with 64,
128, 256, 512 channels, a strided 1x1 conv + BN projection where the shape changes, global
average pooling, a linear classifier), from ``torch.nn`` modules only: the model a user would
bring and convert with ``bnlab.convert`` (torchvision itself is not a dependency). Like
torchvision's, its blocks add the shortcut in place and share one in-place ReLU module.

``norm`` makes the BatchNorm layers (``torch.nn.BatchNorm2d`` by default); with
``fuse_relu=True`` every BN directly followed by a ReLU is built as ``norm(c, activation="relu")``
(bnlab's fused BN+ReLU), which torch's layer does not have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable, fuse_relu: bool):
        super().__init__()
        self.fuse_relu = fuse_relu
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout, activation="relu") if fuse_relu else norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.bn1(self.conv1(x))
        if not self.fuse_relu:
            out = self.relu(out)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(
        self, num_classes: int = 1000, norm: Callable = nn.BatchNorm2d, fuse_relu: bool = False
    ):
        super().__init__()
        self.fuse_relu = fuse_relu
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64, activation="relu") if fuse_relu else norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(cin, cout, stride, norm, fuse_relu),
                    BasicBlock(cout, cout, 1, norm, fuse_relu),
                )
            )
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        if not self.fuse_relu:
            x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs) -> ResNet18:
    return ResNet18(**kwargs)
