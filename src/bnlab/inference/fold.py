"""Folding: :func:`fold` and :class:`ChannelAffine`.

Ioffe & Szegedy (2015), section 3.1, Algorithm 2: at inference BatchNorm is "simply a linear
transform applied to each activation", ``BN(z) = s * z + t`` with ``s = gamma / sqrt(Var[x] + eps)``
and ``t = beta - s * E[x]``; section 3.2 applies it per feature map after a convolution ``Wu + b``.
That map is merged into the preceding Linear/Conv/ConvTranspose (``W' = s * W`` per output channel,
``b' = s * b + t``), or kept as a :class:`ChannelAffine` when nothing precedes it. ``nn.Sequential``
is folded pair by pair; any other module is analysed with a ``torch.fx`` trace that proves each
fold safe. All the fold logic lives here.

What "proves" means here: every replacement computes the same function as what it replaces, for
every input the original accepts, or the input is refused with an error.

* A BN is replaced only when its eval-mode forward is one this module knows (bnlab's and torch's
  own ``forward``, no hooks, a fused activation of ``None`` or ``"relu"``, which is carried as an
  ``nn.ReLU`` or in the :class:`ChannelAffine`); any other BN stops the fold with an error.
* A Linear/Conv absorbs the BN only when its forward is torch's own (no override, no hooks, no
  parametrization such as weight or spectral norm, which recompute the weight at every call) and
  nothing else uses it or its output; otherwise it is left alone and the BN becomes a
  :class:`ChannelAffine`, which is exact whatever precedes it.
* ``W' = s * W`` scales the layer's *output channel*, and BN normalizes dimension 1: the two agree
  only for batched input (``(N, C)`` for a Linear, ``(N, C, *spatial)`` for a conv). A folded layer
  carries a forward pre-hook that refuses any other input rank (a ``Linear`` on ``(N, L, F)``
  followed by ``BatchNorm1d`` would otherwise scale the wrong dimension silently).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.batchnorm import _BatchNorm
from ..ops import shape_text
from ._common import _bn_layers, _is_bn, _TorchBN

__all__ = ["ChannelAffine", "fold"]


class ChannelAffine(nn.Module):
    """``y = scale[c] * x + shift[c]`` over channel dim 1 (then ``max(y, 0)`` when
    ``activation="relu"``): a BatchNorm at inference that no preceding Linear/Conv could absorb."""

    def __init__(self, scale: Tensor, shift: Tensor, activation: str | None = None) -> None:
        super().__init__()
        if activation not in (None, "relu"):
            raise ValueError(
                f"ChannelAffine: activation must be None or 'relu', got {activation!r}"
            )
        self.activation = activation
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.scale.view(shape) + self.shift.view(shape)
        return torch.relu(y) if self.activation == "relu" else y

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        return f"{self.scale.numel()}{act}"


_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = _LINEAR_TYPES + _TRANSPOSE_TYPES
# eval-mode forwards whose meaning is known: bnlab's layer (and its variants, which differ only in
# how training-mode statistics are computed), torch's BatchNorm1d/2d/3d and SyncBatchNorm
_KNOWN_BN_FORWARDS = (_BatchNorm.forward, _TorchBN.forward, nn.SyncBatchNorm.forward)


def _hooks(m: nn.Module) -> list[str]:
    """Names of the kinds of forward hooks registered on ``m`` itself."""
    kinds = {
        "forward pre-hook": m._forward_pre_hooks,
        "forward hook": m._forward_hooks,
    }
    return [k for k, d in kinds.items() if d]


def _bn_activation(bn: nn.Module, name: str) -> str | None:
    """The fused activation of ``bn`` after checking that its eval-mode forward is one fold can
    reproduce (else ValueError naming the layer)."""
    if type(bn).forward not in _KNOWN_BN_FORWARDS or (
        isinstance(bn, _BatchNorm) and type(bn)._use_batch_stats is not _BatchNorm._use_batch_stats
    ):
        raise ValueError(
            f"fold: layer '{name}' ({type(bn).__name__}) overrides the BatchNorm forward; fold "
            "cannot prove what it computes at inference, so it cannot be folded"
        )
    hooks = _hooks(bn)
    if hooks:
        raise ValueError(
            f"fold: layer '{name}' has a {hooks[0]}; folding removes the layer and its hooks "
            "would no longer run. Remove the hook before folding"
        )
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"fold: lazy layer '{name}' is not initialized; run a forward first")
    activation = getattr(bn, "activation", None) if isinstance(bn, _BatchNorm) else None
    if activation not in (None, "relu"):
        raise ValueError(
            f"fold: layer '{name}' has activation={activation!r}, which fold cannot carry "
            "(only None and 'relu')"
        )
    return activation


def _after_fold(activation: str | None) -> nn.Module:
    """What takes the place of a BN folded into the layer before it."""
    return nn.ReLU() if activation == "relu" else nn.Identity()


def _bn_scale_shift(bn: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """(s, t) in float64 with ``BN(z) = s * z + t`` at inference::

    s = gamma / sqrt(Var[x] + eps),   t = beta - s * E[x]
    """
    if bn.running_mean is None:
        raise ValueError(
            f"fold: layer '{name}' has track_running_stats=False; it always uses batch statistics "
            "and cannot be folded"
        )
    c = bn.num_features
    for what, p in (("running_mean", bn.running_mean), ("running_var", bn.running_var),
                    ("weight", bn.weight), ("bias", bn.bias)):  # fmt: skip
        if p is not None and p.numel() != c:
            raise ValueError(f"fold: layer '{name}' has a {what} of {p.numel()} values for {c} "
                             "channels")  # fmt: skip
    # (any shape of C values, as torch's layer reads them)
    var = bn.running_var.detach().double().reshape(-1)
    mean = bn.running_mean.detach().double().reshape(-1)
    s = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double().reshape(-1)
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double().reshape(-1)
    return s, t


def _plain_linear(m: nn.Module) -> bool:
    """``m`` is a Linear/Conv/ConvTranspose that computes torch's own ``W u + b`` from its
    ``weight`` and ``bias`` attributes: no overridden forward, no hooks (a pre-hook may rewrite
    the weight, as the old ``weight_norm`` does), no parametrization, initialized."""
    base = next((b for b in _FOLDABLE if isinstance(m, b)), None)
    if base is None or type(m).forward is not base.forward:
        return False
    if hasattr(base, "_conv_forward") and type(m)._conv_forward is not base._conv_forward:
        return False
    if _hooks(m) or nn.utils.parametrize.is_parametrized(m):
        return False
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return False
    return isinstance(m.weight, Tensor)


def _batched_input(module: nn.Module, args: tuple[Tensor]) -> None:
    """Forward pre-hook of a layer folded with the BN that followed it: the fold scaled the
    layer's output channel, which is the channel BN normalized (dim 1) only for batched input of
    rank ``module._fold_rank`` (``(N, C)`` for a Linear, ``(N, C, *spatial)`` for a conv). Any
    other input is refused, since the unfolded pair would compute something else (e.g. a Linear
    applied to the last dim of ``(N, L, F)`` followed by ``BatchNorm1d`` normalizing ``L``).
    A function of the module's attributes, which TorchScript compiles with the module (for
    calls with one argument, as ``nn.Sequential`` and model code make them: TorchScript types
    a pre-hook's arguments as each call passes them)."""
    if not torch.jit.is_scripting():
        if not args or not isinstance(args[0], Tensor):
            return  # (the layer refuses it itself)
    _check_rank(args[0], module._fold_rank, module._fold_name, module._fold_bn_name)


