"""Shared helpers of :mod:`bnlab.inference`: finding the BatchNorm layers of a model, iterating
over batches, and exact per-channel moments.

:class:`_Moments` holds the float64 count, mean and sum of squared deviations of every value a BN
layer sees, merged batch by batch, from which Algorithm 2 of Ioffe & Szegedy (2015) (section 3.1)
takes its population statistics ``E[x]`` and ``Var[x]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.batchnorm import _BatchNorm

_TorchBN = nn.modules.batchnorm._BatchNorm  # torch.nn.BatchNorm1d/2d/3d (and SyncBatchNorm)
_BN_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _TorchBN)


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


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None
