"""Diagnosis: :func:`diagnose` and :class:`LayerDiagnosis`.

The train/eval gap of each BatchNorm layer: the statistics of its inputs on given data against the
population statistics ``E[x]``, ``Var[x]`` it stores for inference (Ioffe & Szegedy (2015),
section 3.1 and Algorithm 2), as a shift in population standard deviations and a variance ratio.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from ..layers.batchnorm import _BatchNorm
from ._common import (
    _bn_layers,
    _check_num_batches,
    _iterate,
    _model_device,
    _ModelState,
    _Moments,
    _pre_hooks,
)

__all__ = ["LayerDiagnosis", "diagnose"]


@dataclass
class LayerDiagnosis:
    """The train/eval gap of one BN layer over the given data.

    ``mean_shift = |E_data[x] - running_mean| / sqrt(running_var + eps)`` per channel (the shift,
    in population standard deviations, that the eval-mode output of this layer carries), and
    ``var_ratio = Var_data[x] / running_var`` (unbiased over the data), summarized over channels.
    """

    name: str
    kind: str
    num_features: int
    num_batches_tracked: int | None
    mean_shift_max: float
    mean_shift_mean: float
    var_ratio_min: float
    var_ratio_max: float
    flags: list[str] = field(default_factory=list)


def _format_table(rows: list[LayerDiagnosis]) -> str:
    head = ("layer", "type", "C", "batches", "shift max", "shift mean", "var ratio", "flags")
    lines = [
        [
            r.name,
            r.kind,
            str(r.num_features),
            "-" if r.num_batches_tracked is None else str(r.num_batches_tracked),
            f"{r.mean_shift_max:.3f}",
            f"{r.mean_shift_mean:.3f}",
            f"{r.var_ratio_min:.3f}-{r.var_ratio_max:.3f}",
            ",".join(r.flags) or "ok",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


@torch.no_grad()
def diagnose(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    shift_tol: float = 0.25,
    var_tol: float = 1.5,
    file: TextIO | None = sys.stdout,
    progress: bool = False,
) -> list[LayerDiagnosis]:
    """Compare, per BN layer, the statistics of its inputs on ``batches`` with its stored
    population statistics, and print a table (to ``file``; ``None`` prints nothing).

    The data passes through the model, under ``torch.no_grad``, with every BN layer temporarily in
    eval mode, i.e. through the inference network, so each layer sees what it will see at
    inference; other modules run in the mode they have. Nothing changes: afterwards (also on an
    error) every module's mode, every buffer, the hooks and the CPU random number generator are as
    they were. ``progress=True`` draws a tqdm bar on stderr. Flags per layer:

    * ``never-updated``: ``num_batches_tracked == 0`` (running stats still at their 0/1 init);
    * ``stale``: some channel has ``mean_shift > shift_tol`` or ``var_ratio`` outside
      ``[1/var_tol, var_tol]``;
    * ``non-finite``: NaN/Inf in the stored statistics;
    * ``one-value-per-channel``: the data gave the layer one value per channel (e.g. one
      ``(1, C)`` batch), whose variance is undefined: ``var_ratio`` is NaN and ``stale`` looks at
      the mean shift only; pass more (or larger) batches;
    * ``no-running-stats``: ``track_running_stats=False`` (always batch statistics; skipped).

    Returns one :class:`LayerDiagnosis` per layer, in execution order then registration order.
    """
    if not shift_tol > 0 or not var_tol > 1:
        raise ValueError(
            f"diagnose: need shift_tol > 0 and var_tol > 1, got {shift_tol!r}, {var_tol!r}"
        )
    _check_num_batches("diagnose", num_batches)
    layers = _bn_layers(model, "diagnose")
    tracked = [(n, m) for n, m in layers if m.running_mean is not None]
    moments = {id(m): _Moments() for _, m in tracked}
    order: list[int] = []

    def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) not in order:
            order.append(id(module))
        moments[id(module)].add(args[0])

    device = _model_device(model)
    state = _ModelState(model, device)
    xs = _iterate(batches, num_batches, fn="diagnose", desc="diagnose", progress=progress,
                  device=device)  # fmt: skip
    try:
        for _, m in tracked:
            m.train(False)
        with _pre_hooks((m for _, m in tracked), collect), closing(xs):
            for x in xs:
                model(x)
    finally:
        state.restore()
    rank = {mid: i for i, mid in enumerate(order)}
    rows: list[LayerDiagnosis] = []
    for name, m in sorted(layers, key=lambda nm: rank.get(id(nm[1]), len(rank))):
        nbt = None if m.num_batches_tracked is None else int(m.num_batches_tracked.item())
        kind = ("bnlab." if isinstance(m, _BatchNorm) else "torch.") + type(m).__name__
        if m.running_mean is None:
            rows.append(
                LayerDiagnosis(
                    name,
                    kind,
                    m.num_features,
                    None,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    ["no-running-stats"],
                )
            )
            continue
        mom = moments[id(m)]
        flags: list[str] = []
        if nbt == 0:
            flags.append("never-updated")
        rm, rv = m.running_mean.double(), m.running_var.double()
        if not bool(torch.isfinite(rm).all() and torch.isfinite(rv).all()):
            flags.append("non-finite")
        if mom.mean is None:
            flags.append("not-called")
            rows.append(
                LayerDiagnosis(
                    name, kind, m.num_features, nbt, math.nan, math.nan, math.nan, math.nan, flags
                )
            )
            continue
        shift = (mom.mean - rm).abs() / torch.sqrt(rv + m.eps)
        if not math.isfinite(float(shift.max())) and "non-finite" not in flags:
            flags.append("non-finite")
        if mom.n < 2:  # an unbiased variance of one value is 0/0: say so, not "stale"
            flags.append("one-value-per-channel")
            ratio = torch.full_like(shift, math.nan)
            stale = float(shift.max()) > shift_tol
        else:
            ratio = mom.variance("unbiased") / rv
            stale = float(shift.max()) > shift_tol or not (
                1.0 / var_tol <= float(ratio.min()) and float(ratio.max()) <= var_tol
            )
        if stale:
            flags.append("stale")
        rows.append(
            LayerDiagnosis(
                name,
                kind,
                m.num_features,
                nbt,
                float(shift.max()),
                float(shift.mean()),
                float(ratio.min()),
                float(ratio.max()),
                flags,
            )
        )
    if file is not None:
        print(_format_table(rows), file=file)
    return rows
