"""The experiment protocol: what an experiment declares, and the one way every experiment runs.

An experiment is a module under ``bnlab/experiments/`` that builds an :class:`Experiment` and
:func:`register` s it::

    EXPERIMENT = register(Experiment(
        name="toy", description="one line for `bnlab list`",
        config=ToyConfig,              # a dataclass: each field is a `bnlab run toy --flag`
        quick={"steps": 50},           # overrides for --quick (a smoke run)
        run=run,                       # run(config, run_dir: RunDir, progress: bool) -> dict | None
        report=report,                 # report(files: RunFiles) -> Summary (reads files only)
    ))

:func:`execute` is what ``bnlab run`` calls: it validates the config before anything is made,
claims the run directory (:class:`bnlab.runs.RunDir`), records the config, versions and
threads in ``config.json``, calls ``run``, and records how it ended (finished, interrupted by
Ctrl-C, failed) and the wall time, whatever happens. ``bnlab report DIR`` finds the experiment
by the name in the run's ``config.json`` and renders its :class:`~bnlab.report.content.Summary`.

Config fields may carry ``metadata``: ``help`` (the flag's help), ``choices``, ``min``/``max``
(inclusive bounds), ``gt`` (an exclusive lower bound), ``finite=False`` (allow inf). Every float
must be finite unless said otherwise. A config class may also define ``validate(self)``, raising
``ValueError`` that names the flag, for rules between fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs import RunDir, RunFiles, default_run_dir, deferred_sigint

__all__ = [
    "Experiment",
    "EXPERIMENTS",
    "register",
    "unregister",
    "get_experiment",
    "execute",
    "validate_config",
    "config_from_dict",
    "flag_name",
]


@dataclass(frozen=True)
class Experiment:
    """What an experiment declares (see the module docstring)."""

    name: str
    description: str
    config: type
    run: Callable[[Any, RunDir, bool], Mapping[str, Any] | None]
    report: Callable[[RunFiles], Any]
    quick: Mapping[str, Any] = field(default_factory=dict)
    #: plain-text paragraphs for `bnlab run NAME --help` (what it measures, what it needs)
    about: str = ""
    #: example command lines for `--help`
    examples: tuple[str, ...] = ()
    #: whether `--resume` can continue an interrupted run of it
    resumable: bool = True

    def make_config(self, quick: bool = False, **overrides: Any) -> Any:
        """The config: dataclass defaults, then ``quick`` overrides, then ``overrides``;
        validated (ValueError naming the flag)."""
        values = {**(dict(self.quick) if quick else {}), **overrides}
        cfg = self.config(**values)
        validate_config(cfg)
        return cfg


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment, replace: bool = False) -> Experiment:
    """Add ``experiment`` to the registry (``bnlab list``, ``bnlab run``, ``bnlab report``)."""
    if not dataclasses.is_dataclass(experiment.config):
        raise TypeError(f"experiment {experiment.name!r}: config must be a dataclass")
    known = EXPERIMENTS.get(experiment.name)
    if known is not None and known is not experiment and not replace:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def unregister(name: str) -> None:
    """Remove an experiment from the registry (tests register toy experiments)."""
    EXPERIMENTS.pop(name, None)


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name``; ValueError listing the known ones otherwise."""
    try:
        return EXPERIMENTS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(EXPERIMENTS)) or "none"
        raise ValueError(f"unknown experiment {name!r}; known: {known}") from None


