"""Question 7: should gamma and beta get their own learning rate, or no weight decay?

The paper trains gamma and beta "along with the original model parameters" (section 3) and says no
more. A common recipe since is to exclude them (and biases) from weight decay, e.g. the "no bias
decay" of He et al. (2019), *Bag of Tricks for Image Classification*. Run: a small grid on the
784-100-100-100-10 ReLU network with BN before each ReLU: the learning rate of gamma and beta at
0.1x, 1x and 10x that of the weights, and weight decay on gamma and beta either off or the same
as on the weights; two seeds per cell.
"""

from __future__ import annotations

import torch

from ...layers import BatchNorm1d
from ...report import plots
from ...report.content import Claim, Figure, Table
from ._common import (
    WITHIN_SPREAD,
    Answer,
    Context,
    Question,
    View,
    fmt,
    mlp,
    pct,
    seed_mean,
    separated,
)

NAME = "gamma-beta"
TITLE = "Should gamma and beta get their own learning rate, or no weight decay?"

LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
BATCH = 60
STEPS = 2000
LR_FACTORS = (0.1, 1.0, 10.0)
DECAY = ("no decay", "decayed")


def _gamma_beta(model) -> dict:
    bns = [m for m in model.modules() if isinstance(m, BatchNorm1d)]
    g = torch.cat([b.weight.detach() for b in bns])
    b = torch.cat([b.bias.detach() for b in bns])
    return {"gamma_mean": float(g.mean()), "gamma_abs_min": float(g.abs().min()),
            "beta_abs_mean": float(b.abs().mean())}


def run(ctx: Context) -> None:
    steps = ctx.steps(STEPS)
    for factor in LR_FACTORS:
        for decay in DECAY:
            for seed in ctx.seeds:
                torch.manual_seed(seed)
                model = mlp(norm="bn", act="relu")
                bn = [p for m in model.modules() if isinstance(m, BatchNorm1d)
                      for p in m.parameters()]
                ids = {id(p) for p in bn}
                rest = [p for p in model.parameters() if id(p) not in ids]
                opt = torch.optim.SGD([
                    {"params": rest, "lr": LR, "weight_decay": WEIGHT_DECAY},
                    {"params": bn, "lr": LR * factor,
                     "weight_decay": WEIGHT_DECAY if decay == "decayed" else 0.0},
                ], lr=LR, momentum=MOMENTUM)
                ctx.fit(model, opt, f"lr x{factor:g}/{decay}", seed, steps=steps,
                        batch_size=BATCH, evals=10, measure=lambda m, s: _gamma_beta(m))


