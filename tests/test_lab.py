"""The lab: the experiment protocol, run directories, the generic CLI and report, proven with a
toy experiment registered from outside the package (tests/lab_toy.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bnlab
from bnlab.cli import main
from bnlab.experiments import EXPERIMENTS, execute, get_experiment
from bnlab.runs import RunDir, load_run, read_metrics

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@pytest.fixture(autouse=True)
def toy():
    import lab_toy  # registers "toy"

    yield lab_toy.EXPERIMENT


def _rows(path: Path) -> list[dict]:
    return read_metrics(path / "metrics.jsonl")[0]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``bnlab`` in a new process that knows the toy experiment only through BNLAB_EXPERIMENTS."""
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), full.get("PYTHONPATH", "")])
    full["BNLAB_EXPERIMENTS"] = "lab_toy"
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "bnlab.cli", *args], env=full,
                          capture_output=True, text=True, timeout=300)


def test_toy_runs_lists_and_reports_through_the_generic_cli(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "toy" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["run", "toy", "--out", str(out), "--no-progress", "--steps", "40"]) == 0
    printed = capsys.readouterr().out
    assert "final accuracy" in printed and "claim 1: holds" in printed
    for name in ("config.json", "metrics.jsonl", "toy.png", "report.md", "report.html"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "config.json").read_text())
    assert meta["experiment"] == "toy" and meta["status"] == "finished"
    assert meta["config"]["steps"] == 40 and meta["quick"] is False
    assert meta["fits"] == {"plain/0": "finished", "plain/1": "finished", "bn/0": "finished",
                            "bn/1": "finished"}
    rows = _rows(out)
    # 4 trainings x evaluations at steps 0, 20, 40
    assert sorted({r["step"] for r in rows}) == [0, 20, 40] and len(rows) == 12
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Toy experiment" in html
    assert "<span class='verdict v-holds'>holds</span>" in html and "Final" in html
    md_before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "toy.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == md_before and (out / "toy.png").is_file()


