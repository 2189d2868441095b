"""`bnlab run why`: each analysis against a hand-computed or independent oracle, the verdict
rules on hand-made rows, the config checks, and a --quick smoke run (synthetic data) whose
report is rebuilt from its files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bnlab
from bnlab.experiments import why, why_report
from bnlab.experiments.why_analyses import (
    channel_stats_by_depth,
    class_bias,
    conv_layers,
    fuss_catalan_edge,
    gradient_snapshot,
    histogram,
    kernel_gradient_similarity,
    mean_pairwise_cosine,
    product_singular_values,
    relative_loss,
    spectrum_skew,
)
from bnlab.models import ResNetCifar


# ------------------------------------------------------------------------ relative loss
class _Quadratic(nn.Module):
    """Output = the parameter vector w, whatever the input (a quadratic loss of w below)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        return self.w


def _quad_loss(out, y):  # L(w) = 0.5 |w - y|^2 + 1, gradient w - y
    return 0.5 * ((out - y) ** 2).sum() + 1.0


def test_relative_loss_of_a_quadratic_by_hand():
    model = _Quadratic([3.0, -1.0, 2.0])
    y = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    steps = [0.0, 0.25, 1.0, 2.0, 3.0]
    got = relative_loss(model, None, y, steps, _quad_loss)
    r2 = 4.0 + 4.0 + 4.0  # |w - y|^2
    # L(w - eta (w - y)) = 0.5 (1 - eta)^2 |w - y|^2 + 1
    assert got["loss0"] == pytest.approx(0.5 * r2 + 1)
    assert got["grad_norm"] == pytest.approx(math.sqrt(r2))
    assert got["loss"] == pytest.approx([0.5 * (1 - e) ** 2 * r2 + 1 for e in steps])
    assert model.w.tolist() == [3.0, -1.0, 2.0] and model.w.grad is None  # untouched


def test_relative_loss_leaves_bn_state_alone_and_counts_refused_steps_as_diverged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), bnlab.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 5), torch.randint(3, (16,))
    got = relative_loss(model, x, y, [1e-3, 1e38, 1e39])
    assert math.isfinite(got["loss"][0]) and got["loss"][0] == pytest.approx(got["loss0"],
                                                                            rel=0.05)
    # 1e38 * g overflows float32 somewhere: the BN layer refuses the non-finite batch, or the
    # loss is not finite; both count as divergence
    assert got["loss"][2] == math.inf
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


# --------------------------------------------------------------------- channel stats
def test_channel_stats_by_depth_match_a_manual_forward():
    torch.manual_seed(1)
    model = ResNetCifar(8, norm="bn", in_channels=1).train()
    x = torch.randn(6, 1, 12, 12)
    got = channel_stats_by_depth(model, x)
    convs = conv_layers(model)
    assert got["layers"] == [n for n, _ in convs] and len(got["std"]) == 7
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o.detach()))
             for n, m in convs]
    ref_model = model  # one forward on the model itself, after the analysis ran on a copy
    running = model.net[1].running_mean.clone()
    ref_model(x)
    for h in hooks:
        h.remove()
    for i, (n, _) in enumerate(convs):
        o = outs[n].double()
        assert got["mean_abs"][i] == pytest.approx(float(o.mean((0, 2, 3)).abs().mean()),
                                                   rel=1e-9)
        assert got["std"][i] == pytest.approx(
            float(o.var((0, 2, 3), correction=0).sqrt().mean()), rel=1e-9)
    assert not torch.equal(model.net[1].running_mean, running)  # (the manual forward moved it)


