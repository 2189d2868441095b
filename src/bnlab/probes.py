"""Probes: forward hooks that record what flows through a model, then remove themselves.

Used for Figure 1(b, c) of Ioffe & Szegedy (2015): the 15th, 50th and 85th percentiles of the
input to a sigmoid over training. A probe only reads tensors: it never changes a module's
train/eval mode, its parameters or the values it sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["record_inputs", "percentiles"]


@contextmanager
def record_inputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Context manager: ``with record_inputs({"sig3": m}) as got: model(x)`` leaves the (detached)
    first positional input of each module in ``got[name]``; the hooks are gone after the block."""
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():

        def pre_hook(mod, args, name=name):
            captured[name] = args[0].detach()

        handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def percentiles(t: Tensor, qs: Sequence[float], dim: int = 0) -> Tensor:
    """Exact percentiles along ``dim`` with linear interpolation between order statistics (the
    definition of ``numpy.percentile``'s default): for q in [0, 100], position
    ``q/100 * (n - 1)`` in the sorted values. Returns shape ``(len(qs), *rest)`` in float64.

    The sort runs in numpy (exact: sorting only moves values; numpy's sort of many short rows on
    one thread is much faster than ``torch.sort``'s); the interpolation is ``torch.lerp`` in
    float64, as in ``torch.quantile``.
    """
    n = t.shape[dim]
    if n == 0:
        raise ValueError("percentiles: empty dimension")
    q = torch.tensor([float(v) / 100.0 for v in qs], dtype=torch.float64)
    if (q < 0).any() or (q > 1).any():
        raise ValueError(f"percentiles: qs must be in [0, 100], got {list(qs)}")
    moved = t.detach().movedim(dim, -1).cpu()  # (*rest, n)
    if moved.dtype not in (torch.float32, torch.float64):
        moved = moved.double()
    ordered = torch.from_numpy(np.sort(moved.contiguous().numpy(), axis=-1)).double()
    pos = q * (n - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=n - 1)
    below, above = ordered[..., lo], ordered[..., hi]  # (*rest, len(qs))
    out = torch.lerp(below, above, pos - lo)
    out[ordered[..., -1].isnan()] = float("nan")  # numpy sorts NaN last; any NaN -> NaN
    return out.movedim(-1, 0).to(t.device)
