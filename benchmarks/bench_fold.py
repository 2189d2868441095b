"""Folding benchmark (issue 5): eval latency of ResNet-20 (CIFAR, 32x32) in three forms:

* ``bn``      - with bnlab BatchNorm2d layers, eval mode (population statistics, Algorithm 2);
* ``folded``  - ``bnlab.fold`` of the same net: each BN folded into the preceding conv;
* ``no-bn``   - the same architecture built with ``norm=None`` (convs with bias, no BN at all);
* ``folded-fx`` - the folded net re-traced into a ``torch.fx.GraphModule``: why ``fold`` returns the
  module itself rather than the traced graph (the generated forward was slower here).

The claim: folding removes the BN cost, so ``folded / no-bn`` is ~1 (within 1.05). The three
models are timed interleaved (round-robin, one forward each per round) so load from other processes
hits them alike; each figure is the median over rounds. Thread count is fixed and printed.

    PYTHONPATH=src python benchmarks/bench_fold.py [--threads 1] [--batch 64] [--rounds 60]
        [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import bnlab
from bnlab.models import resnet20

HEADING = "## Folding (issue 5)"


def build(seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    bn_net = resnet20(norm="batchnorm2d")
    bn_net.train()
    with torch.no_grad():  # a few training-mode passes so the running statistics are not 0/1
        for _ in range(3):
            bn_net(torch.randn(32, 3, 32, 32))
    bn_net.eval()
    folded = bnlab.fold(bn_net)
    plain = resnet20(norm=None).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        err = (folded(x) - bn_net(x)).abs().max().item()
    print(f"max |folded - bn| on a test batch: {err:.2e}")
    return {
        "bn": bn_net,
        "folded": folded,
        "no-bn": plain,
        "folded-fx": torch.fx.symbolic_trace(folded).eval(),
    }


def bench(models: dict[str, torch.nn.Module], batch: int, rounds: int, warmup: int = 5):
    x = torch.randn(batch, 3, 32, 32)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--batch", type=int, default=64, help="images per forward")
    p.add_argument("--rounds", type=int, default=60, help="timed forwards per model")
    p.add_argument("--repeats", type=int, default=3, help="independent runs; median reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", type=Path, default=None, help="RESULTS.md to put the table in")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = build(args.seed)
    runs = [bench(models, args.batch, args.rounds) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in models}
    ratios = [r["folded"] / r["no-bn"] for r in runs]
    lines = [
        HEADING,
        "",
        f"ResNet-20 (0.27M params) eval forward, batch {args.batch} x 3x32x32, CPU "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}; median of {args.rounds} interleaved forwards, "
        f"median over {args.repeats} runs. Command: `PYTHONPATH=src python "
        f"benchmarks/bench_fold.py --threads {args.threads} --batch {args.batch} "
        f"--rounds {args.rounds} --repeats {args.repeats}`.",
        "",
        "| model | latency (ms) | vs no-BN |",
        "|---|---:|---:|",
    ]
    for name in ("bn", "folded", "no-bn", "folded-fx"):
        lines.append(f"| {name} | {med[name] * 1e3:.2f} | {med[name] / med['no-bn']:.3f} |")
    lines += [
        "",
        "folded / no-BN per run: "
        + ", ".join(f"{r:.3f}" for r in ratios)
        + f" (median {statistics.median(ratios):.3f}).",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write is not None:
        write_section(args.write, table)


def write_section(path: Path, section: str, heading: str = HEADING) -> None:
    """Replace (or append) the section under ``heading`` of RESULTS.md, leaving the others."""
    text = path.read_text() if path.exists() else ""
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section
    path.write_text(text)


if __name__ == "__main__":
    main()
