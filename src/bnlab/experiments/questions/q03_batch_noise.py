"""Question 3: is part of BN's regularization just noise from the batch composition, like data
augmentation?

Ioffe & Szegedy (2015), section 3.4: with BN "a training example is seen in conjunction with
other examples in the mini-batch, and the training network no longer produc[es] deterministic
values for a given training example"; they found this "advantageous to the generalization of the
network". If that noise regularizes, less of it should widen the generalization gap. Same network,
same steps, three amounts of batch-composition noise:

* **re-drawn**: mini-batches re-drawn every epoch (the usual BN);
* **fixed**: one split into batches for the whole run (``sampling="fixed"``): an example is always
  normalized with the same companions, so its "noise" is the same every epoch, a fixed
  distortion rather than a random one;
* **large set**: the batch's statistics come from the batch plus ``EXTRA`` other training
  examples drawn afresh each step (the loss sees the batch only): the same re-drawing with about
  a tenth of the sampling variance in the statistics;

and the same network without BN for reference. The gap is train minus test accuracy, both in
inference mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...report import plots
from ...report.content import Claim, Figure, Table
from ...train import evaluate
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
    seed_mix,
    separated,
)

NAME = "batch-noise"
TITLE = ("Is part of BN's regularization just noise from the batch composition, like data "
         "augmentation?")

LR = 0.05
MOMENTUM = 0.9
BATCH = 60
EXTRA = 540
STEPS = 3000
VARIANTS = ("re-drawn", "fixed", "large set", "no BN")


class LargeSetStatistics(nn.Module):
    """Wraps a model so that in training mode each batch is normalized together with ``extra``
    examples drawn from ``pool`` (uniformly, with replacement, a new draw at every training
    call) and only the batch's outputs are returned; in eval mode it is the model itself.

    The draw is a function of ``(seed, calls)``, and ``calls`` is a buffer (saved in
    checkpoints), so a resumed training draws what an uninterrupted one would."""

    def __init__(self, model: nn.Module, pool: Tensor, extra: int, seed: int) -> None:
        super().__init__()
        self.model, self.pool, self.extra, self.seed = model, pool, extra, seed
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.model(x)
        g = torch.Generator().manual_seed(seed_mix(self.seed, int(self.calls)))
        idx = torch.randint(len(self.pool), (self.extra,), generator=g)
        self.calls += 1
        return self.model(torch.cat([x, self.pool[idx]]))[: len(x)]


def run(ctx: Context) -> None:
    steps = ctx.steps(STEPS)
    xs, ys = ctx.x_train[:1000], ctx.y_train[:1000]

    def measure(model, step):
        return {"train_loss_inf": evaluate(model, xs, ys, loss_fn=F.cross_entropy)["loss"]}

    for variant in VARIANTS:
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            model: nn.Module = mlp(norm=None if variant == "no BN" else "bn", act="relu")
            if variant == "large set":
                model = LargeSetStatistics(model, ctx.x_train, EXTRA, seed)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            ctx.fit(model, opt, variant, seed, steps=steps, batch_size=BATCH, evals=15,
                    sampling="fixed" if variant == "fixed" else "shuffle", measure=measure)


COLORS = {"re-drawn": "#1f77b4", "fixed": "#ff7f0e", "large set": "#2ca02c", "no BN": "#d62728"}


def report(view: View) -> Answer:
    fname = view.figure()
    variants = [v for v in VARIANTS if v in view.variants()]
    gaps, test, losses = {}, {}, {}
    with plots.style():
        fig, axes = plots.figure(3, height=4.0)
        for v in variants:
            steps, tr = view.curve(v, "train_acc")
            _, te = view.curve(v, "test_acc")
            n = min(len(tr), len(te))
            gap = [[a - b for a, b in zip(tr[i], te[i], strict=True)] for i in range(n)]
            # from the first evaluation after step 0 (at step 0 BN's population statistics
            # are still their initial values)
            k = 1 if n > 1 else 0
            plots.band(axes[0], steps[k:n], te[k:n], COLORS[v], v)
            plots.band(axes[1], steps[k:n], gap[k:], COLORS[v], v)
            gaps[v] = gap[-1] if gap else []
            test[v] = te[n - 1] if n else []
            _, tl = view.curve(v, "train_loss_inf")
            _, ql = view.curve(v, "test_loss")
            losses[v] = ([b - a for a, b in zip(tl[-1], ql[-1], strict=True)]
                         if tl and ql else [])
        axes[0].set_ylabel("test accuracy (inference mode)")
        axes[0].set_ylim(0.85, 1.0)
        axes[0].set_title("(a) test accuracy")
        axes[1].set_ylabel("train - test accuracy")
        axes[1].set_title("(b) generalization gap")
        for ax in axes[:2]:
            ax.set_xlabel("SGD step")
        axes[1].legend()
        x = range(len(variants))
        for i, v in enumerate(variants):
            axes[2].bar(i, seed_mean(gaps[v]), color=COLORS[v], alpha=0.8)
            axes[2].plot([i] * len(gaps[v]), gaps[v], "k.", ms=9)
        axes[2].set_xticks(list(x), variants)
        axes[2].set_ylabel("final train - test accuracy")
        axes[2].set_title("(c) final gap (dots: seeds)")
        plots.save(fig, view.path / fname)

    def gap_claim(cid: str, other: str, what: str) -> Claim:
        if "re-drawn" not in gaps or other not in gaps:
            return Claim.check(cid, what, "n/a", None, not_assessed="a variant is missing")
        verdict = separated(gaps["re-drawn"], gaps[other], lower=True)
        def seeds(v):
            return ", ".join(pct(g, 2) for g in gaps[v])

        measured = (f"gap re-drawn {pct(seed_mean(gaps['re-drawn']), 2)} (seeds "
                    f"{seeds('re-drawn')}) vs {other} {pct(seed_mean(gaps[other]), 2)} "
                    f"({seeds(other)})")
        return Claim.check(cid, what, measured, verdict,
                           not_assessed=view.short_note or ("" if verdict is not None
                                                            else WITHIN_SPREAD),
                           paper="section 3.4")

    c1 = gap_claim("3a", "fixed", "re-drawing the batches regularizes: the generalization gap is "
                   "smaller with re-drawn batches than with a fixed batch composition")
    c2 = gap_claim("3b", "large set", "the noise of small-batch statistics regularizes: the gap "
                   "is smaller with statistics from the 60-example batch than from a "
                   f"{BATCH + EXTRA}-example set")
    rows = [[v, pct(seed_mean(view.final(v, "train_acc")), 2), pct(seed_mean(test[v]), 2),
             pct(seed_mean(gaps[v]), 2), fmt(seed_mean(losses[v]), 3)] for v in variants]
    table = Table("At the end of training (seed means; inference mode)",
                  ["variant", "train acc (first 1,000)", "test acc", "gap (accuracy)",
                   "gap (test - train loss)"], rows)
    order = sorted(variants, key=lambda v: seed_mean(gaps[v]))
    answer = (
        "Measured gaps (train - test accuracy, smallest first): " + ", ".join(
            f"{v} {pct(seed_mean(gaps[v]), 2)}" for v in order)
        + f"; {_verdict_words(c1, c2)}."
    )
    if "no BN" in losses and "re-drawn" in losses:
        bn_loss = [seed_mean(losses[v]) for v in variants if v != "no BN"]
        answer += (f" In loss the gap was {fmt(seed_mean(losses['no BN']), 3)} without BN and "
                   f"{fmt(min(bn_loss), 3)}-{fmt(max(bn_loss), 3)} with it, whatever the batch "
                   "noise.")
    text = [
        "**What was run.** The 784-100-100-100-10 ReLU network with BN before each ReLU, SGD "
        f"(lr {LR}, momentum {MOMENTUM}, batch {BATCH}, no weight decay, no augmentation, "
        f"{_steps(view)} steps), with three amounts of batch-composition noise: *re-drawn*, "
        "batches re-drawn every epoch (the usual BN); *fixed*, one split into batches for the "
        "whole run, so an example is always normalized with the same companions (a fixed "
        "distortion instead of a random one); *large set*, each batch normalized together with "
        f"{EXTRA} other training examples drawn afresh at every step (statistics from "
        f"{BATCH + EXTRA} examples: the same re-drawing, with a tenth of the sampling "
        "variance; the loss sees the batch only); and without BN. The gap is train minus test "
        "accuracy, both in inference mode. The seeds share the initial weights across "
        "variants.",
        f"**Answer.** {answer} Where the comparison is within the seed spread, this scale "
        "cannot separate the effect from chance; more seeds (`--seeds`) or a longer run "
        "(`--scale`) would.",
        "**See also.** Santurkar et al.'s noisy BN (`bnlab run why`, docs/why.md) and ghost "
        "batch normalization across batch sizes (`bnlab run batch-size`, docs/small-batches.md).",
    ]
    fig = Figure(fname, "Three amounts of batch-composition noise, same network and steps "
                 "(band: min-max over seeds)",
                 "Look at (b, c): if the noise regularizes, the re-drawn batches (blue) end "
                 "with the smallest gap among the BN variants.")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=[c1, c2])


def _steps(view: View) -> str:
    steps = [r["step"] for r in view.fits()]
    return f"{max(steps):,}" if steps else "n/a"


def _verdict_words(*claims: Claim) -> str:
    v = [c.verdict for c in claims]
    if all(x == "holds" for x in v):
        return "less batch noise widened the gap, as a regularizing noise would"
    if all(x == "fails" for x in v):
        return "less batch noise did not widen the gap at this scale"
    return ("at this scale the differences between the BN variants are within the seed "
            "spread: " + "; ".join(f"claim {c.id} {c.verdict}" for c in claims))


QUESTION = Question(3, NAME, TITLE, run, report)
