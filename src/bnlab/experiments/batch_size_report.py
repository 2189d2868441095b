"""The batch-size study's analysis and report, from a run's ``config.json`` and
``metrics.jsonl`` only: the test error of every normalization at every batch size beside the
Group Normalization paper's, the figures and the verdicts.

Claims (Wu & He 2018, Figure 1 and section 4.1, unless said otherwise):

1. BN's error grows as the batch shrinks (23.6% at 32 images per GPU, 34.7% at 2);
2. GN's error does not depend on the batch size (24.1%, 24.2%, 24.0%, 24.2%, 24.1%);
3. LN's does not either (batch-independent by construction, section 3);
4. batch renormalization recovers part of BN's loss at small batches (BRN 26.3% against BN 27.3%
   at 4 per GPU; Ioffe 2017, Figure 2: 76.5% against 74.2% accuracy over sets of 4);
5. at the smallest batch GN is better than BN (24.1% against 34.7% at 2);
6. at 32, LN is worse than BN (by 1.7 points).

Rules, fixed before any run: a difference between two seed means counts when it exceeds both
``MIN_EFFECT`` (percentage points) and the seed spread of the two (the larger range over
seeds); "does not depend" means that the seed means over all batch sizes stay within that
same margin. With one seed there is no spread, and trainings of fewer than ``MIN_EXAMPLES``
examples (a smoke run) are too short to say anything: the claims are then not assessed.
"""

from __future__ import annotations

import math
from typing import Any

from ..report import plots
from ..report.content import Claim, Figure, Section, Summary, Table
from ..runs import RunFiles
from .small_batch_common import mean, seed_spread, tail_mean

__all__ = ["NORMS", "LABELS", "PAPER", "MIN_EFFECT", "summarize", "report"]

NORMS = ("bn", "brn", "ghost", "gn", "ln")
LABELS = {"bn": "BN", "brn": "Batch Renorm", "ghost": "Ghost BN", "gn": "GN", "ln": "LN"}
COLORS = {"bn": "#1f77b4", "brn": "#ff7f0e", "ghost": "#9467bd", "gn": "#2ca02c",
          "ln": "#8c564b", "bn-precise": "#17becf"}  # fmt: skip
#: Wu & He (2018), Figure 1 / section 4.1: ResNet-50 ImageNet validation error (%) by images per
#: GPU (8 GPUs, BN statistics per GPU); values marked in APPROX are read off the figure.
PAPER = {
    "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
}
APPROX = {("bn", 16), ("bn", 8), ("gn", 16), ("gn", 8)}
PAPER_BRN_AT_4 = 26.3  # Wu & He (2018), section 4.1 (rmax 1.5, dmax 0.5)
PAPER_LN_AT_32 = 1.7  # points worse than BN at 32, Wu & He (2018), section 4.1
#: Smallest difference (percentage points of test error) that counts, whatever the seed spread.
MIN_EFFECT = 1.0
#: Trainings shorter than this (examples seen) are smoke runs: the claims are not assessed.
MIN_EXAMPLES = 10_000


def _finals(rows: list[dict]) -> dict[tuple[str, int], dict[int, dict]]:
    """(norm, batch) -> seed -> the training's final row (the one holding test figures)."""
    out: dict[tuple[str, int], dict[int, dict]] = {}
    for r in rows:
        if r.get("test_acc") is None or r.get("norm") not in NORMS:
            continue
        try:
            key = (str(r["norm"]), int(r["batch"]))
            out.setdefault(key, {})[int(r["seed"])] = r
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _err(acc: Any) -> float:
    return 100.0 * (1.0 - float(acc)) if isinstance(acc, (int, float)) else float("nan")


