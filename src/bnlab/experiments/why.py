"""Why Batch Normalization works: the claims of Bjorck, Gomes, Selman & Weinberger, "Understanding
Batch Normalization" (NeurIPS 2018), and the noisy-BN experiment of Santurkar, Tsipras, Ilyas &
Madry, "How Does Batch Normalization Help Optimization?" (NeurIPS 2018, section 2.1), on
CIFAR-style ResNets (:class:`~bnlab.models.ResNetCifar`, with and without BN) on Fashion-MNIST
(CIFAR-10 when it is present).

One section per claim (the ``--only`` names; numbers 1-7 work too):

1. ``sweep``: learning-rate sweep with and without BN (final test/train accuracy against lr);
2. ``landscape``: relative loss along the gradient against the step size, at initialization and
   after ``landscape_after`` steps (each network at its usual rate: 0.1 with BN, 1e-4 without);
3. ``gradients``: a middle layer's weight gradients at initialization (scale, kurtosis);
4. ``depth``: channel mean and std of every convolution's output at initialization (ResNet-110);
5. ``bias``: output gradients and predicted classes at initialization; kernel-gradient similarity;
6. ``spectra``: singular values of products of 1, 3, 5 Gaussian matrices;
7. ``noisy``: noisy BN vs BN vs no BN (and the noise without BN) at one learning rate.

Analyses (2)-(6) at initialization run in this process and write one ``metrics.jsonl`` row each
(``section``: the name). The trainings (1), (7) and, when the sweep does not already train them,
the two networks of (2) run through :func:`bnlab.train.fit`, in worker processes (one thread each:
on this machine two one-thread trainings side by side do about twice the work of one two-thread
training); each training's rows (its evaluations, then an ``event: "end"`` row) are appended
together when it ends. ``--resume`` skips the analyses and trainings already recorded and
continues the others from their checkpoints. The report is :mod:`bnlab.experiments.why_report`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..runs import RunDir
from . import why_report
from ._workers import set_threads as _set_threads
from ._workers import thread_env as _thread_env
from .protocol import Experiment, register
from .why_analyses import (
    channel_stats_by_depth,
    conv_layers,
    gradient_snapshot,
    product_singular_values,
    relative_loss,
    spectrum_skew,
)

__all__ = ["WhyConfig", "SECTIONS", "Job", "jobs", "load_data", "build_model", "run_job", "run",
           "EXPERIMENT"]

#: The sections, in the order of the claims (1-7).
SECTIONS = why_report.SECTIONS
#: Noisy-BN variants (section 7): norm family of the ResNet.
NOISY_VARIANTS = ("bn", "noisy-bn", "none", "noise")
#: Step sizes of the landscape (section 2): 4 per decade from 1e-5 to 10.
STEP_SIZES = tuple(10 ** (k / 4) for k in range(-20, 5))
BN_IMPLS = ("bnlab", "bnlab-relu", "torch")


def _parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"{flag} must be positive finite numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} has repeated values: {text!r}")
    return sorted(values)


def parse_sections(text: str) -> list[str]:
    """``"all"`` or comma-separated section names or numbers 1-7 -> names in claim order."""
    if text.strip().lower() == "all":
        return list(SECTIONS)
    chosen = set()
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part.isdigit() and 1 <= int(part) <= len(SECTIONS):
            chosen.add(SECTIONS[int(part) - 1])
        elif part in SECTIONS:
            chosen.add(part)
        else:
            raise ValueError(
                f"--only: unknown section {part!r}; choose from all, {', '.join(SECTIONS)} "
                "(or their numbers 1-7)"
            )
    if not chosen:
        raise ValueError("--only names no section")
    return [s for s in SECTIONS if s in chosen]


@dataclass
class WhyConfig:
    """One run of `bnlab run why`. Every field is a flag."""

    only: str = field(default="all", metadata={
        "help": "sections to run, comma-separated: sweep, landscape, gradients, depth, bias, "
        "spectra, noisy (or 1-7); all: every one"})
    dataset: str = field(default="auto", metadata={
        "help": "auto: CIFAR-10 if present, else Fashion-MNIST; synthetic: seeded blobs (tests)",
        "choices": ("auto", "fashion-mnist", "cifar10", "synthetic")})
    download: bool = field(default=False, metadata={
        "help": "download the data set if it is missing (the only step that goes online)"})
    depth: int = field(default=20, metadata={
        "help": "ResNet depth (6n+2) of the sweep (1), the landscape (2) and noisy BN (7)",
        "min": 8})
    deep_depth: int = field(default=110, metadata={
        "help": "ResNet depth of the analyses at initialization (3)-(5) (paper: 110)", "min": 8})
    bn_impl: str = field(default="bnlab-relu", metadata={
        "help": "BN layers: bnlab (fused kernels), bnlab-relu (bnlab with fused BN+ReLU), torch "
        "(torch.nn.BatchNorm2d); the default measured fastest for these ResNets (see "
        "benchmarks/RESULTS.md)", "choices": BN_IMPLS})
    channels_last: bool = field(default=True, metadata={
        "help": "channels_last memory format for the trainings (faster convolutions on CPU)"})
    lrs: str = field(default="0.0001,0.001,0.01,0.1,1", metadata={
        "help": "learning rates of the sweep (1), comma-separated"})
    seeds: int = field(default=2, metadata={"help": "seeds per sweep point", "min": 1})
    seed: int = field(default=0, metadata={"help": "first seed (seeds are seed, seed+1, ...)",
                                           "min": 0})
    steps: int = field(default=200, metadata={
        "help": "SGD steps of each sweep training; the rate drops 10x at half and at three "
        "quarters of them (the default keeps the whole run within 45 minutes on a shared "
        "2-core machine)", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "mini-batch size", "min": 2})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the sweep",
                                                   "min": 0, "max": 1})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay of the sweep",
                                                        "min": 0})
    eval_every: int = field(default=100, metadata={
        "help": "steps between evaluations of the sweep trainings", "min": 1})
    eval_test: int = field(default=2000, metadata={
        "help": "test images evaluated (the first ones); 0: all", "min": 0})
    eval_train: int = field(default=1000, metadata={
        "help": "training images evaluated in inference mode (the first ones)", "min": 1})
    landscape_after: int = field(default=200, metadata={
        "help": "steps of training before the second landscape measurement (0: at "
        "initialization only)", "min": 0})
    landscape_lr_bn: float = field(default=0.1, metadata={
        "help": "learning rate of the BN network trained for the landscape (paper's usual rate)",
        "gt": 0})
    landscape_lr_none: float = field(default=1e-4, metadata={
        "help": "learning rate of the network without BN trained for the landscape (paper's "
        "usual rate)", "gt": 0})
    landscape_batches: int = field(default=3, metadata={
        "help": "fixed mini-batches of the landscape (the 1st, 4th, 7th, ... of the training "
        "order)", "min": 1, "max": 10})
    analysis_batch: int = field(default=128, metadata={
        "help": "images in the batch of the analyses at initialization (3)-(5) (paper: 128)",
        "min": 2})
    matrix_size: int = field(default=500, metadata={
        "help": "size n of the n x n Gaussian matrices of (6)", "min": 2})
    noisy_steps: int = field(default=200, metadata={"help": "SGD steps of each noisy-BN "
                                                    "training (7)", "min": 1})
    noisy_lr: float = field(default=0.1, metadata={
        "help": "learning rate of all noisy-BN variants (Santurkar et al.: 0.1, constant)",
        "gt": 0})
    noisy_momentum: float = field(default=0.0, metadata={
        "help": "SGD momentum of (7) (Santurkar et al.: plain SGD)", "min": 0, "max": 1})
    noisy_seeds: int = field(default=1, metadata={"help": "seeds per noisy-BN variant",
                                                  "min": 1})
    noisy_eval_every: int = field(default=100, metadata={
        "help": "steps between evaluations of (7)", "min": 1})
    workers: int = field(default=0, metadata={
        "help": "training processes: 0 auto (2 when there are at least 2 threads), 1 (in this "
        "process), 2", "choices": (0, 1, 2)})
    threads: int = field(default=0, metadata={
        "help": "torch threads in all (0: torch's default), split over the workers", "min": 0})

    def validate(self) -> None:
        parse_sections(self.only)
        if len(_parse_floats(self.lrs, "--lrs")) < 1:
            raise ValueError("--lrs needs at least one learning rate")
        for flag, depth in (("--depth", self.depth), ("--deep-depth", self.deep_depth)):
            if (depth - 2) % 6:
                raise ValueError(f"{flag} must be 6n+2 (8, 14, 20, 56, 110, ...), got {depth}")
        if self.eval_every > self.steps:
            raise ValueError(f"--eval-every {self.eval_every} is larger than --steps "
                             f"{self.steps}")

    @property
    def sections(self) -> list[str]:
        return parse_sections(self.only)

    @property
    def lr_grid(self) -> list[float]:
        return _parse_floats(self.lrs, "--lrs")


QUICK = {
    "depth": 8, "deep_depth": 20, "lrs": "0.0001,0.1", "seeds": 1, "steps": 30,
    "eval_every": 15, "batch_size": 32, "eval_test": 200, "eval_train": 200,
    "landscape_after": 15, "landscape_batches": 1, "analysis_batch": 32, "matrix_size": 100,
    "noisy_steps": 30, "noisy_eval_every": 15, "workers": 1, "threads": 1,
}


# ---------------------------------------------------------------------------------------- data
@dataclass
class Data:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    info: dict


def load_data(cfg: WhyConfig) -> Data:
    """The training set and the first ``eval_test`` test images, standardized per channel with
    the training set's mean and std. ``auto``: CIFAR-10 when present, else Fashion-MNIST; neither
    -> FileNotFoundError saying how to get them."""
    from ..data import load_dataset, load_synthetic

    if cfg.dataset == "synthetic":
        ds = load_synthetic(n_train=2000, n_test=500, image_shape=(1, 28, 28), seed=cfg.seed)
    elif cfg.dataset == "auto":
        ds = None
        for name in ("cifar10", "fashion-mnist"):
            try:
                ds = load_dataset(name, download=False, progress=False)
                break
            except FileNotFoundError:
                continue
        if ds is None and cfg.download:
            ds = load_dataset("fashion-mnist", download=True)
        if ds is None:
            raise FileNotFoundError(
                "why: needs Fashion-MNIST or CIFAR-10 and finds neither. Get Fashion-MNIST with "
                "`bnlab data fetch fashion-mnist` (or `apt-get install dataset-fashion-mnist` on "
                "Debian), or CIFAR-10 with `bnlab data fetch cifar10`; `--download` fetches "
                "Fashion-MNIST as part of the run"
            )
    else:
        try:
            ds = load_dataset(cfg.dataset, download=cfg.download, progress=False)
        except FileNotFoundError as exc:
            extra = (" (or `apt-get install dataset-fashion-mnist` on Debian)"
                     if cfg.dataset == "fashion-mnist" else "")
            raise FileNotFoundError(f"why: {exc}{extra}") from None
    x_train = ds.x_train.float()
    mean = x_train.mean((0, 2, 3), keepdim=True)
    std = x_train.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    n_test = len(ds.y_test) if cfg.eval_test == 0 else min(cfg.eval_test, len(ds.y_test))
    x_test = ds.x_test[:n_test].float()
    info = {"name": ds.name, "source": ds.source, "train": len(ds.y_train), "test": n_test,
            "test_total": len(ds.y_test), "shape": list(ds.x_train.shape[1:]),
            "num_classes": ds.num_classes}
    return Data(ds.name, (x_train - mean) / std, ds.y_train, (x_test - mean) / std,
                ds.y_test[:n_test], info)


# --------------------------------------------------------------------------------------- models
def build_model(cfg: WhyConfig, depth: int, norm: str, seed: int, in_channels: int,
                num_classes: int = 10, channels_last: bool = False) -> torch.nn.Module:
    """``ResNetCifar(depth)`` with normalization family ``norm`` (``"bn"``, ``"none"``,
    ``"noisy-bn"``, ``"noise"``), its weights drawn after ``torch.manual_seed(seed)``. BN layers
    follow ``cfg.bn_impl`` (the three give the same function; only their speed differs)."""
    from ..convert import convert
    from ..models import ResNetCifar

    torch.manual_seed(seed)
    fuse = cfg.bn_impl == "bnlab-relu" and norm != "none"
    model = ResNetCifar(depth, num_classes, norm=norm, fuse_relu=fuse, in_channels=in_channels)
    if cfg.bn_impl == "torch":
        model = convert(model, to="torch")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _prepare(channels_last: bool):
    if not channels_last:
        return None
    return lambda x: x.contiguous(memory_format=torch.channels_last)


def landscape_batches(cfg: WhyConfig, n_train: int) -> list[Tensor]:
    """Indices of the fixed mini-batches of section 2: the 1st, 4th, 7th, ... batches of the
    training order of seed ``cfg.seed`` (the paper's mini-batches 1, 4 and 7)."""
    from ..train import Batches

    b = Batches(n_train, cfg.batch_size, cfg.seed)
    return [b(3 * k) for k in range(cfg.landscape_batches)]


def landscape_curves(model: torch.nn.Module, data: Data, cfg: WhyConfig, prepare=None) -> dict:
    """:func:`relative_loss` on each fixed mini-batch, the model in training mode (on a copy)."""
    work = copy.deepcopy(model).train()
    out: dict[str, list] = {"loss0": [], "grad_norm": [], "loss": []}
    for idx in landscape_batches(cfg, len(data.y_train)):
        x = data.x_train[idx]
        r = relative_loss(work, prepare(x) if prepare else x, data.y_train[idx], STEP_SIZES)
        for k in out:
            out[k].append(r[k])
    return out


# ----------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One training: ``section`` ``"sweep"``, ``"noisy"`` or ``"landscape"`` (the networks of
    section 2 when the sweep does not train them), network ``norm``, base rate ``lr``, ``seed``,
    ``steps``."""

    section: str
    norm: str
    lr: float
    seed: int
    steps: int

    def tags(self) -> dict[str, Any]:
        return {"section": self.section, "norm": self.norm, "base_lr": self.lr,
                "seed": self.seed}


def _landscape_lr(cfg: WhyConfig, norm: str) -> float:
    return cfg.landscape_lr_bn if norm == "bn" else cfg.landscape_lr_none


def _sweep_measures_landscape(cfg: WhyConfig) -> bool:
    """Whether the sweep's trainings pass through the landscape's networks at an evaluation."""
    return ("sweep" in cfg.sections and cfg.landscape_after <= cfg.steps
            and cfg.landscape_after % cfg.eval_every == 0
            and all(_landscape_lr(cfg, n) in cfg.lr_grid for n in ("bn", "none")))


def jobs(cfg: WhyConfig) -> list[Job]:
    """Every training the config asks for, longest first."""
    out = []
    sections = cfg.sections
    if "sweep" in sections:
        out += [Job("sweep", norm, lr, cfg.seed + k, cfg.steps)
                for lr in reversed(cfg.lr_grid) for norm in ("bn", "none")
                for k in range(cfg.seeds)]
    if "noisy" in sections:
        out += [Job("noisy", norm, cfg.noisy_lr, cfg.seed + k, cfg.noisy_steps)
                for norm in NOISY_VARIANTS for k in range(cfg.noisy_seeds)]
    if "landscape" in sections and cfg.landscape_after > 0 and not _sweep_measures_landscape(cfg):
        out += [Job("landscape", norm, _landscape_lr(cfg, norm), cfg.seed, cfg.landscape_after)
                for norm in ("bn", "none")]
    return sorted(out, key=lambda j: -j.steps)


def _sweep_schedule(total: int):
    """The sweep's rate factor: 1, then 0.1 from 50% of ``total`` steps, 0.01 from 75%."""
    return lambda t: 1.0 if t < total // 2 else (0.1 if t < (3 * total) // 4 else 0.01)


