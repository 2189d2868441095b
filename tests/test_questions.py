"""`bnlab run questions`: the numerical identities and analyses each question rests on, checked
against independent oracles, the config, resume and failure handling, and a smoke run of all
questions (--quick) with its report rebuilt from the run's files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bnlab
from bnlab.experiments import execute, get_experiment
from bnlab.experiments.questions import (
    QUESTIONS,
    QuestionsConfig,
    q01_weight_scale,
    q02_weight_decay,
    q03_batch_noise,
    q04_identity,
    q05_placement,
    q06_population,
    q08_shift,
    q09_recurrent,
    q10_whitening,
    q11_cost,
    selected,
)
from bnlab.experiments.questions._common import interleaved_times, mlp, separated
from bnlab.runs import load_run, read_metrics

EXP = get_experiment("questions")


# ------------------------------------------------------------------------------------ question 1
def test_scale_identities_on_the_layer_against_torch_batchnorm():
    """Section 3.3 on a bnlab layer, with torch's own BatchNorm as the oracle: BN(aWu) = BN(Wu),
    the input gradient is unchanged and the weight gradient scales by 1/a."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(24, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    dy = torch.randn(24, 5, generator=g, dtype=torch.float64)

    def grads(a, layer):
        wa = (a * w).requires_grad_()
        ui = u.clone().requires_grad_()
        y = layer(ui @ wa.t())
        (y * dy).sum().backward()
        return y.detach(), ui.grad, wa.grad

    for a in (0.1, 7.0):
        ours = grads(a, bnlab.BatchNorm1d(5, eps=1e-15, dtype=torch.float64))
        ref1 = grads(1.0, nn.BatchNorm1d(5, eps=1e-15, dtype=torch.float64))
        torch.testing.assert_close(ours[0], ref1[0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ours[1], ref1[1], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(a * ours[2], ref1[2], rtol=1e-9, atol=1e-10)
    rows = q01_weight_scale.scale_identities((0.1, 7.0), eps=1e-15, seed=1, m=8, d_in=5,
                                             d_out=3)
    for r in rows:
        assert max(r["out"], r["jac_u"], r["jac_w"]) < 1e-9
        assert r["grad_ratio"] == pytest.approx(1 / r["a"], rel=1e-9)
        assert r["radial"] < 1e-9  # the gradient is orthogonal to W
    # with the default epsilon the identity breaks for tiny weights, as a^2 Var nears eps
    tiny = q01_weight_scale.scale_identities((0.003,), eps=1e-5, seed=1, m=8, d_in=5,
                                             d_out=3)[0]
    assert tiny["out"] > 1e-3


# ------------------------------------------------------------------------------------ question 2
def test_scale_invariance_measures_what_bn_removes():
    torch.manual_seed(0)
    x = torch.rand(64, 784, dtype=torch.float64)
    bn = mlp(norm="bn").double()
    before = copy.deepcopy(bn.state_dict())
    rows = q02_weight_decay.scale_invariance(bn, x)
    assert [r["factor"] for r in rows] == [0.5, 2.0]
    assert all(r["rel_change"] < 1e-3 for r in rows)  # only epsilon moves them
    exact = copy.deepcopy(bn)
    for m in exact.modules():
        if isinstance(m, bnlab.BatchNorm1d):
            m.eps = 1e-14
    assert all(r["rel_change"] < 1e-9 for r in q02_weight_decay.scale_invariance(exact, x))
    for k, v in bn.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k]), k
    plain = mlp(norm=None).double()  # no BN: halving the weights changes the outputs
    assert all(r["rel_change"] > 0.1 for r in q02_weight_decay.scale_invariance(plain, x))


# ------------------------------------------------------------------------------------ question 3
def test_large_set_statistics_normalize_the_batch_with_the_extra_examples():
    torch.manual_seed(0)
    pool = torch.randn(50, 6, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(6, 4, bias=False), bnlab.BatchNorm1d(4)).double()
    wrap = q03_batch_noise.LargeSetStatistics(net, pool, extra=20, seed=3)
    ref = copy.deepcopy(net)
    x = torch.randn(8, 6, dtype=torch.float64)
    out = wrap(x)
    g = torch.Generator().manual_seed(q03_batch_noise.seed_mix(3, 0))
    idx = torch.randint(50, (20,), generator=g)
    manual = ref(torch.cat([x, pool[idx]]))[:8]  # the oracle: BN over the 28 rows by hand
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)
    assert out.shape == (8, 4) and int(wrap.calls) == 1
    assert not torch.allclose(wrap(x), out)  # a new draw at the next call
    wrap.eval()
    torch.testing.assert_close(wrap(x), net.eval()(x))  # inference: the model itself
    assert "calls" in wrap.state_dict()  # saved with checkpoints, so a resume draws the same


