"""Benchmark of the batch-norm implementations on the CPU: ``bnlab bench``.

For each shape (from real networks) and each mode - ``fwd`` (training forward), ``fwd+bwd``
(training forward and backward), ``eval`` (inference forward, no autograd) - it times, in one run:

    fused       bnlab layer, fused kernels (backend "fused")
    reference   bnlab layer, reference path (backend "reference"; skipped with --no-reference)
    torch       torch.nn.BatchNorm1d/2d/3d, contiguous input
    fused_cl    bnlab layer, fused kernels, channels_last input (4D shapes only)
    torch_cl    torch.nn.BatchNorm2d, channels_last input (4D shapes only)
    fused_bf16  bnlab layer (backend "auto") on a bfloat16 input with float32 parameters, as
                under ``torch.autocast("cpu", torch.bfloat16)`` (4D shapes only)
    torch_bf16  torch.nn.BatchNorm2d on the same
    fused_bf16_cl, torch_bf16_cl
                the same two on a channels_last bfloat16 input (4D shapes only)
    compiled    torch.compile of the reference math (Algorithm 1 in plain torch ops)
    copy        y.copy_(x) into a preallocated tensor: reads and writes each byte once
    copy_new    torch.empty_like(x).copy_(x): the same into a fresh tensor, as every BN output
                is (first touch of new memory included)

Rounds are interleaved: each round times every variant of a mode once, in a shuffled order,
so drift in the machine's load hits every variant alike and no variant always follows the same
neighbour; the table gives the median over ``--repeats`` rounds
and ratios (torch / fused: above 1 when bnlab is faster; fused / copy: bnlab's time in plain
copies of the same bytes). Also one end-to-end training step (forward, backward, SGD update) of
ResNet-20 on random CIFAR-sized data with bnlab layers vs torch's. Inputs float32 except the
bf16 columns. ``--threads`` sets torch's thread count, which bnlab's kernels follow.

A ratio from one process measures that process's luck as well as the code: on a shared or
virtual machine the same loop can run at different speeds in two processes (where the
allocator, the page mappings and the neighbours left it). ``--processes N`` runs the whole
benchmark in N fresh processes, one after the other, and reports for every cell the median of
the per-process medians and, for every ratio, its median and range over the processes.

Fresh outputs and glibc's heap. Every BN output is a fresh tensor. glibc serves a large
allocation from its heap only while the heap's free memory is kept mapped: by default it maps
allocations above a threshold (that adapts to the sizes freed) afresh and returns freed memory
at the top of the heap to the system once more than twice that threshold is free. Which of the
two happens to a given call depends on the allocations before it, so the same call sometimes
writes pages that are already mapped and sometimes first faults every page in, which can double
its time, for torch's layer and bnlab's alike. ``--heap steady`` fixes both thresholds at 1 GiB
and turns off glibc's small-block cache (:func:`steady_heap`, :func:`steady_env`; the benchmark
reruns itself in a process started so when it was not) so freed memory stays mapped and, in
most processes, serves the next call whole, and each cell measures the computation;
``--heap as-is`` (the default) leaves glibc's defaults, as a user's process has them. The
header gives the minor page faults of the timed calls per call.

By default a call finds in the caches whatever the calls before it left there (a tensor that fits
in the last-level cache is often still in it). ``--cold`` writes a buffer of twice the
last-level cache (at least 128 MB, :func:`cold_bytes`) before every timed call, untimed, so
that every call reads its tensors from memory, as a layer of a large model does when the other
layers' tensors have passed through the caches since.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._fileutil import atomic_write_text
from .kernels import THP_ENABLED, thp_mode

__all__ = ["SHAPES", "main", "bench_shape", "bench_resnet", "format_table", "format_spread"]

# name -> (N, C[, H, W]); the BN inputs of real networks
SHAPES: dict[str, tuple[int, ...]] = {
    "resnet20/110 stage1": (128, 16, 32, 32),
    "resnet20/110 stage2": (128, 32, 16, 16),
    "resnet20/110 stage3": (128, 64, 8, 8),
    "target (64,64,32,32)": (64, 64, 32, 32),
    "target (128,256,14,14)": (128, 256, 14, 14),
    "target (32,128,56,56)": (32, 128, 56, 56),
    "inception-like": (32, 256, 28, 28),
    "resnet50 stage4": (32, 2048, 7, 7),
    "mnist mlp (batch 60)": (60, 100),
    "dense (4096,1024)": (4096, 1024),
}
QUICK = ("target (64,64,32,32)", "mnist mlp (batch 60)")
MODES = ("fwd", "fwd+bwd", "eval")
VARIANTS = (
    "fused", "reference", "torch", "fused_cl", "torch_cl", "fused_bf16", "torch_bf16",
    "fused_bf16_cl", "torch_bf16_cl",
    "compiled", "copy", "copy_new",
)  # fmt: skip


@dataclass
class Row:
    shape_name: str
    shape: tuple[int, ...]
    mode: str
    times: dict[str, float]  # variant -> median seconds (missing = not applicable/skipped)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "" where it is not known."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    except OSError:
        return ""
    return names[0] if names else ""


def machine_text() -> str:
    """The CPU model, the transparent huge pages mode (it decides how fresh outputs are mapped,
    see ``bnlab.kernels._HugePages``) and the load average now (Linux; what is unknown is left
    out)."""
    parts = []
    model = cpu_model()
    if model:
        parts.append(f"CPU {model}")
    try:
        with open(THP_ENABLED) as f:
            mode = thp_mode(f.read())
        if mode:
            parts.append(f"transparent huge pages {mode}")
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            parts.append("load average " + " ".join(f.read().split()[:3]))
    except OSError:
        pass
    return ", ".join(parts)


STEADY_BYTES = 1 << 30

# glibc reads its tunables once, when a process starts. With the mmap and trim thresholds alone
# a freed block can stay unmerged: a small block freed into the per-thread cache (tcache) next
# to it still counts as in use, and an aligned request of the freed block's size asks for a few
# bytes more than it holds, so the heap grows into fresh pages on every call. Without the cache
# the small blocks merge when a large one is freed and the freed memory serves the next request.
STEADY_TUNABLES: dict[str, int] = {
    "glibc.malloc.mmap_threshold": STEADY_BYTES,
    "glibc.malloc.trim_threshold": STEADY_BYTES,
    "glibc.malloc.tcache_count": 0,
}


def _glibc_linux() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def steady_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with ``GLIBC_TUNABLES`` set so that a process
    started with it has a steady heap from its first allocation (``STEADY_TUNABLES``); the
    user's other tunables are kept."""
    env = dict(os.environ if env is None else env)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
            if t and t.partition("=")[0] not in STEADY_TUNABLES]  # fmt: skip
    env["GLIBC_TUNABLES"] = ":".join(kept + [f"{k}={v}" for k, v in STEADY_TUNABLES.items()])
    return env


