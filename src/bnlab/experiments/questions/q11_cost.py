"""Question 11: what does BN cost?

Ioffe & Szegedy (2015), section 5: "Batch Normalization adds only two extra parameters per
activation" (gamma and beta; one pair per feature map in a convolutional layer, section 3.2,
where the bias of the normalized layer is dropped because beta replaces it); section 3.1 and
Algorithm 2: at inference BN is a fixed linear map that can be folded into the preceding layer.

Measured on this machine for the models bnlab ships, the 784-100-100-100-10 sigmoid MLP (the
paper's MNIST network, batch 60) and ResNet-20 (CIFAR-sized 3x32x32 input, batch 64), without
normalization, with bnlab's BN and with torch's ``nn.BatchNorm``:

* parameters and buffers (running statistics);
* time of a training step (forward, backward, SGD update) and of inference on a batch: medians of
  interleaved repeats, as ratios to the network without normalization measured in the same run,
  with the thread count stated; inference also with the BN layers folded away
  (:func:`bnlab.fold`);
* memory a training step keeps for the backward pass: the bytes of the distinct tensors autograd
  saves (``torch.autograd.graph.saved_tensors_hooks``), a deterministic count;
* whether the folded network computes what the unfolded one does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ...convert import convert
from ...inference import fold
from ...layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ...models import ResNetCifar
from ...report import plots
from ...report.content import Claim, Figure, Table
from ._common import Answer, Context, Question, View, interleaved_times, mlp

NAME = "cost"
TITLE = "What does BN cost?"

REPEATS = 15
VARIANTS = ("no norm", "bnlab BN", "torch BN")
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d,
              BatchNorm3d)


def _models(kind: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "MLP":
        model = mlp(norm=None if variant == "no norm" else "bn", act="sigmoid")
    else:
        model = ResNetCifar(20, norm=None if variant == "no norm" else "bn")
    if variant == "torch BN":
        model = convert(model, to="torch")
    return model


def _shapes(kind: str, smoke: bool) -> tuple[tuple[int, ...], int]:
    if kind == "MLP":
        return (60, 784), 60
    batch = 8 if smoke else 64
    return (batch, 3, 32, 32), batch


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of one training
    step's loss (counted once per storage), leaving out the parameters and the input, which
    exist anyway: the activations and statistics a training step keeps."""
    model = copy.deepcopy(model).train()
    exist = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exist.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exist:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())


def timings(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int
            ) -> dict[str, dict[str, float]]:
    """Median seconds per training step and per inference forward of each model (copies),
    interleaved round by round, each measurement a block of calls
    (:func:`._common.interleaved_times`); inference of a model with BN also folded (key
    ``folded``)."""
    train = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in train.items()}
    infer = {k: copy.deepcopy(m).eval() for k, m in models.items()}
    for k in list(infer):
        if k != "no norm":
            infer[f"{k} folded"] = fold(infer[k])

    def step(k: str) -> Callable[[], None]:
        def call() -> None:
            loss = F.cross_entropy(train[k](x), y)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
        return call

    def forward(k: str) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                infer[k](x)
        return call

    calls = {("train", k): step(k) for k in train}
    calls.update({("infer", k): forward(k) for k in infer})
    t = interleaved_times(calls, repeats)
    return {"train": {k: t[("train", k)] for k in train},
            "infer": {k: t[("infer", k)] for k in infer}}


def run(ctx: Context) -> None:
    threads = torch.get_num_threads()
    repeats = max(3, int(round(REPEATS * min(1.0, ctx.cfg.scale * 2))))
    for kind in ("MLP", "ResNet-20"):
        models = {v: _models(kind, v) for v in VARIANTS}
        shape, batch = _shapes(kind, ctx.smoke)
        g = ctx.generator(len(kind))
        x = torch.rand(shape, generator=g)
        y = torch.randint(10, (batch,), generator=g)
        # population statistics that describe data, so folding is checked on a real state
        for m in models.values():
            m.train()
            with torch.no_grad():
                for _ in range(3):
                    m(torch.rand(shape, generator=g))
        rows = []
        t = timings(models, x, y, repeats)
        for v, m in models.items():
            params = sum(p.numel() for p in m.parameters())
            norm_params = sum(p.numel() for mod in m.modules() if isinstance(mod, NORM_TYPES)
                              for p in mod.parameters(recurse=False))
            buffers = sum(b.numel() for b in m.buffers())
            norm_units = sum(mod.num_features for mod in m.modules()
                             if isinstance(mod, NORM_TYPES))
            row = {"model": kind, "variant": v, "batch": batch, "threads": threads,
                   "repeats": repeats, "params": params, "norm_params": norm_params,
                   "buffers": buffers, "norm_units": norm_units,
                   "saved_bytes": saved_bytes(m, x, y), "train_s": t["train"][v],
                   "infer_s": t["infer"][v]}
            if v != "no norm":
                row["folded_infer_s"] = t["infer"][f"{v} folded"]
                m.eval()
                folded = fold(m)
                with torch.no_grad():
                    ref, out = m(x), folded(x)
                row["fold_rel_err"] = float((out - ref).abs().max() / ref.abs().max())
                row["folded_params"] = sum(p.numel() for p in folded.parameters())
            rows.append(row)
        ctx.log("cost", rows)