# ------------------------------------------------------------------------------------ question 4
def test_feature_data_has_the_stated_means_and_stds():
    x, mu, sigma = q04_identity.feature_data(0, 200_000)
    torch.testing.assert_close(x.mean(0), mu, atol=0.03 * float(sigma.max()), rtol=0)
    torch.testing.assert_close(x.std(0) / sigma, torch.ones(8), atol=0.02, rtol=0)
    skew = ((x - x.mean(0)) ** 3).mean(0) / x.std(0) ** 3
    assert (skew[1::2] > 1.5).all() and (skew[0::2].abs() < 0.1).all()  # exponential / Gaussian


# ------------------------------------------------------------------------------------ question 5
def test_nonlinearity_inputs_are_the_last_activation_inputs_in_inference_mode():
    torch.manual_seed(0)
    model = mlp(norm="bn", act="sigmoid", placement="after")
    model.train()
    x = torch.rand(30, 784)
    z = q05_placement.nonlinearity_inputs(model, x)
    assert model.training
    model.eval()
    with torch.no_grad():
        manual = model[:-3](x)  # ... Linear(no BN before) | Sigmoid, BN, Linear
    torch.testing.assert_close(z, manual)


# ------------------------------------------------------------------------------------ question 6
def test_algorithm2_averages_by_hand_and_the_m_over_m_minus_1_factor():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), bnlab.BatchNorm1d(4), nn.ReLU(),
                        nn.Linear(4, 3, bias=False), bnlab.BatchNorm1d(3)).double()
    x = torch.randn(40, 5, dtype=torch.float64) * 2 + 1
    stats = q06_population.batch_averaged_stats(net, x, m=8, seed=4)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(4))
    mus, vars_, mus2, vars2 = [], [], [], []
    for k in range(5):  # the oracle: Algorithm 1 written out, batch by batch
        b = x[perm[k * 8:(k + 1) * 8]]
        z1 = b @ net[0].weight.t()
        mus.append(z1.mean(0))
        vars_.append(z1.var(0, unbiased=False))
        h = torch.relu((z1 - z1.mean(0)) / (z1.var(0, unbiased=False) + 1e-5).sqrt())
        z2 = h @ net[3].weight.t()
        mus2.append(z2.mean(0))
        vars2.append(z2.var(0, unbiased=False))
    torch.testing.assert_close(stats["1"][0], torch.stack(mus).mean(0))
    torch.testing.assert_close(stats["1"][1], torch.stack(vars_).mean(0))
    torch.testing.assert_close(stats["4"][0], torch.stack(mus2).mean(0))
    torch.testing.assert_close(stats["4"][1], torch.stack(vars2).mean(0))
    assert int(net[1].num_batches_tracked) == 0  # a copy ran, the model is untouched
    fixed = q06_population.with_stats(net, stats, 8 / 7)
    torch.testing.assert_close(fixed[1].running_var.double(), stats["1"][1] * 8 / 7)
    # the mean batch variance is (m-1)/m of the population variance (first BN layer)
    xl = torch.randn(6000, 5, dtype=torch.float64)
    for m in (2, 4):
        s = q06_population.batch_averaged_stats(net, xl, m=m, seed=0)["1"][1]
        pop = (xl @ net[0].weight.t()).var(0, unbiased=False)
        torch.testing.assert_close(s / pop, torch.full_like(pop, (m - 1) / m), atol=0.03,
                                   rtol=0)


