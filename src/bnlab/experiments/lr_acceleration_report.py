"""The Figures 2-3 experiment's analysis and report, from a run's ``config.json`` and
``metrics.jsonl`` only.

Measures (Ioffe & Szegedy 2015, section 4.2.2, Figure 3): the *target* is the baseline's best
test accuracy (the maximum over evaluations of its seed-mean curve), reached at the baseline's
own step ``S``; for every variant, the first evaluation step at which its seed-mean test accuracy
reaches the target, as a fraction of ``S`` (the paper's 13.3/31.0, 2.1/31.0, 2.7/31.0), and its
best accuracy. A training that diverged counts as chance (1 / classes) from the step it diverged
on, since its parameters no longer classify anything.

Claims (the paper's section 4.2.2 and its words on the controls):

(a) BN-Baseline reaches the baseline's best in fewer steps than the baseline;
(b) BN-x5 reaches it in at most a fifth of the baseline's steps;
(c) BN-x30 trains without diverging and ends at least as high as BN-x5 (within the test set's
    sampling error);
(d) Baseline-x5 diverges, or ends clearly below BN-x5 (by :data:`CLEARLY_BELOW` or more);
(e) BN-x5-Sigmoid trains well above chance while Baseline-Sigmoid does not (or does far worse).

A run shorter than :data:`MIN_STEPS` (a smoke run) reports them as not assessed; so are claims
whose variants were not trained, and (a)-(b) when the baseline never got well above chance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..report import plots
from ..report.content import Claim, Figure, Section, Summary, Table, code, literal
from ..runs import RunFiles

__all__ = ["ORDER", "LABELS", "PAPER", "MIN_STEPS", "CLEARLY_BELOW", "variant_curve",
           "first_reach", "summarize", "sweep_summary", "report"]

ORDER = ("baseline", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid", "baseline-x5",
         "baseline-sigmoid")
LABELS = {
    "baseline": "Baseline", "bn-baseline": "BN-Baseline", "bn-x5": "BN-x5", "bn-x30": "BN-x30",
    "bn-x5-sigmoid": "BN-x5-Sigmoid", "baseline-x5": "Baseline-x5",
    "baseline-sigmoid": "Baseline-Sigmoid",
}  # fmt: skip
_STYLE = {  # colour, line style
    "baseline": ("#d62728", "-"), "bn-baseline": ("#1f77b4", "-"), "bn-x5": ("#2ca02c", "-"),
    "bn-x30": ("#9467bd", "-"), "bn-x5-sigmoid": ("#ff7f0e", "-"),
    "baseline-x5": ("#8c564b", "--"), "baseline-sigmoid": ("#7f7f7f", "--"),
}  # fmt: skip

#: Ioffe & Szegedy (2015), section 4.2.2 and Figure 3 (ImageNet, single-crop top-1): steps to
#: reach the Inception baseline's 72.2% (None: never) and the best accuracy; for the controls,
#: what the text says.
PAPER: dict[str, dict[str, Any]] = {
    "baseline": {"steps": 31.0e6, "best": 0.722, "setup": "Inception, lr 0.0015"},
    "bn-baseline": {"steps": 13.3e6, "best": 0.727, "setup": "+ BN before each nonlinearity"},
    "bn-x5": {"steps": 2.1e6, "best": 0.730, "setup": "+ section 4.2.1 changes, lr x5"},
    "bn-x30": {"steps": 2.7e6, "best": 0.748, "setup": "as BN-x5, lr x30"},
    "bn-x5-sigmoid": {"steps": None, "best": 0.698, "setup": "as BN-x5, sigmoid units"},
    "baseline-x5": {"text": "parameters reached machine infinity",
                    "setup": "Inception at BN-x5's lr (in the text)"},
    "baseline-sigmoid": {"text": "stayed at chance (1/1000)",
                         "setup": "Inception with sigmoids (in the text)"},
}
#: Fewer steps than this and the claims are not assessed (a smoke run).
MIN_STEPS = 1000
#: Claim (d): "clearly below" BN-x5 means at least this much lower final accuracy.
CLEARLY_BELOW = 0.02
#: Claim (e): "far worse" means a best accuracy at least this much lower.
FAR_WORSE = 0.10


def _well_above(chance: float) -> float:
    """'Well above chance': at least half-way from chance to 1 (0.55 for 10 classes)."""
    return chance + 0.5 * (1.0 - chance)


def _at_chance(chance: float) -> float:
    """'At chance': a best accuracy at most this (chance + 0.05)."""
    return chance + 0.05


# ------------------------------------------------------------------------------------ analysis
def _main_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("phase") == "main"]


def eval_grid(rows: list[dict]) -> list[int]:
    """Every evaluation step of the variants' trainings (the common grid)."""
    return sorted({r["step"] for r in _main_rows(rows)
                   if not r.get("diverged") and r.get("test_acc") is not None})


