"""Shared fixtures: fixed seeds, shape families, the backend parametrisation, and a tiny
torch-vs-bnlab pairing helper."""

from __future__ import annotations

import os

# OpenMP threads (torch's and the kernels' Numba pool) sleep when idle instead of spinning: the
# suite runs in pytest-xdist workers, two threads each, on as many cores as workers, and a pool
# that spins between parallel regions takes cores the other workers' tests are waiting for.
# Read when OpenMP starts, so set before torch is imported; workers and the processes tests
# start inherit it. Only waiting changes: threads, chunks and values stay as they are.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# One shape per family: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W).
SHAPES = {
    "1d-dense": (8, 5),
    "1d-seq": (4, 3, 7),
    "2d": (4, 3, 5, 6),
    "3d": (2, 3, 4, 3, 5),
}


def pytest_sessionstart(session):
    """Compile bnlab's kernels once, before any test (or load them from Numba's on-disk cache):
    in a fresh checkout the first tests would otherwise compile them piecemeal, and the tests
    that start processes of their own, each compiling what was not yet on disk. One process
    per dtype compiles (Numba compiles on one core); under pytest-xdist the main process does,
    before it starts the workers, which then load what it wrote."""
    from bnlab.kernels import WARM_DTYPES, warm_up

    warm_up(processes=1 if os.environ.get("PYTEST_XDIST_WORKER") else len(WARM_DTYPES))


# The modules whose tests take longest (quick experiment runs, compilers, processes of their own),
# longest first. Under pytest-xdist they run first, so the workers end on short tests together
# instead of one waiting out the other's last long test.
_LONG_FIRST = ("test_questions", "test_toolchain", "test_small_batch_experiments", "test_why",
               "test_lr_acceleration", "test_mnist_experiment", "test_lab", "test_faults",
               "test_checkpoint", "test_bench", "test_train_distributed", "test_sync")  # fmt: skip


def pytest_collection_modifyitems(session, config, items):
    if not getattr(config.option, "numprocesses", None):
        return
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # (stable: order kept within)


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    """Run a test once per bnlab backend: the reference functions, and "auto" (the fused CPU
    kernels wherever they apply, which is every float32/float64 contiguous or channels_last
    input). Test modules opt in with ``pytestmark = pytest.mark.usefixtures("backend")``."""
    import bnlab

    with bnlab.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def family_classes(shape):
    """(bnlab class, torch class) for an input shape."""
    import bnlab

    rank = len(shape)
    if rank in (2, 3):
        return bnlab.BatchNorm1d, torch.nn.BatchNorm1d
    if rank == 4:
        return bnlab.BatchNorm2d, torch.nn.BatchNorm2d
    return bnlab.BatchNorm3d, torch.nn.BatchNorm3d


def to_format(x, fmt):
    if fmt == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """A private data cache and home for a test; no Debian folder, no mirror, no real cache."""
    from bnlab.data import download as dl

    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BNLAB_DATA_MIRROR", raising=False)
    monkeypatch.setitem(dl.SYSTEM_DIRS, "fashion-mnist", ())
    yield


def captured(model, tool, example, counter=None):
    """``(run, holder)``: ``model`` as ``tool`` runs it - ``"compile"`` (``torch.compile`` with
    ``fullgraph=True`` on ``counter``, a dynamo test backend), ``"export"`` (the module of
    ``torch.export.export``), ``"trace"`` (``torch.jit.trace`` on ``example``), ``"fx"``
    (``torch.fx.symbolic_trace``) or ``"script"`` (``torch.jit.script``) - and the module whose
    buffers the runs update, given back the state ``model`` had before capturing (tracing runs
    one call on the real buffers)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tool == "compile":
        torch._dynamo.reset()
        return torch.compile(model, backend=counter, fullgraph=True), model
    if tool == "export":
        run = torch.export.export(model, (example,)).module()
        return run, run
    if tool == "fx":
        run = torch.fx.symbolic_trace(model)
        return run, run
    if tool == "script":
        run = torch.jit.script(model)
        return run, run
    run = torch.jit.trace(model, (example.clone(),), check_trace=False)
    model.load_state_dict(state)
    return run, model


def assert_captured_steps(run, holder, layer, eager, tool, xs, inference_x):
    """Each batch of ``xs`` through ``run`` (``layer`` as :func:`captured` gave it, its buffers
    in ``holder``) and through ``eager``: the same output, the same input gradient where the
    tool keeps autograd (compile, fx, script), the same state afterwards; then, for fx and
    script, the same inference output on ``inference_x`` (an fx graph is of the mode it was
    traced in: ``layer`` is traced again in eval mode)."""
    for x in xs:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = run(xa), eager(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        if tool in ("compile", "fx", "script"):
            ya.square().sum().backward()
            yb.square().sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        ours, theirs = holder.state_dict(), eager.state_dict()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    if tool in ("fx", "script"):
        eager.eval()
        run = run.eval() if tool == "script" else torch.fx.symbolic_trace(layer.eval())
        torch.testing.assert_close(run(inference_x), eager(inference_x), rtol=1e-5, atol=1e-5)


class RecordingMode(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that notes each operator it sees (``seen``, by overload packet) and runs
    it as it is: what ``DebugMode``, ``FlopCounterMode`` and memory trackers are built on."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