def test_batch_statistics_evaluation_by_hand():
    torch.manual_seed(0)
    net = mlp(norm="bn", hidden=(8,), in_features=5, num_classes=3)
    x, y = torch.randn(20, 5), torch.randint(3, (20,))
    state = copy.deepcopy(net.state_dict())
    ev = q06_population.batch_stat_eval(net, x, y, m=4)
    ref = copy.deepcopy(net).train()
    with torch.no_grad():
        outs = torch.cat([ref(x[i:i + 4]) for i in range(0, 20, 4)])
    assert ev["acc"] == pytest.approx(float((outs.argmax(1) == y).double().mean()))
    assert ev["loss"] == pytest.approx(float(F.cross_entropy(outs, y)), rel=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------ question 8
def test_corruptions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 12, 12, generator=g)
    noisy = q08_shift.corrupt(x, "noise", 0.3, seed=1)
    assert torch.equal(noisy, q08_shift.corrupt(x, "noise", 0.3, seed=1))  # seeded
    assert 0 <= float(noisy.min()) and float(noisy.max()) <= 1 and not torch.equal(noisy, x)
    flat = torch.full((2, 1, 9, 9), 0.4)
    torch.testing.assert_close(q08_shift.corrupt(flat, "blur", 1.5), flat)  # kernel sums to 1
    blurred = q08_shift.corrupt(x, "blur", 1.0)
    assert blurred.shape == x.shape and float(blurred.std()) < float(x.std())
    low = q08_shift.corrupt(x, "contrast", 0.5)
    torch.testing.assert_close(low.mean((1, 2, 3)), x.mean((1, 2, 3)))  # mean grey kept
    torch.testing.assert_close(low - low.mean((1, 2, 3), keepdim=True),
                               0.5 * (x - x.mean((1, 2, 3), keepdim=True)))
    torch.testing.assert_close(q08_shift.corrupt(x, "contrast", 1.0), x)
    with pytest.raises(ValueError, match="unknown kind"):
        q08_shift.corrupt(x, "fog", 1.0)


def test_test_batch_accuracy_leaves_the_model_alone():
    torch.manual_seed(0)
    net = q08_shift.small_cnn(True).eval()
    x, y = torch.rand(40, 1, 28, 28), torch.randint(10, (40,))
    state = copy.deepcopy(net.state_dict())
    acc = q08_shift.test_batch_accuracy(net, x, y, batch=10)
    ref = copy.deepcopy(net).train()
    with torch.no_grad():
        manual = torch.cat([ref(x[i:i + 10]) for i in range(0, 40, 10)]).argmax(1)
    assert acc == pytest.approx(float((manual == y).double().mean()))
    assert not net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------ question 9
def test_row_rnn_lengths_and_clipped_adam():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    longer = q09_recurrent.delayed(x, 7)
    assert longer.shape == (6, 1, 35, 28) and torch.equal(longer[:, :, 7:], x)
    assert float(longer[:, :, :7].abs().max()) == 0
    model = q09_recurrent.RowRNN("BN per step")  # statistics for the 28 training steps
    assert model(x).shape == (6, 10)
    with pytest.raises(ValueError, match="max_steps"):  # training beyond 28 steps is refused
        model(longer)
    model.eval()
    assert model(longer).shape == (6, 10)  # inference reuses the last step's statistics
    with pytest.raises(ValueError, match="norm must be one of"):
        q09_recurrent.RowRNN("batchnorm")
    # ClippedAdam == Adam on gradients clipped to the norm
    p1 = nn.Parameter(torch.tensor([3.0, 4.0]))
    p2 = nn.Parameter(torch.tensor([3.0, 4.0]))
    p1.grad = torch.tensor([30.0, 40.0])
    p2.grad = torch.tensor([0.6, 0.8])  # the same gradient clipped to norm 1
    q09_recurrent.ClippedAdam([p1], lr=0.1, clip=1.0).step()
    a2 = torch.optim.Adam([p2], lr=0.1)
    a2.step()
    torch.testing.assert_close(p1.detach(), p2.detach())


# ----------------------------------------------------------------------------------- question 10
def test_whitening_analyses():
    torch.manual_seed(0)
    x = torch.randn(300, 40) @ torch.randn(40, 784)  # correlated pixels (rank 40)
    white = mlp(norm=lambda c: bnlab.BatchWhitening(c, momentum=None), hidden=(20,))
    bn = mlp(norm="bn", hidden=(20,))
    for m in (white, bn):
        m.train()
        with torch.no_grad():
            m(x)  # running statistics of this data
    # the oracle: correlations of BN's normalized outputs computed by hand
    bn.eval()
    with torch.no_grad():
        z = bn[1](bn[0](x)).double()
    corr = torch.corrcoef(z.T)
    manual = float(corr[~torch.eye(20, dtype=torch.bool)].abs().mean())
    assert q10_whitening.correlation_left(bn, x) == pytest.approx(manual, rel=1e-6)
    assert q10_whitening.correlation_left(white, x) < 0.5 * manual  # whitening decorrelates
    assert bn.training is False and white.training is True  # modes restored
    big = mlp(norm="bn", hidden=(100,))
    xr = torch.rand(128, 784)
    assert q10_whitening.covariance_rank(big, xr[:60]) == 59  # m examples span m - 1 directions
    assert q10_whitening.covariance_rank(big, xr) == 100
    times = q10_whitening.step_times({"bn": bn, "white": white}, x[:32],
                                     torch.randint(10, (32,)), repeats=2)
    assert set(times) == {"bn", "white"} and all(t > 0 for t in times.values())


