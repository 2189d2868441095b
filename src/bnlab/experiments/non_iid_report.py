"""The non-i.i.d. study's analysis and report, from a run's files only: test accuracies of
every variant beside the Batch Renormalization paper's (Ioffe 2017, section 4.3: Inception-v3,
ImageNet, mini-batches of 16 labels x 2 images; the numbers are from a secondary source, see
docs/small-batches.md), a figure and the verdicts.

Claims:

1. non-i.i.d. batches hurt BN at inference (BN on i.i.d. batches of 32: 78.3%; on the
   non-i.i.d. ones: 72.8%);
2. evaluating that BN network with test-batch statistics recovers part of it (76.5%);
3. batch renormalization trained on the non-i.i.d. batches beats BN trained on them (78.5%);
4. and closes at least half of the gap to BN on i.i.d. batches (the paper: all of it);
5. ghost BN over half-batches beats BN (77.4%).

Rule, fixed before any run: a difference between seed means counts when it exceeds both
``MIN_EFFECT`` (percentage points) and the seed spread of the two (the larger range over seeds).
Smoke runs (fewer than ``MIN_EXAMPLES`` training examples) and single-seed runs are not
assessed.
"""

from __future__ import annotations

import math
from typing import Any

from ..report import plots
from ..report.content import Claim, Figure, Section, Summary, Table
from ..runs import RunFiles
from .small_batch_common import mean, seed_spread, tail_mean

__all__ = ["VARIANTS", "LABELS", "PAPER", "summarize", "report"]

VARIANTS = ("bn-iid", "bn", "brn", "ghost", "gn")
LABELS = {"bn-iid": "BN, i.i.d. batches", "bn": "BN", "brn": "Batch Renorm",
          "ghost": "Ghost BN (half batches)", "gn": "GN"}  # fmt: skip
COLORS = {"bn-iid": "#7f7f7f", "bn": "#1f77b4", "bn-batch": "#aec7e8", "brn": "#ff7f0e",
          "ghost": "#9467bd", "gn": "#2ca02c"}  # fmt: skip
#: Ioffe (2017), section 4.3 (via a secondary source): Inception-v3 top-1 accuracy (%) on
#: ImageNet with mini-batches of 16 labels x 2 images, and BN on i.i.d. batches of 32.
PAPER = {"bn-iid": 78.3, "bn": 72.8, "bn-batch": 76.5, "ghost": 77.4, "brn": 78.5}
MIN_EFFECT = 1.0
MIN_EXAMPLES = 10_000


def _acc(v: Any) -> float:
    return 100.0 * float(v) if isinstance(v, (int, float)) else float("nan")


def summarize(meta: dict, rows: list[dict]) -> dict[str, Any]:
    finals: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r.get("test_acc") is None or r.get("variant") not in VARIANTS:
            continue
        try:
            finals.setdefault(str(r["variant"]), {})[int(r["seed"])] = r
        except (KeyError, TypeError, ValueError):
            continue
    acc = {v: [_acc(r["test_acc"]) for _, r in sorted(f.items())] for v, f in finals.items()}
    for v in ("bn", "bn-iid"):
        for key, name in (("test_acc_batch_stats", f"{v}-batch"),
                          ("test_acc_batch_stats_grouped", f"{v}-batch-grouped")):
            vals = [_acc(r[key]) for _, r in sorted(finals.get(v, {}).items())
                    if r.get(key) is not None]  # fmt: skip
            if vals:
                acc[name] = vals
    train_batch = {v: [_acc(tail_mean(rows, "train_batch_acc", {"variant": v, "seed": sd}))
                       for sd in sorted(f)] for v, f in finals.items()}  # fmt: skip
    curves: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r.get("variant") in VARIANTS and isinstance(r.get("train_loss"), (int, float)):
            curves.setdefault(r["variant"], {}).setdefault(int(r["step"]), []).append(
                r["train_loss"])
    seeds = max((len(v) for v in acc.values()), default=0)
    cfg = meta.get("config") or {}
    diverged = sorted({(r.get("variant"), r.get("seed")) for r in rows if r.get("diverged")},
                      key=str)  # fmt: skip
    return {"acc": acc, "train_batch": train_batch, "curves": curves, "seeds": seeds,
            "diverged": diverged, "claims": _claims(acc, seeds, cfg.get("examples"))}


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _margin(*groups: list[float]) -> float:
    noise = seed_spread(groups)
    return max(MIN_EFFECT, noise) if math.isfinite(noise) else float("nan")


