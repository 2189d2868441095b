"""Fault injection: runs and saves stopped at random moments, seeded and bounded in number.

Two kinds of fault:

* **a write that fails part-way** (disk full, I/O error), injected in-process by replacing a
  write with one that writes a random prefix and raises;
* **a process killed outright** (SIGKILL: no clean-up code runs), after a random delay.

After each, the files must hold either the old or the new complete state: a checkpoint that
loads and is internally consistent, a ``config.json`` that parses, ``metrics.jsonl`` rows that
are whole and unduplicated; and continuing must lose nothing (a killed run resumes to the rows
of an uninterrupted one). The random moments come from fixed seeds; which instruction a kill
lands on still depends on the machine, so every assertion holds for any moment.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab
from bnlab._fileutil import STALE_AFTER
from bnlab.runs import RunDir, read_metrics

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
# one thread per process (several run side by side), the toy experiment registered from tests/
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]),
           BNLAB_EXPERIMENTS="lab_toy", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or
                  p.name.endswith(".part"))


def _age(directory: Path) -> None:
    """Make every file in ``directory`` look older than STALE_AFTER."""
    old = time.time() - STALE_AFTER - 60
    for p in directory.iterdir():
        os.utime(p, (old, old))


# ----------------------------------------------------------------- writes failing part-way
def _model(fill: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), bnlab.BatchNorm1d(8))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(fill)
    return model


@pytest.mark.parametrize("seed", range(3))
def test_a_save_failing_part_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    path = tmp_path / "ck.pt"
    bnlab.save_checkpoint(path, _model(1.0), None, step=1, extra={"fill": 1.0})
    good = path.read_bytes()
    real_save, real_replace, real_fsync = torch.save, os.replace, os.fsync
    for attempt in range(4):
        where = rng.choice(["write", "fsync", "rename"])

        def partial_save(obj, fh, *args, _rng=rng, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            fh.write(data[: _rng.randrange(len(data))])  # a random prefix, then the disk fails
            raise OSError("No space left on device")

        def fail(*args, _where=where, **kwargs):
            raise OSError(f"{_where} failed")

        with monkeypatch.context() as m:
            if where == "write":
                m.setattr(torch, "save", partial_save)
            elif where == "fsync":
                m.setattr(os, "fsync", fail)
            else:
                m.setattr(os, "replace", fail)
            with pytest.raises(OSError):
                bnlab.save_checkpoint(path, _model(2.0 + attempt), None, step=2 + attempt,
                                      extra={"fill": 2.0 + attempt})
        assert (real_replace, real_fsync) == (os.replace, os.fsync)
        assert path.read_bytes() == good, where  # the old checkpoint, byte for byte
        assert _temp_files(tmp_path) == [], where  # and nothing left beside it
    info = bnlab.load_checkpoint(path, _model(0.0))
    assert info["step"] == 1 and info["extra"] == {"fill": 1.0}


@pytest.mark.parametrize("seed", range(3))
def test_run_files_written_part_way(tmp_path, monkeypatch, seed):
    """metrics.jsonl: a failed append is taken back out; a line a killed process left unfinished
    is ended before the next append, so no row is lost to it. config.json: a failed rewrite
    leaves the old file."""
    rng = random.Random(100 + seed)
    run = RunDir.create(tmp_path / "run", {"experiment": "toy", "status": "running"})
    try:
        rows = [{"step": i, "acc": i / 10} for i in range(3)]
        run.log(rows)
        real_write = os.write

        def partial_write(fd, data):
            real_write(fd, data[: rng.randrange(1, len(data))])
            raise OSError("No space left on device")

        with monkeypatch.context() as m:
            m.setattr(os, "write", partial_write)
            with pytest.raises(OSError):
                run.log([{"step": 3, "acc": 0.3}, {"step": 4, "acc": 0.4}])
        assert read_metrics(run.path / "metrics.jsonl") == (rows, [])  # taken back out
        # a killed writer: a prefix of a row and no newline (nothing could clean up)
        line = json.dumps({"step": 3, "acc": 0.3})
        with open(run.path / "metrics.jsonl", "a") as fh:
            fh.write(line[: rng.randrange(1, len(line))])
        run.log({"step": 3, "acc": 0.3})
        got, warnings = read_metrics(run.path / "metrics.jsonl")
        assert got == [*rows, {"step": 3, "acc": 0.3}] and len(warnings) == 1
        before = (run.path / "config.json").read_bytes()
        real_replace = os.replace

        def torn(src, dst):  # the new file was written, then the rename failed
            raise OSError("rename failed")

        with monkeypatch.context() as m:
            m.setattr(os, "replace", torn)
            with pytest.raises(OSError):
                run.update(status="finished", steps_done=4)
        assert os.replace is real_replace
        assert (run.path / "config.json").read_bytes() == before
        assert [p for p in _temp_files(run.path)] == []
    finally:
        run.close()


def test_a_run_directory_whose_creation_failed_part_way_is_still_free(tmp_path, monkeypatch):
    """config.json is written whole or not at all: a creation that fails while writing it leaves
    no partial config.json (which would make the directory look like a damaged run)."""
    real_fsync = os.fsync

    def fail(fd):
        raise OSError("I/O error")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fail)
        with pytest.raises(OSError, match="I/O error"):
            RunDir.create(tmp_path / "run", {"experiment": "toy"})
    assert os.fsync is real_fsync
    assert not (tmp_path / "run" / "config.json").exists()
    with RunDir.create(tmp_path / "run", {"experiment": "toy"}) as run:
        assert json.loads((run.path / "config.json").read_text()) == {"experiment": "toy"}


# ----------------------------------------------------------------- processes killed outright
SAVER = textwrap.dedent(
    """
    import sys, torch, bnlab
    path = sys.argv[1]
    model = torch.nn.Linear(512, 512)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(float(step))
        bnlab.save_checkpoint(path, model, None, step=step, extra={"fill": float(step)})
        print(step, flush=True)
    """
)


def test_saves_killed_at_random_moments(tmp_path):
    """Processes saving in a loop, SIGKILLed after random delays: the checkpoint is the last one
    completed or the one being written, whole; the next save removes what the kill left."""
    rng = random.Random(7)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    dirs = [tmp_path / f"s{i}" for i in range(3)]
    procs = []
    for d in dirs:
        d.mkdir()
        procs.append(subprocess.Popen([sys.executable, str(script), str(d / "ck.pt")], env=ENV,
                                      stdout=subprocess.PIPE, text=True))
    try:
        done = []
        for proc in procs:
            first = proc.stdout.readline()  # one save completed: the process is going
            assert first.strip() == "1", first
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            lines = [first, *proc.stdout.read().split()]
            done.append(int(lines[-1]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    for d, last in zip(dirs, done, strict=True):
        model = nn.Linear(512, 512)
        info = bnlab.load_checkpoint(d / "ck.pt", model)
        assert info["step"] in (last, last + 1)  # old or new, never a mixture
        assert bool((model.weight == info["extra"]["fill"]).all())
        assert bool((model.bias == info["step"]).all())
        _age(d)
        bnlab.save_checkpoint(d / "other.pt", model, None, step=0)
        assert _temp_files(d) == []  # what the kill left is gone


# one small training (4 evaluations, 3 checkpoints), so a kill can land anywhere in a few seconds
SMALL = ("--steps", "12", "--eval-every", "4", "--seeds", "1", "--norm", "bn")


def _toy(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnlab.cli", "run", "toy", "--no-progress",
                             *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _check_consistent(run: Path) -> str:
    """A killed run's directory: nothing of the run, or a parseable config.json and whole,
    unduplicated rows (at most an incomplete last line). Returns its status."""
    if not (run / "config.json").exists():
        assert not (run / "metrics.jsonl").exists()
        return "none"
    meta = json.loads((run / "config.json").read_text())
    assert meta["experiment"] == "toy" and isinstance(meta["config"], dict)
    rows, warnings = read_metrics(run / "metrics.jsonl")
    assert all("is incomplete" in w for w in warnings) and len(warnings) <= 1, warnings
    keys = [(r["variant"], r["seed"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys))
    return meta["status"]


def test_runs_killed_at_random_moments_continue_to_the_same_rows(tmp_path):
    """`bnlab run` SIGKILLed at random moments (before, during or after training, saving or
    writing config.json): the directory is consistent, and continuing it (or starting again in
    it when the kill came before config.json existed) gives the rows of an uninterrupted run."""
    import lab_toy  # noqa: F401  (registers "toy" in this process too)
    from bnlab.cli import main

    ref = tmp_path / "ref"
    assert main(["run", "toy", *SMALL, "--out", str(ref), "--no-progress"]) == 0
    want = sorted(read_metrics(ref / "metrics.jsonl")[0],
                  key=lambda r: (r["variant"], r["seed"], r["step"]))
    rng = random.Random(11)
    runs = [tmp_path / f"r{i}" for i in range(3)]
    procs = [_toy(*SMALL, "--out", str(r)) for r in runs]
    try:
        for proc in procs:
            proc.stdout.readline()  # "bnlab run toy: ..." once the imports are done
            time.sleep(rng.uniform(0.0, 2.5))
            proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    again = {}
    for run in runs:
        status = _check_consistent(run)
        if status == "none":  # killed before the run existed: the directory is still free
            again[run] = _toy(*SMALL, "--out", str(run))
        elif status != "finished":
            again[run] = _toy("--resume", str(run))
    for proc in again.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    for run in runs:
        got = sorted(read_metrics(run / "metrics.jsonl")[0],
                     key=lambda r: (r["variant"], r["seed"], r["step"]))
        assert got == want  # every number, as if never killed
        assert json.loads((run / "config.json").read_text())["status"] == "finished"


def test_every_test_named_in_reliability_md_exists():
    """docs/reliability.md backs each promise with tests; each one it names must exist."""
    import re

    doc = (TESTS.parent / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", doc))
    assert len(named) > 30
    for file, name in sorted(named):
        source = (TESTS.parent / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