def summarize(meta: dict, rows: list[dict]) -> dict[str, Any]:
    """Errors per (norm, batch) over seeds, diverged trainings, and the claims."""
    finals = _finals(rows)
    errors = {k: [_err(r["test_acc"]) for _, r in sorted(v.items())] for k, v in finals.items()}
    precise = {k: [_err(r["test_acc_precise"]) for _, r in sorted(v.items())
                   if r.get("test_acc_precise") is not None] for k, v in finals.items()
               if k[0] == "bn"}  # fmt: skip
    train_loss = {k: [tail_mean(rows, "train_loss", {"norm": k[0], "batch": k[1], "seed": sd})
                      for sd in sorted(v)] for k, v in finals.items()}  # fmt: skip
    diverged = sorted({(r.get("norm"), r.get("batch"), r.get("seed")) for r in rows
                       if r.get("diverged")}, key=str)  # fmt: skip
    sizes = sorted({b for _, b in errors})
    norms = [n for n in NORMS if any(k[0] == n for k in errors)]
    seeds = max((len(v) for v in errors.values()), default=0)
    return {"errors": errors, "precise": precise, "train_loss": train_loss, "sizes": sizes,
            "norms": norms, "seeds": seeds, "diverged": diverged,
            "claims": _claims(errors, sizes, seeds, (meta.get("config") or {}).get("examples"))}


def _margin(*groups: list[float]) -> float:
    noise = seed_spread(groups)
    return max(MIN_EFFECT, noise) if math.isfinite(noise) else float("nan")


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _claims(errors: dict, sizes: list[int], seeds: int, examples: Any) -> list[Claim]:
    """The six claims (module docstring). Each shows what was measured when the trainings it
    needs exist; its verdict is ``not assessed`` for a smoke run or a single seed."""

    def m(norm: str, b: int | None) -> float:
        return mean(errors.get((norm, b), []))

    def has(norm: str, *bs: int | None) -> bool:
        return all((norm, b) in errors for b in bs)

    small = sizes[0] if sizes else None
    ref = max([b for b in sizes if b <= 32] or sizes or [0])
    why_not = ""
    if not isinstance(examples, int) or examples < MIN_EXAMPLES:
        why_not = (f"trainings of {examples} examples: a smoke run (the claims need at least "
                   f"{MIN_EXAMPLES:,})")  # fmt: skip
    elif seeds < 2:
        why_not = "one seed: no seed spread to compare differences with"
    elif len(sizes) < 2:
        why_not = "fewer than two batch sizes"

    def claim(cid: str, text: str, paper: str, needs: bool, missing: str,
              measure) -> Claim:  # fmt: skip
        if not needs:
            return Claim.check(cid, text, "n/a", None, paper=paper, not_assessed=missing)
        measured, holds = measure()
        return Claim.check(cid, text, measured, holds, paper=paper, not_assessed=why_not)

    def bn_degrades():
        d = m("bn", small) - m("bn", ref)
        mg = _margin(errors[("bn", small)], errors[("bn", ref)])
        return (f"BN {_fmt(m('bn', ref))}% at {ref}, {_fmt(m('bn', small))}% at {small}: "
                f"{d:+.1f} points (margin {_fmt(mg)})", d > mg)  # fmt: skip

    def flat(norm: str):
        present = [b for b in sizes if (norm, b) in errors]
        means = [m(norm, b) for b in present]
        spread = max(means) - min(means)
        mg = _margin(*[errors[(norm, b)] for b in present])
        return (f"{_fmt(min(means))}%-{_fmt(max(means))}% over batches {present[0]}-"
                f"{present[-1]}: range {_fmt(spread)} points (margin {_fmt(mg)})",
                spread <= mg)  # fmt: skip

    def brn_recovers():
        gain = m("bn", small) - m("brn", small)
        loss = m("bn", small) - m("bn", ref)
        mg = _margin(errors[("bn", small)], errors[("brn", small)])
        frac = f"; {_fmt(100 * gain / loss, 0)}% of BN's loss from {ref}" if loss > 0 else ""
        return (f"BN {_fmt(m('bn', small))}%, BRN {_fmt(m('brn', small))}%: {gain:+.1f} points "
                f"in BRN's favour (margin {_fmt(mg)}){frac}", gain > mg)  # fmt: skip

    def gn_beats_bn():
        d = m("bn", small) - m("gn", small)
        mg = _margin(errors[("bn", small)], errors[("gn", small)])
        return (f"BN {_fmt(m('bn', small))}%, GN {_fmt(m('gn', small))}%: {d:+.1f} points in "
                f"GN's favour (margin {_fmt(mg)})", d > mg)  # fmt: skip

    def ln_worse():
        d = m("ln", ref) - m("bn", ref)
        mg = _margin(errors[("bn", ref)], errors[("ln", ref)])
        return (f"BN {_fmt(m('bn', ref))}%, LN {_fmt(m('ln', ref))}%: LN {d:+.1f} points "
                f"(margin {_fmt(mg)})", d > mg)  # fmt: skip

    two = len(sizes) >= 2
    return [
        claim("1", f"BN's test error grows as the batch shrinks ({ref} -> {small})",
              "ResNet-50 ImageNet: 23.6% at 32, 34.7% at 2 (+11.1)",
              two and has("bn", small, ref), "BN was not trained at two sizes", bn_degrades),
        claim("2", "GN's test error does not depend on the batch size",
              "24.0%-24.2% from 32 down to 2",
              two and sum((("gn", b) in errors) for b in sizes) >= 2,
              "GN was not trained at two sizes", lambda: flat("gn")),
        claim("3", "LN's test error does not depend on the batch size",
              "batch-independent by construction (section 3)",
              two and sum((("ln", b) in errors) for b in sizes) >= 2,
              "LN was not trained at two sizes", lambda: flat("ln")),
        claim("4", f"Batch Renorm recovers part of BN's loss at the smallest batch ({small})",
              "at 4 per GPU: BRN 26.3%, BN 27.3%, GN 24.2% (Wu & He); over sets of 4: BRN "
              "76.5%, BN 74.2% accuracy (Ioffe 2017, Fig. 2)",
              two and has("bn", small, ref) and has("brn", small), "BN or BRN missing",
              brn_recovers),
        claim("5", f"At the smallest batch ({small}) GN is better than BN",
              "at 2 per GPU: GN 24.1%, BN 34.7%", has("bn", small) and has("gn", small),
              "BN or GN missing", gn_beats_bn),
        claim("6", f"At batch {ref}, LN is worse than BN", f"LN +{PAPER_LN_AT_32} points at 32",
              has("bn", ref) and has("ln", ref), "BN or LN missing", ln_worse),
    ]  # fmt: skip


