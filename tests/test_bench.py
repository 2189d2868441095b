"""``bnlab bench`` (bnlab.bench.main) in a tiny configuration: each written run is added to the
Markdown file's own section, before the earlier runs, which are kept with everything else. No
timing is asserted."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import pytest

from bnlab.bench import main

_TINY = ["--shapes", "mnist mlp (batch 60)", "--repeats", "1", "--no-compile", "--no-resnet"]
_INTRO = "# Results\n\n## Other section\n\nkept\n\n## Fused kernels\n\nColumns: intro.\n\n"
_OLD = "Old CPU, 2026-01-01: an earlier run\n\nold table\n\n## After\n\nalso kept\n"
_FILE = _INTRO + "### " + _OLD


def test_bench_adds_its_run_and_keeps_earlier_runs_and_other_sections(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text(_FILE)
    assert main([*_TINY, "--cold", "--write", str(out)]) == 0
    text = out.read_text()
    intro, rest = text.split("### ", 1)
    assert intro == _INTRO
    new, old = rest.split("\n### ", 1)
    assert old == _OLD
    assert re.match(r".+, \d{4}-\d\d-\d\d \d\d:\d\d UTC: `bnlab bench`\n", new)
    for mode in ("fwd", "fwd+bwd", "eval"):
        assert f"| mnist mlp (batch 60) (60, 100) | {mode} |" in new
    assert "cold caches" in new
    assert "torch threads" in capsys.readouterr().out
    assert main([*_TINY, "--write", str(out)]) == 0  # a second run goes first, the rest stays
    second = out.read_text()
    assert second.count("\n### ") == 3 and second.endswith(rest)
    assert "cold caches" not in second.split("### ", 2)[1]


_NOT_THE_SECTION = "### Fused kernels of another tool\n\n## Fused kernels tried\n"


@pytest.mark.parametrize("start", ["", "# Notes\n\nmine\n", _NOT_THE_SECTION])
def test_bench_starts_the_section_where_there_is_none(tmp_path, start):
    out = tmp_path / "RESULTS.md"
    if start:
        out.write_text(start)
    assert main([*_TINY, "--write", str(out)]) == 0
    text = out.read_text()
    head = (start + "\n" if start else "") + "## Fused kernels\n\n### "
    assert text.startswith(head) and "| mnist mlp (batch 60) (60, 100) | eval |" in text


def test_an_interrupted_write_leaves_the_results_file_as_it_was(tmp_path, monkeypatch):
    import os

    out = tmp_path / "RESULTS.md"
    out.write_text(_FILE)

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        main([*_TINY, "--write", str(out)])
    assert out.read_text() == _FILE
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]


def test_cold_rounds_flush_before_every_timed_call_only():
    """``before`` (``--cold``'s cache flush) runs once before each timed call and not in the
    warm-up rounds."""
    from bnlab.bench import _interleaved

    events = []
    runs = {k: (lambda k=k: events.append(k)) for k in ("a", "b", "c")}
    times = _interleaved(runs, repeats=4, warmup=2, before=lambda: events.append("flush"))
    assert set(times) == {"a", "b", "c"}
    warm, timed = events[: 2 * len(runs)], events[2 * len(runs) :]
    assert "flush" not in warm
    assert timed[0::2] == ["flush"] * 12 and sorted(timed[1::2]) == sorted(["a", "b", "c"] * 4)


@pytest.mark.parametrize("llc_mb", [16, 32, 300])
def test_cold_flush_writes_twice_the_last_level_cache(monkeypatch, llc_mb):
    """``--cold`` writes at least twice the last-level cache the machine reports (a server part
    of 300 MB included) and never less than ``COLD_BYTES``."""
    import bnlab.kernels
    from bnlab import bench

    monkeypatch.setattr(bnlab.kernels, "llc_bytes", lambda: llc_mb << 20)
    want = max(bench.COLD_BYTES, 2 * (llc_mb << 20))
    assert bench.cold_bytes() == want
    sizes = []
    real_empty = bench.torch.empty
    monkeypatch.setattr(bench.torch, "empty", lambda n: sizes.append(n) or real_empty(1))
    bench.cache_flusher()
    assert sizes == [want // 4]


def test_spread_table_takes_each_ratio_within_a_process():
    """``--processes``' table: times are the median of the per-process medians, each ratio the
    median and range of the ratios taken inside each process (hand-computed here)."""
    from bnlab.bench import Row, format_spread

    shape = (60, 100)
    per_process = [(2.0, 1.0), (9.0, 3.0), (3.0, 2.0)]  # (torch, fused) seconds; ratios 2, 3, 1.5
    runs = [[Row("s", shape, "eval", {"torch": t, "fused": f, "copy": 0.5})]
            for t, f in per_process]  # fmt: skip
    head, _, line = format_spread(runs).splitlines()
    cells = dict(zip(_cells(head), _cells(line), strict=True))
    assert (cells["fused"], cells["torch"], cells["copy"]) == ("2000.000", "3000.000", "500.000")
    assert cells["torch / fused"] == "2.00 (1.50-3.00)"
    assert cells["fused / copy"] == "4.00 (2.00-6.00)"
    assert cells["torch_cl / fused_cl"] == "-"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_processes_run_the_benchmark_in_fresh_processes(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    argv = ["--shapes", "mnist mlp (batch 60)", "--repeats", "1", "--no-compile", "--no-resnet",
            "--threads", "1", "--processes", "2", "--heap", "steady"]  # fmt: skip
    assert main([*argv, "--write", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "process 1/2" in printed and "process 2/2" in printed
    text = out.read_text()
    assert "2 processes" in text and "threads 1" in text and "heap steady" in text
    if GLIBC:  # (each process started with the whole steady heap)
        assert "no tcache" in text
    assert text.count("minor page faults per timed call") == 2  # (one count per process)
    lines = text.splitlines()
    head = _cells(next(ln for ln in lines if ln.startswith("| shape |")))
    for mode in ("fwd", "fwd+bwd", "eval"):
        cells = dict(
            zip(head, _cells(next(ln for ln in lines if f"| {mode} |" in ln)), strict=True)
        )
        med, lo, hi = (
            float(v)
            for v in re.fullmatch(r"(\S+) \((\S+)-(\S+)\)", cells["torch / fused"]).groups()
        )
        assert lo <= med <= hi


def test_a_failing_process_stops_the_run_with_its_output(monkeypatch):
    import subprocess

    from bnlab import bench

    calls = []

    def run(cmd, **kw):  # a child that fails as argparse makes it fail (without starting one)
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 2, "", "error: --repeats must be >= 1\n")

    monkeypatch.setattr(bench.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="(?s)process 1 of 2 failed.*--repeats must be >= 1"):
        bench._run_processes(2, ["--repeats", "0"])
    assert len(calls) == 1 and calls[0][1:3] == ["-m", "bnlab.bench"]


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
# A 48 MiB tensor made and freed eight times in a fresh process; each round's minor page faults
# (48 MiB is 12,288 pages) and what steady_heap() reported.
_ROUNDS = (
    "import sys, torch\n"
    "from bnlab.bench import steady_heap, minor_faults\n"
    "if sys.argv[1] == 'steady': print(steady_heap())\n"
    "counts = []\n"
    "for i in range(8):\n"
    "    f0 = minor_faults(); t = torch.empty(48 << 20, dtype=torch.uint8).fill_(1)\n"
    "    del t; counts.append(minor_faults() - f0)\n"
    "print('faults', counts)\n"
)


def _rounds(mode: str, env: dict[str, str]) -> tuple[str, list[int]]:
    done = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True,
                          check=True, env=env)  # fmt: skip
    head, _, counts = done.stdout.rpartition("faults")
    return head, json.loads(counts)


@pytest.mark.skipif(not GLIBC, reason="steady_heap sets glibc's malloc settings")
def test_a_steady_heap_serves_every_call_from_memory_already_mapped():
    """Started with ``steady_env()``, a process that calls ``steady_heap()`` reuses a freed
    48 MiB tensor's memory for the next one in every round from the third on (the first two
    grow the heap), under several hash seeds (they move the interpreter's small allocations,
    which decided whether the memory was reused when glibc's small-block cache was on); with
    glibc's defaults every round maps its memory afresh. Without the tunables the report says
    the heap is not all steady."""
    from bnlab.bench import steady_env

    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # (glibc's defaults)
    for seed in ("0", "1"):
        said, counts = _rounds("steady", steady_env({**base, "PYTHONHASHSEED": seed}))
        assert "heap steady" in said and "no tcache" in said, said
        assert max(counts[2:]) < 100, (seed, counts)
    _, counts = _rounds("as-is", base)
    assert min(counts[1:]) > 12000, counts
    said, _ = _rounds("steady", base)
    assert "heap thresholds only" in said and "steady_env" in said, said


def test_steady_env_keeps_the_users_other_tunables():
    from bnlab.bench import steady_env

    users = "glibc.malloc.tcache_count=7:glibc.pthread.mutex_spin_count=9"
    env = steady_env({"GLIBC_TUNABLES": users, "HOME": "/h"})
    parts = env["GLIBC_TUNABLES"].split(":")
    assert env["HOME"] == "/h" and "glibc.pthread.mutex_spin_count=9" in parts
    assert "glibc.malloc.tcache_count=0" in parts and "glibc.malloc.tcache_count=7" not in parts
    assert f"glibc.malloc.mmap_threshold={1 << 30}" in parts


@pytest.mark.skipif(not GLIBC, reason="steady_heap sets glibc's malloc settings")
def test_heap_steady_reruns_the_benchmark_in_a_steady_process(monkeypatch, capfd):
    """``--heap steady`` in a process started without ``steady_env()`` runs the same command in
    one started with it (once: that process goes on itself)."""
    from bnlab import bench

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    cmd = [sys.executable, "-c", "from bnlab.bench import rerun_steady, steady_heap\n"
           "assert rerun_steady(['false']) is None\nprint(steady_heap())"]  # fmt: skip
    assert bench.rerun_steady(cmd) == 0
    assert "no tcache" in capfd.readouterr().out
    calls = []
    monkeypatch.setattr(bench, "rerun_steady", lambda c: calls.append(c) or 3)
    argv = ["--shapes", "mnist mlp (batch 60)", "--heap", "steady"]
    assert bench.main(argv) == 3 and calls == [[sys.executable, "-m", "bnlab.bench", *argv]]
