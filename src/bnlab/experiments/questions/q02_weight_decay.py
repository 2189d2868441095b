"""Question 2: why does BN work with less weight decay, and what does weight decay do with BN?

A batch-normalized layer computes the same function whatever the scale of its weights (question 1),
so weight decay on those weights cannot make the function simpler: it only keeps the weights
short, and a short weight vector takes large effective steps ``lr / ||w||^2``. Weight decay on a
scale-invariant layer is a learning-rate setting. Ioffe & Szegedy (2015), section 4.2.1, cut the
L2 weight regularization of BN-Inception by 5x and found it improved held-out accuracy.

Run: the 784-100-100-100-10 ReLU network with BN before each ReLU, SGD with momentum, several
weight decays applied to the batch-normalized (hidden) weights only, so that nothing but
scale-invariant weights is decayed; the weight norms, the effective learning rate and test
accuracy over training; and, on a trained network, the outputs with all hidden weights halved or
doubled (unchanged, in training mode).
"""

from __future__ import annotations

import copy
import math

import torch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ...report import plots
from ...report.content import Claim, Figure, Table
from ._common import Answer, Context, Question, View, fmt, hidden_linears, mlp, pct, seed_mean

NAME = "weight-decay"
TITLE = "Why does BN work with less weight decay, and what does weight decay do with BN?"

DECAYS = (0.0, 3e-4, 1e-3, 3e-3, 1e-2)
LR = 0.05
MOMENTUM = 0.9
BATCH = 60
STEPS = 2500


def _norms(model) -> dict:
    norms = [float(lin.weight.detach().pow(2).sum(1).mean().sqrt()) for lin in
             hidden_linears(model)]
    return {"w_norm": norms, "eff_lr": [LR / n**2 for n in norms]}


def scale_invariance(model: torch.nn.Module, x: torch.Tensor, factors=(0.5, 2.0)) -> list[dict]:
    """Relative max change of the training-mode outputs (batch statistics) of ``model`` on ``x``
    when every hidden ``Linear`` weight is multiplied by each factor (on copies)."""
    ref_model = copy.deepcopy(model).train()
    with torch.no_grad():
        ref = ref_model(x)
    out = []
    for c in factors:
        m = copy.deepcopy(model).train()
        with torch.no_grad():
            for lin in hidden_linears(m):
                lin.weight.mul_(c)
            y = m(x)
        out.append({"factor": c, "rel_change": float((y - ref).abs().max() / ref.abs().max())})
    return out