# ----------------------------------------------------------------------------------- question 11
def test_saved_bytes_counts_activations_not_parameters_or_input():
    torch.manual_seed(0)
    x, y = torch.rand(16, 10), torch.randint(3, (16,))
    lin = nn.Sequential(nn.Linear(10, 3))
    relu = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 3))
    base = q11_cost.saved_bytes(lin, x, y)  # the loss's own tensors only
    # ReLU keeps its (16, 50) float32 output, which the next Linear saves too (one storage)
    assert q11_cost.saved_bytes(relu, x, y) - base >= 16 * 50 * 4
    bn = nn.Sequential(nn.Linear(10, 50, bias=False), bnlab.BatchNorm1d(50), nn.ReLU(),
                       nn.Linear(50, 3))
    assert q11_cost.saved_bytes(bn, x, y) > q11_cost.saved_bytes(relu, x, y)


# ------------------------------------------------------------------------------------- context
def test_context_puts_class_sorted_data_in_a_fixed_random_order(tmp_path):
    """mnist-5k is stored sorted by class: the questions see both sets shuffled once, so the
    first images are a sample of every class and test batches are not one-class batches."""
    from bnlab.data import Dataset
    from bnlab.experiments.questions._common import Context
    from bnlab.runs import RunDir

    y = torch.arange(10).repeat_interleave(30)  # sorted by class
    x = y.float().view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    data = Dataset("sorted", x, y, x.clone(), y.clone())
    run = RunDir.create(tmp_path / "r", {"experiment": "questions"})
    q = QUESTIONS[0]
    ctx = Context(EXP.make_config(), run, data, q)
    again = Context(EXP.make_config(seed=5), run, data, q)
    assert len(set(ctx.y_train[:30].tolist())) >= 6 and len(set(ctx.y_test[:30].tolist())) >= 6
    assert sorted(ctx.y_train.tolist()) == sorted(y.tolist())
    assert torch.equal(ctx.x_train[:, 0], ctx.y_train.float())  # images follow their labels
    assert torch.equal(ctx.y_train, again.y_train)  # one fixed order, whatever the seed
    smoke = Context(EXP.make_config(quick=True), run, data, q)
    assert len(smoke.y_test) == 300 and torch.equal(smoke.y_train, ctx.y_train)
    run.close()


# -------------------------------------------------------------------------------------- config
def test_only_selects_questions_and_names_the_flag():
    assert [q.number for q in QUESTIONS] == list(range(1, 12))
    assert len({q.name for q in QUESTIONS}) == 11
    picked = selected(QuestionsConfig(only="cost, identity"))
    assert [q.name for q in picked] == ["identity", "cost"]  # in question order
    assert len(selected(QuestionsConfig())) == 11
    with pytest.raises(ValueError, match="--only: unknown question.*'nope'.*known: "
                                         "weight-scale"):
        EXP.make_config(only="identity,nope")
    with pytest.raises(ValueError, match="--scale"):
        EXP.make_config(scale=0.0)


def test_interleaved_times_divides_each_block_by_its_calls(monkeypatch):
    """On a fake clock that each call advances by a fixed amount: the time per call is exact,
    a call shorter than the block runs in blocks of block_s / duration calls, every call is
    timed in every round, and warm-up rounds are not counted."""
    import time

    clock = [0.0]
    counts = {"slow": 0, "fast": 0}
    order: list[str] = []

    def make(name: str, dt: float):
        def call() -> None:
            counts[name] += 1
            clock[0] += dt
            if not order or order[-1] != name:
                order.append(name)
        return call

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    times = interleaved_times({"slow": make("slow", 2.0 ** -4), "fast": make("fast", 2.0 ** -8)},
                              repeats=3, warmup=1, block_s=2.0 ** -5)
    assert times == {"slow": 2.0 ** -4, "fast": 2.0 ** -8}
    # calibration: 2 calls each; then 4 rounds of blocks of 1 (slow) and 8 (fast) calls
    assert counts == {"slow": 2 + 4 * 1, "fast": 2 + 4 * 8}
    assert order == ["slow", "fast"] * 5  # calibration, then round by round
    with pytest.raises(ValueError, match="repeats"):
        interleaved_times({"slow": make("slow", 1.0)}, repeats=0)


def test_separated_is_the_verdict_rule():
    assert separated([1, 2], [3, 4]) is True
    assert separated([3, 4], [1, 2]) is False
    assert separated([1, 3], [2, 4]) is None
    assert separated([5, 6], [1, 2], lower=False) is True
    assert separated([], [1]) is None and separated([math.nan], [1]) is None