def run_job(cfg: WhyConfig, job: Job, data: Data, checkpoint: Path) -> dict:
    """Train one network with :func:`bnlab.train.fit` (continuing from ``checkpoint`` if it
    exists). Returns ``{"rows": [...], "seconds": s}``: the evaluation rows (tagged with
    ``job.tags()``) and a last ``event: "end"`` row with the status."""
    from ..train import fit

    t0 = time.perf_counter()
    channels = data.x_train.shape[1]
    model = build_model(cfg, cfg.depth, job.norm, job.seed, channels,
                        data.info["num_classes"], cfg.channels_last)
    prepare = _prepare(cfg.channels_last)
    if job.section == "noisy":
        opt = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=cfg.noisy_momentum)
        schedule, eval_every = None, cfg.noisy_eval_every
    else:
        opt = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        schedule = _sweep_schedule(cfg.steps)  # the landscape networks follow the sweep's
        eval_every = cfg.eval_every

    measure = None
    if (job.section in ("sweep", "landscape") and job.seed == cfg.seed
            and job.norm in ("bn", "none") and job.lr == _landscape_lr(cfg, job.norm)
            and "landscape" in cfg.sections and cfg.landscape_after > 0):

        def measure(m, step):
            if step != cfg.landscape_after:
                return {}
            return {"landscape": landscape_curves(m, data, cfg, prepare)}

    res = fit(model, opt, (data.x_train, data.y_train), (data.x_test, data.y_test),
              steps=job.steps, batch_size=cfg.batch_size, seed=job.seed, schedule=schedule,
              eval_every=min(eval_every, job.steps), prepare=prepare, tags=job.tags(),
              checkpoint=checkpoint, measure=measure, diverge_above=1e3,
              train_eval_size=cfg.eval_train)
    seconds = time.perf_counter() - t0
    end = {**job.tags(), "event": "end", "status": res.status, "steps_done": res.steps_done,
           "diverged_at": res.diverged_at, "reason": res.reason, "seconds": round(seconds, 2)}
    return {"rows": [*res.history, end], "seconds": seconds}


