"""bnlab.checkpoint: atomic writes, weights_only loading, corruption detection, exact resume."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnlab

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), bnlab.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2), nn.BatchNorm1d(2)
    )


def trained(steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    return model, opt


def test_roundtrip_model_optimizer_rng_step_extra(tmp_path):
    model, opt = trained()
    path = tmp_path / "ck.pt"
    bnlab.save_checkpoint(
        path, model, opt, step=3, extra={"config": {"lr": 0.01, "seed": 0}, "tags": ["a", None]}
    )
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model2 = small_model()
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    info = bnlab.load_checkpoint(path, model2, opt2)
    assert info["step"] == 3 and info["extra"] == {
        "config": {"lr": 0.01, "seed": 0},
        "tags": ["a", None],
    }
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert opt2.param_groups[0]["lr"] == 0.01
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    # the random streams continue exactly where they were at save time
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_extra_must_load_under_weights_only(tmp_path):
    model, opt = trained(1)
    with pytest.raises(TypeError, match=r"extra\['obj'\] is a PosixPath"):
        bnlab.save_checkpoint(tmp_path / "ck.pt", model, opt, 1, extra={"obj": tmp_path})
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained(1)
    path = tmp_path / "ck.pt"
    bnlab.save_checkpoint(path, model, opt, step=1)
    good = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, fh, *args, **kwargs):  # writes part of the file, then the disk "fails"
        real_save(obj, fh, *args, **kwargs)
        fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        bnlab.save_checkpoint(path, model, opt, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # temp file removed
    assert bnlab.load_checkpoint(path, small_model())["step"] == 1


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, bnlab
    path = sys.argv[1]
    model = torch.nn.Linear(1, 1)
    big = torch.nn.Linear(2048, 2048)  # 16 MB of weights: a save takes a while
    bnlab.save_checkpoint(path, model, None, step=0, extra={"fill": 0.0})
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            big.weight.fill_(float(step))
        bnlab.save_checkpoint(path, big, None, step=step, extra={"fill": float(step)})
    """
)