def variant_curve(rows: list[dict], variant: str, grid: list[int], chance: float
                  ) -> tuple[list[int], np.ndarray, dict[int, int]]:
    """Steps, test accuracy ``(E, K)`` (seeds in order) and ``{seed: divergence step}`` of one
    variant on the evaluation ``grid``. A diverged seed counts as ``chance`` at every step from
    its divergence on; a step some other seed has not reached yet is left out."""
    sel = [r for r in _main_rows(rows) if r.get("variant") == variant]
    seeds = sorted({r["seed"] for r in sel})
    acc = {(r["seed"], r["step"]): r["test_acc"] for r in sel
           if not r.get("diverged") and r.get("test_acc") is not None}
    diverged = {r["seed"]: r["step"] for r in sel if r.get("diverged")}
    steps, values = [], []
    for s in grid:
        col = []
        for seed in seeds:
            if seed in diverged and s >= diverged[seed]:
                col.append(chance)
            elif (seed, s) in acc:
                col.append(acc[(seed, s)])
            else:
                break
        else:
            if seeds:
                steps.append(s)
                values.append(col)
    return steps, np.asarray(values, dtype=float).reshape(len(steps), len(seeds)), diverged


def first_reach(steps: list[int], mean: np.ndarray, target: float) -> int | None:
    """The first step whose value reaches ``target`` (None: never)."""
    for s, v in zip(steps, mean, strict=True):
        if v >= target - 1e-12:
            return s
    return None


def sweep_summary(rows: list[dict]) -> list[dict]:
    """The base-rate sweep: per rate, its validation-accuracy curve, best, final and status."""
    out = []
    for lr in sorted({r["sweep_lr"] for r in rows if r.get("phase") == "sweep"}):
        sel = [r for r in rows if r.get("phase") == "sweep" and r.get("sweep_lr") == lr]
        ev = sorted((r for r in sel if r.get("val_acc") is not None), key=lambda r: r["step"])
        div = next((r for r in sel if r.get("diverged")), None)
        out.append({
            "lr": lr, "steps": [r["step"] for r in ev], "val_acc": [r["val_acc"] for r in ev],
            "best": max((r["val_acc"] for r in ev), default=None),
            "final": ev[-1]["val_acc"] if ev and div is None else None,
            "diverged_at": div["step"] if div else None,
        })  # fmt: skip
    return out


def summarize(meta: dict, rows: list[dict], min_steps: int = MIN_STEPS) -> dict[str, Any]:
    """Every number and claim of a run (from its files only): per variant its curve, best,
    final, divergences and steps to the target; the claims (a)-(e)."""
    ds = meta.get("dataset") or {}
    chance = 1.0 / int(ds.get("num_classes") or 10)
    n_test = int(ds.get("test") or 10_000)
    grid = eval_grid(rows)
    total = grid[-1] if grid else 0
    var: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        steps, acc, div = variant_curve(rows, name, grid, chance)
        if not steps:
            continue
        mean = acc.mean(1)
        trained = [i for i, s in enumerate(steps) if s > 0] or list(range(len(steps)))
        i_best = max(trained, key=lambda i: (mean[i], -i))
        var[name] = {
            "steps": steps, "acc": acc, "mean": mean, "seeds": acc.shape[1], "diverged": div,
            "best": float(mean[i_best]), "best_step": steps[i_best],
            "final": float(mean[-1]), "final_step": steps[-1],
        }  # fmt: skip
    base = var.get("baseline")
    target = base["best"] if base else None
    base_steps = base["best_step"] if base else None
    for v in var.values():
        v["reach"] = (first_reach([s for s in v["steps"] if s > 0],
                                  v["mean"][[i for i, s in enumerate(v["steps"]) if s > 0]],
                                  target) if target is not None else None)
        v["fraction"] = (v["reach"] / base_steps
                         if v["reach"] is not None and base_steps else None)
    claims = _claims(var, chance, n_test, total, min_steps)
    return {"variants": var, "target": target, "baseline_steps": base_steps, "chance": chance,
            "total_steps": total, "claims": claims, "n_test": n_test,
            "sweep": sweep_summary(rows)}


