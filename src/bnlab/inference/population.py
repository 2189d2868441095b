"""Batch Normalization at inference: population statistics, folding, freezing, diagnosis.

Ioffe & Szegedy (2015), section 3.1 and Algorithm 2. After training, the mini-batch statistics of
Algorithm 1 are replaced by population statistics, and the transform becomes a fixed per-channel
linear map::

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma * E[x] / sqrt(Var[x] + eps))

Contents:

* :func:`recompute_population_stats` - "precise BN": re-estimate ``running_mean``/``running_var``
  of every BatchNorm layer by a true, element-count-weighted average over given batches, instead of
  the exponential moving average kept during training.
* :func:`fold` - an inference copy of a model with each BN folded into the preceding
  ``Linear``/``Conv``/``ConvTranspose`` (or turned into a :class:`ChannelAffine`).
* :func:`freeze` / :func:`unfreeze` - BN layers that use population statistics and stop updating,
  whatever ``model.train()``/``model.eval()`` says.
* :func:`diagnose` - the train/eval gap per layer: statistics of given data against the stored ones.

Both bnlab layers and ``torch.nn.BatchNorm1d/2d/3d`` are handled by the statistics, folding and
diagnosis functions; freezing needs bnlab layers (``bnlab.convert(model)``).
"""

from __future__ import annotations

import copy
import math
import sys
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from ..layers.batchnorm import _BatchNorm

__all__ = [
    "ChannelAffine",
    "LayerDiagnosis",
    "diagnose",
    "fold",
    "freeze",
    "recompute_population_stats",
    "unfreeze",
]

_TorchBN = nn.modules.batchnorm._BatchNorm  # torch.nn.BatchNorm1d/2d/3d (and SyncBatchNorm)
_BN_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _TorchBN)
_ESTIMATORS = ("unbiased", "biased")
_STATE = ("running_mean", "running_var", "num_batches_tracked")


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, _BN_TYPES)


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every BatchNorm layer, in registration order."""
    return [(name or type(m).__name__, m) for name, m in model.named_modules() if _is_bn(m)]


def _first_input(batch: Any) -> Tensor:
    """A batch is a Tensor, or a tuple/list whose first element is the input (``(x, y)``)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        "batches: each batch must be a Tensor or a tuple/list starting with the input Tensor, "
        f"got {type(batch).__name__}"
    )


# ------------------------------------------------------------------------------------ statistics
class _Moments:
    """Exact per-channel count, mean and sum of squared deviations M2 of all values seen, in
    float64, merged batch by batch (pairwise update of Chan, Golub & LeVeque)::

        delta = mean_b - mean
        mean <- mean + delta * n_b / (n + n_b)
        M2   <- M2 + M2_b + delta^2 * n * n_b / (n + n_b)
        n    <- n + n_b

    so the result equals the statistics of the concatenated data, whatever the batch sizes.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.batches = 0

    def add(self, x: Tensor) -> None:
        c = x.shape[1]
        flat = x.detach().to(torch.float64).transpose(0, 1).reshape(c, -1)  # (C, N*spatial)
        n_b = flat.shape[1]
        mean_b = flat.mean(dim=1)
        m2_b = (flat - mean_b[:, None]).square().sum(dim=1)
        self.merge(n_b, mean_b, m2_b)
        self.batches += 1

    def merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if n_b == 0:
            return
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * n_b / n)
        self.n = n

    def all_reduce(self) -> None:
        """Combine the moments of every rank of the default process group, in rank order, so all
        ranks end with bit-identical statistics."""
        import torch.distributed as dist

        assert self.mean is not None and self.m2 is not None
        c = self.mean.numel()
        mine = torch.cat(
            [
                torch.tensor([float(self.n), float(self.batches)], dtype=torch.float64),
                self.mean,
                self.m2,
            ]
        )
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        self.n, self.mean, self.m2, self.batches = 0, None, None, 0
        for p in parts:
            self.merge(int(p[0].item()), p[2 : 2 + c], p[2 + c :])
            self.batches += int(p[1].item())

    def variance(self, estimator: str) -> Tensor:
        assert self.m2 is not None
        return self.m2 / (self.n - 1 if estimator == "unbiased" else self.n)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _iterate(batches: Iterable[Any], num_batches: int | None, progress: bool, desc: str):
    """Yield input tensors from ``batches`` (at most ``num_batches``), with a tqdm bar."""
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"{desc}: num_batches must be a positive int or None, got {num_batches!r}")
    total = num_batches
    if total is None:
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            yield _first_input(batch)
            seen += 1
            bar.update(1)
    finally:
        bar.close()
    if seen == 0:
        raise ValueError(f"{desc}: batches is empty; need at least one batch")
    if num_batches is not None and seen < num_batches:
        raise ValueError(f"{desc}: num_batches={num_batches} but batches held only {seen}")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (the rest of the network is not needed)."""


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


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


