"""What the two small-batch studies (``batch-size`` and ``non-iid``) share: their data, the
network, evaluations with other statistics than the running averages, the worker processes
that run their trainings (alone, or data-parallel over a gloo process group), and the seed
spread their verdicts compare against.

Trainings run in worker processes, one thread each, one per core by default; every training
goes through :func:`bnlab.train.fit` with a checkpoint, and the parent writes each training's
rows when it ends, so ``--resume`` skips the finished trainings and continues the others from
their checkpoints. With ``nproc > 1`` each training runs on a group of ``nproc`` processes that
form their own gloo process group (:mod:`bnlab.distributed`); ``fit`` then trains data-parallel.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._workers import set_threads as _set_threads

__all__ = [
    "DATASETS",
    "Data",
    "data_problem",
    "load_data",
    "parse_ints",
    "evaluate_sharded",
    "evaluate_batch_stats",
    "evaluate_recomputed",
    "run_jobs",
    "parse_widths",
    "parse_choices",
    "seed_spread",
    "mean",
    "tail_mean",
]

DATASETS = ("fashion-mnist", "mnist", "synthetic")


def parse_ints(text: str, flag: str, *, minimum: int = 1) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (sorted, no repeats); ValueError naming ``flag``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, e.g. 2,4,8; got {text!r}"
                         ) from None  # fmt: skip
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{flag} must list integers >= {minimum}; got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} lists a value twice: {text!r}")
    return sorted(values)


def parse_widths(text: str) -> list[int]:
    """``--widths``: ``"16,32,64"`` -> the 3 channel counts of ``SmallCNN``, else ValueError."""
    try:
        widths = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        widths = []
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"--widths must be 3 positive channel counts, e.g. 16,32,64; got "
                         f"{text!r}")  # fmt: skip
    return widths


def parse_choices(text: str, known: tuple[str, ...], flag: str) -> list[str]:
    """The names of a comma-separated ``text`` in ``known``'s order; ValueError naming ``flag``
    when it names none or one that is not known."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in known for n in names):
        raise ValueError(f"{flag} must be a comma-separated list of {', '.join(known)}; "
                         f"got {text!r}")  # fmt: skip
    return [n for n in known if n in names]


def data_problem(dataset: str) -> str | None:
    """Why ``dataset`` cannot be loaded without a download (a sentence saying how to get it), or
    None when it can. Reads no file contents."""
    from ..data.download import dataset_dir, locate

    if dataset == "synthetic" or locate(dataset) is not None:
        return None
    where = dataset_dir(dataset)
    if dataset == "fashion-mnist":
        return (
            f"--dataset fashion-mnist: Fashion-MNIST is neither in {where} nor in "
            "/usr/share/datasets/fashion-mnist; get it with `bnlab data fetch fashion-mnist` "
            "(or pass --download), or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
        )
    return (f"--dataset {dataset}: not in {where}; get it with `bnlab data fetch {dataset}` "
            "(or pass --download)")  # fmt: skip