def _fmt_reach(v: dict | None, label: str) -> str:
    if v is None:
        return f"{label} was not trained"
    if v["reach"] is None:
        return f"{label} never reaches it (best {v['best']:.4f})"
    return (f"{label} first reaches it at step {v['reach']:,} ({v['fraction']:.2f} of the "
            f"baseline's steps)")


def _div_text(v: dict) -> str:
    d = v["diverged"]
    if not d:
        return f"0 of {v['seeds']} seeds diverged"
    at = ", ".join(f"{s:,}" for s in sorted(d.values()))
    return f"{len(d)} of {v['seeds']} seeds diverged (at step {at})"


def _claims(var: dict, chance: float, n_test: int, total: int, min_steps: int) -> list[Claim]:
    short = ("no variant has been evaluated yet (the run stopped during the sweep)" if not var
             else f"the run has {total:,} steps; under {min_steps:,} (a smoke run) the curves "
             "say nothing about the claims" if total < min_steps else "")
    base = var.get("baseline")

    def missing(*names: str) -> str:
        gone = [LABELS[n] for n in names if n not in var]
        return f"{', '.join(gone)} not trained in this run" if gone else ""

    untrained = (f"the baseline never got well above chance (best {base['best']:.3f} < "
                 f"{_well_above(chance):.2f}), so reaching its best says nothing"
                 if base and base["best"] < _well_above(chance) else "")
    head = (f"baseline best {base['best']:.4f} (seed mean) at step {base['best_step']:,}; "
            if base else "")
    out = []

    # (a)
    bnb = var.get("bn-baseline")
    why = short or missing("baseline", "bn-baseline") or untrained
    out.append(_claim(
        "a", "BN-Baseline reaches the baseline's best accuracy in fewer steps than the baseline",
        head + _fmt_reach(bnb, "BN-Baseline"),
        None if why else bnb["reach"] is not None and bnb["reach"] < base["best_step"],
        why, "13.3M vs 31.0M steps (0.43)",
        "At this scale BN-Baseline does not reach the baseline's best sooner."))
    # (b)
    x5 = var.get("bn-x5")
    why = short or missing("baseline", "bn-x5") or untrained
    out.append(_claim(
        "b", "BN-x5 reaches the baseline's best in at most a fifth of the baseline's steps",
        head + _fmt_reach(x5, "BN-x5"),
        None if why else x5["reach"] is not None and x5["reach"] <= base["best_step"] / 5,
        why, "2.1M vs 31.0M steps (0.068: 14x fewer)",
        "At this scale BN-x5 does not reach the baseline's best within a fifth of its steps."))
    # (c)
    x30 = var.get("bn-x30")
    why = short or missing("bn-x5", "bn-x30")
    if not why:
        tol = math.sqrt(max(x5["final"] * (1 - x5["final"]), 1e-12) / n_test)
        measured = (f"BN-x30: {_div_text(x30)}, final {x30['final']:.4f}; BN-x5 final "
                    f"{x5['final']:.4f} (tolerance {tol:.4f}: one standard error of an accuracy "
                    f"on {n_test:,} test images)")
        holds = not x30["diverged"] and x30["final"] >= x5["final"] - tol
    else:
        measured, holds = "", None
    out.append(_claim(
        "c", "BN-x30 trains without diverging and ends at least as high as BN-x5",
        measured, holds, why, "best 74.8% vs 73.0%; no divergence reported",
        "At this scale BN-x30 " + ("diverges." if x30 and x30["diverged"]
                                   else "ends below BN-x5.")))
    # (d)
    bx5 = var.get("baseline-x5")
    why = short or missing("bn-x5", "baseline-x5")
    if not why:
        all_div = len(bx5["diverged"]) == bx5["seeds"]
        measured = (f"Baseline-x5: {_div_text(bx5)}, final {bx5['final']:.4f} (diverged seeds "
                    f"at chance); BN-x5 final {x5['final']:.4f}; clearly below means by "
                    f"{CLEARLY_BELOW} or more")
        holds = all_div or bx5["final"] <= x5["final"] - CLEARLY_BELOW
    else:
        measured, holds = "", None
    out.append(_claim(
        "d", "Baseline-x5 (no BN at BN-x5's learning rate) diverges or ends clearly below BN-x5",
        measured, holds, why, "'the model parameters reached machine infinity'",
        "At this scale the network without BN trains at BN-x5's rate about as well as BN-x5."))
    # (e)
    sig, bsig = var.get("bn-x5-sigmoid"), var.get("baseline-sigmoid")
    why = short or missing("bn-x5-sigmoid", "baseline-sigmoid")
    if not why:
        well, flat = _well_above(chance), _at_chance(chance)
        measured = (f"best BN-x5-Sigmoid {sig['best']:.4f}, Baseline-Sigmoid {bsig['best']:.4f} "
                    f"(chance {chance:.2f}; well above: >= {well:.2f}; at chance: <= {flat:.2f}; "
                    f"far worse: {FAR_WORSE} or more below)")
        holds = sig["best"] >= well and (bsig["best"] <= flat
                                         or bsig["best"] <= sig["best"] - FAR_WORSE)
    else:
        measured, holds = "", None
    out.append(_claim(
        "e", "BN-x5-Sigmoid trains well above chance while Baseline-Sigmoid does not (or does "
        "far worse)", measured, holds, why, "69.8% vs chance (1/1000)",
        "At this scale the sigmoid network " + (
            "with BN does not get well above chance." if sig and sig["best"] < _well_above(chance)
            else "without BN trains nearly as well as with it.")))
    return out


