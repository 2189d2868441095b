"""Plotting helpers shared by the experiments' figures (matplotlib, Agg backend: no display).

Figures are sized for the report's page width (about 11 inches at 110 dpi, 1,200 pixels) with
fonts that stay legible there; every experiment draws its own figures from its run's files with
these helpers, so the reports look alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["COLORS", "style", "figure", "band", "save", "plt"]

#: Colours for the usual roles (colour-blind safe pairs from the tab10 palette).
COLORS = {
    "baseline": "#d62728",
    "bn": "#1f77b4",
    "paper": "#555555",
}

_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def style():
    """The reports' matplotlib style, as a context: ``with style(): fig, axes = figure(2)``."""
    return plt.rc_context(_STYLE)


def figure(ncols: int = 1, nrows: int = 1, width: float = 11.0, height: float = 4.2,
           **kwargs):
    """``(fig, axes)`` (``axes`` a flat list), ``height`` per row; draw inside
    :func:`style` so titles, labels and ticks get the reports' sizes."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False,
                             **kwargs)
    return fig, list(axes.flat)


def band(ax, x: Sequence[float], values, color: str, label: str | None = None, **kwargs):
    """Plot the mean over seeds of ``values`` (``(len(x), seeds)``) against ``x``, with a
    min-max band over seeds."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[:, None]
    (line,) = ax.plot(x, v.mean(1), color=color, label=label, **kwargs)
    if v.shape[1] > 1:
        ax.fill_between(x, v.min(1), v.max(1), color=color, alpha=0.18, lw=0)
    return line


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write ``path`` (PNG) and close the figure."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
