"""Drop-in ``BatchNorm1d/2d/3d``: state and mode around :mod:`bnlab.autograd`.

Ioffe & Szegedy (2015): Algorithm 1 in training mode (mini-batch statistics), Algorithm 2 at
inference (population statistics kept as running averages). Constructor arguments, buffers,
state_dict keys, ``extra_repr`` and train/eval semantics are those of ``torch.nn.BatchNorm*``, so
checkpoints interchange in both directions.

Running statistics (updated only in training mode with ``track_running_stats=True``)::

    f = momentum                       if momentum is a number (any finite value, as torch)
    f = 1 / num_batches_tracked        if momentum is None (cumulative moving average)
    running_mean <- (1 - f) * running_mean + f * mu_B
    running_var  <- (1 - f) * running_var  + f * m / (m - 1) * sigma_B^2   (unbiased, Alg. 2)

where ``m = N * prod(spatial)`` values per channel. Note PyTorch's momentum convention: ``f`` is the
weight of the *new* batch (0.1 by default), the opposite of the "decay" of some other libraries.

A batch that would corrupt state never reaches it: non-finite batch statistics raise
``FloatingPointError`` before any buffer is touched (the check looks at the C per-channel
statistics, not the input, so it costs one reduction of C values).

``activation="relu"`` (bnlab only) returns ``max(BN(x), 0)``, fused into the kernel on the fused
backend; the default ``None`` is the plain layer.

Variants (batch renorm, ghost BN, ...) subclass :class:`_BatchNorm` and override
:meth:`_BatchNorm._train_forward`, the one place where statistics are computed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import backend as B
from ..autograd import batch_norm_eval, batch_norm_train
from ..functional import check_momentum

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "name_layers"]


class _BatchNorm(nn.Module):
    """Common state and behaviour of the bnlab BatchNorm layers."""

    _version = 2  # same state_dict version as torch's _NormBase (num_batches_tracked exists)
    _valid_ranks: tuple[int, ...] = ()
    _rank_text = ""

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    # Inference state (bnlab.inference): class-level defaults so every construction path, including
    # bnlab.convert, starts unfrozen with running averages from training.
    frozen: bool = False  # freeze(): population statistics in train and eval, no updates
    population_estimator: str | None = None  # recompute_population_stats(): "unbiased"/"biased"

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
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}"
            )
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps!r}")
        if activation not in (None, "relu"):
            raise ValueError(
                f"{type(self).__name__}: activation must be None or 'relu', got {activation!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.layer_name: str | None = None  # qualified name in a model, set by name_layers()
        self._check_momentum()
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:  # scale without shift, as torch's bias=False
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        """running_mean <- 0, running_var <- 1, num_batches_tracked <- 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, gamma <- 1, beta <- 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "bias={use_bias}, track_running_stats={track_running_stats}".format(
                **self.__dict__, use_bias=self.bias is not None
            )
            + (f", population={self.population_estimator}" if self.population_estimator else "")
            + (", frozen=True" if self.frozen else "")
        )
        return text if self.activation is None else f"{text}, activation={self.activation!r}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoints written before num_batches_tracked existed (version < 2, as torch's own)
        # load with num_batches_tracked = 0, exactly as torch.nn.BatchNorm does.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------------------- checks
    def _describe(self) -> str:
        name = f"'{self.layer_name}' " if self.layer_name else ""
        return f"{name}{type(self).__name__}({self.num_features})"

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._describe()}: expected a Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{self._describe()}: expected a floating-point input, got dtype {x.dtype}"
            )
        if x.dim() not in self._valid_ranks:
            raise ValueError(
                f"{self._describe()}: expected {self._rank_text} input, "
                f"got {x.dim()}D input of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{self._describe()}: expected {self.num_features} channels in dim 1, "
                f"got input of shape {tuple(x.shape)}"
            )

    def _check_momentum(self) -> None:
        """TypeError/ValueError naming the layer for a momentum that is not None or a finite
        real number (:func:`bnlab.functional.check_momentum`); checked at construction and
        before every running-statistics update, since ``momentum`` may be set at any time."""
        try:
            check_momentum(self.momentum)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{self._describe()}: {exc}") from None

    # ----------------------------------------------------------------------------- forward
    def _use_batch_stats(self) -> bool:
        """Training mode, or no population statistics to use (track_running_stats=False); a frozen
        layer (``bnlab.freeze``) uses its population statistics in both modes."""
        if self.frozen and self.running_mean is not None:
            return False
        return self.training or self.running_mean is None

    def _train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalize with statistics of this batch. Returns ``(y, mean, biased_var)`` with (C,)
        statistics. The one method variants override; ``y`` includes ``self.activation``."""
        return batch_norm_train(x, self.weight, self.bias, self.eps, self.activation)

    def _values_per_channel(self, x: Tensor) -> int:
        """m = N * prod(spatial); batch statistics need m >= 2."""
        m = x.numel() // x.shape[1]
        if m < 2:
            raise ValueError(
                f"{self._describe()}: expected more than 1 value per channel when using batch "
                f"statistics, got input of shape {tuple(x.shape)} ({m} value per channel)"
            )
        return m

    def _commit_batch_stats(self, x: Tensor, mean: Tensor, var: Tensor, m: int) -> None:
        """The one place where a batch's statistics are accepted or refused. Non-finite
        statistics raise FloatingPointError before any buffer is touched; finite ones (training
        mode with tracking) update the running averages, see the module docstring. A momentum
        that is not None or a finite number is refused first, since it may be set at any time."""
        update = self.training and self.track_running_stats
        if update:
            self._check_momentum()
        ok = B.commit_stats(
            mean, var, self.running_mean, self.running_var, self.num_batches_tracked,
            self.momentum, m, update,
        )  # fmt: skip
        if not ok:
            raise FloatingPointError(
                f"{self._describe()}: non-finite batch statistics (NaN or Inf in the input of "
                f"shape {tuple(x.shape)}); running statistics were left unchanged"
            )
        if update and self.population_estimator is not None:  # (read first: no __setattr__)
            self.population_estimator = None  # a running average again, not a recomputed one

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._use_batch_stats():
            return batch_norm_eval(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                self.activation,
            )  # fmt: skip
        m = self._values_per_channel(x)
        y, mean, var = self._train_forward(x)
        self._commit_batch_stats(x, mean, var, m)
        return y


class BatchNorm1d(_BatchNorm):
    """Batch Normalization over ``(N, C)`` (per activation) or ``(N, C, L)`` (per channel)."""

    _valid_ranks = (2, 3)
    _rank_text = "2D (N, C) or 3D (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch Normalization over ``(N, C, H, W)``, per feature map (section 3.2)."""

    _valid_ranks = (4,)
    _rank_text = "4D (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch Normalization over ``(N, C, D, H, W)``, per feature map."""

    _valid_ranks = (5,)
    _rank_text = "5D (N, C, D, H, W)"


def name_layers(model: nn.Module) -> nn.Module:
    """Record each bnlab layer's qualified name in ``model`` so errors name it; returns model."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            module.layer_name = name or type(module).__name__
    return model
