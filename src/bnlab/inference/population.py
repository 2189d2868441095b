"""Population statistics: :func:`recompute_population_stats` ("precise BN").

Ioffe & Szegedy (2015), section 3.1 and Algorithm 2: after training, each BatchNorm layer
normalizes with population statistics ``E[x]`` and ``Var[x]`` of its inputs instead of mini-batch
statistics. This module recomputes them exactly over given batches, in place of the exponential
moving averages kept during training, in one of two ways (``mode``): :func:`_recompute_train`
(Algorithm 2 as written) and :func:`_recompute_eval` (layer by layer, through the inference
network).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import Any

import torch
from torch import nn

from ._common import (
    _bn_layers,
    _check_num_batches,
    _distributed,
    _iterate,
    _model_device,
    _ModelState,
    _Moments,
    _pre_hooks,
)

__all__ = ["recompute_population_stats"]

_FN = "recompute_population_stats"
_ESTIMATORS = ("unbiased", "biased")
_MODES = ("train", "eval")
_DESC = "population statistics"  # progress bar title

Layers = list[tuple[str, nn.Module]]  # (qualified name, BN layer), the layers to recompute


@torch.no_grad()
def recompute_population_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    estimator: str = "unbiased",
    progress: bool = False,
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
      re-iterable (a list or a DataLoader, not an iterator), and a layer called more than once per
      forward is refused (its later calls see its own statistics, so there is no such input).

    ``batches`` yields Tensors or tuples/lists starting with the input (``(x, y)``); inputs are
    moved to the model's device. At most ``num_batches`` are taken (and fetched). ``progress=True``
    draws a tqdm bar on stderr; by default nothing is printed. The forward passes run under
    ``torch.no_grad``. Frozen bnlab layers (:func:`freeze`) and layers without running statistics
    are left untouched. Under an initialized ``torch.distributed`` process group, each rank passes
    its own batches and the statistics are merged across ranks (``all_gather``), so every rank
    ends with the same values.

    What changes: ``running_mean``, ``running_var``, ``num_batches_tracked`` and
    ``population_estimator`` of the recomputed layers, nothing else. The recomputed layers are
    switched to the mode the pass needs and every other module (dropout, ...) runs in the mode it
    has; on return the ``training`` flag of every module, every other buffer (a train-mode forward
    may update more than BN statistics), the hooks and the CPU random number generator (dropout
    draws from it) are as they were. No momentum or other attribute is touched. All or nothing:
    on any error (``FloatingPointError`` for NaN/Inf reaching a layer, a layer the forward never
    calls, a bad batch, ``KeyboardInterrupt``, ...) the statistics are restored too, so the
    model ends exactly as it started.

    Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be an nn.Module, got {type(model).__name__}")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"{_FN}: estimator must be 'unbiased' or 'biased', got {estimator!r}")
    if mode not in _MODES:
        raise ValueError(f"{_FN}: mode must be 'train' or 'eval', got {mode!r}")
    _check_num_batches(_FN, num_batches)
    if mode == "eval" and isinstance(batches, Iterator):
        raise TypeError(
            f"{_FN}: mode='eval' makes one pass per layer, so batches must be re-iterable "
            "(a list or DataLoader), not a one-shot iterator"
        )
    layers = [
        (name, m)
        for name, m in _bn_layers(model, _FN)
        if m.running_mean is not None and not getattr(m, "frozen", False)
    ]
    if not layers:
        return model
    recompute = _recompute_train if mode == "train" else _recompute_eval
    device = _model_device(model)
    state = _ModelState(model, device)
    try:
        recompute(model, layers, batches, num_batches, estimator, progress, device)
    except BaseException:
        state.restore()
        raise
    state.restore(keep=[m for _, m in layers])
    return model


def _recompute_train(
    model: nn.Module,
    layers: Layers,
    batches: Iterable[Any],
    num_batches: int | None,
    estimator: str,
    progress: bool,
    device: torch.device | None,
) -> None:
    """``mode="train"``: one pass with the layers in training mode (mini-batch statistics), each
    layer's inputs accumulated by a pre-hook; then every layer's statistics are written."""
    moments = {id(m): _Moments() for _, m in layers}

    def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
        moments[id(module)].add(args[0])

    for _, m in layers:
        m.train(True)
    xs = _iterate(batches, num_batches, fn=_FN, desc=_DESC, progress=progress, device=device)
    with _pre_hooks((m for _, m in layers), collect), closing(xs):
        for x in xs:
            model(x)
    _check_called([name for name, m in layers if moments[id(m)].mean is None])
    for name, m in layers:
        _write_stats(m, name, moments[id(m)], estimator)


class _Stop(BaseException):
    """Raised by a hook to end a forward pass at the layer being estimated (the rest of the
    network is not needed). A BaseException, so a forward's own ``except Exception`` lets it by."""


