"""``bnlab run non-iid``: training on non-i.i.d. mini-batches, the Batch Renormalization
paper's section 4.3 experiment scaled to 10 classes (Ioffe 2017: Inception-v3 on ImageNet with
mini-batches of 16 labels x 2 images).

Every training step of the non-i.i.d. variants draws its batch of ``--batch-size`` examples
from ``--labels-per-batch`` classes only (``batch-size / labels-per-batch`` examples of each,
:class:`bnlab.train.LabelBatches`), so the batch statistics BN normalizes with in training are
those of a few classes, far from the population statistics it uses at inference. Variants
(a :class:`~bnlab.models.SmallCNN` on Fashion-MNIST, SGD + momentum, cosine decay):

==========  =========================================================================
bn-iid      BN on ordinary shuffled batches (the reference the others are measured to)
bn          BN on the non-i.i.d. batches
brn         batch renormalization on the same batches (the paper's schedule, scaled)
ghost       ghost BN on the same batches, statistics over halves (``--virtual-batch``)
gn          group normalization (batch-independent) on the same batches
==========  =========================================================================

Besides the usual inference-mode test accuracy, the BN networks are also evaluated with
test-batch statistics ("BN evaluated with test-batch statistics"): every test batch of
``--batch-size`` normalized with its own statistics, once with i.i.d. test batches and once with
test batches made like the training ones (``labels-per-batch`` classes each).

The trainings run in worker processes (one per core, one thread each) and checkpoint;
``--resume`` continues an interrupted run. The report is in :mod:`.non_iid_report`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runs import RunDir
from . import non_iid_report
from .protocol import Experiment, register
from .small_batch_common import (
    DATASETS,
    data_problem,
    evaluate_batch_stats,
    evaluate_sharded,
    jobs_left,
    load_data,
    parse_choices,
    parse_widths,
    run_jobs,
)

__all__ = ["NonIidConfig", "VARIANTS", "QUICK", "EXPERIMENT", "plan_jobs", "train_job", "run",
           "grouped_order"]  # fmt: skip

NAME = "non-iid"
VARIANTS = non_iid_report.VARIANTS


@dataclass
class NonIidConfig:
    """One run of the non-i.i.d. study. Every field is a `bnlab run non-iid --flag`."""

    dataset: str = field(
        default="fashion-mnist",
        metadata={"help": "fashion-mnist (60,000 / 10,000 28x28 clothing images), mnist, or "
                  "synthetic (seeded blobs, for tests)", "choices": DATASETS},
    )
    variants: str = field(
        default="bn-iid,bn,brn,ghost,gn",
        metadata={"help": "variants to train, comma-separated, of " + ", ".join(VARIANTS)},
    )
    batch_size: int = field(default=32, metadata={"help": "examples per SGD step", "min": 2})
    labels_per_batch: int = field(
        default=2,
        metadata={"help": "classes each non-i.i.d. batch is drawn from (it holds batch-size / "
                  "labels-per-batch examples of each; the paper: 16 of 1,000 ImageNet classes "
                  "x 2 images)", "min": 1},
    )
    virtual_batch: int = field(
        default=16,
        metadata={"help": "ghost batch of the ghost variant (the paper's 'BN on half-batches': "
                  "batch-size / 2)", "min": 1},
    )
    examples: int = field(
        default=90_000,
        metadata={"help": "training examples each training sees (60,000 is one epoch of "
                  "Fashion-MNIST)", "min": 1},
    )
    seeds: int = field(default=3, metadata={"help": "seeds per variant", "min": 1})
    seed: int = field(default=0, metadata={"help": "first seed; seeds are seed, seed+1, ...",
                                           "min": 0})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate", "gt": 0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "min": 0, "max": 1})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 weight decay", "min": 0})
    widths: str = field(default="16,32,64",
                        metadata={"help": "channels of the CNN's three convolutions"})
    train_size: int = field(default=0, metadata={"help": "training examples used (the first "
                                                 "ones; 0: all)", "min": 0})
    test_size: int = field(default=0, metadata={"help": "test examples evaluated (the first "
                                                "ones; 0: all)", "min": 0})
    curve_points: int = field(
        default=8, metadata={"help": "training-loss rows (and checkpoints) per training",
                             "min": 1},
    )
    workers: int = field(default=0, metadata={"help": "trainings side by side (0: one per "
                                              "core)", "min": 0})
    threads: int = field(default=1, metadata={"help": "torch threads per process", "min": 1})
    download: bool = field(default=False,
                           metadata={"help": "download the data set if it is not present"})

    @property
    def variant_list(self) -> list[str]:
        return parse_choices(self.variants, VARIANTS, "--variants")

    @property
    def width_list(self) -> list[int]:
        return parse_widths(self.widths)

    def validate(self) -> None:
        self.variant_list  # noqa: B018  (checks --variants)
        self.width_list  # noqa: B018  (checks --widths)
        if self.batch_size % self.labels_per_batch:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of "
                             f"--labels-per-batch {self.labels_per_batch}")  # fmt: skip
        if self.labels_per_batch > 10:
            raise ValueError(f"--labels-per-batch {self.labels_per_batch}: the data sets have "
                             "10 classes")  # fmt: skip
        if self.examples < self.batch_size:
            raise ValueError(f"--examples {self.examples} is smaller than --batch-size")
        if not self.download:
            problem = data_problem(self.dataset)
            if problem:
                raise FileNotFoundError(problem)


# --quick: a smoke run, every variant, a few hundred steps' worth of examples.
QUICK = {"examples": 2400, "seeds": 2, "train_size": 4000, "test_size": 1000, "curve_points": 2,
         "widths": "8,16,16"}


# ------------------------------------------------------------------------------ jobs
def plan_jobs(cfg: NonIidConfig, checkpoint_dir: Any = None) -> list[dict[str, Any]]:
    """The trainings of a run; ``tags``: ``variant`` and ``seed``."""
    jobs = []
    steps = max(1, cfg.examples // cfg.batch_size)
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for variant in cfg.variant_list:
            key = f"{variant}-s{seed}"
            jobs.append({
                "key": key, "tags": {"variant": variant, "seed": seed}, "variant": variant,
                "steps": steps, "seed": seed,
                "checkpoint": None if checkpoint_dir is None else
                os.path.join(str(checkpoint_dir), key + ".pt"),
            })  # fmt: skip
    return jobs


def setup(cfg: NonIidConfig):
    return load_data(cfg.dataset, cfg.download, cfg.train_size, cfg.test_size)


def grouped_order(labels: torch.Tensor, labels_per_batch: int, per_label: int,
                  seed: int = 0) -> torch.Tensor:  # fmt: skip
    """An order of the examples in which consecutive batches of ``labels_per_batch *
    per_label`` hold ``labels_per_batch`` classes, ``per_label`` examples each (as far as the
    class sizes allow): the classes are split into seeded groups of ``labels_per_batch``, and
    each group's examples are interleaved in blocks of ``per_label``. Every example appears
    once."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    classes = classes[torch.randperm(len(classes), generator=g)].tolist()
    order = []
    for i in range(0, len(classes), labels_per_batch):
        members = [torch.nonzero(labels == c).flatten() for c in classes[i : i + labels_per_batch]]
        members = [m[torch.randperm(len(m), generator=g)] for m in members]
        longest = max(len(m) for m in members)
        for start in range(0, longest, per_label):
            for m in members:
                order.append(m[start : start + per_label])
    return torch.cat(order)