# ------------------------------------------------------------------ gradient similarity
def test_mean_pairwise_cosine_by_hand():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: 0, 1/sqrt(2), 1/sqrt(2)
    assert mean_pairwise_cosine(rows) == pytest.approx(2 / math.sqrt(2) / 3)
    assert mean_pairwise_cosine(torch.ones(4, 3)) == pytest.approx(1.0)
    assert math.isnan(mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 0.0]])))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_kernel_gradient_terms_sum_to_autograds_weight_gradient(stride, padding):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding).double()
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    out = conv(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    got = kernel_gradient_similarity(conv, x, dy)
    torch.testing.assert_close(got["weight_grad"], conv.weight.grad)
    assert -1 <= got["example_cosine"] <= 1 and -1 <= got["position_cosine"] <= 1
    assert 0 < got["top_pair_share"] <= 1


def test_kernel_gradient_similarity_of_identical_examples_and_one_hot_channel():
    conv = nn.Conv2d(2, 3, 1, bias=False).double()
    x = torch.ones(4, 2, 3, 3, dtype=torch.float64)  # every example and position alike
    dy = torch.zeros(4, 3, 3, 3, dtype=torch.float64)
    dy[:, 0] = 1.0  # only output channel 0 receives gradient
    got = kernel_gradient_similarity(conv, x, dy, top_fraction=2 / 6)
    assert got["example_cosine"] == pytest.approx(1.0)
    assert got["position_cosine"] == pytest.approx(1.0)
    # dW[0, :] = 36 * (1, 1), the rest 0: the top 2 of 6 pairs hold everything
    assert got["top_pair_share"] == pytest.approx(1.0)
    torch.testing.assert_close(got["weight_grad"][:, :, 0, 0],
                               torch.tensor([[36.0, 36.0], [0, 0], [0, 0]], dtype=torch.float64))


def test_class_bias_and_histogram_by_hand():
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 3.0, 1.0], [5.0, 0.0, 1.0], [0.0, 1.0, 0.5]])
    got = class_bias(logits)
    assert got == {"counts": [1, 3, 0], "top_class": 1, "top_fraction": 0.75}
    h = histogram(torch.tensor([-2.0, -1.0, 0.0, 0.5, 2.0]), bins=4)
    assert h["edges"] == [-2.0, -1.0, 0.0, 1.0, 2.0] and h["counts"] == [1, 1, 2, 1]


def test_gradient_snapshot_against_autograd_and_softmax():
    torch.manual_seed(3)
    model = ResNetCifar(8, norm="none", in_channels=1)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(10, (8,))
    name = conv_layers(model)[3][0]
    got = gradient_snapshot(model, x, y, name)
    # oracle: the same forward/backward by hand
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    g = dict(model.named_modules())[name].weight.grad.double().flatten()
    assert got["weight_grad"]["std"] == pytest.approx(float(g.std(correction=0)), rel=1e-6)
    assert got["weight_grad"]["max_abs"] == pytest.approx(float(g.abs().max()), rel=1e-6)
    assert got["weight_grad"]["count"] == g.numel()
    want = torch.softmax(logits.detach().double(), 1) - F.one_hot(y, 10).double()
    np.testing.assert_allclose(got["output_grad"], want.numpy(), atol=1e-6)
    assert got["bias"]["counts"] == torch.bincount(logits.argmax(1), minlength=10).tolist()
    assert got["layer_index"] == 4
    with pytest.raises(ValueError, match="no Conv2d named"):
        gradient_snapshot(model, x, y, "nope")


# --------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("k", [1, 3, 5])
def test_product_singular_values_against_numpy_and_the_fuss_catalan_edge(k):
    n = 300
    s = product_singular_values(n, k, seed=4)
    g = torch.Generator().manual_seed(4)  # the same matrices, multiplied and decomposed by numpy
    p = np.eye(n)
    for _ in range(k):
        p = (torch.randn(n, n, generator=g, dtype=torch.float64).numpy() / math.sqrt(n)) @ p
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(p, compute_uv=False), rtol=1e-8,
                               atol=1e-12)
    assert float(s.max()) == pytest.approx(fuss_catalan_edge(k), rel=0.1)
    assert float((s**2).mean()) == pytest.approx(1.0, rel=0.25)


def test_fuss_catalan_edge_and_spectrum_skew_by_hand():
    assert fuss_catalan_edge(1) == pytest.approx(2.0)
    assert fuss_catalan_edge(3) == pytest.approx(math.sqrt(256 / 27))
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1])
    got = spectrum_skew(s)
    assert got["max"] == 4.0 and got["median"] == pytest.approx(0.2)  # torch: lower median
    assert got["below_tenth"] == pytest.approx(6 / 10)  # 0.3, 0.2, 4 x 0.1 are < 0.4
    energy = s**2
    assert got["top10_share"] == pytest.approx(float(16 / energy.sum()))


# ---------------------------------------------------------------------- verdict rules
def test_safe_step_rule():
    steps = [1e-3, 1e-2, 1e-1, 1.0]
    # batch losses before the step: 2, 1; relative losses stay in band up to 1e-2 on both
    losses = [[2.0, 2.5, 8.0, None], [1.0, 0.5, 1.0, 2.0]]
    assert why_report.safe_step(steps, losses, [2.0, 1.0]) == 1e-2
    assert why_report.safe_step(steps, [[100.0] * 4], [1.0]) is None


