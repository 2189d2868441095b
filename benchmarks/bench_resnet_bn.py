"""Training-step speed of a CIFAR ResNet with bnlab's BN, bnlab's fused BN+ReLU, torch's BN and
no BN: the choice behind `bnlab run why --bn-impl` (the experiment uses the fastest).

One SGD step (forward, cross-entropy, backward, momentum update) of ``ResNetCifar(depth)`` on a
fixed random batch, for each variant in interleaved rounds (so a slow moment of a shared machine
hits every variant alike); prints the median ms per step over rounds and the ratio to torch's BN.
Run:

    PYTHONPATH=src python benchmarks/bench_resnet_bn.py [--depth 20] [--batch 128] \
        [--threads 2] [--rounds 5] [--steps 5] [--image 1x28x28]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

import bnlab
from bnlab.models import ResNetCifar

VARIANTS = ("torch-bn", "bnlab-bn", "bnlab-bn-relu", "none")


def build(variant: str, depth: int, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "none":
        return ResNetCifar(depth, norm="none", in_channels=channels)
    model = ResNetCifar(depth, norm="bn", fuse_relu=variant == "bnlab-bn-relu",
                        in_channels=channels)
    return bnlab.convert(model, to="torch") if variant == "torch-bn" else model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--image", default="1x28x28", help="CxHxW of the input")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    c, h, w = (int(v) for v in args.image.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, c, h, w, generator=g)
    y = torch.randint(10, (args.batch,), generator=g)
    models = {v: build(v, args.depth, c) for v in VARIANTS}
    opts = {v: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for v, m in models.items()}

    def step(v: str) -> None:
        loss = F.cross_entropy(models[v](x), y)
        opts[v].zero_grad(set_to_none=True)
        loss.backward()
        opts[v].step()

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds + 1):  # round 0 warms up (kernel compilation or cache load)
        for v in VARIANTS:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(v)
            if r:
                times[v].append((time.perf_counter() - t0) / args.steps * 1e3)
    ref = statistics.median(times["torch-bn"])
    print(f"ResNet-{args.depth}, batch {args.batch} x {args.image}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, backend={bnlab.get_backend()}, median of "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':>14} | {'ms/step':>8} | {'vs torch-bn':>11}")
    for v in VARIANTS:
        med = statistics.median(times[v])
        print(f"{v:>14} | {med:8.1f} | {med / ref:11.2f}")


if __name__ == "__main__":
    main()