def _claims(acc: dict, seeds: int, examples: Any) -> list[Claim]:
    why_not = ""
    if not isinstance(examples, int) or examples < MIN_EXAMPLES:
        why_not = (f"trainings of {examples} examples: a smoke run (the claims need at least "
                   f"{MIN_EXAMPLES:,})")  # fmt: skip
    elif seeds < 2:
        why_not = "one seed: no seed spread to compare differences with"

    def m(v: str) -> float:
        return mean(acc.get(v, []))

    def better(cid: str, text: str, a: str, b: str, paper: str) -> Claim:
        """Claim: ``a`` is more accurate than ``b``."""
        if not (acc.get(a) and acc.get(b)):
            return Claim.check(cid, text, "n/a", None, paper=paper,
                               not_assessed=f"{a} or {b} missing")  # fmt: skip
        d, mg = m(a) - m(b), _margin(acc[a], acc[b])
        return Claim.check(cid, text, f"{_name(a)} {_fmt(m(a))}%, {_name(b)} {_fmt(m(b))}%: "
                           f"{d:+.1f} points (margin {_fmt(mg)})", d > mg, paper=paper,
                           not_assessed=why_not)  # fmt: skip

    claims = [
        better("1", "Non-i.i.d. batches hurt BN at inference", "bn-iid", "bn",
               "BN on i.i.d. batches 78.3%, on 16 labels x 2 images 72.8%"),
        better("2", "Test-batch statistics recover part of BN's loss", "bn-batch", "bn",
               "72.8% -> 76.5%"),
        better("3", "Batch Renorm trained on the non-i.i.d. batches beats BN", "brn", "bn",
               "BRN 78.5%, BN 72.8%"),
    ]
    text = "Batch Renorm closes at least half of the gap to BN on i.i.d. batches"
    paper = "all of it: BRN 78.5%, i.i.d. BN 78.3%, non-i.i.d. BN 72.8%"
    if acc.get("brn") and acc.get("bn") and acc.get("bn-iid"):
        gap, gain = m("bn-iid") - m("bn"), m("brn") - m("bn")
        frac = 100 * gain / gap if gap > 0 else float("nan")
        holds = gap > _margin(acc["bn-iid"], acc["bn"]) and gain >= gap / 2
        note = "" if gap > _margin(acc["bn-iid"], acc["bn"]) else (
            "no gap to close: claim 1 does not hold")  # fmt: skip
        claims.append(Claim.check("4", text, f"gap {_fmt(gap)} points, BRN closes "
                                  f"{_fmt(gain)} ({_fmt(frac, 0)}%)",
                                  None if note else holds, paper=paper,
                                  not_assessed=why_not or note))  # fmt: skip
    else:
        claims.append(Claim.check("4", text, "n/a", None, paper=paper,
                                  not_assessed="bn, brn or bn-iid missing"))  # fmt: skip
    claims.append(better("5", "Ghost BN over half-batches beats BN", "ghost", "bn",
                         "BN on half-batches 77.4%, BN 72.8% (secondary source)"))
    return claims


def _name(v: str) -> str:
    return {"bn-batch": "BN with test-batch statistics", **LABELS}.get(v, v)


# ------------------------------------------------------------------------------ figures
ORDER = ("bn-iid", "bn", "bn-batch", "ghost", "brn", "gn")
SHORT = {"bn-iid": "BN\ni.i.d.", "bn": "BN", "bn-batch": "BN, test-\nbatch stats",
         "ghost": "Ghost BN\n(halves)", "brn": "Batch\nRenorm", "gn": "GN"}  # fmt: skip


def _figure(s: dict, path) -> None:
    with plots.style():
        fig, (ax, axc) = plots.figure(2, width=12.0, height=4.6)
        present = [v for v in ORDER if s["acc"].get(v)]
        xs = list(range(len(present)))
        width = 0.38
        for i, v in enumerate(present):
            vals = s["acc"][v]
            ax.bar(i - width / 2, mean(vals), width, color=COLORS[v],
                   label="this run" if i == 0 else None)  # fmt: skip
            ax.plot([i - width / 2] * len(vals), vals, "k.", ms=5)
            if v in PAPER:
                ax.bar(i + width / 2, PAPER[v], width, color="white", edgecolor=COLORS[v],
                       hatch="//", label="paper (ImageNet)" if v == "bn" else None)  # fmt: skip
        ax.set_xticks(xs)
        ax.set_xticklabels([SHORT[v] for v in present], fontsize=9)
        lows = [min(s["acc"][v]) for v in present] + [PAPER[v] for v in present if v in PAPER]
        ax.set_ylim(max(0.0, min(lows) - 8), 112)
        ax.set_yticks([t for t in ax.get_yticks() if t <= 100])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Test accuracy (dots: seeds; hatched: Ioffe 2017)")
        ax.legend(loc="upper center", ncol=2, fontsize=9)
        for v in VARIANTS:
            pts = s["curves"].get(v)
            if pts:
                steps = _regular(sorted(k for k in pts if k > 0))
                axc.plot(steps, [mean(pts[k]) for k in steps], "o-", color=COLORS[v],
                         label=LABELS[v], ms=3)  # fmt: skip
        axc.set_xlabel("step")
        axc.set_ylabel("training loss (training-mode statistics)")
        axc.set_title("Training loss, mean over seeds")
        axc.legend(fontsize=9)
        plots.save(fig, path)


def _regular(steps: list[int]) -> list[int]:
    """``steps`` without a last evaluation whose interval is under half the others' (the final
    row after a few leftover steps: its loss is that of a handful of batches)."""
    if len(steps) < 3:
        return steps
    gaps = [b - a for a, b in zip(steps[:-1], steps[1:], strict=True)]
    return steps[:-1] if gaps[-1] < 0.5 * max(gaps[:-1]) else steps