def _claim(cid: str, text: str, measured: str, holds: bool | None, why: str, paper: str,
           fails_note: str) -> Claim:
    c = Claim.check(cid, text, measured or "nothing to measure", holds, not_assessed=why,
                    paper=paper)
    if c.verdict == "fails":
        c.note = fails_note + " The scaled-down setting does not support this claim."
    return c


# ------------------------------------------------------------------------------------ figures
def _figure2(s: dict, path) -> None:
    var, target = s["variants"], s["target"]
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=4.6)
        handles = []
        for ax in axes:
            for name in ORDER:
                if name not in var:
                    continue
                v = var[name]
                color, ls = _STYLE[name]
                line = plots.band(ax, v["steps"], v["acc"], color, LABELS[name], ls=ls, lw=1.8)
                for seed_step in v["diverged"].values():
                    ax.plot([seed_step], [s["chance"]], "x", color=color, ms=9, mew=2.2)
                if ax is axes[0]:
                    handles.append(line)
            ax.set_xlabel("training step")
            ax.set_xlim(0, s["total_steps"])
        axes[0].set_ylim(0, 1)
        axes[0].axhline(s["chance"], color="#999", lw=0.8, ls=":")
        axes[0].set_ylabel("test accuracy")
        axes[0].set_title("All variants (x: a seed diverged)")
        if target is not None:
            lo = max(target - 0.12, s["chance"])
            axes[1].set_ylim(lo, min(1.0, max(v["best"] for v in var.values()) + 0.02))
            axes[1].axhline(target, color="#d62728", lw=1.0, ls=":")
            axes[1].text(s["total_steps"], target, "baseline's best", ha="right", va="bottom",
                         fontsize=9, color="#d62728")
            for name in ORDER:
                v = var.get(name)
                if v and v["reach"] is not None:
                    axes[1].plot([v["reach"]], [target], "o", color=_STYLE[name][0], ms=7,
                                 zorder=5)
            axes[1].set_title("Top of the range (dots: first reach of the baseline's best)")
        fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.11, 1, 1))  # room for the legend below the panels
        fig.savefig(path, dpi=110)
        plots.plt.close(fig)


