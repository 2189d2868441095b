"""Question 6: why the unbiased m/(m-1) variance at inference, and why mini-batch estimates and
not the whole data set?

Ioffe & Szegedy (2015), section 3.1 and Algorithm 2: at inference BN uses population statistics,
``E[x] = E_B[mu_B]`` and the unbiased ``Var[x] = m/(m-1) E_B[sigma_B^2]``, averaged over training
mini-batches of size m ("using moving averages instead, we can track the accuracy of a model as
it trains"). The batch variance ``sigma_B^2`` divides by m, so its mean over batches is
``(m-1)/m`` of the population variance: without the correction, inference normalizes by too
small a variance, by a factor that matters only for small m. And section 3 says why batches at
all during training: normalizing with the whole training set at every step "is impractical when
using stochastic optimization"; at inference there is no such constraint.

Run: the 784-100-100-100-10 ReLU network with BN before each ReLU, trained with batches of
m = 2 ... 64 on the same number of examples (learning rate proportional to m); then, for each
trained network, test loss and accuracy with five sets of statistics:

* **running average**: what the layer kept during training (momentum 0.1, unbiased batch
  variances);
* **Alg. 2, m/(m-1)** and **Alg. 2, biased**: the average over one pass of training batches of
  size m of ``mu_B`` and ``sigma_B^2``, with and without the correction (every layer in training
  mode while they are collected, as Algorithm 2 does);
* **exact, whole set**: the exact statistics of each layer's inputs over the whole training set
  through the inference network (``bnlab.recompute_population_stats(mode="eval")``);
* **batch statistics**: no population statistics at all, test batches of size m normalized by
  their own statistics as in training.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from matplotlib.ticker import NullLocator
from torch import nn
from torch.nn import functional as F

from ...inference import recompute_population_stats
from ...layers import BatchNorm1d
from ...report import plots
from ...report.content import Claim, Figure, Table
from ...train import evaluate
from ._common import (
    ACTS,
    WITHIN_SPREAD,
    Answer,
    Context,
    Question,
    View,
    fmt,
    mlp,
    pct,
    seed_mean,
)
from ._common import separated as _separated

NAME = "population"
TITLE = ("Why the unbiased m/(m-1) variance at inference, and why mini-batch estimates and not "
         "the whole data set?")

SIZES = (2, 4, 8, 16, 64)
EXAMPLES = 12_000  # training examples seen at every batch size (3 epochs of mnist-5k)
ALG2_EXAMPLES = 4_000  # one pass over (at most) this many training examples for Algorithm 2
LR_PER_EXAMPLE = 0.1 / 64  # lr = LR_PER_EXAMPLE * m
MOMENTUM = 0.9
METHODS = ("running average", "Alg. 2, m/(m-1)", "Alg. 2, biased", "exact, whole set",
           "batch statistics")


def _bn_layers(model: nn.Module) -> list[tuple[str, BatchNorm1d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BatchNorm1d)]


@torch.no_grad()
def grouped_forward(model: nn.Sequential, x: torch.Tensor, m: int
                    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The training-mode forward of the ``k = len(x) // m`` consecutive batches of ``m`` rows of
    ``x`` at once, each BN layer normalizing each batch with that batch's own statistics, as
    ``k`` separate forwards would (the rest of ``x`` is dropped).

    ``model`` is an ``nn.Sequential`` of ``Linear``, bnlab ``BatchNorm1d`` and elementwise
    layers. Each BN layer of ``C`` features runs as one bnlab ``BatchNorm1d(k * C)`` (same eps,
    gamma and beta repeated) on the ``(m, k * C)`` view: per-feature statistics over a batch
    are exactly ``k`` separate BNs. Returns the ``(k * m, out)`` outputs and, per BN layer
    name, the ``(k, C)`` batch means and biased variances (float64). The model is unchanged.
    """
    k = len(x) // m
    z = x[: k * m]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in model.named_children():
        if isinstance(module, BatchNorm1d):
            c = module.num_features
            g = z.reshape(k, m, c)
            stats[name] = (g.double().mean(1), g.double().var(1, unbiased=False))
            wide = BatchNorm1d(k * c, eps=module.eps, dtype=z.dtype).train()
            wide.weight.copy_(module.weight.repeat(k))
            wide.bias.copy_(module.bias.repeat(k))
            z = wide(g.transpose(0, 1).reshape(m, k * c)).reshape(m, k, c).transpose(0, 1)
            z = z.reshape(k * m, c)
        elif isinstance(module, (nn.Linear, *ACTS.values())):
            z = module(z)
        else:
            raise TypeError(f"grouped_forward: layer {name!r} ({type(module).__name__}) is not "
                            "Linear, BatchNorm1d or an elementwise activation")
    return z, stats


