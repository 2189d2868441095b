"""Speed of the Figure 1 experiment: plain per-network loops vs bnlab's stacked run.

Measures, in one run on this machine:
  * a plain PyTorch loop, one network at a time (784-100-100-100-10 sigmoid, batch 60), with
    torch.nn.BatchNorm1d and with bnlab.BatchNorm1d, in ms per step per network;
  * one training step of a stack of 3 networks (one thread), the way `bnlab run mnist` takes it
    (`bnlab.experiments.mnist_step.StackedMLP.sgd_step`: backward written out, BN's transform
    through the kernels' compiled loops) against forward + autograd + torch.optim.SGD on the same
    stack, interleaved rounds, ratio;
  * the stacked run (`bnlab run mnist`) with 1 process and with 2 processes, at 3,000 and 9,000
    steps: steps/s for all 2 x seeds networks from the difference, the rest as start-up;
and extrapolates each to the default run (2 networks x 3 seeds x 50,000 steps). Run:

    .venv/bin/python benchmarks/bench_mnist.py [--steps 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import bnlab
from bnlab.experiments import mnist
from bnlab.models import MLP
from bnlab.runs import RunDir

DEFAULT_STEPS, DEFAULT_NETS = 50_000, 6


def plain_loop_ms(norm_cls, steps: int, threads: int) -> float:
    """ms per step of one network trained the plain way (one Python step per network)."""
    torch.set_num_threads(threads)
    model = MLP(norm=None, init_std=0.01)
    if norm_cls is not None:  # the BN network: Linear(bias=False) -> BN -> sigmoid
        model = MLP(norm="batchnorm1d", init_std=0.01)
        if norm_cls is torch.nn.BatchNorm1d:
            model = bnlab.convert(model, to="torch")
    x, y = torch.rand(4000, 784), torch.randint(10, (4000,))
    idx = torch.randint(4000, (steps + 50, 60))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        loss = nn.functional.cross_entropy(model(x[idx[i]]), y[idx[i]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(50):
        step(i)
    t0 = time.perf_counter()
    for i in range(50, steps + 50):
        step(i)
    return (time.perf_counter() - t0) / steps * 1e3


def stacked_step_ms(steps: int, rounds: int) -> dict[tuple[str, str], float]:
    """Median ms per step of a 3-network stack of each variant on one thread, trained by
    ``sgd_step`` and by autograd + torch.optim.SGD, in interleaved rounds of ``steps`` steps."""
    torch.set_num_threads(1)
    data = mnist._load_data(mnist.MnistConfig(dataset="mnist-5k"))
    xtr, ytr = data[1], data[2]
    k, n = 3, 60
    times: dict[tuple[str, str], list[float]] = {}
    models = mnist.build_models(mnist.MnistConfig(seeds=k), xtr.shape[1])
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.5) for name, m in models.items()}

    def autograd_step(name, xb, yb):
        logits = models[name](xb)
        ce = nn.functional.cross_entropy(logits.reshape(-1, 10), yb.reshape(-1), reduction="none")
        opts[name].zero_grad(set_to_none=True)
        ce.view(k, -1).mean(1).sum().backward()
        opts[name].step()

    for r in range(rounds + 1):  # round 0 warms up (kernel compilation or cache load)
        for name in models:
            for how in ("sgd_step", "autograd"):
                idx = torch.randint(len(ytr), (steps, k * n))
                t0 = time.perf_counter()
                for i in range(steps):
                    xb, yb = xtr[idx[i]].view(k, n, -1), ytr[idx[i]].view(k, n)
                    if how == "sgd_step":
                        models[name].sgd_step(xb, yb, 0.5)
                    else:
                        autograd_step(name, xb, yb)
                if r:
                    times.setdefault((name, how), []).append(
                        (time.perf_counter() - t0) / steps * 1e3
                    )
    return {key: statistics.median(v) for key, v in times.items()}


def stacked_wall(steps: int, workers: int, threads: int) -> float:
    """Wall time of `bnlab run mnist`'s training (3 seeds, one evaluation per 500 steps)."""
    cfg = mnist.MnistConfig(
        steps=steps, eval_every=500, seeds=3, dataset="mnist-5k", workers=workers, threads=threads
    )
    with tempfile.TemporaryDirectory() as d:
        with RunDir.create(Path(d) / "run", {"experiment": mnist.NAME}) as run_dir:
            result = mnist.run(cfg, run_dir, progress=False)
    return result["training_time_s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per case (median)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads available, {args.steps} steps, "
        f"median of {args.repeats}"
    )
    step_ms = stacked_step_ms(max(200, args.steps // 10), 2 * args.repeats + 1)
    print("one step of a 3-network stack, 1 thread (median of interleaved rounds):")
    for name in mnist.NETS:
        a, b = step_ms[(name, "sgd_step")], step_ms[(name, "autograd")]
        print(
            f"  {name:<9} sgd_step {a:.2f} ms, autograd + torch.optim.SGD {b:.2f} ms: "
            f"{b / a:.2f}x faster"
        )
    torch.set_num_threads(threads)
    rows = []
    for label, cls in (
        ("plain loop, no BN", None),
        ("plain loop, torch BatchNorm1d", torch.nn.BatchNorm1d),
        ("plain loop, bnlab BatchNorm1d", bnlab.BatchNorm1d),
    ):
        ms = statistics.median(plain_loop_ms(cls, args.steps, threads) for _ in range(args.repeats))
        rows.append((label, f"{ms:.2f} ms/step/network", ms * 1e-3 * DEFAULT_STEPS * 3))
    # the default run trains 3 networks of each kind: plain = 3 x (no BN + BN)
    plain_total = rows[0][2] + rows[1][2]
    # The stacked run at two lengths: the difference gives the per-step rate, the rest is
    # start-up (process spawn, imports, kernel loading, data); default run = start-up + rate.
    short, long = 3000, 9000
    for workers in (1, 2):
        walls = {
            steps: statistics.median(
                stacked_wall(steps, workers, threads) for _ in range(args.repeats)
            )
            for steps in (short, long)
        }
        per_step = (walls[long] - walls[short]) / (long - short)
        startup = walls[short] - per_step * short
        rows.append(
            (
                f"stacked run, {workers} process(es)",
                f"{1 / per_step:.0f} steps/s, start-up {startup:.1f} s",
                startup + per_step * DEFAULT_STEPS,
            )
        )
    print(f"{'case':<36} {'speed':<28} {'default run (s)':>15}")
    for label, speed, secs in rows:
        print(f"{label:<36} {speed:<28} {secs:15.0f}")
    print(
        f"plain loops for the default run (3 x no-BN + 3 x torch-BN networks): {plain_total:.0f} s"
    )


if __name__ == "__main__":
    main()
