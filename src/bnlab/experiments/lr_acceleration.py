"""Figures 2 and 3 of Ioffe & Szegedy (2015), section 4.2: learning-rate acceleration with Batch
Normalization on an Inception network, scaled down to a CPU.

The paper trains its Inception variant on ImageNet, then the same network with BN before each
nonlinearity, and with BN plus the section 4.2.1 changes at 5x and 30x the learning rate, and with
sigmoid units; with BN it reaches the baseline's best accuracy in 14 times fewer steps (Figure 3).
Here the network is :class:`~bnlab.models.SmallInception` on Fashion-MNIST (or CIFAR-10), and the
seven variants of :data:`VARIANTS` train with SGD with momentum through :func:`bnlab.train.fit`:

==================  ======  =======  =========  =======================================
variant             norm    units    lr         section 4.2.1 changes
==================  ======  =======  =========  =======================================
baseline            none    ReLU     base       no (dropout, weight decay, base decay)
bn-baseline         BN      ReLU     base       no
bn-x5               BN      ReLU     5 x base   yes: no dropout, weight decay / 5,
bn-x30              BN      ReLU     30 x base       learning-rate decay 6x faster
bn-x5-sigmoid       BN      sigmoid  5 x base   yes
baseline-x5         none    ReLU     5 x base   yes (bn-x5 without BN)
baseline-sigmoid    none    sigmoid  5 x base   yes (bn-x5-sigmoid without BN)
==================  ======  =======  =========  =======================================

The last two are the controls the paper reports in words (plain Inception at BN-x5's rate
diverged; plain Inception with sigmoids stayed at chance); each is its BN variant with the
normalization removed and everything else equal, so the comparison isolates BN.

**The base learning rate** is tuned for the baseline, not borrowed: unless ``--base-lr`` is given,
the baseline trains once per rate of ``--sweep-lrs`` (seed ``--seed``, ``--sweep-fraction`` of the
run's steps with the learning-rate schedule scaled to them) on the training set minus a held-out
validation split, and the rate with the best validation accuracy becomes the base rate of every
variant. When the best rate lies at an edge of the grid, the grid grows by two rates beyond it (x2
and x4, or /2 and /4) and those train too, up to ``--sweep-extend`` times, so the optimum is
bracketed rather than assumed. The sweep's rows (``phase="sweep"``) stay in the run's
``metrics.jsonl`` and the report shows them. The learning rate decays exponentially, by
``--lr-decay`` over the run for the baseline and 6 times faster (``lr_decay ** 6``) for the
variants with the section 4.2.1 changes.

Trainings run in worker processes (one per core, one thread each, by default), each writing its
rows through the parent; every training checkpoints after each evaluation, so
``bnlab run lr-acceleration --resume DIR`` continues an interrupted run to the same numbers.
The analysis and the report are in :mod:`bnlab.experiments.lr_acceleration_report`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runs import RunDir, read_metrics
from . import lr_acceleration_report as analysis
from ._workers import set_threads as _set_threads
from ._workers import thread_env as _thread_env
from .protocol import Experiment, register

__all__ = ["LrAccelerationConfig", "VARIANTS", "Variant", "QUICK", "EXPERIMENT", "run",
           "plan_jobs", "choose_base_lr", "data_problem"]

NAME = "lr-acceleration"
DESCRIPTION = ("Figures 2-3: BN-x5 / BN-x30 / BN-x5-Sigmoid on a small Inception network, "
               "steps to reach the tuned baseline's best")
DATASETS = ("fashion-mnist", "cifar10", "mnist", "synthetic")


@dataclass(frozen=True)
class Variant:
    """One network of Figures 2-3: normalization on or off, its units, its learning rate as a
    multiple of the base rate, and whether it takes the section 4.2.1 changes (no dropout,
    weight decay / 5, learning-rate decay 6x faster)."""

    name: str
    bn: bool
    act: str
    lr_mult: float
    changes: bool


VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", False, "relu", 1.0, False),
    Variant("bn-baseline", True, "relu", 1.0, False),
    Variant("bn-x5", True, "relu", 5.0, True),
    Variant("bn-x30", True, "relu", 30.0, True),
    Variant("bn-x5-sigmoid", True, "sigmoid", 5.0, True),
    Variant("baseline-x5", False, "relu", 5.0, True),
    Variant("baseline-sigmoid", False, "sigmoid", 5.0, True),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
#: Section 4.2.1: weight decay divided by this, learning-rate decay this many times faster.
WD_DIVISOR, DECAY_SPEEDUP = 5.0, 6.0


def _parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--sweep-lrs must be comma-separated numbers, e.g. 0.01,0.02,0.05; got {text!r}"
        ) from None
    if not lrs or any(not (lr > 0 and lr < float("inf")) for lr in lrs):
        raise ValueError(f"--sweep-lrs must list positive finite learning rates; got {text!r}")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"--sweep-lrs lists a rate twice: {text!r}")
    return sorted(lrs)


def _parse_variants(text: str) -> list[str]:
    if text.strip() == "all":
        return list(VARIANT_NAMES)
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if not names or unknown:
        raise ValueError(
            f"--variants must be 'all' or a comma-separated list of {', '.join(VARIANT_NAMES)}; "
            f"got {text!r}"
        )
    return [n for n in VARIANT_NAMES if n in names]  # table order, no repeats


def data_problem(dataset: str) -> str | None:
    """Why ``dataset`` cannot be loaded without a download (a sentence saying how to get it), or
    None when it can. Reads no file contents."""
    from ..data.datasets import CIFAR10_FOLDER
    from ..data.download import RESOURCES, dataset_dir, locate

    if dataset == "synthetic":
        return None
    if dataset == "cifar10":
        d = dataset_dir("cifar10")
        if (d / RESOURCES["cifar10"].files[0].name).is_file() or (d / CIFAR10_FOLDER).is_dir():
            return None
        return (f"--dataset cifar10: CIFAR-10 is not in {d}; get it with `bnlab data fetch "
                "cifar10`, or run on Fashion-MNIST (the default)")
    if locate(dataset) is not None:
        return None
    where = dataset_dir(dataset)
    if dataset == "fashion-mnist":
        alt = "" if data_problem("cifar10") else "; or use `--dataset cifar10`, which is present"
        return (f"--dataset fashion-mnist: Fashion-MNIST is neither in {where} nor in "
                "/usr/share/datasets/fashion-mnist; get it with `bnlab data fetch fashion-mnist` "
                f"or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu){alt}")
    return f"--dataset {dataset}: not in {where}; get it with `bnlab data fetch {dataset}`"


@dataclass
class LrAccelerationConfig:
    """One run of the Figures 2-3 experiment. Every field is a `bnlab run lr-acceleration
    --flag`."""

    dataset: str = field(
        default="fashion-mnist",
        metadata={"help": "fashion-mnist (60,000 / 10,000 28x28 grey images), cifar10 (50,000 / "
                  "10,000 32x32 colour), mnist, or synthetic (seeded blobs, for tests)",
                  "choices": DATASETS},
    )
    steps: int = field(
        default=1600,
        metadata={"help": "SGD steps per training, every variant alike (paper: 31M for its "
                  "baseline on ImageNet)", "min": 1},
    )
    batch_size: int = field(
        default=32, metadata={"help": "examples per mini-batch (paper: 32)", "min": 2}
    )
    eval_every: int = field(
        default=80, metadata={"help": "steps between evaluations on the test set", "min": 1}
    )
    seeds: int = field(default=2, metadata={"help": "seeds per variant", "min": 1})
    seed: int = field(default=0, metadata={"help": "first seed; seeds are seed, seed+1, ...",
                                           "min": 0})
    variants: str = field(
        default="all",
        metadata={"help": "variants to train: all, or a comma-separated list of "
                  + ", ".join(VARIANT_NAMES)},
    )
    base_lr: float = field(
        default=0.0,
        metadata={"help": "the baseline's learning rate; 0: choose it by the sweep over "
                  "--sweep-lrs (paper: 0.0015 for its Inception)", "min": 0},
    )
    sweep_lrs: str = field(
        default="0.01,0.02,0.04,0.08",
        metadata={"help": "learning rates the baseline is tried at (comma-separated); the best "
                  "validation accuracy picks the base rate"},
    )
    sweep_fraction: float = field(
        default=0.5,
        metadata={"help": "fraction of --steps each sweep training runs (its learning-rate "
                  "decay scaled to that length)", "gt": 0, "max": 1},
    )
    sweep_extend: int = field(
        default=2,
        metadata={"help": "times the sweep may add two rates beyond an edge of its grid when "
                  "the best rate lies there", "min": 0},
    )
    val_size: int = field(
        default=3000,
        metadata={"help": "training examples held out as the sweep's validation set (the sweep "
                  "trains on the rest; the variants train on all)", "min": 1},
    )
    test_size: int = field(
        default=3000,
        metadata={"help": "test examples evaluated (the first ones; 0: all)", "min": 0},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: momentum, "
                                                   "value not given)", "min": 0, "max": 1})
    weight_decay: float = field(
        default=5e-4,
        metadata={"help": "L2 weight decay of the baseline and BN-Baseline (divided by 5 with "
                  "the section 4.2.1 changes)", "min": 0},
    )
    dropout: float = field(
        default=0.4,
        metadata={"help": "dropout before the classifier of the baseline and BN-Baseline (none "
                  "with the section 4.2.1 changes)", "min": 0, "max": 0.9},
    )
    lr_decay: float = field(
        default=0.1,
        metadata={"help": "factor by which the baseline's learning rate decays (exponentially) "
                  "over the run; the section 4.2.1 variants decay 6x faster: lr_decay**6",
                  "gt": 0, "max": 1},
    )
    width: int = field(
        default=12, metadata={"help": "channel width of the network (12: 68,000 parameters; "
                              "16: 118,000)", "min": 1}
    )
    norm: str = field(
        default="bn",
        metadata={"help": "the normalization of the BN variants: a family of "
                  "bnlab.layers.make_norm (bn, or one registered later)"},
    )
    fuse_relu: bool = field(
        default=False,
        metadata={"help": "build BN+ReLU as one fused layer (bnlab's kernels) where it applies"},
    )
    channels_last: bool = field(
        default=True, metadata={"help": "NHWC memory format for the network and its inputs"}
    )
    diverge_above: float = field(
        default=1000.0,
        metadata={"help": "a training loss above this (or not finite) ends a training as "
                  "diverged", "gt": 0},
    )
    workers: int = field(
        default=0,
        metadata={"help": "processes training side by side (0: one per core, at most one per "
                  "training)", "min": 0},
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch threads per process (0: cores / workers)", "min": 0},
    )
    download: bool = field(
        default=False, metadata={"help": "download the data set if it is not present"}
    )

    def validate(self) -> None:
        from ..layers import norm_names

        _parse_lrs(self.sweep_lrs)
        _parse_variants(self.variants)
        if self.norm.lower() not in norm_names() or self.norm.lower() == "none":
            raise ValueError(
                f"--norm must name a normalization family: one of "
                f"{', '.join(n for n in norm_names() if n != 'none')}; got {self.norm!r}"
            )
        if self.eval_every > self.steps:
            raise ValueError(f"--eval-every {self.eval_every} is larger than --steps "
                             f"{self.steps}")
        if not self.download:
            problem = data_problem(self.dataset)
            if problem:
                raise FileNotFoundError(problem)

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]


# --quick: a smoke run, every variant and a two-rate sweep, in well under a minute.
QUICK = {"steps": 20, "eval_every": 10, "seeds": 2, "sweep_lrs": "0.01,0.04", "sweep_extend": 0,
         "width": 4, "val_size": 300, "test_size": 300}


# ------------------------------------------------------------------------------------ jobs
def sweep_steps(cfg: LrAccelerationConfig) -> int:
    """Steps of each sweep training: ``sweep_fraction`` of ``steps``, at least 1."""
    return max(1, round(cfg.steps * cfg.sweep_fraction))


def plan_jobs(cfg: LrAccelerationConfig, base_lr: float | None,
              lrs: list[float] | None = None) -> list[dict[str, Any]]:
    """The trainings of a run as plain dicts (what a worker needs): the sweep's at the rates
    ``lrs`` (default ``--sweep-lrs``) when ``base_lr`` is None, else the variants' at
    ``base_lr``. ``tags`` identify each training's rows and checkpoint."""
    jobs = []
    if base_lr is None:
        for lr in lrs if lrs is not None else _parse_lrs(cfg.sweep_lrs):
            jobs.append({
                "tags": {"phase": "sweep", "variant": "baseline", "sweep_lr": lr,
                         "seed": cfg.seed},
                "split": "sweep", "bn": False, "act": "relu", "lr": lr,
                "dropout": cfg.dropout, "weight_decay": cfg.weight_decay,
                "decay": cfg.lr_decay, "steps": sweep_steps(cfg),
            })  # fmt: skip
        return jobs
    for name in _parse_variants(cfg.variants):
        v = next(x for x in VARIANTS if x.name == name)
        for seed in cfg.seed_list:
            jobs.append({
                "tags": {"phase": "main", "variant": v.name, "seed": seed},
                "split": "main", "bn": v.bn, "act": v.act, "lr": base_lr * v.lr_mult,
                "dropout": 0.0 if v.changes else cfg.dropout,
                "weight_decay": cfg.weight_decay / (WD_DIVISOR if v.changes else 1.0),
                "decay": cfg.lr_decay ** (DECAY_SPEEDUP if v.changes else 1.0),
                "steps": cfg.steps,
            })  # fmt: skip
    return jobs


