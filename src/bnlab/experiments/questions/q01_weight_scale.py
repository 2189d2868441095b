"""Question 1: does the scale of the weights matter?

Ioffe & Szegedy (2015), section 3.3: for a scalar ``a``, ``BN((aW)u) = BN(Wu)``, the Jacobian with
respect to ``u`` is unchanged and ``dBN((aW)u)/d(aW) = (1/a) dBN(Wu)/dW``: "larger weights lead to
smaller gradients, and Batch Normalization will stabilize the parameter growth".

Two measurements:

* **the identities** on a real layer (``nn.Linear`` without bias + bnlab ``BatchNorm1d`` in
  training mode, float64): the full Jacobians of the output with respect to ``u`` and ``W`` at
  ``aW`` against those at ``W`` for ``a`` from 0.01 to 1000, with BN's epsilon negligible and with
  the default 1e-5 (epsilon is what breaks the invariance, for tiny weights);
* **training** the 784-100-100-100-10 ReLU network with BN before each ReLU by plain SGD (no
  momentum, no weight decay) from the default initialization with the hidden weights multiplied by
  0.1, 1 or 10: the weight norms and the effective learning rate ``lr / ||w||^2`` of each hidden
  unit over training, and test accuracy.
"""

from __future__ import annotations

import math

import torch
from matplotlib.lines import Line2D
from torch import nn
from torch.autograd.functional import jacobian

from ...report import plots
from ...report.content import Claim, Figure, Table
from ._common import Answer, Context, Question, View, fmt, hidden_linears, mlp, pct, seed_mean

NAME = "weight-scale"
TITLE = "Does the scale of the weights matter?"

