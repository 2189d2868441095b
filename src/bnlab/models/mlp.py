"""The MNIST network of Ioffe & Szegedy (2015), section 4.1: fully connected, 3 hidden layers of
100 units, ``y = act(W u + b)``, 10-way output. With ``norm`` set, a normalization layer sits
between each hidden ``Linear`` and its nonlinearity, and the hidden ``Linear`` has no bias (BN's
beta makes it redundant, section 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import get_layer, name_layers

__all__ = ["MLP", "gaussian_init_", "ACTIVATIONS"]

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
        init_seed: int = 0,
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
            linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
            gaussian_init_([m.weight for m in linears], init_seed, init_std)
            for m in linears:
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        name_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gaussian_init_(weights: Sequence[torch.Tensor], seed: int, std: float) -> None:
    """Fill each ``(out, in)`` weight with N(0, std^2) draws from one generator seeded by ``seed``,
    in order (float32 draws, copied into each weight's dtype). Anything initialized from it with
    the same seed (e.g. one network of a stack of copies) gets the same weights as an
    :class:`MLP` built with ``init_seed=seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in weights:
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * std)
