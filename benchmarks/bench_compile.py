"""bnlab's BatchNorm under torch.compile: its custom operators vs its standard-op decomposition
(which Inductor fuses) vs torch's BatchNorm, compiled, in one process.

Per shape: median microseconds of a training forward (``fwd``, no_grad), a training forward +
backward (``f+b``) and an inference forward (``eval``), each compiled with Inductor
(``fullgraph=True``): ``ops`` = bnlab with ``bnlab.ops.set_compile_form("ops")``, ``decomp`` =
``set_compile_form("decompose")``, ``torch`` = ``torch.nn.BatchNorm*``. Then a whole
ResNet-20 training step (forward, backward, SGD) with the model compiled the same three ways
(the optimizer's calls stay eager: Dynamo does not trace ``zero_grad``). Interleaved rounds in
an order shuffled per round, medians; torch and Numba threads set to ``--threads``. Run::

    PYTHONPATH=src python benchmarks/bench_compile.py [--rounds 100] [--threads 1] [--heap steady]
"""

from __future__ import annotations

import argparse
import sys

import torch

import bnlab
from bnlab import ops
from bnlab.bench import _interleaved, rerun_steady, steady_heap
from bnlab.models import resnet20

SHAPES = [(60, 100), (64, 16, 32, 32), (128, 16, 32, 32), (128, 64, 8, 8), (32, 128, 56, 56)]


def _layer(shape, lib):
    classes = {2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
               4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d)}  # fmt: skip
    ours, theirs = classes[len(shape)]
    return (ours if lib == "bnlab" else theirs)(shape[1])


def _compiled(fn, form):
    """fn compiled with bnlab's operators or decomposition (traced on first call)."""
    compiled = torch.compile(fn, fullgraph=True)

    def call(*args):
        with ops.compile_form(form):
            return compiled(*args)

    return call


def layer_cases(shape, mode):
    x = torch.randn(shape, requires_grad=(mode == "f+b"))
    dy = torch.randn(shape)
    cases = {}
    for name, lib, form in (("ops", "bnlab", "ops"), ("decomp", "bnlab", "decompose"),
                            ("torch", "torch", "ops")):  # fmt: skip
        layer = _layer(shape, lib).train(mode != "eval")
        fn = _compiled(layer, form)

        def run(fn=fn):
            if mode == "f+b":
                x.grad = None
                fn(x).backward(dy)
            else:
                with torch.no_grad():
                    fn(x)

        cases[name] = run
    return cases


def model_cases(batch):
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 10, (batch,))
    cases = {}
    for name, form in (("ops", "ops"), ("decomp", "decompose"), ("torch", "ops")):
        torch.manual_seed(0)
        model = resnet20()
        if name == "torch":
            model = bnlab.convert(model, to="torch")
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        run = _compiled(model, form)

        def step(run=run, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(run(x), target)
            loss.backward()
            opt.step()

        cases[name] = step
    return cases


def measure(cases, rounds):
    """Median microseconds of each case over ``rounds`` rounds in an order shuffled per round
    (:func:`bnlab.bench._interleaved`; compile and warm-up first): in a fixed order each case
    always follows the same one, and what that one leaves in the caches and the thread pool
    becomes part of its time."""
    return {k: v * 1e6 for k, v in _interleaved(cases, rounds).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100, help="interleaved timed rounds (median)")
    p.add_argument("--threads", type=int, default=1, help="torch and Numba threads")
    p.add_argument("--batch", type=int, default=128, help="ResNet-20 batch")
    p.add_argument("--skip-model", action="store_true", help="layers only")
    p.add_argument("--shapes", default=None,
                   help=f"layer shapes, e.g. '60x100,64x16x32x32' (default: {SHAPES})")
    p.add_argument("--heap", choices=("as-is", "steady"), default="as-is",
                   help="glibc's heap as a process has it, or freed memory kept mapped "
                        "(bnlab.bench.steady_heap)")
    args = p.parse_args(argv)
    if args.heap == "steady":  # (glibc reads the rest of a steady heap's settings at start)
        code = rerun_steady([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
        if code is not None:
            return code
    heap = steady_heap() if args.heap == "steady" else "heap as-is"
    torch.set_num_threads(args.threads)
    bnlab.kernels.compiled()  # (Numba follows torch's count; starting it keeps torch's)
    bnlab.kernels.warm_up()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32, Inductor, "
          f"median of {args.rounds} interleaved rounds, {heap}, microseconds")  # fmt: skip
    print(f"{'shape':>18} {'mode':>5} | {'ops':>9} {'decomp':>9} {'torch':>9} | "
          f"{'ops/torch':>9} {'decomp/torch':>12}")  # fmt: skip
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    for shape in shapes:
        for mode in ("fwd", "f+b", "eval"):
            # (each case compiles the layers' forward anew: without a reset the cases of every
            # shape and mode pile up on one code object, past Dynamo's recompile limit)
            torch._dynamo.reset()
            r = measure(layer_cases(shape, mode), args.rounds)
            print(f"{str(shape):>18} {mode:>5} | {r['ops']:9.0f} {r['decomp']:9.0f} "
                  f"{r['torch']:9.0f} | {r['ops'] / r['torch']:9.2f} "
                  f"{r['decomp'] / r['torch']:12.2f}")  # fmt: skip
    if not args.skip_model:
        torch._dynamo.reset()
        r = measure(model_cases(args.batch), max(5, args.rounds // 10))
        print(f"ResNet-20 training step, batch {args.batch}: ops {r['ops'] / 1e3:.1f} ms, "
              f"decomp {r['decomp'] / 1e3:.1f} ms, torch {r['torch'] / 1e3:.1f} ms; "
              f"torch/ops {r['torch'] / r['ops']:.2f}, torch/decomp "
              f"{r['torch'] / r['decomp']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