def _end(section, norm, lr, seed, status="finished", at=None):
    return {"section": section, "norm": norm, "base_lr": lr, "seed": seed, "event": "end",
            "status": status, "diverged_at": at}


def _eval(section, norm, lr, seed, step, test, train=None):
    return {"section": section, "norm": norm, "base_lr": lr, "seed": seed, "step": step,
            "test_acc": test, "train_acc": train if train is not None else test,
            "train_batch_acc": test}


def test_sweep_table_keeps_diverged_runs_and_averages_finished_seeds():
    rows = [
        _eval("sweep", "bn", 0.1, 0, 0, 0.1), _eval("sweep", "bn", 0.1, 0, 100, 0.8),
        _end("sweep", "bn", 0.1, 0),
        _eval("sweep", "bn", 0.1, 1, 100, 0.9), _end("sweep", "bn", 0.1, 1),
        _eval("sweep", "none", 0.1, 0, 0, 0.1), _end("sweep", "none", 0.1, 0, "diverged", 7),
    ]
    t = why_report.sweep_table(rows)
    assert t[("bn", 0.1)]["test_mean"] == pytest.approx(0.85)
    assert t[("bn", 0.1)]["finished"] == [0, 1]
    assert t[("none", 0.1)]["diverged_at"] == [7] and t[("none", 0.1)]["test_mean"] is None
    assert "diverged (step 7)" in why_report._cell_text(t[("none", 0.1)], "test")


# ------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,match", [
    ({"only": "sweep,nope"}, "unknown section 'nope'"),
    ({"lrs": "0.1,abc"}, "--lrs must be comma-separated numbers"),
    ({"lrs": "0.1,-1"}, "--lrs must be positive"),
    ({"depth": 21}, "--depth must be 6n\\+2"),
    ({"eval_every": 900, "steps": 800}, "--eval-every 900 is larger than --steps"),
    ({"dataset": "mnist"}, "--dataset must be one of"),
])
def test_bad_config_names_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        why.EXPERIMENT.make_config(**kwargs)


def test_sections_by_name_or_number_and_the_jobs_they_make():
    assert why.parse_sections("7, depth,1") == ["sweep", "depth", "noisy"]
    cfg = why.WhyConfig(only="sweep,landscape", lrs="0.0001,0.1", seeds=2, steps=400,
                        eval_every=100, landscape_after=200)
    js = why.jobs(cfg)
    assert len(js) == 2 * 2 * 2 and all(j.section == "sweep" for j in js)  # sweep covers (2)
    cfg = why.WhyConfig(only="landscape", landscape_after=200)
    assert [(j.section, j.norm, j.lr, j.steps) for j in why.jobs(cfg)] == [
        ("landscape", "bn", 0.1, 200), ("landscape", "none", 1e-4, 200)]
    assert why.jobs(why.WhyConfig(only="gradients")) == []


def test_missing_data_stops_with_instructions(isolated_data, monkeypatch):
    from bnlab.data import download as dl

    monkeypatch.setitem(dl.SYSTEM_DIRS, "cifar10", ())
    with pytest.raises(FileNotFoundError, match="bnlab data fetch fashion-mnist.*apt-get "
                       "install dataset-fashion-mnist"):
        why.load_data(why.WhyConfig())


# ------------------------------------------------------------------------- smoke run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from bnlab.experiments import execute

    out = tmp_path_factory.mktemp("why") / "run"
    cfg = why.EXPERIMENT.make_config(quick=True, dataset="synthetic")
    run = execute(why.EXPERIMENT, cfg, out, quick=True, progress=False)
    return run.path


