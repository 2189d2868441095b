"""Benchmark of the batch-norm implementations on the CPU: ``bnlab bench``.

For each shape (from real networks) and each mode - ``fwd`` (training forward), ``fwd+bwd``
(training forward and backward), ``eval`` (inference forward, no autograd) - it times, in one run:

    fused      bnlab layer, fused kernels (backend "fused")
    reference  bnlab layer, reference path (backend "reference")
    torch      torch.nn.BatchNorm1d/2d/3d, contiguous input
    torch_cl   torch.nn.BatchNorm2d, channels_last input (4D shapes only)
    fused_cl   bnlab layer, fused kernels, channels_last input (4D shapes only)
    compiled   torch.compile of the reference math (Algorithm 1 in plain torch ops)
    copy       y.copy_(x) of the same tensor: reads and writes each byte once

and reports the median of ``--repeats`` runs (after warm-up) and the ratios to ``torch`` and to
``copy``. Also one end-to-end training step (forward, backward, SGD update) of ResNet-20 on
random CIFAR-sized data with bnlab layers vs torch's. All tensors float32.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SHAPES", "main", "bench_shape", "bench_resnet", "format_table"]

# name -> (N, C[, H, W]); the BN inputs of real networks
SHAPES: dict[str, tuple[int, ...]] = {
    "resnet20/110 stage1": (128, 16, 32, 32),
    "resnet20/110 stage2": (128, 32, 16, 16),
    "resnet20/110 stage3": (128, 64, 8, 8),
    "target (64,64,32,32)": (64, 64, 32, 32),
    "target (128,256,14,14)": (128, 256, 14, 14),
    "inception-like": (32, 256, 28, 28),
    "mnist mlp (batch 60)": (60, 100),
    "dense (4096,1024)": (4096, 1024),
}
QUICK = ("target (64,64,32,32)", "mnist mlp (batch 60)")
MODES = ("fwd", "fwd+bwd", "eval")
VARIANTS = ("fused", "reference", "torch", "torch_cl", "fused_cl", "compiled", "copy")


@dataclass
class Row:
    shape_name: str
    shape: tuple[int, ...]
    mode: str
    times: dict[str, float]  # variant -> median seconds (missing = not applicable/skipped)


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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

    if mode == "eval":

        def run():
            with bnlab.use_backend(backend), torch.no_grad():
                layer(x)

        return run
    if mode == "fwd":

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
) -> list[Row]:
    """Time every variant and mode on one float32 shape. Training-mode forward runs under
    no_grad for ``fwd`` (statistics + normalize + running-stat update, no autograd graph)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2 + 1
    dy = torch.randn(shape, generator=g)
    cl = len(shape) == 4
    xcl = x.contiguous(memory_format=torch.channels_last) if cl else None
    dycl = dy.contiguous(memory_format=torch.channels_last) if cl else None
    out = torch.empty_like(x)
    copy_t = _median_time(lambda: out.copy_(x), repeats)
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
        times = {"copy": copy_t}
        for variant in VARIANTS[:-1]:
            if variant in ("torch_cl", "fused_cl") and not cl:
                continue
            xin, dyin = (xcl, dycl) if variant.endswith("_cl") else (x, dy)
            backend = "reference" if variant == "reference" else "fused"
            if variant == "compiled":
                if comp is None or mode == "eval":
                    continue
                layer = comp
                backend = "reference"
            else:
                layer = _layer(shape, "torch" if variant.startswith("torch") else "bnlab")
                layer.train(mode != "eval")
            if variant.startswith("torch"):
                backend = "reference"  # irrelevant to torch layers
            run = _step_fn(layer, xin, dyin, mode, backend)
            if variant == "compiled" and mode == "fwd":
                t0 = time.perf_counter()
                run()
                dt = time.perf_counter() - t0
                log(f"  torch.compile of the reference math on {shape}: {dt:.1f} s")
            times[variant] = _median_time(run, repeats)
        rows.append(Row(name, shape, mode, times))
        log(_format_row(rows[-1]))
    return rows


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.3f}"


