"""Folding: :func:`fold` and :class:`ChannelAffine`.

Ioffe & Szegedy (2015), section 3.1, Algorithm 2: at inference BatchNorm is "simply a linear
transform applied to each activation", ``BN(z) = s * z + t`` with ``s = gamma / sqrt(Var[x] + eps)``
and ``t = beta - s * E[x]``; section 3.2 applies it per feature map after a convolution ``Wu + b``.
That map is merged into the preceding Linear/Conv/ConvTranspose (``W' = s * W`` per output channel,
``b' = s * b + t``), or kept as a :class:`ChannelAffine` when nothing precedes it. ``nn.Sequential``
is folded pair by pair; any other module is analysed with a ``torch.fx`` trace that proves each
fold safe. All the fold logic lives here.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn

from ._common import _is_bn

__all__ = ["ChannelAffine", "fold"]


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