def _recompute_eval(
    model: nn.Module,
    layers: Layers,
    batches: Iterable[Any],
    num_batches: int | None,
    estimator: str,
    progress: bool,
    device: torch.device | None,
) -> None:
    """``mode="eval"``: the layers in eval mode; one pass over the first batch finds their
    execution order, then one pass per layer, stopped at that layer, collects its inputs (the
    layers before it already hold their new statistics) and writes its statistics."""
    for _, m in layers:
        m.train(False)
    for name, layer in _execution_order(model, layers, batches, device):
        mom = _Moments()

        def collect(module: nn.Module, args: tuple[Any, ...], mom: _Moments = mom) -> None:
            mom.add(args[0])
            raise _Stop

        desc = f"{_DESC} {name}"
        xs = _iterate(batches, num_batches, fn=_FN, desc=desc, progress=progress, device=device)
        with _pre_hooks([layer], collect), closing(xs):
            for x in xs:
                try:
                    model(x)
                except _Stop:
                    pass
        _write_stats(layer, name, mom, estimator)


def _execution_order(
    model: nn.Module, layers: Layers, batches: Iterable[Any], device: torch.device | None
) -> Layers:
    """``layers`` in the order the forward first calls them on the first batch. ``ValueError``
    for a layer not called, or called more than once per forward."""
    calls: dict[int, int] = {}  # id(layer) -> number of calls; insertion order = execution order

    def count(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1

    xs = _iterate(batches, 1, fn=_FN, desc=_DESC, progress=False, device=device)
    with _pre_hooks((m for _, m in layers), count), closing(xs):
        for x in xs:
            model(x)
    _check_called([name for name, m in layers if id(m) not in calls])
    for name, m in layers:
        if calls[id(m)] > 1:
            raise ValueError(
                f"{_FN}: layer '{name}' is called {calls[id(m)]} times per forward; mode='eval' "
                "estimates a layer from the inputs the inference network gives it, which for a "
                "later call depend on the statistics being estimated. Use mode='train'"
            )
    by_id = {id(m): (name, m) for name, m in layers}
    return [by_id[i] for i in calls]


def _check_called(missing: list[str]) -> None:
    if missing:
        raise ValueError(
            f"{_FN}: BatchNorm layers not called by the model's forward, so without statistics: "
            + ", ".join(f"'{name}'" for name in missing)
        )


def _write_stats(layer: nn.Module, name: str, moments: _Moments, estimator: str) -> None:
    """Merge ``moments`` across ranks (under torch.distributed), check them and write them into
    ``layer`` (its dtype), with ``population_estimator``."""
    if _distributed():
        moments.all_reduce()
    if moments.mean is None:
        raise ValueError(f"{_FN}: layer '{name}' saw no values")
    if estimator == "unbiased" and moments.n < 2:
        raise ValueError(
            f"{_FN}: layer '{name}' saw {moments.n} value per channel; the unbiased variance needs "
            "at least 2 (pass more data, or estimator='biased')"
        )
    var = moments.variance(estimator)
    if not bool(torch.isfinite(moments.mean).all() and torch.isfinite(var).all()):
        raise FloatingPointError(
            f"{_FN}: non-finite statistics for layer '{name}' (NaN or Inf in its inputs); all "
            "running statistics were left unchanged"
        )
    with torch.no_grad():
        layer.running_mean.copy_(moments.mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(moments.batches)
    layer.population_estimator = estimator
