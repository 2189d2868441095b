"""Metrics files -> PNG figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["figure1"]

COLORS = {"baseline": "#d62728", "bn": "#1f77b4"}
LABELS = {"baseline": "Without BN", "bn": "With BN"}


def figure1(summary: dict, pct: dict, out: Path, tracked_unit: int, paper: dict) -> Path:
    """Three panels like the paper's Figure 1: (a) test accuracy vs steps, seed mean with a
    min-max band and the paper's read-off points; (b, c) 15/50/85th percentiles of the tracked
    sigmoid input without and with BN (first seed)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    steps = summary["steps"]
    for net in ("baseline", "bn"):
        a = summary["acc"][net]  # (E, K)
        ax.plot(steps, a.mean(1), color=COLORS[net], label=f"{LABELS[net]} (bnlab)")
        ax.fill_between(steps, a.amin(1), a.amax(1), color=COLORS[net], alpha=0.2, lw=0)
        ps = sorted(paper[net])
        ax.plot(
            ps,
            [paper[net][s] for s in ps],
            "o--",
            color=COLORS[net],
            alpha=0.6,
            ms=4,
            label=f"{LABELS[net]} (paper, read off)",
        )
    lo = float(min(summary["acc"]["bn"][len(steps) // 10 :].min(), 0.9)) if steps else 0.0
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) test accuracy (band: min-max over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    for ax, net, tag in ((axes[1], "baseline", "(b)"), (axes[2], "bn", "(c)")):
        s, p = pct[net]  # steps, (E, K, 3)
        for q, style in zip(range(3), (":", "-", ":"), strict=True):
            ax.plot(s, p[:, 0, q], style, color=COLORS[net], lw=1.5 if q == 1 else 1)
        ax.set_title(
            f"{tag} {LABELS[net]}: sigmoid input of unit {tracked_unit} (15/50/85th pct)",
            fontsize=9,
        )
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    lim = max(float(torch.cat([pct[n][1][:, 0].flatten() for n in pct]).abs().max()), 1.0)
    for ax in axes[1:]:
        ax.set_ylim(-lim * 1.05, lim * 1.05)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
