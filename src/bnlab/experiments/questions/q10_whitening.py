"""Question 10: what does full whitening buy over per-unit standardization?

Ioffe & Szegedy (2015), section 2: "the network training converges faster if its inputs are
whitened - i.e., linearly transformed to have zero means and unit variances, and decorrelated";
section 3: "since the full whitening of each layer's inputs is costly and not everywhere
differentiable", BN standardizes each unit on its own, and "in the joint case, regularization
would be required since the mini-batch size is likely to be smaller than the number of
activations being whitened, resulting in singular covariance matrices".

Run: the 784-100-100-100-10 ReLU network with, before each ReLU, BN (standardize each unit), ZCA
whitening of groups of 20 units, or ZCA whitening of all 100 units (:class:`bnlab.BatchWhitening`,
Huang et al. 2018), batches of 128 (more than 100, so the full covariance is not singular); test
accuracy per step, the correlation left between units, and the cost of a training step measured in
the same process (median of interleaved repeats).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ...layers import BatchNorm1d, BatchWhitening
from ...probes import record_inputs
from ...report import plots
from ...report.content import Claim, Figure, Table
from ._common import (
    WITHIN_SPREAD,
    Answer,
    Context,
    Question,
    View,
    fmt,
    interleaved_times,
    mlp,
    pct,
    seed_mean,
)
from ._common import separated as _separated

NAME = "whitening"
TITLE = "What does full whitening buy over per-unit standardization?"

LR = 0.05
MOMENTUM = 0.9
BATCH = 128
STEPS = 1500
REPEATS = 30
VARIANTS = {
    "BN": lambda c: BatchNorm1d(c),
    "whiten, groups of 20": lambda c: BatchWhitening(c, group_size=20),
    "whiten, all 100": lambda c: BatchWhitening(c),
}


@torch.no_grad()
def correlation_left(model: nn.Module, x: torch.Tensor) -> float:
    """Mean absolute off-diagonal correlation between the outputs of the first normalization
    layer on ``x`` (inference mode): the inputs of the nonlinearity that follows it."""
    act = next(m for m in model.modules() if isinstance(m, nn.ReLU))
    was = model.training
    model.eval()
    try:
        with record_inputs({"n": act}) as got:
            model(x)
    finally:
        model.train(was)
    z = got["n"].double()
    c = torch.corrcoef(z.T)
    off = c[~torch.eye(len(c), dtype=torch.bool)]
    return float(off.abs().mean())


def step_times(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
               repeats: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, SGD update) of each model on the
    batch ``(x, y)``, the models interleaved round by round so that they share the machine's
    conditions (:func:`._common.interleaved_times`); copies are timed, the models are
    unchanged."""
    copies = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in copies.items()}

    def step(k: str) -> Callable[[], None]:
        def call() -> None:
            loss = F.cross_entropy(copies[k](x), y)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
        return call

    return interleaved_times({k: step(k) for k in copies}, repeats, warmup=3)


def covariance_rank(model: nn.Module, x: torch.Tensor) -> int:
    """Rank of the batch covariance of the first hidden layer's pre-activations on ``x``
    (eigenvalues above 1e-9 of the largest, float64)."""
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        z = lin(x).double()
    zc = z - z.mean(0)
    lam = torch.linalg.eigvalsh(zc.T @ zc / len(z))
    return int((lam > 1e-9 * lam.max()).sum())


def run(ctx: Context) -> None:
    steps = ctx.steps(STEPS)
    probe = ctx.x_train[:1000]
    trained = {}
    for name, make in VARIANTS.items():
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            model = mlp(norm=make, act="relu")
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            ctx.fit(model, opt, name, seed, steps=steps, batch_size=BATCH, evals=15)
            ctx.log("correlation", {"variant": name, "seed": seed,
                                    "corr": correlation_left(model, probe)})
            trained.setdefault(name, model)
    g = ctx.generator(ctx.cfg.seed)
    idx = torch.randperm(len(ctx.y_train), generator=g)[:BATCH]
    times = step_times(trained, ctx.x_train[idx], ctx.y_train[idx],
                       max(5, int(REPEATS * min(1.0, ctx.cfg.scale))))
    ctx.log("cost", [{"variant": k, "step_s": v, "threads": torch.get_num_threads()}
                     for k, v in times.items()])
    first = next(iter(trained.values()))
    ctx.log("rank", [{"m": m, "units": 100, "rank": covariance_rank(first, ctx.x_train[:m])}
                     for m in (60, BATCH)])


COLORS = {"BN": "#1f77b4", "whiten, groups of 20": "#2ca02c", "whiten, all 100": "#d62728"}