def _worker(cfg: WhyConfig, threads: int, ckpt_dir: str, todo, done) -> None:
    """A training process: runs jobs from ``todo`` until it gets None, sends each result to
    ``done``. Ignores Ctrl-C; the parent ends it."""
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _set_threads(threads)
        data = load_data(cfg)
        while (job := todo.get()) is not None:
            path = Path(ckpt_dir) / _checkpoint_path_name(job)
            done.put(("done", job, run_job(cfg, job, data, path)))
    except BaseException:
        done.put(("error", None, traceback.format_exc()))


def _checkpoint_path_name(job: Job) -> str:
    return f"{job.section}-{job.norm}-lr{job.lr:g}-seed{job.seed}.pt"


def _run_jobs(cfg: WhyConfig, todo: list[Job], data: Data, run_dir: RunDir, workers: int,
              threads: int, on_done) -> None:
    """Run ``todo`` in this process (``workers`` 1) or in ``workers`` processes; ``on_done(job,
    result)`` is called in this process as each ends. Ctrl-C ends the workers (their last
    checkpoints stay) and propagates."""
    ckpt_dir = run_dir.checkpoint_dir
    if workers == 1:
        _set_threads(threads)
        for job in todo:
            on_done(job, run_job(cfg, job, data, ckpt_dir / _checkpoint_path_name(job)))
        return
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    jobs_q, done_q = ctx.Queue(), ctx.Queue()
    for job in todo:
        jobs_q.put(job)
    for _ in range(workers):
        jobs_q.put(None)
    procs = [ctx.Process(target=_worker, args=(cfg, threads, str(ckpt_dir), jobs_q, done_q),
                         daemon=True) for _ in range(workers)]
    with _thread_env(threads):
        for p in procs:
            p.start()
    pending = len(todo)
    finished = False
    try:
        while pending:
            try:
                kind, job, payload = done_q.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("why: the training workers exited with trainings left "
                                       "undone") from None
                continue
            if kind == "error":
                raise RuntimeError(f"why: a training worker failed:\n{payload}")
            pending -= 1
            on_done(job, payload)
        finished = True
    finally:
        # Done: every worker has its None and exits by itself (flushing its queue ends), so it
        # is waited for; only one that hangs, or any on an error or Ctrl-C, is terminated.
        # Then both queues are closed here, so their semaphores are released with them.
        for p in procs:
            if finished:
                p.join(timeout=30)
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
        for q in (jobs_q, done_q):
            if not finished:
                q.cancel_join_thread()  # data nobody will read must not block this exit
            q.close()