def _check_rank(x: Tensor, rank: int, name: str, bn_name: str) -> None:
    if x.dim() != rank:
        raise ValueError(
            "folded layer '" + name + "': expected a " + str(rank) + "D input, got shape "
            + shape_text(list(x.shape)) + ". '" + bn_name + "' was folded into it, which is "
            "exact only when BN's channel (dim 1) is this layer's output channel, i.e. for "
            + str(rank) + "D input; for this input use the unfolded model"
        )  # fmt: skip


class _BatchedInput:
    """The pre-hook of folded layers as an object, as earlier versions registered it: kept so
    that models they folded and pickled still load (such a model runs, but TorchScript cannot
    compile an object hook; fold the unfolded model again to script it)."""

    def __init__(self, rank: int, name: str, bn_name: str) -> None:
        self.rank, self.name, self.bn_name = rank, name, bn_name

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() != self.rank:
            raise ValueError(
                f"folded layer '{self.name}': expected a {self.rank}D input, got shape "
                f"{tuple(args[0].shape)}. '{self.bn_name}' was folded into it, which is exact only "
                f"when BN's channel (dim 1) is this layer's output channel, i.e. for {self.rank}D "
                "input; for this input use the unfolded model"
            )


def _fold_into(lin: nn.Module, bn: nn.Module, lin_name: str, bn_name: str) -> nn.Module:
    """A copy of ``lin`` (Linear/Conv/ConvTranspose) computing ``BN(lin(x))`` without the fused
    activation (the caller carries it)::

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
    rank = 2 if isinstance(lin, nn.Linear) else lin.weight.dim()  # conv weight: 2 + spatial
    new._fold_rank, new._fold_name, new._fold_bn_name = rank, lin_name, bn_name
    new.register_forward_pre_hook(_batched_input)
    return new


def _affine_of(bn: nn.Module, name: str) -> ChannelAffine:
    activation = _bn_activation(bn, name)
    s, t = _bn_scale_shift(bn, name)
    dtype = bn.running_mean.dtype
    return ChannelAffine(s.to(dtype), t.to(dtype), activation)


def _shared_params(model: nn.Module) -> set[int]:
    """ids of modules whose weight tensor also belongs to another module (weight tying)."""
    owners: dict[int, list[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(id(m))
    return {mid for ids in owners.values() if len(ids) > 1 for mid in ids}


def _places(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name under which each module is registered, repeats included (a module
    registered twice, or inside a container registered twice, has several)."""
    out: dict[int, list[str]] = {}

    def walk(m: nn.Module, prefix: str, depth: int) -> None:
        out.setdefault(id(m), []).append(prefix)
        if depth > 100:  # a module that contains itself
            raise ValueError(f"fold: module '{prefix}' contains itself")
        for name, child in m._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{name}" if prefix else name, depth + 1)

    walk(model, "", 0)
    return out