def report(view: View) -> Answer:
    fname = view.figure()
    rows = view.kind("cost")
    kinds = [k for k in ("MLP", "ResNet-20") if any(r["model"] == k for r in rows)]
    by = {(r["model"], r["variant"]): r for r in rows}
    with plots.style():
        fig, axes = plots.figure(len(kinds), height=4.0)
        for ax, kind in zip(axes, kinds, strict=True):
            base = by.get((kind, "no norm"))
            labels, vals, colors = [], [], []
            for v in VARIANTS[1:]:
                r = by.get((kind, v))
                if not (r and base):
                    continue
                labels += [f"{v}\ntrain", f"{v}\ninference", f"{v}\nfolded"]
                vals += [r["train_s"] / base["train_s"], r["infer_s"] / base["infer_s"],
                         r["folded_infer_s"] / base["infer_s"]]
                colors += ["#1f77b4", "#2ca02c", "#9467bd"] if v == "bnlab BN" else [
                    "#aec7e8", "#98df8a", "#c5b0d5"]
            ax.bar(range(len(vals)), vals, color=colors)
            ax.axhline(1.0, color="#333", lw=1)
            ax.set_xticks(range(len(vals)), labels, fontsize=8)
            ax.set_ylabel("time / same network without norm")
            b = base or {}
            ax.set_title(f"{kind}, batch {b.get('batch', '?')}, {b.get('threads', '?')} "
                         "thread(s)")
        plots.save(fig, view.path / fname)
    table_rows, claims = [], []
    for kind in kinds:
        base = by.get((kind, "no norm"))
        for v in VARIANTS:
            r = by.get((kind, v))
            if not r:
                continue
            extra = r["params"] - base["params"] if base else None
            table_rows.append([
                kind, v, f"{r['params']:,}", f"{extra:+,}" if extra is not None else "n/a",
                f"{r['buffers']:,}", f"{r['saved_bytes'] / 2**20:.2f}",
                f"{1000 * r['train_s']:.2f}", f"{1000 * r['infer_s']:.2f}",
                (f"{1000 * r['folded_infer_s']:.2f}" if "folded_infer_s" in r else "-"),
            ])
    bn_rows = [r for r in rows if r["variant"] != "no norm"]
    two = all(r["norm_units"] > 0 and r["norm_params"] == 2 * r["norm_units"] for r in bn_rows)
    claims.append(Claim.check(
        "11a", "BN adds two parameters (gamma, beta) per normalized activation (per feature map "
        "in a convolution)",
        "; ".join(f"{r['model']} ({r['variant']}): {r['norm_params']:,} BN parameters for "
                  f"{r['norm_units']:,} normalized units" for r in bn_rows),
        bool(bn_rows) and two, not_assessed="" if bn_rows else "not measured",
        paper="section 5",
    ))
    folded = [r for r in rows if "fold_rel_err" in r]
    worst = max((r["fold_rel_err"] for r in folded), default=float("nan"))
    claims.append(Claim.check(
        "11b", "at inference BN is a linear map that folds into the layer before it: the folded "
        "network computes the same outputs (relative error < 1e-5) with no BN parameters left",
        f"largest relative error {worst:.1e}; parameters after folding: " + ", ".join(
            f"{r['model']} {r['variant']} {r['folded_params']:,}" for r in folded),
        bool(folded) and worst < 1e-5 and all(
            r["folded_params"] == by[(r["model"], "no norm")]["params"] for r in folded),
        not_assessed="" if folded else "not measured", paper="section 3.1, Algorithm 2",
    ))
    table = Table("Cost per network (times in ms: medians of interleaved repeats)",
                  ["model", "normalization", "parameters", "vs no norm", "buffers",
                   "saved for backward (MiB)", "train step", "inference", "inference folded"],
                  table_rows,
                  "Buffers: BN's running mean and variance and its batch counter. Saved for "
                  "backward: the distinct tensors autograd keeps for one training step. The "
                  "folded network has exactly the parameters of the network without "
                  "normalization (BN's scale and shift are merged into the weights and biases).")
    parts = []
    for kind in kinds:
        base, r = by.get((kind, "no norm")), by.get((kind, "bnlab BN"))
        if base and r:
            parts.append(
                f"{kind}: {r['params'] - base['params']:+,} parameters, training step "
                f"{r['train_s'] / base['train_s']:.2f}x, saved activations "
                f"{r['saved_bytes'] / base['saved_bytes']:.2f}x, inference "
                f"{r['infer_s'] / base['infer_s']:.2f}x unfolded and "
                f"{r['folded_infer_s'] / base['infer_s']:.2f}x folded")
    answer = ("Measured against the same networks without normalization (bnlab BN): "
              + "; ".join(parts) + ".")
    text = [
        "**What was run.** The two networks bnlab ships, each without normalization, with "
        "bnlab's BN (the fused CPU kernels) and with torch's `nn.BatchNorm`, on random inputs "
        "(timings do not depend on the values); BN's running statistics were set by three "
        "training-mode passes first so that folding works on a real state. Times are medians "
        "over repeats interleaved across the networks (each repeat a block of calls lasting about "
        "20 ms), on this machine with the thread count "
        "shown; they move with the machine's load, the ratios less.",
        f"**Answer.** {answer} Without BN the normalized layers would carry a bias each, so the "
        "net increase is one parameter per normalized unit. The training cost is the extra "
        "pass over the activations (statistics, normalization and their backward) and the "
        "tensors kept for it.",
        "**See also.** Kernel-level benchmarks of bnlab's BN against torch's: "
        "`bnlab bench` and benchmarks/RESULTS.md; what full whitening costs: question 10.",
    ]
    fig = Figure(fname, "Time of BN networks relative to the same networks without "
                 "normalization (dark: bnlab BN; light: torch BN)",
                 "Look for training bars above 1, inference bars near or above 1, and the "
                 "folded bars at about 1.")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=claims)


QUESTION = Question(11, NAME, TITLE, run, report)