def choose_base_lr(results: Mapping[float, Mapping[str, Any]]) -> tuple[float, dict[str, Any]]:
    """The sweep's winner: the rate whose training reached the highest validation accuracy
    (``best_val_acc``), diverged trainings excluded, the smaller rate on a tie. Returns the rate
    and a record of the choice (scores, whether it lies at an edge of the grid of every rate
    tried, diverged ones included). ValueError when every rate diverged."""
    scores = {lr: r.get("best_val_acc") for lr, r in results.items()
              if r.get("status") != "diverged" and r.get("best_val_acc") is not None}
    if not scores:
        raise ValueError(
            "the baseline diverged at every rate of --sweep-lrs; give smaller rates, or the base "
            "rate itself with --base-lr"
        )
    best = max(scores.values())
    lr = min(x for x, s in scores.items() if s == best)
    grid = sorted(results)
    return lr, {
        "base_lr": lr,
        "scores": {str(x): scores.get(x) for x in grid},
        "edge": "low" if lr == grid[0] and len(grid) > 1 else
                "high" if lr == grid[-1] and len(grid) > 1 else "",
    }  # fmt: skip


def extend_grid(lr: float, edge: str) -> list[float]:
    """The two rates the sweep adds beyond ``lr`` at the ``edge`` ("high": x2 and x4; "low": /2
    and /4)."""
    return [lr * 2, lr * 4] if edge == "high" else [lr / 4, lr / 2]