def _format_row(r: Row) -> str:
    t = r.times
    parts = [f"{r.shape_name:24s} {r.mode:8s}"]
    for v in VARIANTS:
        parts.append(f"{v}={_ms(t.get(v))}")
    return " ".join(parts)


def format_table(rows: list[Row]) -> str:
    """Markdown table: times in ms, then fused and torch as ratios to torch and to copy."""
    head = (
        "| shape | mode | fused | reference | torch | torch_cl | fused_cl | compiled | copy "
        "| torch / fused | fused / copy | torch / copy | torch_cl / fused_cl |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        t = r.times

        def ratio(a, b, t=t):
            return "-" if a not in t or b not in t else f"{t[a] / t[b]:.2f}"

        cells = [f"{r.shape_name} {tuple(r.shape)}", r.mode]
        cells += [_ms(t.get(v)) for v in VARIANTS]
        cells += [
            ratio("torch", "fused"),
            ratio("fused", "copy"),
            ratio("torch", "copy"),
            ratio("torch_cl", "fused_cl"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def bench_resnet(repeats: int, batch: int = 128, log: Callable[[str], None] = print) -> str:
    """One SGD training step of ResNet-20 on random (batch, 3, 32, 32) data: torch BatchNorm2d,
    bnlab (reference), bnlab (fused), bnlab fused with BN+ReLU fused. Markdown table."""
    import bnlab
    from bnlab.models import resnet20

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    configs = [
        ("torch BatchNorm2d", "torch", False, "reference"),
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

        for _ in range(2):  # warm-up
            step()
        steps[label] = step
    # Interleaved (one step of each model per round), so load drift on a shared machine hits
    # every model alike.
    samples: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            samples[label].append(time.perf_counter() - t0)
    results = {label: statistics.median(ts) for label, ts in samples.items()}
    for label, t in results.items():
        log(f"  resnet20 step, {label}: {t * 1e3:.1f} ms")
    base = results["torch BatchNorm2d"]
    text = f"| ResNet-20 training step (batch {batch}) | median ms | torch / this |\n"
    text += "|---|---|---|\n"
    for label, t in results.items():
        text += f"| {label} | {t * 1e3:.1f} | {base / t:.2f} |\n"
    return text


def _write_results(path: str, section: str) -> None:
    """Replace (or append) the '## Fused kernels' section of the Markdown file."""
    heading = "## Fused kernels"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if nxt < 0 else text[nxt + 1 :])
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section
    with open(path, "w") as f:
        f.write(text)


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
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-20 step")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads")
    p.add_argument("--write", metavar="PATH", help="write the tables into this Markdown file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.quick:
        args.repeats = min(args.repeats, 5)
    names = args.shapes or (list(QUICK) if args.quick else list(SHAPES))
    if args.threads:
        torch.set_num_threads(args.threads)
        import numba

        numba.set_num_threads(args.threads)
    import numba

    from . import kernels

    t0 = time.perf_counter()
    kernels.warm_up()
    warm = time.perf_counter() - t0
    threads = f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}"
    print(f"bnlab bench: float32, median of {args.repeats}, {threads}")
    print(f"kernel warm-up (compile or load from cache): {warm:.1f} s")
    compiled = not (args.no_compile or args.quick)
    rows: list[Row] = []
    for name in names:
        try:
            rows += bench_shape(name, SHAPES[name], args.repeats, compiled)
        except Exception as e:  # torch.compile may be unavailable (no compiler): say so, go on
            if not compiled:
                raise
            print(f"  torch.compile failed ({type(e).__name__}: {e}); skipping that column")
            compiled = False
            rows += bench_shape(name, SHAPES[name], args.repeats, compiled)
    table = format_table(rows)
    print(table)
    resnet = ""
    if not (args.no_resnet or args.quick):
        resnet = bench_resnet(args.repeats)
        print(resnet)
    if args.write:
        argv_text = " ".join(argv) if argv is not None else ""
        section = (
            "## Fused kernels\n\n"
            f"Command: `bnlab bench {argv_text}` (or `python benchmarks/bench_kernels.py`), "
            f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC, {threads}, float32, "
            f"median of {args.repeats} runs, times in ms.\n\n" + table + "\n" + resnet
        )
        _write_results(args.write, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
