"""Batch Renormalization (Ioffe 2017): ``BatchRenorm1d/2d/3d``.

Batch Normalization normalizes with the statistics of the mini-batch in training and with
population statistics at inference; with small or non-i.i.d. mini-batches the two differ, and
the network learns on activations it will not see at inference. Batch Renormalization (Ioffe
2017, Algorithm 1) keeps the mini-batch normalization but corrects it towards the moving
averages ``mu`` and ``sigma`` by a per-channel affine map that is treated as a constant::

    sigma_B = sqrt(var_B + eps)                          var_B biased (1/m), as in BN
    r = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
    d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
    x_hat = (x - mu_B) / sigma_B * r + d
    y = gamma * x_hat + beta

Without clipping ``x_hat = (x - mu) / sigma``: the training output is the inference output,
whatever the batch. ``r`` and ``d`` are constants in the backward, so the gradient is BN's
(section 3 of Ioffe & Szegedy 2015, through ``mu_B`` and ``sigma_B``) scaled by ``r``.

**Running statistics** are the paper's moving averages of the mean and of the *standard
deviation* (Algorithm 1 of Ioffe 2017)::

    mu    <- mu    + f * (mu_B    - mu)
    sigma <- sigma + f * (sigma_B - sigma)

with ``f`` the torch momentum (weight of the new batch; ``1 / num_batches_tracked`` for
``momentum=None``). They are kept in torch's buffers so state dicts, :func:`bnlab.fold`,
:func:`bnlab.freeze` and the inference transform are BN's: ``running_var`` holds
``sigma^2 - eps`` (clamped at 0), so ``sqrt(running_var + eps) = sigma``, and the inference
transform ``(x - running_mean) / sqrt(running_var + eps)`` is the paper's ``(x - mu) / sigma``.
(BN averages the unbiased variance instead; the two estimate the same population for large
``m`` and differ by ``m / (m - 1)`` for small ones.)

**Schedule.** ``rmax`` and ``dmax`` start at 1 and 0 (plain BN, while the moving averages
settle) for ``warmup_steps`` training steps, then rise linearly to ``rmax`` at ``rmax_steps``
and to ``dmax`` at ``dmax_steps``. The defaults are the paper's (Ioffe 2017, section 4: rmax = 1,
dmax = 0 for the first 5k steps, rmax 3 by 40k, dmax 5 by 25k; a secondary source for the exact
numbers, see docs/small-batches.md). For shorter runs pass :func:`renorm_schedule`'s scaled
values. The step is counted in the buffer ``renorm_steps`` (one per training-mode forward with
``track_running_stats=True``), so it is in the state dict and a resumed run continues the
schedule. :meth:`reset_running_stats` restarts it.

**Drop-in rules.** Constructor, buffers and inference are BN's (+ ``renorm_steps`` and the
schedule arguments). A BN state dict (torch's or bnlab's) loads into a BatchRenorm layer, whose
schedule then starts at step 0; torch's BatchNorm refuses the extra key ``renorm_steps`` in
strict mode (``load_state_dict(sd, strict=False)`` drops it). A non-finite batch raises
``FloatingPointError`` naming the layer and changes no buffer (neither the averages nor the
counters). With ``track_running_stats=False`` there are no moving averages to correct towards:
``r = 1``, ``d = 0``, the layer is BN.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..autograd import _relu_flag, batch_norm_train, commit_stats
from ..ops import non_finite_message
from .batchnorm import _BatchNorm

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "PAPER_SCHEDULE",
    "renorm_schedule",
    "renorm_limits",
]

#: Ioffe (2017), section 4: the clipping schedule over the paper's 160k-step run.
PAPER_SCHEDULE = {"warmup_steps": 5_000, "rmax_steps": 40_000, "dmax_steps": 25_000}
PAPER_STEPS = 160_000


def renorm_schedule(steps: int, paper_steps: int = PAPER_STEPS) -> dict[str, int]:
    """The paper's schedule scaled to a run of ``steps`` training steps (the same fractions of
    the run: warm-up 5k/160k, rmax reached at 40k/160k, dmax at 25k/160k), as constructor
    keyword arguments: ``BatchRenorm2d(c, **renorm_schedule(2000))``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"renorm_schedule: steps must be a positive int, got {steps!r}")
    if isinstance(paper_steps, bool) or not isinstance(paper_steps, int) or paper_steps < 1:
        raise ValueError(
            f"renorm_schedule: paper_steps must be a positive int, got {paper_steps!r}"
        )
    return {k: round(v * steps / paper_steps) for k, v in PAPER_SCHEDULE.items()}