def run(ctx: Context) -> None:
    steps = ctx.steps(STEPS)
    for wd in DECAYS:
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            model = mlp(norm="bn", act="relu")
            hidden = [lin.weight for lin in hidden_linears(model)]
            ids = {id(p) for p in hidden}
            rest = [p for p in model.parameters() if id(p) not in ids]
            opt = torch.optim.SGD([{"params": hidden, "weight_decay": wd},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=LR, momentum=MOMENTUM)
            ctx.fit(model, opt, f"wd={wd:g}", seed, steps=steps, batch_size=BATCH, evals=20,
                    measure=lambda m, step: _norms(m))
            if wd == DECAYS[2] and seed == ctx.seeds[0]:
                ctx.log("invariance", scale_invariance(model, ctx.x_train[:256]))


def _late_mean(view: View, variant: str, key: str) -> list[float]:
    """Per seed: the mean over the second half of training of ``key`` (mean over layers)."""
    steps, vals = view.curve(variant, key)
    if not steps:
        return []
    late = [i for i, s in enumerate(steps) if s >= steps[-1] / 2]
    return [sum(sum(vals[i][k]) / len(vals[i][k]) for i in late) / len(late)
            for k in range(len(vals[0]))]


def _trend(points: list[tuple[float, float]]) -> str:
    """How accuracy moved as the effective learning rate rose, in words (from the seed means,
    ordered by effective lr)."""
    pts = sorted(p for p in points if all(map(math.isfinite, p)))
    if len(pts) < 3:
        return "was measured at too few settings to say"
    acc = [a for _, a in pts]
    top = acc.index(max(acc))
    if top == 0:
        return (f"fell as the effective rate rose, from {pct(acc[0])} to {pct(acc[-1])}: at this "
                "learning rate, more decay meant steps that were too large")
    if top == len(acc) - 1:
        return (f"rose with the effective rate, from {pct(acc[0])} to {pct(acc[-1])}: at this "
                "learning rate, decay kept the steps from becoming too small")
    return (f"peaked at an intermediate effective rate ({pct(acc[top])}, against "
            f"{pct(acc[0])} and {pct(acc[-1])} at the ends)")


def report(view: View) -> Answer:
    fname = view.figure()
    variants = view.variants()
    cmap = plots.plt.get_cmap("viridis")
    colors = {v: cmap(i / max(1, len(variants) - 1)) for i, v in enumerate(variants)}
    summary = {}
    with plots.style():
        fig, axes = plots.figure(3, height=4.0)
        for v in variants:
            for ax, key in ((axes[0], "w_norm"), (axes[1], "eff_lr")):
                steps, vals = view.curve(v, key)
                if steps:
                    plots.band(ax, steps, [[sum(x) / len(x) for x in s] for s in vals],
                               colors[v], v)
            eff = _late_mean(view, v, "eff_lr")
            acc = view.final(v, "test_acc")
            summary[v] = (eff, acc)
            axes[2].plot(eff, acc, "o", color=colors[v], ms=8, label=v)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("unit weight norm ||w|| (mean of layers)")
        axes[0].set_title("(a) weight decay keeps ||w|| small")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("effective lr = lr / ||w||^2")
        axes[1].set_title("(b) ... so the effective lr stays high")
        for ax in axes[:2]:
            ax.set_xlabel("SGD step")
        axes[0].legend(fontsize=9)
        axes[2].set_xscale("log")
        axes[2].xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[2].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes[2].xaxis.set_minor_formatter(NullFormatter())
        axes[2].set_xlabel("effective lr, mean over the 2nd half")
        axes[2].set_ylabel("final test accuracy")
        axes[2].set_title("(c) accuracy vs effective lr")
        plots.save(fig, view.path / fname)
    inv = view.kind("invariance")
    worst = max((r["rel_change"] for r in inv), default=float("nan"))
    c1 = Claim.check(
        "2a", "weight decay does not change what the batch-normalized layers compute: halving or "
        "doubling all hidden weights of a trained network leaves its training-mode outputs "
        "unchanged (relative change < 1e-3: only BN's epsilon, 1e-5, and float32 rounding "
        "move them)",
        f"largest relative change {worst:.1e} (factors "
        f"{', '.join(str(r['factor']) for r in inv)})",
        bool(inv) and worst < 1e-3, not_assessed="" if inv else "not measured",
        paper="section 3.3 (BN(aWu) = BN(Wu))",
    )
    finals = {v: seed_mean([sum(x) / len(x) for x in view.curve(v, "w_norm")[1][-1]])
              for v in variants if view.curve(v, "w_norm")[0]}
    effs = {v: seed_mean(summary[v][0]) for v in variants if summary[v][0]}
    ordered = [v for v in variants if v in finals and v in effs]
    norm_down = all(finals[a] > finals[b] for a, b in zip(ordered, ordered[1:], strict=False))
    eff_up = all(effs[a] < effs[b] for a, b in zip(ordered, ordered[1:], strict=False))
    c2 = Claim.check(
        "2b", "the larger the weight decay, the smaller the weights and the larger the effective "
        "learning rate of the normalized layers (monotone over the grid, seed means)",
        "final ||w|| " + " > ".join(fmt(finals[v], 2) for v in ordered) + "; effective lr "
        + " < ".join(fmt(effs[v], 3) for v in ordered),
        len(ordered) >= 3 and norm_down and eff_up,
        not_assessed=view.short_note if len(ordered) >= 3 else "fewer than 3 decays",
    )
    rows, best = [], None
    for v in variants:
        eff, acc = summary[v]
        a = seed_mean(acc)
        if best is None or a > best[1]:
            best = (v, a)
        rows.append([v, fmt(finals.get(v), 3), fmt(seed_mean(eff), 3),
                     pct(seed_mean(view.final(v, "train_acc"))), pct(a),
                     f"{pct(min(acc, default=None))}-{pct(max(acc, default=None))}"])
    table = Table("Weight decay on the normalized weights (seed means)",
                  ["weight decay", "final ||w||", "effective lr (2nd half)", "train acc",
                   "test acc", "test acc range over seeds"], rows,
                  "Weight decay applies to the hidden (batch-normalized) weights only; the "
                  "output layer, gamma and beta are not decayed.")
    lo = fmt(min(effs.values(), default=None), 3)
    hi = fmt(max(effs.values(), default=None), 3)
    trend = _trend([(effs[v], seed_mean(summary[v][1])) for v in ordered])
    answer = (
        "On a batch-normalized layer weight decay cannot shrink the function, only the weights, "
        f"so what it changes is the effective learning rate (here {lo} to {hi} from no decay "
        f"to the largest); test accuracy {trend} (best: {best[0] if best else 'n/a'}, "
        f"{pct(best[1] if best else None)})."
    )
    text = [
        "**What was run.** The 784-100-100-100-10 ReLU network with BN before each ReLU, SGD "
        f"(lr {LR}, momentum {MOMENTUM}, batch {BATCH}) with weight decay "
        f"{', '.join(f'{d:g}' for d in DECAYS)} on the hidden weights only (the ones BN makes "
        "scale-invariant), same initial weights for every decay within a seed. The effective "
        "learning rate of a hidden unit is lr / ||w||^2 (question 1), averaged over the three "
        "layers.",
        f"**Answer.** {answer} Without decay the weights only grow (question 1) and the "
        "effective rate decays by itself; decay holds the norm where the shrinking and the "
        "growth from the gradient steps balance. A layer that is not followed by BN (here the "
        "output layer, not decayed) is not scale-invariant, and there weight decay is the "
        "usual regularizer. The paper cut BN-Inception's L2 weight by 5x (section 4.2.1).",
        "**See also.** Learning rates at scale: `bnlab run lr-acceleration` "
        "(docs/lr-acceleration.md); decay of gamma and beta: question 7.",
    ]
    fig = Figure(fname, "Weight decay on scale-invariant weights: weight norm, effective "
                 "learning rate and accuracy (band: min-max over seeds)",
                 "Look for larger decay giving smaller norms (a) and a higher, steady effective "
                 "lr (b), and for accuracy in (c) lining up with the effective lr rather than "
                 "with the decay itself.")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=[c1, c2])


QUESTION = Question(2, NAME, TITLE, run, report)
