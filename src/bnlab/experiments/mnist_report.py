"""The Figure 1 experiment's analysis and report: claims, the paper-vs-bnlab table and the
figures, computed from a run's ``config.json`` and ``metrics.jsonl`` only.

Claims (Ioffe & Szegedy 2015, section 4.1, Figure 1):

1. BN's test accuracy is above the baseline's at every evaluation after the first 10% of
   training (seed means);
2. BN reaches the baseline's final accuracy in at most half the steps;
3. the distribution of a sigmoid input in the last hidden layer is more stable with BN: (3a) for
   the tracked unit, the ranges over evaluations of its median and of its 15th-85th spread are
   both smaller; (3b) the same ranges averaged over all units.

The claims are about training to convergence: a run shorter than ``MIN_STEPS`` steps (a smoke
run) reports them as not assessed, and claim 2 is not assessed while the baseline is still near
chance (it would "hold" trivially).

The report is built from whatever the files hold: rows that are damaged (a field missing or of
the wrong type) are left out with a warning (:func:`clean_rows`), and a run with rows for one
network only (stopped early, or a file cut short) still gets its figures, with the claims marked
not assessed.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from ..report import plots
from ..report.content import Claim, Figure, Section, Summary, Table, literal
from ..runs import RunFiles

__all__ = ["MIN_STEPS", "PAPER", "clean_rows", "summarize", "report", "series",
           "trained_series"]

NETS = ("baseline", "bn")
LABELS = {"baseline": "Without BN", "bn": "With BN"}
_NAMES = {"baseline": "baseline network", "bn": "BN network"}

# Read off Figure 1(a) of the paper (approximate): test accuracy at a training step, measured on
# the full MNIST (60,000 training images).
PAPER = {
    "bn": {4000: 0.955, 10000: 0.966, 20000: 0.975, 50000: 0.982},
    "baseline": {4000: 0.70, 10000: 0.932, 20000: 0.962, 50000: 0.973},
}
#: Fewer steps than this, and the claims are not assessed (the paper trains 50,000 steps).
MIN_STEPS = 10_000
#: Claim 2 needs a baseline that has learned something: a final accuracy above this.
MIN_BASELINE_ACC = 0.5


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _triple(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)


def clean_rows(rows: list[dict], warnings: list[str] | None = None) -> list[dict]:
    """The rows this report can use. A row needs ``net`` (one of :data:`NETS`), ``step`` and
    ``seed`` (integers), else it is left out; a field of the wrong type (``test_acc`` not a
    finite number, ``tracked_pct`` not three numbers, ``unit_pct`` not the run's usual number of
    triples, ``train_loss`` not a number) is set to None, so only that measurement is missing.
    What was left out is counted in ``warnings`` (one line per kind)."""
    out: list[dict] = []
    dropped = 0
    bad: Counter[str] = Counter()
    units = Counter(
        len(r["unit_pct"]) for r in rows
        if isinstance(r.get("unit_pct"), list) and r["unit_pct"]
        and all(_triple(u) for u in r["unit_pct"])
    )  # fmt: skip
    width = units.most_common(1)[0][0] if units else None
    for r in rows:
        step, seed = r.get("step"), r.get("seed")
        if (
            r.get("net") not in NETS
            or not isinstance(step, int) or isinstance(step, bool) or step < 0
            or not isinstance(seed, int) or isinstance(seed, bool)
        ):  # fmt: skip
            dropped += 1
            continue
        row = dict(r)
        checks = {
            "test_acc": _number,
            "train_loss": _number,
            "tracked_pct": _triple,
            "unit_pct": lambda v: (isinstance(v, list) and len(v) == width
                                   and all(_triple(u) for u in v)),
        }  # fmt: skip
        for key, ok in checks.items():
            if row.get(key) is not None and not ok(row[key]):
                row[key] = None
                bad[key] += 1
        out.append(row)
    if warnings is not None:
        if dropped:
            warnings.append(f"{dropped} row(s) of metrics.jsonl lack a valid net, step or seed; "
                            "left out")
        for key, n in sorted(bad.items()):
            warnings.append(f"{n} row(s) of metrics.jsonl have an unusable {key}; that value "
                            "left out")
    return out


def series(rows: list[dict], net: str, key: str) -> tuple[list[int], Tensor]:
    """Steps and a ``(E, K, ...)`` float64 tensor of ``key`` for one network (seeds in order),
    keeping only evaluations that every seed completed."""
    sel = [r for r in rows if r.get("net") == net and r.get(key) is not None
           and r.get("step") is not None and r.get("seed") is not None]
    steps = sorted({r["step"] for r in sel})
    seeds = sorted({r["seed"] for r in sel})
    table = {(r["step"], r["seed"]): r[key] for r in sel}
    steps = [s for s in steps if all((s, sd) in table for sd in seeds)]
    return steps, torch.tensor([[table[(s, sd)] for sd in seeds] for s in steps],
                               dtype=torch.float64)


def trained_series(rows: list[dict], net: str, key: str) -> tuple[list[int], Tensor]:
    """:func:`series` after step 0 (at step 0 the BN network's population statistics are still
    their initial values, which describe no data); all evaluations if there are no others."""
    steps, values = series(rows, net, key)
    keep = [i for i, s in enumerate(steps) if s > 0] or list(range(len(steps)))
    return [steps[i] for i in keep], values[keep]


def _at(steps: list[int], values: Tensor, step: int) -> float | None:
    """Seed-mean value at the evaluation ``step`` (exact match only)."""
    return float(values[steps.index(step)].mean()) if step in steps else None


def _ranges(p: Tensor) -> tuple[float, float]:
    """Mean over seeds (and units) of the range over evaluations of the median and of the
    15th-85th spread; ``p`` is ``(E, K, ..., 3)``."""
    spread = p[..., 2] - p[..., 0]
    return (
        float((p[..., 1].amax(0) - p[..., 1].amin(0)).mean()),
        float((spread.amax(0) - spread.amin(0)).mean()),
    )


def _stability(rows: list[dict], net: str) -> dict[str, float] | None:
    """The four ranges of claim 3 for one network; None without percentile rows."""
    tracked = trained_series(rows, net, "tracked_pct")[1]
    units = trained_series(rows, net, "unit_pct")[1]
    if not len(tracked) or not len(units):
        return None
    t, u = _ranges(tracked), _ranges(units)
    return {
        "tracked_median_range": t[0],
        "tracked_spread_range": t[1],
        "all_units_median_range": u[0],
        "all_units_spread_range": u[1],
    }


def summarize(meta: dict, rows: list[dict]) -> dict:
    """The numbers and claims of a run (from its files only). Works on what there is: with one
    network only, or no evaluation step shared by both, the claims are not assessed and say
    why. ``curves`` holds each network's own ``(steps, (E, K) accuracies)``; ``steps`` and
    ``acc`` the evaluations both networks share."""
    rows = clean_rows(rows)
    curves = {net: series(rows, net, "test_acc") for net in NETS}  # (steps, (E, K))
    missing = [_NAMES[n] for n in NETS if not curves[n][0]]
    common = [s for s in curves["bn"][0] if s in curves["baseline"][0]]
    if missing:
        gap = f"the run has no test accuracy rows for the {' and the '.join(missing)}"
    elif not common:
        gap = "no evaluation step has rows for both networks"
    else:
        gap = ""
    final: dict[str, float | None] = {
        net: float(v[-1].mean()) if steps else None for net, (steps, v) in curves.items()
    }
    acc: dict[str, Tensor] = {}
    if common:
        for net in NETS:
            steps, values = curves[net]
            acc[net] = torch.stack([values[steps.index(s)] for s in common])
        final = {net: float(acc[net].mean(1)[-1]) for net in NETS}
    last = [c[0][-1] for c in curves.values() if c[0]]
    total = common[-1] if common else max(last, default=0)
    short = (
        f"the run has {total:,} steps; the claims are about training to convergence (the paper: "
        f"50,000 steps), so a run under {MIN_STEPS:,} steps cannot judge them"
        if total < MIN_STEPS
        else ""
    )

    if common:
        mean_b, mean_n = acc["baseline"].mean(1), acc["bn"].mean(1)
        final_b = final["baseline"]
        late = [i for i, s in enumerate(common) if s > 0.1 * total]
        worst = min((float(mean_n[i] - mean_b[i]) for i in late), default=float("nan"))
        claim1 = Claim.check(
            "1",
            "BN's test accuracy is higher than the baseline's at every evaluation after the "
            "first 10% of training (seed means)",
            f"{len(late)} evaluations after step {int(0.1 * total):,}; smallest margin BN - "
            f"baseline = {worst:+.4f}",
            bool(late) and worst > 0,
            not_assessed=short,
        )
        reach = next(
            (s for s, a in zip(common, mean_n.tolist(), strict=True) if a >= final_b), None
        )
        untrained = (
            f"the baseline ends at {final_b:.3f}, still near chance"
            if final_b < MIN_BASELINE_ACC
            else ""
        )
        claim2 = Claim.check(
            "2",
            "BN reaches the baseline's final accuracy in at most half the steps",
            f"baseline final {final_b:.4f} at step {total:,}; BN first reaches it at "
            + (f"step {reach:,} ({reach / total:.1%} of training)" if reach is not None
               else "no evaluation"),
            reach is not None and reach <= total / 2,
            not_assessed=short or untrained,
        )
    else:
        claim1 = Claim.check(
            "1",
            "BN's test accuracy is higher than the baseline's at every evaluation after the "
            "first 10% of training (seed means)",
            "n/a", None, not_assessed=gap,
        )  # fmt: skip
        claim2 = Claim.check(
            "2", "BN reaches the baseline's final accuracy in at most half the steps", "n/a",
            None, not_assessed=gap,
        )  # fmt: skip
    stab = {net: _stability(rows, net) for net in NETS}

    def stability(cid: str, which: str, text: str) -> Claim:
        b, n = stab["baseline"], stab["bn"]
        if b is None or n is None:
            lacking = " and the ".join(_NAMES[k] for k in NETS if stab[k] is None)
            return Claim.check(cid, text, "n/a", None, not_assessed=gap or (
                f"the run has no sigmoid-input percentiles after step 0 for the {lacking}"))
        bm, nm = b[f"{which}_median_range"], n[f"{which}_median_range"]
        bs, ns = b[f"{which}_spread_range"], n[f"{which}_spread_range"]
        return Claim.check(
            cid,
            text,
            f"median range {nm:.3f} (BN) vs {bm:.3f} (baseline); spread range {ns:.3f} vs "
            f"{bs:.3f} (seed means)",
            nm < bm and ns < bs,
            not_assessed=gap or short,
        )

    claims = [
        claim1,
        claim2,
        stability(
            "3a", "tracked",
            "the tracked sigmoid input is more stable with BN: over all evaluations the range "
            "of its median and the range of its 15th-85th spread are both smaller",
        ),
        stability(
            "3b", "all_units",
            "the same two ranges, averaged over all units of the last hidden layer, are smaller "
            "with BN",
        ),
    ]  # fmt: skip
    table = [
        {
            "step": s,
            "paper_bn": PAPER["bn"][s],
            "paper_baseline": PAPER["baseline"][s],
            "bnlab_bn": _at(*curves["bn"], s),
            "bnlab_baseline": _at(*curves["baseline"], s),
        }
        for s in sorted(PAPER["bn"])
    ]
    return {
        "steps": common,
        "acc": acc,
        "curves": curves,
        "final": final,
        "claims": claims,
        "stability": stab,
        "paper_table": table,
    }


# ----------------------------------------------------------------------------------- figures
def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")


def _figure_accuracy(s: dict, path) -> None:
    """Each network's own evaluations (a network without rows is left out of the plot)."""
    drawn = [net for net in NETS if s["curves"][net][0]]
    end = max((s["curves"][net][0][-1] for net in drawn), default=0) or 1
    with plots.style():
        fig, (ax,) = plots.figure(1, width=11, height=4.6)
        for net in drawn:
            steps, values = s["curves"][net]
            plots.band(ax, steps, values, plots.COLORS[net], f"{LABELS[net]} (bnlab)")
            ps = [p for p in sorted(PAPER[net]) if p <= end]
            if ps:
                ax.plot(ps, [PAPER[net][p] for p in ps], "o--", color=plots.COLORS[net],
                        alpha=0.6, ms=5, label=f"{LABELS[net]} (paper, read off Figure 1a)")
        if not drawn:
            _no_data(ax, "no test accuracy rows in metrics.jsonl")
        ax.axhline(0.1, color="#999", lw=0.8, ls=":")
        ax.text(end, 0.11, "chance", ha="right", va="bottom", fontsize=9, color="#777")
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(0, end)
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
        ax.set_title("Test accuracy (seed mean; band: min-max over seeds)")
        if drawn:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
        plots.save(fig, path)


