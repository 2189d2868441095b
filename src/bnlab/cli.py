"""The ``bnlab`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

__all__ = ["main"]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def demo(steps: int = 600, batch_size: int = 60, lr: float = 0.5, seed: int = 0) -> dict:
    """Train the paper's MNIST MLP with and without bnlab BatchNorm on mnist-5k; return accuracies.

    Both networks see the same mini-batches (one index stream from ``seed``) and the same SGD
    learning rate; the BN network is evaluated in inference mode (population statistics).
    """
    from .data import load_mnist5k
    from .models import MLP

    data = load_mnist5k()
    results = {}
    for norm in (None, "batchnorm1d"):
        torch.manual_seed(seed)
        model = MLP(norm=norm, init_std=0.01)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed + 1)
        idx = torch.randint(len(data.y_train), (steps, batch_size), generator=gen)
        t0 = time.perf_counter()
        for i in range(steps):
            xb, yb = data.x_train[idx[i]], data.y_train[idx[i]]
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        label = "with bnlab BatchNorm1d" if norm else "without BatchNorm"
        results[label] = _accuracy(model, data.x_test, data.y_test)
        print(
            f"{label:>24}: test accuracy {results[label]:.4f} after {steps} steps "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train the MNIST MLP with and without BN on mnist-5k")
    p.add_argument("--steps", type=int, default=600, help="SGD steps per network")
    p.add_argument("--batch-size", type=int, default=60, help="examples per mini-batch")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (both networks)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        print(
            f"bnlab demo: MNIST MLP (784-100-100-100-10, sigmoid) on mnist-5k, "
            f"{torch.get_num_threads()} threads"
        )
        demo(args.steps, args.batch_size, args.lr, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