@dataclass
class Data:
    """Standardized tensors (the training set's mean and std over every pixel) and a
    description for ``config.json``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    meta: dict[str, Any]


def synthetic_textures(n_train: int, n_test: int, seed: int = 0, noise: float = 0.3):
    """Seeded 28x28 grey images of 10 classes a small CNN with global pooling can learn in a
    few hundred steps (the Gaussian blobs of :func:`bnlab.data.load_synthetic` have no spatial
    structure): class ``c`` is a sinusoidal grating of orientation ``36 * (c % 5)`` degrees and
    period 4 or 7 pixels (``c // 5``), with a random phase and contrast, plus Gaussian pixel
    noise of std ``noise``; values clipped to [0, 1]."""
    from ..data import Dataset

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randperm(n, generator=g) % 10
        theta = (labels % 5).double() * math.pi / 5
        period = torch.where(labels < 5, 4.0, 7.0).double()
        phase = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
        contrast = 0.15 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)
        proj = (xx.double()[None] * torch.cos(theta)[:, None, None]
                + yy.double()[None] * torch.sin(theta)[:, None, None])  # fmt: skip
        img = 0.5 + contrast[:, None, None] * torch.sin(
            2 * math.pi * proj / period[:, None, None] + phase[:, None, None])
        img = img + noise * torch.randn(n, 28, 28, generator=g, dtype=torch.float64)
        return img.clamp(0, 1).float().unsqueeze(1), labels.long()

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, num_classes=10,
                   source=f"synthetic textures (seed={seed}, noise={noise})")  # fmt: skip


def load_data(dataset: str, download: bool = False, train_size: int = 0,
              test_size: int = 0) -> Data:  # fmt: skip
    """The data set, standardized, cut to the first ``train_size`` / ``test_size`` examples
    (0: all). ``synthetic``: :func:`synthetic_textures` (tests)."""
    from ..data import load_dataset

    if dataset == "synthetic":
        ds = synthetic_textures(train_size or 4000, test_size or 1000)
    else:
        ds = load_dataset(dataset, download=download, progress=False)
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if train_size:
        xtr, ytr = xtr[:train_size], ytr[:train_size]
    if test_size:
        xte, yte = xte[:test_size], yte[:test_size]
    # statistics in float64: the inputs do not depend on the thread count of the reduction
    m, s = xtr.double().mean(), xtr.double().std().clamp_min(1e-6)
    xtr, xte = ((xtr - m) / s).float().contiguous(), ((xte - m) / s).float().contiguous()
    meta = {"name": ds.name, "source": ds.source, "train": len(ytr), "test": len(yte),
            "train_total": len(ds.y_train), "test_total": len(ds.y_test),
            "image": list(xtr.shape[1:]), "num_classes": ds.num_classes,
            "note": getattr(ds, "note", "")}  # fmt: skip
    return Data(xtr, ytr, xte, yte, ds.num_classes, meta)


# ------------------------------------------------------------------------------ evaluation
def evaluate_sharded(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000
                     ) -> dict[str, float]:  # fmt: skip
    """:func:`bnlab.train.evaluate` (inference mode); under torch.distributed each rank takes its
    part and the sums are reduced, so every rank gets the whole set's figures."""
    from ..distributed import shard, world
    from ..train import evaluate

    rank, size = world()
    if size == 1:
        return evaluate(model, x, y, batch_size)
    import torch.distributed as dist

    part = shard(len(y), rank, size)
    ev = evaluate(model, x[part], y[part], batch_size)
    n = part.stop - part.start
    sums = torch.tensor([ev["loss"] * n, ev["acc"] * n, n], dtype=torch.float64)
    dist.all_reduce(sums)
    return {"loss": float(sums[0] / sums[2]), "acc": float(sums[1] / sums[2])}


@torch.no_grad()
def evaluate_batch_stats(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                         order: Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """Accuracy and loss of ``model`` with its BN layers normalizing each test batch of
    ``batch_size`` with that batch's own statistics ("BN evaluated with test-batch statistics",
    Ioffe 2017 section 4.3), on a copy (the model is untouched). ``order``: the test examples'
    order (which examples share a batch; default: as given); an incomplete last batch is
    evaluated with its own statistics when it has at least 2 examples, else dropped."""
    net = copy.deepcopy(model).train()
    for m in net.modules():  # batch statistics; the copies' running averages do not matter
        if isinstance(m, nn.Dropout):
            m.eval()
    idx = order if order is not None else torch.arange(len(y))
    loss = correct = n = 0.0
    for i in range(0, len(idx), batch_size):
        b = idx[i : i + batch_size]
        if len(b) < 2:
            break
        out = net(x[b])
        loss += float(nn.functional.cross_entropy(out, y[b], reduction="sum"))
        correct += float((out.argmax(1) == y[b]).sum())
        n += len(b)
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1)}


def evaluate_recomputed(model: nn.Module, x_cal: Tensor, batch_size: int, x: Tensor, y: Tensor
                        ) -> dict[str, float]:  # fmt: skip
    """Accuracy and loss in inference mode after the population statistics were recomputed
    ("precise BN", :func:`bnlab.recompute_population_stats`, Algorithm 2 over ``x_cal`` in
    training-mode batches of ``batch_size``), on a copy (the model is untouched)."""
    from ..distributed import shard, world
    from ..inference import recompute_population_stats

    net = copy.deepcopy(model)
    rank, size = world()
    batches = [x_cal[i : i + batch_size] for i in range(0, len(x_cal) - batch_size + 1,
                                                        batch_size)]  # fmt: skip
    if size > 1:  # each rank its part of every batch; the moments are merged across ranks
        batches = [b[shard(len(b), rank, size)] for b in batches]
    recompute_population_stats(net, batches)
    return evaluate_sharded(net, x, y)


# ------------------------------------------------------------------------------ verdicts
def mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def seed_spread(groups: Sequence[Sequence[float]]) -> float:
    """The largest range (max - min) over seeds among ``groups`` of per-seed values: the noise
    level a difference between means must exceed to be called a difference."""
    ranges = [max(g) - min(g) for g in groups if len(g) > 1]
    return max(ranges) if ranges else float("nan")


def tail_mean(rows: Sequence[Mapping[str, Any]], key: str, tags: Mapping[str, Any]) -> float:
    """The mean of a training's per-interval ``key`` (``train_loss``, ``train_batch_acc``) over
    its last two evaluation intervals, weighted by their lengths in steps (the last interval
    alone may be a single step). NaN when the training has no such rows."""
    mine = sorted((r for r in rows if all(r.get(k) == v for k, v in tags.items())
                   and isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)),
                  key=lambda r: r["step"])  # fmt: skip
    steps = [0] + [r["step"] for r in mine]
    pairs = [(steps[i + 1] - steps[i], r[key]) for i, r in enumerate(mine)][-2:]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else float("nan")