def _figure_inputs(rows: list[dict], tracked_unit: int, path) -> int | None:
    """Panels (b, c) for the first seed of each network; returns the seed shown (None without
    percentile rows)."""
    pct = {net: trained_series(rows, net, "tracked_pct") for net in NETS}
    seeds = sorted({r["seed"] for r in rows if r.get("tracked_pct") is not None})
    seed = seeds[0] if seeds else None
    shown = [pct[n][1][:, 0].flatten() for n in NETS if len(pct[n][0])]
    lim = max(float(torch.cat(shown).abs().max()), 1.0) if shown else 1.0
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=4.2, sharey=True)
        for ax, net, tag in zip(axes, NETS, ("(b)", "(c)"), strict=True):
            s, p = pct[net]  # steps, (E, K, 3)
            color = plots.COLORS[net]
            ax.set_title(f"{tag} {LABELS[net]}")
            ax.set_xlabel("training step")
            ax.set_ylim(-lim * 1.05, lim * 1.05)
            if not s:
                _no_data(ax, "no rows for this network")
                continue
            ax.plot(s, p[:, 0, 2], ":", color=color, lw=1.3, label="85th percentile")
            ax.plot(s, p[:, 0, 1], "-", color=color, lw=2.0, label="median")
            ax.plot(s, p[:, 0, 0], "--", color=color, lw=1.3, label="15th percentile")
            ax.legend(loc="lower right", fontsize=9)
        axes[0].set_ylabel(f"input to sigmoid unit {tracked_unit}\n(last hidden layer)")
        plots.save(fig, path)
    return seed