# ------------------------------------------------------------------------------------ data
def load_data(cfg: LrAccelerationConfig) -> dict[str, Any]:
    """Train / test tensors standardized per channel with the training set's mean and std, the
    sweep's split (a fixed permutation: the first ``val_size`` examples are the validation set),
    and a description of the data for ``config.json``."""
    from ..data import load_dataset, load_synthetic

    if cfg.dataset == "synthetic":
        ds = load_synthetic(n_train=8000, n_test=2000, image_shape=(1, 28, 28), seed=0)
    else:
        ds = load_dataset(cfg.dataset, download=cfg.download, progress=False)
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if cfg.test_size:
        xte, yte = xte[: cfg.test_size], yte[: cfg.test_size]
    if cfg.val_size >= len(ytr):
        raise ValueError(f"--val-size {cfg.val_size} leaves no training examples of the "
                         f"{len(ytr):,} of {ds.name} for the sweep")
    if cfg.batch_size > len(ytr) - cfg.val_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the "
                         f"{len(ytr) - cfg.val_size:,} training examples of the sweep")
    # statistics in float64, so the inputs do not depend on the thread count of the reduction
    mean = xtr.double().mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.double().std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xtr = ((xtr - mean) / std).float()
    xte = ((xte - mean) / std).float()
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(12345))
    val, rest = perm[: cfg.val_size], perm[cfg.val_size :]
    return {
        "train": (xtr, ytr), "test": (xte, yte),
        "sweep_train": (xtr[rest], ytr[rest]), "val": (xtr[val], ytr[val]),
        "num_classes": ds.num_classes, "in_channels": xtr.shape[1],
        "meta": {"name": ds.name, "source": ds.source, "train": len(ytr), "test": len(yte),
                 "test_total": len(ds.y_test), "val": cfg.val_size,
                 "image": list(xtr.shape[1:]), "num_classes": ds.num_classes,
                 "note": getattr(ds, "note", "")},
    }  # fmt: skip