def report(view: View) -> Answer:
    fname = view.figure()
    variants = [v for v in VARIANTS if v in view.variants()]
    cost = {r["variant"]: r["step_s"] for r in view.kind("cost")}
    corr = {}
    for r in view.kind("correlation"):
        corr.setdefault(r["variant"], []).append(r["corr"])
    with plots.style():
        fig, axes = plots.figure(3, height=4.0)
        for v in variants:
            steps, vals = view.curve(v, "test_acc")
            plots.band(axes[0], steps, vals, COLORS[v], v)
            lsteps, loss = view.curve(v, "train_loss")  # no training loss at step 0
            if loss:
                plots.band(axes[1], lsteps, loss, COLORS[v], v)
        axes[0].set_ylim(0.8, 1.0)
        axes[0].set_xlabel("SGD step")
        axes[0].set_ylabel("test accuracy")
        axes[0].set_title("(a) accuracy per step")
        axes[0].legend(loc="lower right")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("SGD step")
        axes[1].set_ylabel("training loss")
        axes[1].set_title("(b) training loss per step")
        names = [v for v in variants if v in cost]
        base = cost.get("BN")
        axes[2].bar(range(len(names)), [cost[v] / base if base else 0 for v in names],
                    color=[COLORS[v] for v in names])
        axes[2].set_xticks(range(len(names)), [v.replace(", ", ",\n") for v in names])
        axes[2].set_ylabel("time per training step / BN's")
        axes[2].set_title("(c) cost of a step")
        plots.save(fig, view.path / fname)
    claims = []
    full = "whiten, all 100"
    if base and full in cost:
        threads = view.kind("cost")[0].get("threads")
        claims.append(Claim.check(
            "10a", "full whitening is costlier than per-unit standardization: a training step "
            "takes longer than with BN",
            f"{cost[full] / base:.1f}x BN's time per step ({1000 * cost[full]:.1f} vs "
            f"{1000 * base:.1f} ms, batch {BATCH}, {threads} thread(s), median of interleaved "
            "repeats)", cost[full] > base, paper="section 3",
        ))
    steps_bn, acc_bn = view.curve("BN", "test_acc")
    steps_w, acc_w = view.curve(full, "test_acc")
    if steps_bn and steps_w:
        early = next((s for s in steps_bn if s >= steps_bn[-1] / 10 and s in steps_w), None)
        a = acc_w[steps_w.index(early)] if early is not None else []
        b = acc_bn[steps_bn.index(early)] if early is not None else []
        verdict = _separated(a, b, lower=False)
        claims.append(Claim.check(
            "10b", "decorrelating speeds up training per step: early in training (the first "
            "evaluation after 10% of the steps) whitening all 100 units gives a higher test "
            "accuracy than BN",
            f"step {early}: whitened {pct(seed_mean(a), 1)}, BN {pct(seed_mean(b), 1)}",
            verdict, not_assessed=view.short_note or ("" if verdict is not None
                                                      else WITHIN_SPREAD),
            paper="section 2 (whitened inputs converge faster)",
        ))
    ranks = {r["m"]: r["rank"] for r in view.kind("rank")}
    rows = [[v, pct(seed_mean(view.final(v, "test_acc")), 2),
             fmt(seed_mean(view.final(v, "train_loss")), 4), fmt(seed_mean(corr.get(v, [])), 3),
             (f"{cost[v] / base:.2f}x" if base and v in cost else "n/a")] for v in variants]
    table = Table("At the end of training (seed means)",
                  ["normalization", "test acc", "training loss", "mean |correlation| between "
                   "units (first layer)", "time per step vs BN"], rows,
                  "Correlation: between the outputs of the first normalization layer, "
                  "inference mode, 1,000 training images.")
    price = ("at a price: " if any(c.id == "10a" and c.verdict == "holds" for c in claims)
             else "")
    answer = (
        f"Decorrelation, {price}whitening all 100 units left a mean |correlation| of "
        f"{fmt(seed_mean(corr.get(full, [])), 3)} between units (BN: "
        f"{fmt(seed_mean(corr.get('BN', [])), 3)}) and reached "
        f"{pct(seed_mean(view.final(full, 'test_acc')), 1)} (BN: "
        f"{pct(seed_mean(view.final('BN', 'test_acc')), 1)}), with each step "
        + (f"{cost[full] / base:.1f}x as long as BN's" if base and full in cost else "n/a")
        + "; and it needs batches larger than the number of units whitened."
        + (" Here it trained slower per step, not faster."
           if any(c.id == "10b" and c.verdict == "fails" for c in claims) else "")
    )
    text = [
        "**What was run.** The 784-100-100-100-10 ReLU network with BN, group whitening (ZCA "
        "per 20 units) or full whitening (ZCA of all 100 units) before each ReLU; SGD (lr "
        f"{LR}, momentum {MOMENTUM}), batch {BATCH}, same initial weights per seed. The "
        "whitening layer backpropagates through the covariance and its inverse square root "
        "(`bnlab.BatchWhitening`).",
        f"**Answer.** {answer} The batch size is the catch the paper names: a batch of m "
        f"examples spans at most m - 1 directions, so the covariance of 100 units from a batch "
        f"of 60 has rank {ranks.get(60, 'n/a')} (measured; {ranks.get(BATCH, 'n/a')} from a "
        f"batch of {BATCH}) and whitening it needs regularization (here: epsilon) or groups "
        "smaller than the batch.",
        "**See also.** What BN itself costs: question 11.",
    ]
    fig = Figure(fname, "BN against group and full ZCA whitening (band: min-max over seeds)",
                 "Compare the curves step for step in (a, b), then the price of a step in (c).")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=claims)


QUESTION = Question(10, NAME, TITLE, run, report)
