"""bnlab.train: seeded batches, the plain loop against a hand-written one, evaluation in
inference mode, divergence, and resume from checkpoints to the same numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bnlab
from bnlab.runs import RunDir
from bnlab.train import Batches, evaluate, fit


def _data(n=200, d=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y.clamp_max(classes - 1)


def _model(seed=0, bn=True, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(12, 16, bias=not bn)]
    if bn:
        layers.append(bnlab.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("sampling", ["shuffle", "fixed"])
def test_batches_visit_every_example_once_per_epoch(sampling):
    b = Batches(103, 10, seed=4, sampling=sampling)
    assert b.per_epoch == 10
    epochs = []
    for e in range(3):
        idx = torch.cat([b(e * 10 + k) for k in range(10)])
        assert len(set(idx.tolist())) == 100  # 3 dropped, none repeated
        epochs.append([frozenset(b(e * 10 + k).tolist()) for k in range(10)])
    if sampling == "fixed":  # same batches (compositions) every epoch, in another order
        assert set(epochs[0]) == set(epochs[1]) == set(epochs[2]) and epochs[0] != epochs[1]
    else:  # new compositions
        assert set(epochs[0]) != set(epochs[1])
    # a pure function of (seed, step): a new object gives the same batches, another seed others
    assert torch.equal(Batches(103, 10, 4, sampling)(17), b(17))
    assert not torch.equal(Batches(103, 10, 5, sampling)(17), b(17))


def test_batches_with_replacement_and_bad_sizes():
    b = Batches(50, 80, seed=0, sampling="replacement")
    idx = b(3)
    assert idx.shape == (80,) and 0 <= int(idx.min()) and int(idx.max()) < 50
    assert torch.equal(idx, Batches(50, 80, 0, "replacement")(3))
    with pytest.raises(ValueError, match="larger than the 50 training examples"):
        Batches(50, 80, seed=0)
    with pytest.raises(ValueError, match="sampling"):
        Batches(50, 10, seed=0, sampling="random")


def test_fit_is_the_plain_loop():
    """fit == a hand-written loop with the same batches, optimizer and schedule."""
    x, y = _data()
    steps, bs, seed = 25, 16, 3
    sched = lambda t: 0.9 ** t  # noqa: E731
    a = _model(seed, dropout=0.2)
    opt = torch.optim.SGD(a.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    res = fit(a, opt, (x, y), (x[:50], y[:50]), steps=steps, batch_size=bs, seed=seed,
              schedule=sched, eval_every=10)
    assert res.status == "finished" and res.steps_done == steps
    assert [r["step"] for r in res.history] == [0, 10, 20, 25]

    b = _model(seed, dropout=0.2)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    lr_b = torch.optim.lr_scheduler.LambdaLR(opt_b, sched)
    batches = Batches(len(y), bs, seed)
    torch.manual_seed(seed)
    for t in range(steps):
        if t in (10, 20):  # fit evaluates here, in eval mode: no RNG draws, no state change
            pass
        idx = batches(t)
        loss = F.cross_entropy(b(x[idx]), y[idx])
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
        lr_b.step()
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert res.history[-1]["lr"] == pytest.approx(0.3 * 0.9**steps)


def test_evaluate_uses_population_statistics_and_restores_the_mode():
    x, y = _data()
    m = _model()
    fit(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), steps=5, batch_size=20)
    m.train()
    ev = evaluate(m, x, y, batch_size=7)
    assert m.training
    m.eval()
    with torch.no_grad():
        out = m(x)
    assert ev["acc"] == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert ev["loss"] == pytest.approx(float(F.cross_entropy(out, y)))


def test_fit_trains_a_regression_with_float_targets_and_no_accuracy():
    """Floating-point targets (loss_fn=mse_loss): the same loop as by hand, accuracies None."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64) * 3 + 1
    steps, bs, seed = 12, 20, 2

    def make():
        torch.manual_seed(seed)
        return bnlab.BatchNorm1d(6, dtype=torch.float64)

    a = make()
    res = fit(a, torch.optim.SGD(a.parameters(), lr=0.2), (x, x), (x[:40], x[:40]), steps=steps,
              batch_size=bs, seed=seed, eval_every=6, loss_fn=F.mse_loss)
    assert res.status == "finished" and [r["step"] for r in res.history] == [0, 6, 12]
    for row in res.history:
        assert row["train_acc"] is None and row["test_acc"] is None
    assert res.history[0]["train_batch_acc"] is None and res.history[1]["train_batch_acc"] is None
    b = make()
    opt = torch.optim.SGD(b.parameters(), lr=0.2)
    batches = Batches(len(x), bs, seed)
    for t in range(steps):
        idx = batches(t)
        loss = F.mse_loss(b(x[idx]), x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    ev = evaluate(b, x[:40], x[:40], loss_fn=F.mse_loss)
    b.eval()
    with torch.no_grad():
        assert ev == {"loss": pytest.approx(float(F.mse_loss(b(x[:40]), x[:40]))), "acc": None}
    assert res.history[-1]["test_loss"] == pytest.approx(ev["loss"])


@pytest.mark.parametrize("bn", [False, True])
def test_divergence_ends_the_training_and_is_recorded(tmp_path, bn):
    x, y = _data()
    m = _model(bn=bn)
    run = RunDir.create(tmp_path / "r", {"experiment": "t"})
    try:
        res = fit(m, torch.optim.SGD(m.parameters(), lr=1e6), (x, y), steps=50, batch_size=20,
                  run=run, tags={"net": "x"}, eval_every=5, diverge_above=50.0)
        assert res.diverged and res.diverged_at is not None and res.diverged_at < 50
        assert res.reason
        last = run.rows()[-1]
        assert last["diverged"] is True and last["step"] == res.diverged_at
        # the final checkpoint says so: fit returns at once, without training again
        again = fit(m, torch.optim.SGD(m.parameters(), lr=1e6), (x, y), steps=50,
                    batch_size=20, run=run, tags={"net": "x"}, eval_every=5, diverge_above=50.0)
        assert again.diverged and again.diverged_at == res.diverged_at
        assert again.resumed_from == res.diverged_at
    finally:
        run.close()


def test_a_non_finite_batch_in_a_bn_layer_is_a_divergence_not_a_crash():
    x, y = _data()
    x[5, 0] = float("nan")
    m = _model(bn=True)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    res = fit(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), steps=30, batch_size=200,
              sampling="fixed")
    assert res.diverged and res.diverged_at == 0 and "non-finite" in res.reason
    for k, v in m.state_dict().items():  # the refused batch changed nothing
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("stop_at, resumed_at", [(24, 16), (8, 0)])
def test_interrupted_fit_resumes_from_its_checkpoint_to_the_same_rows(tmp_path, stop_at,
                                                                       resumed_at):
    """Stopped at an evaluation, then continued from the last checkpoint: the same rows and
    weights as a run never stopped, also when that checkpoint is the one of step 0 (whose
    evaluation row is already logged and must not be logged again)."""
    x, y = _data()

    def train(path, stop_at=None):
        m = _model(1, dropout=0.3)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)

        def measure(model, step):
            if stop_at is not None and step >= stop_at:
                raise KeyboardInterrupt
            return {"w": float(model[0].weight.detach().sum())}

        with RunDir.create(path, {}) if not (path / "config.json").exists() else \
                RunDir.resume(path) as run:
            return fit(m, opt, (x, y), (x[:40], y[:40]), steps=40, batch_size=16, seed=2,
                       schedule=lambda t: 1 / (1 + t), eval_every=8, run=run,
                       tags={"v": "a"}, measure=measure), m, run.rows()

    ref, m_ref, rows_ref = train(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", stop_at=stop_at)
    # rows up to the last checkpoint were kept, the evaluation at stop_at never completed
    res, m_cut, rows = train(tmp_path / "cut")
    assert res.resumed_from == resumed_at
    assert rows == rows_ref
    for a, b in zip(m_cut.state_dict().values(), m_ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fit_checks_its_arguments():
    x, y = _data()
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        fit(m, opt, (x, y), steps=0, batch_size=8)
    with pytest.raises(ValueError, match="inputs and"):
        fit(m, opt, (x, y[:-1]), steps=1, batch_size=8)
    with pytest.raises(ValueError, match="larger than"):
        fit(m, opt, (x, y), steps=1, batch_size=1000)


def test_numpy_and_tensor_measurements_are_stored_as_numbers(tmp_path):
    """``measure`` may return numpy scalars and one-element tensors: the rows keep Python numbers,
    so the checkpoint holding them loads with weights_only=True and a resume works."""
    import numpy as np

    x, y = _data()

    def measure(model, step):
        w = model[0].weight.detach()
        return {"np": np.float64(w.sum()), "t": w.norm(), "pair": (np.int64(step), w[0, :2])}

    ckpt = tmp_path / "ck.pt"
    m = _model()
    res = fit(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), steps=10, batch_size=16,
              eval_every=5, measure=measure, checkpoint=ckpt)
    row = res.history[-1]
    assert type(row["np"]) is float and type(row["t"]) is float
    assert type(row["pair"][0]) is int and type(row["pair"][1][0]) is float
    m2 = _model()
    again = fit(m2, torch.optim.SGD(m2.parameters(), lr=0.1), (x, y), steps=10, batch_size=16,
                eval_every=5, measure=measure, checkpoint=ckpt)
    assert again.resumed_from == 10 and again.history == res.history