def test_quick_flag_and_help_come_from_the_experiment(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "toy", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--eval-every" in text and "--quick: 10" in text and "bnlab run toy --steps 40" in text
    assert "{both,bn}" in text  # choices listed
    out = tmp_path / "q"
    assert main(["run", "toy", "--quick", "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["quick"] is True and meta["config"]["steps"] == 20
    assert "Smoke run" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--dropout", "2"], "--dropout must be <= 0.9"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_config_is_refused_before_any_directory_is_made(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert main(["run", "toy", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_run_directory_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "toy", "--quick", "--out", str(out), "--no-progress"]) == 0
    before = (out / "metrics.jsonl").read_bytes(), (out / "config.json").read_bytes()
    assert main(["run", "toy", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert ((out / "metrics.jsonl").read_bytes(), (out / "config.json").read_bytes()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["run", "toy", "--quick", "--out", str(other), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_held_run_directory_refuses_a_second_process(tmp_path):
    run = RunDir.create(tmp_path / "r", {"experiment": "toy"})
    try:
        with pytest.raises(FileExistsError, match="in use by another bnlab process"):
            RunDir.resume(tmp_path / "r")
        # and from another process, which cannot take the lock either
        proc = _cli("run", "toy", "--resume", str(tmp_path / "r"))
        assert proc.returncode == 2 and "in use" in proc.stderr
    finally:
        run.close()


def test_interrupt_then_resume_in_a_new_process_gives_the_same_numbers(tmp_path):
    ref = tmp_path / "ref"
    assert main(["run", "toy", "--out", str(ref), "--no-progress"]) == 0
    part = tmp_path / "part"
    first = _cli("run", "toy", "--out", str(part), "--no-progress",
                 env={"TOY_INTERRUPT_AT": "40"})
    assert first.returncode == 130, first.stderr
    assert "--resume" in first.stdout
    meta = json.loads((part / "config.json").read_text())
    assert meta["status"] == "interrupted" and meta["interrupted"] is True
    assert "Interrupted" in (part / "report.html").read_text()
    partial = _rows(part)
    assert partial and max(r["step"] for r in partial) < 60
    second = _cli("run", "toy", "--resume", str(part), "--no-progress")
    assert second.returncode == 0, second.stderr
    meta = json.loads((part / "config.json").read_text())
    assert meta["status"] == "finished" and len(meta["segments"]) == 2
    key = lambda r: (r["variant"], r["seed"], r["step"])  # noqa: E731
    got, want = sorted(_rows(part), key=key), sorted(_rows(ref), key=key)
    assert [key(r) for r in got] == [key(r) for r in want]
    for a, b in zip(got, want, strict=True):
        assert a == b  # every number, bit for bit (same code, same threads)


def test_resume_refuses_flags_and_finished_runs(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "toy", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert main(["run", "toy", "--resume", str(out), "--steps", "5"]) == 2
    assert "cannot be combined with --resume" in capsys.readouterr().err
    assert main(["run", "toy", "--resume", str(out)]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["run", "toy", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_run_that_fails_before_measuring_leaves_no_directory(tmp_path, monkeypatch, toy):
    def broken(cfg, run_dir, progress):
        raise FileNotFoundError("toy: the data is not here")

    import dataclasses

    monkeypatch.setitem(EXPERIMENTS, "toy", dataclasses.replace(toy, run=broken))
    out = tmp_path / "r"
    assert main(["run", "toy", "--out", str(out), "--no-progress"]) == 2
    assert not out.exists()


def test_execute_from_python_and_status_of_a_failure(tmp_path, monkeypatch, toy):
    run = execute(get_experiment("toy"), out=tmp_path / "a", quick=True, progress=False)
    assert run.meta["status"] == "finished" and load_run(run.path).rows

    def fails_late(cfg, run_dir, progress):
        run_dir.log({"step": 0, "variant": "bn", "seed": 0, "test_acc": 0.5})
        raise RuntimeError("a bug")

    import dataclasses

    monkeypatch.setitem(EXPERIMENTS, "toy", dataclasses.replace(toy, run=fails_late))
    with pytest.raises(RuntimeError, match="a bug"):
        execute(get_experiment("toy"), out=tmp_path / "b", quick=True, progress=False)
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["status"] == "failed" and "a bug" in meta["error"]


def test_report_names_unknown_experiments_and_damaged_files(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "toy", "--quick", "--out", str(out), "--no-progress"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # a damaged middle line and a truncated last line: skipped with warnings, report still built
    lines[2] = "{oops"
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 1')
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "line 3 is not JSON" in html and f"line {len(lines) + 1} is incomplete" in html
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "experiment": "nope"}))
    assert main(["report", str(out)]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    (out / "config.json").write_text("[]")
    assert main(["report", str(out)]) == 2
    assert "config.json holds a JSON list" in capsys.readouterr().err


def test_version_and_plain_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert bnlab.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "``" not in text and ":class:" not in text
    with pytest.raises(SystemExit):
        main(["run", "mnist", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and "issue" not in text.lower()
    assert "{auto,mnist,mnist-5k" in text  # --dataset lists its choices


def test_report_shows_values_from_the_files_as_text_never_as_markup(tmp_path, capsys):
    """config.json is user-controlled: its strings reach report.md and report.html as literal
    text (no HTML, no links, no emphasis), whatever they hold."""
    out = tmp_path / "r"
    assert main(["run", "toy", "--quick", "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "config.json").read_text())
    evil = "`x` <script>alert(1)</script> **bold** [a](javascript:alert(1)) | # _u_"
    meta.update(command=f"bnlab run toy --out {evil}", description=f"<img src=x onerror=1> {evil}",
                cpu=f"<b>cpu</b>{evil}", status="failed", error=f"ValueError: {evil}",
                versions={"bnlab": evil}, dataset={"name": evil})
    meta["config"]["norm"] = evil
    (out / "config.json").write_text(json.dumps(meta))
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    # every markup character arrives escaped: \<script\>, \*\*bold\*\*, \[a\](...
    for raw in (r"<script", r"<img src", r"<b>cpu", r"\]\(javascript", r"\*\*bold"):
        assert not re.search(r"(?<!\\)" + raw, md), raw
    assert "\\<script\\>alert(1)\\</script\\>" in md
    for raw in ("<script", "<img src=x", "<b>cpu", 'href="javascript', "<strong>bold"):
        assert raw not in html, raw
    # ... and the reader sees the text exactly as it was written
    assert html.count("`x` &lt;script&gt;alert(1)&lt;/script&gt; **bold** "
                      "[a](javascript:alert(1)) | # _u_") >= 6


def test_report_on_a_broken_config_json_names_the_file(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "toy", "--quick", "--out", str(out), "--no-progress"]) == 0
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[: len(text) // 2])  # cut short
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'config.json'} is not valid JSON" in err and "Traceback" not in err


RACE = """
import os, sys, time
from bnlab.cli import main
go = sys.argv[1]
while not os.path.exists(go):  # both processes start main() at the same moment
    time.sleep(0.001)
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_started_on_one_out_directory(tmp_path):
    """Two `bnlab run` processes racing for the same --out: exactly one gets it and writes a
    complete run; the other is refused with a message and writes nothing there."""
    out, go = tmp_path / "shared", tmp_path / "go"
    env = dict(os.environ, BNLAB_EXPERIMENTS="lab_toy",
               PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    args = ["run", "toy", "--quick", "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(go), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        import time

        time.sleep(3)  # both past their imports, waiting for the go file
        go.touch()
        results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "Traceback" not in refused
    assert any(m in refused for m in ("in use by another bnlab process", "already holds a run",
                                      "claimed by another run", "is not empty")), refused
    meta = json.loads((out / "config.json").read_text())
    assert meta["status"] == "finished"
    rows = _rows(out)
    keys = [(r["variant"], r["seed"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) == 12  # one run's rows, each once: 4 trainings x 3 evals


def test_setup_line_gives_the_workers_thread_count(tmp_path):
    from bnlab.report.report import _setup_lines
    from bnlab.runs import RunFiles

    meta = {"cpu": "x", "threads": 2, "processes": 2, "threads_per_process": 1}
    text = "\n".join(_setup_lines(RunFiles(tmp_path, meta, [])))
    assert "2 process(es) x 1 thread(s)" in text
    meta = {"cpu": "x", "threads": 2}
    assert "; 2 thread(s)" in "\n".join(_setup_lines(RunFiles(tmp_path, meta, [])))
