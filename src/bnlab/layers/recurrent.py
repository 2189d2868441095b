"""Batch normalization for recurrent networks: statistics per time step.

Cooijmans et al. (2016), "Recurrent Batch Normalization", section 3: sharing one set of
statistics across time "severely degrades performance" because the activations' statistics change
during the initial transient; they keep separate statistics for each time step ``t < T_max``
(mini-batch statistics of step ``t`` in training, step ``t``'s population statistics at
inference), and beyond the longest training sequence use those of the last step. Here ``gamma``
and ``beta`` are one pair per feature shared by all steps, as the weights of a recurrent network
are.

``StepBatchNorm1d(C, max_steps)`` holds one bnlab :class:`~bnlab.BatchNorm1d` without affine
parameters per step (each with its own running statistics, so ``state_dict`` keys are
``steps.<t>.running_mean`` etc.) and the shared affine map::

    y = gamma * BN_t(x) + beta,   BN_t = steps[min(t, max_steps - 1)]

Training at ``t >= max_steps`` is refused (those steps would update the last step's statistics
with another step's data); at inference such steps use the last step's statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import check_shapes
from .batchnorm import BatchNorm1d

__all__ = ["StepBatchNorm1d"]


class StepBatchNorm1d(nn.Module):
    """Per-time-step batch normalization of ``(N, C)`` inputs: ``forward(x, t)``; see the module
    docstring. ``gamma`` starts at ``gamma_init`` (Cooijmans et al., section 4, recommend 0.1
    for tanh networks; 1 is the usual BN start)."""

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 1.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"StepBatchNorm1d: max_steps must be a positive int, got "
                             f"{max_steps!r}")
        self.num_features, self.max_steps = num_features, max_steps
        self.steps = nn.ModuleList(
            BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=False, dtype=dtype)
            for _ in range(max_steps)
        )
        self.weight = nn.Parameter(torch.full((num_features,), float(gamma_init), dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, max_steps={self.max_steps}"

    def forward(self, x: Tensor, t: int) -> Tensor:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"StepBatchNorm1d: the time step must be an int >= 0, got {t!r}")
        if t >= self.max_steps and self.training:
            raise ValueError(
                f"StepBatchNorm1d({self.num_features}, max_steps={self.max_steps}): training at "
                f"step {t} would mix its statistics into step {self.max_steps - 1}'s; build the "
                "layer with a larger max_steps")
        c = self.num_features  # (before the step's statistics move; (C, 1) would broadcast)
        check_shapes(f"StepBatchNorm1d({c})", (("weight", self.weight, (c,)),
                                               ("bias", self.bias, (c,))))  # fmt: skip
        y = self.steps[min(t, self.max_steps - 1)](x)
        return y * self.weight + self.bias