def _figure_sweep(sweep: list[dict], chosen: float | None, path) -> None:
    with plots.style():
        fig, axes = plots.figure(2, width=11, height=3.8)
        cmap = plots.plt.get_cmap("viridis")
        for i, sw in enumerate(sweep):
            color = cmap(i / max(len(sweep) - 1, 1))
            label = f"lr {sw['lr']:g}" + (" (chosen)" if sw["lr"] == chosen else "")
            axes[0].plot(sw["steps"], sw["val_acc"], color=color, lw=2.4 if sw["lr"] == chosen
                         else 1.4, label=label)
        late = [a for sw in sweep for s, a in zip(sw["steps"], sw["val_acc"], strict=True)
                if s >= 0.2 * max(sw["steps"] or [0])]
        if late:  # the part of the curves that decides the choice
            axes[0].set_ylim(max(0.0, min(late) - 0.02), min(1.0, max(late) + 0.01))
        axes[0].set_xlabel("training step")
        axes[0].set_ylabel("validation accuracy")
        axes[0].set_title("Baseline at each rate of the sweep")
        axes[0].legend(fontsize=9, loc="lower right")
        lrs = [sw["lr"] for sw in sweep if sw["best"] is not None]
        axes[1].plot(lrs, [sw["best"] for sw in sweep if sw["best"] is not None], "o-",
                     color="#d62728")
        for sw in sweep:
            if sw["diverged_at"] is not None:
                axes[1].plot([sw["lr"]], [axes[1].get_ylim()[0]], "x", color="k", ms=9)
        if chosen is not None:
            axes[1].axvline(chosen, color="#555", ls=":", lw=1)
        axes[1].set_xscale("log")
        axes[1].set_xticks(lrs, [f"{x:g}" for x in lrs])
        axes[1].minorticks_off()
        axes[1].set_xlabel("learning rate")
        axes[1].set_ylabel("best validation accuracy")
        axes[1].set_title("Best validation accuracy against the rate")
        plots.save(fig, path)


# ------------------------------------------------------------------------------------ report
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _paper_steps(name: str) -> str:
    p = PAPER[name]
    if "text" in p:
        return p["text"]
    if p["steps"] is None:
        return "never"
    return f"{p['steps'] / 1e6:.1f}M ({p['steps'] / PAPER['baseline']['steps']:.3f})"


def _ours_steps(v: dict | None) -> str:
    if v is None:
        return "not trained"
    if v["reach"] is None:
        return "never"
    return f"{v['reach']:,} ({v['fraction']:.3f})"


