"""Training-step speed of a CIFAR ResNet with bnlab's BN, bnlab's fused BN+ReLU, torch's BN and
no BN: the choice behind `bnlab run why --bn-impl` (the experiment uses the fastest).

One SGD step (forward, cross-entropy, backward, momentum update) of ``ResNetCifar(depth)`` on a
fixed random batch, for each variant in interleaved rounds (so a slow moment of a shared machine
hits every variant alike); prints the median ms per step over rounds and the ratio to torch's BN.
With ``--layout``, measures instead how to spend the machine's threads on independent trainings
(the sweep of `bnlab run why`): the same number of steps done by one process with all threads, and
split over processes of one thread each running side by side; prints steps per second of each.
Run:

    PYTHONPATH=src python benchmarks/bench_resnet_bn.py [--depth 20] [--batch 128] \
        [--threads 2] [--rounds 5] [--steps 5] [--image 1x28x28] [--channels-last]
    PYTHONPATH=src python benchmarks/bench_resnet_bn.py --layout [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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


def _train(variant: str, depth: int, batch: int, image: str, steps: int,
           channels_last: bool) -> float:
    """Seconds for ``steps`` SGD steps (after 3 warm-up steps) of one network."""
    c, h, w = (int(v) for v in image.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, c, h, w, generator=g)
    y = torch.randint(10, (batch,), generator=g)
    model = build(variant, depth, c)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    t0 = 0.0
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def layout(args) -> None:
    """One process x all threads against processes x 1 thread, same total steps."""
    threads = args.threads
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--depth", str(args.depth), "--batch",
           str(args.batch), "--image", args.image, "--steps", str(args.steps), "--variant",
           args.variant] + (["--channels-last"] if args.channels_last else [])
    one, split = [], []
    for _ in range(args.rounds):
        procs = [subprocess.Popen(cmd + ["--threads", "1"], env=env, stdout=subprocess.PIPE,
                                  text=True) for _ in range(threads)]
        inner = [float(p.communicate()[0]) for p in procs]
        split.append(threads * args.steps / max(inner))
        torch.set_num_threads(threads)
        one.append(args.steps / _train(args.variant, args.depth, args.batch, args.image,
                                       args.steps, args.channels_last))
    print(f"ResNet-{args.depth} ({args.variant}), batch {args.batch} x {args.image}, "
          f"channels_last={args.channels_last}, {args.steps} steps per process, median of "
          f"{args.rounds} rounds")
    a, b = statistics.median(one), statistics.median(split)
    print(f"1 process x {threads} threads : {a:6.2f} steps/s")
    print(f"{threads} processes x 1 thread : {b:6.2f} steps/s in all ({b / a:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--image", default="1x28x28", help="CxHxW of the input")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument("--layout", action="store_true",
                   help="compare 1 process x threads with threads processes x 1 thread")
    p.add_argument("--variant", default="bnlab-bn-relu", choices=VARIANTS,
                   help="network of --layout")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        print(_train(args.variant, args.depth, args.batch, args.image, args.steps,
                     args.channels_last))
        return
    if args.layout:
        layout(args)
        return
    torch.set_num_threads(args.threads)
    c, h, w = (int(v) for v in args.image.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, c, h, w, generator=g)
    y = torch.randint(10, (args.batch,), generator=g)
    models = {v: build(v, args.depth, c) for v in VARIANTS}
    if args.channels_last:
        models = {v: m.to(memory_format=torch.channels_last) for v, m in models.items()}
        x = x.contiguous(memory_format=torch.channels_last)
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
    print(f"ResNet-{args.depth}, batch {args.batch} x {args.image}, channels_last="
          f"{args.channels_last}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"backend={bnlab.get_backend()}, median of "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':>14} | {'ms/step':>8} | {'vs torch-bn':>11}")
    for v in VARIANTS:
        med = statistics.median(times[v])
        print(f"{v:>14} | {med:8.1f} | {med / ref:11.2f}")


if __name__ == "__main__":
    main()
