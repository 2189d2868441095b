"""Question 5: before or after the nonlinearity?

Ioffe & Szegedy (2015), section 3.2, put BN immediately before the nonlinearity, normalizing
``x = Wu + b``: the layer input ``u`` "is likely the output of another nonlinearity, the shape of
its distribution is likely to change during training, and constraining its first and second
moments would not eliminate the covariate shift", while ``Wu + b`` "is more likely to have a
symmetric, non-sparse distribution"; "normalizing it is likely to produce activations with a
stable distribution" (also section 5, against normalizing after the nonlinearity).

Run: the 784-100-100-100-10 network with ReLU or sigmoid units, BN before each nonlinearity
(``act(BN(Wu))``), after it (``BN(act(Wu + b))``) or absent, same SGD and steps; test accuracy,
and the distribution of the last hidden layer's nonlinearity inputs over training (percentiles of
each unit over a fixed batch of test images, inference mode) and at the end (histogram).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...probes import percentiles, record_inputs
from ...report import plots
from ...report.content import Claim, Figure, Table
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
    separated,
)

NAME = "placement"
TITLE = "Before or after the nonlinearity?"

LR = 0.05
MOMENTUM = 0.9
BATCH = 60
STEPS = 2500
PROBE = 500  # test images whose nonlinearity inputs are recorded
BINS = np.linspace(-10.0, 10.0, 81)
#: saturated sigmoid input: |z| > 4, where the derivative is below 0.018
SATURATED = 4.0
PLACEMENTS = ("before", "after", "no BN")


def _last_act(model: nn.Module) -> nn.Module:
    acts = [m for m in model.modules() if isinstance(m, tuple(ACTS.values()))]
    return acts[-1]


def nonlinearity_inputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inputs ``(N, units)`` of the last hidden layer's nonlinearity on ``x``, inference
    mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        with record_inputs({"act": _last_act(model)}) as got, torch.no_grad():
            model(x)
    finally:
        model.train(was)
    return got["act"]


def _measure(act: str, probe: torch.Tensor, steps: int):
    def measure(model, step):
        z = nonlinearity_inputs(model, probe)
        unit_pct = percentiles(z, (15, 50, 85), dim=0).T  # (units, 3)
        row = {"unit_pct": [[round(v, 4) for v in u] for u in unit_pct.tolist()]}
        if act == "sigmoid":
            row["saturated"] = float((z.abs() > SATURATED).double().mean())
        else:
            row["inactive"] = float((z <= 0).double().mean())
        if step == steps:
            row["hist"] = np.histogram(z.numpy().ravel(), bins=BINS)[0].tolist()
        return row
    return measure


def run(ctx: Context) -> None:
    steps = ctx.steps(STEPS)
    probe = ctx.x_test[:PROBE]
    for act in ("relu", "sigmoid"):
        for place in PLACEMENTS:
            for seed in ctx.seeds:
                torch.manual_seed(seed)
                model = mlp(norm=None if place == "no BN" else "bn", act=act,
                            placement="before" if place == "no BN" else place)
                opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
                ctx.fit(model, opt, f"{act}/{place}", seed, steps=steps, batch_size=BATCH,
                        evals=15, measure=_measure(act, probe, steps))


COLORS = {"before": "#1f77b4", "after": "#ff7f0e", "no BN": "#d62728"}


def instability(view: View, variant: str) -> list[float]:
    """Per seed: over the evaluations after the first 10% of training, the range of each unit's
    median plus the range of its 15th-85th spread, averaged over units."""
    steps, vals = view.curve(variant, "unit_pct")
    if not steps:
        return []
    keep = [i for i, s in enumerate(steps) if s > 0.1 * steps[-1]] or list(range(len(steps)))
    p = torch.tensor([vals[i] for i in keep], dtype=torch.float64)  # (E, seeds, units, 3)
    med, spread = p[..., 1], p[..., 2] - p[..., 0]
    score = (med.amax(0) - med.amin(0)) + (spread.amax(0) - spread.amin(0))  # (seeds, units)
    return score.mean(1).tolist()


def report(view: View) -> Answer:
    f1, f2 = view.figure("accuracy"), view.figure("inputs")
    acts = [a for a in ("relu", "sigmoid") if any(v.startswith(a) for v in view.variants())]
    with plots.style():
        fig, axes = plots.figure(len(acts), height=3.8)
        for ax, act in zip(axes, acts, strict=True):
            for place in PLACEMENTS:
                steps, vals = view.curve(f"{act}/{place}", "test_acc")
                if steps:
                    plots.band(ax, steps, vals, COLORS[place], f"BN {place}" if place != "no BN"
                               else place)
            ax.set_title(f"{act}: test accuracy")
            ax.set_xlabel("SGD step")
            ax.set_ylim(0.5, 1.0)
            ax.legend(loc="lower right")
        axes[0].set_ylabel("test accuracy")
        plots.save(fig, view.path / f1)
        fig, axes = plots.figure(len(acts), 2, height=3.6)
        centres = (BINS[:-1] + BINS[1:]) / 2
        for col, act in enumerate(acts):
            ax_t, ax_h = axes[col], axes[len(acts) + col]
            for place in PLACEMENTS:
                v = f"{act}/{place}"
                steps, vals = view.curve(v, "unit_pct")
                if steps:  # first seed, median over units of each unit's 15/50/85th percentile
                    p = np.array([s[0] for s in vals])  # (E, units, 3)
                    med = np.median(p, axis=1)
                    ax_t.plot(steps, med[:, 1], "-", color=COLORS[place], lw=2,
                              label=f"BN {place}" if place != "no BN" else place)
                    ax_t.fill_between(steps, med[:, 0], med[:, 2], color=COLORS[place],
                                      alpha=0.15, lw=0)
                hist = [r["hist"] for r in view.fits(variant=v) if r.get("hist")]
                if hist:
                    h = np.array(hist, dtype=float).sum(0)
                    ax_h.plot(centres, h / h.sum(), "-", color=COLORS[place], lw=2)
            ax_t.set_title(f"{act}: nonlinearity input over training")
            ax_t.set_xlabel("SGD step")
            ax_t.legend(fontsize=9)
            ax_h.set_title(f"{act}: distribution at the end")
            ax_h.set_xlabel("input to the nonlinearity (last hidden layer)")
            ax_h.set_yscale("log")
        axes[0].set_ylabel("median unit: 15/50/85th pct")
        axes[len(acts)].set_ylabel("fraction of values")
        plots.save(fig, view.path / f2)
    claims, rows, parts, winners = [], [], [], []
    for act in acts:
        b, a = f"{act}/before", f"{act}/after"
        sb, sa = instability(view, b), instability(view, a)
        verdict = separated(sb, sa, lower=True)
        claims.append(Claim.check(
            f"5{'ab'[acts.index(act)]}",
            f"{act}: with BN before the nonlinearity its input distribution is more stable over "
            "training than with BN after it (per-unit range of the median + range of the "
            "15th-85th spread, after the first 10% of training)",
            f"before {fmt(seed_mean(sb), 3)} (seeds {', '.join(fmt(x, 3) for x in sb)}), after "
            f"{fmt(seed_mean(sa), 3)} ({', '.join(fmt(x, 3) for x in sa)})",
            verdict, not_assessed=view.short_note or ("" if verdict is not None
                                                      else WITHIN_SPREAD),
            paper="sections 3.2, 5",
        ))
        accs = {}
        for place in PLACEMENTS:
            v = f"{act}/{place}"
            acc = view.final(v, "test_acc")
            accs[place] = seed_mean(acc)
            key = "saturated" if act == "sigmoid" else "inactive"
            rows.append([act, place, pct(accs[place], 2),
                         f"{pct(min(acc, default=None), 2)}-{pct(max(acc, default=None), 2)}",
                         pct(seed_mean(view.final(v, key)), 1),
                         fmt(seed_mean(instability(view, v)), 3)])
        win = max(("before", "after"), key=lambda p: accs[p])
        ahead = separated(view.final(a, "test_acc"), view.final(b, "test_acc"), lower=True)
        winners.append(f"BN before was the more accurate with {act}" if ahead is True else
                       f"BN after was the more accurate with {act}" if ahead is False else
                       f"with {act} the two were within the seed spread")
        parts.append(f"with {act}, BN {win} reached {pct(accs[win], 1)} (BN "
                     f"{'after' if win == 'before' else 'before'}: "
                     f"{pct(accs['after' if win == 'before' else 'before'], 1)}, no BN "
                     f"{pct(accs['no BN'], 1)})")
    table = Table("At the end of training (seed means)",
                  ["units", "BN", "test acc", "range over seeds",
                   "saturated (sigmoid, |z|>4) / inactive (ReLU, z<=0)", "instability"], rows,
                  "Instability: the per-unit range over training of the median plus that of the "
                  "15th-85th spread of the last hidden layer's nonlinearity inputs (lower is "
                  "more stable).")
    stable = [c for c in claims if c.verdict == "holds"]
    answer = (
        _sentence("; ".join(parts)) + ". "
        + ("BN before the nonlinearity gave it the more stable input with "
           + ("both" if len(claims) > 1 else "these") + " units, as section 3.2 argues"
           if len(stable) == len(claims) and claims else
           "The stability comparison of section 3.2: " + ", ".join(
               f"claim {c.id} {c.verdict}" for c in claims))
        + ("; in accuracy (every seed against every seed), " + ", ".join(winners)
           if winners else "") + "."
    )
    text = [
        "**What was run.** The 784-100-100-100-10 network with ReLU or sigmoid hidden units: BN "
        "before each nonlinearity (`act(BN(Wu))`, no bias), after it (`BN(act(Wu + b))`), or "
        f"none; SGD (lr {LR}, momentum {MOMENTUM}, batch {BATCH}), same initial weights per "
        f"seed. The nonlinearity inputs of the last hidden layer are recorded on {PROBE} test "
        "images in inference mode.",
        f"**Answer.** {answer} Placing BN after the nonlinearity leaves the nonlinearity's own "
        "input un-normalized (it is W times normalized values plus b, free to drift and, for "
        "the sigmoid, to saturate); compare the orange and blue bands in the second figure.",
        "**See also.** Figure 1 of the paper (the sigmoid input with and without BN): `bnlab run "
        "mnist`; BN-x5-Sigmoid in the paper's Figure 3: `bnlab run lr-acceleration` "
        "(docs/lr-acceleration.md).",
    ]
    figs = [
        Figure(f1, "Test accuracy with BN before, after, or without BN (band: min-max over "
               "seeds)", "Compare blue (before) and orange (after) within each panel."),
        Figure(f2, "The last hidden layer's nonlinearity inputs: over training (line: median "
               "unit's median, band: its 15th-85th percentiles; first seed) and at the end "
               "(all units, probe images and seeds)",
               "Look for a flat, centred band with BN before, and a drifting or wide one after "
               "(for the sigmoid, mass beyond |z| = 4 is saturated)."),
    ]
    return Answer(answer, figures=figs, text=text, tables=[table], claims=claims)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


QUESTION = Question(5, NAME, TITLE, run, report)
