"""A toy experiment defined outside bnlab's package, registered through the public protocol:
two small networks (with and without BN) trained by ``bnlab.train.fit`` on synthetic data.

The tests run it through ``bnlab run``, ``bnlab list`` and ``bnlab report`` (in-process, and in
new processes through ``BNLAB_EXPERIMENTS=lab_toy``) with no edit to the CLI or the report.
``$TOY_INTERRUPT_AT=N`` raises KeyboardInterrupt when a training reaches step N, as a Ctrl-C
would (an environment variable, not a config field, so a resumed run does not stop again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from bnlab import BatchNorm1d
from bnlab.data import load_synthetic
from bnlab.experiments import Experiment, register
from bnlab.report import Claim, Figure, Section, Summary, Table, plots
from bnlab.train import fit


@dataclass
class ToyConfig:
    """Toy config: every field is a flag."""

    steps: int = field(default=60, metadata={"help": "steps per network", "min": 1})
    eval_every: int = field(default=20, metadata={"help": "steps between evaluations", "min": 1})
    seeds: int = field(default=2, metadata={"help": "seeds per variant", "min": 1})
    lr: float = field(default=0.2, metadata={"help": "SGD learning rate", "gt": 0})
    batch_size: int = field(default=32, metadata={"help": "mini-batch", "min": 2})
    norm: str = field(default="both", metadata={"help": "variants", "choices": ("both", "bn")})
    dropout: float = field(default=0.1, metadata={"help": "dropout", "min": 0, "max": 0.9})


def model(norm: bool, dropout: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, 32, bias=not norm)]
    if norm:
        layers.append(BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 4)]
    return nn.Sequential(*layers)


def run(cfg: ToyConfig, run_dir, progress: bool) -> dict:
    data = load_synthetic(n_train=256, n_test=128, num_classes=4, image_shape=(16,), seed=3)
    run_dir.update(dataset={"name": "synthetic", "train": 256, "test": 128})
    stop_at = int(os.environ.get("TOY_INTERRUPT_AT", "0"))

    def measure(m, step):
        if stop_at and step >= stop_at:
            raise KeyboardInterrupt
        w = m[1].weight
        return {"weight_norm": float(w.detach().norm())}

    variants = ["bn"] if cfg.norm == "bn" else ["plain", "bn"]
    status = {}
    for variant in variants:
        for seed in range(cfg.seeds):
            net = model(variant == "bn", cfg.dropout, seed)
            opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9)
            res = fit(
                net, opt, (data.x_train, data.y_train), (data.x_test, data.y_test),
                steps=cfg.steps, batch_size=cfg.batch_size, seed=seed,
                schedule=lambda t: 1.0 - 0.5 * t / cfg.steps, eval_every=cfg.eval_every,
                run=run_dir, tags={"variant": variant, "seed": seed}, measure=measure,
                progress=progress,
            )  # fmt: skip
            status[f"{variant}/{seed}"] = res.status
    return {"fits": status}


def report(files) -> Summary:
    variants = sorted({r["variant"] for r in files.rows})
    with plots.style():
        fig, (ax,) = plots.figure(1)
        finals = {}
        for v in variants:
            rows = files.select("test_acc", variant=v)
            steps = sorted({r["step"] for r in rows})
            seeds = sorted({r["seed"] for r in rows})
            table = {(r["step"], r["seed"]): r["test_acc"] for r in rows}
            vals = [[table.get((s, sd), float("nan")) for sd in seeds] for s in steps]
            plots.band(ax, steps, vals, plots.COLORS.get(v, "#2ca02c"), v)
            finals[v] = sum(vals[-1]) / len(vals[-1])
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy")
        ax.legend()
        plots.save(fig, files.path / "toy.png")
    bn = finals.get("bn")
    claim = Claim.check("1", "the BN network ends above chance",
                        "no BN row yet" if bn is None else f"{bn:.3f}",
                        None if bn is None else bn > 0.25)
    return Summary(
        title="Toy experiment",
        headline=["final accuracy: " + ", ".join(f"{v} {a:.3f}" for v, a in finals.items())],
        sections=[
            Section("Curves", figures=[Figure("toy.png", "Test accuracy", "BN learns.")]),
            Section("Result", tables=[Table("Final", ["variant", "acc"],
                                            [[v, f"{a:.3f}"] for v, a in finals.items()])],
                    claims=[claim]),
        ],
    )


EXPERIMENT = register(
    Experiment(
        name="toy",
        description="toy: BN vs plain on synthetic data (tests)",
        config=ToyConfig,
        run=run,
        report=report,
        quick={"steps": 20, "eval_every": 10},
        examples=("bnlab run toy --steps 40",),
    ),
    replace=True,
)
