"""One plain training loop for any ``nn.Module`` classifier: :func:`fit` and :func:`evaluate`.

Plain PyTorch: the model's forward, a loss, ``loss.backward()``, ``optimizer.step()``, a
learning-rate schedule; mini-batches drawn from in-memory tensors by :class:`Batches`, a pure
function of ``(seed, step)``. Around that, what an experiment needs and nothing else:

* **evaluation** every ``eval_every`` steps in inference mode (BN with its population statistics,
  Algorithm 2 of Ioffe & Szegedy 2015), on the test set and on a fixed subset of the training
  set; one row per evaluation, appended to the run's ``metrics.jsonl`` as it comes;
* **divergence**: a loss that is not finite or exceeds ``diverge_above``, or a bnlab layer
  refusing non-finite batch statistics, ends this training and records it as diverged
  (``status="diverged"``) instead of raising, so one diverged variant does not end an
  experiment;
* **checkpoints** (:func:`bnlab.save_checkpoint`: model, optimizer, RNG states, schedule, the
  loss sums of the current interval) after every evaluation. Called again with the same
  checkpoint path, :func:`fit` continues from it and produces the same rows as an uninterrupted
  run; if the checkpoint says the training ended, it loads the final model and returns at once;
* **Ctrl-C** (KeyboardInterrupt) closes the progress bar and propagates: the rows and the last
  checkpoint are on disk, so ``bnlab run NAME --resume DIR`` continues from there.

The loop seeds torch's global generator with ``seed`` when it starts fresh (dropout and any other
randomness in the forward draw from it); a resume restores the generator states saved with the
checkpoint.

**Several processes.** Called in every process of an initialized ``torch.distributed`` group
(``torchrun``, or :func:`bnlab.distributed.launch`), :func:`fit` trains data-parallel: every rank
draws the same global mini-batch (the same ``(seed, step)``) and takes its contiguous part
(:func:`bnlab.distributed.shard`), the model runs under ``DistributedDataParallel``, each rank's
loss is weighted by its share of the batch so the averaged gradient is the global batch's, and
losses, accuracies, evaluations (each rank evaluates its part) and the divergence decision are
reduced over the ranks, so every rank returns the same rows. Rank 0 alone writes rows and
checkpoints (its checkpoint path is used by all ranks, which load it on a resume). BN layers
normalize each rank's part on its own (per-device BN) unless the model was converted with
:func:`bnlab.convert_sync`, in which case training computes what one process computes on the
global batch (up to the order of floating-point sums), provided the forward draws no random
numbers (dropout masks are drawn per rank).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import shard, world

__all__ = ["Batches", "LabelBatches", "FitResult", "SAMPLING", "evaluate", "fit"]

#: How :class:`Batches` draws mini-batches.
SAMPLING = ("shuffle", "fixed", "replacement")


class Batches:
    """Mini-batch indices as a pure function of ``(seed, step)``, so a resumed run draws the same
    batches as an uninterrupted one without saving any sampler state.

    ``sampling``:

    * ``"shuffle"``: every epoch a new permutation of the ``n`` examples, cut into
      ``n // batch_size`` batches (the incomplete last one is dropped, so every step sees
      ``batch_size`` examples): the usual re-drawn batches;
    * ``"fixed"``: one permutation for the whole run, so the same batches (same composition)
      come back every epoch, in a new order each epoch;
    * ``"replacement"``: ``batch_size`` indices drawn uniformly with replacement at every step.
    """

    def __init__(self, n: int, batch_size: int, seed: int, sampling: str = "shuffle") -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"Batches: sampling must be one of {SAMPLING}, got {sampling!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Batches: batch_size must be a positive int, got {batch_size!r}")
        if sampling != "replacement" and batch_size > n:
            raise ValueError(
                f"Batches: batch_size {batch_size} is larger than the {n} training examples"
            )
        self.n, self.batch_size, self.seed, self.sampling = n, batch_size, seed, sampling
        self.per_epoch = n // batch_size if sampling != "replacement" else max(1, n // batch_size)
        self._cache: dict[tuple[str, int], Tensor] = {}

    def _perm(self, kind: str, epoch: int, size: int) -> Tensor:
        key = (kind, epoch)
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, {"examples": 1, "order": 2}[kind],
                                                   epoch))
            self._cache[key] = torch.randperm(size, generator=g)
        return self._cache[key]

    def __call__(self, step: int) -> Tensor:
        """The ``(batch_size,)`` int64 indices of step ``step`` (0-based)."""
        b = self.batch_size
        if self.sampling == "replacement":
            g = torch.Generator().manual_seed(_mix(self.seed, 3, step))
            return torch.randint(self.n, (b,), generator=g)
        epoch, k = divmod(step, self.per_epoch)
        if self.sampling == "fixed":
            perm = self._perm("examples", 0, self.n)
            k = int(self._perm("order", epoch, self.per_epoch)[k])
        else:
            perm = self._perm("examples", epoch, self.n)
        return perm[k * b : (k + 1) * b]


def _mix(*values: int) -> int:
    """A 63-bit seed from a few integers (distinct streams for distinct tuples)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class LabelBatches:
    """Non-i.i.d. mini-batches drawn from a few classes, as a pure function of ``(seed, step)``:
    each step picks ``labels_per_batch`` distinct labels uniformly at random and ``per_label``
    distinct examples of each (uniformly, independently of other steps), then shuffles their
    order within the batch. (The Batch Renormalization paper's non-i.i.d. setting, Ioffe 2017
    section 4.3: mini-batches of 16 labels x 2 images.) Batch size ``labels_per_batch *
    per_label``; pass it to :func:`fit` as ``sampler=``."""

    def __init__(self, labels: Tensor, labels_per_batch: int, per_label: int, seed: int) -> None:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype in (torch.float16, torch.float32, torch.float64):
            raise ValueError("LabelBatches: labels must be a 1-D tensor of integer class labels")
        for name, v in (("labels_per_batch", labels_per_batch), ("per_label", per_label)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LabelBatches: {name} must be a positive int, got {v!r}")
        classes, counts = torch.unique(labels, return_counts=True)
        usable = classes[counts >= per_label]
        if len(usable) < labels_per_batch:
            raise ValueError(
                f"LabelBatches: {labels_per_batch} labels per batch with {per_label} examples "
                f"each, but only {len(usable)} classes have {per_label} or more examples"
            )
        self.classes = usable
        self.members = [torch.nonzero(labels == c).flatten() for c in usable.tolist()]
        self.labels_per_batch, self.per_label, self.seed = labels_per_batch, per_label, seed
        self.batch_size = labels_per_batch * per_label

    def __call__(self, step: int) -> Tensor:
        """The ``(labels_per_batch * per_label,)`` int64 indices of step ``step``."""
        g = torch.Generator().manual_seed(_mix(self.seed, 4, step))
        picked = torch.randperm(len(self.members), generator=g)[: self.labels_per_batch]
        parts = []
        for k in picked.tolist():
            members = self.members[k]
            parts.append(members[torch.randperm(len(members), generator=g)[: self.per_label]])
        idx = torch.cat(parts)
        return idx[torch.randperm(len(idx), generator=g)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 1000,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in inference mode (BN with population
    statistics). The model's train/eval mode is restored afterwards. Returns ``{"loss", "acc"}``;
    ``acc`` is None when ``y`` holds floating-point targets (regression: no classes)."""
    was_training = model.training
    model.eval()
    try:
        total, correct, n = 0.0, 0, 0
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            out = model(prepare(xb) if prepare is not None else xb)
            total += float(loss_fn(out, yb)) * len(yb)
            if not yb.is_floating_point():
                correct += int((out.argmax(1) == yb).sum())
            n += len(yb)
    finally:
        model.train(was_training)
    acc = None if y.is_floating_point() else correct / max(n, 1)
    return {"loss": total / max(n, 1), "acc": acc}


@dataclass
class FitResult:
    """How a :func:`fit` ended. ``status``: ``"finished"`` or ``"diverged"`` (then
    ``diverged_at`` is the step whose loss or statistics were not acceptable and ``reason``
    says why); ``history``: the evaluation rows; ``resumed_from``: the checkpoint step this call
    continued from (None for a fresh start)."""

    steps_done: int
    status: str
    history: list[dict] = field(default_factory=list)
    diverged_at: int | None = None
    reason: str = ""
    resumed_from: int | None = None

    @property
    def final(self) -> dict | None:
        """The last evaluation row (None when there was none)."""
        evals = [r for r in self.history if not r.get("diverged")]
        return evals[-1] if evals else None

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"


def _slug(tags: Mapping[str, Any]) -> str:
    text = "-".join(f"{k}={v}" for k, v in tags.items()) or "fit"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def _plain(value: Any) -> Any:
    """Numbers as Python numbers: numpy scalars and one-element tensors (what ``measure`` often
    returns) via ``.item()``, inside lists and dicts too, so rows go into checkpoints (loaded with
    ``weights_only=True``) and ``metrics.jsonl`` alike."""
    if isinstance(value, Tensor | np.generic) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _matches(row: Mapping[str, Any], tags: Mapping[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in tags.items())


def _correct(out: torch.Tensor, yb: torch.Tensor) -> int:
    """Correct class predictions in a batch (0 for float targets: regression has no accuracy)."""
    return 0 if yb.is_floating_point() else int((out.detach().argmax(1) == yb).sum())


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor] | None = None,
    *,
    steps: int,
    batch_size: int | None = None,
    seed: int = 0,
    schedule: Callable[[int], float] | torch.optim.lr_scheduler.LRScheduler | None = None,
    eval_every: int = 0,
    sampling: str = "shuffle",
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    prepare: Callable[[Tensor], Tensor] | None = None,
    run: Any = None,
    tags: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = False,
    diverge_above: float = 1e3,
    measure: Callable[[nn.Module, int], Mapping[str, Any]] | None = None,
    train_eval_size: int = 1000,
    eval_batch_size: int = 1000,
    sampler: Callable[[int], Tensor] | None = None,
) -> FitResult:
    """Train ``model`` with ``optimizer`` for ``steps`` mini-batch steps on ``train = (x, y)``.

    * ``schedule``: a function ``step -> learning-rate factor`` (as ``LambdaLR``: the rate at
      step ``t`` is the optimizer's rate times ``schedule(t)``) or an ``LRScheduler`` already
      built on ``optimizer``; stepped once per training step.
    * ``eval_every``: evaluate at step 0, every ``eval_every`` steps and at the last step (0:
      at step 0 and at the end only). A row holds ``step``, the ``tags``, ``train_loss`` (mean
      over the steps since the last row), ``train_batch_acc`` (accuracy on those mini-batches,
      training mode), ``train_acc`` (inference mode, on the first ``train_eval_size`` training
      examples), ``test_loss``/``test_acc`` (when ``test`` is given), ``lr``, and whatever
      ``measure(model, step)`` returns. With floating-point targets ``y`` (regression, e.g.
      ``loss_fn=F.mse_loss``) the accuracies are None.
    * ``run``: a :class:`bnlab.runs.RunDir`; rows are appended to its ``metrics.jsonl`` and the
      checkpoint defaults to ``<run>/checkpoints/<tags>.pt``. ``tags`` (e.g. ``{"variant":
      "bn", "seed": 0}``) identify this training's rows.
    * ``prepare``: applied to every input batch before the forward (e.g. a memory format).
    * ``sampling``: see :class:`Batches`; or ``sampler``, a function ``step -> indices``
      (a pure function of the step, so a resume draws the same batches; e.g.
      :class:`LabelBatches`), used instead (``batch_size`` is then not needed).
    * Under an initialized ``torch.distributed`` group it trains data-parallel (module
      docstring); ``measure`` runs on every rank and rank 0's values are recorded.

    Returns a :class:`FitResult`. KeyboardInterrupt propagates after the progress bar closes.
    """
    x, y = train
    if len(x) != len(y):
        raise ValueError(f"fit: train has {len(x)} inputs and {len(y)} labels")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fit: steps must be a positive int, got {steps!r}")
    if eval_every < 0:
        raise ValueError(f"fit: eval_every must be >= 0, got {eval_every!r}")
    if not diverge_above > 0:
        raise ValueError(f"fit: diverge_above must be > 0, got {diverge_above!r}")
    tags = dict(tags or {})
    if sampler is not None:
        if not callable(sampler):
            raise TypeError(f"fit: sampler must be a function step -> indices, got {sampler!r}")
        batches: Callable[[int], Tensor] = sampler
    elif batch_size is None:
        raise ValueError("fit: give batch_size (or a sampler)")
    else:
        batches = Batches(len(y), batch_size, seed, sampling)
    rank, world_size = world()
    main = rank == 0
    if world_size > 1 and not main:
        run = None  # rank 0 writes the rows and the checkpoints
    if schedule is None:
        sched = None
    elif isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        sched = schedule
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if checkpoint is None and run is not None:
        checkpoint = run.checkpoint_dir / f"{_slug(tags)}.pt"
    if world_size > 1:  # every rank resumes from (and rank 0 saves to) rank 0's path
        import torch.distributed as dist

        shared = [None if checkpoint is None else str(checkpoint)]
        dist.broadcast_object_list(shared, src=0)
        checkpoint = shared[0]
    ckpt = Path(checkpoint) if checkpoint is not None else None

    # (sum of losses, steps, correct predictions, examples) since the last evaluation row
    acc = [0.0, 0, 0, 0]
    history: list[dict] = []
    start, resumed_from = 0, None

    def save(step: int, status: str = "running", diverged: dict | None = None) -> None:
        if ckpt is None or not main:
            return
        extra = {
            "tags": dict(tags), "seed": seed, "status": status, "accum": list(acc),
            "history": history, "diverged": diverged,
            "scheduler": sched.state_dict() if sched is not None else None,
        }  # fmt: skip
        save_checkpoint(ckpt, model, optimizer, step, extra=extra)

    if ckpt is not None and ckpt.is_file():
        info = load_checkpoint(ckpt, model, optimizer)
        extra = info["extra"]
        if extra.get("tags") != tags or extra.get("seed") != seed:
            raise ValueError(
                f"fit: checkpoint {ckpt} belongs to tags {extra.get('tags')} seed "
                f"{extra.get('seed')}, not {tags} seed {seed}"
            )
        start = resumed_from = int(info["step"])
        history = list(extra.get("history") or [])
        acc = list(extra.get("accum") or acc)
        if sched is not None and extra.get("scheduler") is not None:
            sched.load_state_dict(extra["scheduler"])
        if run is not None:  # rows measured after the checkpoint will be measured again
            run.drop_rows(lambda r: _matches(r, tags) and r.get("step", 0) > start)
        if extra.get("status") in ("finished", "diverged"):
            d = extra.get("diverged") or {}
            return FitResult(start, extra["status"], history, d.get("step"), d.get("reason", ""),
                             resumed_from)
    else:
        if run is not None:  # rows of an attempt that stopped before its first checkpoint
            run.drop_rows(lambda r: _matches(r, tags))
        torch.manual_seed(seed)
    train_model: nn.Module = model
    if world_size > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.barrier()  # every rank has decided fresh start or resume before rank 0 saves
        train_model = DistributedDataParallel(model)  # broadcasts rank 0's parameters

    def emit(row: dict) -> None:
        row = _plain(row)
        history.append(row)
        if run is not None:
            run.log(row)

    def evaluate_all(xs: Tensor, ys: Tensor) -> dict[str, float]:
        if world_size == 1:
            return evaluate(model, xs, ys, eval_batch_size, loss_fn, prepare)
        part = shard(len(ys), rank, world_size)  # each rank its part, the sums reduced
        ev = evaluate(model, xs[part], ys[part], eval_batch_size, loss_fn, prepare)
        n = part.stop - part.start
        sums = _all_sum([ev["loss"] * n, ev["acc"] * n, n])
        return {"loss": sums[0] / max(sums[2], 1), "acc": sums[1] / max(sums[2], 1)}

    def eval_row(step: int) -> dict:
        if world_size > 1:  # rank 0's running averages, as DDP's next forward would set them
            _broadcast_buffers(model)
        row: dict[str, Any] = {"step": step, **tags}
        row["train_loss"] = acc[0] / acc[1] if acc[1] else None
        row["train_batch_acc"] = acc[2] / acc[3] if acc[3] else None
        row["lr"] = optimizer.param_groups[0]["lr"]
        n = min(train_eval_size, len(y))
        if n:
            row["train_acc"] = evaluate_all(x[:n], y[:n])["acc"]
        if test is not None:
            ev = evaluate_all(test[0], test[1])
            row["test_loss"], row["test_acc"] = ev["loss"], ev["acc"]
        if measure is not None:
            row.update(measure(model, step))
        acc[:] = [0.0, 0, 0, 0]
        return row

    from tqdm.auto import tqdm

    desc = " ".join(f"{k}={v}" for k, v in tags.items()) or None
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (progress and main),
               unit="step", dynamic_ncols=True, leave=False)
    status, diverged = "finished", None
    try:
        if resumed_from is None:  # (a resume from step 0's checkpoint has its row logged)
            emit(eval_row(0))
            save(0)
        model.train()
        for t in range(start, steps):
            idx = batches(t)
            n_global = len(idx)
            if world_size > 1:
                idx = idx[shard(n_global, rank, world_size)]
            xb, yb = x[idx], y[idx]
            if prepare is not None:
                xb = prepare(xb)
            refused = None
            try:
                out = train_model(xb)
                loss = loss_fn(out, yb)
            except FloatingPointError as exc:  # a bnlab layer refused non-finite statistics
                refused = str(exc)
            if world_size > 1:  # every rank takes the same decision, from the global batch
                ok = refused is None
                local = [loss.item() * len(yb) if ok else 0.0,
                         _correct(out, yb) if ok else 0,
                         len(yb), 0.0 if ok else 1.0]  # fmt: skip
                total = _all_sum(local)
                if total[3] > 0:
                    refused = _first_reason(refused)
                value, correct = total[0] / total[2], int(total[1])
            elif refused is None:
                value, correct = loss.item(), _correct(out, yb)
            if refused is not None:
                diverged = {"step": t, "reason": refused, "loss": None}
                break
            if not math.isfinite(value) or value > diverge_above:
                diverged = {
                    "step": t,
                    "reason": f"training loss {value:.4g} at step {t} "
                    + ("is not finite" if not math.isfinite(value) else f"> {diverge_above:g}"),
                    "loss": value if math.isfinite(value) else None,
                }
                break
            optimizer.zero_grad(set_to_none=True)
            if world_size > 1 and len(yb) * world_size != n_global:
                # DDP averages the ranks' gradients: weight each rank's mean loss by its share
                loss = loss * (len(yb) * world_size / n_global)
            loss.backward()
            optimizer.step()
            if sched is not None:
                sched.step()
            acc[0] += value
            acc[1] += 1
            if not yb.is_floating_point():  # classes (float targets: regression, no accuracy)
                acc[2] += correct
                acc[3] += n_global
            step = t + 1
            bar.update(1)
            if step == steps or (eval_every and step % eval_every == 0):
                row = eval_row(step)
                emit(row)
                if row.get("test_acc") is not None:
                    bar.set_postfix(test_acc=f"{row['test_acc']:.3f}", refresh=False)
                save(step, "finished" if step == steps else "running")
        if diverged is not None:
            status = "diverged"
            emit({"step": diverged["step"], **tags, "diverged": True,
                  "train_loss": diverged["loss"], "reason": diverged["reason"]})
            save(diverged["step"], "diverged", diverged)
    finally:
        bar.close()
    d = diverged or {}
    return FitResult(
        d.get("step", steps) if diverged else steps, status, history, d.get("step"),
        d.get("reason", ""), resumed_from,
    )  # fmt: skip


def _all_sum(values: list[float]) -> list[float]:
    """The sums over every rank of ``values`` (float64, one all_reduce)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _first_reason(mine: str | None) -> str:
    """The refusal message of the lowest rank that refused (every rank gets the same text)."""
    import torch.distributed as dist

    reasons: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, mine)
    for r, text in enumerate(reasons):
        if text is not None:
            return text if dist.get_world_size() == 1 else f"rank {r}: {text}"
    return "a rank refused its batch"


def _broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (per-rank BN layers' running averages differ)."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, src=0)