def report(files: RunFiles) -> Summary:
    """The Figure 1 report of a run (figures written into the run directory). Damaged rows are
    left out with warnings in ``files.warnings``; values from the files enter the text as
    literals."""
    meta, cfg = files.meta, files.config
    rows = clean_rows(files.rows, files.warnings)
    s = summarize(meta, rows)
    ds = meta.get("dataset")
    ds = ds if isinstance(ds, dict) else {}
    n_train = ds.get("train")
    n_train = n_train if isinstance(n_train, int) and not isinstance(n_train, bool) else None
    small = n_train is not None and n_train < 60_000
    data_name = literal(ds.get("name", "?"))
    ours = f"{data_name}, {n_train:,} train" if n_train is not None else data_name
    unit = cfg.get("tracked_unit", 0)
    unit = unit if isinstance(unit, int) and not isinstance(unit, bool) else 0

    _figure_accuracy(s, files.path / "figure1a.png")
    seed = _figure_inputs(rows, unit, files.path / "figure1bc.png")

    caveats = []
    if small:
        bn_steps = s["curves"]["bn"][0]
        train_loss = [r.get("train_loss") for r in rows
                      if r.get("net") == "bn" and bn_steps and r.get("step") == bn_steps[-1]]
        train_loss = [v for v in train_loss if v is not None]
        loss = sum(train_loss) / len(train_loss) if train_loss else None
        fit_note = (
            f" The BN network has fit its training set here (training loss {loss:.1e}), so "
            "more steps cannot raise its test accuracy much: the data, not the network, is the "
            "limit."
            if loss is not None and loss < 1e-2 else ""
        )
        caveats.append(
            f"**Data**: this run trained on {ours} images, not the paper's 60,000 MNIST images. "
            "With so few images test accuracy levels off lower than the paper's (about 0.93 "
            f"for BN on mnist-5k against the paper's 0.98).{fit_note} Compare the shapes and the "
            "ordering of the curves with the paper, not their levels; `bnlab data fetch mnist` "
            "gets the full set."
        )
    a, p = s["final"], s["paper_table"]
    verdicts = [c.verdict for c in s["claims"]]
    n_seeds = max((v.shape[1] for steps, v in s["curves"].values() if steps), default=0)
    last = max((steps[-1] for steps, _ in s["curves"].values() if steps), default=0)
    headline = [
        f"Final test accuracy (mean of {n_seeds} seeds): **BN {_fmt(a['bn'])}**, "
        f"**baseline {_fmt(a['baseline'])}** after {last:,} steps ({ours}).",
        "Claims: " + ", ".join(f"{verdicts.count(v)} {v}" for v in ("holds", "fails",
                                                                     "not assessed")
                               if verdicts.count(v)) + ".",
    ]
    fig_a = Figure(
        "figure1a.png",
        "Figure 1(a): test accuracy against training steps",
        "Look for BN (blue) climbing within the first few thousand steps and staying above the "
        "baseline (red), which learns later and ends lower. Dots: the paper's curve read off "
        "its Figure 1(a) (full MNIST).",
    )
    fig_bc = Figure(
        "figure1bc.png",
        "Figure 1(b, c): 15th, 50th and 85th percentiles of one sigmoid input over training"
        + (f" (seed {seed})" if seed is not None else ""),
        "Look for the three lines staying flat with BN (c) while they drift and spread without "
        "BN (b): the 'internal covariate shift' the paper set out to remove.",
    )
    table = Table(
        "Test accuracy at the steps read off the paper's Figure 1(a) (seed mean)",
        ["step", "paper: BN (60,000 train)", f"bnlab: BN ({ours})",
         "paper: no BN (60,000 train)", f"bnlab: no BN ({ours})"],
        [[f"{r['step']:,}", _fmt(r["paper_bn"]), _fmt(r["bnlab_bn"]), _fmt(r["paper_baseline"]),
          _fmt(r["bnlab_baseline"])] for r in p],
        "Paper values are read off its Figure 1(a), so approximate; n/a where this run made no "
        "evaluation at that step.",
    )  # fmt: skip
    c = {k: literal(cfg.get(k)) for k in ("seeds", "seed", "lr", "momentum", "batch_size",
                                          "init_std", "eval_every")}
    setup = [
        f"Network: 784-100-100-100-10, sigmoid hidden units; the BN network has bnlab "
        f"`BatchNorm1d` before each sigmoid and no hidden biases. {c['seeds']} seeds per "
        f"network from seed {c['seed']}; SGD lr {c['lr']}, momentum {c['momentum']}, batch "
        f"{c['batch_size']}, init N(0, {c['init_std']}^2), evaluation every {c['eval_every']} "
        f"steps, binarized input: {'yes' if cfg.get('binarize') is True else 'no'}.",
    ]
    if ds.get("note"):
        setup.append(literal(ds["note"]))
    return Summary(
        title="Figure 1 of Ioffe & Szegedy (2015): BN vs no BN on the MNIST sigmoid network",
        headline=headline,
        caveats=caveats,
        sections=[
            Section("Test accuracy", figures=[fig_a]),
            Section("Sigmoid input distributions", figures=[fig_bc]),
            Section("Claims", claims=s["claims"]),
            Section("Paper vs bnlab", tables=[table]),
        ],
        setup=setup,
    )


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
