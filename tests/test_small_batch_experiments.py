"""The two small-batch studies: `bnlab run batch-size` and `bnlab run non-iid` in --quick mode on
synthetic textures (with accuracy thresholds), --nproc 2 against one process, resume, refused
flags and missing data, and their verdict rules on hand-made rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.experiments import execute, get_experiment
from bnlab.experiments.batch_size_report import summarize as summarize_batch
from bnlab.experiments.non_iid import grouped_order
from bnlab.experiments.non_iid_report import summarize as summarize_non_iid
from bnlab.experiments.small_batch_common import load_data, tail_mean
from bnlab.runs import RunDir, read_metrics
from datagen import make_idx_set


def _rows(path: Path) -> list[dict]:
    return read_metrics(path / "metrics.jsonl")[0]


def _finals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("final")]


@pytest.fixture(scope="module")
def batch_size_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bs") / "run"
    assert main(["run", "batch-size", "--quick", "--dataset", "synthetic", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    return out


def test_batch_size_quick_trains_every_norm_and_size(batch_size_run, capsys):
    out = batch_size_run
    for name in ("config.json", "metrics.jsonl", "batch_size.png", "batch_size_training.png",
                 "report.md", "report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    meta = json.loads((out / "config.json").read_text())
    assert meta["status"] == "finished" and meta["planned"] == 18
    assert all(t["status"] == "finished" for t in meta["trainings"].values())
    finals = _finals(_rows(out))
    got = sorted((r["norm"], r["batch"], r["seed"]) for r in finals)
    want = sorted((n, b, s) for n in ("bn", "brn", "ghost", "gn", "ln") for b in (4, 32)
                  for s in (0, 1) if not (n == "ghost" and b == 32))  # fmt: skip
    assert got == want
    by = {(r["norm"], r["batch"], r["seed"]): r for r in finals}
    for seed in (0, 1):  # the textures are learned: well above the 10% of chance
        assert by[("bn", 4, seed)]["test_acc"] > 0.8
        assert by[("brn", 4, seed)]["test_acc"] > 0.8
        assert 0 <= by[("bn", 4, seed)]["test_acc_precise"] <= 1
        assert by[("ghost", 4, seed)]["sgd_batch"] == 32
    md = (out / "report.md").read_text()
    assert "Wu & He 2018" in md and "not assessed" in md and "smoke run" in md


def test_batch_size_resume_trains_only_what_is_missing(batch_size_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(batch_size_run, out)
    before = sorted(json.dumps(r, sort_keys=True) for r in _rows(out))
    with RunDir.resume(out) as run:  # as if the run had stopped before bn B=4 seed 1 ended
        run.drop_rows(lambda r: (r.get("norm"), r.get("batch"), r.get("seed")) == ("bn", 4, 1))
        run.update(status="interrupted")
    (out / "checkpoints" / "bn-b4-s1.pt").unlink()  # nothing to continue from: trained again
    run = execute(get_experiment("batch-size"), resume=out, progress=False)
    assert run.meta["status"] == "finished"
    assert sorted(json.dumps(r, sort_keys=True) for r in _rows(out)) == before
    assert run.meta["trainings"]["bn-b4-s1"]["resumed_from"] is None


def test_two_processes_with_sync_bn_give_the_numbers_of_one(tmp_path):
    """`bnlab run batch-size --nproc 2`: every training on 2 processes (gloo, 127.0.0.1) with
    SyncBatchNorm; the rows are those of one process up to float32 rounding of the sums."""
    args = ["--dataset", "synthetic", "--norms", "bn", "--batch-sizes", "8", "--seeds", "1",
            "--examples", "480", "--train-size", "1000", "--test-size", "300",
            "--curve-points", "3", "--widths", "8,16,16", "--calibration", "64",
            "--no-progress"]  # fmt: skip
    for n in (1, 2):
        assert main(["run", "batch-size", *args, "--nproc", str(n), "--out",
                     str(tmp_path / f"n{n}")]) == 0  # fmt: skip
    one, two = _rows(tmp_path / "n1"), _rows(tmp_path / "n2")
    assert json.loads((tmp_path / "n2" / "config.json").read_text())["processes"] == 2
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 20, 40, 60]
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "test_loss"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
        for key in ("train_batch_acc", "test_acc", "test_acc_precise"):
            assert b.get(key) == a.get(key), key


def test_non_iid_quick(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "non-iid", "--quick", "--dataset", "synthetic", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert (out / "non_iid.png").is_file() and (out / "report.html").is_file()
    finals = {(r["variant"], r["seed"]): r for r in _finals(_rows(out))}
    assert sorted(finals) == sorted((v, s) for v in ("bn-iid", "bn", "brn", "ghost", "gn")
                                    for s in (0, 1))  # fmt: skip
    for s in (0, 1):
        iid, non = finals[("bn-iid", s)], finals[("bn", s)]
        assert iid["test_acc"] > 0.9  # i.i.d. batches: the textures are learned
        assert iid["test_acc"] - non["test_acc"] > 0.2  # batches of 2 classes: far worse
        for r in (iid, non):
            assert 0 <= r["test_acc_batch_stats"] <= 1
            assert 0 <= r["test_acc_batch_stats_grouped"] <= 1
        assert "test_acc_batch_stats" not in finals[("brn", s)]


@pytest.mark.parametrize("name,flags,match", [
    ("batch-size", ["--batch-sizes", "1,4"], "--batch-sizes must list integers >= 2"),
    ("batch-size", ["--batch-sizes", "4,4"], "lists a value twice"),
    ("batch-size", ["--norms", "bn,xn"], "--norms must be"),
    ("batch-size", ["--widths", "8,16"], "--widths must be 3"),
    ("batch-size", ["--nproc", "3", "--batch-sizes", "2,4"], "--nproc 3"),
    ("batch-size", ["--examples", "16"], "--examples 16"),
    ("non-iid", ["--labels-per-batch", "3"], "multiple of --labels-per-batch"),
    ("non-iid", ["--variants", "bn,brn,xx"], "--variants must be"),
    ("non-iid", ["--labels-per-batch", "16", "--batch-size", "32"], "10 classes"),
])  # fmt: skip
def test_bad_flags_are_refused_before_any_directory_is_made(tmp_path, capsys, name, flags,
                                                            match):  # fmt: skip
    out = tmp_path / "never"
    assert main(["run", name, "--dataset", "synthetic", *flags, "--out", str(out)]) != 0
    assert match in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("name", ["batch-size", "non-iid"])
def test_missing_fashion_mnist_says_how_to_get_it(isolated_data, tmp_path, capsys, name):
    out = tmp_path / "never"
    assert main(["run", name, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "bnlab data fetch fashion-mnist" in err and "apt-get install" in err
    assert not out.exists()


def test_generated_idx_files_load_standardized(isolated_data, tmp_path):
    import os

    make_idx_set(Path(os.environ["BNLAB_DATA"]) / "fashion-mnist", n_train=40, n_test=10)
    data = load_data("fashion-mnist", train_size=30)
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_train.std()) - 1) < 1e-3
    assert data.meta["train_total"] == 40 and data.meta["name"] == "fashion-mnist"


def test_grouped_test_order_holds_few_labels_per_batch():
    labels = torch.arange(200) % 10
    order = grouped_order(labels, 2, 5, seed=1)
    assert sorted(order.tolist()) == list(range(200))
    for i in range(0, 200, 10):
        classes, counts = torch.unique(labels[order[i : i + 10]], return_counts=True)
        assert len(classes) == 2 and counts.tolist() == [5, 5]


# ------------------------------------------------------------------------------ verdict rules
def _bs_rows(errors: dict) -> list[dict]:
    rows = []
    for (norm, b), errs in errors.items():
        for seed, e in enumerate(errs):
            rows.append({"step": 10, "norm": norm, "batch": b, "seed": seed, "train_loss": 0.5,
                         "test_acc": 1 - e / 100, "final": True})  # fmt: skip
    return rows


def test_batch_size_verdicts_on_hand_made_errors():
    errors = {("bn", 2): [30, 31], ("bn", 32): [20, 21], ("gn", 2): [22.0, 22.5],
              ("gn", 32): [22.2, 22.6], ("ln", 2): [25, 25.5], ("ln", 32): [24.5, 25],
              ("brn", 2): [25, 26], ("brn", 32): [20, 21]}  # fmt: skip
    meta = {"config": {"examples": 24000}}
    claims = {c.id: c for c in summarize_batch(meta, _bs_rows(errors))["claims"]}
    assert claims["1"].verdict == "holds" and "+10.0 points" in claims["1"].measured
    assert claims["2"].verdict == "holds" and claims["3"].verdict == "holds"
    assert claims["4"].verdict == "holds" and "50% of BN's loss" in claims["4"].measured
    assert claims["5"].verdict == "holds"
    assert claims["6"].verdict == "holds"  # LN 24.75 vs BN 20.5: +4.25 > margin 1
    errors[("brn", 2)] = [30, 31.5]  # no better than BN at 2
    errors[("gn", 2)] = [26, 26.5]  # GN moves by 4 points: not flat
    claims = {c.id: c for c in summarize_batch(meta, _bs_rows(errors))["claims"]}
    assert claims["4"].verdict == "fails" and claims["2"].verdict == "fails"
    single = {k: v[:1] for k, v in errors.items()}
    claims = summarize_batch(meta, _bs_rows(single))["claims"]
    assert {c.verdict for c in claims} == {"not assessed"}
    claims = summarize_batch({"config": {"examples": 1200}}, _bs_rows(errors))["claims"]
    assert {c.verdict for c in claims} == {"not assessed"}


def test_batch_size_ghost_observation_names_the_nearer_bn():
    from bnlab.experiments.batch_size_report import _observations

    errors = {("bn", 2): [30, 31], ("bn", 32): [20, 21], ("ghost", 2): [29, 29]}
    s = summarize_batch({"config": {"examples": 24000}}, _bs_rows(errors))
    assert "29.0% against BN's 30.5% at 2 and 20.5% at 32, nearer to BN with the same " \
        "normalization batch (2)" in _observations(s, 32)[0]
    errors[("ghost", 2)] = [22, 23]
    s = summarize_batch({"config": {"examples": 24000}}, _bs_rows(errors))
    assert "nearer to BN with the same SGD batch (32)" in _observations(s, 32)[0]
    assert "nearer" not in _observations(s, 64)[0]  # no BN at the ghost variant's SGD batch


def test_non_iid_verdicts_on_hand_made_accuracies():
    acc = {"bn-iid": [90, 91], "bn": [80, 81], "brn": [89, 90], "ghost": [80.5, 81],
           "gn": [85, 85]}  # fmt: skip
    rows = []
    for v, vals in acc.items():
        for seed, a in enumerate(vals):
            row = {"step": 10, "variant": v, "seed": seed, "test_acc": a / 100, "final": True}
            if v == "bn":
                row["test_acc_batch_stats"] = (a + 5) / 100
                row["test_acc_batch_stats_grouped"] = (a - 20) / 100
            rows.append(row)
    claims = {c.id: c for c in summarize_non_iid({"config": {"examples": 90000}},
                                                 rows)["claims"]}  # fmt: skip
    assert [claims[k].verdict for k in "12345"] == ["holds", "holds", "holds", "holds", "fails"]
    assert "gap 10.0 points, BRN closes 9.0 (90%)" == claims["4"].measured


def test_tail_mean_weights_the_last_two_intervals():
    rows = [{"step": s, "k": v, "tag": 1} for s, v in ((0, None), (10, 1.0), (20, 2.0),
                                                      (22, 8.0))]  # fmt: skip
    assert tail_mean(rows, "k", {"tag": 1}) == pytest.approx((10 * 2.0 + 2 * 8.0) / 12)