# ------------------------------------------------------------------------------ workers
def _worker_main(group: int, rank: int, nproc: int, store: str, cfg: Any,
                 setup: Callable[[Any], Any], train: Callable[[Any, Any, dict], dict],
                 jobs: Any, results: Any, threads: int) -> None:  # fmt: skip
    """One worker process: joins its group's process group (``nproc > 1``), prepares its data
    once (``setup(cfg)``), then trains the jobs its group's rank 0 takes from ``jobs`` until
    it gets None. Messages to the parent: ``(kind, group, payload)``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers
    try:
        _set_threads(threads)
        if nproc > 1:
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                                    world_size=nproc,
                                    timeout=datetime.timedelta(hours=2))  # fmt: skip
        ctx = setup(cfg)
        while True:
            job = jobs.get() if rank == 0 else None
            if nproc > 1:
                box = [job]
                dist.broadcast_object_list(box, src=0)
                job = box[0]
            if job is None:
                break
            t0 = time.perf_counter()
            result = train(cfg, ctx, job)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            if rank == 0:
                results.put(("done", group, pickle.dumps((job["key"], result))))
        if nproc > 1:
            dist.destroy_process_group()
    except BaseException:  # report, never leave the parent waiting
        results.put(("error", group, f"rank {rank}: {traceback.format_exc()}"))


def run_jobs(
    cfg: Any,
    jobs: Sequence[dict],
    setup: Callable[[Any], Any],
    train: Callable[[Any, Any, dict], dict],
    on_done: Callable[[dict, dict], None],
    *,
    workers: int,
    nproc: int = 1,
    threads: int = 1,
    progress: bool = True,
    label: str = "trainings",
) -> None:
    """Train ``jobs`` (dicts with a unique ``"key"``) on ``workers`` groups of ``nproc``
    processes; ``on_done(job, result)`` is called in this process as each one ends.

    ``setup`` and ``train`` must be module-level functions (they are pickled into the workers).
    Ctrl-C stops the workers at once (the trainings in progress continue from their last
    checkpoint on a resume) and raises KeyboardInterrupt; a worker's failure raises RuntimeError
    with its traceback."""
    import multiprocessing as mp
    import queue as queue_mod

    from tqdm.auto import tqdm

    from ..distributed import loopback_interface, warm_kernels

    if not jobs:
        return
    warm_kernels()  # once here, not in every worker at the same time
    by_key = {j["key"]: j for j in jobs}
    groups = max(1, min(workers, len(jobs)))
    ctx = mp.get_context("spawn")
    job_q, results = ctx.Queue(), ctx.Queue()
    for job in jobs:
        job_q.put(job)
    for _ in range(groups):
        job_q.put(None)
    env = {k: str(threads) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if nproc > 1 and loopback_interface() and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = loopback_interface()
    bar = tqdm(total=len(jobs), desc=label, disable=not progress, unit="training",
               dynamic_ncols=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bnlab-jobs-") as tmp:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # thread pools are sized when a process starts
        try:
            procs = [
                ctx.Process(target=_worker_main, daemon=True,
                            args=(g, r, nproc, os.path.join(tmp, f"store-{g}"), cfg, setup,
                                  train, job_q, results, threads))
                for g in range(groups) for r in range(nproc)
            ]  # fmt: skip
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        done = 0
        try:
            while done < len(jobs):
                try:
                    kind, group, payload = results.get(timeout=1.0)
                except queue_mod.Empty:
                    if not any(p.is_alive() for p in procs):
                        left = len(jobs) - done
                        raise RuntimeError(
                            f"{label}: every worker exited with {left} trainings left"
                        ) from None
                    continue
                if kind == "error":
                    raise RuntimeError(f"{label}: a worker failed:\n{payload}")
                key, result = pickle.loads(payload)
                on_done(by_key[key], result)
                done += 1
                bar.update(1)
        finally:
            bar.close()
            for p in procs:
                if p.is_alive() and done < len(jobs):
                    p.terminate()
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()


def jobs_left(jobs: Sequence[dict], rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The jobs without a final row (``step == job["steps"]`` or a diverged row) among
    ``rows``: what a resumed run still has to train."""
    done = set()
    for r in rows:
        for job in jobs:
            tags = job["tags"]
            if all(r.get(k) == v for k, v in tags.items()) and (
                r.get("step") == job["steps"] or r.get("diverged")
            ):
                done.add(job["key"])
    return [j for j in jobs if j["key"] not in done]