# ------------------------------------------------------------------------------------ freezing
def _bnlab_layers_for(fn: str, model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    out = []
    for name, m in _bn_layers(model):
        if not isinstance(m, _BatchNorm):
            raise TypeError(
                f"{fn}: layer '{name}' is a torch.nn {type(m).__name__}, whose train() cannot be "
                "overridden; convert the model first with bnlab.convert(model)"
            )
        out.append((name, m))
    return out


def freeze(model: nn.Module, params: bool = True) -> nn.Module:
    """Freeze every BatchNorm layer of ``model`` (bnlab layers; ``TypeError`` for torch ones).

    A frozen layer normalizes with its population statistics (Algorithm 2's inference transform,
    ``y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta``) in training *and* eval mode, never
    updates ``running_mean``/``running_var``/``num_batches_tracked``, and stays frozen across
    ``model.train()``; gradients still flow through it to earlier layers. With ``params=True``
    gamma and beta are frozen too (``requires_grad=False``, gradients cleared). The layer's repr
    shows ``frozen=True``. Returns ``model``.
    """
    layers = _bnlab_layers_for("freeze", model)
    for name, m in layers:
        if m.running_mean is None:
            raise ValueError(
                f"freeze: layer '{name}' has track_running_stats=False, so it has no population "
                "statistics to freeze to"
            )
    for _, m in layers:
        m.frozen = True
        if params:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(False)
                    p.grad = None
    return model


def unfreeze(model: nn.Module, params: bool = True) -> nn.Module:
    """Undo :func:`freeze`: layers follow train/eval again; with ``params=True`` gamma and beta
    require gradients again. Returns ``model``."""
    for _, m in _bnlab_layers_for("unfreeze", model):
        m.frozen = False
        if params:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------ folding
class ChannelAffine(nn.Module):
    """``y = scale[c] * x + shift[c]`` over channel dim 1: a BatchNorm at inference that no
    preceding Linear/Conv could absorb."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = _LINEAR_TYPES + _TRANSPOSE_TYPES


def _bn_scale_shift(bn: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """(s, t) in float64 with ``BN(z) = s * z + t`` at inference::

    s = gamma / sqrt(Var[x] + eps),   t = beta - s * E[x]
    """
    if bn.running_mean is None:
        raise ValueError(
            f"fold: layer '{name}' has track_running_stats=False; it always uses batch statistics "
            "and cannot be folded"
        )
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    s = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def _fold_into(lin: nn.Module, bn: nn.Module, lin_name: str, bn_name: str) -> nn.Module:
    """A copy of ``lin`` (Linear/Conv/ConvTranspose) computing ``BN(lin(x))``::

    W'[o] = s[o] * W[o],   b'[o] = s[o] * b[o] + t[o]      (b = 0 without bias)
    """
    out_ch = lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels
    if out_ch != bn.num_features:
        raise ValueError(
            f"fold: '{lin_name}' has {out_ch} outputs but the following '{bn_name}' has "
            f"{bn.num_features} features"
        )
    s, t = _bn_scale_shift(bn, bn_name)
    w = lin.weight.detach().double()
    if isinstance(lin, _TRANSPOSE_TYPES):
        # weight (C_in, C_out/groups, k...): output channel g*(C_out/groups) + j is [g-block, j]
        g = lin.groups
        w5 = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s5 = s.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        w_new = (w5 * s5).reshape(w.shape)
    else:  # weight (C_out, C_in/groups, k...) or (out, in)
        w_new = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    b = lin.bias.detach().double() if lin.bias is not None else torch.zeros_like(s)
    b_new = s * b + t
    new = copy.deepcopy(lin)
    dtype, device = lin.weight.dtype, lin.weight.device
    new.weight = nn.Parameter(w_new.to(dtype=dtype, device=device), requires_grad=False)
    new.bias = nn.Parameter(b_new.to(dtype=dtype, device=device), requires_grad=False)
    return new


def _affine_of(bn: nn.Module, name: str) -> ChannelAffine:
    s, t = _bn_scale_shift(bn, name)
    dtype = bn.running_mean.dtype
    return ChannelAffine(s.to(dtype), t.to(dtype))


def _shared_params(model: nn.Module) -> set[int]:
    """ids of modules whose weight tensor also belongs to another module (weight tying)."""
    owners: dict[int, list[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(id(m))
    return {mid for ids in owners.values() if len(ids) > 1 for mid in ids}


def _fold_sequential(seq: nn.Sequential, prefix: str, shared: set[int]) -> nn.Sequential:
    out: list[tuple[str, nn.Module]] = []
    children = list(seq.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        qual = f"{prefix}.{name}" if prefix else name
        nxt = children[i + 1] if i + 1 < len(children) else None
        if (
            isinstance(child, _FOLDABLE)
            and nxt is not None
            and _is_bn(nxt[1])
            and id(child) not in shared
        ):
            bn_qual = f"{prefix}.{nxt[0]}" if prefix else nxt[0]
            out.append((name, _fold_into(child, nxt[1], qual, bn_qual)))
            out.append((nxt[0], nn.Identity()))
            i += 2
            continue
        if _is_bn(child):
            out.append((name, _affine_of(child, qual)))
        else:
            out.append((name, _fold_module(child, qual, shared)))
        i += 1
    return nn.Sequential(OrderedDict(out))


class _LeafTracer(torch.fx.Tracer):
    """Traces through user modules; keeps BN, Linear and Conv layers as single call nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _is_bn(m) or isinstance(m, _FOLDABLE):
            return True
        return super().is_leaf_module(m, qualname)


def _fold_fx(model: nn.Module, prefix: str, shared: set[int]) -> nn.Module:
    """Fold BNs inside an arbitrary module. torch.fx traces the forward only to *prove* each fold
    safe; the folds are then made in ``model`` itself (folded layer in place of the Linear/Conv,
    ``nn.Identity`` in place of the BN), so the module keeps its class and its own forward."""
    where = f"'{prefix}' " if prefix else ""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # tracing failures come as many types (TraceError, TypeError, ...)
        raise ValueError(
            f"fold: cannot trace module {where}({type(model).__name__}) with torch.fx: {exc}. "
            "Folding an arbitrary module needs a traceable forward (no data-dependent control flow)"
        ) from exc
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    # modules whose parameters or buffers the forward reads directly (e.g. self.bn.weight)
    read_directly = {
        node.target.rsplit(".", 1)[0]: node.target for node in graph.nodes if node.op == "get_attr"
    }

    def qual(target: str) -> str:
        return f"{prefix}.{target}" if prefix else target

    def check_not_read(target: str) -> None:
        if target in read_directly:
            raise ValueError(
                f"fold: the forward reads '{qual(read_directly[target])}' directly; folding "
                f"'{qual(target)}' would change it, so the graph is not provably safe to fold"
            )

    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not _is_bn(bn):
            continue
        bn_name = qual(node.target)
        if calls[node.target] > 1:
            raise ValueError(
                f"fold: BatchNorm '{bn_name}' is called {calls[node.target]} times in the forward; "
                "a shared BN cannot be folded into one preceding layer"
            )
        check_not_read(node.target)
        src = node.args[0] if node.args else None
        lone = (
            len(node.args) != 1
            or node.kwargs
            or not isinstance(src, torch.fx.Node)
            or src.op != "call_module"
            or not isinstance(model.get_submodule(src.target), _FOLDABLE)
        )
        if lone:
            _set_submodule(model, node.target, _affine_of(bn, bn_name))
            continue
        lin = model.get_submodule(src.target)
        lin_name = qual(src.target)
        if len(src.users) != 1:
            others = ", ".join(f"'{u}'" for u in src.users if u is not node)
            raise ValueError(
                f"fold: the output of '{lin_name}' feeds '{bn_name}' and also {others}; folding "
                "would change what the other users see, so the graph is not provably safe"
            )
        if calls[src.target] > 1 or id(lin) in shared:
            raise ValueError(
                f"fold: '{lin_name}' (before '{bn_name}') is called more than once or shares its "
                "weights with another module; folding would change the other uses"
            )
        check_not_read(src.target)
        _set_submodule(model, src.target, _fold_into(lin, bn, lin_name, bn_name))
        _set_submodule(model, node.target, nn.Identity())
    return model


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _fold_module(module: nn.Module, prefix: str, shared: set[int]) -> nn.Module:
    if not any(_is_bn(m) for m in module.modules()):
        return module
    if _is_bn(module):
        return _affine_of(module, prefix or type(module).__name__)
    if type(module) is nn.Sequential:
        return _fold_sequential(module, prefix, shared)
    return _fold_fx(module, prefix, shared)


def fold(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with its BatchNorm layers folded away (section 3.1: at
    inference BN is "simply a linear transform applied to each activation").

    Each BN (bnlab or torch.nn) in eval mode computes ``BN(z) = s * z + t`` with
    ``s = gamma / sqrt(Var[x] + eps)`` and ``t = beta - s * E[x]``. When ``z`` is the output of a
    ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` (any ``groups``, with or without
    bias) used by nothing else, that layer is replaced by one with ``W' = s * W`` (per output
    channel) and ``b' = s * b + t`` and the BN disappears; any other BN becomes a
    :class:`ChannelAffine`. Folded weights are computed in float64 and rounded once, so outputs
    match the unfolded eval model to the rounding of the model's dtype.

    ``nn.Sequential`` is folded pairwise; any other module is traced with ``torch.fx`` (BN, Linear
    and Conv layers kept as leaves) to prove each fold safe. Either way the copy keeps its class,
    structure and forward: folded layers replace the Linear/Conv, ``nn.Identity`` replaces each
    folded BN. (The traced ``GraphModule`` is used for the analysis only, never returned: its
    generated forward ran measurably slower than the module's own on CPU, see
    ``benchmarks/bench_fold.py``.) ``Linear -> BatchNorm1d`` is folded for the ``(N, C)`` input the
    pair is built for. The input model is not modified.

    Raises ``ValueError`` naming the layer when the model (or a BN layer) is in training mode,
    when a BN has no running statistics, when the forward cannot be traced, or when the graph is
    not provably safe: the Linear/Conv output also used elsewhere, a layer called more than once,
    shared weights, or BN parameters read directly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if m.training and (_is_bn(m) or m is model):
            what = f"layer '{name}'" if name else "the model"
            raise ValueError(
                f"fold: {what} is in training mode, where BN uses mini-batch statistics; "
                "call model.eval() first"
            )
    copied = copy.deepcopy(model)
    return _fold_module(copied, "", _shared_params(copied))


# ------------------------------------------------------------------------------------ diagnosis
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

    The data passes through the model with every BN layer temporarily in eval mode (restored
    afterwards; no statistics change), i.e. through the inference network, so each layer sees
    what it will see at inference. Flags per layer:

    * ``never-updated``: ``num_batches_tracked == 0`` (running stats still at their 0/1 init);
    * ``stale``: some channel has ``mean_shift > shift_tol`` or ``var_ratio`` outside
      ``[1/var_tol, var_tol]``;
    * ``non-finite``: NaN/Inf in the stored statistics;
    * ``no-running-stats``: ``track_running_stats=False`` (always batch statistics; skipped).

    Returns one :class:`LayerDiagnosis` per layer, in execution order then registration order.
    """
    if not shift_tol > 0 or not var_tol > 1:
        raise ValueError(
            f"diagnose: need shift_tol > 0 and var_tol > 1, got {shift_tol!r}, {var_tol!r}"
        )
    layers = _bn_layers(model)
    tracked = [(n, m) for n, m in layers if m.running_mean is not None]
    moments = {id(m): _Moments() for _, m in tracked}
    order: list[int] = []

    def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) not in order:
            order.append(id(module))
        moments[id(module)].add(args[0])

    saved = [(m, m.training) for _, m in tracked]
    handles = [m.register_forward_pre_hook(collect) for _, m in tracked]
    device = _model_device(model)
    try:
        for _, m in tracked:
            m.eval()
        for x in _iterate(batches, num_batches, progress, "diagnose"):
            model(x.to(device) if device is not None else x)
    finally:
        for h in handles:
            h.remove()
        for m, training in saved:
            m.train(training)
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
        ratio = mom.variance("unbiased") / rv
        if not math.isfinite(float(shift.max())) and "non-finite" not in flags:
            flags.append("non-finite")
        if float(shift.max()) > shift_tol or not (
            1.0 / var_tol <= float(ratio.min()) and float(ratio.max()) <= var_tol
        ):
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
