"""Population statistics: :func:`recompute_population_stats` ("precise BN").

Ioffe & Szegedy (2015), section 3.1 and Algorithm 2: after training, each BatchNorm layer
normalizes with population statistics ``E[x]`` and ``Var[x]`` of its inputs instead of mini-batch
statistics. This module recomputes them exactly over given batches, in place of the exponential
moving averages kept during training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._common import _bn_layers, _distributed, _first_input, _iterate, _model_device, _Moments

__all__ = ["recompute_population_stats"]

_ESTIMATORS = ("unbiased", "biased")
_STATE = ("running_mean", "running_var", "num_batches_tracked")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (the rest of the network is not needed)."""


def _write_stats(layer: nn.Module, name: str, moments: _Moments, estimator: str) -> None:
    assert moments.mean is not None
    var = moments.variance(estimator)
    if not bool(torch.isfinite(moments.mean).all() and torch.isfinite(var).all()):
        raise FloatingPointError(
            f"recompute_population_stats: non-finite statistics for layer '{name}' (NaN or Inf in "
            "its inputs); all running statistics were left unchanged"
        )
    with torch.no_grad():
        layer.running_mean.copy_(moments.mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(moments.batches)
    layer.population_estimator = estimator


@torch.no_grad()
def recompute_population_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    estimator: str = "unbiased",
    progress: bool = True,
    mode: str = "train",
) -> nn.Module:
    """Replace every BatchNorm layer's running statistics by population statistics computed over
    ``batches`` (Algorithm 2, section 3.1; the "precise BN" recalibration).

    For each layer and channel, over all ``M`` values it sees (``M = sum over batches of
    N * prod(spatial)``, so batches of different sizes are weighted by their element count)::

        running_mean = E[x]   = (1/M) * sum x
        running_var  = Var[x] = 1/(M - 1) * sum (x - E[x])^2      estimator="unbiased"
                              = 1/M     * sum (x - E[x])^2      estimator="biased"

    computed in float64 with an exact pairwise merge, so the result is that of the concatenated
    batches, not an average of per-batch figures. Algorithm 2 writes the variance as
    ``m/(m-1) * E_B[sigma_B^2]``: the mean within-batch variance, which omits the spread of the
    batch means; for i.i.d. batches both estimate the same Var[x], the form here is also exact.
    ``num_batches_tracked`` is set to the number of batches, and ``population_estimator`` to
    ``estimator`` (shown in the repr of bnlab layers; set as an attribute on torch layers).

    Which inputs each layer sees (``mode``):

    * ``"train"`` (default; Algorithm 2 as written, one pass): every BN layer normalizes with
      mini-batch statistics while statistics are collected, as during training, so each layer's
      population statistics describe the inputs it had in training. The first BN layer of each
      path gets the exact statistics of the concatenated data; deeper layers depend, as in
      training, on how the data is split into batches.
    * ``"eval"`` (layer by layer, one pass per BN layer, each stopped at that layer): layer k is
      estimated with layers before it already using their *new* population statistics, i.e. from
      exactly the inputs it will see at inference. Every layer then holds the exact statistics of
      the concatenated data and the result does not depend on the batch split; ``batches`` must be
      re-iterable (a list or a DataLoader).

    Other modules (dropout, ...) keep the mode they have. Each BN layer's mode and momentum are
    restored, gradients are off, and the forward passes run under ``torch.no_grad``. Frozen bnlab
    layers (:func:`freeze`) and layers without running statistics are left untouched. Under an
    initialized ``torch.distributed`` process group, each rank passes its own batches and the
    statistics are merged across ranks (``all_gather``), so every rank ends with the same values.
    All or nothing: on any error (``FloatingPointError`` for NaN/Inf reaching a layer, a layer the
    forward never calls, ...) every layer keeps the statistics it had before the call.

    Returns ``model``.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(
            f"recompute_population_stats: estimator must be 'unbiased' or 'biased', "
            f"got {estimator!r}"
        )
    if mode not in ("train", "eval"):
        raise ValueError(
            f"recompute_population_stats: mode must be 'train' or 'eval', got {mode!r}"
        )
    layers = [
        (name, m)
        for name, m in _bn_layers(model)
        if m.running_mean is not None and not getattr(m, "frozen", False)
    ]
    if not layers:
        return model
    if mode == "eval" and iter(batches) is batches:  # type: ignore[comparison-overlap]
        raise TypeError(
            "recompute_population_stats: mode='eval' makes one pass per layer, so batches must be "
            "re-iterable (a list or DataLoader), not a one-shot iterator"
        )
    device = _model_device(model)
    saved = [(m, m.training, m.momentum) for _, m in layers]
    # All-or-nothing: on any error (a NaN batch, a layer not called, ...) every layer gets back
    # the statistics it had, including torch layers that updated them during a train-mode pass.
    backup = [
        (
            m,
            {k: getattr(m, k).clone() for k in _STATE if getattr(m, k) is not None},
            getattr(m, "population_estimator", None),
        )
        for _, m in layers
    ]
    handles: list[Any] = []
    try:
        if mode == "train":
            moments = {id(m): _Moments() for _, m in layers}

            def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
                moments[id(module)].add(args[0])

            for _, m in layers:
                m.train()
                handles.append(m.register_forward_pre_hook(collect))
            for x in _iterate(batches, num_batches, progress, "population statistics"):
                model(x.to(device) if device is not None else x)
            for name, m in layers:
                mom = moments[id(m)]
                if mom.mean is None:
                    raise ValueError(
                        f"recompute_population_stats: layer '{name}' was not called by the model"
                    )
                if _distributed():
                    mom.all_reduce()
                _write_stats(m, name, mom, estimator)
        else:
            for _, m in layers:
                m.eval()
            # Execution order, so each layer's inputs come from already-updated layers.
            order: list[nn.Module] = []
            by_id = {id(m): (name, m) for name, m in layers}

            def record(module: nn.Module, args: tuple[Any, ...]) -> None:
                if module not in order:
                    order.append(module)

            handles = [m.register_forward_pre_hook(record) for _, m in layers]
            first = next(iter(batches))
            x0 = _first_input(first)
            model(x0.to(device) if device is not None else x0)
            for h in handles:
                h.remove()
            handles = []
            for layer in order:
                name = by_id[id(layer)][0]
                mom = _Moments()

                def collect_one(module: nn.Module, args: tuple[Any, ...], mom=mom) -> None:
                    mom.add(args[0])
                    raise _Stop

                handles = [layer.register_forward_pre_hook(collect_one)]
                for x in _iterate(batches, num_batches, progress, f"population statistics {name}"):
                    try:
                        model(x.to(device) if device is not None else x)
                    except _Stop:
                        pass
                handles[0].remove()
                handles = []
                if _distributed():
                    mom.all_reduce()
                _write_stats(layer, name, mom, estimator)
            missing = [name for name, m in layers if m not in order]
            if missing:
                raise ValueError(
                    "recompute_population_stats: layers not called by the model: "
                    + ", ".join(missing)
                )
    except BaseException:
        with torch.no_grad():
            for m, state, estimator_before in backup:
                for k, v in state.items():
                    getattr(m, k).copy_(v)
                m.population_estimator = estimator_before
        raise
    finally:
        for h in handles:
            h.remove()
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum
    return model