SCALES = (0.01, 0.03, 0.1, 0.3, 0.5, 2.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
#: BN's epsilon for the identity check: negligible next to Var(aWu) for every a above.
TINY_EPS = 1e-15
DEFAULT_EPS = 1e-5
INIT_SCALES = (0.1, 1.0, 10.0)
LR = 0.1
BATCH = 60
STEPS = 2000
#: float64 rounding bound for the identities with a negligible epsilon.
EXACT = 1e-9


def scale_identities(scales, eps: float, seed: int = 0, m: int = 32, d_in: int = 12,
                     d_out: int = 8) -> list[dict]:
    """For each ``a`` in ``scales``: how far the layer ``u -> BN(aW u)`` (``nn.Linear`` without
    bias + bnlab ``BatchNorm1d(eps=eps)``, training mode, float64) is from ``u -> BN(W u)``.

    Returns rows with ``a``, ``eps``, ``var`` (mean over units of Var(Wu)), and relative
    maximum deviations: ``out`` of ``BN(aWu)`` from ``BN(Wu)``; ``jac_u`` of the Jacobian
    ``dBN/du`` at ``aW`` from that at ``W``; ``jac_w`` of ``a * dBN/d(aW)`` from ``dBN/dW``;
    ``grad_ratio`` = ``||dl/d(aW)|| / ||dl/dW||`` for a fixed random upstream gradient (the
    section 3.3 claim: ``1/a``); ``radial``: ``|<aW, dl/d(aW)>| / (||aW|| ||dl/d(aW)||)``, the
    cosine between the weights and their gradient (0: the gradient is orthogonal to W).
    """
    from ... import BatchNorm1d

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    dy = torch.randn(m, d_out, generator=g, dtype=torch.float64)
    bn = BatchNorm1d(d_out, eps=eps, dtype=torch.float64)
    with torch.no_grad():  # a gamma and beta away from (1, 0), so they take part
        bn.weight.copy_(torch.linspace(0.5, 2.0, d_out, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, d_out, dtype=torch.float64))

    def layer(weight, inputs):
        return bn(inputs @ weight.t())

    def measure(a: float):
        wa = a * w
        y = layer(wa, u)
        ju = jacobian(lambda inputs: layer(wa, inputs), u)  # (m, d_out, m, d_in)
        jw = jacobian(lambda weight: layer(weight, u), wa)  # (m, d_out, d_out, d_in)
        wp = wa.clone().requires_grad_()
        (layer(wp, u) * dy).sum().backward()
        return y.detach(), ju, jw, wp.grad

    y0, ju0, jw0, g0 = measure(1.0)

    def rel(x, ref):
        return float((x - ref).abs().max() / ref.abs().max())

    rows = []
    for a in scales:
        y, ju, jw, ga = measure(a)
        rows.append({
            "a": a, "eps": eps, "var": float((u @ w.t()).var(0, unbiased=False).mean()),
            "out": rel(y, y0), "jac_u": rel(ju, ju0), "jac_w": rel(a * jw, jw0),
            "grad_ratio": float(ga.norm() / g0.norm()),
            "radial": float((a * w * ga).sum().abs() / (a * w.norm() * ga.norm())),
        })  # fmt: skip
    return rows


def _unit_norms(model: nn.Module) -> dict:
    """Per hidden layer: the root-mean-square norm of its units' weight vectors (rows of W)."""
    norms = [float(lin.weight.detach().pow(2).sum(1).mean().sqrt()) for lin in
             hidden_linears(model)]
    return {"w_norm": norms, "eff_lr": [LR / n**2 for n in norms]}


def run(ctx: Context) -> None:
    for eps in (TINY_EPS, DEFAULT_EPS):
        ctx.log("identity", scale_identities(SCALES, eps, seed=ctx.cfg.seed))
    steps = ctx.steps(STEPS)
    for a in INIT_SCALES:
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            model = mlp(norm="bn", act="relu")
            with torch.no_grad():
                for lin in hidden_linears(model):
                    lin.weight.mul_(a)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            ctx.fit(model, opt, f"x{a:g}", seed, steps=steps, batch_size=BATCH, evals=20,
                    measure=lambda m, step: _unit_norms(m))


# ----------------------------------------------------------------------------------- report
COLORS = {"x0.1": "#2ca02c", "x1": "#1f77b4", "x10": "#d62728"}


def _figure_identities(view: View, path) -> None:
    rows = view.kind("identity")
    with plots.style():
        fig, (ax1, ax2) = plots.figure(2, height=4.0)
        for eps, ls in ((TINY_EPS, "-"), (DEFAULT_EPS, "--")):
            sel = sorted((r for r in rows if r["eps"] == eps), key=lambda r: r["a"])
            a = [r["a"] for r in sel]
            for key, color in (("out", "#1f77b4"), ("jac_u", "#ff7f0e"), ("jac_w", "#2ca02c")):
                ax1.plot(a, [max(r[key], 1e-17) for r in sel], ls, color=color, marker="o",
                         ms=3)
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("weight scale a")
        ax1.set_ylabel("relative max deviation")
        ax1.set_title("(a) the section 3.3 identities at aW")
        handles = [Line2D([], [], color=c, lw=2, label=t) for c, t in (
            ("#1f77b4", "BN(aWu) vs BN(Wu)"), ("#ff7f0e", "dBN/du at aW vs at W"),
            ("#2ca02c", "a dBN/d(aW) vs dBN/dW"))]
        handles += [Line2D([], [], color="#555", ls="-", label=f"eps = {TINY_EPS:g}"),
                    Line2D([], [], color="#555", ls="--", label=f"eps = {DEFAULT_EPS:g}")]
        ax1.legend(handles=handles, fontsize=8, loc="center right")
        sel = sorted((r for r in rows if r["eps"] == TINY_EPS), key=lambda r: r["a"])
        a = [r["a"] for r in sel]
        ax2.plot(a, [1 / x for x in a], "-", color="#999", lw=3, alpha=0.6, label="1/a")
        ax2.plot(a, [r["grad_ratio"] for r in sel], "o", color="#d62728",
                 label="||dl/d(aW)|| / ||dl/dW|| (measured)")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("weight scale a")
        ax2.set_ylabel("gradient norm ratio")
        ax2.set_title("(b) larger weights, smaller gradients")
        ax2.legend()
        plots.save(fig, view.path / path)


def _figure_training(view: View, path) -> None:
    with plots.style():
        fig, axes = plots.figure(3, height=3.9)
        for v in view.variants():
            color = COLORS.get(v, "#555")
            for ax, key, fn in ((axes[0], "w_norm", lambda r: sum(r) / len(r)),
                                (axes[1], "eff_lr", lambda r: sum(r) / len(r)),
                                (axes[2], "test_acc", float)):
                steps, vals = view.curve(v, key)
                if steps:
                    plots.band(ax, steps, [[fn(x) for x in s] for s in vals], color,
                               f"weights {v} at init")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("unit weight norm ||w|| (mean of layers)")
        axes[0].set_title("(c) weight norm grows")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("effective lr = lr / ||w||^2")
        axes[1].set_title("(d) effective learning rate")
        axes[2].set_ylabel("test accuracy")
        axes[2].set_ylim(0, 1)
        axes[2].set_title("(e) test accuracy")
        for ax in axes:
            ax.set_xlabel("SGD step")
        axes[2].legend(loc="lower right")
        plots.save(fig, view.path / path)


def _monotone(values: list[float]) -> bool:
    """Never decreasing (beyond float32 rounding)."""
    return all(b >= a * (1 - 1e-6) for a, b in zip(values, values[1:], strict=False))


def report(view: View) -> Answer:
    f1, f2 = view.figure("identities"), view.figure("training")
    _figure_identities(view, f1)
    _figure_training(view, f2)
    ident = view.kind("identity")
    exact = [r for r in ident if r["eps"] == TINY_EPS]
    worst = max(max(r["out"], r["jac_u"], r["jac_w"]) for r in exact)
    grad_err = max(abs(r["grad_ratio"] * r["a"] - 1) for r in exact)
    radial = max(r["radial"] for r in exact)
    default = [r for r in ident if r["eps"] == DEFAULT_EPS]
    broken = sorted(r["a"] for r in default if max(r["out"], r["jac_u"], r["jac_w"]) > 1e-3)
    c1 = Claim.check(
        "1a", "BN(aWu) = BN(Wu), dBN/du is unchanged and dBN/d(aW) = (1/a) dBN/dW, for a from "
        f"{min(SCALES):g} to {max(SCALES):g} (float64, epsilon negligible: {TINY_EPS:g})",
        f"largest relative deviation {worst:.1e}; |a * gradient ratio - 1| <= {grad_err:.1e}; "
        f"cosine(W, gradient) <= {radial:.1e}",
        worst < EXACT and grad_err < EXACT, paper="section 3.3",
    )
    # training
    start_end, monotone, falls = {}, True, True
    for v in view.variants():
        for sd in sorted({r["seed"] for r in view.fits(variant=v)}):
            rows = sorted((r for r in view.fits(variant=v, seed=sd) if r.get("w_norm")),
                          key=lambda r: r["step"])
            if len(rows) < 2:
                continue
            for layer in range(len(rows[0]["w_norm"])):
                series = [r["w_norm"][layer] for r in rows]
                monotone &= _monotone(series)
                falls &= rows[-1]["eff_lr"][layer] < rows[0]["eff_lr"][layer]
            start_end.setdefault(v, []).append(
                (sum(rows[0]["w_norm"]) / 3, sum(rows[-1]["w_norm"]) / 3))
    have = bool(start_end)
    c2 = Claim.check(
        "1b", "with plain SGD (no weight decay) the weight norm of every batch-normalized layer "
        "only grows, so its effective learning rate lr/||w||^2 only falls",
        "norms never decreased between evaluations, and the effective lr ended lower, in every "
        "layer, seed and initial scale" if (monotone and falls) else
        f"never decreased: {monotone}; effective lr ended lower everywhere: {falls}",
        have and monotone and falls, not_assessed="" if have else "no training rows",
        paper="section 3.3 ('stabilize the parameter growth')",
    )
    r_start = r_end = None
    if "x0.1" in start_end and "x10" in start_end:
        r_start = seed_mean([s for s, _ in start_end["x10"]]) / seed_mean(
            [s for s, _ in start_end["x0.1"]])
        r_end = seed_mean([e for _, e in start_end["x10"]]) / seed_mean(
            [e for _, e in start_end["x0.1"]])
    c3 = Claim.check(
        "1c", "larger weights get smaller gradients: the small initial weights (x0.1) grow fast "
        "and the large ones (x10) barely move, so the 100x spread of the initial scales shrinks",
        "weight-norm ratio x10 / x0.1: " + (f"{r_start:.0f} at the start, {r_end:.1f} at the end"
                                             if r_start else "n/a"),
        r_end is not None and r_end < r_start / 2,
        not_assessed=view.short_note if r_end is not None else "the x10 or x0.1 runs are missing",
        paper="section 3.3",
    )
    rows = []
    for v in view.variants():
        acc = view.final(v, "test_acc")
        steps, vals = view.curve(v, "test_acc")
        early = next((seed_mean(vals[i]) for i, s in enumerate(steps) if s >= steps[-1] // 10),
                     None) if steps else None
        se = start_end.get(v, [])
        rows.append([v, fmt(seed_mean([s for s, _ in se])), fmt(seed_mean([e for _, e in se])),
                     pct(early), pct(seed_mean(acc))])
    table = Table("Training from three initial weight scales (seed means)",
                  ["initial scale", "||w|| at start", "||w|| at end",
                   "test acc at 10% of training", "final test acc"], rows)
    end1 = start_end.get("x1", [])
    growth = (seed_mean([e for _, e in end1]) / seed_mean([s for s, _ in end1])) if end1 else None
    eps_note = (f"with the default epsilon 1e-5 they break only for tiny weights (deviation "
                f"> 1e-3 at a <= {max(broken):g}, where a^2 Var(Wu) nears epsilon)" if broken
                else "with the default epsilon 1e-5 they hold to 1e-3 at every a tried")
    answer = (
        "Not for what the layer computes: BN(aWu) = BN(Wu) and the Jacobian is unchanged "
        f"(to {worst:.0e}), but yes for learning: the gradient scales as 1/a, so large weights "
        "take small effective steps (lr/||w||^2); with plain SGD the norms only grow"
        + (f" ({growth:.1f}x here from the default init)" if growth else "") + "."
    )
    text = [
        "**What was run.** (a, b) A real layer, `nn.Linear` without bias followed by bnlab "
        "`BatchNorm1d` in training mode, float64, m = 32: the full Jacobians of its output with "
        "respect to the input u and the weights W, at aW against W. (c-e) The 784-100-100-100-10 "
        f"ReLU network with BN before each ReLU, trained by plain SGD (lr {LR}, batch {BATCH}, "
        "no momentum, no weight decay) from PyTorch's default initialization with the hidden "
        f"weights multiplied by 0.1, 1 or 10; seeds {', '.join(map(str, _seeds(view)))}. "
        "||w|| is the root-mean-square norm of a hidden unit's weight vector (BN makes each "
        "unit invariant to the scale of its own weight vector).",
        f"**Answer.** {answer} The identities are exact up to epsilon: {eps_note}. The gradient "
        f"is orthogonal to W (cosine <= {radial:.0e}), so an SGD step can only lengthen W: "
        "||W + dW||^2 = ||W||^2 + ||dW||^2. Small weights get large gradients and grow until "
        "their effective step is moderate; large weights learn slowly. Weight decay is what "
        "holds the norm back (question 2).",
        "**See also.** BN's tolerance of high learning rates at scale: `bnlab run "
        "lr-acceleration` (the paper's Figures 2-3; docs/lr-acceleration.md) and the "
        "learning-rate sweep of `bnlab run why` (Bjorck et al. 2018; docs/why.md).",
    ]
    figures = [
        Figure(f1, "The section 3.3 identities on a real layer",
               "Look for deviations at rounding level (1e-16 to 1e-12) at every scale a with a "
               "negligible epsilon (solid), rising only for tiny a with the default epsilon "
               "(dashed); and the measured gradient ratio on the 1/a line."),
        Figure(f2, "Training from weights scaled by 0.1, 1 and 10 (plain SGD, band: min-max "
               "over seeds)",
               "Look for the norms only rising (fast for x0.1, hardly for x10), the effective "
               "learning rate falling, and the x10 network learning slowest."),
    ]
    return Answer(answer, figures=figures, text=text, tables=[table], claims=[c1, c2, c3])


def _seeds(view: View) -> list[int]:
    return sorted({r["seed"] for r in view.fits()})


QUESTION = Question(1, NAME, TITLE, run, report)
