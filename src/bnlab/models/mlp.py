"""The MNIST network of Ioffe & Szegedy (2015), section 4.1: fully connected, 3 hidden layers of
100 units, ``y = act(W u + b)``, 10-way output. With ``norm`` set, a normalization layer sits
between each hidden ``Linear`` and its nonlinearity, and the hidden ``Linear`` has no bias (BN's
beta makes it redundant, section 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import get_layer, name_layers

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """``in_features -> hidden... -> num_classes``; ``norm`` is a registry name or None."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        norm: str | None = None,
        act: str = "sigmoid",
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown act {act!r}; known: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=norm is None))
            if norm is not None:
                layers.append(get_layer(norm)(h))
            layers.append(ACTIVATIONS[act]())
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if init_std is not None:  # the paper: "weights initialized to small random Gaussian"
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=init_std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        name_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