def batch_averaged_stats(model: nn.Sequential, x: torch.Tensor, m: int, seed: int
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Algorithm 2, step 10 (Ioffe & Szegedy 2015): over one pass of the rows of ``x`` in
    batches of ``m`` (a seeded permutation; an incomplete last batch is dropped), each BN
    layer's mean over batches of ``mu_B`` and of the biased ``sigma_B^2``, every layer
    normalizing with batch statistics as in training. Returns ``{layer name: (E_B[mu_B],
    E_B[sigma_B^2])}`` in float64; the model is not changed."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    _, stats = grouped_forward(model, x[perm], m)
    return {n: (mu.mean(0), var.mean(0)) for n, (mu, var) in stats.items()}


def with_stats(model: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
               var_factor: float = 1.0) -> nn.Module:
    """A copy of ``model`` whose BN layers hold ``stats`` (variance times ``var_factor``)."""
    net = copy.deepcopy(model)
    for n, layer in _bn_layers(net):
        mean, var = stats[n]
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_((var * var_factor).to(layer.running_var.dtype))
    return net


@torch.no_grad()
def batch_stat_eval(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, m: int) -> dict:
    """Loss and accuracy with every test batch of ``m`` normalized by its own statistics, as in
    training (an incomplete last batch is left out; the model's statistics are untouched)."""
    out, _ = grouped_forward(model, x, m)
    y = y[: len(out)]
    return {"loss": float(F.cross_entropy(out, y)),
            "acc": float((out.argmax(1) == y).double().mean())}


def run(ctx: Context) -> None:
    x = ctx.x_train
    for m in SIZES:
        steps = ctx.steps(EXAMPLES // m, minimum=40)
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            model = mlp(norm="bn", act="relu")
            opt = torch.optim.SGD(model.parameters(), lr=LR_PER_EXAMPLE * m, momentum=MOMENTUM)
            ctx.fit(model, opt, f"m={m}", seed, steps=steps, batch_size=m, evals=5)
            alg2 = batch_averaged_stats(model, x[:ALG2_EXAMPLES], m, seed)
            exact = copy.deepcopy(model)
            recompute_population_stats(exact, x.split(1000), mode="eval")
            nets = {
                "running average": model,
                "Alg. 2, m/(m-1)": with_stats(model, alg2, m / (m - 1)),
                "Alg. 2, biased": with_stats(model, alg2, 1.0),
                "exact, whole set": exact,
            }
            rows = []
            for method, net in nets.items():
                ev = evaluate(net, ctx.x_test, ctx.y_test)
                rows.append({"m": m, "seed": seed, "method": method, "test_loss": ev["loss"],
                             "test_acc": ev["acc"]})
            ev = batch_stat_eval(model, ctx.x_test, ctx.y_test, m)
            rows.append({"m": m, "seed": seed, "method": "batch statistics",
                         "test_loss": ev["loss"], "test_acc": ev["acc"]})
            ctx.log("stats", rows)
            # first BN layer: its input does not depend on BN, so the ratio of the mean batch
            # variance to the exact variance is (m-1)/m up to the sampling of one pass
            first = copy.deepcopy(model)  # the same images as Algorithm 2's pass
            recompute_population_stats(first, x[:ALG2_EXAMPLES].split(1000), mode="eval")
            name, layer = _bn_layers(first)[0]
            ratio = alg2[name][1] / layer.running_var.double()
            ctx.log("variance", {"m": m, "seed": seed, "ratio": float(ratio.mean()),
                                 "ratio_sd": float(ratio.std())})


COLORS = {"running average": "#1f77b4", "Alg. 2, m/(m-1)": "#2ca02c",
          "Alg. 2, biased": "#d62728", "exact, whole set": "#9467bd",
          "batch statistics": "#7f7f7f"}


def _values(view: View, method: str, key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in view.kind("stats", method=method):
        out.setdefault(r["m"], []).append(r[key])
    return out


def report(view: View) -> Answer:
    fname = view.figure()
    sizes = sorted({r["m"] for r in view.kind("stats")})
    with plots.style():
        fig, axes = plots.figure(3, height=4.0)
        for method in METHODS:
            for ax, key in ((axes[0], "test_loss"), (axes[1], "test_acc")):
                vals = _values(view, method, key)
                ms = [m for m in sizes if m in vals]
                ax.plot(ms, [seed_mean(vals[m]) for m in ms], "o-", color=COLORS[method],
                        label=method, lw=2 if method.startswith("Alg") else 1.3)
        var = {}
        for r in view.kind("variance"):
            var.setdefault(r["m"], []).append(r["ratio"])
        ms = sorted(var)
        grid = np.linspace(min(ms, default=2), max(ms, default=64), 200)
        axes[2].plot(grid, (grid - 1) / grid, "-", color="#999", lw=3, alpha=0.6,
                     label="(m-1)/m (expected)")
        axes[2].plot(ms, [seed_mean(var[m]) for m in ms], "o", color="#d62728",
                     label="measured:\nmean sigma_B^2 / Var")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(m) for m in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("batch size m")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("test loss (inference)")
        axes[0].set_title("(a) test loss by statistics used")
        axes[1].set_ylabel("test accuracy")
        axes[1].set_title("(b) test accuracy")
        axes[1].legend(fontsize=8, loc="lower right")
        axes[2].set_ylabel("ratio, first BN layer")
        axes[2].set_title("(c) the biased batch variance")
        axes[2].legend(loc="lower right", fontsize=9)
        plots.save(fig, view.path / fname)
    # claim a: the (m-1)/m factor, measured at the first BN layer
    dev = max((abs(seed_mean(v) / ((m - 1) / m) - 1) for m, v in var.items()), default=None)
    c1 = Claim.check(
        "6a", "the mini-batch variance sigma_B^2 (divided by m) is on average (m-1)/m of the "
        "population variance (first BN layer, within 2%)",
        "measured / (m-1)/m: " + ", ".join(f"m={m} {seed_mean(var[m]) / ((m - 1) / m):.3f}"
                                           for m in ms),
        dev is not None and dev < 0.02, not_assessed="" if var else "not measured",
        paper="section 3.1, Algorithm 2",
    )
    loss_u = _values(view, "Alg. 2, m/(m-1)", "test_loss")
    loss_b = _values(view, "Alg. 2, biased", "test_loss")
    small = min(sizes, default=None)
    verdict = _separated(loss_u.get(small, []), loss_b.get(small, []), lower=True) \
        if small else None
    c2 = Claim.check(
        "6b", f"at small batches the correction matters: at m={small} the inference network "
        "with m/(m-1) has a lower test loss than without it",
        (f"m={small}: {fmt(seed_mean(loss_u.get(small, [])), 4)} with vs "
         f"{fmt(seed_mean(loss_b.get(small, [])), 4)} without; at m={max(sizes, default=0)}: "
         f"{fmt(seed_mean(loss_u.get(max(sizes, default=0), [])), 4)} vs "
         f"{fmt(seed_mean(loss_b.get(max(sizes, default=0), [])), 4)}"),
        verdict, not_assessed=view.short_note or ("" if verdict is not None else WITHIN_SPREAD),
        paper="section 3.1",
    )
    accs = {method: _values(view, method, "test_acc") for method in METHODS}
    rows = [[str(m)] + [pct(seed_mean(accs[method].get(m, [])), 2) for method in METHODS]
            for m in sizes]
    table = Table("Test accuracy by batch size and statistics (seed means)", ["m", *METHODS],
                  rows, "Batch statistics: the test set cut into batches of m, each normalized "
                  "by its own mean and variance, as during training.")
    gaps = [abs(seed_mean(accs["exact, whole set"].get(m, [])) - seed_mean(
        accs["running average"].get(m, []))) for m in sizes]
    big = max(sizes, default=0)
    loss_e = _values(view, "exact, whole set", "test_loss")
    losses = (f"test loss with / without m/(m-1): m={small} "
              f"{fmt(seed_mean(loss_u.get(small, [])), 3)} / "
              f"{fmt(seed_mean(loss_b.get(small, [])), 3)}, m={big} "
              f"{fmt(seed_mean(loss_u.get(big, [])), 3)} / "
              f"{fmt(seed_mean(loss_b.get(big, [])), 3)}")
    within = fmt(100 * dev if dev is not None else None, 1)
    unbiased = (f"The factor is right for the variance itself: sigma_B^2 averages to (m-1)/m of "
                f"the true variance (measured within {within}%)")
    if c2.verdict == "holds":
        answer = f"{unbiased}, and without it the inference network is worse at small m ({losses})"
    else:
        answer = (f"{unbiased}, but it did not make the inference network better here ({losses}"
                  f"; exact statistics of each layer's inference-time inputs: m={small} "
                  f"{fmt(seed_mean(loss_e.get(small, [])), 3)})")
    answer += (f". Running averages and exact whole-set statistics differed by at most "
               f"{fmt(100 * max(gaps, default=float('nan')), 2)} accuracy points.")
    text = [
        "**What was run.** The 784-100-100-100-10 ReLU network with BN before each ReLU, trained "
        f"on {EXAMPLES:,} examples with batches of m = {', '.join(map(str, SIZES))} (SGD, momentum "
        f"{MOMENTUM}, lr = {LR_PER_EXAMPLE * 64:g} x m/64), then evaluated with the five sets of "
        "statistics listed in the table. Algorithm 2's averages are over one pass of "
        f"{ALG2_EXAMPLES:,} training images in batches of m.",
        f"**Answer.** {answer} Algorithm 2 collects each layer's statistics with every layer in "
        "training mode, while at inference a layer's inputs come from layers that use "
        "population statistics; with tiny batches the two differ. The exact statistics are "
        "computed through the inference network itself (`mode=\"eval\"`). "
        "Why batches during training: the statistics must be computed "
        "for the current weights at every step and take part in backpropagation (section 2); "
        "with the whole training set each step would cost a full pass. At inference the whole "
        "set is affordable once, and `bnlab.recompute_population_stats` does it; the running "
        "averages are a cheap estimate of the same thing that also lets one track accuracy "
        "during training.",
        "**See also.** How accuracy falls as batches shrink, and batch renorm, group and layer "
        "norm: `bnlab run batch-size` (docs/small-batches.md); population statistics in the "
        "inference tools: "
        "docs/inference.md.",
    ]
    fig = Figure(fname, "Population statistics: with and without m/(m-1), exact, running "
                 "averages, and batch statistics, against the batch size m",
                 "Look for the red curve (biased) pulling away at small m in (a, b), and the "
                 "measured ratio in (c) on the (m-1)/m line.")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=[c1, c2])


QUESTION = Question(6, NAME, TITLE, run, report)