# ------------------------------------------------------------------------------------ training
def build_model(cfg: LrAccelerationConfig, job: Mapping[str, Any], in_channels: int,
                num_classes: int) -> torch.nn.Module:
    """The job's network, initialized from ``torch.manual_seed(seed)``."""
    from ..models import SmallInception

    torch.manual_seed(job["tags"]["seed"])
    model = SmallInception(
        in_channels, num_classes, norm=cfg.norm if job["bn"] else "none", act=job["act"],
        dropout=job["dropout"], width=cfg.width, fuse_relu=cfg.fuse_relu,
    )  # fmt: skip
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_job(cfg: LrAccelerationConfig, job: Mapping[str, Any], data: Mapping[str, Any],
              run: Any) -> dict[str, Any]:
    """One training (a sweep rate or a variant and seed) through :func:`bnlab.train.fit`;
    returns how it ended (status, steps, divergence, best validation accuracy for the sweep,
    wall and CPU seconds of this process)."""
    from ..train import evaluate, fit

    sweep = job["split"] == "sweep"
    train = data["sweep_train"] if sweep else data["train"]
    model = build_model(cfg, job, data["in_channels"], data["num_classes"])
    opt = torch.optim.SGD(model.parameters(), lr=job["lr"], momentum=cfg.momentum,
                          weight_decay=job["weight_decay"])
    prepare = ((lambda x: x.contiguous(memory_format=torch.channels_last))
               if cfg.channels_last else None)
    decay, steps = job["decay"], job["steps"]
    measure = None
    if sweep:
        xv, yv = data["val"]

        def measure(m, step):
            ev = evaluate(m, xv, yv, 500, prepare=prepare)
            return {"val_loss": ev["loss"], "val_acc": ev["acc"]}

    t0, c0 = time.perf_counter(), time.process_time()
    res = fit(
        model, opt, train, None if sweep else data["test"], steps=steps,
        batch_size=cfg.batch_size, seed=job["tags"]["seed"],
        schedule=lambda t: decay ** (t / steps), eval_every=cfg.eval_every,
        prepare=prepare, run=run, tags=job["tags"], diverge_above=cfg.diverge_above,
        measure=measure, train_eval_size=500, eval_batch_size=500,
    )  # fmt: skip
    vals = [r["val_acc"] for r in res.history if r.get("val_acc") is not None]
    return {
        "status": res.status, "steps_done": res.steps_done, "diverged_at": res.diverged_at,
        "reason": res.reason, "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
        "best_val_acc": max(vals) if vals else None, "resumed_from": res.resumed_from,
    }  # fmt: skip