def build_model(cfg: NonIidConfig, job: dict[str, Any], in_channels: int, classes: int):
    from ..layers import renorm_schedule
    from ..models import SmallCNN

    variant = job["variant"]
    norm, kwargs = {"bn-iid": ("bn", {}), "bn": ("bn", {}),
                    "brn": ("brn", renorm_schedule(job["steps"])),
                    "ghost": ("ghost", {"virtual_batch_size": cfg.virtual_batch}),
                    "gn": ("gn", {})}[variant]  # fmt: skip
    torch.manual_seed(job["seed"])
    return SmallCNN(in_channels, classes, cfg.width_list, norm, kwargs)


def train_job(cfg: NonIidConfig, data, job: dict[str, Any]) -> dict[str, Any]:
    from ..train import LabelBatches, fit

    steps, variant = job["steps"], job["variant"]
    model = build_model(cfg, job, data.x_train.shape[1], data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    per_label = cfg.batch_size // cfg.labels_per_batch
    sampler = None
    if variant != "bn-iid":
        sampler = LabelBatches(data.y_train, cfg.labels_per_batch, per_label, job["seed"])

    def measure(m, step):
        if step != steps:
            return {}
        ev = evaluate_sharded(m, data.x_test, data.y_test)
        out = {"test_loss": ev["loss"], "test_acc": ev["acc"], "final": True}
        if variant in ("bn", "bn-iid"):
            iid = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(0))
            grouped = grouped_order(data.y_test, cfg.labels_per_batch, per_label)
            out["test_acc_batch_stats"] = evaluate_batch_stats(
                m, data.x_test, data.y_test, cfg.batch_size, iid)["acc"]
            out["test_acc_batch_stats_grouped"] = evaluate_batch_stats(
                m, data.x_test, data.y_test, cfg.batch_size, grouped)["acc"]  # fmt: skip
        return out

    res = fit(
        model, opt, (data.x_train, data.y_train), None, steps=steps, batch_size=cfg.batch_size,
        seed=job["seed"], sampler=sampler,
        schedule=lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)),
        eval_every=max(1, steps // cfg.curve_points), tags=job["tags"],
        checkpoint=job["checkpoint"], measure=measure, train_eval_size=0,
    )  # fmt: skip
    return {"history": res.history, "status": res.status, "steps_done": res.steps_done,
            "resumed_from": res.resumed_from, "reason": res.reason}  # fmt: skip


