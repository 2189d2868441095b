"""The Figure 1 experiment: batched == separate runs, the smoke run, report rebuilt from files."""

from __future__ import annotations

import json

import pytest

from bnlab.cli import main
from bnlab.experiments import mnist, mnist_report
from bnlab.runs import load_run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mnist-quick"
    assert main(["run", "mnist", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_run_produces_all_files_and_bn_wins(quick_run):
    for name in ("config.json", "metrics.jsonl", "figure1a.png", "figure1bc.png", "report.md",
                 "report.html"):
        assert (quick_run / name).is_file(), name
    files = load_run(quick_run)
    meta, rows = files.meta, files.rows
    assert meta["dataset"]["name"] == "mnist-5k" and meta["steps_done"] == mnist.QUICK["steps"]
    assert meta["threads"] >= 1 and "torch" in meta["versions"] and not meta["interrupted"]
    assert meta["status"] == "finished" and meta["quick"] is True
    s = mnist_report.summarize(meta, rows)
    # threshold of the smoke test: after 800 steps BN is well above the baseline
    assert s["final"]["bn"] > 0.8
    assert s["final"]["bn"] > s["final"]["baseline"] + 0.1
    # ... but 800 steps cannot judge claims about training to convergence
    assert {c.verdict for c in s["claims"]} == {"not assessed"}
    steps = sorted({r["step"] for r in rows})
    assert steps[0] == 0 and steps[-1] == mnist.QUICK["steps"]
    assert len(rows) == len(steps) * 2 * mnist.QUICK["seeds"]
    row = rows[-1]
    assert len(row["tracked_pct"]) == 3 and len(row["unit_pct"]) == 100
    assert row["tracked_pct"][0] <= row["tracked_pct"][1] <= row["tracked_pct"][2]
    html = (quick_run / "report.html").read_text()
    assert "data:image/png;base64," in html and "Claims" in html and "Smoke run" in html
    assert "<img" in html and "src='figure1" not in html  # self-contained
    assert "mnist-5k, 4,000 train" in html  # the data set difference is in the table headers
    assert "`" not in html and "False" not in html  # no raw markup or Python values


def test_report_rebuilds_identically_from_files(quick_run):
    md_before = (quick_run / "report.md").read_text()
    (quick_run / "report.md").unlink()
    (quick_run / "figure1a.png").unlink()
    assert main(["report", str(quick_run)]) == 0
    assert (quick_run / "report.md").read_text() == md_before
    assert (quick_run / "figure1a.png").is_file()


def _hand_made_rows(last_step: int) -> list[dict]:
    rows = []
    for step in range(0, last_step + 1, last_step // 10):
        for net, acc in (("baseline", 0.5 + step / (4 * last_step)),
                         ("bn", 0.9 + step / (20 * last_step))):
            wobble = (step // (last_step // 10)) % 2 if net == "baseline" else 0.0
            rows.append(
                {
                    "step": step,
                    "net": net,
                    "seed": 0,
                    "test_acc": acc,
                    "tracked_pct": [-1 - wobble, wobble, 1 + 2 * wobble],
                    "unit_pct": [[-1 - wobble, wobble, 1 + 2 * wobble]] * 3,
                }
            )
    return rows


def test_claims_computed_from_hand_made_metrics():
    """summarize() on metrics written by hand: verdicts follow the definitions."""
    meta = {"experiment": "mnist"}
    rows = _hand_made_rows(20_000)
    s = mnist_report.summarize(meta, rows)
    assert [c.verdict for c in s["claims"]] == ["holds"] * 4
    assert s["final"]["baseline"] == pytest.approx(0.75)
    assert s["stability"]["baseline"]["tracked_median_range"] == pytest.approx(1.0)
    assert s["stability"]["baseline"]["tracked_spread_range"] == pytest.approx(3.0)
    assert s["stability"]["bn"]["tracked_spread_range"] == pytest.approx(0.0)
    # swap the roles: every claim must now fail
    swapped = [dict(r, net="bn" if r["net"] == "baseline" else "baseline") for r in rows]
    assert [c.verdict for c in mnist_report.summarize(meta, swapped)["claims"]] == ["fails"] * 4
    # too short a run: not assessed, whatever the numbers
    short = mnist_report.summarize(meta, _hand_made_rows(5_000))["claims"]
    assert {c.verdict for c in short} == {"not assessed"}


def test_claim_2_is_not_assessed_while_the_baseline_is_at_chance():
    rows = [dict(r, test_acc=0.1) if r["net"] == "baseline" else r
            for r in _hand_made_rows(20_000)]
    c2 = mnist_report.summarize({}, rows)["claims"][1]
    assert c2.verdict == "not assessed" and "near chance" in c2.note


def test_bad_run_dir_and_bad_metrics(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "mnist"}))
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    # nothing usable: the report still says what it found, and why no claim can be judged
    assert main(["report", str(tmp_path)]) == 0
    assert "Claims: 4 not assessed" in capsys.readouterr().out
    html = (tmp_path / "report.html").read_text()
    assert "line 1 is not JSON" in html and "no test accuracy rows for the baseline" in html


def test_cli_list_and_flag_types(capsys):
    assert main(["list"]) == 0
    assert "mnist" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "mnist", "--steps", "many"])
    with pytest.raises(SystemExit):
        main(["run", "mnist", "--dataset", "imagenet"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--init-std", "nan"], "--init-std must be a finite number"),
        (["--momentum", "nan"], "--momentum must be a finite number"),
        (["--bn-eps", "0"], "--bn-eps must be > 0"),
        (["--bn-momentum", "5"], "--bn-momentum must be <= 1"),
        (["--eval-batch", "0"], "--eval-batch must be >= 1"),
        (["--eval-batch", "-5"], "--eval-batch must be >= 1"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--eval-batch", "5000"], "--eval-batch 5000 is larger than the 1,000 test images"),
        (["--batch-size", "5000"], "--batch-size 5000 is larger than the 4,000 training"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["run", "mnist", "--quick", "--out", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_one_process_per_variant_gives_the_same_numbers(tmp_path):
    base = ["run", "mnist", "--quick", "--steps", "200", "--no-progress", "--threads", "2"]
    assert main([*base, "--workers", "1", "--out", str(tmp_path / "w1")]) == 0
    assert main([*base, "--workers", "2", "--out", str(tmp_path / "w2")]) == 0
    rows = {}
    for w in ("w1", "w2"):
        files = load_run(tmp_path / w)
        meta, r = files.meta, files.rows
        rows[w] = sorted(r, key=lambda x: (x["step"], x["net"], x["seed"]))
        assert meta["processes"] == int(w[1])
    assert len(rows["w1"]) == len(rows["w2"]) == 3 * 2 * 2
    for a, b in zip(rows["w1"], rows["w2"], strict=True):
        assert a["test_acc"] == b["test_acc"] and a["step"] == b["step"]
        assert a["tracked_pct"] == pytest.approx(b["tracked_pct"], abs=1e-3)


def test_stop_request_ends_with_an_evaluation_at_the_step_reached():
    cfg = mnist.MnistConfig(steps=1000, eval_every=500, seeds=1, dataset="synthetic")
    data = mnist._load_data(cfg)
    events = []
    steps = mnist.train_variants(
        cfg,
        ("bn",),
        data,
        lambda kind, p: events.append((kind, p)),
        lambda: any(k == "progress" and p >= 200 for k, p in events),
    )
    assert steps == 200
    evals = [p for k, p in events if k == "eval"]
    assert [rows[0]["step"] for rows in evals] == [0, 200]
    assert {r["net"] for rows in evals for r in rows} == {"bn"}


def test_cli_bench_help_reaches_the_bench_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "usage: bnlab bench" in capsys.readouterr().out


def _hand_made_run(path, rows, **meta):
    path.mkdir()
    base = {"experiment": "mnist", "status": "finished", "config": {"steps": 20_000, "seeds": 1},
            "dataset": {"name": "mnist", "train": 60_000, "test": 10_000}}
    (path / "config.json").write_text(json.dumps({**base, **meta}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _damage(rows: list[dict], how: str) -> list[dict]:
    rows = [dict(r) for r in rows]
    if how == "fields":
        del rows[3]["seed"]
        del rows[5]["step"]
        rows[7]["test_acc"] = "high"
        rows[9]["tracked_pct"] = [1, 2]
        rows[11]["unit_pct"] = [[1, 2, 3]]  # one unit where the run has three
        rows[13]["net"] = "other"
        rows[15]["test_acc"] = None
    elif how == "one network":
        rows = [r for r in rows if r["net"] == "bn"]
    return rows


@pytest.mark.parametrize("how", ["fields", "one network", "number line", "truncated"])
def test_report_builds_what_it_can_from_damaged_metrics(tmp_path, capsys, how):
    """Damaged rows are left out with a warning naming what was wrong; a run with one network
    only still gets its figures, with every claim not assessed and the reason given."""
    rows = _damage(_hand_made_rows(20_000), how)
    run = _hand_made_run(tmp_path / "run", rows)
    text = (run / "metrics.jsonl").read_text()
    if how == "number line":
        lines = text.splitlines(keepends=True)
        (run / "metrics.jsonl").write_text("".join(lines[:4] + ["42\n"] + lines[4:]))
    elif how == "truncated":
        (run / "metrics.jsonl").write_text(text + '{"step": 20000, "net": "bn", "se')
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    html = (run / "report.html").read_text()
    assert (run / "figure1a.png").is_file() and (run / "figure1bc.png").is_file()
    files = load_run(run)
    verdicts = [c.verdict for c in mnist_report.summarize(files.meta, files.rows)["claims"]]
    if how == "one network":
        assert verdicts == ["not assessed"] * 4
        assert "no test accuracy rows for the baseline network" in html
        assert "baseline n/a" in out
    else:  # the rest of the run still judges the claims
        assert verdicts == ["holds"] * 4
    if how == "fields":
        for warning in ("3 row(s) of metrics.jsonl lack a valid net, step or seed",
                        "1 row(s) of metrics.jsonl have an unusable test_acc",
                        "1 row(s) of metrics.jsonl have an unusable tracked_pct",
                        "1 row(s) of metrics.jsonl have an unusable unit_pct"):
            assert warning in html
    if how == "number line":
        assert "line 5 is a JSON int, not an object; skipped" in html
    if how == "truncated":
        assert f"line {len(rows) + 1} is incomplete" in html


def test_report_of_a_config_json_with_wrong_types(tmp_path, capsys):
    """Every value of config.json is read defensively: wrong types show as they are or as '?',
    never as a traceback."""
    run = _hand_made_run(tmp_path / "run", _hand_made_rows(20_000), dataset=["mnist"],
                         versions=["x"], steps_done="many", threads=None,
                         config={"steps": "20000", "tracked_unit": "x", "seeds": [1]})
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "Status: <strong>finished</strong>; wall time ?" in (run / "report.html").read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_pressed_again_while_stopping_still_records_how_far_the_run_got(tmp_path,
                                                                               monkeypatch,
                                                                               workers):
    """Ctrl-C while a row is being written, again while the workers are joined and again while
    the final fields are written: config.json still gets the status, the end time and
    steps_done (the last step every network was evaluated at), and the report says how far
    the run got."""
    import multiprocessing.process as mpp
    import signal

    from bnlab.experiments import execute
    from bnlab.report.report import write_report
    from bnlab.runs import RunDir

    real_log, real_update, real_join = RunDir.log, RunDir.update, mpp.BaseProcess.join
    calls = {"log": 0, "join": 0, "update": 0}

    def log(self, rows):
        calls["log"] += 1
        if calls["log"] == 2:  # training under way
            signal.raise_signal(signal.SIGINT)
        return real_log(self, rows)

    def join(self, timeout=None):
        calls["join"] += 1
        if calls["join"] == 1:
            signal.raise_signal(signal.SIGINT)
        return real_join(self, timeout)

    def update(self, **fields):
        if "steps_done" in fields:
            calls["update"] += 1
            signal.raise_signal(signal.SIGINT)
        return real_update(self, **fields)

    monkeypatch.setattr(RunDir, "log", log)
    monkeypatch.setattr(RunDir, "update", update)
    monkeypatch.setattr(mpp.BaseProcess, "join", join)
    cfg = mnist.MnistConfig(steps=5000, eval_every=100, seeds=1, dataset="synthetic",
                            workers=workers, threads=2, eval_batch=200)
    out = tmp_path / "run"
    run = execute(mnist.EXPERIMENT, cfg, out, progress=False)
    monkeypatch.undo()
    assert calls["update"] == 1 and (calls["join"] >= 1 or workers == 1)  # every press came
    meta = json.loads((out / "config.json").read_text())
    assert run.meta["status"] == meta["status"] == "interrupted" and meta["interrupted"] is True
    assert meta["finished"] and meta["wall_time_s"] >= 0
    rows = load_run(out).rows
    last = {net: max(r["step"] for r in rows if r["net"] == net) for net in mnist.NETS}
    assert 0 < meta["steps_done"] == min(last.values()) < cfg.steps
    write_report(out)
    md = (out / "report.md").read_text()
    assert f"{meta['steps_done']:,} of 5,000 steps" in md and "? of" not in md


def test_a_run_whose_data_is_missing_leaves_no_directory(tmp_path, capsys, isolated_data):
    out = tmp_path / "run"
    assert main(["run", "mnist", "--quick", "--dataset", "mnist", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bnlab data fetch mnist" in err and "--download" in err and "Traceback" not in err
    assert not out.exists()
