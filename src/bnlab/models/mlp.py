"""The MNIST network of Ioffe & Szegedy (2015), section 4.1: fully connected, 3 hidden layers of
100 units, ``y = act(W u + b)``, 10-way output. With ``norm`` set, a normalization layer sits
between each hidden ``Linear`` and its nonlinearity, and the hidden ``Linear`` has no bias (BN's
beta makes it redundant, section 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import get_layer, name_layers

__all__ = ["MLP", "StackedMLP", "gaussian_init_", "ACTIVATIONS"]

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
    in order. The same seed gives the same weights to an :class:`MLP` and to one slice of a
    :class:`StackedMLP`, so batched and separate runs start identically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in weights:
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * std)


class StackedMLP(nn.Module):
    """``K`` independent copies of :class:`MLP`, computed at once with batched matmuls.

    Input ``(K, N, in_features)``, output ``(K, N, num_classes)``: net ``k`` sees ``x[k]``.
    Weights are stored as ``(K, in, out)`` for ``torch.bmm``. With ``norm``, each hidden layer's
    pre-activations ``(K, N, C)`` are viewed as ``(N, K*C)`` and normalized by ONE bnlab
    BatchNorm1d with ``K*C`` features: per-activation BN over the mini-batch is exactly K separate
    BNs of C features, so the stack is the same computation as K separate networks.
    """

    def __init__(
        self,
        num_nets: int,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        norm: str | None = None,
        act: str = "sigmoid",
        bn_momentum: float | None = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"StackedMLP: unknown act {act!r}; known: {', '.join(ACTIVATIONS)}")
        k = num_nets
        widths = [in_features, *hidden, num_classes]
        self.num_nets = k
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(k, a, b)) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        # hidden biases only without norm (BN's beta makes them redundant); output bias always
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(k, b))
            for i, b in enumerate(widths[1:])
            if norm is None or i == len(hidden)
        )
        self.norms = (
            nn.ModuleList(get_layer(norm)(k * h, momentum=bn_momentum, eps=bn_eps) for h in hidden)
            if norm is not None
            else None
        )
        self.acts = nn.ModuleList(ACTIVATIONS[act]() for _ in hidden)
        name_layers(self)

    def init_gaussian_(self, seeds: Sequence[int], std: float) -> None:
        """Net ``k`` gets the weights ``MLP`` would get from :func:`gaussian_init_` with
        ``seeds[k]``; biases zero, BN reset."""
        if len(seeds) != self.num_nets:
            raise ValueError(f"StackedMLP: {len(seeds)} seeds for {self.num_nets} nets")
        for k, seed in enumerate(seeds):
            mats = [torch.empty(w.shape[2], w.shape[1]) for w in self.weights]  # (out, in)
            gaussian_init_(mats, seed, std)
            with torch.no_grad():
                for w, m in zip(self.weights, mats, strict=True):
                    w[k].copy_(m.t())
        with torch.no_grad():
            for b in self.biases:
                b.zero_()
        if self.norms is not None:
            for n in self.norms:
                n.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = x.shape[0], x.shape[1]
        h = x.reshape(k, n, -1)
        biases = iter(self.biases)
        last = len(self.weights) - 1
        for i, w in enumerate(self.weights):
            if self.norms is None or i == last:
                h = torch.baddbmm(next(biases).unsqueeze(1), h, w)  # (K, N, out)
            else:
                h = torch.bmm(h, w)  # (K, N, C)
                c = h.shape[2]
                # (K, N, C) -> (N, K*C): per-activation BN of K*C features
                h = self.norms[i](h.transpose(0, 1).reshape(n, k * c))
                h = h.view(n, k, c).transpose(0, 1)
            if i < last:
                h = self.acts[i](h)
        return h