# ------------------------------------------------------------------------------------ workers
class _RunProxy:
    """What :func:`bnlab.train.fit` needs of a :class:`~bnlab.runs.RunDir`, in a worker
    process: rows and row removals go to the parent (the only writer of ``metrics.jsonl``),
    which acknowledges each, so a row is on disk before the checkpoint that follows it."""

    def __init__(self, path, send, ack) -> None:
        from pathlib import Path

        self.path = Path(path)
        self._send, self._ack = send, ack

    @property
    def checkpoint_dir(self):
        d = self.path / "checkpoints"
        d.mkdir(exist_ok=True)
        return d

    def _call(self, kind: str, payload: Any) -> None:
        self._send((kind, payload))
        reply = self._ack.get()
        if reply != "ok":
            raise RuntimeError(f"lr-acceleration: the parent process refused a {kind}: {reply}")

    def log(self, rows) -> None:
        self._call("rows", [rows] if isinstance(rows, Mapping) else list(rows))

    def drop_rows(self, drop: Callable[[dict], bool]) -> int:
        # only this worker writes rows with this training's tags, and none is in flight now
        rows = [r for r in read_metrics(self.path / "metrics.jsonl")[0] if drop(r)]
        if rows:
            self._call("drop", rows)
        return len(rows)


def _worker(cfg, run_path, threads, index, jobs, results, ack) -> None:
    """A worker process: trains the jobs it takes from ``jobs`` until it gets None; every
    message to the parent is ``(kind, worker index, payload)``."""
    import signal
    import traceback

    send = lambda msg: results.put((msg[0], index, msg[1]))  # noqa: E731
    _exit_with_parent()
    try:
        _set_threads(threads)
        data = load_data(cfg)
        proxy = _RunProxy(run_path, send, ack)
        send(("ready", None))
        while (job := jobs.get()) is not None:
            send(("done", (job["tags"], train_job(cfg, job, data, proxy))))
    except KeyboardInterrupt:  # Ctrl-C: the rows and checkpoints so far are on disk
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        send(("interrupted", None))
    except BaseException:  # report, never hang the parent
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        send(("error", traceback.format_exc()))