def report(files: RunFiles) -> Summary:
    """The Figures 2-3 report of a run (figures written into the run directory)."""
    meta, rows, cfg = files.meta, files.rows, files.config
    s = summarize(meta, rows)
    var = s["variants"]
    ds = meta.get("dataset") or {}
    choice = meta.get("base_lr") or {}
    base_lr = choice.get("base_lr") or cfg.get("base_lr") or None  # None: not chosen yet

    figs = []
    if var:
        _figure2(s, files.path / "figure2.png")
        figs.append(Figure(
            "figure2.png", "Figure 2: test accuracy against training steps (seed mean; band: "
            "min-max over seeds)",
            "Look for the BN variants (solid) reaching the baseline's best (red dotted line, "
            "right) long before the baseline (red) does, BN-x5 and BN-x30 first; the sigmoid "
            "network training with BN (orange) and not without it (grey dashed); Baseline-x5 "
            "(brown dashed) diverging or lagging.",
        ))  # fmt: skip

    table_rows = []
    for name in ORDER:
        v = var.get(name)
        p = PAPER[name]
        lr = _start_lr(rows, name)
        table_rows.append([
            LABELS[name], p["setup"], _paper_steps(name), _ours_steps(v),
            _pct(p.get("best")), "n/a" if v is None else f"{v['best']:.4f}",
            "n/a" if v is None else f"{v['final']:.4f}", "n/a" if lr is None else f"{lr:g}",
            "n/a" if v is None else (_div_text(v) if v["diverged"] else "none"),
        ])  # fmt: skip
    target = s["target"]
    fig3 = Table(
        "Figure 3 beside bnlab: steps to reach the baseline's best accuracy (fraction of the "
        "baseline's steps) and best accuracy",
        ["variant", "paper setup", "paper: steps to 72.2%", "bnlab: steps to the baseline's "
         "best" + (f" ({target:.4f})" if target is not None else ""),
         "paper: best", "bnlab: best", "bnlab: final", "bnlab: lr", "bnlab: diverged"],
        table_rows,
        "Paper: Ioffe & Szegedy (2015), section 4.2.2 and Figure 3 (ImageNet, single-crop "
        "top-1; the controls from the text). bnlab: seed means of test accuracy, evaluated "
        f"every {literal(cfg.get('eval_every', '?'))} steps, so a step count is the first "
        "evaluation at or above the target; a diverged seed counts as chance from its "
        "divergence on.",
    )

    per_seed = []
    for name in ORDER:
        v = var.get(name)
        if v is None:
            continue
        seeds = sorted({r["seed"] for r in rows if r.get("phase") == "main"
                        and r.get("variant") == name})
        for k, seed in enumerate(seeds):
            col = v["acc"][:, k]
            trained = col[1:] if len(col) > 1 else col
            d = v["diverged"].get(seed)
            per_seed.append([LABELS[name], str(seed), "diverged" if d is not None else "finished",
                             "n/a" if d is None else f"{d:,}", f"{float(trained.max()):.4f}",
                             f"{float(col[-1]):.4f}"])
    seeds_table = Table("Every training", ["variant", "seed", "status", "diverged at step",
                                           "best test accuracy", "final test accuracy"],
                        per_seed, "A diverged training counts as chance from its divergence on.")

    fig2 = Section("Figure 2: accuracy against steps", figures=figs)
    if not var:
        fig2.text.append("No variant has been evaluated yet.")
    sections = [fig2,
                Section("Figure 3: steps to the baseline's best", tables=[fig3]),
                Section("Claims", claims=s["claims"])]

    sweep_sec = Section("The baseline's learning rate")
    if s["sweep"]:
        _figure_sweep(s["sweep"], base_lr, files.path / "sweep.png")
        sweep_sec.figures.append(Figure(
            "sweep.png", "The base learning rate: the baseline trained at each rate of the sweep",
            "Look for a peak inside the grid: the chosen rate (dotted) should beat its "
            "neighbours on both sides, or the baseline may be under-tuned."))
        added = choice.get("added") or []
        n_sweep = choice.get("sweep_steps")
        sweep_sec.tables.append(Table(
            "Sweep (baseline, seed {}, {} steps, trained on the training set minus {} "
            "validation images)".format(literal(cfg.get("seed", "?")),
                                        f"{n_sweep:,}" if n_sweep else "?",
                                        literal(ds.get("val", "?"))),
            ["learning rate", "best validation accuracy", "final validation accuracy", "status"],
            [[f"{sw['lr']:g}" + (" (chosen)" if sw["lr"] == base_lr else "")
              + (" (added)" if sw["lr"] in added else ""),
              "n/a" if sw["best"] is None else f"{sw['best']:.4f}",
              "n/a" if sw["final"] is None else f"{sw['final']:.4f}",
              _sweep_status(sw, n_sweep or max(max(x["steps"] or [0]) for x in s["sweep"]))]
             for sw in s["sweep"]],
        ))  # fmt: skip
        grown = (f" The grid began as {code(cfg.get('sweep_lrs'))}; the best rate lay at its edge, "
                 f"so {', '.join(f'{x:g}' for x in added)} were added beyond it."
                 if added else "")
        sweep_sec.text.append(
            f"The base rate is the sweep's best by validation accuracy: **{base_lr:g}**.{grown} "
            "Each sweep training runs a shorter version of the baseline's training (the same "
            "learning-rate decay over its steps). Every variant's rate is a multiple of the base "
            "rate (Figure 3 table); the variants train on the whole training set and are "
            "measured on the test set, which the choice never saw."
            if isinstance(base_lr, (int, float)) else "The sweep did not finish; no base rate.")
    else:
        sweep_sec.text.append(
            f"The base rate was given (`--base-lr {base_lr:g}`), not chosen by a sweep in this run."
            if isinstance(base_lr, (int, float)) and base_lr else "No base rate was chosen.")
    sections += [sweep_sec, Section("Every training", tables=[seeds_table])]

    caveats = []
    if ds.get("name") and ds.get("name") != "synthetic":
        ep = (cfg.get("steps", 0) * cfg.get("batch_size", 0)) / max(int(ds.get("train") or 1), 1)
        caveats.append(
            f"**Scale**: {literal(ds['name'])} ({ds.get('train', 0):,} training images of "
            f"{literal('x'.join(map(str, ds.get('image', []))))}, "
            f"{literal(ds.get('num_classes', 10))} classes), "
            f"a {_params_text(meta)} network and {cfg.get('steps', 0):,} steps (about "
            f"{ep:.2g} epochs) per training, against the paper's ImageNet (1.28M images, 1,000 "
            "classes), its 13.6M-parameter Inception and 31M steps for the baseline. Compare "
            "the ordering and the ratios with the paper's, not the accuracies.")
    elif ds.get("name") == "synthetic":
        caveats.append("**Synthetic data** (seeded Gaussian blobs): a test of the machinery, "
                       "not of the paper's claims.")
    if choice.get("edge"):
        caveats.append(
            f"**The base rate lies at the {literal(choice['edge'])} edge of the sweep** "
            f"({base_lr:g}): a rate beyond the grid might suit the baseline better; rerun "
            "with a wider `--sweep-lrs`.")
    headline = _headline(s)
    # values from config.json go into the text as literals (never read as markup)
    c = {k: literal(cfg.get(k)) for k in ("width", "momentum", "batch_size", "lr_decay",
                                          "weight_decay", "dropout", "seeds", "seed",
                                          "eval_every")}
    setup = [
        f"Network: SmallInception (bnlab.models), width {c['width']}, "
        f"{_params_text(meta)}; BN variants use norm {code(cfg.get('norm'))} before every "
        "nonlinearity, per feature map, without conv biases.",
        f"SGD with momentum {c['momentum']}, batch {c['batch_size']}, "
        f"{cfg.get('steps', 0):,} steps, learning rate decaying exponentially by "
        f"{c['lr_decay']} over the run (x{cfg.get('lr_decay', 0) ** 6:.2g} with the "
        f"section 4.2.1 changes: 6x faster); weight decay {c['weight_decay']} (/5 with "
        f"the changes); dropout {c['dropout']} (none with the changes). Inputs "
        "standardized per channel with the training set's statistics; no augmentation.",
        f"{c['seeds']} seeds per variant from seed {c['seed']}; test accuracy on "
        f"{literal(ds.get('test', '?'))} test images every {c['eval_every']} steps, BN in "
        "inference mode (population statistics).",
    ]
    timing = meta.get("timing") or {}
    phases = {k.removesuffix("_s"): v for k, v in timing.items() if k.endswith("_s")}
    if phases:
        fits = (meta.get("fits") or {}).values()
        cpu = sum(f.get("cpu_seconds") or 0 for f in fits)
        load = [meta.get("load_average_start"), timing.get("load_average_end")]
        setup.append(
            "Wall time of the phases: " + ", ".join(f"{k} {v:,.0f} s" for k, v in phases.items())
            + f"; CPU time of all trainings {cpu:,.0f} s"
            + (f"; 1-minute load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the "
               "end" if all(isinstance(x, list) and x for x in load) else "") + ".")
    return Summary(
        title="Figures 2-3 of Ioffe & Szegedy (2015): learning-rate acceleration with BN",
        headline=headline, caveats=caveats, sections=sections, setup=setup,
    )