def test_killed_process_mid_save_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a process that saves in a loop, at a moment a temporary file exists (a save in
    progress); the checkpoint at the target path must load and be internally consistent."""
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    path = tmp_path / "ck.pt"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        caught = False
        while time.monotonic() < deadline:
            if any(p.name.startswith(".ck.pt.tmp-") for p in tmp_path.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert caught, "never saw a save in progress"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.pt.tmp-")]
    assert leftovers  # we did kill it mid-save
    model = torch.nn.Linear(1, 1)
    big = torch.nn.Linear(2048, 2048)
    try:
        info = bnlab.load_checkpoint(path, model)
        assert info["step"] == 0
    except ValueError:  # a later, big checkpoint had completed: it must be whole
        info = bnlab.load_checkpoint(path, big)
        assert info["step"] >= 1
        assert bool((big.weight == info["extra"]["fill"]).all())


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.copy_(torch.arange(64 * 64, dtype=torch.float32).view(64, 64))
    path = tmp_path / "ck.pt"
    bnlab.save_checkpoint(path, model, None, step=1)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pt is truncated or corrupted"):
        bnlab.load_checkpoint(truncated, nn.Linear(64, 64))
    # flip one byte inside the weight data: the zip container reads fine, the digest does not
    at = data.find(model.weight.detach().numpy().tobytes()[4000:4016])
    assert at > 0
    flipped = bytearray(data)
    flipped[at + 3] ^= 0x01
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"corrupted\.pt is corrupted"):
        bnlab.load_checkpoint(corrupted, nn.Linear(64, 64))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        bnlab.load_checkpoint(tmp_path / "missing.pt", model)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": bnlab.checkpoint.FORMAT, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        bnlab.load_checkpoint(path, nn.Linear(1, 1))


@pytest.mark.parametrize("target", ["torch", "bnlab"])
def test_torch_bn_checkpoint_without_num_batches_tracked_loads(tmp_path, target):
    src = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    src.train()
    src(torch.randn(10, 3))
    state = src.state_dict()
    old = OrderedDict((k, v) for k, v in state.items() if "num_batches_tracked" not in k)
    old._metadata = state._metadata  # version 2 metadata but no key: torch alone would refuse
    path = tmp_path / "old.pt"
    torch.save(old, path)
    dst = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    if target == "bnlab":
        dst = bnlab.convert(dst)
    with torch.no_grad():
        dst[1].num_batches_tracked.fill_(5)
    info = bnlab.load_checkpoint(path, dst)
    assert info["step"] is None
    assert torch.equal(dst[1].running_mean, src[1].running_mean)
    assert torch.equal(dst[1].running_var, src[1].running_var)
    assert int(dst[1].num_batches_tracked) == 0


RESUME_SCRIPT = textwrap.dedent(
    """
    import random, sys
    import numpy as np, torch, torch.nn as nn
    import bnlab

    torch.set_num_threads(1)
    what, ck, out = sys.argv[1], sys.argv[2], sys.argv[3]

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), bnlab.BatchNorm1d(16), nn.ReLU(),
                              nn.Dropout(0.2), nn.Linear(16, 8), nn.BatchNorm1d(8, momentum=None),
                              nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, opt

    g = torch.Generator().manual_seed(42)
    X, Y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)

    def train(model, opt, steps):
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, 256, (16,))                         # torch RNG
            x = X[idx] + torch.from_numpy(np.random.randn(16, 10).astype(np.float32)) * 0.1
            for group in opt.param_groups:                             # python RNG
                group["lr"] = 0.05 * (0.9 + 0.2 * random.random())
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), Y[idx]).backward()
            opt.step()

    def seed_all():
        torch.manual_seed(1); np.random.seed(1); random.seed(1)

    if what == "first":  # 200 steps straight, then (from scratch) 100 steps and a checkpoint
        model, opt = build()
        seed_all(); train(model, opt, 200)
        torch.save(model.state_dict(), out)
        model, opt = build()
        seed_all(); train(model, opt, 100)
        bnlab.save_checkpoint(ck, model, opt, step=100, extra={"lr": 0.05})
    else:  # "second": a fresh process, deliberately different seeds before loading
        model, opt = build()
        torch.manual_seed(99); np.random.seed(99); random.seed(99)
        info = bnlab.load_checkpoint(ck, model, opt)
        assert info["step"] == 100
        train(model, opt, 100)
        torch.save(model.state_dict(), out)
    """
)


def test_resume_in_new_process_is_bit_identical(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(RESUME_SCRIPT)
    ck, a, b = tmp_path / "ck.pt", tmp_path / "straight.pt", tmp_path / "resumed.pt"

    def run(*args):
        return subprocess.run(
            [sys.executable, str(script), *map(str, args)], env=ENV, timeout=120
        ).returncode

    assert run("first", ck, a) == 0
    assert run("second", ck, b) == 0
    sa = torch.load(a, weights_only=True)
    sb = torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # parameters and running statistics, bit for bit
    assert int(sa["5.num_batches_tracked"]) == 200


# ------------------------------------------------------------------------ all or nothing
def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _opt_state(opt: torch.optim.Optimizer) -> dict:
    import copy

    return copy.deepcopy(opt.state_dict())


def _same_opt(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(
        torch.equal(a["state"][i][k], b["state"][i][k]) if torch.is_tensor(a["state"][i][k])
        else a["state"][i][k] == b["state"][i][k]
        for i in a["state"] for k in a["state"][i]
    )  # fmt: skip


def _target() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(7)
    return trained(2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no optimizer saved", "was saved without an optimizer state"),
        ("shape of a later layer", r"'3.weight' has shape \(3, 6\) in the checkpoint but \(2, 6\)"),
        ("dtype", r"'0.weight' is torch.float64 in the checkpoint but torch.float32"),
        ("missing key", r"does not match the model: missing 4.running_mean"),
        ("optimizer groups", r"parameter group 0 has 9 parameters in the checkpoint but 8"),
        ("optimizer state shape", r"'exp_avg' of parameter 0 has shape \(6, 5\)"),
    ],
)
def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path, case, message):
    """Every check runs before the first copy: model, optimizer and RNG states are untouched
    (torch's load_state_dict copies the keys that fit before raising about the others)."""
    src_model, src_opt = trained(3)
    path = tmp_path / "ck.pt"
    if case == "no optimizer saved":
        bnlab.save_checkpoint(path, src_model, None, step=3)
    elif case == "shape of a later layer":
        src = nn.Sequential(nn.Linear(4, 6), bnlab.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
                            nn.BatchNorm1d(3))
        bnlab.save_checkpoint(path, src, None, step=3)
    elif case == "dtype":
        bnlab.save_checkpoint(path, small_model().double(), None, step=3)
    elif case == "missing key":
        src = small_model()
        src[4] = nn.BatchNorm1d(2, track_running_stats=False)
        bnlab.save_checkpoint(path, src, None, step=3)
    elif case == "optimizer groups":
        extra = nn.Parameter(torch.zeros(2))
        opt = torch.optim.Adam([*src_model.parameters(), extra], lr=0.01)
        bnlab.save_checkpoint(path, src_model, opt, step=3)
    else:  # same parameter count, but the first one is shaped (6, 5): its Adam state too
        src = small_model()
        src[0] = nn.Linear(5, 6)
        opt = torch.optim.Adam(src.parameters(), lr=0.01)
        src(torch.randn(3, 5)).sum().backward()
        opt.step()
        torch.save(  # a checkpoint whose model part fits but whose optimizer state does not
            {"format": bnlab.checkpoint.FORMAT, "sha256": None, "payload": None}, path)
        good = {k: v for k, v in src_model.state_dict().items()}
        payload = {"model": good, "optimizer": opt.state_dict(), "step": 3,
                   "rng": bnlab.checkpoint._rng_state(), "extra": {}}
        torch.save({"format": bnlab.checkpoint.FORMAT,
                    "sha256": bnlab.checkpoint._digest(payload), "payload": payload}, path)
    model, opt = _target()
    before, opt_before = _state(model), _opt_state(opt)
    rng_before = torch.get_rng_state()
    with pytest.raises(ValueError, match=message) as info:
        bnlab.load_checkpoint(path, model, opt if "shape" not in case or "optimizer" in case
                              else None)
    assert str(path) in str(info.value)
    assert _same(_state(model), before), "the model was changed"
    assert _same_opt(_opt_state(opt), opt_before), "the optimizer was changed"
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_a_failure_while_copying_puts_everything_back(tmp_path, monkeypatch):
    src_model, src_opt = trained(3)
    path = tmp_path / "ck.pt"
    bnlab.save_checkpoint(path, src_model, src_opt, step=3)
    model, opt = _target()
    before, opt_before, rng = _state(model), _opt_state(opt), torch.get_rng_state()

    def fails(*args, **kwargs):  # after the model has been loaded
        raise RuntimeError("device lost")

    monkeypatch.setattr(opt, "load_state_dict", fails)
    with pytest.raises(ValueError, match=r"ck.pt does not fit .*device lost.*left as they were"):
        bnlab.load_checkpoint(path, model, opt)
    assert _same(_state(model), before) and _same_opt(_opt_state(opt), opt_before)
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------------ what saving accepts
class _Color(__import__("enum").IntEnum):
    RED = 1


_Pair = __import__("collections").namedtuple("_Pair", "a b")


@pytest.mark.parametrize(
    "value, kind",
    [
        (np.float64(0.5), "float64 (numpy)"),
        (np.int64(3), "int64 (numpy)"),
        (np.bool_(True), "bool (numpy)"),
        (_Color.RED, "_Color (an IntEnum)"),
        (_Pair(1, 2), "_Pair (a namedtuple)"),
        (__import__("collections").defaultdict(int), "defaultdict (collections)"),
        (frozenset([1]), "frozenset"),
        (np.zeros(2), "ndarray (numpy)"),
    ],
)
def test_save_refuses_what_weights_only_loading_would_refuse(tmp_path, value, kind):
    model, opt = trained(1)
    path = tmp_path / "ck.pt"
    with pytest.raises(TypeError, match=rf"extra\['cfg'\]\['runs'\]\[1\] is a {re.escape(kind)}"):
        bnlab.save_checkpoint(path, model, opt, 1, extra={"cfg": {"runs": [0, value]}})
    assert list(tmp_path.iterdir()) == []  # nothing written
    opt.param_groups[0]["lr"] = value  # and in the optimizer's state
    with pytest.raises(TypeError, match=r"optimizer.state_dict\(\)\['param_groups'\]\[0\]\['lr'\]"):
        bnlab.save_checkpoint(path, model, opt, 1)
    assert list(tmp_path.iterdir()) == []


def test_everything_save_accepts_loads_in_a_new_process(tmp_path):
    """The values save accepts load under weights_only, and the digest does not depend on the
    order a set iterates in (which changes with the string hash seed of each process)."""
    model, opt = trained(1)
    extra = {
        "set": {f"tag{i}" for i in range(20)}, "od": OrderedDict(b=1, a=2), "bytes": b"\x00\x01",
        "complex": 1 + 2j, "size": torch.Size([2, 3]), "dtype": torch.float16,
        "device": torch.device("cpu"), "tuple keys": {(1, "a"): 2.5}, "inf": float("inf"),
    }  # fmt: skip
    path = tmp_path / "ck.pt"
    bnlab.save_checkpoint(path, model, opt, 1, extra=extra)
    code = (
        "import sys, torch, bnlab\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Linear(4, 6), bnlab.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2),"
        " nn.BatchNorm1d(2))\n"
        "info = bnlab.load_checkpoint(sys.argv[1], m)\n"
        "print(sorted(info['extra']['set'])[:2], info['extra']['od'], info['extra']['size'])\n"
    )
    # another hash seed than this process's (random, or 0 when PYTHONHASHSEED pins it)
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, env={**ENV, "PYTHONHASHSEED": seed}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "['tag0', 'tag1'] OrderedDict([('b', 1), ('a', 2)]) torch.Size([2, 3])" in res.stdout
    info = bnlab.load_checkpoint(path, small_model())
    assert info["extra"] == extra


# ------------------------------------------------------------------------ temporary files
def test_abandoned_temp_files_are_removed_at_the_next_save(tmp_path):
    """A temp file nobody holds locked and untouched for STALE_AFTER seconds was left by a killed
    save: the next save into the folder removes it. A locked one (a save in progress in another
    process) and a fresh one are kept."""
    import fcntl

    from bnlab._fileutil import STALE_AFTER

    old = time.time() - STALE_AFTER - 60
    abandoned = tmp_path / ".ck.pt.tmp-abandoned"
    other = tmp_path / ".other.pt.tmp-x1"  # another checkpoint's, in the same folder
    held = tmp_path / ".ck.pt.tmp-held"
    fresh = tmp_path / ".ck.pt.tmp-fresh"
    mine = tmp_path / "notes.tmp-1"  # not a name bnlab writes
    for p in (abandoned, other, held, fresh, mine):
        p.write_bytes(b"partial")
    for p in (abandoned, other, held, mine):
        os.utime(p, (old, old))
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        model, opt = trained(1)
        bnlab.save_checkpoint(tmp_path / "ck.pt", model, opt, 1)
    finally:
        os.close(fd)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["ck.pt", held.name, fresh.name, mine.name])


@pytest.mark.parametrize("existing", [None, 0o640, 0o604])
def test_atomic_writes_keep_the_files_permissions(tmp_path, existing):
    """An atomically replaced file keeps the old file's permission bits, and a new one gets what
    ``open(path, "w")`` gives (0o666 less the umask), not the owner-only mode of its temp file."""
    from bnlab._fileutil import atomic_write_text

    path = tmp_path / "notes.md"
    plain = tmp_path / "plain.md"
    plain.write_text("x")  # the mode a plain write gives under this process's umask
    if existing is not None:
        path.write_text("old")
        path.chmod(existing)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    want = existing if existing is not None else plain.stat().st_mode & 0o7777
    assert path.stat().st_mode & 0o7777 == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md", "plain.md"]