def _exit_with_parent() -> None:
    """End this process when its parent is gone (killed without a chance to stop the workers),
    instead of training on as an orphan: a thread checks the parent's pid every second."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class _Pool:
    """Worker processes that train jobs and relay their rows to the run directory."""

    def __init__(self, cfg: LrAccelerationConfig, run_dir: RunDir, workers: int, threads: int,
                 on_rows: Callable[[list[dict]], None]) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.run_dir, self.on_rows = run_dir, on_rows
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.acks = [ctx.Queue() for _ in range(workers)]
        self.procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(cfg, str(run_dir.path), threads, i, self.jobs, self.results, ack))
            for i, ack in enumerate(self.acks)
        ]  # fmt: skip
        with _thread_env(threads):
            for p in self.procs:
                p.start()

    def map(self, jobs: list[dict]) -> dict[str, dict]:
        """Train ``jobs``; returns each one's result by its tags' key.

        Ctrl-C (in the terminal: every process gets it; or in this process only: passed on to
        the workers) stops the workers inside their training; what they sent before stopping
        is still written, then KeyboardInterrupt propagates. A second Ctrl-C stops waiting for
        them: the workers are terminated (a resumed run continues from their last checkpoints).
        A worker's failure raises RuntimeError with its traceback."""
        import queue as queue_mod

        for job in jobs:
            self.jobs.put(job)
        pending = {_key(j["tags"]) for j in jobs}
        out: dict[str, dict] = {}
        stopping = False
        presses = 0
        while pending:
            try:
                msg = self.results.get(timeout=1.0)
            except KeyboardInterrupt:
                stopping = True
                presses += 1
                if presses == 1:
                    self._interrupt()
                else:
                    self._terminate()
                continue
            except queue_mod.Empty:
                msg = None
            if msg is not None and self._handle(msg, out, pending) == "interrupted":
                stopping = True
                self._interrupt()
            if (stopping or msg is None) and not any(p.is_alive() for p in self.procs):
                self._drain(out, pending)
                if stopping:
                    raise KeyboardInterrupt
                raise RuntimeError(f"lr-acceleration: every worker exited; {len(pending)} "
                                   "trainings left")
        if stopping:
            raise KeyboardInterrupt
        return out

    def _handle(self, msg: tuple, out: dict, pending: set) -> str:
        kind, index, payload = msg
        if kind == "rows":
            self.run_dir.log(payload)
            self.on_rows(payload)
            self.acks[index].put("ok")
        elif kind == "drop":
            self.run_dir.drop_rows(lambda r, drop=payload: r in drop)
            self.acks[index].put("ok")
        elif kind == "done":
            tags, result = payload
            out[_key(tags)] = result
            pending.discard(_key(tags))
        elif kind == "error":
            raise RuntimeError(f"lr-acceleration: worker {index} failed:\n{payload}")
        return kind

    def _drain(self, out: dict, pending: set) -> None:
        """Handle what exited workers sent and this process has not read yet."""
        import queue as queue_mod

        while True:
            try:
                msg = self.results.get(timeout=0.2)
            except queue_mod.Empty:
                return
            if msg[0] != "error":
                self._handle(msg, out, pending)

    def _interrupt(self) -> None:
        import signal

        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)

    def _terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=10)

    def close(self) -> None:
        for _ in self.procs:
            self.jobs.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def _key(tags: Mapping[str, Any]) -> str:
    return "/".join(f"{k}={v}" for k, v in tags.items())