def started_steady() -> bool:
    """Whether this process's environment carries ``steady_env``'s tunables (the environment it
    was started with, unless the program changed ``os.environ`` since)."""
    have = dict(t.partition("=")[::2] for t in os.environ.get("GLIBC_TUNABLES", "").split(":"))
    return all(have.get(k) == str(v) for k, v in STEADY_TUNABLES.items())


def rerun_steady(cmd: list[str]) -> int | None:
    """For ``--heap steady`` on glibc: when this process was not started with ``steady_env``, run
    ``cmd`` (this program again, same arguments) in a process that is, its output passed
    through, and return its exit code; otherwise ``None``, and the caller goes on."""
    if not _glibc_linux() or started_steady():
        return None
    return subprocess.run(cmd, env=steady_env()).returncode


def steady_heap() -> str:
    """Keep freed memory in this process's heap (glibc on Linux): ``mallopt`` fixes the mmap
    threshold and the trim threshold at ``STEADY_BYTES``, so allocations up to that size come
    from the heap and memory freed there stays mapped (the process keeps up to that much more
    memory than it uses). Freed memory serves the next request of its size only if the process
    was also started without glibc's small-block cache (``steady_env``, ``STEADY_TUNABLES``):
    the returned text says which, or why nothing was done (another C library or OS). Affects
    every allocation of the process from then on, torch's included."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return "heap as-is (not Linux)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "heap as-is (no mallopt: not glibc)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3  # (glibc's malloc.h)
    if mallopt(m_mmap_threshold, STEADY_BYTES) != 1 or mallopt(m_trim_threshold, STEADY_BYTES) != 1:
        return "heap as-is (mallopt refused)"
    if started_steady():
        return "heap steady (glibc mmap and trim thresholds 1 GiB, no tcache)"
    return ("heap thresholds only (glibc mmap and trim thresholds 1 GiB; tcache on, so freed "
            "blocks may go unused: start with bnlab.bench.steady_env())")  # fmt: skip


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not say)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def _layer(shape: tuple[int, ...], kind: str) -> nn.Module:
    import bnlab

    c = shape[1]
    classes = {
        2: (bnlab.BatchNorm1d, nn.BatchNorm1d),
        3: (bnlab.BatchNorm1d, nn.BatchNorm1d),
        4: (bnlab.BatchNorm2d, nn.BatchNorm2d),
        5: (bnlab.BatchNorm3d, nn.BatchNorm3d),
    }[len(shape)]
    return classes[0](c) if kind == "bnlab" else classes[1](c)


def _reference_math(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    """Algorithm 1 in plain torch ops (autograd does the backward), for torch.compile."""
    dims = (0, *range(2, x.dim()))
    shape = (1, -1, *([1] * (x.dim() - 2)))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * w.view(shape) + b.view(shape)


def _step_fn(layer: nn.Module | Callable, x: torch.Tensor, dy: torch.Tensor, mode: str, backend):
    """A zero-argument callable running one ``mode`` step of ``layer`` on ``x``."""
    import bnlab

    if mode in ("eval", "fwd"):  # (the layer's mode, set by the caller, tells them apart)

        def run():
            with bnlab.use_backend(backend), torch.no_grad():
                layer(x)

        return run
    xg = x.detach().clone().requires_grad_()
    params = list(layer.parameters()) if isinstance(layer, nn.Module) else []

    def run():
        with bnlab.use_backend(backend):
            xg.grad = None
            for p in params:
                p.grad = None
            layer(xg).backward(dy)

    return run


def bench_shape(
    name: str,
    shape: tuple[int, ...],
    repeats: int,
    compiled: bool,
    log: Callable[[str], None] = print,
    reference: bool = True,
    before: Callable[[], object] | None = None,
) -> list[Row]:
    """Time every variant and mode on one shape, in interleaved rounds (module docstring).
    Training-mode forward runs under no_grad for ``fwd`` (statistics + normalize + running-stat
    update, no autograd graph). ``before`` runs untimed before every timed call (``--cold``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2 + 1
    dy = torch.randn(shape, generator=g)
    four_d = len(shape) == 4
    inputs = {"": (x, dy)}
    if four_d:
        cl = torch.channels_last
        inputs["_cl"] = (x.contiguous(memory_format=cl), dy.contiguous(memory_format=cl))
        inputs["_bf16"] = (x.bfloat16(), dy.bfloat16())
        inputs["_bf16_cl"] = tuple(t.bfloat16() for t in inputs["_cl"])
    out = torch.empty_like(x)
    comp = None
    if compiled:
        w = torch.ones(shape[1], requires_grad=True)
        b = torch.zeros(shape[1], requires_grad=True)
        fn = torch.compile(_reference_math)

        def comp(t):
            return fn(t, w, b, 1e-5)

        comp.parameters = lambda: [w, b]  # type: ignore[attr-defined]
    rows = []
    for mode in MODES:
        runs: dict[str, Callable[[], object]] = {
            "copy": lambda: out.copy_(x),
            "copy_new": lambda: torch.empty_like(x).copy_(x),
        }
        for variant in VARIANTS:
            if variant in runs or (variant == "reference" and not reference):
                continue
            suffix = next((s for s in ("_bf16_cl", "_cl", "_bf16") if variant.endswith(s)), "")
            if suffix not in inputs:
                continue
            xin, dyin = inputs[suffix]
            backend = {"reference": "reference", "fused_bf16": "auto", "fused_bf16_cl": "auto"}.get(
                variant, "fused"
            )
            if variant == "compiled":
                if comp is None or mode == "eval":
                    continue
                layer, backend = comp, "reference"
                t0 = time.perf_counter()
                _step_fn(layer, xin, dyin, mode, backend)()
                log(f"  torch.compile of the reference math on {shape}, {mode}: "
                    f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
            else:
                layer = _layer(shape, "torch" if variant.startswith("torch") else "bnlab")
                layer.train(mode != "eval")
            runs[variant] = _step_fn(layer, xin, dyin, mode, backend)
        times = _interleaved(runs, repeats, before=before)
        rows.append(Row(name, shape, mode, {v: times[v] for v in VARIANTS if v in times}))
        log(_format_row(rows[-1]))
    return rows


def _interleaved(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    before: Callable[[], object] | None = None,
):
    """Median seconds of each callable over ``repeats`` rounds, each round calling every one
    once (after ``warmup`` such rounds), in an order shuffled per round: what a call finds in
    the caches and the allocator depends on the call before it, and a fixed order would give
    every variant the same neighbour in every round. ``before``, if given, runs (untimed)
    before every timed call."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs.items())
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k, fn in order:
            if before is not None:
                before()
            f0 = minor_faults()
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
            TIMED["faults"] += minor_faults() - f0
            TIMED["calls"] += 1
    return {k: statistics.median(v) for k, v in samples.items()}


# Timed calls of this process and the minor page faults inside them (module docstring).
TIMED = {"calls": 0, "faults": 0}


def faults_text() -> str:
    """The minor page faults per timed call so far, as the header states them."""
    return f"{TIMED['faults'] / max(1, TIMED['calls']):.1f} minor page faults per timed call"


# At least this much is written to evict the caches: more than the last-level cache a core sees
# on most CPUs (96 MB per CCD or socket on many; some server parts have several times that, which
# cold_bytes() reads from the machine).
COLD_BYTES = 128 << 20


def cold_bytes() -> int:
    """Bytes :func:`cache_flusher` writes by default: twice this machine's last-level cache
    (:func:`bnlab.kernels.llc_bytes`, as the kernels read it), at least ``COLD_BYTES``."""
    from bnlab.kernels import llc_bytes

    return max(COLD_BYTES, 2 * llc_bytes())


def cache_flusher(nbytes: int | None = None) -> Callable[[], None]:
    """A callable that writes ``nbytes`` (default :func:`cold_bytes`) of a buffer of its own,
    evicting other data from the caches (written, not only read, so that the lines it leaves are
    its own)."""
    buf = torch.empty((cold_bytes() if nbytes is None else nbytes) // 4)

    def flush() -> None:
        buf.fill_(1.0)

    return flush


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.3f}"


def _format_row(r: Row) -> str:
    t = r.times
    parts = [f"{r.shape_name:24s} {r.mode:8s}"]
    for v in VARIANTS:
        parts.append(f"{v}={_ms(t.get(v))}")
    return " ".join(parts)


RATIOS = (
    ("torch", "fused"),
    ("torch_cl", "fused_cl"),
    ("torch_bf16", "fused_bf16"),
    ("torch_bf16_cl", "fused_bf16_cl"),
    ("fused", "copy"),
    ("fused_cl", "copy"),
    ("torch", "copy"),
    ("copy_new", "copy"),
)


def format_table(rows: list[Row]) -> str:
    """Markdown table: times in ms of the variants measured, then the ratios of ``RATIOS`` (the
    one-process case of :func:`format_spread`)."""
    return format_spread([rows])


RESNET_BASE = "torch BatchNorm2d"


def format_spread(runs: list[list[Row]]) -> str:
    """Markdown table of the same benchmark run in several processes (``runs``, one list of
    rows per process, same cells): each time the median of the per-process medians, each ratio
    of ``RATIOS`` as ``median (min-max)`` of the per-process ratios (a ratio is taken within
    one process, never across two)."""
    cols = [v for v in VARIANTS if any(v in r.times for r in runs[0])]
    names = [f"{a} / {b}" for a, b in RATIOS]
    head = "| shape | mode | " + " | ".join(cols + names) + " |\n"
    head += "|---|---|" + "---|" * (len(cols) + len(names)) + "\n"
    lines = []
    for i, r in enumerate(runs[0]):
        same = [run[i] for run in runs]
        cells = [f"{r.shape_name} {tuple(r.shape)}", r.mode]
        for v in cols:
            ts = [x.times[v] for x in same if v in x.times]
            cells.append(_ms(statistics.median(ts)) if ts else "-")
        for a, b in RATIOS:
            rs = [x.times[a] / x.times[b] for x in same if a in x.times and b in x.times]
            cells.append(_spread(rs) if rs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _run_processes(
    n: int, child_argv: list[str], env: dict[str, str] | None = None
) -> tuple[list[list[Row]], list[dict], list[str], list[str]]:
    """Run ``bnlab bench *child_argv`` in ``n`` fresh Python processes (environment ``env``, or
    this one's), one at a time (two at once would share the cores), and collect each one's
    rows, ResNet-20 steps, page-fault count and heap (what :func:`steady_heap` reported). A
    failing process stops the run with its output."""
    rows_runs, resnet_runs, faults, heaps = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-") as d:
        for i in range(n):
            path = os.path.join(d, f"rows{i}.json")
            cmd = [sys.executable, "-m", "bnlab.bench", *child_argv, "--rows-json", path]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(
                    f"bnlab bench: process {i + 1} of {n} failed (exit {done.returncode}):\n"
                    f"{done.stdout}{done.stderr}"
                )
            with open(path) as f:
                data = json.load(f)
            rows_runs.append([Row(r["shape_name"], tuple(r["shape"]), r["mode"], r["times"])
                              for r in data["rows"]])  # fmt: skip
            resnet_runs.append(data["resnet"])
            faults.append(data.get("faults", "?"))
            heaps.append(data.get("heap", "?"))
            print(f"process {i + 1}/{n}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows_runs, resnet_runs, faults, heaps


def bench_resnet(repeats: int, batch: int = 128, log: Callable[[str], None] = print) -> str:
    """One SGD training step of ResNet-20 on random (batch, 3, 32, 32) data: torch BatchNorm2d,
    bnlab (reference), bnlab (fused), bnlab fused with BN+ReLU fused. Markdown table."""
    return format_resnet([resnet_times(repeats, batch, log)], batch)


def resnet_times(
    repeats: int, batch: int = 128, log: Callable[[str], None] = print
) -> dict[str, float]:
    """The steps of :func:`bench_resnet`: {configuration: median seconds}."""
    import bnlab
    from bnlab.models import resnet20

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    configs = [
        (RESNET_BASE, "torch", False, "reference"),
        ("bnlab reference", "bnlab", False, "reference"),
        ("bnlab fused", "bnlab", False, "fused"),
        ("bnlab fused + BN-ReLU fusion", "bnlab", True, "fused"),
    ]
    steps = {}
    for label, kind, fuse, backend in configs:
        torch.manual_seed(0)
        model = resnet20(fuse_relu=fuse)
        if kind == "torch":
            model = bnlab.convert(model, to="torch")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step(model=model, opt=opt, backend=backend):
            with bnlab.use_backend(backend):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

        steps[label] = step
    # Interleaved (one step of each model per round), so load drift on a shared machine hits
    # every model alike.
    results = _interleaved(steps, repeats, warmup=2)
    for label, t in results.items():
        log(f"  resnet20 step, {label}: {t * 1e3:.1f} ms")
    return results


def _spread(values: list[float]) -> str:
    """``median`` of one value, ``median (min-max)`` of several."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def format_resnet(runs: list[dict[str, float]], batch: int = 128) -> str:
    """Markdown table of :func:`resnet_times` results, one dict per process: median ms over
    the processes and ``torch / this`` per process (median and range when several)."""
    n = len(runs)
    ms = "median ms" if n == 1 else f"median ms ({n} processes)"
    text = f"| ResNet-20 training step (batch {batch}) | {ms} | torch / this |\n"
    text += "|---|---|---|\n"
    for label in runs[0]:
        t = statistics.median(r[label] for r in runs)
        ratio = _spread([r[RESNET_BASE] / r[label] for r in runs])
        text += f"| {label} | {t * 1e3:.1f} | {ratio} |\n"
    return text


SECTION = "## Fused kernels"


def _write_results(path: str, run: str) -> None:
    """Add ``run`` (a ``### ...`` subsection) to the Markdown file's ``## Fused kernels``
    section, before the runs already there (after the section's own introduction), keeping
    every other line of the file; a file or section that does not exist yet is started. The
    file is replaced atomically: an interrupted write leaves it as it was."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    run = run.rstrip("\n") + "\n"
    heading = re.search("^" + re.escape(SECTION) + "[ \t]*$", text, re.MULTILINE)  # (a line)
    if heading:
        start = heading.end()
        end = text.find("\n## ", start)
        end = len(text) if end < 0 else end + 1
        first = text.find("\n### ", start, end)
        at = end if first < 0 else first + 1
        before = text[:at].rstrip("\n") + "\n\n"
        after = text[at:]
        text = before + run + ("\n" + after if after.strip() else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"{SECTION}\n\n{run}"
    atomic_write_text(Path(path), text)


def main(argv: list[str] | None = None) -> int:
    """``bnlab bench``: print (and optionally write) the kernel and ResNet-20 benchmark tables."""
    p = argparse.ArgumentParser(prog="bnlab bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, 5 repeats, no compile/resnet")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per cell (median)")
    p.add_argument(
        "--shapes", nargs="+", metavar="NAME", choices=sorted(SHAPES),
        help=f"subset of shapes; known: {', '.join(SHAPES)}",
    )  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-path column")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-20 step")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads")
    p.add_argument(
        "--cold", action="store_true",
        help="evict the caches before every timed call (module docstring)",
    )  # fmt: skip
    p.add_argument(
        "--processes", type=int, default=1, metavar="N",
        help="run the benchmark in N fresh processes; report medians and ranges over them",
    )  # fmt: skip
    p.add_argument(
        "--write", metavar="PATH",
        help="add the tables to this Markdown file as a new dated run at the top of its "
             "'## Fused kernels' section (earlier runs and other sections are kept)",
    )  # fmt: skip
    p.add_argument(
        "--heap", choices=("as-is", "steady"), default="as-is",
        help="glibc's heap as a process has it, or freed memory kept mapped (module docstring)",
    )  # fmt: skip
    p.add_argument("--rows-json", metavar="PATH", help=argparse.SUPPRESS)  # (--processes' child)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.processes < 1:
        p.error("--processes must be >= 1")
    if args.quick:
        args.repeats = min(args.repeats, 5)
    names = args.shapes or (list(QUICK) if args.quick else list(SHAPES))
    if args.processes > 1:
        return _main_processes(args, names, argv)
    if args.heap == "steady":
        code = rerun_steady([sys.executable, "-m", "bnlab.bench",
                             *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
        if code is not None:
            return code
    heap = steady_heap() if args.heap == "steady" else "heap as-is"
    if args.threads:
        torch.set_num_threads(args.threads)
    import numba

    from . import kernels

    kernels.compiled()  # (Numba follows torch's thread count; starting it keeps torch's)

    t0 = time.perf_counter()
    kernels.warm_up()
    warm = time.perf_counter() - t0
    threads = f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}"
    caches = ", cold caches" if args.cold else ""
    print(
        f"bnlab bench: median of {args.repeats} interleaved rounds{caches}, {threads}, "
        f"{heap}; {machine_text()}"
    )
    print(f"kernel warm-up (compile or load from cache): {warm:.1f} s")
    compiled = not (args.no_compile or args.quick)
    reference = not args.no_reference
    before = cache_flusher() if args.cold else None
    rows: list[Row] = []
    for name in names:
        try:
            rows += bench_shape(
                name, SHAPES[name], args.repeats, compiled, print, reference, before
            )
        except Exception as e:  # torch.compile may be unavailable (no compiler): say so, go on
            if not compiled:
                raise
            print(f"  torch.compile failed ({type(e).__name__}: {e}); skipping that column")
            compiled = False
            rows += bench_shape(
                name, SHAPES[name], args.repeats, compiled, print, reference, before
            )
    table = format_table(rows)
    print(table)
    print(f"layer calls: {faults_text()}")
    resnet, steps = "", {}
    if not (args.no_resnet or args.quick):
        steps = resnet_times(args.repeats)
        resnet = format_resnet([steps])
        print(resnet)
    if args.rows_json:
        with open(args.rows_json, "w") as f:
            json.dump({"rows": [vars(r) for r in rows], "resnet": steps, "faults": faults_text(),
                       "heap": heap}, f)  # fmt: skip
    if args.write:
        how = f"median of {args.repeats} interleaved rounds{caches}, {heap}, {faults_text()}"
        _write_section(args.write, argv, f"{threads}, {machine_text()} (at the end), {how}",
                       table, resnet)  # fmt: skip
    return 0


def _write_section(path: str, argv: list[str] | None, how: str, table: str, resnet: str) -> None:
    argv_text = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    now = _dt.datetime.now(_dt.UTC)
    cpu = cpu_model() or "unknown CPU"
    run = (
        f"### {cpu}, {now:%Y-%m-%d %H:%M} UTC: `bnlab bench`\n\n"
        f"Command: `bnlab bench {argv_text}` (or `python benchmarks/bench_kernels.py`), "
        f"{how}, times in ms.\n\n"
        + table
        + "\n"
        + resnet
    )
    _write_results(path, run)


def _main_processes(args: argparse.Namespace, names: list[str], argv: list[str] | None) -> int:
    """``--processes N``: the same benchmark in N fresh processes (module docstring)."""
    child = ["--repeats", str(args.repeats), "--shapes", *names]
    flags = ("quick", "no_compile", "no_reference", "no_resnet", "cold")
    child += [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f)]
    if args.threads:
        child += ["--threads", str(args.threads)]
    child += ["--heap", args.heap]
    caches = ", cold caches" if args.cold else ""
    threads = f"threads {args.threads}" if args.threads else "default threads"
    how = (f"{args.processes} processes, each the median of {args.repeats} interleaved "
           f"rounds{caches}, {threads}, heap {args.heap}; times: median over the processes; "
           "ratios: median (min-max) of the per-process ratios")  # fmt: skip
    print(f"bnlab bench: {how}; {machine_text()}", flush=True)
    env = steady_env() if args.heap == "steady" and _glibc_linux() else None
    rows_runs, resnet_runs, faults_runs, heaps = _run_processes(args.processes, child, env)
    how = how.replace(f"heap {args.heap}", " / ".join(sorted(set(heaps))))
    table = format_spread(rows_runs)
    print(table)
    faults = "; ".join(faults_runs)
    print(f"layer calls, per process: {faults}")
    how += f" ({faults})"
    resnet = ""
    if resnet_runs[0]:
        resnet = format_resnet(resnet_runs)
        print(resnet)
    if args.write:
        _write_section(args.write, argv, f"{how}, {machine_text()} (at the end)", table, resnet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