# -------------------------------------------------------------------------------- analyses at init
def _analysis_batch(cfg: WhyConfig, data: Data) -> tuple[Tensor, Tensor]:
    from ..train import Batches

    idx = Batches(len(data.y_train), min(cfg.analysis_batch, len(data.y_train)), cfg.seed)(0)
    return data.x_train[idx], data.y_train[idx]


def _init_analyses(cfg: WhyConfig, data: Data | None, done: set[str]) -> Iterator[dict]:
    """The rows of the analyses at initialization that ``cfg`` asks for and ``done`` lacks, one
    per section (``analysis: "init"``), each computed and yielded in turn."""
    sections = cfg.sections
    nets = ("bn", "none")
    if "landscape" in sections and "landscape" not in done:
        t0 = time.perf_counter()
        channels = data.x_train.shape[1]
        curves = {n: landscape_curves(build_model(cfg, cfg.depth, n, cfg.seed, channels,
                                                  data.info["num_classes"]), data, cfg)
                  for n in nets}
        yield {"section": "landscape", "analysis": "init", "when": "init", "step": 0,
               "depth": cfg.depth, "step_sizes": list(STEP_SIZES),
               "batches": [3 * k + 1 for k in range(cfg.landscape_batches)], "nets": curves,
               "seconds": round(time.perf_counter() - t0, 2)}
    want = [s for s in ("gradients", "depth", "bias") if s in sections and s not in done]
    if want:
        t0 = time.perf_counter()
        x, y = _analysis_batch(cfg, data)
        snaps, depth_stats = {}, {}
        for n in nets:
            model = build_model(cfg, cfg.deep_depth, n, cfg.seed, x.shape[1],
                                data.info["num_classes"]).train()
            names = [name for name, _ in conv_layers(model)]
            if "gradients" in want or "bias" in want:
                snaps[n] = gradient_snapshot(model, x, y, names[len(names) // 2])
            if "depth" in want:
                depth_stats[n] = channel_stats_by_depth(model, x)
        seconds = round(time.perf_counter() - t0, 2)
        common = {"analysis": "init", "step": 0, "depth": cfg.deep_depth, "batch": len(y),
                  "seconds": seconds}
        if "gradients" in want:
            yield {"section": "gradients", **common, "layer": snaps["bn"]["layer"],
                   "layer_index": snaps["bn"]["layer_index"],
                   "nets": {n: {"loss": s["loss"], **s["weight_grad"]} for n, s in snaps.items()}}
        if "depth" in want:
            yield {"section": "depth", **common, "nets": depth_stats}
        if "bias" in want:
            yield {"section": "bias", **common, "layer": snaps["bn"]["layer"],
                   "layer_index": snaps["bn"]["layer_index"], "labels": snaps["bn"]["labels"],
                   "nets": {n: {"output_grad": s["output_grad"],
                                "output_grad_cosine": s["output_grad_cosine"],
                                "bias": s["bias"], "kernel": s["kernel"], "loss": s["loss"]}
                            for n, s in snaps.items()}}
    if "spectra" in sections and "spectra" not in done:
        t0 = time.perf_counter()
        spectra = {}
        for k in (1, 3, 5):
            s = product_singular_values(cfg.matrix_size, k, seed=cfg.seed)
            spectra[str(k)] = {"singular_values": [round(v, 6) for v in s.tolist()],
                               **spectrum_skew(s)}
        yield {"section": "spectra", "analysis": "init", "n": cfg.matrix_size, "products": spectra,
               "seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------ run
def _plan(cfg: WhyConfig, n_jobs: int) -> tuple[int, int]:
    threads = cfg.threads or torch.get_num_threads()
    workers = cfg.workers or (2 if threads >= 2 else 1)
    workers = max(1, min(workers, n_jobs))
    return workers, max(1, threads // workers)


def run(cfg: WhyConfig, run_dir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Run the sections of ``cfg`` into ``run_dir`` (see the module docstring); returns the
    fields ``config.json`` records about the run (timings, processes)."""
    from tqdm.auto import tqdm

    sections = cfg.sections
    needs_data = any(s != "spectra" for s in sections)
    data = load_data(cfg) if needs_data else None
    rows = run_dir.rows()
    done_analyses = {r["section"] for r in rows if r.get("analysis") == "init"}
    all_jobs = jobs(cfg)
    finished = {(r["section"], r["norm"], r["base_lr"], r["seed"]) for r in rows
                if r.get("event") == "end"}

    def key(j: Job):
        return (j.section, j.norm, j.lr, j.seed)

    todo = [j for j in all_jobs if key(j) not in finished]
    # rows of a training that had not ended are measured again from its checkpoint
    unfinished = {key(j) for j in todo}
    run_dir.drop_rows(lambda r: r.get("event") != "end" and "base_lr" in r
                      and (r.get("section"), r.get("norm"), r.get("base_lr"), r.get("seed"))
                      in unfinished)
    workers, threads = _plan(cfg, len(todo))
    update: dict[str, Any] = {"sections": sections, "processes": workers,
                              "threads_per_process": threads}
    if data is not None:
        update["dataset"] = data.info
    run_dir.update(**update)

    timings: dict[str, float] = dict(run_dir.meta.get("timings") or {})
    if cfg.threads:  # the analyses at initialization run here, with all the threads asked for
        _set_threads(cfg.threads)
    t0 = time.perf_counter()
    for row in _init_analyses(cfg, data, done_analyses):
        run_dir.log(row)
        timings[row["section"]] = row["seconds"]
        if progress:
            print(f"  {row['section']}: done in {row['seconds']:.1f} s")
    timings["analyses_at_init_s"] = round(time.perf_counter() - t0, 2)
    run_dir.update(timings=timings)

    if todo:
        bar = tqdm(total=sum(j.steps for j in todo), disable=not progress, unit="step",
                   dynamic_ncols=True, desc=f"{len(todo)} trainings")
        t1 = time.perf_counter()

        def on_done(job: Job, result: dict) -> None:
            run_dir.log(result["rows"])
            end = result["rows"][-1]
            bar.update(job.steps)
            bar.set_postfix_str(f"{job.section} {job.norm} lr={job.lr:g} seed={job.seed}: "
                                f"{end['status']}", refresh=False)

        try:
            _run_jobs(cfg, todo, data, run_dir, workers, threads, on_done)
        finally:
            bar.close()
            timings["trainings_s"] = round(time.perf_counter() - t1, 2)
            run_dir.update(timings=timings)
    return {"timings": timings}


EXPERIMENT = register(
    Experiment(
        name="why",
        description="Why BN works (Bjorck et al. 2018, Santurkar et al. 2018): lr sweep, loss "
        "landscape, gradients, depth, class bias, spectra, noisy BN",
        config=WhyConfig,
        run=run,
        report=why_report.report,
        quick=QUICK,
        about=(
            "Tests the claims of Bjorck et al. (2018), 'Understanding Batch Normalization', and "
            "the noisy-BN experiment of Santurkar et al. (2018) on CIFAR-style ResNets with and "
            "without BN: (1) a learning-rate sweep, (2) the loss along the gradient against the "
            "step size, (3) a middle layer's gradients at initialization, (4) activation scale "
            "against depth (ResNet-110), (5) class bias of the output and kernel-gradient "
            "similarity, (6) singular values of products of Gaussian matrices, (7) noisy BN. "
            "Uses CIFAR-10 when present, else Fashion-MNIST (`bnlab data fetch fashion-mnist`, "
            "or Debian's dataset-fashion-mnist package). The report gives each claim a verdict "
            "beside the papers' numbers. --only runs some sections; --resume continues an "
            "interrupted run."
        ),
        examples=(
            "bnlab run why",
            "bnlab run why --quick",
            "bnlab run why --only gradients,depth,bias,spectra",
            "bnlab run why --only sweep --lrs 0.001,0.01,0.1 --seeds 3",
        ),
        resumable=True,
    )
)