class _InProcess:
    """The pool's interface in this process (``workers=1``)."""

    def __init__(self, cfg, run_dir, threads, data, on_rows) -> None:
        self.cfg, self.data = cfg, data
        _set_threads(threads)

        class Logged:  # the run directory, telling the progress bar about each row
            path = run_dir.path
            checkpoint_dir = run_dir.checkpoint_dir
            drop_rows = run_dir.drop_rows

            def log(self, rows) -> None:
                run_dir.log(rows)
                on_rows([rows] if isinstance(rows, Mapping) else list(rows))

        self.run = Logged()

    def map(self, jobs: list[dict]) -> dict[str, dict]:
        return {_key(j["tags"]): train_job(self.cfg, j, self.data, self.run) for j in jobs}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------ run
def run(cfg: LrAccelerationConfig, run_dir: RunDir, progress: bool = True) -> dict[str, Any]:
    """The sweep (unless ``--base-lr``), then every variant and seed; rows go to the run's
    ``metrics.jsonl`` as they come. Returns what ``config.json`` records: the base rate and how
    it was chosen, each training's status and time, the phases' wall times."""
    from tqdm.auto import tqdm

    sweep_jobs = [] if cfg.base_lr else plan_jobs(cfg, None)
    n_main = len(_parse_variants(cfg.variants)) * cfg.seeds
    cores = os.cpu_count() or 1
    workers = cfg.workers or max(1, min(cores, max(n_main, len(sweep_jobs))))
    threads = cfg.threads or max(1, cores // workers)
    if workers == 1:
        _set_threads(threads)  # before any computation, the data's included
    data = load_data(cfg)
    from ..models import SmallInception

    params = sum(p.numel() for p in SmallInception(
        data["in_channels"], data["num_classes"], norm=cfg.norm, width=cfg.width).parameters())
    run_dir.update(dataset=data["meta"], seeds=cfg.seed_list, processes=workers, threads=threads,
                   variants=_parse_variants(cfg.variants), params=params,
                   load_average_start=[round(x, 2) for x in os.getloadavg()])
    bar = tqdm(total=sweep_steps(cfg) * len(sweep_jobs) + cfg.steps * n_main, disable=not progress,
               unit="step", dynamic_ncols=True)
    reached: dict[str, int] = {}

    def on_rows(rows: list[dict]) -> None:
        for r in rows:
            reached[_key({k: r[k] for k in ("phase", "variant", "sweep_lr", "seed") if k in r})] = (
                r["step"])
        bar.update(sum(reached.values()) - bar.n)

    pool = (_InProcess(cfg, run_dir, threads, data, on_rows) if workers == 1
            else _Pool(cfg, run_dir, workers, threads, on_rows))
    fits: dict[str, dict] = {}
    timing: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        if sweep_jobs:
            tried: dict[float, dict] = {}
            jobs, added = sweep_jobs, []
            for extension in range(cfg.sweep_extend + 1):
                res = pool.map(jobs)
                fits.update(res)
                tried.update({j["lr"]: res[_key(j["tags"])] for j in jobs})
                base_lr, choice = choose_base_lr(tried)
                if not choice["edge"] or extension == cfg.sweep_extend:
                    break
                new = [lr for lr in extend_grid(base_lr, choice["edge"]) if lr not in tried]
                jobs = plan_jobs(cfg, None, new)
                added += new
                bar.total += sweep_steps(cfg) * len(jobs)
            timing["sweep_s"] = round(time.perf_counter() - t0, 2)
            choice.update(how="sweep", added=added, sweep_steps=sweep_steps(cfg))
        else:
            base_lr, choice = cfg.base_lr, {"base_lr": cfg.base_lr, "how": "given (--base-lr)"}
        run_dir.update(base_lr=choice)
        t1 = time.perf_counter()
        fits.update(pool.map(plan_jobs(cfg, base_lr)))
        timing["variants_s"] = round(time.perf_counter() - t1, 2)
    finally:
        bar.close()
        pool.close()
        timing["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        run_dir.update(fits=fits, timing=timing)
    return {"base_lr": choice, "fits": fits, "timing": timing,
            "diverged": sorted(k for k, f in fits.items() if f["status"] == "diverged")}


EXPERIMENT = register(
    Experiment(
        name=NAME,
        description=DESCRIPTION,
        config=LrAccelerationConfig,
        run=run,
        report=analysis.report,
        quick=QUICK,
        about=(
            "Ioffe & Szegedy (2015), section 4.2 and Figures 2-3, scaled down: a small Inception "
            "network (1x1, 3x3 and double-3x3 branches) on Fashion-MNIST, trained as Baseline, "
            "BN-Baseline, BN-x5, BN-x30 and BN-x5-Sigmoid, plus Baseline-x5 and Baseline-Sigmoid "
            "(the controls the paper reports in words), each with several seeds. The base "
            "learning rate is the best of a sweep on the baseline (or --base-lr). The report "
            "puts the steps each variant needs to reach the baseline's best accuracy beside "
            "the paper's table and checks its claims. Needs Fashion-MNIST (`bnlab data fetch "
            "fashion-mnist`, or Debian's dataset-fashion-mnist package) or CIFAR-10 "
            "(--dataset cifar10)."
        ),
        examples=(
            "bnlab run lr-acceleration",
            "bnlab run lr-acceleration --quick",
            "bnlab run lr-acceleration --base-lr 0.02 --seeds 3",
            "bnlab run lr-acceleration --dataset cifar10 --steps 6000",
            "bnlab run lr-acceleration --variants baseline,bn-x5 --base-lr 0.02",
        ),
        resumable=True,
    )
)