class _Context:
    """What the whole-model analysis knows while folding one part: weight-tied modules and where
    each module is registered."""

    def __init__(self, model: nn.Module) -> None:
        self.shared = _shared_params(model)
        self.places = _places(model)

    def reused(self, m: nn.Module) -> list[str]:
        names = self.places.get(id(m), [])
        return names if len(names) > 1 else []


def _fold_sequential(seq: nn.Sequential, prefix: str, ctx: _Context) -> nn.Sequential:
    """Fold ``seq`` in place, entry by entry: every entry of ``_modules`` is one position of the
    forward (the same module object at two positions is two calls), so each position gets its own
    replacement and no module object is changed."""
    entries = [(k, m) for k, m in seq._modules.items() if m is not None]
    i = 0
    while i < len(entries):
        name, child = entries[i]
        qual = f"{prefix}.{name}" if prefix else name
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        if nxt is not None and _is_bn(nxt[1]):
            bn_name, bn = nxt
            bn_qual = f"{prefix}.{bn_name}" if prefix else bn_name
            activation = _bn_activation(bn, bn_qual)
            if _plain_linear(child) and id(child) not in ctx.shared:
                seq._modules[name] = _fold_into(child, bn, qual, bn_qual)
                seq._modules[bn_name] = _after_fold(activation)
                i += 2
                continue
        if _is_bn(child):
            seq._modules[name] = _affine_of(child, qual)
        else:
            seq._modules[name] = _fold_module(child, qual, ctx)
        i += 1
    return seq