# ------------------------------------------------------------------------------ figures
def _series(values: dict, norm: str, sizes: list[int]):
    xs = [b for b in sizes if values.get((norm, b))]
    return xs, [values[(norm, b)] for b in xs]


def _band(ax, xs, groups, color, label, **kw):
    lo = [min(g) for g in groups]
    hi = [max(g) for g in groups]
    ax.plot(xs, [mean(g) for g in groups], "o-", color=color, label=label, **kw)
    if any(len(g) > 1 for g in groups):
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)


def _log2_axis(ax, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.minorticks_off()
    ax.invert_xaxis()  # as the paper: large batches on the left


def _figure_errors(s: dict, ghost_batch: Any, path) -> None:
    with plots.style():
        fig, (ax, axp) = plots.figure(2, width=12.0, height=4.6)
        for norm in s["norms"]:
            xs, groups = _series(s["errors"], norm, s["sizes"])
            label = LABELS[norm] + (f" (SGD batch {ghost_batch})" if norm == "ghost" else "")
            _band(ax, xs, groups, COLORS[norm], label)
        _log2_axis(ax, s["sizes"] or [2, 64])
        ax.set_xlabel("normalization batch size B (examples)")
        ax.set_ylabel("test error (%)")
        ax.set_title("This run: small CNN, Fashion-MNIST")
        ax.legend(loc="upper left", fontsize=9)
        for norm, label in (("bn", "BN"), ("gn", "GN")):
            xs = sorted(PAPER[norm], reverse=True)
            axp.plot(xs, [PAPER[norm][b] for b in xs], "s--", color=COLORS[norm], label=label)
            for b in xs:
                if (norm, b) in APPROX:
                    axp.plot([b], [PAPER[norm][b]], "s", color="white", ms=4)
        axp.plot([4], [PAPER_BRN_AT_4], "^", color=COLORS["brn"], ms=9, label="Batch Renorm")
        _log2_axis(axp, [2, 4, 8, 16, 32])
        axp.set_xlabel("images per GPU")
        axp.set_ylabel("validation error (%)")
        axp.set_title("Wu & He 2018, Fig. 1: ResNet-50, ImageNet")
        axp.legend(loc="upper left", fontsize=9)
        plots.save(fig, path)


def _figure_training(s: dict, path) -> None:
    with plots.style():
        fig, (ax, axb) = plots.figure(2, width=12.0, height=4.2)
        for norm in s["norms"]:
            xs, groups = _series(s["train_loss"], norm, s["sizes"])
            if xs:
                _band(ax, xs, groups, COLORS[norm], LABELS[norm])
        _log2_axis(ax, s["sizes"] or [2, 64])
        ax.set_xlabel("normalization batch size B")
        ax.set_ylabel("training loss at the end")
        ax.set_title("Training loss at the end (training-mode statistics)")
        ax.legend(fontsize=9)
        xs, groups = _series(s["errors"], "bn", s["sizes"])
        if xs:
            _band(axb, xs, groups, COLORS["bn"], "BN, moving averages")
        xs, groups = _series(s["precise"], "bn", s["sizes"])
        if xs:
            _band(axb, xs, groups, COLORS["bn-precise"], "BN, recomputed population statistics")
        _log2_axis(axb, s["sizes"] or [2, 64])
        axb.set_xlabel("normalization batch size B")
        axb.set_ylabel("test error (%)")
        axb.set_title("BN at inference: which population statistics")
        axb.legend(fontsize=9)
        plots.save(fig, path)


# ------------------------------------------------------------------------------ report
def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return _fmt(values[0], 2)
    return f"{_fmt(mean(values), 2)} ({_fmt(min(values), 1)}-{_fmt(max(values), 1)})"


def report(files: RunFiles) -> Summary:
    cfg = files.config
    s = summarize(files.meta, files.rows)
    sizes = s["sizes"]
    ghost_batch = cfg.get("ghost_batch", "?")
    figures = []
    if s["errors"]:
        _figure_errors(s, ghost_batch, files.path / "batch_size.png")
        _figure_training(s, files.path / "batch_size_training.png")
        figures = [
            Figure("batch_size.png", "Test error against the normalization batch size",
                   "Left, this run (mean over seeds, band: min-max); right, the Group Norm "
                   "paper. BN's curve should rise towards small batches while GN's and LN's "
                   "stay flat; Batch Renorm should lie between BN and GN at small batches. Open "
                   "squares: values read off the paper's figure."),
            Figure("batch_size_training.png", "Training loss, and BN's inference statistics",
                   "Left: does the small batch hurt training itself, or only inference? Right: "
                   "BN's test error with the moving averages kept in training against "
                   "population statistics recomputed after training (precise BN)."),
        ]  # fmt: skip
    header = ["normalization"] + [str(b) for b in sizes]
    rows = []
    for norm in s["norms"]:
        label = LABELS[norm] + (f" (SGD batch {ghost_batch})" if norm == "ghost" else "")
        rows.append([label] + [_cell(s["errors"].get((norm, b), [])) for b in sizes])
    if any(s["precise"].values()):
        rows.append(["BN, recomputed population statistics"]
                    + [_cell(s["precise"].get(("bn", b), [])) for b in sizes])  # fmt: skip
    for norm in ("bn", "gn"):
        rows.append([f"paper: {LABELS[norm]} (ResNet-50, ImageNet)"] + [
            ("~" if (norm, b) in APPROX else "") + _fmt(PAPER[norm][b]) if b in PAPER[norm]
            else "" for b in sizes])  # fmt: skip
    rows.append(["paper: Batch Renorm (ResNet-50, ImageNet)"]
                + [_fmt(PAPER_BRN_AT_4) if b == 4 else "" for b in sizes])  # fmt: skip
    table = Table(
        "Test error (%) by normalization batch size",
        header, rows,
        note="This run: mean over seeds (min-max over seeds). Paper: Wu & He 2018, Figure 1 and "
        "section 4.1, ResNet-50 ImageNet validation error with 8 GPUs (batch = images per GPU; "
        "~: read off the figure). Ghost BN: ghost batches of B inside SGD batches of "
        f"{ghost_batch}; at B >= {ghost_batch} it is BN.",
    )
    trainings = files.meta.get("trainings") or {}
    time_rows = []
    for norm in s["norms"]:
        cells = []
        for b in sizes:
            secs = [t.get("seconds") for k, t in trainings.items() if isinstance(t, dict)
                    and k.startswith(f"{norm}-b{b}-") and isinstance(t.get("seconds"),
                                                                     (int, float))]  # fmt: skip
            cells.append(_fmt(mean(secs), 0) if secs else "")
        time_rows.append([LABELS[norm]] + cells)
    time_table = Table("Wall time per training (s)", header, time_rows,
                       note="One process and one thread per training, two trainings side by "
                       "side; from config.json.")  # fmt: skip
    text = _observations(s, ghost_batch)
    claims = s["claims"]
    verdicts = [c.verdict for c in claims]
    small = sizes[0] if sizes else None
    headline = []
    if small is not None:
        headline.append(f"Test error at B = {small}: " + ", ".join(
            f"{LABELS[n]} {_fmt(mean(s['errors'].get((n, small), [])))}%" for n in s["norms"]
            if s["errors"].get((n, small))) + " (paper, ImageNet at 2: BN 34.7%, GN 24.1%)")
    headline.append("Claims: " + ", ".join(f"{verdicts.count(v)} {v}"
                                           for v in ("holds", "fails", "not assessed")))
    examples = cfg.get("examples")
    caveats = [
        "CPU scale: a 3-convolution CNN on Fashion-MNIST, each training seeing "
        f"{examples:,} examples" if isinstance(examples, int) else "CPU scale",
    ]
    if isinstance(examples, int) and s["sizes"]:
        caveats[0] += (f" ({examples / 60000:.2g} epochs of Fashion-MNIST; the paper: 100 epochs "
                       "of ImageNet with ResNet-50). The errors are not comparable with the "
                       "paper's, only the shapes of the curves.")  # fmt: skip
    if s["diverged"]:
        caveats.append("Diverged trainings (not in the means): " + ", ".join(
            f"{n} B={b} seed {sd}" for n, b, sd in s["diverged"]))  # fmt: skip
    if (cfg.get("nproc") or 1) > 1:
        caveats.append(
            f"Each training ran on {cfg['nproc']} processes; BN "
            + ("synchronized over them (SyncBatchNorm)." if cfg.get("sync_bn", True) else
               f"per process: statistics over B / {cfg['nproc']} examples."))  # fmt: skip
    setup = [
        "Network: SmallCNN (three 3x3 convolutions of widths "
        f"{cfg.get('widths', '?')}, each followed by the normalization and a ReLU, 2x2 max "
        "pooling after the first two, global average pooling, linear classifier).",
        f"SGD with momentum {cfg.get('momentum', '?')}, learning rate {cfg.get('lr', '?')} x "
        f"(SGD batch / {cfg.get('lr_batch', '?')}), cosine decay to 0; weight decay "
        f"{cfg.get('weight_decay', '?')}. Batch renorm: rmax 3, dmax 5 with the paper's "
        "schedule scaled to each training's steps (bnlab.renorm_schedule).",
    ]
    return Summary(
        title="Batch size: BN, Batch Renorm, Ghost BN, GN and LN from 64 examples down to 2",
        headline=headline, caveats=caveats, setup=setup,
        sections=[
            Section("Test error against the batch size", figures=figures, text=text,
                    tables=[table]),
            Section("Claims", claims=claims),
            Section("Cost", tables=[time_table]),
        ],
    )


def _observations(s: dict, ghost_batch: Any) -> list[str]:
    """Measured comparisons the claims do not cover (no verdicts)."""
    out = []
    sizes = s["sizes"]
    if not sizes:
        return ["No training has finished yet."]
    small = sizes[0]
    e = s["errors"]
    if e.get(("ghost", small)) and e.get(("bn", small)):
        ghost, bn_small = mean(e[("ghost", small)]), mean(e[("bn", small)])
        line = (f"Ghost BN at {small} normalizes over {small} examples like BN at {small}, but "
                f"takes SGD steps of {ghost_batch} examples: its error is {_fmt(ghost)}% against "
                f"BN's {_fmt(bn_small)}% at {small}")  # fmt: skip
        if e.get(("bn", ghost_batch)):
            bn_big = mean(e[("bn", ghost_batch)])
            nearer = (f"normalization batch ({small})" if abs(ghost - bn_small)
                      < abs(ghost - bn_big) else f"SGD batch ({ghost_batch})")  # fmt: skip
            line += (f" and {_fmt(bn_big)}% at {ghost_batch}, nearer to BN with the same "
                     f"{nearer}")  # fmt: skip
        out.append(line + ".")
    if s["precise"].get(("bn", small)) and e.get(("bn", small)):
        out.append(
            f"BN at {small} with population statistics recomputed after training (precise BN): "
            f"{_fmt(mean(s['precise'][('bn', small)]))}% against "
            f"{_fmt(mean(e[('bn', small)]))}% with the moving averages kept in training.")
    return out
