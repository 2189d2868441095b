"""Probes: hooks that record what flows through a model, then remove themselves; and the
statistics the experiments compute from what they record.

* :func:`record_inputs`: a module's input (an activation hook); Figure 1(b, c) of Ioffe &
  Szegedy (2015) takes percentiles of a sigmoid's input.
* :func:`record_output_grads`: the gradient of the loss with respect to a module's output
  (Bjorck et al. 2018, section 3: the output-gradient heatmap, the kernel gradients of a conv).
* :func:`record_channel_stats`: per-channel mean and standard deviation of a module's output,
  computed in the hook so that nothing of the size of an activation is kept (Bjorck et al. 2018:
  channel statistics against depth for all 109 convolutions of ResNet-110).
* :func:`percentiles` (exact, numpy's definition) and :func:`excess_kurtosis`.

A probe only reads tensors: it never changes a module's train/eval mode, its parameters or the
values it sees, and its module hooks are gone when its ``with`` block ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "record_inputs",
    "record_output_grads",
    "record_channel_stats",
    "percentiles",
    "excess_kurtosis",
]


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


@contextmanager
def record_output_grads(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Context manager: ``with record_output_grads({"fc": model.fc}) as got: loss =
    f(model(x)); loss.backward()`` leaves d loss / d (output of ``fc``) in ``got["fc"]``
    (detached, the output's shape).

    A forward hook attaches a gradient hook to each output that requires grad; the forward hooks
    are removed when the block ends, so outputs computed afterwards carry no hook. For a module
    called several times in one forward, the entry holds the gradient of the call whose gradient
    autograd computed last. Modules whose output needs no gradient leave no entry.
    """
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, out, name=name):
            if isinstance(out, Tensor) and out.requires_grad:

                def grad_hook(g, name=name):
                    captured[name] = g.detach()

                out.register_hook(grad_hook)

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_channel_stats(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Context manager: per-channel statistics of each module's output, ``(N, C, *spatial)`` or
    ``(N, C)``, over the batch and spatial positions, computed in float64 inside the hook (only
    the ``(2, C)`` result is kept): ``got[name][0]`` the channel means, ``got[name][1]`` the
    channel standard deviations (biased: divided by the number of values per channel, as the
    batch statistics of BN). A module called several times keeps its last call's statistics.
    """
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(mod, args, out, name=name):
            if not isinstance(out, Tensor) or out.dim() < 2:
                raise ValueError(
                    f"record_channel_stats: '{name}' returned "
                    f"{type(out).__name__ if not isinstance(out, Tensor) else tuple(out.shape)}"
                    "; expected a tensor of shape (N, C, ...)"
                )
            v = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)  # (C, N*HW)
            var, mean = torch.var_mean(v, dim=1, correction=0)
            captured[name] = torch.stack([mean, var.sqrt()])

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def excess_kurtosis(t: Tensor) -> float:
    """Excess kurtosis of all values of ``t``: ``m4 / m2**2 - 3`` with the central moments
    ``mk = mean((x - mean(x))**k)`` (population moments, no bias correction), in float64.
    0 for a Gaussian, -1.2 for a uniform, 3 for a Laplace distribution; larger means heavier
    tails and a sharper peak. ValueError for fewer than two values or all values equal."""
    x = t.detach().double().flatten()
    if x.numel() < 2:
        raise ValueError(f"excess_kurtosis: need at least 2 values, got {x.numel()}")
    d = x - x.mean()
    m2 = float((d * d).mean())
    if not m2 > 0:
        raise ValueError("excess_kurtosis: all values are equal (zero variance)")
    m4 = float((d**4).mean())
    return m4 / (m2 * m2) - 3.0


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
    ordered = moved.sort(dim=-1).values.double()
    pos = q * (n - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=n - 1)
    below, above = ordered[..., lo], ordered[..., hi]  # (*rest, len(qs))
    out = torch.lerp(below, above, pos - lo)
    out[ordered[..., -1].isnan()] = float("nan")  # numpy sorts NaN last; any NaN -> NaN
    return out.movedim(-1, 0).to(t.device)
