"""bnlab.SyncBatchNorm on 2 processes (gloo, 127.0.0.1) against one process on the
concatenated batch (float64): outputs, gradients, running statistics; uneven and empty parts;
refusals on every rank; convert_sync."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bnlab
from bnlab.distributed import launch, shard, world

# (name, global shape, parts per rank, activation)
CASES = [
    ("2d-uneven", (8, 3, 4, 4), (3, 5), None),
    ("2d-empty-rank", (6, 3, 4, 4), (0, 6), None),
    ("dense-one-example-each", (2, 3), (1, 1), None),
    ("1d-seq-relu", (7, 2, 5), (4, 3), "relu"),
    ("3d", (4, 2, 3, 3, 2), (2, 2), None),
]


def _case_data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, dy


def _params(c):
    g = torch.Generator().manual_seed(99)
    return torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(
        c, generator=g, dtype=torch.float64
    )


def _rank_cases_all() -> dict:
    """Both backends in one launch (starting processes is the slow part)."""
    return {b: _rank_cases(b) for b in BACKENDS}


def _rank_cases(backend: str) -> dict:
    """On each rank: every case through SyncBatchNorm (2 training steps, then eval), and the
    refusals. Returns what the parent compares."""
    rank, size = world()
    out: dict = {"world": size}
    with bnlab.use_backend(backend):
        for name, shape, parts, act in CASES:
            lo = sum(parts[:rank])
            layer = bnlab.SyncBatchNorm(shape[1], dtype=torch.float64, activation=act)
            with torch.no_grad():
                layer.weight.copy_(_params(shape[1])[0])
                layer.bias.copy_(_params(shape[1])[1])
            steps = []
            for step in range(2):
                x, dy = _case_data(shape, step)
                xr = x[lo : lo + parts[rank]].clone().requires_grad_()
                y = layer(xr)
                y.backward(dy[lo : lo + parts[rank]])
                steps.append({"y": y.detach(), "dx": xr.grad, "dw": layer.weight.grad.clone(),
                              "db": layer.bias.grad.clone()})  # fmt: skip
                layer.weight.grad = layer.bias.grad = None
            layer.eval()
            x, _ = _case_data(shape, 5)
            steps.append({"eval": layer(x[lo : lo + parts[rank]]).detach()})
            out[name] = {"steps": steps, "state": {k: v.clone() for k, v in
                                                    layer.state_dict().items()}}  # fmt: skip
        # refusals reach every rank together, and change nothing
        layer = bnlab.SyncBatchNorm(3)
        layer.layer_name = "head.bn"
        layer(torch.randn(2, 3))
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        errors = []
        one = torch.randn(1 - rank, 3)  # rank 0: one example, rank 1: none -> 1 value in all
        bad = torch.randn(2, 3)
        if rank == 1:
            bad[1, 2] = float("nan")
        for x in (one, bad):
            try:
                layer(x)
                errors.append(None)
            except (ValueError, FloatingPointError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        out["errors"] = errors
        out["unchanged"] = all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
        out["mode"] = _under_a_mode(rank)
    return out


class _Writes(TorchDispatchMode):
    """Records the storages that the operators it sees write (their outputs; allocations and
    views aside, which write nothing)."""

    def __init__(self):
        super().__init__()
        self.written: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func.name().startswith("aten::empty")):
            self.written.update(t.untyped_storage().data_ptr() for t in tree_leaves(out)
                                if isinstance(t, torch.Tensor))  # fmt: skip
        return out


def _under_a_mode(rank: int) -> dict:
    """A training step of the fused-ReLU case without and with a dispatch mode: both steps'
    results, and whether the mode saw the operators that wrote y, dx and the running
    statistics."""
    _, shape, parts, act = CASES[3]
    lo = sum(parts[:rank])
    x, dy = (t[lo : lo + parts[rank]] for t in _case_data(shape, 0))
    out: dict = {}
    for moded in (False, True):
        layer = bnlab.SyncBatchNorm(shape[1], dtype=torch.float64, activation=act)
        xr = x.clone().requires_grad_()
        mode = _Writes() if moded else contextlib.nullcontext()
        with mode:
            y = layer(xr)
            y.backward(dy)
        tensors = {"y": y.detach(), "dx": xr.grad, "running_mean": layer.running_mean,
                   "running_var": layer.running_var}  # fmt: skip
        out[moded] = {k: t.clone() for k, t in tensors.items()}
        if moded:
            out["seen"] = {k: t.untyped_storage().data_ptr() in mode.written
                           for k, t in tensors.items()}  # fmt: skip
    return out


BACKENDS = ("reference", "auto")


@pytest.fixture(scope="module")
def launched():
    per_rank = launch(_rank_cases_all, 2, timeout=120)
    return {b: [r[b] for r in per_rank] for b in BACKENDS}


@pytest.fixture(params=BACKENDS)
def two_ranks(request, launched):
    return request.param, launched[request.param]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, case):
    backend, results = two_ranks
    name, shape, parts, act = case
    assert [r["world"] for r in results] == [2, 2]
    with bnlab.use_backend(backend):
        ref = bnlab.BatchNorm1d if len(shape) in (2, 3) else (
            bnlab.BatchNorm2d if len(shape) == 4 else bnlab.BatchNorm3d)  # fmt: skip
        one = ref(shape[1], dtype=torch.float64, activation=act)
        with torch.no_grad():
            one.weight.copy_(_params(shape[1])[0])
            one.bias.copy_(_params(shape[1])[1])
        for step in range(2):
            x, dy = _case_data(shape, step)
            x.requires_grad_()
            y = one(x)
            y.backward(dy)
            got = [r[name]["steps"][step] for r in results]
            torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(),
                                       rtol=1e-10, atol=1e-10)  # fmt: skip
            torch.testing.assert_close(torch.cat([g["dx"] for g in got]), x.grad,
                                       rtol=1e-9, atol=1e-10)  # fmt: skip
            # each rank holds its own part of dL/dgamma; DDP sums (averages) them
            torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], one.weight.grad,
                                       rtol=1e-9, atol=1e-10)  # fmt: skip
            torch.testing.assert_close(got[0]["db"] + got[1]["db"], one.bias.grad,
                                       rtol=1e-9, atol=1e-10)  # fmt: skip
            one.weight.grad = one.bias.grad = None
        one.eval()
        x, _ = _case_data(shape, 5)
        torch.testing.assert_close(torch.cat([r[name]["steps"][2]["eval"] for r in results]),
                                   one(x).detach(), rtol=1e-10, atol=1e-10)  # fmt: skip
    for r in results:  # every rank, the empty one included, holds the one process's averages
        for k, v in one.state_dict().items():
            torch.testing.assert_close(r[name]["state"][k], v, rtol=1e-10, atol=1e-12)


def test_refusals_on_every_rank_change_nothing(two_ranks):
    _, results = two_ranks
    for r in results:
        one, bad = r["errors"]
        assert one.startswith("ValueError") and "'head.bn' SyncBatchNorm(3)" in one
        assert "1 over all ranks" in one
        assert bad.startswith("FloatingPointError") and "'head.bn' SyncBatchNorm(3)" in bad
        assert r["unchanged"]


def test_a_dispatch_mode_sees_the_synchronized_step(two_ranks):
    """Under a dispatch mode (a memory tracker, DebugMode) the operators that compute the
    output, the gradient and the running statistics are ones the mode sees, with the numbers of
    the step without it."""
    _, results = two_ranks
    for r in results:
        got = r["mode"]
        assert got["seen"] == {"y": True, "dx": True, "running_mean": True, "running_var": True}
        for k, v in got[False].items():
            torch.testing.assert_close(got[True][k], v, rtol=1e-10, atol=1e-12, msg=k)


def test_single_process_is_batchnorm_and_convert_sync():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(bnlab.BatchNorm2d(4, activation="relu")),
        bnlab.BatchRenorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5),
        torch.nn.BatchNorm1d(5),
    )  # fmt: skip
    ref = bnlab.convert(torch.nn.Sequential(*[m for m in model]))  # bnlab BN, same tensors
    params = list(model.parameters())
    x = torch.randn(6, 3, 8, 8)
    expected = ref(x).detach()
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    for k in ref_state:  # the forward above updated the shared buffers: put them back
        ref.state_dict()[k].copy_(ref_state[k])
    synced = bnlab.convert(model, sync=True)
    assert synced is model and all(a is b for a, b in zip(params, model.parameters(), strict=True))
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
             or isinstance(m, (bnlab.SyncBatchNorm, torch.nn.BatchNorm1d))]  # fmt: skip
    assert kinds == ["SyncBatchNorm", "SyncBatchNorm", "BatchRenorm2d", "SyncBatchNorm"]
    assert model[3][0].activation == "relu" and model[1].layer_name == "1"
    assert not torch.distributed.is_initialized()
    torch.testing.assert_close(model(x), expected)  # no process group: BatchNorm
    back = bnlab.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3).eval())
    assert isinstance(back, bnlab.SyncBatchNorm) and not back.training
    with pytest.raises(ValueError, match="sync=True"):
        bnlab.convert(model, to="torch", sync=True)
    with pytest.raises(ValueError, match="lazy layer '0'"):
        bnlab.convert_sync(torch.nn.Sequential(torch.nn.LazyBatchNorm2d()))


def test_sync_layer_state_dict_fold_and_freeze():
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 5, 5) + 2)
    layer = bnlab.SyncBatchNorm(3)
    layer.load_state_dict(bn.state_dict())
    torch.nn.BatchNorm2d(3).load_state_dict(layer.state_dict())
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), layer).eval()
    x = torch.randn(2, 2, 7, 7)
    torch.testing.assert_close(bnlab.fold(model)(x), model(x), rtol=1e-5, atol=1e-5)
    bnlab.freeze(model.train())
    torch.testing.assert_close(model(x), bn.eval()(model[0](x)))


def test_shard():
    assert [shard(10, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert [shard(1, r, 2) for r in range(2)] == [slice(0, 1), slice(1, 1)]
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)
