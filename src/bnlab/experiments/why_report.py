"""The report of `bnlab run why`: figures, the papers' numbers beside bnlab's and a verdict per
claim, from a run's ``config.json`` and ``metrics.jsonl`` only.

Paper numbers (see the module constant :data:`PAPER`): Bjorck et al. (2018) as read off their
figures (their full text was not available to us; values marked "read off" are approximate) and
Santurkar et al. (2018), section 2.1 and Algorithm 1. Verdict rules are fixed in this module
before any run; a claim is "not assessed" when the run is too short or lacks a part it needs.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ..report import plots
from ..report.content import Claim, Figure, Section, Summary, Table, literal
from ..runs import RunFiles

__all__ = ["SECTIONS", "PAPER", "report", "sweep_table", "safe_step", "MIN_TRAIN_STEPS"]

#: Sections in claim order (1-7); `--only` takes these names.
SECTIONS = ("sweep", "landscape", "gradients", "depth", "bias", "spectra", "noisy")
TITLES = {
    "sweep": "(1) Learning rate: BN's benefit is the larger rate it allows",
    "landscape": "(2) The loss along the gradient: how large a step stays safe",
    "gradients": "(3) Gradients at initialization: scale and tails",
    "depth": "(4) Activations against depth at initialization",
    "bias": "(5) Class bias at initialization and correlated gradients",
    "spectra": "(6) Products of Gaussian matrices",
    "noisy": "(7) Noisy BN (Santurkar et al. 2018)",
}
LABELS = {"bn": "with BN", "none": "without BN", "noisy-bn": "noisy BN",
          "noise": "noise without BN"}
COLORS = {"bn": plots.COLORS["bn"], "none": plots.COLORS["baseline"], "noisy-bn": "#2ca02c",
          "noise": "#9467bd"}

B18 = "Bjorck et al. 2018"
S18 = "Santurkar et al. 2018"
#: The papers' numbers (ResNet-110 on CIFAR-10 for Bjorck et al.; VGG on CIFAR-10 for
#: Santurkar et al.). "read off" = digitised from a figure (about +-0.5 points).
PAPER = {
    # Bjorck et al. 2018, Figure 1 (read off): final test accuracy (%)
    "sweep": {("bn", 0.1): 93.2, ("bn", 0.003): 90.4, ("bn", 1e-4): 81.2, ("none", 1e-4): 81.8},
    "sweep_src": f"{B18}, Fig. 1 (read off; ResNet-110, CIFAR-10, trained to convergence)",
    "landscape_src": f"{B18}, section 2, relative-loss figure (mini-batches 1, 4, 7; read off)",
    "gradients_src": f"{B18}, section 2, gradient histogram (a middle layer, initialization; read "
                     "off)",
    "depth_src": f"{B18}, section 3, channel mean/std against depth (ResNet-110; read off)",
    "bias_src": f"{B18}, section 3, output-gradient heatmap (128 images x 10 classes; read off)",
    "spectra_src": f"{B18}, section 4, singular values of products of Gaussian matrices",
    "noisy_src": f"{S18}, section 2.1, Algorithm 1 and its figure (VGG, CIFAR-10, lr 0.1)",
}
#: Trainings shorter than this are smoke runs: their accuracy claims are not assessed.
MIN_TRAIN_STEPS = 200
#: The paper's "training accuracy ~100%" needs training to convergence; fewer epochs than this
#: and that claim is not assessed.
MIN_EPOCHS_FOR_FIT = 20
#: Relative-loss band of the landscape claim (Bjorck et al.: BN stays within 10^(+-0.5)).
BAND = 10**0.5
#: A mini-batch loss above this is divergence (Bjorck et al.).
DIVERGED_LOSS = 1e3


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _fmt(x, digits: int = 3, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}g}"


def _lr(x: float) -> str:
    return f"{x:g}"


# ========================================================================== (1) the lr sweep
def sweep_table(rows: list[dict], section: str = "sweep") -> dict:
    """Per (norm, base_lr): seeds, how many finished, where the others diverged, and the mean
    (and min/max) over finished seeds of the final test and train accuracy; plus per-step curves
    for (7). Uses the ``event: "end"`` rows and the evaluation rows of ``section``."""
    ends = {(r["norm"], r["base_lr"], r["seed"]): r for r in rows
            if r.get("section") == section and r.get("event") == "end"}
    evals: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if (r.get("section") == section and r.get("event") is None and not r.get("diverged")
                and r.get("test_acc") is not None):
            evals[(r["norm"], r["base_lr"], r["seed"])].append(r)
    out: dict[tuple, dict] = {}
    for (norm, lr, seed), end in sorted(ends.items()):
        cell = out.setdefault((norm, lr), {"seeds": [], "finished": [], "diverged_at": [],
                                           "test": [], "train": [], "batch": []})
        cell["seeds"].append(seed)
        if end["status"] == "diverged":
            cell["diverged_at"].append(end.get("diverged_at"))
            continue
        last = max(evals[(norm, lr, seed)], key=lambda r: r["step"])
        cell["finished"].append(seed)
        cell["test"].append(last["test_acc"])
        cell["train"].append(last.get("train_acc"))
        cell["batch"].append(last.get("train_batch_acc"))
    for cell in out.values():
        for k in ("test", "train", "batch"):
            cell[f"{k}_mean"] = _mean(cell[k])
    return out


def _best(table: dict, norm: str) -> tuple[float | None, float | None]:
    """(lr, mean test acc) of the best learning rate whose seeds all finished."""
    cands = [(c["test_mean"], lr) for (n, lr), c in table.items()
             if n == norm and c["test_mean"] is not None and not c["diverged_at"]]
    if not cands:
        return None, None
    acc, lr = max(cands)
    return lr, acc


def _cell_text(c: dict | None, key: str) -> str:
    if c is None:
        return "not run"
    if not c["finished"]:
        return "diverged (step " + ", ".join(str(s) for s in c["diverged_at"]) + ")"
    vals = [v for v in c[key] if v is not None]
    text = f"{100 * c[f'{key}_mean']:.1f}"
    if len(vals) > 1:
        text += f" [{100 * min(vals):.1f}-{100 * max(vals):.1f}]"
    if c["diverged_at"]:
        text += f" ({len(c['diverged_at'])} of {len(c['seeds'])} seeds diverged)"
    return text


def _sweep_section(files: RunFiles) -> Section:
    cfg, rows = files.config, files.rows
    table = sweep_table(rows)
    if not table:
        return Section(TITLES["sweep"], text=["The sweep was not run (`--only`)."])
    lrs = sorted({lr for _, lr in table})
    _figure_sweep(table, lrs, files.path / "why_sweep.png")
    ds = files.meta.get("dataset") or {}
    steps, batch = int(cfg.get("steps", 0)), int(cfg.get("batch_size", 0))
    epochs = steps * batch / ds["train"] if ds.get("train") else None
    seeds = max(len(c["seeds"]) for c in table.values())
    paper = PAPER["sweep"]
    header = ["lr", "test: with BN", "test: without BN", "train: with BN", "train: without BN",
              "paper test: with BN", "paper test: without BN"]
    body = []
    for lr in lrs:
        body.append([_lr(lr), _cell_text(table.get(("bn", lr)), "test"),
                     _cell_text(table.get(("none", lr)), "test"),
                     _cell_text(table.get(("bn", lr)), "train"),
                     _cell_text(table.get(("none", lr)), "train"),
                     _fmt(paper.get(("bn", lr))), _fmt(paper.get(("none", lr)))])
    for (n, lr), v in sorted(paper.items()):
        if lr not in lrs and n == "bn":
            body.append([_lr(lr), "not run", "not run", "", "", _fmt(v), ""])
    tab = Table(
        f"Final accuracy (%) against the learning rate: mean over the seeds that finished "
        f"[min-max], {seeds} seed(s) each",
        header, body,
        f"bnlab: ResNet-{cfg.get('depth')}, {steps:,} steps of batch {batch}"
        + (f" (about {epochs:.1f} epochs)" if epochs else "")
        + f"; test = the first {ds.get('test', '?'):,} test images, train = the first "
        f"{cfg.get('eval_train', 1000):,} training images, both in inference mode. A training "
        f"diverges when its mini-batch loss exceeds {DIVERGED_LOSS:g} or is not finite. "
        f"Paper: {PAPER['sweep_src']}.",
    )

    short = (f"{steps} steps per training is a smoke run (at least {MIN_TRAIN_STEPS} needed)"
             if steps < MIN_TRAIN_STEPS else "")
    if not short and seeds < 2:
        short = "one seed per point: the claims need at least two"
    if not short and len(lrs) < 2:
        short = "one learning rate: a sweep needs more"
    lr_bn, acc_bn = _best(table, "bn")
    lr_none, acc_none = _best(table, "none")
    lo = lrs[0]
    bn_lo = (table.get(("bn", lo)) or {}).get("test_mean")
    none_lo = (table.get(("none", lo)) or {}).get("test_mean")
    missing = "" if None not in (lr_bn, lr_none, bn_lo, none_lo) else \
        "a network has no finished training at its best or at the smallest rate"
    na = short or missing
    claims = [
        Claim.check(
            "1a", "BN allows a much larger learning rate: its best rate is at least 10x the "
            "best rate without BN",
            f"best rate with BN {_fmt(lr_bn)} ({_fmt(acc_bn, pct=True)}%), without BN "
            f"{_fmt(lr_none)} ({_fmt(acc_none, pct=True)}%)",
            None if na else lr_bn >= 10 * lr_none, not_assessed=na,
            paper="usual rates 0.1 with BN, 1e-4 without (1000x)"),
        Claim.check(
            "1b", f"with BN the larger rate pays: BN at its best rate beats BN at the smallest "
            f"rate ({_lr(lo)}) by more than 2 points",
            f"{_fmt(acc_bn, pct=True)}% vs {_fmt(bn_lo, pct=True)}%"
            + (f" ({100 * (acc_bn - bn_lo):+.1f} points)" if not missing else ""),
            None if na else acc_bn - bn_lo > 0.02, not_assessed=na,
            paper="93.2% at 0.1 vs 81.2% at 1e-4 (+12.0)"),
        Claim.check(
            "1c", "BN's benefit is mostly the larger rate: its gain from the larger rate (BN "
            f"best - BN at {_lr(lo)}) exceeds its gain at the same small rate (BN - no BN at "
            f"{_lr(lo)})",
            (f"{100 * (acc_bn - bn_lo):+.1f} vs {100 * (bn_lo - none_lo):+.1f} points"
             if not missing else "n/a"),
            None if na else (acc_bn - bn_lo) > (bn_lo - none_lo), not_assessed=na,
            paper="+12.0 vs -0.6 points (81.2% with BN, 81.8% without, at 1e-4)"),
    ]
    trains = [(table.get(k) or {}).get("train_mean") for k in
              (("bn", lr_bn), ("bn", lo), ("none", lo))]
    fit_na = na or (f"the trainings see about {epochs:.1f} epochs; the paper trains to "
                    f"convergence, so 100% training accuracy is not expected here (at least "
                    f"{MIN_EPOCHS_FOR_FIT} epochs needed to judge)"
                    if epochs is not None and epochs < MIN_EPOCHS_FOR_FIT else "")
    claims.append(Claim.check(
        "1d", "training accuracy reaches about 100% in all settings (BN at its best and at the "
        "smallest rate, no BN at the smallest rate)",
        "train accuracy " + ", ".join(_fmt(t, pct=True) + "%" for t in trains),
        None if fit_na else all(t is not None and t >= 0.99 for t in trains),
        not_assessed=fit_na, paper="about 100% in all four runs"))
    fig = Figure("why_sweep.png", "Final accuracy against the learning rate, with and without BN",
                 "Look for the blue curve (BN) peaking at a much larger rate than the red (no "
                 "BN), and the two meeting at the smallest rate; x marks trainings that "
                 "diverged, open diamonds the paper's ResNet-110 on CIFAR-10.")
    return Section(TITLES["sweep"], figures=[fig], tables=[tab], claims=claims)


def _figure_sweep(table: dict, lrs: list[float], path) -> None:
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=4.3, sharey=True)
        for ax, key, title in zip(axes, ("test", "train"),
                                  ("final test accuracy", "final training accuracy"),
                                  strict=True):
            for norm in ("bn", "none"):
                pts = [(lr, table[(norm, lr)]) for lr in lrs if (norm, lr) in table]
                xs = [lr for lr, c in pts if c[f"{key}_mean"] is not None]
                ys = [c[f"{key}_mean"] for _, c in pts if c[f"{key}_mean"] is not None]
                ax.plot(xs, ys, "o-", color=COLORS[norm], label=LABELS[norm], lw=2, ms=6)
                for lr, c in pts:
                    for v in c[key]:
                        if v is not None:
                            ax.plot(lr, v, ".", color=COLORS[norm], alpha=0.5, ms=5)
                    if c["diverged_at"]:
                        ax.plot(lr, 0.02 if norm == "none" else 0.06, "x", color=COLORS[norm],
                                ms=10, mew=2.5)
            if key == "test":
                for (norm, lr), v in PAPER["sweep"].items():
                    ax.plot(lr, v / 100, "D", mfc="none", color=COLORS[norm], ms=8, mew=1.5,
                            alpha=0.8)
                ax.plot([], [], "D", mfc="none", color="#555", label="paper (ResNet-110, "
                        "CIFAR-10)")
                ax.plot([], [], "x", color="#555", mew=2.5, label="diverged")
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.axhline(0.1, color="#999", lw=0.8, ls=":")
            ax.set_xlabel("learning rate (base; same schedule for all)")
            ax.set_title(title)
        axes[0].set_ylabel("accuracy")
        # on the training panel, whose upper left is empty (the test panel has points there)
        axes[1].legend(*axes[0].get_legend_handles_labels(), loc="upper left", fontsize=9)
        plots.save(fig, path)


# ======================================================================= (2) the landscape
def safe_step(steps: list[float], losses: list[list], loss0: list[float]) -> float | None:
    """The largest step ``s`` of the grid such that, on every batch, every step up to ``s``
    keeps the relative loss (loss / loss before the step) within ``[10^-0.5, 10^0.5]`` and
    finite; None when already the smallest step leaves the band. ``losses`` is
    ``[batch][step]`` (None: diverged), ``steps`` ascending."""
    best = None
    for i, s in enumerate(steps):
        ok = all(
            batch[i] is not None and l0 and math.isfinite(batch[i])
            and 1 / BAND <= batch[i] / l0 <= BAND
            for batch, l0 in zip(losses, loss0, strict=True)
        )
        if not ok:
            break
        best = s
    return best


def _landscape_data(rows: list[dict], cfg: dict) -> dict:
    """{"init": {net: curves}, "trained": {net: curves}, "steps": [...]}; curves hold
    ``loss0``, ``grad_norm``, ``loss`` per batch."""
    out: dict = {"init": {}, "trained": {}, "steps": None}
    for r in rows:
        if r.get("section") == "landscape" and r.get("when") == "init":
            out["init"] = r["nets"]
            out["steps"] = r["step_sizes"]
            out["batches"] = r["batches"]
    after = cfg.get("landscape_after")
    for r in rows:
        if "landscape" in r and r.get("step") == after and r.get("norm") in ("bn", "none"):
            out["trained"][r["norm"]] = r["landscape"]
    return out


def _rel(curves: dict) -> list[list]:
    """Relative losses [batch][step]; None (diverged) stays None."""
    return [[None if v is None else v / l0 for v in batch] if l0 else [None] * len(batch)
            for batch, l0 in zip(curves["loss"], curves["loss0"], strict=True)]


def _landscape_section(files: RunFiles) -> Section:
    cfg = files.config
    d = _landscape_data(files.rows, cfg)
    if not d["init"] and not d["trained"]:
        return Section(TITLES["landscape"], text=["The landscape was not run (`--only`)."])
    steps = d["steps"] or []
    after = cfg.get("landscape_after")
    _figure_landscape(d, files.path / "why_landscape.png", after)
    rows, claims = [], []
    for when, label in (("init", "at initialization"), ("trained", f"after {after} steps")):
        nets = d[when]
        if not nets:
            continue
        safe = {}
        for n in ("bn", "none"):
            c = nets.get(n)
            if c is None:
                continue
            s = safe_step(steps, c["loss"], c["loss0"])
            g = _mean(c["grad_norm"])
            rel = [v for b in _rel(c) for v in b]
            finite = [v for v in rel if v is not None]
            worst = max(finite) if finite else None
            diverged_any = any(v is None for v in rel) or any(
                v is not None and v > DIVERGED_LOSS for b in c["loss"] for v in b)
            first_div = next((s_ for i, s_ in enumerate(steps) if any(
                b[i] is None or b[i] > DIVERGED_LOSS for b in c["loss"])), None)
            safe[n] = (s, g)
            rows.append([label, LABELS[n], _fmt(_mean(c["loss0"])), _fmt(g),
                         _fmt(s), _fmt(None if s is None else s * g),
                         _fmt(worst), "yes, from step " + _fmt(first_div) if diverged_any
                         else "no"])
        if "bn" in safe and "none" in safe:
            (sb, gb), (sn, gn) = safe["bn"], safe["none"]
            tb = None if sb is None else sb * gb
            tn = None if sn is None else sn * gn
            holds = (tb is not None and (tn is None or tb >= 10 * tn))
            claims.append(Claim.check(
                "2a" if when == "init" else "2b",
                f"{label}, the loss tolerates much larger steps with BN: along the normalized "
                "gradient direction the largest step keeping the relative loss within "
                "10^(+-0.5) on every batch is at least 10x larger with BN",
                f"with BN {_fmt(tb)}, without BN {_fmt(tn)} (as learning rates: {_fmt(sb)} vs "
                f"{_fmt(sn)})",
                holds,
                paper="as steps: without BN the loss explodes above about 1e-3 (relative loss up "
                "to 1e6); with BN it stays within 10^(+-0.5) up to 0.1-0.2"))
    tab = Table(
        "Relative loss along the gradient (loss after the step / loss before, per fixed batch)",
        ["when", "network", "loss before", "|gradient|", "largest safe step (as a rate)",
         "largest safe step (distance)", "largest relative loss", f"loss > {DIVERGED_LOSS:g}?"],
        rows,
        "A step of rate eta moves the weights by eta*|g| along the normalized gradient. Safe: "
        "the relative loss stays within 10^(+-0.5) on every fixed batch for every step up to "
        f"that one. ResNet-{cfg.get('depth')}; fixed mini-batches "
        f"{', '.join(str(b) for b in d.get('batches', []))} of the training order; BN in training "
        f"mode. Trained: the sweep's networks at rates {cfg.get('landscape_lr_bn')} (BN) and "
        f"{cfg.get('landscape_lr_none')} (no BN). Paper: {PAPER['landscape_src']}.")
    fig = Figure("why_landscape.png", "Relative loss after one gradient step, against the step",
                 "Look for the red curves (no BN) leaving the grey band (10^(+-0.5)) and "
                 "shooting up at much smaller steps than the blue (BN); x: the loss was above "
                 f"{DIVERGED_LOSS:g} or not finite.")
    return Section(TITLES["landscape"], figures=[fig], tables=[tab], claims=claims)


def _figure_landscape(d: dict, path, after) -> None:
    steps = np.asarray(d["steps"] or [], dtype=float)
    whens = [w for w in ("init", "trained") if d[w]]
    styles = ["-", "--", ":", "-.", (0, (1, 1))] * 3
    with plots.style():
        fig, axes = plots.figure(2, nrows=len(whens), width=11, height=3.9)
        for row, when in enumerate(whens):
            for col, axis in enumerate(("rate", "distance")):
                ax = axes[2 * row + col]
                for n in ("bn", "none"):
                    c = d[when].get(n)
                    if c is None:
                        continue
                    g = _mean(c["grad_norm"]) or 1.0
                    x = steps if axis == "rate" else steps * g
                    for b, (rel, loss) in enumerate(zip(_rel(c), c["loss"], strict=True)):
                        y = np.array([np.nan if v is None else max(v, 1e-3) for v in rel])
                        ax.plot(x, np.minimum(y, 1e9), ls=styles[b], color=COLORS[n], lw=1.8,
                                label=f"{LABELS[n]}" if b == 0 else None)
                        bad = [i for i, v in enumerate(loss) if v is None or v > DIVERGED_LOSS]
                        if bad:
                            yb = [min(y[i], 1e9) if np.isfinite(y[i]) else 1e9 for i in bad]
                            ax.plot(x[bad], yb, "x", color=COLORS[n], ms=6, mew=1.5)
                ax.axhspan(1 / BAND, BAND, color="#888", alpha=0.15, lw=0)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_ylim(1e-3, 3e9)
                when_txt = "at initialization" if when == "init" else f"after {after} steps"
                ax.set_title(f"{when_txt}: step as a " + ("learning rate" if axis == "rate"
                                                           else "distance along g/|g|"))
                ax.set_xlabel("learning rate eta (step = eta*g)" if axis == "rate"
                              else "distance t (step = t*g/|g|)")
                if col == 0:
                    ax.set_ylabel("loss after / loss before")
        axes[0].legend(loc="upper left", fontsize=9, title="lines: fixed batches",
                       title_fontsize=8)
        plots.save(fig, path)


# =================================================================== (3) gradient histograms
def _row(rows: list[dict], section: str) -> dict | None:
    found = [r for r in rows if r.get("section") == section and r.get("analysis") == "init"]
    return found[-1] if found else None


def _gradients_section(files: RunFiles) -> Section:
    r = _row(files.rows, "gradients")
    if r is None:
        return Section(TITLES["gradients"], text=["Not run in this run (`--only`)."])
    nets = r["nets"]
    _figure_gradients(r, files.path / "why_gradients.png")
    b, n = nets["bn"], nets["none"]
    ratio = n["std"] / b["std"] if b["std"] > 0 else math.inf
    tab = Table(
        f"Weight gradients of convolution {r['layer_index']} ({literal(r['layer'])}) of ResNet-"
        f"{r['depth']} at initialization, one batch of {r['batch']}",
        ["network", "std", "99.9th pct of |g|", "max |g|", "excess kurtosis", "loss",
         "paper: range"],
        [[LABELS[k], _fmt(v["std"]), _fmt(v["p99_9"]), _fmt(v["max_abs"]),
          _fmt(v["excess_kurtosis"]), _fmt(v["loss"]), p]
         for k, v, p in (("bn", b, "about +-0.04, Gaussian-like"),
                         ("none", n, "about +-4, sharp peak, heavy tails"))],
        "Excess kurtosis: 0 for a Gaussian, 3 for a Laplace distribution; larger = heavier tails "
        f"and a sharper peak. Mean cross-entropy over the batch, BN in training mode. Paper: "
        f"{PAPER['gradients_src']}.")
    claims = [
        Claim.check("3a", "without BN the gradients are orders of magnitude larger (std at least "
                    "10x that with BN)",
                    f"std {_fmt(n['std'])} vs {_fmt(b['std'])} ({_fmt(ratio)}x); max |g| "
                    f"{_fmt(n['max_abs'])} vs {_fmt(b['max_abs'])}",
                    ratio >= 10, paper="about +-4 vs +-0.04 (100x)"),
        Claim.check("3b", "without BN the gradients are heavy-tailed (excess kurtosis > 1), with "
                    "BN Gaussian-like (excess kurtosis < 1)",
                    f"excess kurtosis {_fmt(n['excess_kurtosis'])} without BN, "
                    f"{_fmt(b['excess_kurtosis'])} with BN",
                    n["excess_kurtosis"] > 1 and b["excess_kurtosis"] < 1,
                    paper="sharp peak and heavy tails without BN; Gaussian-shaped with BN"),
    ]
    fig = Figure("why_gradients.png", "Histogram of a middle layer's weight gradients at "
                 "initialization (count on a log scale)",
                 "Look at the x-axes (each panel its own scale): the red histogram (no BN) spans "
                 "a much wider range, with a sharp peak and long tails; the blue (BN) is a narrow "
                 "parabola on this log scale, the shape of a Gaussian.")
    return Section(TITLES["gradients"], figures=[fig], tables=[tab], claims=claims)


def _figure_gradients(r: dict, path) -> None:
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=3.8)
        for ax, n in zip(axes, ("bn", "none"), strict=True):
            v = r["nets"][n]
            h = v["histogram"]
            edges = np.asarray(h["edges"])
            centres = (edges[:-1] + edges[1:]) / 2
            counts = np.asarray(h["counts"], dtype=float)
            ax.bar(centres, np.where(counts > 0, counts, np.nan), width=np.diff(edges),
                   color=COLORS[n], alpha=0.85)
            ax.set_yscale("log")
            ax.set_title(f"{LABELS[n]}: std {_fmt(v['std'])}, kurtosis "
                         f"{_fmt(v['excess_kurtosis'])}")
            ax.set_xlabel(f"gradient of conv {r['layer_index']}'s weights")
        axes[0].set_ylabel("count")
        plots.save(fig, path)


# ========================================================================= (4) depth
def _depth_section(files: RunFiles) -> Section:
    r = _row(files.rows, "depth")
    if r is None:
        return Section(TITLES["depth"], text=["Not run in this run (`--only`)."])
    _figure_depth(r, files.path / "why_depth.png")
    nets = r["nets"]
    rows, logs = [], {}
    for n in ("none", "bn"):
        m = np.log10(np.maximum(np.asarray(nets[n]["mean_abs"], dtype=float), 1e-30))
        s = np.log10(np.maximum(np.asarray(nets[n]["std"], dtype=float), 1e-30))
        logs[n] = (m, s)
        k = len(s)
        i6 = min(5, k - 1)
        tail = slice(max(0, k - max(1, k // 10)), k)
        slope = float(np.polyfit(np.arange(1, k + 1), s, 1)[0]) if k > 1 else float("nan")
        rows.append([LABELS[n], f"{m[i6]:.2f} / {s[i6]:.2f}",
                     f"{m[tail].mean():.2f} / {s[tail].mean():.2f}",
                     f"{m.min():.2f} to {m.max():.2f}", f"{s.min():.2f} to {s.max():.2f}",
                     f"{slope:+.3f}"])
    k = len(logs["none"][1])
    i6 = min(5, k - 1)
    tail = slice(max(0, k - max(1, k // 10)), k)
    mn, sn = logs["none"]
    grow_m, grow_s = mn[tail].mean() - mn[i6], sn[tail].mean() - sn[i6]
    mb, sb = logs["bn"]
    lo_b, hi_b = min(mb.min(), sb.min()), max(mb.max(), sb.max())
    tab = Table(
        f"log10 of the channel |mean| and std of each convolution's output, ResNet-{r['depth']} "
        f"at initialization ({k} convolutions, one batch of {r['batch']})",
        ["network", "layer 6: |mean| / std", f"last {tail.stop - tail.start} layers: |mean| / "
         "std", "|mean| over depth", "std over depth", "slope of log10 std per layer"],
        rows,
        "Per channel over the batch and positions, then averaged over channels; BN in training "
        f"mode. Paper ({PAPER['depth_src']}): without BN from about -1.3 at layer 6 to 3-3.5 at "
        "layers 102-110; with BN between -1.5 and +1.")
    claims = [
        Claim.check("4a", "without BN, channel means and standard deviations grow exponentially "
                    "with depth: at least 2 decades from layer 6 to the last layers, a steady "
                    "rise in log scale",
                    f"|mean| {grow_m:+.2f} decades, std {grow_s:+.2f} decades",
                    grow_m >= 2 and grow_s >= 2,
                    paper="from about -1.3 to 3-3.5 (about +4.5 decades)"),
        Claim.check("4b", "with BN they stay bounded: every layer's log10 |mean| and log10 std "
                    "within [-2, 1.5] (the paper's band widened by half a decade)",
                    f"log10 values from {lo_b:.2f} to {hi_b:.2f}",
                    lo_b >= -2 and hi_b <= 1.5, paper="between -1.5 and +1"),
    ]
    fig = Figure("why_depth.png", "Channel mean and std of every convolution's output against "
                 "depth, at initialization",
                 "Look for the red lines (no BN) climbing steadily on the log scale (exponential "
                 "growth) while the blue (BN) stay inside the grey band of the paper's BN "
                 "network; red circles: the paper's network without BN.")
    return Section(TITLES["depth"], figures=[fig], tables=[tab], claims=claims)


def _figure_depth(r: dict, path) -> None:
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=4.0, sharey=True)
        for ax, key, title in zip(axes, ("mean_abs", "std"),
                                  ("channel |mean|", "channel std"), strict=True):
            for n in ("bn", "none"):
                v = np.log10(np.maximum(np.asarray(r["nets"][n][key], dtype=float), 1e-30))
                ax.plot(np.arange(1, len(v) + 1), v, "-", color=COLORS[n], lw=2,
                        label=LABELS[n])
            ax.axhspan(-1.5, 1.0, color="#888", alpha=0.15, lw=0, label="paper, with BN")
            ax.plot([6], [-1.3], "o", mfc="none", color=COLORS["none"], ms=9, mew=1.5,
                    label="paper, without BN")
            ax.plot([106, 106], [3.0, 3.5], "-", color=COLORS["none"], lw=6, alpha=0.4)
            ax.set_xlabel("convolution (depth)")
            ax.set_title(f"{title} (log10)")
        axes[0].set_ylabel("log10 magnitude")
        axes[0].legend(loc="upper left", fontsize=9)
        plots.save(fig, path)


# ========================================================================== (5) class bias
def _bias_section(files: RunFiles) -> Section:
    r = _row(files.rows, "bias")
    if r is None:
        return Section(TITLES["bias"], text=["Not run in this run (`--only`)."])
    _figure_bias(r, files.path / "why_bias.png")
    nets = r["nets"]
    b, n = nets["bn"], nets["none"]
    kb, kn = b["kernel"], n["kernel"]
    conf = {k: _top_probability(v, r["labels"]) for k, v in nets.items()}
    tab = Table(
        f"Class bias and gradient similarity of ResNet-{r['depth']} at initialization (batch of "
        f"{r['batch']}; kernel gradients of convolution {r['layer_index']}, {literal(r['layer'])})",
        ["measure", "with BN", "without BN", "paper"],
        [["images predicted as the most common class", _fmt(b["bias"]["top_fraction"]),
          _fmt(n["bias"]["top_fraction"]), "nearly all without BN; not so with BN"],
         ["mean softmax probability of that class", _fmt(conf["bn"]), _fmt(conf["none"]), ""],
         ["output gradients: mean pairwise cosine over images",
          _fmt(b["output_grad_cosine"]), _fmt(n["output_grad_cosine"]),
          "highly correlated without BN"],
         ["kernel gradient: mean cosine across images", _fmt(kb["example_cosine"]),
          _fmt(kn["example_cosine"]), "similar across examples without BN"],
         ["kernel gradient: mean cosine across positions", _fmt(kb["position_cosine"]),
          _fmt(kn["position_cosine"]), "similar across positions without BN"],
         [f"share of |dW|^2 in the top {100 * kb['top_fraction']:.0f}% channel pairs",
          _fmt(kb["top_pair_share"]), _fmt(kn["top_pair_share"]),
          "a few channels carry much larger gradients without BN"],
         ["largest / median output-channel gradient norm", _fmt(kb["out_channel_ratio"]),
          _fmt(kn["out_channel_ratio"]), ""],
         ["largest / median input-channel gradient norm", _fmt(kb["in_channel_ratio"]),
          _fmt(kn["in_channel_ratio"]), ""]],
        "Output gradients: d(sum of the batch's cross-entropies)/d(logits) = softmax - "
        "one-hot(label). Per-image (per-position) kernel gradients: that image's (position's) "
        f"term of dW. Paper: {PAPER['bias_src']}.")
    claims = [
        Claim.check("5a", "without BN nearly every image is predicted as one class (at least "
                    "90%), with BN not (at most 50%)",
                    f"{_fmt(n['bias']['top_fraction'])} without BN, "
                    f"{_fmt(b['bias']['top_fraction'])} with BN",
                    n["bias"]["top_fraction"] >= 0.9 and b["bias"]["top_fraction"] <= 0.5,
                    paper="one hot column for nearly every image without BN; absent with BN"),
        Claim.check("5b", "without BN the output gradients are more alike across images than "
                    "with BN",
                    f"mean cosine {_fmt(n['output_grad_cosine'])} vs "
                    f"{_fmt(b['output_grad_cosine'])}",
                    n["output_grad_cosine"] > b["output_grad_cosine"],
                    paper="highly correlated across examples without BN"),
        Claim.check("5c", "without BN a convolution's kernel gradients are more alike across "
                    "images and across positions than with BN",
                    f"across images {_fmt(kn['example_cosine'])} vs {_fmt(kb['example_cosine'])}"
                    f"; across positions {_fmt(kn['position_cosine'])} vs "
                    f"{_fmt(kb['position_cosine'])}",
                    kn["example_cosine"] > kb["example_cosine"]
                    and kn["position_cosine"] > kb["position_cosine"],
                    paper="similar across spatial positions and examples without BN"),
        Claim.check("5d", "without BN a few channel pairs carry a larger share of the kernel "
                    "gradient than with BN",
                    f"top {100 * kb['top_fraction']:.0f}% of pairs: "
                    f"{_fmt(kn['top_pair_share'])} vs {_fmt(kb['top_pair_share'])}",
                    kn["top_pair_share"] > kb["top_pair_share"],
                    paper="a few input/output channels carry much larger gradients"),
    ]
    fig = Figure("why_bias.png", "Output gradients at initialization (images x classes)",
                 "Look for a solid dark row: one class predicted for nearly every image, "
                 "with softmax near 1 (the paper's finding without BN); the paper sees no such "
                 "row with BN. Dark blue cells are each image's own label.")
    return Section(TITLES["bias"], figures=[fig], tables=[tab], claims=claims)


def _top_probability(net: dict, labels: list[int]) -> float:
    """Mean softmax probability of the most common predicted class, from the stored output
    gradients (softmax - one-hot) and labels."""
    c = net["bias"]["top_class"]
    g = net["output_grad"]
    return sum(row[c] + (1.0 if y == c else 0.0) for row, y in zip(g, labels, strict=True)) / len(g)


def _figure_bias(r: dict, path) -> None:
    with plots.style():
        fig, axes = plots.figure(1, nrows=2, width=11, height=2.9,
                                 gridspec_kw={"hspace": 0.45})
        for ax, n in zip(axes, ("none", "bn"), strict=True):
            g = np.asarray(r["nets"][n]["output_grad"], dtype=float).T  # (classes, images)
            im = ax.imshow(g, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                           interpolation="nearest")
            top = r["nets"][n]["bias"]
            ax.set_title(f"{LABELS[n]}: {100 * top['top_fraction']:.0f}% of images predicted "
                         f"as class {top['top_class']}")
            ax.set_ylabel("class")
            ax.set_yticks(range(g.shape[0]))
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(False)
        axes[-1].set_xlabel("image")
        fig.colorbar(im, ax=axes, shrink=0.9, label="softmax - one-hot")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plots.plt.close(fig)


# ============================================================================ (6) spectra
def _spectra_section(files: RunFiles) -> Section:
    r = _row(files.rows, "spectra")
    if r is None:
        return Section(TITLES["spectra"], text=["Not run in this run (`--only`)."])
    _figure_spectra(r, files.path / "why_spectra.png")
    from .why_analyses import fuss_catalan_edge

    prods = r["products"]
    ks = sorted(prods, key=int)
    rows = [[k, _fmt(p["max"]), _fmt(fuss_catalan_edge(int(k))), _fmt(p["median"]),
             _fmt(p["max_over_median"]), _fmt(p["below_tenth"]), _fmt(p["top10_share"])]
            for k, p in ((k, prods[k]) for k in ks)]
    tab = Table(
        f"Singular values of a product of k independent {r['n']} x {r['n']} matrices with "
        "N(0, 1/n) entries",
        ["k", "largest", "largest (theory, n -> inf)", "median", "largest / median",
         "share below largest/10", "share of |P|^2 in the top 10%"],
        rows,
        "Theory: the edge of the Fuss-Catalan law of the squared singular values, "
        "sqrt((k+1)^(k+1)/k^k). The mean squared singular value stays 1 for every k (the "
        "variance-preserving scale of the standard initializations); the spread does not. "
        f"Paper: {PAPER['spectra_src']}.")
    mom = [prods[k]["max_over_median"] for k in ks]
    below = [prods[k]["below_tenth"] for k in ks]
    increasing = all(a < b for a, b in zip(mom, mom[1:], strict=False)) and all(
        a < b for a, b in zip(below, below[1:], strict=False))
    claims = [Claim.check(
        "6", "the more factors, the more skewed the singular values: largest/median and the "
        "share of small singular values both grow with k",
        "largest/median " + ", ".join(f"{v:.3g}" for v in mom) + "; share below largest/10 "
        + ", ".join(f"{v:.3g}" for v in below) + f" (k = {', '.join(ks)})",
        increasing if len(ks) > 1 else None,
        paper="increasingly skewed for 1, 3, 5 factors")]
    fig = Figure("why_spectra.png", "Singular values of products of 1, 3 and 5 Gaussian "
                 "matrices",
                 "Look for the spectrum stretching with more factors: a few large singular values "
                 "and many tiny ones, although every product preserves the average squared norm.")
    return Section(TITLES["spectra"], figures=[fig], tables=[tab], claims=claims)


def _figure_spectra(r: dict, path) -> None:
    colors = {"1": "#1f77b4", "3": "#ff7f0e", "5": "#d62728"}
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=3.9)
        for k, p in sorted(r["products"].items(), key=lambda kv: int(kv[0])):
            s = np.asarray(p["singular_values"], dtype=float)
            s = s[s > 0]
            bins = np.logspace(np.log10(max(s.min(), 1e-8)), np.log10(s.max()), 40)
            axes[0].hist(s, bins=bins, histtype="step", lw=2, color=colors.get(k, "#555"),
                         label=f"{k} factor{'s' if k != '1' else ''}")
            axes[1].plot(np.arange(1, len(s) + 1) / len(s), np.sort(s)[::-1], lw=2,
                         color=colors.get(k, "#555"), label=f"{k}")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("singular value")
        axes[0].set_ylabel("count")
        axes[0].set_title("histogram")
        axes[0].legend(fontsize=9)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("rank / n")
        axes[1].set_ylabel("singular value")
        axes[1].set_title("sorted spectrum")
        plots.save(fig, path)


# ============================================================================ (7) noisy BN
def _curves(rows: list[dict], norm: str, key: str) -> tuple[list[int], list[float]]:
    """Seed-mean ``key`` against step for a noisy-section variant (evaluations after step 0)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if (r.get("section") == "noisy" and r.get("norm") == norm and r.get("event") is None
                and not r.get("diverged") and r.get(key) is not None and r["step"] > 0):
            by_step[r["step"]].append(r[key])
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def _noisy_section(files: RunFiles) -> Section:
    cfg, rows = files.config, files.rows
    table = sweep_table(rows, "noisy")
    if not table:
        return Section(TITLES["noisy"], text=["Not run in this run (`--only`)."])
    _figure_noisy(rows, table, files.path / "why_noisy.png")
    lr = cfg.get("noisy_lr")
    cell = {n: table.get((n, lr)) for n in ("bn", "noisy-bn", "none", "noise")}
    body = []
    for n in ("bn", "noisy-bn", "none", "noise"):
        c = cell[n]
        body.append([LABELS[n], _cell_text(c, "batch") if c else "not run",
                     _cell_text(c, "train") if c else "not run",
                     _cell_text(c, "test") if c else "not run"])
    steps = int(cfg.get("noisy_steps", 0))
    tab = Table(
        f"Final accuracy (%) of the noisy-BN variants, lr {lr}, {steps:,} steps",
        ["network", "training batches (training mode, noise on)", "training set (inference "
         "mode)", "test"],
        body,
        "Training batches: accuracy on the mini-batches of the last evaluation interval, as "
        f"trained (noise on); training set: the first {cfg.get('eval_train', 1000):,} training "
        "images in inference mode (noise off). Noise per BN layer and step: mu_t ~ U(-0.5, "
        "0.5), sigma_t ~ U(1, 1.25), per value m ~ U(mu_t +- 0.1), s ~ N(sigma_t, 0.1^2), "
        "a <- s*a + m. Paper: "
        f"{PAPER['noisy_src']}.")
    acc = {n: (c["batch_mean"] if c and c["finished"] else None) for n, c in cell.items()}
    short = (f"{steps} steps is a smoke run (at least {MIN_TRAIN_STEPS} needed)"
             if steps < MIN_TRAIN_STEPS else "")
    missing = [LABELS[n] for n in ("bn", "noisy-bn") if cell[n] is None]
    na = short or (f"missing: {', '.join(missing)}" if missing else "")

    def div(n):
        c = cell[n]
        return c is not None and not c["finished"]

    def score(n):  # a diverged training counts as chance level
        return acc[n] if acc[n] is not None else (0.1 if div(n) else None)

    claims = [Claim.check(
        "7a", "noisy BN trains about as well as BN (final training accuracy within 5 points)",
        f"noisy BN {_fmt(score('noisy-bn'), pct=True)}%, BN {_fmt(score('bn'), pct=True)}%",
        None if na or None in (score("noisy-bn"), score("bn"))
        else abs(score("noisy-bn") - score("bn")) <= 0.05,
        not_assessed=na, paper="about the same training accuracy as BN")]
    na_b = na or ("" if cell["none"] is not None else "no run without BN")
    claims.append(Claim.check(
        "7b", "noisy BN trains better than the same network without BN",
        f"noisy BN {_fmt(score('noisy-bn'), pct=True)}%, no BN "
        + ("diverged" if div("none") else f"{_fmt(score('none'), pct=True)}%"),
        None if na_b or None in (score("noisy-bn"), score("none"))
        else score("noisy-bn") > score("none"),
        not_assessed=na_b, paper="better than no BN"))
    plain_trains = score("none") is not None and score("none") >= 0.5
    na_c = na or ("" if cell["noise"] is not None and cell["none"] is not None else
                  "the noise-only or the no-BN network was not run")
    if not na_c and not plain_trains:
        na_c = (f"without BN the network does not train at lr {lr} even without noise "
                f"({'diverged' if div('none') else _fmt(score('none'), pct=True) + '%'}), so "
                "the noise's effect cannot be told apart")
    claims.append(Claim.check(
        "7c", "the same noise without BN stops training (final training accuracy at most 20%, "
        "or divergence) while the network without BN and without noise trains (at least 50%)",
        "noise without BN " + ("diverged" if div("noise") else
                               f"{_fmt(score('noise'), pct=True)}%")
        + ", no BN " + ("diverged" if div("none") else f"{_fmt(score('none'), pct=True)}%"),
        None if na_c else (score("noise") is not None and score("noise") <= 0.2),
        not_assessed=na_c, paper="the same noise without BN stops training entirely"))
    fig = Figure("why_noisy.png", "Training accuracy over steps: BN, noisy BN, no BN, noise "
                 "without BN (same learning rate)",
                 "Look for the green curve (noisy BN) tracking the blue (BN) despite the noise, "
                 "and the purple (the same noise without BN) failing to learn; x: diverged.")
    return Section(TITLES["noisy"], figures=[fig], tables=[tab], claims=claims)


