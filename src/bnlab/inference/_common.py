"""Shared helpers of :mod:`bnlab.inference`: finding the BatchNorm layers of a model, iterating
over batches (optional progress bar), exact per-channel moments, temporary forward pre-hooks, and
:class:`_ModelState`, which records what a pass over a model may disturb and puts it back.

:class:`_Moments` holds the float64 count, mean and sum of squared deviations of every value a BN
layer sees, merged batch by batch, from which Algorithm 2 of Ioffe & Szegedy (2015) (section 3.1)
takes its population statistics ``E[x]`` and ``Var[x]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.batchnorm import _BatchNorm

_TorchBN = nn.modules.batchnorm._BatchNorm  # torch.nn.BatchNorm1d/2d/3d (and SyncBatchNorm)
_BN_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _TorchBN)
_STATE = ("running_mean", "running_var", "num_batches_tracked")  # the population statistics


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, _BN_TYPES)


def _bn_layers(model: nn.Module, fn: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every BatchNorm layer, in registration order; a lazy layer not
    sized yet (no statistics or parameters to read or set) is refused, naming ``fn`` and it."""
    layers = [(name or type(m).__name__, m) for name, m in model.named_modules() if _is_bn(m)]
    for name, m in layers:
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{fn}: lazy layer '{name}' is not sized yet; run one forward pass first"
            )
    return layers


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


def _check_num_batches(fn: str, num_batches: int | None) -> None:
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"{fn}: num_batches must be a positive int or None, got {num_batches!r}")


def _iterate(
    batches: Iterable[Any],
    num_batches: int | None,
    *,
    fn: str,
    desc: str,
    progress: bool,
    device: torch.device | None,
) -> Iterator[Tensor]:
    """Yield the input tensor of each batch (at most ``num_batches``; no more are fetched from
    ``batches``), moved to ``device``, with a tqdm bar titled ``desc`` when ``progress``. Raises
    ``ValueError`` naming ``fn`` when ``batches`` is empty or shorter than ``num_batches``.
    Consume it inside ``contextlib.closing`` so the bar closes when the consumer raises."""
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
        for batch in itertools.islice(batches, num_batches):
            x = _first_input(batch)
            yield x.to(device) if device is not None else x
            seen += 1
            bar.update(1)
    finally:
        bar.close()
    if seen == 0:
        raise ValueError(f"{fn}: batches is empty; need at least one batch")
    if num_batches is not None and seen < num_batches:
        raise ValueError(f"{fn}: num_batches={num_batches} but batches held only {seen}")


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


@contextmanager
def _pre_hooks(modules: Iterable[nn.Module], hook: Callable[..., Any]) -> Iterator[None]:
    """``hook`` as a forward pre-hook of every module in ``modules`` for the ``with`` block;
    removed on exit, however the block ends."""
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


_MISSING = object()


class _ModelState:
    """Everything a pass over ``model`` may disturb, recorded so it can be put back exactly.

    * the ``training`` flag of every module, set back as an attribute (not through ``train()``,
      whose overrides or recursion could change other modules);
    * every buffer of every module, as the tensor object and a copy of its values: a forward in
      training mode updates BN running averages, and other modules' buffers (counters, the
      vectors of ``torch.nn.utils.spectral_norm``) just the same;
    * the ``population_estimator`` attribute of each BN layer (present or absent);
    * the CPU random number generator, and that of the model's CUDA device if it has one: dropout
      in training mode draws from them, and a calibration pass must not shift the caller's stream.

    Parameters are not copied (a forward under ``torch.no_grad`` leaves them alone); hooks are the
    business of whoever adds them (:func:`_pre_hooks` removes its own).
    """

    def __init__(self, model: nn.Module, device: torch.device | None) -> None:
        modules = list(model.modules())
        self.modes = [(m, m.training) for m in modules]
        self.buffers = [
            (m, name, t, None if t is None else t.detach().clone())
            for m in modules
            for name, t in m._buffers.items()
        ]
        self.estimators = [
            (m, vars(m).get("population_estimator", _MISSING)) for m in modules if _is_bn(m)
        ]
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    @torch.no_grad()
    def restore(self, keep: Iterable[nn.Module] = ()) -> None:
        """Put everything back, except the population statistics (``_STATE`` buffers and
        ``population_estimator``) of the layers in ``keep``: the results of the pass."""
        kept = {id(m) for m in keep}
        for m, training in self.modes:
            m.training = training
        for m, name, t, values in self.buffers:
            if id(m) in kept and name in _STATE:
                continue
            m._buffers[name] = t
            if t is not None:
                t.copy_(values)
        for m, value in self.estimators:
            if id(m) in kept:
                continue
            if value is _MISSING:
                vars(m).pop("population_estimator", None)
            else:
                m.population_estimator = value
        torch.set_rng_state(self.rng)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.cuda)
