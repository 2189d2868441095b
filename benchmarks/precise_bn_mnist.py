"""Precise BN on the MNIST-5k network (issue 5): test accuracy of the paper's MLP with BN
(Ioffe & Szegedy 2015, section 4.1: 3 x 100 sigmoid units, BN before each nonlinearity) evaluated
with three sets of population statistics (Algorithm 2, section 3.1):

* ``ema``      - the running averages kept during training (momentum 0.1, torch convention);
* ``precise``  - ``bnlab.recompute_population_stats(mode="train")``: Algorithm 2 over the whole
  training set in the training batch size (inputs of deeper layers normalized per batch);
* ``exact``    - ``recompute_population_stats(mode="eval")``: layer by layer, the exact statistics
  of what the inference network feeds each layer.

Measured after ``--checkpoints`` steps of one run (the EMA lags most early, while the weights move
fast), and for a weight-averaged model (uniform average of the weights over the second half of
training, as in SWA): its stored statistics belong to the last training weights, not to the
averaged ones. Median over ``--seeds``.

    PYTHONPATH=src python benchmarks/precise_bn_mnist.py [--steps 3000] [--seeds 3]
        [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import bnlab
from bnlab.data import load_mnist5k
from bnlab.models import MLP

HEADING = "## Precise BN (issue 5)"


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def evaluate(model, ds, batch: int) -> dict[str, float]:
    """Test accuracy with EMA, precise (Algorithm 2) and exact (layer-by-layer) statistics."""
    train_batches = list(torch.split(ds.x_train, batch))
    out = {"ema": accuracy(model, ds.x_test, ds.y_test)}
    for name, mode in (("precise", "train"), ("exact", "eval")):
        m = copy.deepcopy(model).eval()
        bnlab.recompute_population_stats(m, train_batches, mode=mode, progress=False)
        out[name] = accuracy(m, ds.x_test, ds.y_test)
    return out


def run(seed: int, ds, steps: int, checkpoints: list[int], batch: int, lr: float):
    torch.manual_seed(seed)
    model = MLP(norm="batchnorm1d", act="sigmoid", init_std=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = ds.x_train.shape[0]
    results: dict[str, dict[str, float]] = {}
    avg: dict[str, torch.Tensor] | None = None
    n_avg = 0
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, n, (batch,), generator=g)
        loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step > steps // 2 and step % 10 == 0:  # SWA-style uniform average of the weights
            params = {k: v.detach().clone() for k, v in model.named_parameters()}
            if avg is None:
                avg = params
            else:
                for k in avg:
                    avg[k] += (params[k] - avg[k]) / (n_avg + 1)
            n_avg += 1
        if step in checkpoints:
            results[f"step {step}"] = evaluate(model, ds, batch)
    averaged = copy.deepcopy(model)  # running statistics of the last training weights
    with torch.no_grad():
        for k, p in averaged.named_parameters():
            p.copy_(avg[k])
    results[f"weight average (steps {steps // 2}-{steps})"] = evaluate(averaged, ds, batch)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000, help="SGD steps")
    p.add_argument("--batch", type=int, default=60, help="examples per step (paper: 60)")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    p.add_argument("--seeds", type=int, default=3, help="independent runs (seeds 0..n-1)")
    p.add_argument("--checkpoints", type=str, default="20,50,200,1000,3000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", type=Path, default=None, help="RESULTS.md to put the table in")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = [int(c) for c in args.checkpoints.split(",") if int(c) <= args.steps]
    ds = load_mnist5k()
    runs = [run(s, ds, args.steps, checkpoints, args.batch, args.lr) for s in range(args.seeds)]
    lines = [
        HEADING,
        "",
        f"MNIST-5k (4,000 train / 1,000 test), MLP 784-100-100-100-10 sigmoid with bnlab "
        f"BatchNorm1d, SGD lr={args.lr}, batch {args.batch}, {args.steps} steps; test accuracy "
        f"(%), median over seeds 0..{args.seeds - 1} (min-max in brackets). Population "
        f"statistics recomputed over the 4,000 training images in batches of {args.batch}. "
        f"Command: `PYTHONPATH=src python benchmarks/precise_bn_mnist.py --steps {args.steps} "
        f"--seeds {args.seeds} --lr {args.lr}`.",
        "",
        "| when | EMA (running) | precise (Alg. 2, train-mode pass) | exact (layer by layer) "
        "| precise - EMA (median of paired differences, points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in runs[0]:
        cells = []
        for est in ("ema", "precise", "exact"):
            vals = [100 * r[key][est] for r in runs]
            cells.append(f"{statistics.median(vals):.1f} [{min(vals):.1f}-{max(vals):.1f}]")
        diffs = [100 * (r[key]["precise"] - r[key]["ema"]) for r in runs]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {statistics.median(diffs):+.1f} |")
    lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.write is not None:
        from bench_fold import write_section  # same directory

        write_section(args.write, table, HEADING)


if __name__ == "__main__":
    main()