def report(view: View) -> Answer:
    fname = view.figure()
    acc = {(f, d): view.final(f"lr x{f:g}/{d}", "test_acc") for f in LR_FACTORS for d in DECAY}
    acc = {k: v for k, v in acc.items() if v}
    gam = {(f, d): view.final(f"lr x{f:g}/{d}", "gamma_mean") for f, d in acc}
    with plots.style():
        fig, axes = plots.figure(2, height=4.0)
        width = 0.38
        for j, d in enumerate(DECAY):
            xs = [i + (j - 0.5) * width for i in range(len(LR_FACTORS))]
            vals = [acc.get((f, d), []) for f in LR_FACTORS]
            axes[0].bar(xs, [seed_mean(v) for v in vals], width, label=f"gamma, beta: {d}",
                        color=("#1f77b4", "#ff7f0e")[j], alpha=0.85)
            for x, v in zip(xs, vals, strict=True):
                axes[0].plot([x] * len(v), v, "k.", ms=9)
            g = [gam.get((f, d), []) for f in LR_FACTORS]
            axes[1].bar(xs, [seed_mean(v) for v in g], width, color=("#1f77b4", "#ff7f0e")[j],
                        alpha=0.85, label=f"gamma, beta: {d}")
        lo = min((min(v) for v in acc.values()), default=0.9)
        axes[0].set_ylim(max(0.0, lo - 0.01), None)
        for ax in axes:
            ax.set_xticks(range(len(LR_FACTORS)), [f"x{f:g}" for f in LR_FACTORS])
            ax.set_xlabel("learning rate of gamma and beta (times the weights')")
        axes[0].set_ylabel("final test accuracy")
        axes[0].set_title("(a) accuracy (bars: mean; dots: seeds)")
        axes[0].legend(loc="upper left", fontsize=9)
        axes[1].set_ylabel("mean gamma at the end")
        axes[1].set_title("(b) what decay does to gamma")
        axes[1].legend(loc="lower left", fontsize=9)
        plots.save(fig, view.path / fname)
    claims = []
    f0 = 1.0
    a, b = acc.get((f0, "no decay"), []), acc.get((f0, "decayed"), [])
    verdict = separated(a, b, lower=False)
    claims.append(Claim.check(
        "7", "excluding gamma and beta from weight decay gives a higher test accuracy than "
        "decaying them (same learning rate for all parameters)",
        f"no decay {pct(seed_mean(a), 2)} (seeds {', '.join(pct(v, 2) for v in a)}) vs decayed "
        f"{pct(seed_mean(b), 2)} ({', '.join(pct(v, 2) for v in b)})",
        verdict, not_assessed=view.short_note or ("" if verdict is not None else WITHIN_SPREAD),
        paper="not in the paper; a common recipe ('no bias decay')",
    ))
    rows = []
    for f in LR_FACTORS:
        for d in DECAY:
            if (f, d) in acc:
                v = acc[(f, d)]
                rows.append([f"x{f:g}", d, pct(seed_mean(v), 2),
                             f"{pct(min(v), 2)}-{pct(max(v), 2)}",
                             fmt(seed_mean(gam[(f, d)]), 3),
                             fmt(seed_mean(view.final(f"lr x{f:g}/{d}", "beta_abs_mean")), 3)])
    table = Table("The grid (seed means)", ["lr of gamma, beta", "decay of gamma, beta",
                                            "test acc", "range over seeds", "mean gamma",
                                            "mean |beta|"], rows,
                  f"Weights always get lr {LR} and weight decay {WEIGHT_DECAY:g}.")
    means = {k: seed_mean(v) for k, v in acc.items()}
    runs_lr = {f: [a for d in DECAY for a in acc.get((f, d), [])] for f in LR_FACTORS}
    runs_decay = {d: [a for f in LR_FACTORS for a in acc.get((f, d), [])] for d in DECAY}
    if not means:
        answer = "not measured"
    else:
        by_lr = {f: seed_mean(v) for f, v in runs_lr.items() if v}
        by_decay = {d: seed_mean(v) for d, v in runs_decay.items() if v}
        hi, lo = max(by_lr, key=by_lr.get), min(by_lr, key=by_lr.get)
        lr_sep = separated(runs_lr[lo], runs_lr[hi], lower=True)
        dec_hi = max(by_decay, key=by_decay.get)
        dec_lo = min(by_decay, key=by_decay.get)
        dec_sep = separated(runs_decay[dec_lo], runs_decay[dec_hi], lower=True)

        def effect(sep: bool | None, worse: str, better: str) -> str:
            return (f"{worse} below {better} on every run" if sep else
                    "within the spread of the runs")

        answer = (
            "Their learning rate: " + ", ".join(f"x{f:g} {pct(by_lr[f], 2)}" for f in by_lr)
            + f" (averaged over decay; {effect(lr_sep, f'x{lo:g}', f'x{hi:g}')}); their weight "
            f"decay: no decay {pct(by_decay.get('no decay'), 2)}, decayed "
            f"{pct(by_decay.get('decayed'), 2)} (averaged over learning rates; "
            f"{effect(dec_sep, dec_lo, dec_hi)}); the no-decay rule {claims[0].verdict}"
            + (" (within the seed spread)." if claims[0].verdict == "not assessed" else ".")
        )
    text = [
        "**What was run.** The 784-100-100-100-10 ReLU network with BN before each ReLU, SGD "
        f"(momentum {MOMENTUM}, batch {BATCH}), weights at lr {LR} with weight decay "
        f"{WEIGHT_DECAY:g}; gamma and beta at 0.1x, 1x or 10x that learning rate, with the same "
        "weight decay or none; same initial weights per seed.",
        f"**Answer.** {answer} Why decay of gamma and beta can matter little with ReLU: it "
        "shrinks a layer's output, but the next layer's BN undoes that scale (ReLU is "
        "positively homogeneous), so for every layer but the last the decay mostly changes an "
        "effective learning rate again (question 2). Panel (b) shows what the decay does to "
        "gamma, and the table how far gamma and beta moved at each learning rate.",
        "**See also.** Question 2 (weight decay on the weights of a normalized layer).",
    ]
    fig = Figure(fname, "Learning rate and weight decay of gamma and beta",
                 "Compare the two bars at each learning rate (decay) and the three groups "
                 "(learning rate) with the spread of the dots (the seeds).")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=claims)


QUESTION = Question(7, NAME, TITLE, run, report)
