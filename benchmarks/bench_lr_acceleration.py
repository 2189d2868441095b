"""Speed of the learning-rate acceleration experiment's network (`bnlab run lr-acceleration`).

Measures, on this machine, for :class:`bnlab.models.SmallInception` on 1x28x28 inputs:

  * ``step``: ms per training step (forward, cross-entropy, backward, SGD with momentum) at the
    run's batch size, one process, for no normalization, bnlab's BatchNorm2d, bnlab's BN with the
    ReLU fused into it, and torch.nn.BatchNorm2d, each with contiguous (NCHW) and channels_last
    tensors; interleaved rounds, median per configuration, ratio vs torch's BN in NCHW;
  * ``eval``: ms per image of an inference-mode forward at the evaluation batch size;
  * ``parallel``: training steps per second of the whole machine with one process using all
    threads vs one 1-thread process per core running side by side (the experiment's workers).

Run (the thread variables are set before torch and numba start):

    .venv/bin/python benchmarks/bench_lr_acceleration.py [--threads 1] [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _set_thread_env(threads: int) -> None:
    for key in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(threads)


WIDTH = 12  # the experiment's default (--width)


def _model(norm: str, fuse: bool, channels_last: bool, act: str = "relu", width: int | None = None):
    import torch

    from bnlab.models import SmallInception

    torch.manual_seed(0)
    m = SmallInception(1, norm=norm, act=act, fuse_relu=fuse, width=width or WIDTH)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def _register_torch_bn() -> None:
    from torch import nn

    from bnlab.layers import NORMS, register_norm

    if "torch-bn" not in NORMS:
        register_norm("torch-bn", lambda c, dims, **kw: nn.BatchNorm2d(c, **kw))


CONFIGS = [
    # (label, norm, fuse_relu, channels_last, act)
    ("no norm, NCHW", "none", False, False, "relu"),
    ("no norm, channels_last", "none", False, True, "relu"),
    ("torch BN, NCHW (reference)", "torch-bn", False, False, "relu"),
    ("torch BN, channels_last", "torch-bn", False, True, "relu"),
    ("bnlab BN, NCHW", "bn", False, False, "relu"),
    ("bnlab BN, channels_last", "bn", False, True, "relu"),
    ("bnlab BN+ReLU fused, NCHW", "bn", True, False, "relu"),
    ("bnlab BN+ReLU fused, channels_last", "bn", True, True, "relu"),
    ("bnlab BN, sigmoid, channels_last", "bn", False, True, "sigmoid"),
    ("torch BN, sigmoid, channels_last", "torch-bn", False, True, "sigmoid"),
]


def step_times(batch: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """ms per training step of each configuration, one median per round (rounds interleaved)."""
    import torch
    import torch.nn.functional as F

    _register_torch_bn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(10, (batch,), generator=g)
    setups = {}
    for label, norm, fuse, cl, act in CONFIGS:
        m = _model(norm, fuse, cl, act)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        xb = x.contiguous(memory_format=torch.channels_last) if cl else x
        setups[label] = (m, opt, xb)
    times: dict[str, list[float]] = {label: [] for label in setups}
    for r in range(rounds + 1):  # round 0 warms up (kernel compilation or cache load)
        for label, (m, opt, xb) in setups.items():
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = F.cross_entropy(m(xb), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ts.append(time.perf_counter() - t0)
            if r:
                times[label].append(statistics.median(ts) * 1e3)
    return times


def eval_ms_per_image(batch: int, rounds: int, fuse: bool, channels_last: bool) -> float:
    import torch

    m = _model("bn", fuse, channels_last).eval()
    x = torch.rand(batch, 1, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ts = []
    with torch.no_grad():
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:]) * 1e3 / batch


def step_rate(batch: int, seconds: float, fuse: bool, channels_last: bool) -> float:
    """Training steps per second of one process over ``seconds`` (after a warm-up)."""
    import torch
    import torch.nn.functional as F

    m = _model("bn", fuse, channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def parallel(batch: int, seconds: float, fuse: bool, channels_last: bool) -> dict[str, float]:
    """Machine-wide steps/s: one process with all cores' threads, and one 1-thread process per
    core side by side."""
    cores = os.cpu_count() or 1

    def launch(threads: int) -> subprocess.Popen:
        args = [sys.executable, __file__, "--rate", str(seconds), "--threads", str(threads),
                "--batch", str(batch), "--width", str(WIDTH)] + (["--fuse"] if fuse else []) + (
                ["--channels-last"] if channels_last else [])  # fmt: skip
        return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)

    one = float(launch(cores).communicate()[0])
    procs = [launch(1) for _ in range(cores)]
    side = sum(float(p.communicate()[0]) for p in procs)
    return {f"1 process x {cores} threads": one, f"{cores} processes x 1 thread": side}


def main() -> None:
    global WIDTH
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="threads (torch, numba, OpenMP)")
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--width", type=int, default=WIDTH, help="SmallInception width")
    p.add_argument("--eval-batch", type=int, default=500, help="inference batch size")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each parallel test")
    p.add_argument("--fuse", action="store_true", help="(parallel, --rate) fused BN+ReLU")
    p.add_argument("--channels-last", action="store_true", help="(parallel, --rate) NHWC")
    p.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--skip", default="", help="comma list of parts to skip: step,eval,parallel")
    args = p.parse_args()
    WIDTH = args.width
    _set_thread_env(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.rate:  # a child of `parallel`
        print(step_rate(args.batch, args.rate, args.fuse, args.channels_last))
        return
    skip = set(filter(None, args.skip.split(",")))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"# {cpu}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); width "
          f"{WIDTH}, batch {args.batch}; median of {args.rounds} interleaved rounds of "
          f"{args.steps} steps; load average {os.getloadavg()[0]:.1f}")
    if "step" not in skip:
        times = step_times(args.batch, args.rounds, args.steps)
        ref = statistics.median(times[CONFIGS[2][0]])
        print(f"{'configuration':<38} {'ms/step':>8} {'vs torch BN NCHW':>17}")
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"{label:<38} {med:8.1f} {med / ref:16.2f}x")
    if "eval" not in skip:
        for fuse, cl in ((False, False), (False, True), (True, True)):
            ms = eval_ms_per_image(args.eval_batch, args.rounds, fuse, cl)
            print(f"eval, bnlab BN{'+ReLU' if fuse else ''}, {'channels_last' if cl else 'NCHW'}, "
                  f"batch {args.eval_batch}: {ms:.3f} ms/image")
    if "parallel" not in skip:
        rates = parallel(args.batch, args.seconds, args.fuse, args.channels_last)
        for label, r in rates.items():
            print(f"parallel, {label}: {r:.1f} steps/s in all")


if __name__ == "__main__":
    main()
