"""A small convolutional network for 28x28 (or 32x32) images, with a normalization switch.

``SmallCNN``: three 3x3 convolutions of ``widths`` channels, each followed by a normalization
layer (per feature map, Ioffe & Szegedy 2015 section 3.2; or any family of
:func:`bnlab.layers.make_norm`) and a ReLU, 2x2 max pooling after the first two, global average
pooling and a linear classifier. The classifier has no normalization, so batch-independent
families (``"gn"``, ``"ln"``) and batch ones are compared on the same network. About 24k
parameters with the default widths: small enough to train at batch size 2 on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..layers import make_norm, name_layers

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """``(B, in_channels, H, W) -> (B, num_classes)`` logits.

    ``norm``: a family name for :func:`bnlab.layers.make_norm` (``"bn"``, ``"brn"``,
    ``"ghost"``, ``"sync"``, ``"gn"``, ``"ln"``, ...) or ``"none"``; ``norm_kwargs`` go to every
    normalization layer (e.g. ``{"virtual_batch_size": 4}`` for ghost BN). Convolutions have no
    bias under a normalization layer (its shift replaces it). Weights: Kaiming-normal (fan-out)
    for convolutions, torch's default for the classifier; call ``torch.manual_seed`` first for
    a reproducible network.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        norm: str | None = "bn",
        norm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"SmallCNN: widths must be 3 positive ints, got {widths!r}")
        plain = norm is None or norm == "none"
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers.append(nn.Conv2d(cin, w, 3, padding=1, bias=plain))
            layer = make_norm(norm, w, 2, **dict(norm_kwargs or {}))
            if layer is not None:
                layers.append(layer)
            layers.append(nn.ReLU())
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        name_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
