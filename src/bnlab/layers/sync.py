"""Synchronized Batch Normalization over ``torch.distributed``, on CPUs: ``SyncBatchNorm`` and
:func:`convert_sync`.

In data-parallel training each process (rank) holds a part of the mini-batch. Plain BN then
normalizes each part with its own statistics (per-device BN); ``SyncBatchNorm`` normalizes
every part with the statistics of the whole mini-batch, so training on ``W`` ranks computes
what one process computes on the concatenated batch (Algorithm 1 of Ioffe & Szegedy 2015 over
the global batch; same outputs, same gradients, same running averages). torch's own
``torch.nn.SyncBatchNorm`` refuses CPU tensors; this one runs with the ``gloo`` backend.

Forward, in training mode under an initialized process group of more than one rank::

    each rank: m_r values per channel, mean_r, M2_r = sum (x - mean_r)^2        (C,) each
    all_gather (m_r, mean_r, M2_r), merged in rank order (Chan et al.'s pairwise update, in
    float64): M = sum m_r, mu_B, var_B = M2 / M       -> identical on every rank
    y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta

Backward (the section 3 gradient with global sums; one ``all_reduce`` of 2C values)::

    sum_dy = sum over all ranks of dL/dy,   sum_dy_xhat = sum over all ranks of dL/dy * x_hat
    dL/dx  = gamma / sqrt(var_B + eps) * (dL/dy - sum_dy / M - x_hat * sum_dy_xhat / M)
    dL/dgamma, dL/dbeta: this rank's sums (DistributedDataParallel averages them over ranks)

Ranks may hold different numbers of examples, or none (an empty part still joins the
collectives, gets an empty output and zero gradients, and updates its running averages with
the global statistics like the others). Counts are exact, so the result is the concatenated
batch's whatever the split. Every rank must call the layer the same number of times (as for
any collective); a global batch of one value per channel is refused on every rank, a non-finite
value on any rank makes every rank raise ``FloatingPointError`` with nothing changed.

Outside training mode, without an initialized process group, or with one rank, the layer is
bnlab's BatchNorm (no communication), as torch's SyncBatchNorm. One class for every input rank
(2D to 5D), as torch's. It is not a subclass of ``torch.nn.SyncBatchNorm``:
``DistributedDataParallel`` refuses those on CPU. Synchronization runs in eager mode (the
collectives are not captured by ``torch.compile``/``export``); at inference the layer is BN, so
:func:`bnlab.fold`, :func:`bnlab.freeze` and exports of an eval-mode model treat it as BN.

:func:`convert_sync` (also ``bnlab.convert(model, sync=True)`` and
``SyncBatchNorm.convert_sync_batchnorm``) turns the BatchNorm layers of a model into
``SyncBatchNorm`` with their state, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import backend as B
from ..functional import acc_dtype, per_channel, reduce_dims
from ..ops import EAGER, non_finite_message, relu_grad, route, shape_text
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm, name_layers

__all__ = ["SyncBatchNorm", "convert_sync", "gather_batch_stats"]


def _dist():
    import torch.distributed as dist

    return dist


def gather_batch_stats(x: Tensor, group: Any = None) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of the batch formed by every rank's ``x``, and its
    number of values per channel ``M`` (all ranks get bit-identical results). Statistics are in
    ``acc_dtype(x.dtype)``; the exchange and merge are in float64. Collective: every rank of
    ``group`` (default: the world) must call it."""
    dist = _dist()
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    m = x.numel() // c if c else 0
    mine = torch.zeros(1 + 2 * c, dtype=torch.float64, device=x.device)
    if m:
        with torch.no_grad():  # explicit two-pass moments (torch.var_mean is slower on CPUs)
            xa = x.detach().to(acc)
            dims = reduce_dims(x)
            mean = xa.mean(dims)
            var = (xa - per_channel(mean, x)).square().mean(dims)
        mine[0] = m
        mine[1 : 1 + c] = mean.to(torch.float64)
        mine[1 + c :] = var.to(torch.float64) * m
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    total, mean64, m2 = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for p in parts:  # Chan, Golub & LeVeque's pairwise merge, in rank order
        n_b = int(p[0].item())
        if n_b == 0:
            continue
        mean_b, m2_b = p[1 : 1 + c], p[1 + c :]
        if total == 0:
            total, mean64, m2 = n_b, mean_b.clone(), m2_b.clone()
            continue
        n = total + n_b
        delta = mean_b - mean64
        mean64 = mean64 + delta * (n_b / n)
        m2 = m2 + m2_b + delta.square() * (total * n_b / n)
        total = n
    var64 = m2 / total if total else torch.ones(c, dtype=torch.float64)
    return mean64.to(acc), var64.to(acc), total