def renorm_limits(
    step: int, rmax: float, dmax: float, warmup_steps: int, rmax_steps: int, dmax_steps: int
) -> tuple[float, float]:
    """``(rmax, dmax)`` in force at training step ``step`` (0-based): ``(1, 0)`` before
    ``warmup_steps``, then linear to ``(rmax, dmax)`` at ``rmax_steps`` / ``dmax_steps``."""
    return (
        1.0 + (rmax - 1.0) * _ramp(step, warmup_steps, rmax_steps),
        dmax * _ramp(step, warmup_steps, dmax_steps),
    )


def _ramp(step: float, start: int, end: int) -> float:
    if step < start:
        return 0.0
    if end <= start:
        return 1.0
    return min(1.0, (step - start) / (end - start))


def _check_schedule(name: str, rmax: Any, dmax: Any, steps: dict[str, Any]) -> None:
    for key, value in (("rmax", rmax), ("dmax", dmax)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: {key} must be a real number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name}: {key} must be finite, got {value!r}")
    if rmax < 1:
        raise ValueError(f"{name}: rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got {rmax}")
    if dmax < 0:
        raise ValueError(f"{name}: dmax must be >= 0 (d is clipped to [-dmax, dmax]), got {dmax}")
    for key, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: {key} must be an int >= 0, got {value!r}")
    for key in ("rmax_steps", "dmax_steps"):
        if steps[key] < steps["warmup_steps"]:
            raise ValueError(
                f"{name}: {key} ({steps[key]}) must be >= warmup_steps ({steps['warmup_steps']})"
            )


