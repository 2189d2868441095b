"""Whole-model steps with bnlab's BatchNorm against torch's, eager and under ``torch.compile``.

For ResNet-20 (``bnlab.models.resnet20``, CIFAR 3x32x32) and a torchvision-style ResNet-18
(``tests/tv_resnet.py``) built three ways with the same weights - torch's ``BatchNorm2d``
(``torch``), bnlab's (``bnlab``) and bnlab's with the fused ReLU (``bnlab+relu``, every BN
followed by a ReLU built with ``activation="relu"``) - and, with ``--no-bn``, a fourth without
any BN (``no-bn``: torch's model with every BN layer replaced by ``nn.Identity``, its ReLUs and
residual additions kept) - two steps are timed:

* ``train`` - forward, cross-entropy, backward and an SGD step (momentum 0.9);
* ``eval``  - an inference forward under ``torch.no_grad()``.

Each eagerly and with the model compiled by Inductor (``torch.compile(model)``; the loss,
backward and optimizer stay eager) as ``--compiled`` lists, ``variant:form`` with a form of
:func:`bnlab.ops.set_compile_form` (``ops``: bnlab's operators and kernels inside the graph;
``decompose``: standard ops that Inductor fuses; ``auto``: the default); ``--autocast`` runs
the forward under bfloat16 autocast; ``--channels-last`` runs models and input in channels_last
memory format (what a CPU user picks for oneDNN's convolutions; every BN layer then gets a
channels_last input). Rounds are interleaved (each round times every case once,
in a shuffled order); medians in milliseconds and the ratio
``torch time / case time`` (above 1: faster than torch BN in the same setting). The ``no-bn``
ratio is the bound of every BN implementation: the step of a BN that took no time at all, so
no BN can make the step faster than that ratio (eager and compiled alike). torch and Numba
threads are both set to ``--threads``; Inductor's on-disk caches are off, so every compiled case
is generated from the code being measured. Run (the machine otherwise idle)::

    PYTHONPATH=src python benchmarks/bench_models.py --threads 1 [--rounds 20] \
        [--compiled torch,bnlab:auto,bnlab+relu:ops,bnlab+relu:decompose] [--autocast] \
        [--channels-last] [--no-bn [--compiled ...,no-bn]]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import bnlab
from bnlab import ops
from bnlab.bench import _interleaved, rerun_steady, steady_heap
from bnlab.models import resnet20

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tv_resnet import resnet18  # noqa: E402  (a torch.nn-only model, shared with the tests)


def without_bn(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every BN layer (torch's or bnlab's) replaced by ``nn.Identity``, in
    place; refused, changing nothing, when a BN layer fuses an activation (its ReLU would go
    with it)."""
    bns = [(name, m) for name, m in model.named_modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # fmt: skip
    for name, m in bns:
        if getattr(m, "activation", None) is not None:
            raise ValueError(f"without_bn: the BN layer {name!r} fuses an activation")
    for name, _ in bns:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, torch.nn.Identity())
    return model


def variants(name: str, no_bn: bool = False) -> dict[str, torch.nn.Module]:
    """torch BN, bnlab BN and bnlab BN+ReLU versions of one architecture (the fused model
    has no separate ReLU modules; the timing does not depend on the weights' values), and
    with ``no_bn`` the same architecture without BN (:func:`without_bn`)."""
    torch.manual_seed(0)
    if name == "resnet20":
        plain, fused = resnet20(), resnet20(fuse_relu=True)
    else:
        plain = bnlab.convert(resnet18())
        fused = resnet18(norm=bnlab.BatchNorm2d, fuse_relu=True)
    out = {"torch": bnlab.convert(copy.deepcopy(plain), to="torch"), "bnlab": plain,
           "bnlab+relu": fused}  # fmt: skip
    if no_bn:
        out["no-bn"] = without_bn(copy.deepcopy(out["torch"]))
    return out


