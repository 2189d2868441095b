"""``bnlab run batch-size``: test error against the normalization batch size, the Group
Normalization paper's Figure 1 at CPU scale (Wu & He 2018, section 4.1: ResNet-50 on ImageNet,
BN's error rises from 23.6% at 32 images per GPU to 34.7% at 2, GN's stays near 24%).

Here a :class:`~bnlab.models.SmallCNN` learns Fashion-MNIST with each normalization of
``--norms`` at each size of ``--batch-sizes``, for ``--seeds`` seeds, every training seeing the
same number of examples (``--examples``) with SGD + momentum, the learning rate scaled linearly
with the SGD batch (``--lr`` at ``--lr-batch`` examples, as the paper's 0.1 N / 32) and decayed
by a cosine over the run:

=========  ===================  =================================================================
norm       SGD batch            statistics of
=========  ===================  =================================================================
bn         B                    the B examples of the step (Ioffe & Szegedy 2015)
brn        B                    the same, renormalized towards the moving averages (Ioffe 2017),
                                the paper's r/d schedule scaled to the training's length
ghost      ``--ghost-batch``    ghost batches of B inside a fixed larger SGD batch (Hoffer et al.
                                2017): the paper's per-GPU BN, and the normalization batch
                                without the small SGD batch
gn, ln     B                    each example alone (batch-independent: B is only the SGD batch)
=========  ===================  =================================================================

With ``--precise-bn`` BN is also evaluated after its population statistics were recomputed
over ``--calibration`` training examples (in training-mode batches of B): what part of BN's loss
at small batches comes from the noisy moving averages rather than from training.

``--nproc N`` runs every training data-parallel on N processes (torch.distributed, gloo; each
process its part of every SGD batch) with BN synchronized over them (``--sync-bn``, the default:
the numbers are those of one process, up to the order of floating-point sums) or per process
(``--no-sync-bn``: BN statistics over B / N examples, the paper's per-GPU BN).

The trainings run in worker processes (one per core, one thread each) and checkpoint, so
``--resume`` continues an interrupted run. The report is in :mod:`.batch_size_report`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runs import RunDir
from . import batch_size_report
from .protocol import Experiment, register
from .small_batch_common import (
    DATASETS,
    data_problem,
    evaluate_recomputed,
    evaluate_sharded,
    jobs_left,
    load_data,
    parse_choices,
    parse_ints,
    parse_widths,
    run_jobs,
)

__all__ = ["BatchSizeConfig", "NORMS", "QUICK", "EXPERIMENT", "plan_jobs", "train_job", "run"]

NAME = "batch-size"
NORMS = batch_size_report.NORMS


@dataclass
class BatchSizeConfig:
    """One run of the batch-size study. Every field is a `bnlab run batch-size --flag`."""

    dataset: str = field(
        default="fashion-mnist",
        metadata={"help": "fashion-mnist (60,000 / 10,000 28x28 clothing images), mnist, or "
                  "synthetic (seeded blobs, for tests)", "choices": DATASETS},
    )
    norms: str = field(
        default="bn,brn,ghost,gn,ln",
        metadata={"help": "normalizations to train, comma-separated, of " + ", ".join(NORMS)},
    )
    batch_sizes: str = field(
        default="2,4,8,16,32,64",
        metadata={"help": "normalization batch sizes B (comma-separated; the SGD batch too, "
                  "except for ghost)"},
    )
    examples: int = field(
        default=24_000,
        metadata={"help": "training examples each training sees (steps = examples / SGD "
                  "batch; 60,000 is one epoch of Fashion-MNIST)", "min": 1},
    )
    seeds: int = field(default=2, metadata={"help": "seeds per normalization and size",
                                            "min": 1})
    seed: int = field(default=0, metadata={"help": "first seed; seeds are seed, seed+1, ...",
                                           "min": 0})
    lr: float = field(
        default=0.1,
        metadata={"help": "SGD learning rate at an SGD batch of --lr-batch, scaled linearly with "
                  "the batch (the Group Norm paper: 0.1 at 32)", "gt": 0},
    )
    lr_batch: int = field(default=32, metadata={"help": "the SGD batch --lr is given for",
                                                "min": 1})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "min": 0, "max": 1})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 weight decay", "min": 0})
    ghost_batch: int = field(
        default=64,
        metadata={"help": "SGD batch of the ghost variant (its ghost batches are the sizes of "
                  "--batch-sizes smaller than this)", "min": 2},
    )
    widths: str = field(default="16,32,64",
                        metadata={"help": "channels of the CNN's three convolutions"})
    train_size: int = field(default=0, metadata={"help": "training examples used (the first "
                                                 "ones; 0: all)", "min": 0})
    test_size: int = field(default=0, metadata={"help": "test examples evaluated (the first "
                                                "ones; 0: all)", "min": 0})
    precise_bn: bool = field(
        default=True,
        metadata={"help": "also evaluate BN with population statistics recomputed over "
                  "--calibration training examples"},
    )
    calibration: int = field(default=2000, metadata={"help": "training examples for "
                                                     "--precise-bn", "min": 2})
    curve_points: int = field(
        default=8, metadata={"help": "training-loss rows (and checkpoints) per training",
                             "min": 1},
    )
    nproc: int = field(
        default=1,
        metadata={"help": "processes per training (data-parallel over torch.distributed, "
                  "gloo)", "min": 1},
    )
    sync_bn: bool = field(
        default=True,
        metadata={"help": "with --nproc > 1: BN statistics over the whole SGD batch "
                  "(SyncBatchNorm); --no-sync-bn: per process"},
    )
    workers: int = field(
        default=0,
        metadata={"help": "trainings side by side (0: cores / nproc)", "min": 0},
    )
    threads: int = field(default=1, metadata={"help": "torch threads per process", "min": 1})
    download: bool = field(default=False,
                           metadata={"help": "download the data set if it is not present"})

    @property
    def norm_list(self) -> list[str]:
        return parse_choices(self.norms, NORMS, "--norms")

    @property
    def size_list(self) -> list[int]:
        return parse_ints(self.batch_sizes, "--batch-sizes", minimum=2)

    @property
    def width_list(self) -> list[int]:
        return parse_widths(self.widths)

    def validate(self) -> None:
        self.norm_list  # noqa: B018  (checks --norms)
        sizes = self.size_list
        self.width_list  # noqa: B018  (checks --widths)
        if self.examples < max(sizes + [self.ghost_batch]):
            raise ValueError(f"--examples {self.examples} is smaller than the largest SGD batch")
        if self.train_size and self.train_size < max(sizes + [self.ghost_batch]):
            raise ValueError(f"--train-size {self.train_size} is smaller than the largest SGD "
                             "batch")  # fmt: skip
        if self.nproc > 1 and min(sizes) < self.nproc:
            raise ValueError(f"--nproc {self.nproc}: every batch of --batch-sizes needs at "
                             f"least one example per process; got {min(sizes)}")  # fmt: skip
        if not self.download:
            problem = data_problem(self.dataset)
            if problem:
                raise FileNotFoundError(problem)


# --quick: a smoke run on a few thousand examples, every normalization at three sizes.
QUICK = {"batch_sizes": "4,32", "examples": 1200, "ghost_batch": 32, "train_size": 4000,
         "test_size": 1000, "calibration": 256, "curve_points": 2, "widths": "8,16,16"}


# ------------------------------------------------------------------------------ jobs
def plan_jobs(cfg: BatchSizeConfig, checkpoint_dir: Any = None) -> list[dict[str, Any]]:
    """The trainings of a run, longest (smallest SGD batch) first. ``tags`` identify each
    training's rows: ``norm``, ``batch`` (normalization batch B) and ``seed``."""
    jobs = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for norm in cfg.norm_list:
            for b in cfg.size_list:
                if norm == "ghost" and b >= cfg.ghost_batch:
                    continue  # one ghost batch: plain BN at --ghost-batch
                sgd = cfg.ghost_batch if norm == "ghost" else b
                tags = {"norm": norm, "batch": b, "seed": seed}
                key = f"{norm}-b{b}-s{seed}"
                jobs.append({
                    "key": key, "tags": tags, "norm": norm, "batch": b, "sgd_batch": sgd,
                    "steps": max(1, cfg.examples // sgd), "seed": seed,
                    "lr": cfg.lr * sgd / cfg.lr_batch,
                    "checkpoint": None if checkpoint_dir is None else
                    os.path.join(str(checkpoint_dir), key + ".pt"),
                })  # fmt: skip
    jobs.sort(key=lambda j: (j["sgd_batch"], j["norm"], j["seed"]))
    return jobs


def setup(cfg: BatchSizeConfig):
    """A worker's data (loaded once per process)."""
    return load_data(cfg.dataset, cfg.download, cfg.train_size, cfg.test_size)


def build_model(cfg: BatchSizeConfig, job: dict[str, Any], in_channels: int, classes: int):
    """The job's network, initialized from ``torch.manual_seed(seed)`` (the same convolution
    weights for every normalization)."""
    from ..layers import convert_sync, renorm_schedule
    from ..models import SmallCNN

    norm, kwargs = job["norm"], {}
    if norm == "brn":
        kwargs = renorm_schedule(job["steps"])
    elif norm == "ghost":
        kwargs = {"virtual_batch_size": job["batch"]}
    torch.manual_seed(job["seed"])
    model = SmallCNN(in_channels, classes, cfg.width_list, norm, kwargs)
    if cfg.nproc > 1 and cfg.sync_bn and norm == "bn":
        model = convert_sync(model)
    return model


def train_job(cfg: BatchSizeConfig, data, job: dict[str, Any]) -> dict[str, Any]:
    """One training through :func:`bnlab.train.fit`; the last row gets the test figures (and
    BN's with recomputed population statistics)."""
    from ..train import fit

    steps = job["steps"]
    model = build_model(cfg, job, data.x_train.shape[1], data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=job["lr"], momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)  # fmt: skip

    def measure(m, step):
        if step != steps:
            return {}
        ev = evaluate_sharded(m, data.x_test, data.y_test)
        out = {"test_loss": ev["loss"], "test_acc": ev["acc"], "final": True}
        if cfg.precise_bn and job["norm"] == "bn":
            cal = data.x_train[: cfg.calibration]
            pr = evaluate_recomputed(m, cal, job["batch"], data.x_test, data.y_test)
            out["test_acc_precise"] = pr["acc"]
        return out

    res = fit(
        model, opt, (data.x_train, data.y_train), None, steps=steps, batch_size=job["sgd_batch"],
        seed=job["seed"], schedule=lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)),
        eval_every=max(1, steps // cfg.curve_points), tags={**job["tags"],
        "sgd_batch": job["sgd_batch"]}, checkpoint=job["checkpoint"], measure=measure,
        train_eval_size=0,
    )  # fmt: skip
    return {"history": res.history, "status": res.status, "steps_done": res.steps_done,
            "resumed_from": res.resumed_from, "reason": res.reason}  # fmt: skip


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run(cfg: BatchSizeConfig, run_dir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train every job not yet finished in ``run_dir`` and append its rows."""
    data = load_data(cfg.dataset, cfg.download, cfg.train_size, cfg.test_size)
    jobs = plan_jobs(cfg, run_dir.checkpoint_dir)
    left = jobs_left(jobs, run_dir.rows())
    workers = cfg.workers or max(1, _cores() // cfg.nproc)
    trainings: dict[str, Any] = dict(run_dir.meta.get("trainings") or {})
    run_dir.update(dataset=data.meta, processes=workers * cfg.nproc, threads=cfg.threads,
                   planned=len(jobs))  # fmt: skip
    del data

    def on_done(job: dict, result: dict) -> None:
        tags = {**job["tags"], "sgd_batch": job["sgd_batch"]}
        run_dir.drop_rows(lambda r: all(r.get(k) == v for k, v in tags.items()))
        run_dir.log(result["history"])
        trainings[job["key"]] = {k: result.get(k) for k in ("status", "seconds", "steps_done",
                                                             "resumed_from", "reason")}  # fmt: skip
        run_dir.update(trainings=trainings)

    run_jobs(cfg, left, setup, train_job, on_done, workers=workers, nproc=cfg.nproc,
             threads=cfg.threads, progress=progress, label=NAME)  # fmt: skip
    return {"trainings": trainings}


EXPERIMENT = register(
    Experiment(
        name=NAME,
        description="Group Norm paper Fig. 1 at CPU scale: test error vs batch size for BN, "
        "batch renorm, ghost BN, GN, LN",
        config=BatchSizeConfig,
        run=run,
        report=batch_size_report.report,
        quick=QUICK,
        about=(
            "Trains a small CNN on Fashion-MNIST with BN, batch renormalization, ghost BN, "
            "group norm and layer norm at normalization batch sizes from 2 to 64 (same number "
            "of examples for each, learning rate scaled linearly with the batch), several seeds, "
            "and compares the test errors with the Group Normalization paper's (Wu & He 2018, "
            "Figure 1). `--nproc 2` trains each network on 2 processes with synchronized BN "
            "(same numbers as one process)."
        ),
        examples=(
            "bnlab run batch-size",
            "bnlab run batch-size --quick",
            "bnlab run batch-size --norms bn,gn --batch-sizes 2,8,32 --seeds 3",
            "bnlab run batch-size --nproc 2 --norms bn --batch-sizes 4,16",
        ),
    )
)