# ------------------------------------------------------------------------------------ configs
def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: ``eval_every`` -> ``--eval-every``."""
    return "--" + field_name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> type:
    if isinstance(f.type, type):
        return f.type
    return {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type), object)


def validate_config(cfg: Any) -> None:
    """Check every field of a config dataclass against its type and metadata, then the class's
    own ``validate()``. Raises ValueError/TypeError naming the flag."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag, kind, meta = flag_name(f.name), _field_type(f), f.metadata
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be true or false, got {value!r}")
            continue
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{flag} must be an integer, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{flag} must be a number, got {value!r}")
            if meta.get("finite", True) and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value!r}")
        elif kind is str and not isinstance(value, str):
            raise TypeError(f"{flag} must be a string, got {value!r}")
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(
                f"{flag} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}"
            )
        if "min" in meta and value < meta["min"]:
            raise ValueError(f"{flag} must be >= {meta['min']}, got {value!r}")
        if "max" in meta and value > meta["max"]:
            raise ValueError(f"{flag} must be <= {meta['max']}, got {value!r}")
        if "gt" in meta and not value > meta["gt"]:
            raise ValueError(f"{flag} must be > {meta['gt']}, got {value!r}")
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def config_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """A config rebuilt from a saved ``config.json`` ``config`` dict (unknown keys refused, so
    a run is never continued with a silently different config)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"the saved config has fields this version of bnlab does not know: {unknown}"
        )
    cfg = cls(**values)
    validate_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------ running
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__

    return {
        "bnlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _base_meta(exp: Experiment, cfg: Any, quick: bool) -> dict[str, Any]:
    import torch

    return {
        "experiment": exp.name,
        "description": exp.description,
        "config": dataclasses.asdict(cfg),
        "quick": quick,
        "command": " ".join(["bnlab", *sys.argv[1:]]) if sys.argv else "",
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "versions": _versions(),
    }


def _remove_if_empty(run: RunDir, made_dir: bool) -> bool:
    """After a run that failed before measuring anything: remove what this run created (its
    files, and the directory if it made it). Returns True if removed."""
    if run.rows():
        return False
    for name in ("config.json", "metrics.jsonl", ".lock"):
        (run.path / name).unlink(missing_ok=True)
    ckpt = run.path / "checkpoints"
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()
    if made_dir and not any(run.path.iterdir()):
        shutil.rmtree(run.path, ignore_errors=True)
    return True


def execute(
    exp: Experiment,
    cfg: Any = None,
    out: str | os.PathLike[str] | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    quick: bool = False,
    progress: bool = True,
    root: str | os.PathLike[str] = "runs",
) -> RunDir:
    """Run ``exp`` with ``cfg`` into a new run directory ``out`` (default
    ``<root>/<name>/<time>``), or continue the run in ``resume`` with its saved config.

    Returns the (closed) :class:`RunDir`; its ``meta["status"]`` is ``finished``,
    ``interrupted`` (Ctrl-C: what was measured is kept) or ``failed``. A failure is re-raised
    after the status is written; a run that fails or is interrupted before measuring anything
    leaves no directory behind.
    """
    if resume is not None:
        if not exp.resumable:
            raise ValueError(f"bnlab run {exp.name}: this experiment cannot be resumed; start a "
                             "new run")
        run = RunDir.resume(resume)
        try:
            if run.meta.get("experiment") != exp.name:
                raise ValueError(
                    f"--resume {resume}: that directory holds a run of "
                    f"{run.meta.get('experiment')!r}, not {exp.name!r}"
                )
            if run.meta.get("status") == "finished":
                raise ValueError(f"--resume {resume}: that run has already finished")
            cfg = config_from_dict(exp.config, run.meta.get("config") or {})
            run.update(resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), status="running")
        except BaseException:
            run.close()
            raise
        made_dir = False
    else:
        if cfg is None:
            cfg = exp.make_config(quick=quick)
        validate_config(cfg)
        path = Path(out) if out is not None else default_run_dir(exp.name, root)
        made_dir = not path.exists()
        run = RunDir.create(path, _base_meta(exp, cfg, quick))

    t0 = time.perf_counter()
    status, error, result = "failed", None, None
    try:
        result = exp.run(cfg, run, progress)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException as exc:
        error = exc
    finally:
        with deferred_sigint():
            wall = time.perf_counter() - t0
            segments = [*run.meta.get("segments", []),
                        {"started": run.meta.get("resumed_at", run.meta.get("started")),
                         "wall_time_s": round(wall, 2), "status": status}]
            fields: dict[str, Any] = dict(result or {})
            fields.update(
                status=status,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                segments=segments,
                wall_time_s=round(sum(s["wall_time_s"] for s in segments), 2),
                interrupted=status == "interrupted",
            )
            if error is not None:
                fields["error"] = f"{type(error).__name__}: {error}"
            if status != "finished" and not run.resumed and _remove_if_empty(run, made_dir):
                run.close()
            else:
                run.update(**fields)
                run.close()
    if error is not None:
        raise error
    return run