def _cell(vals: list[float] | None) -> str:
    if not vals:
        return ""
    if len(vals) == 1:
        return _fmt(vals[0], 2)
    return f"{_fmt(mean(vals), 2)} ({_fmt(min(vals), 1)}-{_fmt(max(vals), 1)})"


def report(files: RunFiles) -> Summary:
    cfg = files.config
    s = summarize(files.meta, files.rows)
    lpb, bs = cfg.get("labels_per_batch", "?"), cfg.get("batch_size", "?")
    figures = []
    if s["acc"]:
        _figure(s, files.path / "non_iid.png")
        figures = [Figure(
            "non_iid.png", "Non-i.i.d. batches: test accuracy and training loss",
            "Left: in the paper, BN trained on batches of few classes falls below BN on i.i.d. "
            "batches at inference and Batch Renorm closes the gap (hatched bars: its ImageNet "
            "accuracies). Right: the training losses, with training-mode statistics; where a "
            "variant trains as well as i.i.d. BN but tests worse, the damage is done at "
            "inference.")]  # fmt: skip
    rows = []
    for v, setting in (("bn-iid", "i.i.d. batches"), ("bn", "non-i.i.d."),
                       ("bn-batch", "non-i.i.d.; each test batch of i.i.d. examples normalized "
                        "with its own statistics"),
                       ("bn-batch-grouped", "non-i.i.d.; each test batch, of "
                        f"{lpb} classes like the training ones, with its own statistics"),
                       ("ghost", f"non-i.i.d.; ghost batches of {cfg.get('virtual_batch', '?')}"),
                       ("brn", "non-i.i.d."), ("gn", "non-i.i.d.")):  # fmt: skip
        if not s["acc"].get(v) and v not in PAPER:
            continue
        name = {"bn-batch-grouped": "BN with test-batch statistics (non-i.i.d. test batches)",
                "bn-batch": "BN with test-batch statistics (i.i.d. test batches)"}.get(
                    v, _name(v))  # fmt: skip
        rows.append([name, setting, _cell(s["acc"].get(v)),
                     _fmt(mean(s["train_batch"].get(v, [])), 1) if s["train_batch"].get(v)
                     else "", _fmt(PAPER[v]) if v in PAPER else ""])  # fmt: skip
    table = Table(
        "Test accuracy (%)", ["variant", "trained on / evaluated with", "this run",
                              "training batches (end)", "paper"], rows,
        note=f"This run: mean over seeds (min-max); batches of {bs} from {lpb} of the 10 "
        "classes. Paper: Ioffe 2017, section 4.3 (via a secondary source), Inception-v3 top-1 "
        "on ImageNet with batches of 16 labels x 2 images; its i.i.d. BN baseline has batches "
        "of 32. 'training batches (end)': accuracy on the training batches, in training mode, "
        "over the last two evaluation intervals.",
    )  # fmt: skip
    claims = s["claims"]
    verdicts = [c.verdict for c in claims]
    headline = ["Test accuracy: " + ", ".join(
        f"{_name(v)} {_fmt(mean(s['acc'][v]))}%" for v in ORDER if s["acc"].get(v))]
    headline.append("Claims: " + ", ".join(f"{verdicts.count(v)} {v}"
                                           for v in ("holds", "fails", "not assessed")))
    examples = cfg.get("examples")
    caveats = [
        "CPU scale: a 3-convolution CNN on Fashion-MNIST (10 classes), "
        + (f"{examples:,} training examples per training" if isinstance(examples, int) else "")
        + f"; each non-i.i.d. batch holds {lpb} of 10 classes, the paper's 16 of 1,000. The "
        "accuracies are not comparable with the paper's, only the differences between "
        "variants.",
        "The paper's numbers in this report come from a secondary source (notes on the paper; "
        "see docs/small-batches.md).",
    ]  # fmt: skip
    if s["diverged"]:
        caveats.append("Diverged trainings (not in the means): " + ", ".join(
            f"{v} seed {sd}" for v, sd in s["diverged"]))  # fmt: skip
    setup = [
        "Network: SmallCNN (three 3x3 convolutions of widths "
        f"{cfg.get('widths', '?')}, normalization and ReLU after each, 2x2 max pooling after "
        "the first two, global average pooling, linear classifier).",
        f"SGD, batch {bs}, learning rate {cfg.get('lr', '?')}, momentum "
        f"{cfg.get('momentum', '?')}, cosine decay to 0. Non-i.i.d. batches: "
        "bnlab.train.LabelBatches (labels drawn uniformly each step, examples within a label "
        "uniformly, order shuffled). Batch Renorm: rmax 3, dmax 5, the paper's schedule scaled "
        "to the run (bnlab.renorm_schedule).",
    ]
    return Summary(
        title="Non-i.i.d. batches: BN, Batch Renorm, ghost BN and test-batch statistics",
        headline=headline, caveats=caveats, setup=setup,
        sections=[Section("Test accuracy", figures=figures, tables=[table]),
                  Section("Claims", claims=claims)],
    )
