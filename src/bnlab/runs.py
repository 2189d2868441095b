"""Run directories: where an experiment's results live, as plain files.

::

    runs/<experiment>/<run-id>/
        config.json     experiment, resolved config, versions, threads, timing and status
        metrics.jsonl   one JSON object per line, appended as measurements come
        checkpoints/    training state, so ``bnlab run NAME --resume DIR`` can continue
        *.png, report.md, report.html     built from the two files above only
        .lock           held (``flock``) by the process writing the run

Promises:

* **Never overwritten.** :meth:`RunDir.create` claims a directory exclusively: it refuses one that
  already holds a run or other files, and checks again once it holds the directory's lock, so of
  two runs started on the same directory exactly one gets it. An existing run is only written
  into through :meth:`RunDir.resume`, which takes the same lock.
* **Atomic metadata.** ``config.json`` is written (and rewritten) with a temp file and
  ``os.replace``: a reader or a crash sees the old or the new version, never a part.
* **Append-only metrics.** Rows are appended as whole lines, with Ctrl-C held back meanwhile. A
  killed run may leave one incomplete last line; :func:`read_metrics` skips it with a warning, a
  resume removes it before appending, and :meth:`RunDir.log` ends it before appending so new rows
  never merge into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._fileutil import atomic_write_text, fsync_dir, is_temp_name, remove_stale

__all__ = [
    "RunDir",
    "RunFiles",
    "default_run_dir",
    "load_run",
    "read_config",
    "read_metrics",
]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"


def default_run_dir(experiment: str, root: str | os.PathLike[str] = "runs") -> Path:
    """``<root>/<experiment>/<YYYYmmdd-HHMMSS>``, with a suffix if that name is taken."""
    base = Path(root) / experiment / time.strftime("%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _json_default(obj: Any) -> Any:
    """JSON for the numeric types experiments produce (numpy scalars, 0-d tensors)."""
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes non-finite floats as null (strict JSON, readable anywhere)."""
    return json.dumps(_finite(obj), default=_json_default, allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class RunDir:
    """A run directory held by this process (see the module docstring).

    ``meta`` is the content of ``config.json``; :meth:`update` merges fields into it and rewrites
    the file atomically; :meth:`log` appends metrics rows. Use :meth:`create` for a new run and
    :meth:`resume` to continue one; :meth:`close` (or a ``with`` block) releases the lock.
    """

    def __init__(self, path: Path, meta: dict[str, Any], lock_fd: int, resumed: bool) -> None:
        self.path = path
        self.meta = meta
        self.resumed = resumed
        self._lock_fd: int | None = lock_fd

    # ------------------------------------------------------------------ claiming a directory
    @staticmethod
    def _lock(path: Path) -> int:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FileExistsError(
                f"run directory {path} is in use by another bnlab process; wait for it to end "
                "or choose another --out"
            ) from None
        return fd

    @staticmethod
    def _check_free(path: Path) -> None:
        if (path / CONFIG).exists():
            raise FileExistsError(
                f"{path} already holds a run ({CONFIG}); continue it with `--resume {path}` or "
                "choose another --out"
            )
        others = sorted(
            p.name for p in path.iterdir() if p.name != LOCK and not is_temp_name(p.name)
        )
        if others:
            raise FileExistsError(
                f"--out {path} is not empty ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); choose a new or empty directory"
            )

    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: Mapping[str, Any]) -> RunDir:
        """Claim ``path`` (made if missing) for a new run and write ``meta`` as its
        ``config.json``. Refuses (``FileExistsError``, naming the directory) a directory that
        holds a run or any other file, or that another process is creating a run in.

        The checks are made again once the directory's lock is held, so of two processes
        creating a run there at the same moment exactly one succeeds; ``config.json`` is
        written atomically (a process killed meanwhile leaves no partial file, and the
        temporary file it leaves is removed by the next attempt)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"--out {path} is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
        cls._check_free(path)  # before the lock file is made in a directory that is not ours
        lock_fd = cls._lock(path)
        try:
            cls._check_free(path)  # again: another process may have created a run meanwhile
            remove_stale(path, is_temp_name, older_than=0)  # a killed creation's temp file
            atomic_write_text(path / CONFIG, _dumps(dict(meta), indent=2))
            (path / METRICS).touch()
            fsync_dir(path)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, dict(meta), lock_fd, resumed=False)

    @classmethod
    def resume(cls, path: str | os.PathLike[str]) -> RunDir:
        """Take an existing run directory to continue it: lock it, read ``config.json`` and drop
        an incomplete last line of ``metrics.jsonl`` (what a killed run leaves)."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"--resume {path}: no {CONFIG} there; is it a run directory?")
        lock_fd = cls._lock(path)
        try:
            meta = read_config(path / CONFIG)
            run = cls(path, meta, lock_fd, resumed=True)
            run.drop_rows(lambda row: False)  # rewrites only complete, valid lines
        except BaseException:
            os.close(lock_fd)
            raise
        return run

    def close(self) -> None:
        """Release the directory (the lock file stays; it is empty)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    @property
    def checkpoint_dir(self) -> Path:
        """``<run>/checkpoints``, made on first use."""
        d = self.path / "checkpoints"
        d.mkdir(exist_ok=True)
        return d

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into ``config.json`` (atomic rewrite; a Ctrl-C meanwhile is held
        back until the file is written)."""
        with deferred_sigint():
            self.meta.update(fields)
            atomic_write_text(self.path / CONFIG, _dumps(self.meta, indent=2))

    def log(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Append one row or several to ``metrics.jsonl`` (whole lines, one write, flushed).
        Non-finite floats are written as null. A write that fails part-way is taken back
        out; a line an earlier, killed process left unfinished is ended first, so new rows
        never merge into it."""
        if isinstance(rows, Mapping):
            rows = [rows]
        text = "".join(_dumps(dict(r)) + "\n" for r in rows)
        if not text:
            return
        with deferred_sigint():  # a Ctrl-C between two partial writes would cut a line
            fd = os.open(self.path / METRICS, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # an earlier write stopped inside a line (disk full, a killed process):
                    # end that line, so it stays one bad line and the new rows stay whole
                    text = "\n" + text
                data = text.encode("utf-8")
                try:
                    while data:
                        data = data[os.write(fd, data) :]
                except BaseException:
                    with contextlib.suppress(OSError):  # take the partial rows back out
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)

    def drop_rows(self, drop: Callable[[dict], bool]) -> int:
        """Rewrite ``metrics.jsonl`` without the rows for which ``drop(row)`` is true, and
        without lines that are not JSON objects. Returns how many rows were dropped. Used by a
        resume to forget measurements made after the checkpoint it continues from (they will
        be made again, identically)."""
        rows, warnings = read_metrics(self.path / METRICS)
        keep = [r for r in rows if not drop(r)]
        if len(keep) == len(rows) and not warnings:
            return 0
        atomic_write_text(self.path / METRICS, "".join(_dumps(r) + "\n" for r in keep))
        return len(rows) - len(keep)

    def rows(self) -> list[dict]:
        """The rows logged so far (complete lines only)."""
        return read_metrics(self.path / METRICS)[0]


# ---------------------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` as a dict; ValueError naming the file when it is not a JSON object."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); is the run directory damaged?"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; is the run directory damaged?") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not an object")
    return meta


def read_metrics(path: str | os.PathLike[str]) -> tuple[list[dict], list[str]]:
    """The rows of a ``metrics.jsonl`` and warnings about lines skipped.

    An incomplete last line (no newline: what a run killed while writing leaves) is skipped
    with a warning; so is any other line that is not a JSON object, with its line number. A
    missing file gives no rows and a warning."""
    path = Path(path)
    if not path.is_file():
        return [], [f"{path.name} is missing"]
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    complete = len(lines) - 1  # the part after the last newline is not a complete line
    rows: list[dict] = []
    warnings: list[str] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i > complete:
                warnings.append(
                    f"{path.name} line {i} is incomplete (the run was stopped while writing it); "
                    "skipped"
                )
            else:
                warnings.append(f"{path.name} line {i} is not JSON; skipped")
            continue
        if not isinstance(row, dict):
            warnings.append(f"{path.name} line {i} is a JSON {type(row).__name__}, not an object; "
                            "skipped")
            continue
        rows.append(row)
    return rows, warnings


@dataclass
class RunFiles:
    """What a report is built from: the run directory, its ``config.json`` (``meta``), the rows
    of ``metrics.jsonl`` and the warnings collected while reading them."""

    path: Path
    meta: dict[str, Any]
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved experiment config as saved (a dict)."""
        cfg = self.meta.get("config")
        return cfg if isinstance(cfg, dict) else {}

    def select(self, *fields: str, **match: Any) -> list[dict]:
        """Rows that match every ``key=value`` of ``match`` and have every field of ``fields``
        (a row with a missing or null field is left out and counted in a warning)."""
        out, bad = [], 0
        for r in self.rows:
            if any(r.get(k) != v for k, v in match.items()):
                continue
            if any(r.get(f) is None for f in fields):
                bad += 1
                continue
            out.append(r)
        if bad:
            what = ", ".join(f"{k}={v}" for k, v in match.items()) or "rows"
            note = f"{bad} row(s) ({what}) lack one of {', '.join(fields)}; left out"
            if note not in self.warnings:
                self.warnings.append(note)
        return out


def load_run(path: str | os.PathLike[str]) -> RunFiles:
    """Read a run directory's ``config.json`` and ``metrics.jsonl`` (see :class:`RunFiles`).
    FileNotFoundError when ``config.json`` is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a run directory)")
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} is missing (is {path} a run directory?)")
    meta = read_config(path / CONFIG)
    rows, warnings = read_metrics(path / METRICS)
    return RunFiles(path, meta, rows, warnings)


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) during a block that must finish (writing a run's final status,
    appending a row); a Ctrl-C pressed inside is delivered again when the block ends, to the
    handler that was in place before (Python's default raises KeyboardInterrupt there). Works
    only in the main thread; elsewhere the block runs unprotected."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    if previous is None:  # installed outside Python: the closest is the default
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        signal.raise_signal(signal.SIGINT)