def cases(
    name: str,
    shape,
    mode: str,
    compiled: list[tuple[str, str]],
    autocast: bool = False,
    channels_last: bool = False,
    no_bn: bool = False,
):
    """{case name: a callable running one step}: every variant eagerly, and the compiled
    ``(variant, form)`` pairs; with ``autocast`` the forward runs under
    ``torch.autocast("cpu", torch.bfloat16)`` (bfloat16 convolution outputs, so every BN layer
    gets a bfloat16 input and keeps float32 parameters); with ``channels_last`` the models and
    the input are in that memory format; with ``no_bn`` the ``no-bn`` variant too."""
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (shape[0],))
    out = {}
    for variant, model in variants(name, no_bn).items():
        model.train(mode == "train")
        settings = [("eager", None)] + [("compiled", f) for v, f in compiled if v == variant]
        for how, form in settings:
            net = copy.deepcopy(model).to(memory_format=fmt)
            run_net = torch.compile(net) if how == "compiled" else net
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            formed = form and variant.startswith("bnlab")  # (the form is bnlab's to choose)
            label = f"{variant} {how}" + (f" {form}" if formed else "")

            def step(run_net=run_net, opt=opt, form=form or "ops"):
                amp = torch.autocast("cpu", torch.bfloat16, enabled=autocast)
                with ops.compile_form(form):
                    if mode == "train":
                        opt.zero_grad(set_to_none=True)
                        with amp:
                            loss = F.cross_entropy(run_net(x)[:, :10], target)
                        loss.backward()
                        opt.step()
                    else:
                        with torch.no_grad(), amp:
                            run_net(x)

            out[label] = step
    return out


def measure(steps: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per step over ``rounds`` interleaved rounds in a shuffled order (the
    timer of ``bnlab bench``), after ``warmup`` rounds (which also compile the compiled cases)."""
    return {k: t * 1e3 for k, t in _interleaved(steps, rounds, warmup=warmup).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch and Numba threads")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed rounds (median)")
    p.add_argument("--models", default="resnet20,resnet18", help="comma-separated")
    p.add_argument("--batch20", type=int, default=128, help="ResNet-20 batch (3x32x32)")
    p.add_argument("--batch18", type=int, default=16, help="ResNet-18 batch (3x112x112)")
    p.add_argument("--compiled", default="torch,bnlab:auto,bnlab+relu:auto",
                   help="compiled cases, variant[:form] comma-separated ('' for eager only)")
    p.add_argument("--autocast", action="store_true",
                   help="run the forward under torch.autocast('cpu', torch.bfloat16)")
    p.add_argument("--channels-last", action="store_true",
                   help="models and input in channels_last memory format")
    p.add_argument("--no-bn", action="store_true",
                   help="also time the model without BN: the bound of any BN (module docstring)")
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
    import numba

    bnlab.kernels.compiled()  # (Numba follows torch's count; starting it keeps torch's)
    bnlab.kernels.warm_up()
    compiled = []
    for item in filter(None, args.compiled.split(",")):
        variant, _, form = item.partition(":")
        if variant not in ("torch", "bnlab", "bnlab+relu", "no-bn"):
            p.error(f"--compiled: unknown variant {variant!r}")
        if variant == "no-bn" and not args.no_bn:
            p.error("--compiled: the no-bn variant needs --no-bn")
        ops.set_compile_form(form or "auto")  # validates
        compiled.append((variant, form or "auto"))
    ops.set_compile_form("auto")
    # Every compiled case runs the same forward code with other guards (module, mode, form):
    # past Dynamo's default limit of recompilations per code object the later cases would run
    # eagerly and be timed as compiled.
    dyn = torch._dynamo.config
    dyn.recompile_limit = max(dyn.recompile_limit, 8 * len(compiled) + 8)
    dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 64 * len(compiled))
    # Compiled code is generated afresh: Inductor's on-disk caches do not key on everything
    # bnlab's operators declare (their layout tags), so a cache filled by another version of
    # bnlab could be timed instead of this one.
    torch.compiler.config.force_disable_caches = True
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()} (numba "
          f"{numba.get_num_threads()}), {'bf16 autocast' if args.autocast else 'float32'}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}, {heap}, "
          f"median of {args.rounds} interleaved rounds (shuffled order), "
          "ms; ratio = torch's time in the same setting / this case's time")  # fmt: skip
    print("| model | step | case | ms | torch / case |")
    print("|---|---|---|---:|---:|")
    shapes = {"resnet20": (args.batch20, 3, 32, 32), "resnet18": (args.batch18, 3, 112, 112)}
    for name in args.models.split(","):
        for mode in ("train", "eval"):
            steps = cases(name, shapes[name], mode, compiled, args.autocast, args.channels_last,
                          args.no_bn)  # fmt: skip
            r = measure(steps, args.rounds)
            for label, ms in r.items():
                key = "torch compiled" if "compiled" in label else "torch eager"
                ref = r.get(key, float("nan"))
                print(f"| {name} {shapes[name]} | {mode} | {label} | {ms:.2f} | {ref / ms:.2f} |",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