def run(cfg: NonIidConfig, run_dir: RunDir, progress: bool = True) -> dict[str, Any]:
    data = load_data(cfg.dataset, cfg.download, cfg.train_size, cfg.test_size)
    per_label = cfg.batch_size // cfg.labels_per_batch
    counts = torch.bincount(data.y_train)
    if int((counts >= per_label).sum()) < cfg.labels_per_batch:
        raise ValueError(f"--labels-per-batch {cfg.labels_per_batch} x {per_label}: fewer "
                         "classes have that many training examples")  # fmt: skip
    jobs = plan_jobs(cfg, run_dir.checkpoint_dir)
    left = jobs_left(jobs, run_dir.rows())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    workers = cfg.workers or cores
    trainings: dict[str, Any] = dict(run_dir.meta.get("trainings") or {})
    run_dir.update(dataset=data.meta, processes=workers, threads=cfg.threads,
                   planned=len(jobs))  # fmt: skip
    del data

    def on_done(job: dict, result: dict) -> None:
        tags = job["tags"]
        run_dir.drop_rows(lambda r: all(r.get(k) == v for k, v in tags.items()))
        run_dir.log(result["history"])
        trainings[job["key"]] = {k: result.get(k) for k in ("status", "seconds", "steps_done",
                                                             "resumed_from", "reason")}  # fmt: skip
        run_dir.update(trainings=trainings)

    run_jobs(cfg, left, setup, train_job, on_done, workers=workers, threads=cfg.threads,
             progress=progress, label=NAME)  # fmt: skip
    return {"trainings": trainings}


EXPERIMENT = register(
    Experiment(
        name=NAME,
        description="Batch Renorm paper sec. 4.3 at CPU scale: non-i.i.d. batches (few labels "
        "each), BN vs BRN vs ghost BN vs test-batch statistics",
        config=NonIidConfig,
        run=run,
        report=non_iid_report.report,
        quick=QUICK,
        about=(
            "Trains a small CNN on Fashion-MNIST with mini-batches drawn from 2 of the 10 "
            "classes (16 examples of each), with BN, batch renormalization, ghost BN (half "
            "batches) and group norm, against BN on ordinary batches; evaluates BN also with "
            "test-batch statistics, and compares with the Batch Renormalization paper's "
            "numbers (Ioffe 2017, section 4.3)."
        ),
        examples=(
            "bnlab run non-iid",
            "bnlab run non-iid --quick",
            "bnlab run non-iid --labels-per-batch 4 --seeds 2",
        ),
    )
)