def _seen(x: Tensor, *others: Tensor | None) -> bool:
    """Whether a dispatch mode or a tensor subclass must see (or run) this call's arithmetic:
    then it runs in standard ops, as the other layers' calls do there (the kernels read memory
    directly, out of a mode's sight; the backward is in standard ops already)."""
    return route(x, *others) != EAGER


class _SyncBatchNormFn(torch.autograd.Function):
    """y = BN(x; global mu_B, var_B) [then ReLU], with the global-sum backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps, relu, group):
        if x.numel() == 0:
            y, invstd = torch.empty_like(x), torch.rsqrt(var + eps)
        else:
            _, y, invstd = B.eval_forward(x, mean, var, weight, bias, eps, relu=relu,
                                          reference=_seen(x, weight, bias, mean, var))
        ctx.save_for_backward(x, weight, mean, invstd, y if relu else None)
        ctx.count, ctx.group, ctx.has_bias = count, group, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, y = ctx.saved_tensors
        acc = mean.dtype
        dims = reduce_dims(x)
        g = relu_grad(dy, y).to(acc)  # dL/d(BN output): dy, where y > 0 with the fused ReLU
        x_hat = (x.to(acc) - per_channel(mean, x)) * per_channel(invstd, x)
        local = torch.stack((g.sum(dims), (g * x_hat).sum(dims)))  # (2, C): sum dy, sum dy*x_hat
        total = local.clone()
        _dist().all_reduce(total, group=ctx.group)  # every rank, whatever it needs
        dx = dgamma = dbeta = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(acc)
            m = float(ctx.count)
            dx = g - per_channel(total[0] / m, x) - x_hat * per_channel(total[1] / m, x)
            dx = (dx * per_channel(scale, x)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dgamma = local[1].to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbeta = local[0].to(weight.dtype if weight is not None else acc)
        return dx, dgamma, dbeta, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch Normalization whose training-mode statistics are those of the batch of every rank
    of ``process_group`` (default: the world); see the module docstring. Constructor as
    ``torch.nn.SyncBatchNorm`` (+ bnlab's ``activation``)."""

    _valid_ranks = (2, 3, 4, 5)
    _rank_text = "2D to 5D (N, C, *)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, activation=activation,
        )  # fmt: skip
        self.process_group = process_group
        self._sync_count: int | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """:func:`convert_sync` under torch's name."""
        return convert_sync(module, process_group)

    def _sync_group(self) -> Any:
        """The process group to synchronize over, or None when this call does not synchronize
        (eval mode, no initialized process group, or a group of one rank)."""
        if not self.training or torch.jit.is_scripting():
            return None
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _check_input(
        self,
        x: Tensor,
        batch_stats: bool,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
    ) -> None:
        """BatchNorm's checks, except that one value per channel on this rank is fine when
        synchronizing (the global batch is checked once the counts are known)."""
        if batch_stats and not torch.jit.is_scripting() and self._sync_group() is not None:
            super()._check_input(x, False, weight, bias, running_mean, running_var)
            if self.eps <= 0:  # (NaN passes, as in torch)
                raise ValueError(
                    f"{self._describe()}: eps must be > 0 when using batch statistics, got "
                    f"{self.eps}"
                )
            return
        super()._check_input(x, batch_stats, weight, bias, running_mean, running_var)

    def _train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._sync_count = None
        group = self._sync_group()
        if group is None:
            return super()._train_forward(x)
        mean, var, count = gather_batch_stats(x, group)
        if count == 0:  # every rank's part is empty: BN's empty batch (counted, nothing else)
            self._sync_count = 0
            return super()._train_forward(x)
        if count == 1:
            raise ValueError(
                f"{self._describe()}: expected more than 1 value per channel when using batch "
                f"statistics, got 1 over all ranks (this rank's input of shape "
                f"{shape_text(list(x.shape))})"
            )
        weight, bias = self._affine()
        y = _SyncBatchNormFn.apply(x, weight, bias, mean, var, count, self.eps,
                                   self.activation == "relu", group)  # fmt: skip
        self._sync_count = count
        return y, mean, var

    def _commit_batch_stats(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        """BatchNorm's accept-or-refuse, with the global count ``M`` (not this rank's) in the
        unbiased variance ``M / (M - 1) * var_B``, so every rank updates its running averages
        with the same values, an empty rank included."""
        count, self._sync_count = self._sync_count, None
        if count is None:
            return super()._commit_batch_stats(x, mean, var)
        update = self.training and self.track_running_stats
        momentum = self._check_momentum() if update else None  # (a float, or None)
        ok = B.commit_stats(mean, var, self.running_mean, self.running_var,
                            self.num_batches_tracked, momentum, count, update,
                            reference=_seen(x, mean, var))  # fmt: skip
        if not ok:
            raise FloatingPointError(non_finite_message(self._describe(), list(x.shape)))


# ------------------------------------------------------------------------------ conversion
_CONVERTIBLE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    BatchNorm1d, BatchNorm2d, BatchNorm3d,
)  # fmt: skip
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _to_sync(old: nn.Module, process_group: Any) -> SyncBatchNorm:
    group = process_group if process_group is not None else getattr(old, "process_group", None)
    new = SyncBatchNorm(
        old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
        track_running_stats=old.track_running_stats, process_group=group,
        bias=getattr(old, "bias", None) is not None or not old.affine,
        activation=getattr(old, "activation", None), device="meta",
    )  # fmt: skip
    for key in _STATE:  # the same tensors: an optimizer built before keeps working
        value = getattr(old, key)
        if key in ("weight", "bias"):
            new._parameters[key] = value
        else:
            new._buffers[key] = value
    new.train(old.training)
    new.frozen = bool(getattr(old, "frozen", False))
    new.population_estimator = getattr(old, "population_estimator", None)
    return new


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` (torch's or bnlab's) and ``torch.nn.SyncBatchNorm``
    in ``model`` by a bnlab :class:`SyncBatchNorm` holding the same parameter and buffer
    objects (so an optimizer built before keeps updating them), mode, fused activation and
    frozen state. ``process_group`` (default: the world, or the group a torch SyncBatchNorm
    had) is the group statistics are shared over.

    bnlab's variants (batch renormalization, ghost BN) are left as they are: their statistics
    stay per rank by design (the Batch Renormalization paper's workers normalize over their own
    examples; ghost batches are per device). A module registered at several places is replaced
    by one new layer at all of them. Uninitialized lazy layers are refused (``ValueError``),
    checked before anything is replaced. Returns the model (a new layer when ``model`` itself
    is a BatchNorm layer)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync: model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules(remove_duplicate=True):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and (
            module.has_uninitialized_params()
        ):
            raise ValueError(
                f"convert_sync: lazy layer '{name or type(module).__name__}' is not "
                "initialized; run one forward pass first"
            )
    new: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        if id(module) in new:
            return new[id(module)]
        if type(module) in _CONVERTIBLE:
            new[id(module)] = _to_sync(module, process_group)
            return new[id(module)]
        new[id(module)] = module
        for child_name, child in list(module._modules.items()):
            if child is not None:
                replaced = visit(child)
                if replaced is not child:
                    module._modules[child_name] = replaced
        return module

    out = visit(model)
    name_layers(out)
    return out