def _sweep_status(sw: dict, steps: int) -> str:
    if sw["diverged_at"] is not None:
        return f"diverged at step {sw['diverged_at']:,}"
    last = max(sw["steps"] or [0])
    return "finished" if last >= steps else f"stopped at step {last:,}"


def _start_lr(rows: list[dict], variant: str) -> float | None:
    """A variant's initial learning rate, from its step-0 rows."""
    lrs = {r["lr"] for r in rows if r.get("phase") == "main" and r.get("variant") == variant
           and r.get("step") == 0 and r.get("lr") is not None}
    return lrs.pop() if len(lrs) == 1 else None


def _params_text(meta: dict) -> str:
    n = meta.get("params")
    return f"{n / 1e6:.2f}M-parameter" if isinstance(n, (int, float)) else "small"


def _headline(s: dict) -> list[str]:
    var, out = s["variants"], []
    base, x5 = var.get("baseline"), var.get("bn-x5")
    if base:
        line = (f"The baseline's best test accuracy is **{base['best']:.4f}** at step "
                f"{base['best_step']:,}.")
        if x5 and x5["reach"] is not None and x5["reach"] > 0:
            ratio = base["best_step"] / x5["reach"]
            line += (f" BN-x5 reaches it at step {x5['reach']:,}: **{ratio:.1f}x fewer steps** "
                     "(paper: 14x).")
        elif x5:
            line += " BN-x5 never reaches it."
        out.append(line)
    verdicts = [c.verdict for c in s["claims"]]
    out.append("Claims: " + ", ".join(f"{verdicts.count(v)} {v}" for v in
                                      ("holds", "fails", "not assessed") if verdicts.count(v))
               + ".")
    return out