def _figure_noisy(rows: list[dict], table: dict, path) -> None:
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=4.0, sharey=True)
        for ax, key, title in zip(axes, ("train_batch_acc", "train_acc"),
                                  ("training batches (training mode, noise on)",
                                   "training set (inference mode, noise off)"), strict=True):
            for n in ("bn", "noisy-bn", "none", "noise"):
                steps, vals = _curves(rows, n, key)
                ax.plot(steps, vals, "-", color=COLORS[n], lw=2, label=LABELS[n])
                ends = [c for (nn, _), c in table.items() if nn == n and c["diverged_at"]]
                for c in ends:
                    for s in c["diverged_at"]:
                        if s is not None:
                            ax.plot(s, 0.03, "x", color=COLORS[n], ms=10, mew=2.5)
            ax.axhline(0.1, color="#999", lw=0.8, ls=":")
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("training step")
            ax.set_title(title)
        axes[0].set_ylabel("accuracy")
        axes[0].legend(loc="lower right", fontsize=9)
        plots.save(fig, path)


# ================================================================================ report
def report(files: RunFiles) -> Summary:
    """The report of a `bnlab run why` run (figures written into the run directory)."""
    cfg = files.config
    meta = files.meta
    sections = [
        _sweep_section(files), _landscape_section(files), _gradients_section(files),
        _depth_section(files), _bias_section(files), _spectra_section(files),
        _noisy_section(files),
    ]
    claims = [c for s in sections for c in s.claims]
    counts = {v: sum(c.verdict == v for c in claims) for v in ("holds", "fails",
                                                                 "not assessed")}
    ds = meta.get("dataset") or {}
    timings = meta.get("timings") or {}
    headline = [
        "Claims: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + ".",
        "Verdicts: " + "; ".join(f"{c.id} {c.verdict}" for c in claims) + ".",
    ]
    if timings:
        headline.append(
            f"Wall time: analyses at initialization {timings.get('analyses_at_init_s', 'n/a')} s"
            + (f", trainings {timings['trainings_s']} s" if "trainings_s" in timings else "")
            + ".")
    data_name = literal(ds.get("name", "?"))
    seeds = f"{cfg.get('seed', 0)}..{cfg.get('seed', 0) + cfg.get('seeds', 1) - 1}"
    caveats = [
        f"**Scale**: the papers use ResNet-110 (Bjorck et al.) and VGG (Santurkar et al.) on "
        f"CIFAR-10 trained for many epochs; here the trainings are ResNet-{cfg.get('depth')} for "
        f"{cfg.get('steps')} steps (sweep) and {cfg.get('noisy_steps')} steps (noisy BN) on "
        f"{data_name}, so the accuracies are not comparable in level: compare the shapes and "
        "orderings with the papers'. Claims that need training to convergence are marked not "
        "assessed.",
        "**Paper numbers**: Bjorck et al.'s full text was not available; their numbers are read "
        "off figure images (about +-0.5 points on accuracy axes) or taken from notes on the "
        "paper. Santurkar et al.'s come from their text.",
    ]
    if ds.get("name") and ds["name"] != "cifar10":
        caveats.append(
            f"**Data**: {data_name} ({ds.get('train', '?'):,} training images of "
            f"{'x'.join(str(v) for v in ds.get('shape', []))}), not CIFAR-10; inputs standardized "
            "per channel, no augmentation (the papers augment CIFAR-10).")
    setup = [
        f"Networks: ResNetCifar (He et al. 2016; option-A shortcuts) with and without BN, "
        f"depth {cfg.get('depth')} for (1), (2), (7) and {cfg.get('deep_depth')} for (3)-(5); "
        f"BN layers: {literal(cfg.get('bn_impl'))}; channels_last: "
        f"{literal(cfg.get('channels_last'))}.",
        f"Sweep: SGD momentum {cfg.get('momentum')}, weight decay {cfg.get('weight_decay')}, "
        f"batch {cfg.get('batch_size')}, rates {literal(cfg.get('lrs'))} dropped 10x at 50% and "
        f"75% of {cfg.get('steps')} steps, seeds {seeds}. Noisy BN: SGD lr "
        f"{cfg.get('noisy_lr')}, momentum {cfg.get('noisy_momentum')}, constant rate.",
    ]
    if meta.get("processes"):
        setup.append(f"Trainings ran in {meta['processes']} process(es) x "
                     f"{meta.get('threads_per_process')} thread(s).")
    if timings:
        setup.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + ".")
    return Summary(
        title="Why Batch Normalization works: Bjorck et al. (2018) and Santurkar et al. (2018)",
        sections=sections, headline=headline, caveats=caveats, setup=setup)
