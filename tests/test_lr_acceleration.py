"""`bnlab run lr-acceleration` (Figures 2-3 of Ioffe & Szegedy 2015): the analysis on hand-made
metrics rows (verdicts that must hold, fail, or not be assessed), the plan of trainings, the base
rate's choice, config and data checks, and a --quick smoke run on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.experiments import lr_acceleration as lra
from bnlab.experiments import lr_acceleration_report as rep
from bnlab.runs import read_metrics

GRID = list(range(0, 3001, 300))  # evaluations of a 3,000-step run


def ramp(lo: float, hi: float, reach: int):
    """Accuracy rising linearly from ``lo`` at step 0 to ``hi`` at step ``reach``, then flat."""
    return lambda s: lo + (hi - lo) * min(1.0, s / reach)


def make_rows(curves: dict, diverged: dict | None = None, grid=GRID, seeds=(0, 1)) -> list[dict]:
    """Metrics rows as fit writes them: one per evaluation and seed (``curves[variant](step)``,
    or ``curves[variant][seed](step)``), and a divergence row where ``diverged[(variant, seed)]``
    gives a step (no evaluation from that step on)."""
    diverged = diverged or {}
    rows = []
    for variant, f in curves.items():
        for seed in seeds:
            fn = f[seed] if isinstance(f, dict) else f
            stop = diverged.get((variant, seed))
            for s in grid:
                if stop is not None and s >= stop:
                    break
                rows.append({"step": s, "phase": "main", "variant": variant, "seed": seed,
                             "test_acc": round(fn(s), 6), "train_loss": 0.5})
            if stop is not None:
                rows.append({"step": stop, "phase": "main", "variant": variant, "seed": seed,
                             "diverged": True, "train_loss": None, "reason": "loss > 1000"})
    return rows


META = {"dataset": {"num_classes": 10, "test": 10_000}}
HOLDS = {
    "baseline": ramp(0.1, 0.90, 3000),
    "bn-baseline": ramp(0.1, 0.91, 1500),
    "bn-x5": ramp(0.1, 0.912, 550),
    "bn-x30": ramp(0.1, 0.92, 600),
    "bn-x5-sigmoid": ramp(0.1, 0.85, 900),
    "baseline-x5": ramp(0.1, 0.5, 300),
    "baseline-sigmoid": lambda s: 0.1,
}


def verdicts(s: dict) -> dict[str, str]:
    return {c.id: c.verdict for c in s["claims"]}


def test_every_claim_holds_on_rows_made_to_hold():
    rows = make_rows(HOLDS, diverged={("baseline-x5", 0): 200, ("baseline-x5", 1): 450})
    s = rep.summarize(META, rows)
    assert verdicts(s) == dict.fromkeys("abcde", "holds")
    v = s["variants"]
    assert s["target"] == pytest.approx(0.90) and s["baseline_steps"] == 3000
    # BN-Baseline reaches 0.90 at 1,500 * 0.8 / 0.81 = 1,481.5 -> first evaluation 1,500
    assert v["bn-baseline"]["reach"] == 1500 and v["bn-baseline"]["fraction"] == pytest.approx(0.5)
    assert v["bn-x5"]["reach"] == 600 and v["bn-x5"]["fraction"] == pytest.approx(0.2)
    assert v["baseline"]["reach"] == 3000
    # diverged seeds count as chance from their divergence on: mean of two chance values
    assert v["baseline-x5"]["diverged"] == {0: 200, 1: 450}
    assert v["baseline-x5"]["final"] == pytest.approx(0.1)
    assert v["bn-x5-sigmoid"]["reach"] is None  # never reaches 0.90
    claims = {c.id: c for c in s["claims"]}
    assert "step 600 (0.20 of the baseline's steps)" in claims["b"].measured
    assert "2 of 2 seeds diverged" in claims["d"].measured


def test_every_claim_fails_on_rows_made_to_fail():
    fails = {
        "baseline": ramp(0.1, 0.90, 3000),
        "bn-baseline": ramp(0.1, 0.90, 3000),  # reaches it only at the same step
        "bn-x5": ramp(0.1, 0.91, 800),  # at 900 > 3000 / 5
        "bn-x30": ramp(0.1, 0.93, 600),  # one seed diverges (below)
        "bn-x5-sigmoid": ramp(0.1, 0.85, 900),
        "baseline-x5": ramp(0.1, 0.905, 1200),  # only 0.005 below BN-x5
        "baseline-sigmoid": ramp(0.1, 0.80, 1500),  # trains, only 0.05 below
    }
    s = rep.summarize(META, make_rows(fails, diverged={("bn-x30", 1): 2000}))
    assert verdicts(s) == dict.fromkeys("abcde", "fails")
    claims = {c.id: c for c in s["claims"]}
    assert "1 of 2 seeds diverged (at step 2,000)" in claims["c"].measured
    assert all("does not support" in c.note for c in claims.values())
    assert s["variants"]["bn-x5"]["reach"] == 900


@pytest.mark.parametrize(
    "change, claim, verdict",
    [
        # (c): BN-x30 a hair below BN-x5 but within one standard error on 10,000 images
        ({"bn-x30": ramp(0.1, 0.910, 600)}, "c", "holds"),
        ({"bn-x30": ramp(0.1, 0.905, 600)}, "c", "fails"),
        # (d): no divergence, but clearly below BN-x5 (by 0.02 or more)
        ({"baseline-x5": ramp(0.1, 0.89, 600)}, "d", "holds"),
        ({"baseline-x5": ramp(0.1, 0.895, 600)}, "d", "fails"),
        # (e): far worse (0.10 below) though above chance
        ({"baseline-sigmoid": ramp(0.1, 0.75, 900)}, "e", "holds"),
        ({"bn-x5-sigmoid": ramp(0.1, 0.5, 900)}, "e", "fails"),  # not well above chance
        # (b): exactly a fifth holds
        ({"bn-x5": ramp(0.1, 0.912, 600)}, "b", "holds"),
        ({"bn-x5": ramp(0.1, 0.899, 600)}, "b", "fails"),  # never reaches the target
    ],
)
def test_claim_boundaries(change, claim, verdict):
    s = rep.summarize(META, make_rows({**HOLDS, **change},
                                      diverged={("baseline-x5", 0): 200, ("baseline-x5", 1): 450}
                                      if "baseline-x5" not in change else None))
    assert verdicts(s)[claim] == verdict


def test_claims_are_not_assessed_when_the_run_cannot_tell():
    short = rep.summarize(META, make_rows(HOLDS, grid=list(range(0, 601, 100))))
    assert set(verdicts(short).values()) == {"not assessed"}
    assert "smoke run" in short["claims"][0].note
    partial = {k: v for k, v in HOLDS.items() if k not in ("bn-x30", "baseline-sigmoid")}
    s = rep.summarize(META, make_rows(partial))
    # (d) holds without divergence here: Baseline-x5 ends at 0.5, far below BN-x5
    assert verdicts(s) == {"a": "holds", "b": "holds", "c": "not assessed", "d": "holds",
                           "e": "not assessed"}
    assert "BN-x30 not trained" in s["claims"][2].note
    flat = rep.summarize(META, make_rows({**HOLDS, "baseline": ramp(0.1, 0.3, 3000)}))
    assert verdicts(flat)["a"] == verdicts(flat)["b"] == "not assessed"
    assert "never got well above chance" in flat["claims"][0].note


def test_variant_curve_skips_unreached_steps_and_counts_divergence_as_chance():
    rows = make_rows({"bn-x5": {0: ramp(0.1, 0.9, 600), 1: ramp(0.2, 0.8, 600)}},
                     diverged={("bn-x5", 1): 700})
    rows = [r for r in rows if not (r["seed"] == 0 and r["step"] > 2400)]  # seed 0 unfinished
    grid = rep.eval_grid(rows)
    steps, acc, div = rep.variant_curve(rows, "bn-x5", grid, 0.1)
    assert steps == list(range(0, 2401, 300)) and div == {1: 700}
    assert acc.shape == (9, 2)
    assert acc[2].tolist() == pytest.approx([0.9, 0.8])  # step 600, before the divergence
    assert acc[3].tolist() == pytest.approx([0.9, 0.1])  # step 900: seed 1 at chance
    assert rep.first_reach(steps, acc.mean(1), 0.85) == 600
    assert rep.first_reach(steps, acc.mean(1), 0.95) is None


def test_plan_applies_the_section_4_2_1_changes():
    cfg = lra.LrAccelerationConfig(dataset="synthetic", steps=3000, seeds=2, seed=3,
                                   weight_decay=1e-3, dropout=0.4, lr_decay=0.5)
    sweep = lra.plan_jobs(cfg, None)
    assert [j["lr"] for j in sweep] == [0.01, 0.02, 0.04, 0.08]
    assert all(j["tags"]["phase"] == "sweep" and j["split"] == "sweep" and not j["bn"]
               and j["dropout"] == 0.4 and j["tags"]["seed"] == 3 and j["steps"] == 1500
               and j["decay"] == 0.5 for j in sweep)  # half the run, the same total decay
    assert [j["lr"] for j in lra.plan_jobs(cfg, None, [0.3, 0.6])] == [0.3, 0.6]
    jobs = {(j["tags"]["variant"], j["tags"]["seed"]): j for j in lra.plan_jobs(cfg, 0.02)}
    assert len(jobs) == 14 and {s for _, s in jobs} == {3, 4}
    base, bnb = jobs[("baseline", 3)], jobs[("bn-baseline", 3)]
    assert (base["bn"], bnb["bn"]) == (False, True)
    for j in (base, bnb):
        assert (j["lr"], j["dropout"], j["weight_decay"], j["decay"]) == (0.02, 0.4, 1e-3, 0.5)
        assert j["steps"] == 3000
    for name, lr, bn, act in [("bn-x5", 0.1, True, "relu"), ("bn-x30", 0.6, True, "relu"),
                              ("bn-x5-sigmoid", 0.1, True, "sigmoid"),
                              ("baseline-x5", 0.1, False, "relu"),
                              ("baseline-sigmoid", 0.1, False, "sigmoid")]:
        j = jobs[(name, 4)]
        assert (j["bn"], j["act"], j["dropout"]) == (bn, act, 0.0)
        assert j["lr"] == pytest.approx(lr)
        assert j["weight_decay"] == pytest.approx(1e-3 / 5)
        assert j["decay"] == pytest.approx(0.5**6)  # decay 6x faster over the same steps
    # each control is its BN variant without BN, everything else equal
    for ctrl, bn_variant in [("baseline-x5", "bn-x5"), ("baseline-sigmoid", "bn-x5-sigmoid")]:
        a, b = dict(jobs[(ctrl, 3)]), dict(jobs[(bn_variant, 3)])
        assert a.pop("bn") is False and b.pop("bn") is True
        assert a.pop("tags")["variant"] == ctrl and b.pop("tags")["variant"] == bn_variant
        assert a == b
    sub = lra.plan_jobs(lra.LrAccelerationConfig(dataset="synthetic", seeds=1,
                                                 variants="bn-x5,baseline"), 0.01)
    assert [j["tags"]["variant"] for j in sub] == ["baseline", "bn-x5"]


def test_base_rate_is_the_best_validation_accuracy_not_diverged():
    res = {0.01: {"status": "finished", "best_val_acc": 0.80},
           0.02: {"status": "finished", "best_val_acc": 0.85},
           0.04: {"status": "finished", "best_val_acc": 0.85},
           0.08: {"status": "diverged", "best_val_acc": 0.90}}
    lr, choice = lra.choose_base_lr(res)
    assert lr == 0.02 and choice["edge"] == ""  # a tie goes to the smaller rate
    assert choice["scores"]["0.08"] is None
    lr, choice = lra.choose_base_lr({0.01: {"status": "finished", "best_val_acc": 0.9},
                                     0.02: {"status": "finished", "best_val_acc": 0.8}})
    assert lr == 0.01 and choice["edge"] == "low"
    with pytest.raises(ValueError, match="diverged at every rate"):
        lra.choose_base_lr({0.1: {"status": "diverged", "best_val_acc": 0.5}})


@pytest.mark.parametrize(
    "extend, tried, chosen, edge",
    [
        # best at the high edge twice: 0.16, 0.32 then 0.64, 1.28 are added; 0.32 is inside
        (2, [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28], 0.32, ""),
        # one extension allowed: the best stays at the edge, and the choice says so
        (1, [0.01, 0.02, 0.04, 0.08, 0.16, 0.32], 0.32, "high"),
        (0, [0.01, 0.02, 0.04, 0.08], 0.08, "high"),
    ],
)
def test_the_sweep_grows_beyond_an_edge_until_the_best_rate_is_inside(
        tmp_path, monkeypatch, extend, tried, chosen, edge):
    """The sweep's control flow with the trainings replaced by a score peaked at 0.32."""
    import math

    from bnlab.experiments import execute, get_experiment

    seen = []

    def fake(cfg, job, data, run):
        seen.append((job["tags"]["phase"], job["lr"]))
        score = 0.9 - 0.05 * abs(math.log2(job["lr"] / 0.32))
        return {"status": "finished", "steps_done": job["steps"], "best_val_acc": score,
                "seconds": 0.0, "cpu_seconds": 0.0}

    monkeypatch.setattr(lra, "train_job", fake)
    exp = get_experiment("lr-acceleration")
    cfg = exp.make_config(dataset="synthetic", steps=20, eval_every=10, seeds=1,
                          variants="baseline", workers=1, threads=1, sweep_extend=extend)
    run = execute(exp, cfg, tmp_path / "run", progress=False)
    assert [lr for phase, lr in seen if phase == "sweep"] == pytest.approx(tried)
    assert seen[-1] == ("main", pytest.approx(chosen))
    choice = run.meta["base_lr"]
    assert choice["base_lr"] == pytest.approx(chosen) and choice["edge"] == edge
    assert choice["added"] == pytest.approx(tried[4:]) and choice["sweep_steps"] == 10


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sweep-lrs", "0.1,x"], "--sweep-lrs must be comma-separated numbers"),
        (["--sweep-lrs", "0.1,-1"], "--sweep-lrs must list positive"),
        (["--variants", "bn-x7"], "--variants must be 'all' or"),
        (["--norm", "nope"], "--norm must name a normalization family"),
        (["--norm", "none"], "--norm must name a normalization family"),
        (["--eval-every", "500", "--steps", "100"], "--eval-every 500 is larger than --steps"),
        (["--lr-decay", "0"], "--lr-decay must be > 0"),
    ],
)
def test_bad_flags_are_refused_before_any_directory_is_made(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert main(["run", "lr-acceleration", "--dataset", "synthetic", "--out", str(out),
                 *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.usefixtures("isolated_data")
def test_without_data_it_stops_before_making_anything_and_says_how_to_get_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "lr-acceleration", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bnlab data fetch fashion-mnist" in err
    assert "apt-get install dataset-fashion-mnist" in err
    assert "Traceback" not in err and not out.exists()
    assert main(["run", "lr-acceleration", "--dataset", "cifar10", "--out", str(out)]) == 2
    assert "bnlab data fetch cifar10" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.usefixtures("isolated_data")
def test_runs_on_fashion_mnist_files_from_the_cache(tmp_path, monkeypatch, capsys):
    """The Fashion-MNIST path end to end on a small generated IDX set (in-process)."""
    import os

    from datagen import make_idx_set

    make_idx_set(Path(os.environ["BNLAB_DATA"]) / "fashion-mnist", n_train=200, n_test=60)
    out = tmp_path / "run"
    assert main(["run", "lr-acceleration", "--out", str(out), "--no-progress", "--steps", "20",
                 "--eval-every", "10", "--seeds", "1", "--variants", "baseline,bn-x5",
                 "--sweep-lrs", "0.01", "--val-size", "50", "--width", "4",
                 "--workers", "1", "--threads", "1"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["dataset"]["name"] == "fashion-mnist" and meta["dataset"]["train"] == 200
    assert meta["dataset"]["test"] == 60 and meta["base_lr"]["base_lr"] == 0.01
    rows = read_metrics(out / "metrics.jsonl")[0]
    assert {(r["phase"], r["variant"]) for r in rows} == {
        ("sweep", "baseline"), ("main", "baseline"), ("main", "bn-x5")}
    assert all(r["step"] in (0, 10, 20) for r in rows)


def _rows_by_key(path: Path) -> dict:
    rows = read_metrics(path / "metrics.jsonl")[0]
    return {(r["phase"], r["variant"], r.get("sweep_lr"), r["seed"], r["step"]): r for r in rows}


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a training (a row written, its checkpoint not yet), then
    `--resume`: the rows equal an uninterrupted run's, bit for bit (one process)."""
    flags = ["--dataset", "synthetic", "--steps", "20", "--eval-every", "10", "--seeds", "1",
             "--variants", "baseline,bn-x5", "--sweep-lrs", "0.01,0.02", "--sweep-extend", "0",
             "--val-size", "200",
             "--test-size", "200", "--width", "4", "--workers", "1", "--threads", "1",
             "--no-progress"]
    ref = tmp_path / "ref"
    assert main(["run", "lr-acceleration", "--out", str(ref), *flags]) == 0

    real = lra.train_job
    calls = []

    def interrupting(cfg, job, data, run):
        calls.append(job["tags"])
        if len(calls) == 3:  # the first variant's (after the sweep's 2), at its row at step 10
            assert job["tags"]["phase"] == "main"

            class Stop:
                path, checkpoint_dir, drop_rows = run.path, run.checkpoint_dir, run.drop_rows

                def log(self, rows):
                    run.log(rows)
                    if rows.get("step") == 10:
                        raise KeyboardInterrupt

            return real(cfg, job, data, Stop())
        return real(cfg, job, data, run)

    monkeypatch.setattr(lra, "train_job", interrupting)
    part = tmp_path / "part"
    assert main(["run", "lr-acceleration", "--out", str(part), *flags]) == 130
    assert json.loads((part / "config.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(lra, "train_job", real)
    assert main(["run", "lr-acceleration", "--resume", str(part), "--no-progress"]) == 0
    got, want = _rows_by_key(part), _rows_by_key(ref)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key
    meta = json.loads((part / "config.json").read_text())
    assert meta["status"] == "finished" and meta["base_lr"] == json.loads(
        (ref / "config.json").read_text())["base_lr"]


def test_quick_run_trains_every_variant_and_reports_every_section(tmp_path, capsys):
    """The smoke run of the tests and CI: --quick on synthetic data, worker processes."""
    out = tmp_path / "quick"
    assert main(["run", "lr-acceleration", "--quick", "--dataset", "synthetic", "--out",
                 str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "claim e: not assessed" in printed
    meta = json.loads((out / "config.json").read_text())
    assert meta["status"] == "finished" and meta["quick"] is True
    assert meta["base_lr"]["how"] == "sweep" and meta["base_lr"]["base_lr"] in (0.01, 0.04)
    assert len(meta["fits"]) == 2 + 14
    assert all(f["status"] == "finished" and f["steps_done"] == (10 if "sweep" in k else 20)
               for k, f in meta["fits"].items())
    rows = read_metrics(out / "metrics.jsonl")[0]
    main_rows = [r for r in rows if r["phase"] == "main"]
    assert {(r["variant"], r["seed"]) for r in main_rows} == {
        (v, s) for v in lra.VARIANT_NAMES for s in (0, 1)}
    assert sorted({r["step"] for r in main_rows}) == [0, 10, 20]
    assert len(main_rows) == 14 * 3 and all(0 <= r["test_acc"] <= 1 for r in main_rows)
    assert {r["lr"] for r in main_rows if r["step"] == 0 and r["variant"] == "bn-x30"} == {
        30 * meta["base_lr"]["base_lr"]}
    sweep_rows = [r for r in rows if r["phase"] == "sweep"]
    assert {r["sweep_lr"] for r in sweep_rows} == {0.01, 0.04}
    assert all("val_acc" in r and "test_acc" not in r for r in sweep_rows if r["step"] > 0)
    for name in ("figure2.png", "sweep.png", "report.md", "report.html"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    for heading in ("## Figure 2: accuracy against steps", "## Figure 3: steps to the baseline's "
                    "best", "## Claims", "## The baseline's learning rate", "## Every training",
                    "## Setup"):
        assert heading in md, heading
    assert md.count("| not assessed |") == 5
    for label in rep.LABELS.values():
        assert f"| {label} |" in md, label


def test_values_from_the_run_files_are_shown_literally(tmp_path):
    """Strings from config.json (a data set's name, the norm, the sweep grid) are text in the
    report, never markup: what the file holds is what the Markdown and HTML show."""
    from bnlab.report.report import build_report
    from bnlab.runs import RunDir

    config = {"steps": 3000, "batch_size": 32, "eval_every": 300, "seeds": 2, "seed": 0,
              "norm": "b*n*", "sweep_lrs": "0.01,`x`", "width": 12}
    meta = {"experiment": "lr-acceleration", "config": config, "status": "finished",
            "dataset": {"name": "<i>fm</i>", "train": 60000, "test": 10000, "image": [1, 28, 28],
                        "num_classes": 10, "val": 5000},
            "base_lr": {"base_lr": 0.02, "how": "sweep", "added": [0.04], "sweep_steps": 1500,
                        "edge": ""}}
    run = RunDir.create(tmp_path / "run", meta)
    run.log(make_rows(HOLDS))
    run.log([{"step": st, "phase": "sweep", "variant": "baseline", "sweep_lr": lr, "seed": 0,
              "val_acc": acc} for lr, acc in ((0.01, 0.8), (0.02, 0.85), (0.04, 0.84))
             for st in (0, 1500)])
    md_path, html_path = build_report(tmp_path / "run")
    md, html = md_path.read_text(), html_path.read_text()
    assert "<i>fm" not in md and "<i>fm" not in html
    assert r"**Scale**: \<i\>fm\</i\> (60,000" in md and "&lt;i&gt;fm&lt;/i&gt; (60,000" in html
    assert "`b*n*`" in md and "<code>b*n*</code>" in html
    assert r"began as 0.01,\`x\`;" in md and "began as 0.01,`x`;" in html


class _FakeProc:
    def __init__(self):
        self.alive, self.terminated = True, False

    def is_alive(self):
        return self.alive

    def terminate(self):
        self.terminated, self.alive = True, False

    def join(self, timeout=None):
        pass


class _PressesThenEmpty:
    """A result queue whose get() raises KeyboardInterrupt ``presses`` times, then is empty."""

    def __init__(self, presses):
        self.presses = presses

    def get(self, timeout=None):
        import queue

        if self.presses:
            self.presses -= 1
            raise KeyboardInterrupt
        raise queue.Empty


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_the_workers_and_a_second_one_terminates_them(presses):
    """The pool's wait for results, with stand-ins for the processes and queues: one Ctrl-C is
    passed on to the workers (which then exit by themselves) and nothing is terminated; a
    second one while they are still running terminates them. Either way KeyboardInterrupt."""
    import queue

    pool = lra._Pool.__new__(lra._Pool)
    pool.procs = [_FakeProc(), _FakeProc()]
    pool.results = _PressesThenEmpty(presses)
    pool.jobs = queue.Queue()
    passed_on = []

    def interrupt():
        passed_on.append(1)
        if presses == 1:  # the workers stop and exit
            for p in pool.procs:
                p.alive = False

    pool._interrupt = interrupt
    with pytest.raises(KeyboardInterrupt):
        pool.map([{"tags": {"variant": "bn-x5", "seed": 0}}])
    assert passed_on == [1]
    assert all(p.terminated for p in pool.procs) == (presses == 2)
    assert not any(p.alive for p in pool.procs)
