"""What every question of ``bnlab run questions`` shares: the :class:`Question` record, the
:class:`Context` a question's ``run`` gets (data, seeds, sizes, logging, training through
:func:`bnlab.train.fit`), the :class:`View` its ``report`` gets (its rows of the run's files), and
the small models the questions train.

Row conventions in ``metrics.jsonl`` (so a report reads back exactly what a run measured):

* rows written by :func:`bnlab.train.fit` carry the tags ``question``, ``variant``, ``seed`` and
  have no ``kind`` field;
* every other row carries ``question`` and ``kind`` (what it measures), written by
  :meth:`Context.log`. A resumed run drops the ``kind`` rows of an unfinished question and
  measures them again, while its trainings continue from their checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...data import Dataset
from ...report.content import Claim, Figure, Section, Table
from ...runs import RunDir, RunFiles
from ...train import FitResult, fit

__all__ = [
    "Answer",
    "Context",
    "Question",
    "View",
    "ACTS",
    "mlp",
    "seed_mix",
    "seed_mean",
    "fmt",
    "pct",
]

#: Below this ``--scale`` the trainings are too short for the claims that rest on them: such
#: claims are "not assessed" (a smoke run checks that everything works, not what BN does).
MIN_SCALE = 0.5
#: Test images (and training images evaluated) in a smoke run.
SMOKE_TEST = 300
#: The fixed order the training and test sets are put in (the same for every --seed).
DATA_ORDER_SEED = 20150211


@dataclass
class Answer:
    """What a question's report returns: the one-line ``answer`` (headline, README) and the
    section's content (the framework adds the heading: the question's number and title)."""

    answer: str
    figures: list[Figure] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True)
class Question:
    """One question: ``name`` (for ``--only``), ``title`` (the question in the reader's words),
    ``run(ctx)`` (measures and logs rows) and ``report(view) -> Answer`` (reads rows only)."""

    number: int
    name: str
    title: str
    run: Callable[[Context], None]
    report: Callable[[View], Answer]


def seed_mix(*values: int) -> int:
    """A 63-bit seed from a few integers (distinct streams for distinct tuples)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Context:
    """What a question's ``run`` works with.

    ``images_train``/``images_test`` are the run's data set (``(N, 1, 28, 28)`` in [0, 1]) and
    ``x_train``/``x_test`` the same images flattened to ``(N, 784)`` for the dense networks, each
    set put once in a fixed random order (``DATA_ORDER_SEED``): mnist-5k is stored sorted by
    class, so without it "the first 1,000 images" would be three digits and consecutive test
    images would form one-class batches. In a smoke run (``--scale`` below ``MIN_SCALE``) the
    test sets are cut to ``SMOKE_TEST`` images: a smoke run checks the machinery, not the
    numbers. ``seeds`` are the training seeds; :meth:`steps` scales a question's default
    training length by ``--scale``.
    """

    def __init__(self, cfg: Any, run: RunDir, data: Dataset, question: Question,
                 progress: bool = False) -> None:
        self.cfg = cfg
        self.run = run
        self.data = data
        self.question = question
        self.progress = progress
        g = torch.Generator().manual_seed(DATA_ORDER_SEED)
        order_train = torch.randperm(len(data.y_train), generator=g)
        order_test = torch.randperm(len(data.y_test), generator=g)
        n_test = SMOKE_TEST if self.smoke else len(data.y_test)
        self.images_train = data.x_train[order_train]
        self.images_test = data.x_test[order_test[:n_test]]
        self.y_train = data.y_train[order_train]
        self.y_test = data.y_test[order_test[:n_test]]
        self.x_train = self.images_train.flatten(1).contiguous()
        self.x_test = self.images_test.flatten(1).contiguous()

    @property
    def seeds(self) -> list[int]:
        return [self.cfg.seed + k for k in range(self.cfg.seeds)]

    @property
    def smoke(self) -> bool:
        """True for a run too short for the training claims (``--scale`` < MIN_SCALE)."""
        return self.cfg.scale < MIN_SCALE

    def steps(self, base: int, minimum: int = 20) -> int:
        """``base`` training steps scaled by ``--scale`` (at least ``minimum``)."""
        return max(minimum, int(round(base * self.cfg.scale)))

    def generator(self, *keys: int) -> torch.Generator:
        """A torch generator seeded by the question's number and ``keys`` (e.g. a seed)."""
        return torch.Generator().manual_seed(seed_mix(self.question.number, *keys))

    def log(self, kind: str, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Append measurement rows (``question`` and ``kind`` added) to ``metrics.jsonl``."""
        if isinstance(rows, Mapping):
            rows = [rows]
        self.run.log([{"question": self.question.name, "kind": kind, **r} for r in rows])

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        variant: str,
        seed: int,
        *,
        steps: int,
        batch_size: int,
        train: tuple[Tensor, Tensor] | None = None,
        test: tuple[Tensor, Tensor] | None = None,
        evals: int = 10,
        **kwargs: Any,
    ) -> FitResult:
        """:func:`bnlab.train.fit` with this question's tags (``question``, ``variant``,
        ``seed``), about ``evals`` evaluations, rows and checkpoints in the run directory.
        ``train``/``test`` default to the flattened data."""
        if self.smoke:  # a smoke run checks the machinery: a few, small evaluations
            evals = min(evals, 4)
            kwargs.setdefault("train_eval_size", SMOKE_TEST)
        train = train if train is not None else (self.x_train, self.y_train)
        test = test if test is not None else (self.x_test, self.y_test)
        return fit(
            model, optimizer, train, test, steps=steps, batch_size=batch_size, seed=seed,
            eval_every=max(1, steps // max(1, evals)), run=self.run,
            tags={"question": self.question.name, "variant": variant, "seed": seed},
            progress=self.progress, **kwargs,
        )  # fmt: skip


class View:
    """What a question's ``report`` reads: its rows of the run (``rows``), the run's config
    and directory, and helpers to pick rows."""

    def __init__(self, files: RunFiles, question: Question) -> None:
        self.files = files
        self.question = question
        self.rows = [r for r in files.rows if r.get("question") == question.name]
        self.config = files.config
        self.path = files.path

    @property
    def smoke(self) -> bool:
        return float(self.config.get("scale", 1.0)) < MIN_SCALE

    @property
    def short_note(self) -> str:
        """The reason training claims are not assessed in a short run ('' otherwise)."""
        if not self.smoke:
            return ""
        return (f"the trainings of this run are --scale {self.config.get('scale')} of the "
                f"default length (under {MIN_SCALE}), too short to judge")

    def kind(self, kind: str, **match: Any) -> list[dict]:
        """The measurement rows of ``kind`` that match every ``key=value`` of ``match``."""
        return [r for r in self.rows if r.get("kind") == kind
                and all(r.get(k) == v for k, v in match.items())]

    def fits(self, **match: Any) -> list[dict]:
        """The training rows (written by ``fit``) that match ``match``, diverged ones included
        (they have ``diverged: true``)."""
        return [r for r in self.rows if "kind" not in r and "step" in r
                and all(r.get(k) == v for k, v in match.items())]

    def variants(self) -> list[str]:
        """Trained variants in the order they first appear."""
        out: list[str] = []
        for r in self.fits():
            if r["variant"] not in out:
                out.append(r["variant"])
        return out

    def curve(self, variant: str, key: str) -> tuple[list[int], list[list[float]]]:
        """Steps and ``[step][seed]`` values of ``key`` for one variant, keeping the evaluations
        every seed made (a diverged seed ends its curve: it is left out of later steps)."""
        rows = [r for r in self.fits(variant=variant) if not r.get("diverged")
                and r.get(key) is not None]
        seeds = sorted({r["seed"] for r in rows})
        table = {(r["step"], r["seed"]): r[key] for r in rows}
        steps = sorted({r["step"] for r in rows})
        steps = [s for s in steps if all((s, sd) in table for sd in seeds)]
        return steps, [[table[(s, sd)] for sd in seeds] for s in steps]

    def final(self, variant: str, key: str) -> list[float]:
        """The last evaluation's ``key`` of each seed of ``variant`` (diverged seeds: nan)."""
        out = []
        for sd in sorted({r["seed"] for r in self.fits(variant=variant)}):
            rows = [r for r in self.fits(variant=variant, seed=sd)]
            if any(r.get("diverged") for r in rows):
                out.append(float("nan"))
                continue
            rows = [r for r in rows if r.get(key) is not None]
            if rows:
                out.append(float(max(rows, key=lambda r: r["step"])[key]))
        return out

    def figure(self, suffix: str = "") -> str:
        """The file name of one of this question's figures."""
        tail = f"_{suffix}" if suffix else ""
        return f"q{self.question.number:02d}_{self.question.name.replace('-', '_')}{tail}.png"


# ----------------------------------------------------------------------------------- numbers
def seed_mean(values: Sequence[float]) -> float:
    """Mean of finite values (nan if none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for the report; n/a for None or nan."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def separated(a: Sequence[float], b: Sequence[float], lower: bool = True) -> bool | None:
    """Whether the seeds of ``a`` all lie below (``lower``) or above those of ``b``: True if
    the claimed order holds for every pair of seeds, False if the opposite order holds for
    every pair, None when the ranges overlap (the difference is within the seed spread) or a
    side is empty."""
    a = [v for v in a if v is not None and math.isfinite(v)]
    b = [v for v in b if v is not None and math.isfinite(v)]
    if not a or not b:
        return None
    if not lower:
        a, b = [-v for v in a], [-v for v in b]
    if max(a) < min(b):
        return True
    if min(a) > max(b):
        return False
    return None


#: The note of a comparison whose seeds overlap.
WITHIN_SPREAD = "the difference is within the seed spread (the seeds' ranges overlap)"


def pct(x: float | None, digits: int = 1) -> str:
    """An accuracy in [0, 1] as a percentage."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}%"


# ----------------------------------------------------------------------------------- timing
#: Shortest block of calls one timing measurement covers: a single call of a small network
#: (about a millisecond) is at the mercy of one scheduler time slice on a shared machine.
BLOCK_S = 0.02


def interleaved_times(calls: Mapping[str, Callable[[], object]], repeats: int,
                      warmup: int = 2, block_s: float = BLOCK_S) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, measured round by round (every call timed
    in every round, so that all share the machine's conditions). A measurement is a block of
    ``n`` consecutive calls, ``n`` chosen once per call from its warm-up so that a block lasts
    about ``block_s``; the time per call is the block's time divided by ``n``. ``warmup``
    rounds (and the calibration) are not counted."""
    import time

    if repeats < 1:
        raise ValueError(f"interleaved_times: repeats must be >= 1, got {repeats}")
    per_block: dict[str, int] = {}
    for k, fn in calls.items():
        fn()
        t0 = time.perf_counter()
        fn()
        per_block[k] = max(1, math.ceil(block_s / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(warmup + repeats):
        for k, fn in calls.items():
            n = per_block[k]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if r >= warmup:
                times[k].append((time.perf_counter() - t0) / n)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


# ------------------------------------------------------------------------------------ models
ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def mlp(
    hidden: Sequence[int] = (100, 100, 100),
    *,
    norm: str | Callable[[int], nn.Module] | None = "bn",
    act: str = "relu",
    placement: str = "before",
    in_features: int = 784,
    num_classes: int = 10,
) -> nn.Sequential:
    """A fully connected classifier ``in_features -> hidden... -> num_classes``.

    ``norm``: ``"bn"`` (bnlab ``BatchNorm1d``), None, or a factory ``channels -> module``.
    ``placement``: ``"before"`` the nonlinearity, ``z = act(N(W u))`` (Ioffe & Szegedy 2015,
    section 3.2: the hidden ``Linear`` has no bias, beta replaces it), or ``"after"`` it,
    ``z = N(act(W u + b))``. Weights get PyTorch's default initialization from the global
    generator (seed it first).
    """
    from ... import BatchNorm1d

    if placement not in ("before", "after"):
        raise ValueError(f"mlp: placement must be 'before' or 'after', got {placement!r}")
    make = BatchNorm1d if norm == "bn" else norm
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        before = make is not None and placement == "before"
        layers.append(nn.Linear(width, h, bias=not before))
        if before:
            layers.append(make(h))
        layers.append(ACTS[act]())
        if make is not None and placement == "after":
            layers.append(make(h))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` except the last (the classifier)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]


def section_for(question: Question, answer: Answer) -> Section:
    """The report section of a question."""
    return Section(f"{question.number}. {question.title}", figures=answer.figures,
                   text=answer.text, tables=answer.tables, claims=answer.claims)