# --------------------------------------------------------------------- failure, resume, smoke
def test_a_failing_question_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("deliberate")

    import bnlab.experiments.questions as pkg

    q = next(q for q in QUESTIONS if q.name == "cost")
    broken = type(q)(q.number, q.name, q.title, boom, q.report)
    monkeypatch.setattr(pkg, "QUESTIONS", tuple(broken if x is q else x for x in QUESTIONS))
    cfg = EXP.make_config(quick=True, only="identity,cost")
    with pytest.raises(RuntimeError, match="question\\(s\\) failed: cost"):
        execute(EXP, cfg, tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["status"] == "failed"
    assert meta["questions"]["identity"]["status"] == "finished"
    assert meta["questions"]["cost"]["status"] == "failed"
    assert "deliberate" in meta["questions"]["cost"]["error"]
    from bnlab.report.report import write_report

    summary, md, _ = write_report(tmp_path / "run")
    text = md.read_text()
    assert "11. What does BN cost?" in text and "incomplete: it failed" in text
    assert "4. Can gamma and beta" in text


def test_resume_redoes_the_measurements_and_continues_the_trainings(tmp_path, monkeypatch):
    """Interrupted after the first seed of a question (its training finished and its
    measurement logged): the resumed run ends with exactly the rows of an uninterrupted one."""
    cfg = EXP.make_config(only="identity", scale=0.1)
    straight = execute(EXP, cfg, tmp_path / "straight", progress=False)
    assert straight.meta["status"] == "finished"
    real = q04_identity.feature_data
    calls = {"n": 0}

    def interrupt_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the second seed's data: the first seed is done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(q04_identity, "feature_data", interrupt_third)
    run = execute(EXP, cfg, tmp_path / "resumed", progress=False)
    assert run.meta["status"] == "interrupted"
    assert run.meta["questions"] == {"identity": {"status": "interrupted",
                                                  "wall_time_s": pytest.approx(
                                                      run.meta["questions"]["identity"][
                                                          "wall_time_s"])}}
    monkeypatch.setattr(q04_identity, "feature_data", real)
    run = execute(EXP, resume=tmp_path / "resumed", progress=False)
    assert run.meta["status"] == "finished"
    assert run.meta["questions"]["identity"]["status"] == "finished"

    def rows(path):
        return sorted(json.dumps(r, sort_keys=True)
                      for r in read_metrics(path / "metrics.jsonl")[0])

    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")


def test_quick_run_of_every_question_and_its_report(tmp_path):
    """The smoke run (--quick): every question runs, the claims that do not rest on training
    length hold, the others are not assessed, and the report is rebuilt from the files."""
    from bnlab.report.report import write_report

    out = tmp_path / "quick"
    run = execute(EXP, EXP.make_config(quick=True), out, quick=True, progress=False)
    meta = run.meta
    assert meta["status"] == "finished"
    assert {k: v["status"] for k, v in meta["questions"].items()} == {
        q.name: "finished" for q in QUESTIONS}
    summary, md, html = write_report(out)
    files = load_run(out)
    for q in QUESTIONS:
        assert any(r.get("question") == q.name for r in files.rows), q.name
    assert [s.heading.split(".")[0] for s in summary.sections[:11]] == [str(i) for i in
                                                                        range(1, 12)]
    assert len(summary.headline) == 11
    for sec in summary.sections:
        for f in sec.figures:
            assert (out / f.file).is_file(), f.file
    verdicts = {c.id: c.verdict for c in summary.claims}
    # identities and measurements that do not depend on how long anything trained
    for cid in ("1a", "1b", "2a", "6a", "11a", "11b"):
        assert verdicts[cid] == "holds", (cid, [c for c in summary.claims if c.id == cid])
    # claims about what training does are not judged by a smoke run
    for cid in ("1c", "2b", "3a", "3b", "4", "5a", "5b", "6b", "7", "8a", "9a", "10b"):
        assert verdicts[cid] == "not assessed", cid
    # the networks learned something even in a smoke run
    finals = [r["test_acc"] for r in files.rows if r.get("question") == "placement"
              and r.get("variant") == "relu/before" and r.get("step") and r.get("test_acc")]
    assert max(finals) > 0.5
    shift = [r for r in files.rows if r.get("kind") == "shift" and r["severity"] == 0
             and r["method"] == "population (training)"]
    assert shift and min(r["acc"] for r in shift) > 0.3
    md_before = md.read_text()
    for f in out.glob("*.png"):
        f.unlink()
    md.unlink()
    write_report(out)
    assert md.read_text() == md_before
    assert "data:image/png;base64," in html.read_text()
