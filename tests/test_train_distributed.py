"""bnlab.train on several processes and with non-i.i.d. batches: LabelBatches, fit(sampler=),
and fit under torch.distributed (2 processes, gloo on 127.0.0.1; also through torchrun) against
one process on the global batch (SyncBatchNorm), and against ghost BN (per-rank BN)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab
from bnlab.data import load_synthetic
from bnlab.distributed import launch, loopback_interface
from bnlab.train import LabelBatches, fit

SRC = Path(__file__).parents[1] / "src"


# ------------------------------------------------------------------------------ LabelBatches
def test_label_batches_hold_few_labels_and_are_a_function_of_seed_and_step():
    labels = torch.arange(200) % 10
    sampler = LabelBatches(labels, labels_per_batch=2, per_label=4, seed=3)
    again = LabelBatches(labels, labels_per_batch=2, per_label=4, seed=3)
    seen = set()
    for step in range(50):
        idx = sampler(step)
        assert idx.dtype == torch.int64 and len(idx) == 8 and len(set(idx.tolist())) == 8
        classes, counts = torch.unique(labels[idx], return_counts=True)
        assert len(classes) == 2 and counts.tolist() == [4, 4]
        assert torch.equal(idx, again(step))
        seen.add(tuple(sorted(classes.tolist())))
    assert len(seen) > 10  # the labels change from step to step
    assert not torch.equal(sampler(0), LabelBatches(labels, 2, 4, seed=4)(0))
    # the order inside a batch is shuffled (not label by label)
    assert any(labels[sampler(s)][:4].unique().numel() > 1 for s in range(10))


def test_label_batches_refuse_what_they_cannot_draw():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 2)
    with pytest.raises(ValueError, match="only 2 classes have 3 or more"):
        LabelBatches(labels, labels_per_batch=3, per_label=3, seed=0)
    with pytest.raises(ValueError, match="per_label must be a positive int"):
        LabelBatches(labels, 1, 0, seed=0)
    with pytest.raises(ValueError, match="integer class labels"):
        LabelBatches(labels.float(), 1, 1, seed=0)


def test_fit_with_a_sampler_uses_it_and_resumes(tmp_path):
    data = load_synthetic(n_train=120, n_test=40, num_classes=4, image_shape=(6,), seed=1)
    drawn = []
    sampler = LabelBatches(data.y_train, 2, 3, seed=0)

    def recording(step):
        idx = sampler(step)
        drawn.append(idx)
        return idx

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), bnlab.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))

    m = model()
    res = fit(m, torch.optim.SGD(m.parameters(), lr=0.1), (data.x_train, data.y_train),
              steps=6, sampler=recording, eval_every=3, checkpoint=tmp_path / "c.pt")  # fmt: skip
    assert res.status == "finished" and len(drawn) == 6
    assert all(len(torch.unique(data.y_train[i])) == 2 for i in drawn)
    with pytest.raises(ValueError, match="batch_size"):
        fit(m, torch.optim.SGD(m.parameters(), lr=0.1), (data.x_train, data.y_train), steps=1)
    with pytest.raises(TypeError, match="sampler"):
        fit(m, torch.optim.SGD(m.parameters(), lr=0.1), (data.x_train, data.y_train), steps=1,
            sampler=3)  # fmt: skip


# ------------------------------------------------------------------------------ distributed
def _data():
    d = load_synthetic(n_train=96, n_test=40, num_classes=3, image_shape=(1, 6, 6), seed=2)
    return (d.x_train.double(), d.y_train), (d.x_test.double(), d.y_test)


def _net(norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kw = {"virtual_batch_size": 4} if norm == "ghost" else {}
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), bnlab.layers.make_norm(norm, 4, 2, **kw),
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    )  # fmt: skip
    return net.double()


def _train(norm: str, batch_size: int, steps: int, ckpt: str | None, sync: bool = False,
           stop_at: int = 0) -> dict:  # fmt: skip
    """One training (run in 1 or 2 processes): the rows and the final parameters."""
    train, test = _data()
    net = _net(norm)
    if sync:
        net = bnlab.convert_sync(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)

    def measure(model, step):
        if stop_at and step >= stop_at:
            raise KeyboardInterrupt
        return {}

    try:
        res = fit(net, opt, train, test, steps=steps, batch_size=batch_size, seed=5,
                  eval_every=3, checkpoint=ckpt, train_eval_size=50, eval_batch_size=16,
                  schedule=lambda t: 1.0 - t / (2 * steps), measure=measure)  # fmt: skip
    except KeyboardInterrupt:
        return {"interrupted": True}
    return {"history": res.history, "status": res.status, "resumed_from": res.resumed_from,
            "state": {k: v.clone() for k, v in net.state_dict().items()}}  # fmt: skip


def _rank_trainings(tmp: str) -> dict:
    return {
        "sync": _train("bn", 8, 6, None, sync=True),
        "sync-uneven": _train("bn", 7, 6, None, sync=True),
        "per-rank": _train("bn", 8, 6, None),
        "resume": _train("bn", 8, 9, os.path.join(tmp, "resume.pt"), sync=True),
    }


def _close_rows(got, want, exact_eval=True):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("train_loss", "test_loss") if exact_eval else ("train_loss",):
            if b.get(key) is None:
                assert a.get(key) is None
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
        for key in ("train_batch_acc", "train_acc", "test_acc", "lr") if exact_eval else (
                "train_batch_acc", "lr"):  # fmt: skip
            if b.get(key) is None:
                assert a.get(key) is None, key
            else:
                assert a.get(key) == pytest.approx(b[key], rel=1e-12), key


def _close_state(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def two_rank_trainings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    # an interrupted single-process run leaves the checkpoint of step 3 for the 2 ranks to resume
    assert _train("bn", 8, 9, str(tmp / "resume.pt"), stop_at=6)["interrupted"]
    return launch(_rank_trainings, 2, (str(tmp),), timeout=300)


def test_two_processes_with_sync_bn_give_the_numbers_of_one(two_rank_trainings):
    ranks = two_rank_trainings
    for name, batch in (("sync", 8), ("sync-uneven", 7)):
        one = _train("bn", batch, 6, None)
        for r in ranks:  # every rank returns the same rows and holds the same model
            assert r[name]["status"] == "finished"
            _close_rows(r[name]["history"], one["history"])
            _close_state(r[name]["state"], one["state"])


def test_per_rank_bn_is_ghost_bn_of_the_rank_parts(two_rank_trainings):
    """Per-rank BN on 2 x 4 examples normalizes like ghost BN with virtual batches of 4 (the
    parameters and training losses agree; the running averages are rank 0's, not pooled)."""
    ghost = _train("ghost", 8, 6, None)
    for r in two_rank_trainings:
        _close_rows(r["per-rank"]["history"], ghost["history"], exact_eval=False)
        for k, v in ghost["state"].items():
            if "running" not in k and "num_batches" not in k:
                torch.testing.assert_close(r["per-rank"]["state"][k], v, rtol=1e-9, atol=1e-11)


def test_two_processes_resume_a_one_process_checkpoint_to_the_same_rows(two_rank_trainings):
    whole = _train("bn", 8, 9, None)
    for r in two_rank_trainings:
        assert r["resume"]["resumed_from"] == 3
        _close_rows(r["resume"]["history"], whole["history"])
        _close_state(r["resume"]["state"], whole["state"])


TORCHRUN_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
import test_train_distributed as t
dist.init_process_group("gloo")
torch.set_num_threads(1)
out = t._train("bn", 8, 6, None, sync=True)
if dist.get_rank() == 0:
    print("ROWS" + json.dumps(out["history"]))
dist.destroy_process_group()
# torch's own teardown of a gloo worker under torchrun can abort at interpreter exit, after
# destroy_process_group ("terminate called without an active exception", also with no bnlab
# code in the script): the training has ended by here, so the process ends without it
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def test_fit_under_torchrun_nproc_per_node_2(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH",
               "")]), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")  # fmt: skip
    if loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = loopback_interface()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script)], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("ROWS"))
    _close_rows(json.loads(line[4:]), _train("bn", 8, 6, None)["history"])