class _BatchRenorm(_BatchNorm):
    """Batch Renormalization: BN whose training-mode statistics are corrected towards the
    moving averages (see the module docstring)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: str | None = None,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = PAPER_SCHEDULE["warmup_steps"],
        rmax_steps: int = PAPER_SCHEDULE["rmax_steps"],
        dmax_steps: int = PAPER_SCHEDULE["dmax_steps"],
    ) -> None:
        steps = {"warmup_steps": warmup_steps, "rmax_steps": rmax_steps, "dmax_steps": dmax_steps}
        _check_schedule(type(self).__name__, rmax, dmax, steps)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, activation=activation,
        )  # fmt: skip
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.rmax_steps, self.dmax_steps = warmup_steps, rmax_steps, dmax_steps
        if track_running_stats:
            self.register_buffer(
                "renorm_steps", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("renorm_steps", None)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        steps = getattr(self, "renorm_steps", None)  # torch's __init__ calls this before we exist
        if steps is not None:
            steps.zero_()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rmax={self.rmax:g}, dmax={self.dmax:g}, "
            f"warmup_steps={self.warmup_steps}, rmax_steps={self.rmax_steps}, "
            f"dmax_steps={self.dmax_steps}"
        )

    def limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` the next training step will use."""
        step = 0 if self.renorm_steps is None else int(self.renorm_steps)
        return renorm_limits(step, self.rmax, self.dmax, self.warmup_steps, self.rmax_steps,
                             self.dmax_steps)  # fmt: skip

    def _limit_tensors(self, step: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`limits` as 0-d tensors at ``step``, the ``renorm_steps`` buffer in the dtype
        of the computation (no Python number is read from a tensor, so a captured graph keeps
        the schedule)."""
        start = self.warmup_steps
        return (
            1.0 + (self.rmax - 1.0) * _ramp_tensor(step, start, self.rmax_steps),
            self.dmax * _ramp_tensor(step, start, self.dmax_steps),
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # fmt: skip
        key = prefix + "renorm_steps"
        if self.renorm_steps is not None and key not in state_dict:
            # a BatchNorm state dict: its statistics and parameters, the schedule from step 0
            state_dict[key] = torch.zeros_like(self.renorm_steps)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip

    # ----------------------------------------------------------------------------- forward
    def _train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``y = gamma * (r * x_hat_B + d) + beta`` with ``x_hat_B`` Algorithm 1's normalized
        batch (bnlab's kernels, differentiable) and ``r``, ``d`` constants; returns
        ``(y, mu_B, biased var_B)``. Written for every tool: ``r`` and ``d`` come from detached
        statistics (a symbolic trace does not record a ``no_grad`` block), dtypes are taken from
        tensors and the (C,) coefficients broadcast with the channels moved last (fx knows
        neither dtype nor rank), and no base-class call (TorchScript has none)."""
        running_mean, running_var, steps = self.running_mean, self.running_var, self.renorm_steps
        weight, bias = self._affine()
        if running_mean is None or running_var is None or steps is None:
            return batch_norm_train(x, weight, bias, self.eps, self.activation)  # (BN's)
        x_hat, mean, var = batch_norm_train(x, None, None, self.eps, None)
        # (mean and var are in the accumulation dtype: float32 for 16-bit inputs)
        mu_b, var_b = mean.detach(), var.detach()
        rmax, dmax = self._limit_tensors(steps.to(mu_b))
        sigma = torch.sqrt(running_var.to(mu_b) + self.eps)
        r = torch.minimum(torch.maximum(torch.sqrt(var_b + self.eps) / sigma, 1.0 / rmax), rmax)
        d = torch.minimum(torch.maximum((mu_b - running_mean.to(mu_b)) / sigma, -dmax), dmax)
        scale, shift = r, d
        if weight is not None:
            scale = weight.to(mu_b) * r
            shift = weight.to(mu_b) * d
        if bias is not None:
            shift = shift + bias.to(mu_b)
        y = torch.addcmul(shift, x_hat.to(mu_b).movedim(1, -1), scale).movedim(-1, 1)
        if _relu_flag(self.activation):
            y = torch.relu(y)
        return y.to(x.dtype), mean, var

    def _commit_batch_stats(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        """Refuse non-finite statistics (FloatingPointError naming the layer, nothing
        changed); in training mode with tracking, count the step and update the moving
        averages of ``mu`` and ``sigma`` (module docstring, :func:`renorm_commit`). An empty
        batch is counted only."""
        running_mean, running_var, steps = self.running_mean, self.running_var, self.renorm_steps
        update = self.training and self.track_running_stats
        if torch.jit.is_scripting():
            if running_mean is None or running_var is None or steps is None:
                commit_stats(
                    x, mean, var, running_mean, running_var, self.num_batches_tracked,
                    self.momentum, update, self._describe(),
                )  # fmt: skip
            else:
                renorm_commit(
                    x, mean, var, running_mean, running_var, steps, self.num_batches_tracked,
                    self.momentum, update, self.eps, self._describe(),
                )  # fmt: skip
        else:
            if running_mean is None or running_var is None or steps is None:
                return super()._commit_batch_stats(x, mean, var)  # (BN's)
            momentum = self._check_momentum() if update else None  # (a float, or None)
            renorm_commit(
                x, mean, var, running_mean, running_var, steps, self.num_batches_tracked,
                momentum, update, self.eps, self._graph_describe(),
            )  # fmt: skip


def _ramp_tensor(step: Tensor, start: int, end: int) -> Tensor:
    """:func:`_ramp` of a step held in a 0-d floating-point tensor."""
    if end <= start:
        return (step >= start).to(step.dtype)
    return ((step - start) / (end - start)).clamp(0.0, 1.0)


@torch.fx.wrap  # (one node in a symbolic trace: the commit reads values fx does not have)
def renorm_commit(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    steps: Tensor,
    counted: Tensor | None,
    momentum: float | None,
    update: bool,
    eps: float,
    layer: str,
) -> None:
    """Accept the statistics ``mean``/``var`` (biased) of the batch ``x`` of the layer named
    ``layer``: ``FloatingPointError`` with no buffer changed if they are not finite; otherwise,
    when ``update``, count the step in ``steps`` and ``counted`` (``num_batches_tracked``, if
    any) and move the averages of ``mu`` and ``sigma`` by ``momentum`` (None: the cumulative
    average over the batches counted). An empty batch is counted only. Eager calls read
    values; TorchScript and the tools that capture a graph take its tensor form (below)."""
    if not torch.jit.is_scripting():
        if ops.route(x, running_mean, running_var) == ops.EAGER:
            _commit_eager(x, mean, var, running_mean, running_var, steps, counted, momentum,
                          update, eps, layer)  # fmt: skip
            return
    # In tensor operations only, for TorchScript and for a call a tool captures
    # (``torch.compile``, ``torch.export``, ``jit.trace``, ``torch.func``): no Python number is
    # read from a tensor but the finiteness flag where values can be read. Non-finite
    # statistics raise there and fail an assertion in a captured graph, as BN's commit
    # (:func:`bnlab.ops.decompose_commit`); every buffer, the counters included, is written
    # through ``torch.where`` on that flag, so a graph that cannot raise (``jit.trace``) leaves
    # them all unchanged.
    if x.numel() == 0:  # an empty batch: counted only
        if update:
            with torch.no_grad():
                if counted is not None:
                    counted.add_(1)
                steps.add_(1)
        return
    ok = torch.isfinite(var).all() & torch.isfinite(mean).all()
    if torch.jit.is_scripting():
        if not bool(ok):
            raise FloatingPointError(non_finite_message(layer))
    elif not ops._accept_python(x, var, ok, running_mean, update, layer):
        return
    if not update:
        return
    with torch.no_grad():
        buffers: list[Tensor] = [steps]
        values: list[Tensor] = [steps + ok.to(steps.dtype)]
        count: Tensor | None = None
        if counted is not None:
            count = counted + ok.to(counted.dtype)
            buffers.append(counted)
            values.append(count)
        dtype = running_mean.dtype
        mu_b, var_b = mean.detach(), var.detach()
        sigma = torch.sqrt(running_var.to(mu_b) + eps)
        sigma_b = torch.sqrt(var_b + eps)
        if momentum is not None:
            sigma_new = torch.lerp(sigma, sigma_b, momentum)
            new_mean = torch.lerp(running_mean, mu_b.to(dtype), momentum)
        else:  # cumulative average over the batches counted (1 without a counter)
            if count is not None:
                f = torch.reciprocal(count.to(mu_b))
            else:
                f = torch.ones((), dtype=mu_b.dtype, device=mu_b.device)
            sigma_new = torch.lerp(sigma, sigma_b, f)
            new_mean = torch.lerp(running_mean, mu_b.to(dtype), f.to(dtype))
        buffers += [running_mean, running_var]
        values += [new_mean, (sigma_new.square() - eps).clamp_min(0.0).to(dtype)]
        if torch.jit.is_scripting():
            for i in range(len(buffers)):
                buffers[i].copy_(values[i])
        else:
            ops._write_python(ok, tuple(buffers), tuple(values), layer)


@torch.jit.unused
def _commit_eager(x, mean, var, running_mean, running_var, steps, counted, momentum, update,
                  eps, layer) -> None:  # fmt: skip
    """:func:`renorm_commit` of an eager call, reading Python numbers from tensors."""
    m = x.numel() // x.shape[1]
    if m > 0 and not bool(torch.isfinite(var).all() and torch.isfinite(mean).all()):
        raise FloatingPointError(non_finite_message(layer, list(x.shape)))
    if not update:
        return
    with torch.no_grad():
        if counted is not None:
            counted.add_(1)
        steps.add_(1)
        if m == 0:
            return
        if momentum is None:  # cumulative average over the batches counted
            f = 1.0 / float(counted.item()) if counted is not None else 1.0
        else:
            f = momentum
        dtype = running_mean.dtype
        sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
        sigma_new = torch.lerp(sigma, torch.sqrt(var.detach() + eps), f)
        running_mean.lerp_(mean.detach().to(dtype), f)
        running_var.copy_((sigma_new.square() - eps).clamp_min(0.0).to(dtype))


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch Renormalization over ``(N, C)`` (per activation) or ``(N, C, L)`` (per channel)."""

    _valid_ranks = (2, 3)
    _rank_text = "2D (N, C) or 3D (N, C, L)"


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch Renormalization over ``(N, C, H, W)``, per feature map."""

    _valid_ranks = (4,)
    _rank_text = "4D (N, C, H, W)"


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    """Batch Renormalization over ``(N, C, D, H, W)``, per feature map."""

    _valid_ranks = (5,)
    _rank_text = "5D (N, C, D, H, W)"