def test_quick_run_measures_every_section_and_its_report_rebuilds(quick_run):
    from bnlab.cli import main
    from bnlab.runs import load_run

    files = load_run(quick_run)
    assert files.meta["status"] == "finished"
    sections = {r["section"] for r in files.rows}
    assert sections >= set(why.SECTIONS)
    # real thresholds at initialization (ResNet-20 without BN vs with BN)
    grads = next(r for r in files.rows if r.get("section") == "gradients")["nets"]
    assert grads["none"]["std"] > 5 * grads["bn"]["std"]
    depth = next(r for r in files.rows if r.get("section") == "depth")["nets"]
    assert depth["none"]["std"][-1] > 3 * depth["none"]["std"][0]  # grows with depth
    assert max(depth["bn"]["std"]) < 10
    spectra = next(r for r in files.rows if r.get("section") == "spectra")["products"]
    assert spectra["1"]["max_over_median"] < spectra["3"]["max_over_median"] < \
        spectra["5"]["max_over_median"]
    ends = [r for r in files.rows if r.get("event") == "end"]
    assert len(ends) == len(why.jobs(why.WhyConfig(**files.config)))
    trained = [r for r in files.rows if "landscape" in r]
    assert {r["norm"] for r in trained} == {"bn", "none"}
    # the report: every figure written, claims of each section, smoke-run claims not assessed
    assert main(["report", str(quick_run)]) == 0
    for name in ("sweep", "landscape", "gradients", "depth", "bias", "spectra", "noisy"):
        assert (quick_run / f"why_{name}.png").stat().st_size > 10_000
    md = (quick_run / "report.md").read_text()
    assert "## (1) Learning rate" in md and "smoke run" in md
    from bnlab.report.report import summarize_run

    claims = {c.id: c for c in summarize_run(load_run(quick_run)).claims}
    assert {"1a", "2a", "2b", "3a", "4a", "5a", "6", "7a"} <= set(claims)
    assert claims["1a"].verdict == "not assessed" and claims["7a"].verdict == "not assessed"
    assert claims["6"].verdict == "holds"
    json.dumps([c.measured for c in claims.values()])  # plain strings


def test_resume_of_a_finished_part_recomputes_nothing(quick_run, tmp_path):
    """A copy of the finished run's files, marked interrupted: --resume finds every analysis
    and training recorded and adds no row."""
    import shutil

    from bnlab.experiments import execute
    from bnlab.runs import load_run

    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    meta = json.loads((copy / "config.json").read_text())
    meta["status"] = "interrupted"
    (copy / "config.json").write_text(json.dumps(meta))
    before = (copy / "metrics.jsonl").read_text()
    run = execute(why.EXPERIMENT, resume=copy, progress=False)
    assert run.meta["status"] == "finished"
    assert (copy / "metrics.jsonl").read_text() == before
    assert len(load_run(copy).rows) == len(before.splitlines())


def _strip_seconds(rows):
    return sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
                  for r in rows)


def test_resume_reruns_an_unrecorded_training_to_the_same_rows(quick_run, tmp_path):
    """The last training's rows are removed (as if the run had stopped before they were
    appended): --resume runs it again, from its checkpoint, to the same rows."""
    import shutil

    from bnlab.experiments import execute
    from bnlab.runs import load_run

    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    rows = load_run(copy).rows
    last = next(r for r in reversed(rows) if r.get("event") == "end")
    key = {k: last[k] for k in ("section", "norm", "base_lr", "seed")}
    keep = [r for r in rows if any(r.get(k) != v for k, v in key.items())]
    assert len(keep) < len(rows) - 1
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    meta = json.loads((copy / "config.json").read_text())
    meta["status"] = "interrupted"
    (copy / "config.json").write_text(json.dumps(meta))
    execute(why.EXPERIMENT, resume=copy, progress=False)
    assert _strip_seconds(load_run(copy).rows) == _strip_seconds(rows)


def test_trainings_in_worker_processes_give_the_rows_of_one_process(tmp_path):
    from bnlab.experiments import execute
    from bnlab.runs import load_run

    common = {"only": "sweep", "dataset": "synthetic", "depth": 8, "lrs": "0.05", "seeds": 2,
              "steps": 6, "eval_every": 3, "batch_size": 16, "eval_test": 50, "eval_train": 50}
    out = {}
    for workers, threads in ((1, 1), (2, 2)):  # (2, 2): two processes of one thread
        cfg = why.EXPERIMENT.make_config(workers=workers, threads=threads, **common)
        run = execute(why.EXPERIMENT, cfg, tmp_path / f"w{workers}", progress=False)
        assert run.meta["processes"] == workers and run.meta["threads_per_process"] == 1
        out[workers] = load_run(run.path).rows
    assert len([r for r in out[1] if r.get("event") == "end"]) == 4
    # same rows up to float rounding: a process started with one-thread pools may pick other
    # convolution kernels than one whose pools were cut to one thread later
    a, b = (sorted((json.loads(r) for r in _strip_seconds(out[k])),
                   key=lambda r: json.dumps({k: v for k, v in r.items()
                                             if not isinstance(v, float) or k in ("base_lr",
                                                                                  "lr")},
                                            sort_keys=True)) for k in (1, 2))
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k
            else:
                assert ra[k] == rb[k], k


def test_help_lists_the_flags(capsys):
    from bnlab.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "why", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--only" in out and "--lrs" in out and "--noisy-lr" in out