class _LeafTracer(torch.fx.Tracer):
    """Traces through user modules; keeps BN, Linear and Conv layers as single call nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _is_bn(m) or isinstance(m, _FOLDABLE):
            return True
        return super().is_leaf_module(m, qualname)


def _fold_fx(model: nn.Module, prefix: str, ctx: _Context) -> nn.Module:
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

    def check_registered_once(m: nn.Module, target: str) -> None:
        # torch.fx names a module by the first name it is registered under; a replacement made
        # there would leave the other name (which the forward may call) pointing at the original
        names = ctx.reused(m)
        if names:
            raise ValueError(
                f"fold: '{qual(target)}' is registered under several names "
                f"({', '.join(repr(n) for n in names)}); folding one of them would leave the "
                "others unchanged, so the graph is not provably safe. Use one module per place"
            )

    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not _is_bn(bn):
            continue
        bn_name = qual(node.target)
        activation = _bn_activation(bn, bn_name)
        if calls[node.target] > 1:
            raise ValueError(
                f"fold: BatchNorm '{bn_name}' is called {calls[node.target]} times in the forward; "
                "a shared BN cannot be folded into one preceding layer"
            )
        check_not_read(node.target)
        check_registered_once(bn, node.target)
        src = node.args[0] if node.args else None
        lone = (
            len(node.args) != 1
            or node.kwargs
            or not isinstance(src, torch.fx.Node)
            or src.op != "call_module"
            or not _plain_linear(model.get_submodule(src.target))
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
        if calls[src.target] > 1 or id(lin) in ctx.shared:
            raise ValueError(
                f"fold: '{lin_name}' (before '{bn_name}') is called more than once or shares its "
                "weights with another module; folding would change the other uses"
            )
        check_not_read(src.target)
        check_registered_once(lin, src.target)
        _set_submodule(model, src.target, _fold_into(lin, bn, lin_name, bn_name))
        _set_submodule(model, node.target, _after_fold(activation))
    return model


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _fold_module(module: nn.Module, prefix: str, ctx: _Context) -> nn.Module:
    if not any(_is_bn(m) for m in module.modules()):
        return module
    if _is_bn(module):
        return _affine_of(module, prefix or type(module).__name__)
    if type(module) is nn.Sequential:
        return _fold_sequential(module, prefix, ctx)
    return _fold_fx(module, prefix, ctx)


def fold(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with its BatchNorm layers folded away (section 3.1: at
    inference BN is "simply a linear transform applied to each activation").

    Each BN (bnlab or torch.nn) in eval mode computes ``BN(z) = s * z + t`` with
    ``s = gamma / sqrt(Var[x] + eps)`` and ``t = beta - s * E[x]``. When ``z`` is the output of a
    plain ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` (any ``groups``, with or
    without bias) used by nothing else, that layer is replaced by one with ``W' = s * W`` (per
    output channel) and ``b' = s * b + t`` and the BN by ``nn.Identity`` (``nn.ReLU`` for a bnlab
    BN with ``activation="relu"``); any other BN becomes a :class:`ChannelAffine` (with the same
    activation). Folded weights are computed in float64 and rounded once, so outputs match the
    unfolded eval model to the rounding of the model's dtype.

    ``nn.Sequential`` is folded position by position (a module object used at two positions is
    two calls, folded separately); any other module is traced with ``torch.fx`` (BN, Linear and
    Conv layers kept as leaves) to prove each fold safe. Either way the copy keeps its class,
    structure, hooks and forward. (The traced ``GraphModule`` is used for the analysis only, never
    returned: its generated forward ran measurably slower than the module's own on CPU, see
    ``benchmarks/bench_fold.py``.) A folded layer accepts only batched input (``(N, C)`` for a
    Linear, ``(N, C, *spatial)`` for a conv: the shapes for which BN's channel is the layer's
    output channel) and raises ``ValueError`` naming itself for any other. A Linear/Conv with an
    overridden forward, hooks or a parametrization (weight norm, spectral norm) is kept as it is
    and the BN after it becomes a :class:`ChannelAffine`. The input model is not modified.

    Raises ``ValueError`` naming the layer when the model (or a BN layer) is in training mode,
    when a BN has no running statistics, overrides the BatchNorm forward, has hooks or a fused
    activation other than ReLU, when the forward cannot be traced, or when the graph is not
    provably safe: the Linear/Conv output also used elsewhere, a layer called more than once or
    registered under several names, shared weights, or BN parameters read directly.
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
    _bn_layers(model, "fold")  # (refuses a lazy layer not sized yet, which cannot be copied)
    try:
        copied = copy.deepcopy(model)
    except Exception as exc:  # e.g. torch.nn.utils.weight_norm's non-leaf weights
        raise ValueError(
            f"fold: the model cannot be copied ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); fold works on a copy and leaves "
            "the model unchanged"
        ) from exc
    return _fold_module(copied, "", _Context(copied))
