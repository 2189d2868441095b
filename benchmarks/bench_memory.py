"""Memory of a training step: bnlab BatchNorm (plain and fused BN+ReLU) against torch's.

For ResNet-20 (bnlab.models.resnet20, CIFAR 32x32) and a torchvision-style ResNet-18
(tests/tv_resnet.py, 224x224) built three ways - torch's BatchNorm2d, bnlab's BatchNorm2d,
bnlab's with the fused ReLU (``activation="relu"`` on every BN followed by a ReLU) - one
forward + backward step is measured twice:

* ``peak``  - the peak of the bytes allocated by torch's CPU allocator during the step, above
  what was allocated before it (parameters and input excluded; gradients included), from the
  profiler's memory events in time order;
* ``saved`` - the bytes of the distinct tensors autograd keeps for the backward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded: the activation memory.

Ratios are against torch's BatchNorm in the same run. With ``--compiled`` every model runs
compiled by Inductor as well (its caches off), bnlab's in both compile forms
(:func:`bnlab.set_compile_form`), against torch's compiled. Run::

    PYTHONPATH=src python benchmarks/bench_memory.py [--batch20 64] [--batch18 8] [--threads 2]
                                                     [--compiled]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import bnlab
from bnlab.models import resnet20

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tv_resnet import resnet18  # noqa: E402  (a torch.nn-only model, shared with the tests)


def variants(name: str):
    """{variant: model} for one architecture (the memory does not depend on the weights)."""
    torch.manual_seed(0)
    if name == "resnet20":
        plain = resnet20()
        fused = resnet20(fuse_relu=True)
    else:
        plain = bnlab.convert(resnet18())
        fused = resnet18(norm=bnlab.BatchNorm2d, fuse_relu=True)
    return {"torch BN": bnlab.convert(copy.deepcopy(plain), to="torch"),
            "bnlab BN": plain, "bnlab BN+ReLU": fused}  # fmt: skip


def _step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def peak_bytes(model, x) -> int:
    _step(model, x)  # warm-up: kernels loaded, allocator caches filled the same way
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def saved_bytes(model, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.square().mean().backward()
    return sum(seen.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch20", type=int, default=64, help="ResNet-20 batch (3x32x32)")
    p.add_argument("--batch18", type=int, default=8, help="ResNet-18 batch (3x224x224)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compiled", action="store_true",
                   help="also every model under torch.compile (Inductor), both compile forms")
    args = p.parse_args(argv)
    # (Inductor's on-disk caches do not key on the operators' tags: compile afresh)
    torch.compiler.config.force_disable_caches = True
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, threads={threads}, float32, one training step")
    print(
        f"{'model':>10} {'variant':>36} | {'peak MB':>8} {'ratio':>6} | "
        f"{'saved MB':>8} {'ratio':>6}"
    )
    for name, shape in (("resnet20", (args.batch20, 3, 32, 32)),
                        ("resnet18", (args.batch18, 3, 224, 224))):  # fmt: skip
        torch.manual_seed(1)
        x = torch.randn(shape)
        rows = {}
        for variant, model in variants(name).items():
            model.train()
            rows[variant] = (peak_bytes(model, x), saved_bytes(model, x))
            for form in ("decompose", "ops") if args.compiled else ():
                if variant == "torch BN" and form == "ops":
                    continue
                label = "compiled" if variant == "torch BN" else f"compiled, {form}"
                torch._dynamo.reset()
                with bnlab.ops.compile_form(form):
                    compiled = torch.compile(model)
                    rows[f"{variant} ({label})"] = (peak_bytes(compiled, x),
                                                    saved_bytes(compiled, x))  # fmt: skip
        for variant, (peak, saved) in rows.items():
            ref_peak, ref_saved = rows["torch BN (compiled)" if "compiled" in variant
                                       else "torch BN"]  # fmt: skip
            print(
                f"{name:>10} {variant:>36} | {peak / 2**20:8.1f} {peak / ref_peak:6.3f} | "
                f"{saved / 2**20:8.1f} {saved / ref_saved:6.3f}"
            )


if __name__ == "__main__":
    main()
