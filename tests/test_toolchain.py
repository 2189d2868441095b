"""bnlab's BatchNorm through PyTorch's toolchain: every tool that looks inside a model.

For a Conv-BN-ReLU CNN, bnlab's ResNet-20 (with and without the fused BN+ReLU) and a
torchvision-style ResNet-18 converted with ``bnlab.convert``, each tool's result is compared with
the eager model (the oracle): outputs, gradients, running statistics and ``num_batches_tracked``
to 1e-5, in training and in eval mode. One test (or group) per row of the README's "works with"
table: torch.compile (zero graph breaks, also in a fresh process with Inductor), torch.export
(also with a symbolic batch) and AOTInductor, ONNX (both exporters, run by onnxruntime),
jit.trace (every grad mode, saved and loaded), jit.script, torch.fx and fuse_modules,
make_fx, torch.func.grad/vmap/functionalize, the meta device, FakeTensorMode and other
dispatch modes, DTensor batches, double backward, isinstance-based torch utilities
(SyncBatchNorm conversion, weight-decay filters), and the custom operators themselves
(torch.library.opcheck, vmap rules, decompositions).

torch.compile is slow on small machines, so compiled models use the ``aot_eager`` backend (the
same Dynamo capture, fake tensors, functionalization and autograd as Inductor, without code
generation) except the fresh-process test, which runs Inductor on the CNN.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import bnlab
from bnlab.models import resnet20
from conftest import RecordingMode
from tv_resnet import resnet18

TOL = dict(rtol=1e-5, atol=1e-5)


def close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """a equals b to 1e-5 of b's scale (a large summed gradient differs between two correct
    float32 implementations by more than 1e-5 in absolute terms)."""
    assert a.shape == b.shape and a.dtype == b.dtype, msg
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale, msg=msg or None)
MODES = ["train", "eval"]


def cnn() -> nn.Module:
    """Conv-BN-ReLU x2, pooling, linear: the issue's small CNN, built with torch BN."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def cnn_fused_relu() -> nn.Module:
    """The CNN with bnlab's BN+ReLU layers (as ``resnet20(fuse_relu=True)`` has them)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), bnlab.BatchNorm2d(8, activation="relu"),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), bnlab.BatchNorm2d(8, activation="relu"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


BUILDERS = {
    "cnn": (lambda: bnlab.convert(cnn()), (4, 3, 8, 8)),
    "cnn-fused-relu": (cnn_fused_relu, (4, 3, 8, 8)),
    "resnet20": (lambda: resnet20(num_classes=4), (4, 3, 16, 16)),
    "resnet20-fused-relu": (lambda: resnet20(num_classes=4, fuse_relu=True), (4, 3, 16, 16)),
    "resnet18": (lambda: bnlab.convert(resnet18(num_classes=4)), (2, 3, 48, 48)),
}


def build(name: str, mode: str, seed: int = 0):
    """A model with random BN parameters and running statistics from three training batches,
    in ``mode``, and two inputs of its shape.

    ResNet-18 trains in float64 here: with 2 samples its last stage normalizes 8 values per
    channel, some of them ReLU-dead (variance 0, so 1/sqrt(eps) scales whatever rounding
    reaches them), and the input gradient then differs by ~1% between two correct float32
    implementations (torch's BN and bnlab's standard-op form round differently from the fused
    kernels, which agree with torch's to 1e-6). In float64 every form agrees to 1e-12, which
    separates "the tool computes the same function" from float32 conditioning."""
    torch.manual_seed(seed)
    make, shape = BUILDERS[name]
    model = make()
    dtype = torch.float64 if (name, mode) == ("resnet18", "train") else torch.float32
    model = model.to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
        for _ in range(3):
            model(torch.randn(shape, dtype=dtype) * 2 + 0.5)
    model.train(mode == "train")
    return model, torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) * 1.5 - 0.5


def bn_states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def assert_same_states(a: nn.Module | dict, b: nn.Module | dict) -> None:
    """Same running statistics and counts; a module made by a tool may hold only the buffers its
    graph uses (an fx GraphModule in eval mode has no num_batches_tracked)."""
    sa = a if isinstance(a, dict) else bn_states(a)
    sb = b if isinstance(b, dict) else bn_states(b)
    assert set(sa) <= set(sb) and (sa or not sb)
    assert all(k.endswith("num_batches_tracked") for k in set(sb) - set(sa))
    for k in sa:
        close(sa[k], sb[k], k)


def step(model: nn.Module, x: torch.Tensor):
    """Output, input gradient and parameter gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    (y.square().sum() + y.sum()).backward()
    grads = {k.removeprefix("_orig_mod."): p.grad for k, p in model.named_parameters()}
    return y.detach(), x.grad, grads


def assert_same_step(a, b) -> None:
    (ya, gxa, gpa), (yb, gxb, gpb) = a, b
    close(ya, yb)
    close(gxa, gxb)
    assert gpa.keys() == gpb.keys()
    for k in gpa:
        close(gpa[k], gpb[k], k)


def bnlab_op_targets(graph: torch.fx.Graph) -> set[str]:
    return {
        str(n.target) for n in graph.nodes if n.op == "call_function" and "bnlab" in str(n.target)
    }


# ----------------------------------------------------------------------------- torch.compile
# Every model in training with bnlab's operators; the standard-op form on the CNN; eval on the
# two small models (the larger ones add compile time, not coverage: same operators, same rules).
COMPILE_CASES = [("cnn", "ops", "train"), ("cnn", "ops", "eval"), ("cnn", "decompose", "train"),
                 ("cnn", "decompose", "eval"), ("resnet20-fused-relu", "ops", "train"),
                 ("resnet20-fused-relu", "ops", "eval"), ("resnet18", "ops", "train")]  # fmt: skip


@pytest.mark.parametrize("name,form,mode", COMPILE_CASES, ids=["-".join(c) for c in COMPILE_CASES])
def test_compile_has_no_graph_break_and_matches_eager(name, form, mode):
    """fullgraph=True raises on any graph break; one frame is compiled; two steps give eager's
    outputs, gradients and running statistics, with bnlab's operators in the graph (the form
    for large inputs) or its decomposition (small inputs, see bnlab.ops.set_compile_form)."""
    model, x1, x2 = build(name, mode)
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with bnlab.ops.compile_form(form):
        for x in (x1, x2):
            assert_same_step(step(compiled, x), step(ref, x))
            assert_same_states(model, ref)
    assert counter.frame_count == 1
    graph = counter.graphs[0].graph
    assert bool(bnlab_op_targets(graph)) == (form == "ops")


DYNAMIC_CASES = {
    "bn2d-none-relu": (lambda: bnlab.BatchNorm2d(4, momentum=None, activation="relu"), (4, 5, 5)),
    "bn1d": (lambda: bnlab.BatchNorm1d(7, momentum=0.3), (7,)),
    "renorm": (lambda: bnlab.BatchRenorm2d(4, warmup_steps=0, rmax_steps=2, dmax_steps=2),
               (4, 5, 5)),
    "ghost": (lambda: bnlab.GhostBatchNorm2d(4, virtual_batch_size=4), (4, 5, 5)),
    "cnn": (lambda: bnlab.convert(cnn()), (3, 8, 8)),
}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(DYNAMIC_CASES))
def test_compile_with_dynamic_shapes_matches_eager(case, mode):
    """torch.compile(dynamic=True), which also makes the layers' float attributes (momentum,
    eps) symbolic, with fullgraph=True: batches of three sizes give eager's outputs, input
    gradients and state, compiled no more often than torch's own (a layer: the first call's
    frame and a symbolic one, for the ghost layer too, whose batches hold 2, 3 and 4 ghost
    batches of 4 examples and a last one of 1; the CNN: as many as with torch's BN)."""
    make, tail = DYNAMIC_CASES[case]
    torch.manual_seed(0)
    model = make().train(mode == "train")
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for n in (9, 13, 17):
        x = torch.randn(n, *tail)
        assert_same_step(step(compiled, x), step(ref, x))
        state, expected = model.state_dict(), ref.state_dict()
        for k in expected:
            close(state[k], expected[k], k)
    limit = 2
    if case == "cnn":
        torch._dynamo.reset()
        theirs = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        twin = torch.compile(cnn().train(mode == "train"), backend=theirs, dynamic=True,
                             fullgraph=True)  # fmt: skip
        for n in (9, 13, 17):
            step(twin, torch.randn(n, *tail))
        limit = theirs.frame_count
    assert counter.frame_count <= limit


WHOLE_STEP_CASES = [("cnn", "ops"), ("cnn", "decompose"), ("cnn-fused-relu", "ops")]


def _whole_step_matches_eager(name: str, form: str) -> None:
    """One case of :func:`test_compiled_training_step_with_its_backward_matches_eager`."""
    frames = {}
    for which in ("torch", "bnlab"):
        if which == "torch":
            model, x1, x2 = build(name.removesuffix("-fused-relu"), "train")
            model = bnlab.convert(model, to="torch")
        else:
            model, x1, x2 = build(name, "train")
        ref = copy.deepcopy(model)
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(functools.partial(step, model), backend=counter, fullgraph=True)
        with bnlab.ops.compile_form(form), torch._dynamo.config.patch(trace_autograd_ops=True):
            for x in (x1, x2):
                assert_same_step(compiled(x), step(ref, x))
                assert_same_states(model, ref)
        frames[which] = counter.frame_count
        if which == "bnlab":
            ops_in_graph = set().union(*(bnlab_op_targets(g.graph) for g in counter.graphs))
            assert bool(ops_in_graph) == (form == "ops")
    assert frames["bnlab"] == frames["torch"], frames


def test_compiled_training_step_with_its_backward_matches_eager():
    """A whole training step (zero_grad, forward, backward) under torch.compile with Dynamo
    tracing the backward too (``trace_autograd_ops``) and fullgraph=True: no graph break,
    eager's outputs, gradients and running statistics over two steps, and as many compiled
    frames as the same step of the model built with torch's BN (the second step recompiles on
    the gradients no longer being None, for both; the fused ReLU's twin is the model with a
    separate ReLU, which torch's layers need). In a process of its own: after two such steps,
    of torch's BN as of bnlab's, this torch's Dynamo fails to compile a later module that sets
    one of its attributes in its forward, whatever BN it holds."""
    tests = str(Path(__file__).parent)
    src = str(Path(bnlab.__file__).parents[1])
    code = (f"import sys; sys.path[:0] = [{tests!r}, {src!r}]; import test_toolchain as t\n"
            f"for case in t.WHOLE_STEP_CASES: t._whole_step_matches_eager(*case)\n"
            f"print('DONE')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0 and "DONE" in out.stdout, out.stderr[-3000:]


# (form, compiled): bnlab's operators and their standard-op form compiled, and eager
DDP_CASES = [("ops", True), ("decompose", True), ("auto", False)]


def _ddp_rank() -> dict:
    """One rank of :func:`test_ddp_eager_and_compiled_averages_per_rank_gradients`, each case
    of ``DDP_CASES`` in turn (one pair of processes for all): two steps of a
    DistributedDataParallel ResNet-20 (fused ReLU) on this rank's half of each batch."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    for form, compiled in DDP_CASES:
        torch._dynamo.reset()
        model, x1, x2 = build("resnet20-fused-relu", "train")
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        run = torch.compile(ddp, backend=counter) if compiled else ddp
        with bnlab.ops.compile_form(form):
            for x in (x1, x2):
                part = x.chunk(2)[rank]
                ddp.zero_grad(set_to_none=True)
                y = run(part)
                (y.square().sum() + y.sum()).backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        out[form, compiled] = {"grads": grads, "states": bn_states(model),
                               "graphs": len(counter.graphs)}  # fmt: skip
    return out


def test_ddp_eager_and_compiled_averages_per_rank_gradients():
    """DistributedDataParallel on two processes (gloo), eager and under torch.compile, where
    DDP's graph optimizer splits the model into one graph per gradient bucket: each rank's
    gradients are the average of what eager copies give on each rank's half of the batch (per
    rank BN, as torch's BatchNorm under DDP), and each rank's running statistics are those of
    its own half of the batch after DDP broadcast rank 0's before the forward (its default).
    Every case of ``DDP_CASES``."""
    from bnlab.distributed import launch

    ranks = launch(_ddp_rank, 2, timeout=600)
    model, x1, x2 = build("resnet20-fused-relu", "train")
    copies = [copy.deepcopy(model) for _ in range(2)]
    for x in (x1, x2):
        copies[1].load_state_dict(copies[0].state_dict())  # (DDP's buffer broadcast)
        for rank, m in enumerate(copies):
            part = x.chunk(2)[rank]
            m.zero_grad(set_to_none=True)
            y = m(part)
            (y.square().sum() + y.sum()).backward()
    other = dict(copies[1].named_parameters())
    for form, compiled in DDP_CASES:
        for rank, per_case in enumerate(ranks):
            got = per_case[form, compiled]
            for k, p in copies[0].named_parameters():
                close(got["grads"][k], (p.grad + other[k].grad) / 2, f"{form} {compiled} {k}")
            assert_same_states(got["states"], copies[rank])
            assert got["graphs"] > 1 if compiled else got["graphs"] == 0, (form, got["graphs"])


def _fully_shard_rank(lr: float) -> dict:
    """One rank of :func:`test_fully_shard_trains_as_averaged_eager_copies`, eager then compiled
    (one pair of processes for both): two SGD steps of a ResNet-20 (fused ReLU) sharded by
    ``fully_shard`` (each residual block a group, then the root), on this rank's half of each
    batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from bnlab.models.resnet import BasicBlock

    rank = dist.get_rank()
    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model, x1, x2 = build("resnet20-fused-relu", "train")
        for m in list(model.modules()):
            if isinstance(m, BasicBlock):
                fully_shard(m)
        fully_shard(model)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        run = torch.compile(model, backend=counter) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for x in (x1, x2):
            opt.zero_grad(set_to_none=True)
            y = run(x.chunk(2)[rank])
            (y.square().sum() + y.sum()).backward()
            opt.step()
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}  # (last step's)
        params = {k: p.full_tensor() for k, p in model.named_parameters()}
        out[compiled] = {"grads": grads, "params": params, "states": bn_states(model),
                         "graphs": len(counter.graphs)}  # fmt: skip
    return out


def test_fully_shard_trains_as_averaged_eager_copies():
    """``torch.distributed.fsdp.fully_shard`` (FSDP2) on two processes (gloo): it frees each
    group's gathered parameters after use and allocates them again for the next forward and
    backward, so bnlab's layers meet their parameters in new memory every time (and must leave
    their storages resizable, as torch's layers do). Over two SGD steps each rank's gradients
    are the average of eager copies' on the two halves of the batch, its parameters those
    copies' after the same updates, its running statistics those of its own half; eager and
    compiled. Compiled, the blocks are graphs between fully_shard's hooks, in standard ops. (A
    learning rate at which the steps do not diverge: a diverging run amplifies the rounding
    differences between the kernels and the standard ops.)"""
    from bnlab.distributed import launch

    lr = 0.001
    ranks = launch(_fully_shard_rank, 2, args=(lr,), timeout=600)
    model, x1, x2 = build("resnet20-fused-relu", "train")
    copies = [copy.deepcopy(model) for _ in range(2)]
    for x in (x1, x2):
        for rank, m in enumerate(copies):
            m.zero_grad(set_to_none=True)
            y = m(x.chunk(2)[rank])
            (y.square().sum() + y.sum()).backward()
        other = dict(copies[1].named_parameters())
        with torch.no_grad():
            grads = {k: (p.grad + other[k].grad) / 2 for k, p in copies[0].named_parameters()}
            for m in copies:
                for k, p in m.named_parameters():
                    p -= lr * grads[k]
    for compiled in (False, True):
        for rank, per_case in enumerate(ranks):
            got = per_case[compiled]
            for k, p in copies[0].named_parameters():
                close(got["grads"][k], grads[k], f"compiled={compiled} {k}")
                close(got["params"][k], p.detach(), f"compiled={compiled} {k}")
            assert_same_states(got["states"], copies[rank])
            assert got["graphs"] > 0 if compiled else got["graphs"] == 0, (compiled, got["graphs"])


def _dtensor_rank() -> dict:
    """One rank of :func:`test_dtensor_batches_get_torchs_answer`: torch's BatchNorm2d and
    bnlab's, their parameters and buffers replicated over a two-rank mesh, one training step
    and one eval step on a batch sharded over the ranks (each rank holds half), bnlab's also
    under ``torch.compile`` in both forms; and torch's layer on the whole batch as plain
    tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))

    def replicate(name, module, mesh):
        for n, p in list(module.named_parameters(recurse=False)):
            p = distribute_tensor(p.detach(), mesh, [Replicate()])
            module.register_parameter(n, nn.Parameter(p))
        for n, b in list(module.named_buffers(recurse=False)):
            module.register_buffer(n, distribute_tensor(b, mesh, [Replicate()]))

    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 2 + 1
    dy = torch.randn(8, 4, 5, 5)
    out = {}
    for name in ("torch", "bnlab", "bnlab compiled ops", "bnlab compiled decompose",
                 "whole batch"):  # fmt: skip
        layer = bnlab.BatchNorm2d(4) if name.startswith("bnlab") else nn.BatchNorm2d(4)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 4))
        if name != "whole batch":  # (torch's layer on the plain tensors: the oracle)
            distribute_module(layer, mesh, replicate)
        run, form = layer, "auto"
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        if "compiled" in name:
            run, form = torch.compile(layer, backend=counter), name.rsplit(" ", 1)[1]
        full = (lambda t: t) if name == "whole batch" else (lambda t: t.full_tensor())
        got = []
        for mode in MODES:
            layer.train(mode == "train")
            layer.zero_grad(set_to_none=True)
            xs, dys = x.clone(), dy
            if name != "whole batch":
                xs, dys = (distribute_tensor(t, mesh, [Shard(0)]) for t in (x, dy))
            xs.requires_grad_()
            with bnlab.ops.compile_form(form):
                y = run(xs)
            y.backward(dys)
            got += [full(y.detach()), full(xs.grad), full(layer.weight.grad),
                    full(layer.bias.grad), *(full(b) for b in layer.buffers())]  # fmt: skip
        assert counter.frame_count == (len(MODES) if "compiled" in name else 0), name
        out[name] = got
    return out


def test_dtensor_batches_get_torchs_answer():
    """A batch sharded over two processes as a ``DTensor`` (parameters and running statistics
    replicated with ``distribute_module``): bnlab's layer gives torch's answer on the same
    DTensor and on the whole batch as one plain tensor (statistics of the whole batch), in
    training and eval mode: output, input and parameter gradients, running statistics and
    count; also compiled (the ``"ops"`` form too: a DTensor knows torch's operators, not
    bnlab's, so its BN is traced as standard ops, and the non-finite check asserts on the
    local flag). bnlab's BN takes the DTensor's standard ops, which it knows how to
    distribute, not the kernels."""
    from bnlab.distributed import launch

    for got in launch(_dtensor_rank, 2, timeout=300):
        for ours in ("bnlab", "bnlab compiled ops", "bnlab compiled decompose"):
            for oracle in ("torch", "whole batch"):
                for a, b in zip(got[ours], got[oracle], strict=True):
                    close(a, b, f"{ours} against {oracle}")


class _Sequence(nn.Module):
    """BatchNorm1d with the fused ReLU on a transposed (N, L, C) sequence, as sequence models
    call it (bnlab's eager path runs on its rows)."""

    def __init__(self):
        super().__init__()
        self.bn = bnlab.BatchNorm1d(6, activation="relu")

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


COMPILED_AUTOGRAD_CASES = [("cnn", "train"), ("cnn", "eval"), ("cnn-fused-relu", "train"),
                           ("sequence", "train")]  # fmt: skip


@pytest.mark.parametrize("name,mode", COMPILED_AUTOGRAD_CASES,
                         ids=["-".join(c) for c in COMPILED_AUTOGRAD_CASES])  # fmt: skip
def test_compiled_autograd_traces_the_eager_layers_backward(name, mode):
    """Compiled autograd with the forward left eager: Dynamo traces the backward of bnlab's
    eager autograd Functions, which then take the section 3 gradients in standard ops instead
    of calling the kernels, so the whole backward is one graph (fullgraph=True), with eager's
    gradients and statistics over two steps (the second reuses the graph)."""
    if name == "sequence":
        torch.manual_seed(0)
        model = _Sequence().train(mode == "train")
        x1, x2 = torch.randn(4, 7, 6) * 2 + 0.5, torch.randn(4, 7, 6)
    else:
        model, x1, x2 = build(name, mode)
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    for x in (x1, x2):
        with torch._dynamo.compiled_autograd._enable(
            torch.compile(backend=counter, fullgraph=True)
        ):
            got = step(model, x)
        assert_same_step(got, step(ref, x))
        assert_same_states(model, ref)
    assert counter.frame_count == 1


FRESH_PROCESS = r"""
import copy, torch, bnlab
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                    nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
net = bnlab.convert(net)
worst = 0.0
for form in ("ops", "decompose"):  # ops: Numba runs inside the compiled graph, never in tracing
    bnlab.ops.set_compile_form(form)
    model, ref = copy.deepcopy(net), copy.deepcopy(net)
    compiled = torch.compile(model, fullgraph=True)  # Inductor, before any eager bnlab call
    for _ in range(2):  # training (eval adds Inductor time, not coverage: see the other tests)
        x = torch.randn(4, 3, 8, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), ref(xb)
        ya.square().sum().backward(); yb.square().sum().backward()
        worst = max(worst, (ya - yb).abs().max().item(), (xa.grad - xb.grad).abs().max().item(),
                    (model[1].running_var - ref[1].running_var).abs().max().item())
    assert int(model[1].num_batches_tracked) == int(ref[1].num_batches_tracked) == 2
print("WORST", worst)
"""


def test_compile_in_a_fresh_process_with_inductor():
    """The issue's failure: torch.compile before bnlab's first eager call (Numba must not be
    reached while tracing). A new interpreter compiles the CNN with Inductor, with bnlab's
    operators and with its standard-op form, and trains two steps; everything matches eager."""
    src = str(Path(bnlab.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_inductor_hands_the_operators_its_own_layout(mode):
    """Inductor runs a contiguous model's convolutions channels_last; bnlab's operators take
    any dense layout (their outputs and dx follow x's), so they get the convolutions' outputs as
    they are: no generated kernel comes from an operator (one would be a layout copy of its
    input or output, as bnlab's operators are opaque to Inductor), and the step is eager's."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), bnlab.BatchNorm2d(8, activation="relu"),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), bnlab.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).train(mode == "train")  # fmt: skip
    ref = copy.deepcopy(net)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    with bnlab.ops.compile_form("ops"), inductor_config.patch(fx_graph_cache=False):
        got, code = run_and_get_code(step, compiled, x)
    assert_same_step(got, step(ref, x))
    assert_same_states(net, ref)
    text = "\n".join(code)
    assert "torch.ops.bnlab.batch_norm_" in text
    copies = re.findall(r"cpp_fused\w*(?:batch_norm_train|batch_norm_eval|batch_norm_backward"
                        r"|commit_stats)\w*", text)  # fmt: skip
    assert not copies, sorted(set(copies))


@pytest.mark.parametrize("form", ["ops", "decompose"])
def test_compiled_layer_refuses_a_non_finite_batch_and_keeps_its_state(form):
    """The operators raise FloatingPointError; the decomposition fails an assertion inside the
    compiled graph (RuntimeError); both name the layer's class and size (not its name, see
    test_regional_compilation_compiles_a_block_once_per_shape) and leave the statistics
    unchanged."""
    torch._dynamo.reset()
    bn = bnlab.BatchNorm2d(3)
    bn.layer_name = "features.bn"
    compiled = torch.compile(bn, backend="aot_eager", fullgraph=True)
    with bnlab.ops.compile_form(form):
        compiled(torch.randn(4, 3, 5, 5))
        before = bn_states(bn)
        bad = torch.randn(4, 3, 5, 5)
        bad[1, 2, 0, 0] = float("nan")
        error = FloatingPointError if form == "ops" else RuntimeError
        unnamed = r"^BatchNorm2d\(3\) \(names stay out of compiled graphs\): non-finite"
        with pytest.raises(error, match=unnamed):
            compiled(bad)
    assert_same_states(bn_states(bn), before)


@pytest.mark.parametrize("form", ["ops", "decompose"])
def test_regional_compilation_compiles_a_block_once_per_shape(form):
    """Each residual block of a ResNet-20 compiled as a region (``block.compile()``, the code
    of BasicBlock.forward traced per block): as many compiled frames as with torch's BN (one
    per input shape and stride, reused by the other blocks; the names ``name_layers`` gives
    the layers stay out of the graphs), and eager's outputs, gradients and statistics."""
    from bnlab.models.resnet import BasicBlock

    frames = {}
    for which in ("torch", "bnlab"):
        torch._dynamo.reset()
        model, x1, _ = build("resnet20", "train")
        if which == "torch":
            model = bnlab.convert(model, to="torch")
        ref = copy.deepcopy(model)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        for m in model.modules():
            if isinstance(m, BasicBlock):
                m.compile(backend=counter)
        outputs = []
        with bnlab.ops.compile_form(form):
            for mdl in (model, ref):
                y = mdl(x1)
                (y.square().sum() + y.sum()).backward()
                outputs.append(y.detach())
        frames[which] = counter.frame_count
        close(outputs[0], outputs[1])
        grads = dict(ref.named_parameters())
        for k, p in model.named_parameters():
            close(p.grad, grads[k].grad, k)
        assert_same_states(model, ref)
    assert frames["bnlab"] == frames["torch"], frames


class _Block(nn.Module):
    """Conv, BN, ReLU and a residual addition: a region to compile once for many layers."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = norm

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


REGIONAL_VARIANTS = {
    "renorm": lambda: bnlab.BatchRenorm2d(4),
    "ghost": lambda: bnlab.GhostBatchNorm2d(4, virtual_batch_size=2),
    "sync": lambda: bnlab.SyncBatchNorm(4),
    "autocast": lambda: bnlab.BatchNorm2d(4),
}


@pytest.mark.parametrize("variant", list(REGIONAL_VARIANTS))
def test_regional_compilation_of_the_variants(variant):
    """Ten named blocks, each compiled as a region: the variants (and bfloat16 autocast, whose
    mixed dtypes take another check) compile as often as torch's BatchNorm2d does in the same
    blocks, with eager's gradients and statistics."""
    frames = {}
    makers = (("torch", lambda: nn.BatchNorm2d(4)), ("bnlab", REGIONAL_VARIANTS[variant]))
    for which, make in makers:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = bnlab.name_layers(nn.Sequential(*[_Block(make()) for _ in range(10)]))
        ref = copy.deepcopy(model)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        for block in model:
            block.compile(backend=counter)
        x = torch.randn(4, 4, 6, 6)
        cast = torch.autocast("cpu", torch.bfloat16, enabled=variant == "autocast")
        for m in (model, ref):
            with cast:
                y = m(x)
            y.float().square().sum().backward()
        frames[which] = counter.frame_count
        # (to the largest gradient's scale: a convolution's bias before BN has a gradient of
        # zero, which each side computes as rounding noise)
        grads = dict(ref.named_parameters())
        scale = max(g.grad.abs().max().item() for g in grads.values())
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[k].grad, rtol=0, atol=1e-5 * scale, msg=k)
        assert_same_states(model, ref)
    assert frames["bnlab"] == frames["torch"], frames


def test_auto_compile_form_decomposes_every_input():
    """"auto" (the default) traces every input as standard ops, small or large, contiguous or
    channels_last (the inputs a size rule would tell apart), and every case gives eager's
    step."""
    assert bnlab.get_compile_form() == "auto"
    large = (1, 4, 128, 4100)  # (2.1M values: a large layer)
    cases = (((4, 4, 8, 8), True), (large, False), (large, True))
    for shape, channels_last in cases:
        torch._dynamo.reset()
        bn = bnlab.BatchNorm2d(4)
        ref = copy.deepcopy(bn)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(bn, backend=counter, fullgraph=True)
        x = torch.randn(shape) * 2 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert_same_step(step(compiled, x), step(ref, x))
        assert_same_states(bn, ref)
        assert not bnlab_op_targets(counter.graphs[0].graph), (shape, channels_last)


INDUCTOR_FORM_CASES = [  # (layer, input shape, channels_last, mean of the input)
    ("bn2d", (4, 3, 5, 5), False, 0.5), ("bn2d-relu", (4, 3, 5, 5), True, 0.5),
    ("bn2d-noaffine", (4, 3, 5, 5), False, 0.5), ("bn2d-relu", (2, 3, 4, 4), False, 1e4),
    ("bn1d-relu", (6, 5), False, 0.5), ("bn1d", (3, 4, 7), False, 0.5),
]  # fmt: skip


INDUCTOR_FORM_IDS = [f"{c[0]}-{c[3]:g}{'-cl' * c[2]}" for c in INDUCTOR_FORM_CASES]


@pytest.mark.parametrize("case", INDUCTOR_FORM_CASES, ids=INDUCTOR_FORM_IDS)
def test_compiled_standard_op_form_matches_float64_autograd(case):
    """Under torch.compile the standard-op form has its own statistics (one Welford reduction
    of the shifted values) and its backward written out (bnlab.ops.graph_train). Its output,
    input and parameter gradients and running statistics match float64 autograd through
    torch's BatchNorm [+ ReLU], including an input with mean 1e4 and std 1 (a float32 E[x^2] -
    E[x]^2 loses every digit of the variance there), and the graph holds that form: a var_mean
    and no bnlab operator."""
    name, shape, channels_last, mean = case
    torch.manual_seed(0)
    c = shape[1]
    cls = bnlab.BatchNorm1d if name.startswith("bn1d") else bnlab.BatchNorm2d
    kw = dict(affine=not name.endswith("noaffine"), activation="relu" if "relu" in name else None)
    bn = cls(c, **kw)
    ref = (nn.BatchNorm1d if cls is bnlab.BatchNorm1d else nn.BatchNorm2d)(c, affine=kw["affine"])
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    ref.load_state_dict(bn.state_dict())
    ref = ref.double()
    x = torch.randn(shape) + mean
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(bn, backend=counter, fullgraph=True)
    with bnlab.ops.compile_form("decompose"):
        xa = x.clone().requires_grad_()
        ya = compiled(xa)
    ya.backward(dy)
    xb = x.double().requires_grad_()
    yb = ref(xb)
    if kw["activation"]:
        yb = torch.relu(yb)
    yb.backward(dy.double())
    assert ya.is_contiguous(memory_format=torch.channels_last) == channels_last
    close(ya, yb.float())
    close(xa.grad, xb.grad.float())
    for p, q in zip(bn.parameters(), ref.parameters(), strict=True):
        close(p.grad, q.grad.float())
    close(bn.running_mean, ref.running_mean.float())
    close(bn.running_var, ref.running_var.float())
    assert int(bn.num_batches_tracked) == 1
    gm = counter.graphs[0]
    targets = [str(n.target) for g in gm.modules() for n in g.graph.nodes]
    assert any("var_mean" in t for t in targets) and not any("bnlab" in t for t in targets)


def test_compile_form_is_checked_and_restored():
    with pytest.raises(ValueError, match="compile form must be one of auto, ops, decompose"):
        bnlab.set_compile_form("inductor")
    with pytest.raises(KeyError), bnlab.compile_form("ops"):
        assert bnlab.get_compile_form() == "ops"
        raise KeyError
    assert bnlab.get_compile_form() == "auto"


# ----------------------------------------------------------------------------- torch.export
EXPORT_CASES = [("cnn", "train"), ("cnn", "eval"), ("resnet20-fused-relu", "train"),
                ("resnet20-fused-relu", "eval"), ("resnet18", "eval")]  # fmt: skip


@pytest.mark.parametrize("name,mode", EXPORT_CASES, ids=["-".join(c) for c in EXPORT_CASES])
def test_export_standard_ops_match_eager(name, mode):
    """torch.export captures bnlab's BN as standard ops (no bnlab operator: the program runs
    anywhere torch's export runs); the exported module gives eager's outputs and, in training,
    updates the running statistics as eager does."""
    model, x1, x2 = build(name, mode)
    ref = copy.deepcopy(model)
    ep = torch.export.export(model, (x1,))
    assert not bnlab_op_targets(ep.graph)
    exported = ep.module()
    for x in (x1, x2):
        torch.testing.assert_close(exported(x), ref(x), **TOL)
    assert_same_states(exported, ref)
    decomposed = ep.run_decompositions().module()
    torch.testing.assert_close(decomposed(x2), copy.deepcopy(ref)(x2), **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_export_with_a_dynamic_batch_matches_eager(mode):
    """Exported with a symbolic batch dimension (``torch.export.Dim``), the program takes batches
    of other sizes and gives eager's outputs and, in training, eager's running statistics (the
    unbiased variance's factor m/(m-1) follows the batch it is given)."""
    model, x1, _ = build("cnn", mode)
    ref = copy.deepcopy(model)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (x1,), dynamic_shapes=({0: batch},))
    exported = ep.module()
    for n in (3, 7):
        x = torch.randn(n, *x1.shape[1:]) * 1.5 + 0.3
        torch.testing.assert_close(exported(x), ref(x), **TOL)
        assert_same_states(exported, ref)


def test_aot_inductor_package_runs_as_eager(tmp_path):
    """An eval model exported with a symbolic batch, compiled ahead of time by AOTInductor into
    a package and loaded back, gives eager's outputs on a batch of another size (standard ops
    only: the package runs without bnlab)."""
    model, x1, _ = build("cnn", "eval")
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (x1,), dynamic_shapes=({0: batch},))
    assert not bnlab_op_targets(ep.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own deprecation notices while packaging)
        # (no precompiled header: one package compiles each header once either way)
        with torch._inductor.config.patch({"aot_inductor.precompile_headers": False}):
            package = str(tmp_path / "cnn.pt2")
            path = torch._inductor.aoti_compile_and_package(ep, package_path=package)
        loaded = torch._inductor.aoti_load_package(path)
    x = torch.randn(7, *x1.shape[1:]) * 1.5 + 0.3
    torch.testing.assert_close(loaded(x), model(x).detach(), **TOL)


def test_exported_training_program_refuses_non_finite_batch():
    model, x1, _ = build("cnn", "train")
    exported = torch.export.export(model, (x1,)).module()
    before = bn_states(exported)
    bad = x1.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"'1' BatchNorm2d\(8\): non-finite"):
        exported(bad)
    assert_same_states(bn_states(exported), before)


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("name", ["cnn", "resnet20-fused-relu"])
def test_onnx_export_runs_in_onnxruntime(name, dynamo):
    """An eval model exported by either exporter has real inputs (not constants folded from the
    example) and onnxruntime computes eager's numbers on a new input."""
    pytest.importorskip("onnx", reason="onnx is a dev extra (pip install -e '.[dev]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev extra")
    if dynamo:
        pytest.importorskip("onnxscript", reason="onnxscript is a dev extra")
    model, x1, x2 = build(name, "eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            data = torch.onnx.export(model, (x1,), dynamo=True, verbose=False)
            data = data.model_proto.SerializeToString()
        else:
            buf = io.BytesIO()
            torch.onnx.export(model, (x1,), buf, dynamo=False, input_names=["x"])
            data = buf.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.run(None, {inp.name: x2.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x2).detach(), **TOL)


# ----------------------------------------------------------------------------- jit.trace
TRACE_CASES = [("cnn", mode, grad) for mode in MODES for grad in ("grad", "no_grad")]
TRACE_CASES += [("resnet20-fused-relu", "train", "grad"),
                ("resnet20-fused-relu", "eval", "no_grad")]


@pytest.mark.parametrize("name,mode,grad", TRACE_CASES, ids=["-".join(c) for c in TRACE_CASES])
def test_jit_trace_saved_and_loaded_matches_eager(name, mode, grad, tmp_path):
    """Traced (with or without grad), saved and loaded: the module computes eager's outputs on
    a new input, its gradients, and in training mode updates its running statistics as eager
    (the trace itself ran one training step, as the eager reference does here)."""
    model, x1, x2 = build(name, mode)
    ref = copy.deepcopy(model)
    with torch.set_grad_enabled(grad == "grad"), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x1, check_trace=False)
    ref(x1)
    torch.jit.save(traced, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    assert_same_step(step(loaded, x2), step(ref, x2))
    assert_same_states(bn_states(loaded), bn_states(ref))


def test_traced_training_module_leaves_statistics_unchanged_on_a_non_finite_batch():
    """A trace has no control flow, so it cannot raise; it still never writes non-finite
    statistics (the update is masked by the finiteness flag)."""
    model, x1, x2 = build("cnn", "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x1, check_trace=False)
    before = bn_states(traced)
    bad = x2.clone()
    bad[1, 2, 3, 4] = float("nan")
    traced(bad)
    assert_same_states(bn_states(traced), before)


# ----------------------------------------------------------------------------- jit.script
LAYER_CASES = {
    "1d-dense": (bnlab.BatchNorm1d, (8, 5), {}),
    "1d-seq": (bnlab.BatchNorm1d, (4, 5, 7), {"momentum": None}),
    "2d-relu": (bnlab.BatchNorm2d, (4, 5, 3, 3), {"activation": "relu"}),
    "3d": (bnlab.BatchNorm3d, (2, 5, 2, 3, 3), {"affine": False}),
    "2d-notrack": (bnlab.BatchNorm2d, (4, 5, 3, 3), {"track_running_stats": False}),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_jit_script_layers_match_eager(case, tmp_path):
    cls, shape, kwargs = LAYER_CASES[case]
    layer = cls(shape[1], **kwargs)
    ref = copy.deepcopy(layer)
    scripted = torch.jit.script(layer)
    torch.jit.save(scripted, tmp_path / "l.pt")
    scripted = torch.jit.load(tmp_path / "l.pt")
    for mode in MODES * 2:
        scripted.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(shape) * 2 + 1
        assert_same_step(step(scripted, x), step(ref, x))
        assert_same_states(bn_states(scripted), bn_states(ref))


def test_jit_script_frozen_layer_and_non_finite_refusal():
    layer = bnlab.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2) + 3)
    bnlab.freeze(layer)
    ref = copy.deepcopy(layer)
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(scripted(x), ref(x), **TOL)  # train mode, population statistics
    unfrozen = torch.jit.script(bnlab.unfreeze(copy.deepcopy(layer)))
    before = bn_states(unfrozen)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(torch.jit.Error, match="FloatingPointError.*non-finite"):
        unfrozen(x)
    assert_same_states(bn_states(unfrozen), before)


_RENORM = {"rmax": 2.0, "dmax": 1.0, "warmup_steps": 0, "rmax_steps": 2, "dmax_steps": 2}
VARIANT_CASES = {
    "renorm-1d-dense": (bnlab.BatchRenorm1d, (10, 5), _RENORM),
    "renorm-1d-seq-relu": (bnlab.BatchRenorm1d, (10, 5, 3), {**_RENORM, "activation": "relu"}),
    "renorm-2d-cl-noaffine": (bnlab.BatchRenorm2d, (10, 5, 3, 3), {**_RENORM, "affine": False}),
    "renorm-3d-notrack": (bnlab.BatchRenorm3d, (10, 5, 2, 2, 3), {"track_running_stats": False}),
    "ghost-1d-dense": (bnlab.GhostBatchNorm1d, (10, 5), {"virtual_batch_size": 4}),
    "ghost-1d-seq-relu": (bnlab.GhostBatchNorm1d, (10, 5, 3),
                          {"virtual_batch_size": 4, "activation": "relu", "momentum": None}),
    "ghost-2d-cl-noaffine": (bnlab.GhostBatchNorm2d, (10, 5, 3, 3),
                             {"virtual_batch_size": 3, "affine": False}),
    "ghost-3d-notrack": (bnlab.GhostBatchNorm3d, (10, 5, 2, 2, 3),
                         {"virtual_batch_size": 4, "track_running_stats": False}),
}  # fmt: skip


@pytest.mark.parametrize("tool", ["script", "fx"])
@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_variants_under_script_and_fx_match_eager(case, tool):
    """BatchRenorm and GhostBatchNorm (ghost batches of two sizes; the correction of renorm
    active) scripted or symbolically traced in training: eager's outputs, gradients, strides
    and state (the renorm step and the counters included) at each of three steps; then
    eager's inference output (an fx graph is of the mode it was traced in: traced again). In
    float64, where TorchScript's standard ops and the kernels round alike to 1e-5."""
    cls, shape, kwargs = VARIANT_CASES[case]
    torch.manual_seed(0)
    layer = cls(shape[1], **kwargs, dtype=torch.float64)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    ref = copy.deepcopy(layer)
    run = torch.jit.script(layer) if tool == "script" else torch.fx.symbolic_trace(layer)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        if "-cl" in case:
            x = x.contiguous(memory_format=torch.channels_last)
        ours, theirs = step(run, x), step(ref, x)
        assert_same_step(ours, theirs)
        assert ours[0].stride() == theirs[0].stride()
        state, expected = run.state_dict(), ref.state_dict()
        assert state.keys() == expected.keys()
        for k in expected:
            close(state[k], expected[k], k)
    ref.eval()
    run = run.eval() if tool == "script" else torch.fx.symbolic_trace(layer.eval())
    x = torch.randn(shape, dtype=torch.float64)
    close(run(x), ref(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["resnet20-fused-relu", "cnn"])
def test_jit_script_models_match_eager(name, mode):
    model, x1, x2 = build(name, mode)
    ref = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    for x in (x1, x2):
        assert_same_step(step(scripted, x), step(ref, x))
    assert_same_states(bn_states(scripted), bn_states(ref))


def test_jit_freeze_runs_the_model_and_folds_after_bnlab_fold():
    """torch.jit.freeze + optimize_for_inference of a scripted inference model gives eager's
    outputs; it keeps bnlab's layers as batch-norm operators (their running statistics are
    written in place in training, so freezing keeps them as attributes, not constants it could
    fold), and a model folded by bnlab.fold first freezes with no batch norm left."""
    model, x1, x2 = build("cnn", "eval")
    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))
    for x in (x1, x2):
        close(frozen(x), model(x))
    folded = torch.jit.optimize_for_inference(
        torch.jit.freeze(torch.jit.script(bnlab.fold(model)))
    )
    assert "batch_norm" not in str(folded.graph)
    for x in (x1, x2):
        close(folded(x), model(x))


def test_jit_script_mlp():
    from bnlab.models.mlp import MLP

    model = MLP(20, (16, 16), 3, norm="batchnorm1d")
    ref = copy.deepcopy(model)
    scripted = torch.jit.script(model)
    x = torch.randn(8, 20)
    assert_same_step(step(scripted, x), step(ref, x))


# ----------------------------------------------------------------------------- torch.fx
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["cnn", "resnet20-fused-relu"])
def test_fx_symbolic_trace_calls_bnlab_ops_and_matches_eager(name, mode):
    model, x1, x2 = build(name, mode)
    ref = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    ops = bnlab_op_targets(gm.graph)
    assert ops == ({"bnlab.batch_norm_train", "bnlab.commit_stats"} if mode == "train"
                   else {"bnlab.batch_norm_eval"})  # fmt: skip
    for x in (x1, x2):
        assert_same_step(step(gm, x), step(ref, x))
    assert_same_states(bn_states(gm), bn_states(ref))


def test_fx_graph_with_bnlab_ops_decomposes_to_standard_ops():
    """bnlab.decompositions() turns a graph that calls bnlab's operators (fx-traced, then
    exported) into standard ops with the same outputs and state updates."""
    model, x1, x2 = build("cnn", "train")
    ref = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    ep = torch.export.export(gm, (x1,))
    assert bnlab_op_targets(ep.graph)
    table = torch.export.default_decompositions()
    table.update(bnlab.decompositions())
    decomposed = ep.run_decompositions(table)
    assert not bnlab_op_targets(decomposed.graph)
    module = decomposed.module()
    for x in (x1, x2):
        torch.testing.assert_close(module(x), ref(x), **TOL)
    assert_same_states(bn_states(module), bn_states(ref))


@pytest.mark.parametrize("fused_relu", [False, True], ids=["bn", "bn+relu"])
def test_fuse_modules_folds_bnlab_layers(fused_relu):
    """torch.ao.quantization.fuse_modules finds bnlab's classes (Conv+BN+ReLU, Conv+BN, and a
    BN with activation='relu', whose ReLU is kept); fuse_modules_qat builds torch's QAT
    modules around a torch BN sharing bnlab's parameters."""
    from torch.ao.quantization import fuse_modules, fuse_modules_qat

    model, _, x = build("cnn", "eval")
    if fused_relu:
        model[1].activation = "relu"
    fused = fuse_modules(model, [["0", "1", "2"], ["3", "4", "5"]])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), **TOL)
    two = fuse_modules(model, [["0", "1"]])  # without the explicit ReLU
    assert isinstance(two[0], torch.ao.nn.intrinsic.ConvReLU2d) == fused_relu
    torch.testing.assert_close(two(x), model(x), **TOL)
    qat = fuse_modules_qat(copy.deepcopy(model).train(), [["0", "1", "2"]])
    assert isinstance(qat[0], torch.ao.nn.intrinsic.ConvBnReLU2d)
    assert qat[0][1].weight is model[1].weight or torch.equal(qat[0][1].weight, model[1].weight)


def test_fx_quantization_runs_and_fuses_after_converting_to_torchs_layers():
    """torch.ao.quantization's fx flow: prepare_fx/convert_fx of a model with bnlab's layers
    runs and gives a model close to eager (8-bit quantization error); fx traces into bnlab's
    layers (not torch.nn modules) and its patterns match torch's classes, so the BN stays
    apart from its convolution. After bnlab.convert(model, to="torch") the flow fuses them:
    no batch norm is left in the quantized model and QAT preparation builds torch's
    Conv+BN+ReLU modules."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

    model, x1, x2 = build("cnn", "eval")
    for m in (model, bnlab.convert(copy.deepcopy(model), to="torch")):
        prepared = prepare_fx(copy.deepcopy(m), get_default_qconfig_mapping("x86"), (x1,))
        prepared(x1)
        prepared(x2)
        quantized = convert_fx(prepared)
        scale = model(x2).abs().max()
        assert (quantized(x2) - model(x2)).abs().max() < 0.05 * scale
        bns = [n for n in quantized.graph.nodes if "batch_norm" in str(n.target)]
        assert bool(bns) == (m is model)
    qat = prepare_qat_fx(bnlab.convert(copy.deepcopy(model), to="torch").train(),
                         get_default_qat_qconfig_mapping("x86"), (x1,))  # fmt: skip
    assert any(isinstance(m, torch.ao.nn.intrinsic.qat.ConvBnReLU2d) for m in qat.modules())


def test_fuse_modules_qat_refuses_a_frozen_layer():
    from torch.ao.quantization import fuse_modules_qat

    model, _, _ = build("cnn", "train")
    bnlab.freeze(model)
    with pytest.raises(ValueError, match=r"frozen"):
        fuse_modules_qat(model, [["0", "1", "2"]])


# ----------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("mode", ["train-no-tracking", "train-frozen", "eval"])
def test_func_grad_matches_autograd(mode):
    model, x1, _ = build("cnn", "eval" if mode == "eval" else "train")
    if mode == "train-no-tracking":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
    if mode == "train-frozen":
        bnlab.freeze(model, params=False)
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())

    def loss(p, x):
        y = torch.func.functional_call(model, p, (x,))
        return y.square().sum() + y.sum()

    grads = torch.func.grad(loss)(params, x1)
    _, _, ref_grads = step(ref, x1)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], **TOL, msg=k)
    assert_same_states(model, ref)


@pytest.mark.parametrize("mode", ["train-no-tracking", "eval"])
def test_vmap_matches_a_loop(mode):
    model, _, _ = build("cnn", "eval" if mode == "eval" else "train")
    if mode == "train-no-tracking":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
    xs = torch.randn(3, 4, 3, 8, 8)
    out = torch.vmap(model)(xs)
    torch.testing.assert_close(out, torch.stack([model(x) for x in xs]), **TOL)


BATCHED_GRAD_CALLS = {
    "layer": lambda layer, x: layer(x),
    "function": lambda layer, x: _then_relu(layer, bnlab.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.training
    )),
}


def _then_relu(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The function has no fused ReLU: the layer's activation applied after it."""
    return torch.relu(y) if layer.activation == "relu" else y


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
@pytest.mark.parametrize("call", list(BATCHED_GRAD_CALLS))
@pytest.mark.parametrize("mode", MODES)
def test_batched_gradients_match_torch(mode, call, relu, backend):
    """A batch of gradients through one backward (``autograd.grad(is_grads_batched=True)``,
    the vectorized ``torch.autograd.functional.jacobian`` and ``hessian``, which vmap the
    backward: the gradient has no memory of its own) through bnlab's eager layer and function
    equals the same through torch's (its BN followed by ReLU for the fused one), on both
    backends: the Functions take these gradients in standard ops."""
    from torch.autograd.functional import hessian, jacobian

    torch.manual_seed(0)
    ours = bnlab.BatchNorm2d(3, activation="relu" if relu else None)
    theirs = nn.BatchNorm2d(3)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5), theirs.bias.uniform_(-1, 1)
        theirs.running_mean.normal_(), theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    for layer in (ours, theirs):
        layer.train(mode == "train")
    f = functools.partial(BATCHED_GRAD_CALLS[call], ours)
    g = nn.Sequential(theirs, nn.ReLU()) if relu else theirs
    x = torch.randn(2, 3, 2, 2) * 2 + 1
    for kind in ("grads", "jacobian", "hessian"):
        got = []
        for fn in (f, g):
            if kind == "grads":
                xx = x.clone().requires_grad_()
                y = fn(xx)
                v = torch.randn(4, *y.shape, generator=torch.Generator().manual_seed(1))
                got.append(torch.autograd.grad(y, xx, v, is_grads_batched=True)[0])
            elif kind == "jacobian":
                got.append(jacobian(fn, x, vectorize=True))
            else:
                got.append(hessian(lambda t, fn=fn: fn(t).square().sum(), x, vectorize=True))
        close(*got, kind)


def test_func_transforms_refuse_running_stat_updates_as_torch_does():
    """In training mode with running statistics, torch's BatchNorm refuses both transforms
    (vmap: per-sample statistics; grad: a write into a captured buffer); bnlab refuses the same
    calls, naming the layer, and leaves the statistics unchanged."""
    ours = bnlab.BatchNorm2d(3)
    theirs = nn.BatchNorm2d(3)
    xs = torch.randn(2, 4, 3, 5, 5)
    for layer in (ours, theirs):
        with pytest.raises(RuntimeError):  # (torch's class; bnlab's is a ValueError too)
            torch.vmap(layer)(xs)
        params = dict(layer.named_parameters())

        def loss(p, layer=layer):
            return torch.func.functional_call(layer, p, (xs[0],)).sum()

        with pytest.raises(RuntimeError):
            torch.func.grad(loss)(params)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): running statistics.*vmap"):
        torch.vmap(ours)(xs)
    with pytest.raises(RuntimeError, match=r"BatchNorm2d\(3\): cannot update running"):
        torch.func.grad(lambda p: torch.func.functional_call(ours, p, (xs[0],)).sum())(
            dict(ours.named_parameters())
        )
    assert ours.num_batches_tracked.item() == 0
    assert torch.equal(ours.running_mean, torch.zeros(3))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3, 3)])
def test_a_tensor_kept_from_inside_a_transform_runs_as_through_torch(mode, shape):
    """A tensor kept from inside ``torch.func.grad`` once the transform has exited (a dead
    functorch wrapper) is taken by torch's layer as a plain tensor; bnlab's gives the same
    output, gradients and running statistics (its short eager paths unwrap it, as
    ``autograd.Function.apply`` does)."""
    kept = []

    def f(x):
        kept.append(x)
        return x.square().sum()

    torch.func.grad(f)(torch.randn(shape, dtype=torch.float64) * 2 + 1)
    x = kept[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(x)  # (the case under test)
    cls = (
        (bnlab.BatchNorm1d, nn.BatchNorm1d)
        if len(shape) == 2
        else (bnlab.BatchNorm2d, nn.BatchNorm2d)
    )
    ours, theirs = cls[0](5).double(), cls[1](5).double()
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.copy_(torch.linspace(-1, 1, 5))
            layer.train(mode == "train")
    dy = torch.randn(shape, dtype=torch.float64)
    y1, y2 = ours(x), theirs(x)
    torch.testing.assert_close(y1, y2)
    y1.backward(dy)
    y2.backward(dy)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))


# ----------------------------------------------------------------------------- meta, double bwd
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["cnn", "resnet20-fused-relu"])
def test_meta_device(name, mode):
    model, x1, _ = build(name, mode)
    ref = bnlab.convert(copy.deepcopy(model).to("meta"), to="torch") if name == "cnn" else None
    meta = model.to("meta")
    y = meta(x1.to("meta"))
    assert y.is_meta and y.shape == (x1.shape[0], 4)
    y.sum().backward()
    if ref is not None:  # the same shapes as torch's layers on the meta device
        assert ref(x1.to("meta")).shape == y.shape


# ----------------------------------------------------------- dispatch modes, tensor subclasses
def _step_fn(model: nn.Module):
    """``x -> (y, dx, *parameter gradients)`` of :func:`step`'s loss, as one function that
    ``make_fx`` traces forward and backward."""
    params = list(model.parameters())

    def f(x):
        x = x.detach().requires_grad_()
        y = model(x)
        return (y, *torch.autograd.grad(y.square().sum() + y.sum(), [x, *params]))

    return f


MAKE_FX_CASES = [("cnn", "train"), ("cnn", "eval"), ("cnn-fused-relu", "train")]


@pytest.mark.parametrize("name,mode", MAKE_FX_CASES, ids=["-".join(c) for c in MAKE_FX_CASES])
def test_make_fx_records_bnlabs_operators_and_decomposes(name, mode):
    """``make_fx`` (the tracer under AOTAutograd and torch.export) records bnlab's operators,
    forward and backward; with ``bnlab.decompositions()`` as its table, standard ops alone. Each
    graph, run on a new input, gives the eager model's output, gradients and running
    statistics (its buffers are the traced module's)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model, x1, x2 = build(name, mode)
    train_ops = {"bnlab.batch_norm_train", "bnlab.commit_stats", "bnlab.batch_norm_backward"}
    expected = train_ops if mode == "train" else {"bnlab.batch_norm_eval",
                                                  "bnlab.batch_norm_backward"}  # fmt: skip
    for table, ops in ((None, expected), (bnlab.decompositions(), set())):
        traced, ref = copy.deepcopy(model), copy.deepcopy(model)
        gm = make_fx(_step_fn(traced), decomposition_table=table)(x1)
        _step_fn(ref)(x1)  # (tracing ran the step once on real tensors)
        assert {t.removesuffix(".default") for t in bnlab_op_targets(gm.graph)} == ops
        for a, b in zip(gm(x2), _step_fn(ref)(x2), strict=True):
            close(a, b)
        assert_same_states(traced, ref)


@pytest.mark.parametrize("mode", MODES)
def test_functionalize_matches_eager(mode):
    """``torch.func.functionalize`` of a model (and ``make_fx`` of it, the graph torch's
    functional tools build) gives the eager output and writes the running statistics as the
    eager step does, as torch's layers do under it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model, x1, x2 = build("cnn", mode)
    ref = copy.deepcopy(model)
    close(torch.func.functionalize(model)(x1), ref(x1))
    assert_same_states(model, ref)
    gm = make_fx(torch.func.functionalize(model))(x1)
    ref(x1)
    close(gm(x2), ref(x2))
    assert_same_states(model, ref)


def _fake_model(name: str, mode: str, channels_last: bool):
    """Steps of bnlab's model and of torch's twin (``bnlab.convert``; of the model without the
    fused ReLU, which torch's layers lack) on fake copies, under one
    FakeTensorMode (``FakeCopyMode``: each tensor becomes a fake one of its shape and strides):
    outputs and gradients with shapes and strides, no values."""
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    model, x1, _ = build(name, mode)
    ref = bnlab.convert(build(name.removesuffix("-fused-relu"), mode)[0], to="torch")
    fake_mode = FakeTensorMode()
    with FakeCopyMode(fake_mode):
        models = copy.deepcopy((model, ref))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = fake_mode.from_tensor(x1.to(memory_format=fmt))
    with fake_mode:
        return [step(m, x) for m in models]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["cnn", "cnn-fused-relu"])
def test_fake_tensor_mode_gives_torchs_shapes_and_strides(name, mode, channels_last):
    """Under ``FakeTensorMode`` (shape propagation, memory estimation: tensors without values)
    a step of bnlab's model runs and gives fake tensors of the shapes, strides and dtypes of
    torch's BN's step."""
    from torch._subclasses.fake_tensor import FakeTensor

    ours, theirs = _fake_model(name, mode, channels_last)
    (y, gx, grads), (ry, rgx, rgrads) = ours, theirs
    pairs = ((y, ry), (gx, rgx), *zip(grads.values(), rgrads.values(), strict=True))
    for a, b in pairs:  # (parameters in module order: the fused model has no ReLU modules)
        assert isinstance(a, FakeTensor)
        assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)


MODE_LAYERS = {
    "bn": lambda: bnlab.BatchNorm2d(4),
    "bn+relu": lambda: bnlab.BatchNorm2d(4, activation="relu"),
    "renorm": lambda: bnlab.BatchRenorm2d(4),
    "ghost": lambda: bnlab.GhostBatchNorm2d(4, virtual_batch_size=2),
    "sync": lambda: bnlab.SyncBatchNorm(4),
    "lazy": lambda: bnlab.LazyBatchNorm2d(),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", list(MODE_LAYERS))
def test_a_dispatch_mode_sees_bnlabs_operators(layer, mode):
    """A ``TorchDispatchMode`` (what ``DebugMode``, ``FlopCounterMode``, memory trackers and
    selective checkpointing are built on) sees bnlab's BN as its operators, forward and
    backward, where the eager kernels would run unseen; the step gives the output, gradients
    and running statistics of the same step outside the mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MODE_LAYERS[layer]())
    model(torch.randn(4, 3, 6, 6) * 2 + 1)  # (sizes the lazy layer)
    model.train(mode == "train")
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6) * 2 + 1
    with RecordingMode() as recorder:
        ours = step(model, x)
    assert_same_step(ours, step(ref, x))
    assert_same_states(model, ref)
    forward = "bnlab.batch_norm_train" if mode == "train" else "bnlab.batch_norm_eval"
    assert {forward, "bnlab.batch_norm_backward"} <= recorder.seen


def test_double_backward_through_a_model_matches_torch():
    """A gradient penalty (the gradient of a gradient) through bnlab's BN equals the same
    computation through torch's BN, in training and eval mode."""
    for mode in MODES:
        model, x1, _ = build("cnn", mode)
        ref = bnlab.convert(copy.deepcopy(model), to="torch")
        results = []
        for m in (model, ref):
            x = x1.clone().requires_grad_()
            (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
            penalty = gx.square().sum()
            grads = torch.autograd.grad(penalty, [x, *m.parameters()])
            results.append((penalty, grads))
        torch.testing.assert_close(results[0][0], results[1][0], **TOL)
        for a, b in zip(results[0][1], results[1][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_tools_take_a_weight_and_bias_of_another_shape(mode):
    """A (C, 1) weight and (1, C) bias (C values in another shape, which torch's layers read):
    torch.compile, export, jit.script, jit.trace, fx, torch.func.grad and the meta device give
    the eager layer's output, and the gradients come back in the parameters' shapes."""
    torch.manual_seed(0)
    base = bnlab.BatchNorm2d(8, track_running_stats=mode == "eval")
    with torch.no_grad():
        base.weight.uniform_(0.5, 2), base.bias.normal_()
        if mode == "eval":
            base.running_mean.normal_(), base.running_var.uniform_(0.5, 2)
    base.weight.data = base.weight.data.view(8, 1)
    base.bias.data = base.bias.data.view(1, 8)
    base.train(mode == "train")
    x = torch.randn(4, 8, 5, 5)
    want = copy.deepcopy(base)(x)

    def fresh():
        return copy.deepcopy(base)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = {
            "compile": torch.compile(fresh(), backend="aot_eager", fullgraph=True)(x),
            "export": torch.export.export(fresh(), (x,)).module()(x),
            "script": torch.jit.script(fresh())(x),
            "trace": torch.jit.trace(fresh(), (x,))(x),
            "fx": torch.fx.symbolic_trace(fresh())(x),
        }
    for tool, y in outputs.items():
        close(y, want, tool)
    layer = fresh()
    params = dict(layer.named_parameters())
    grads = torch.func.grad(
        lambda p: torch.func.functional_call(layer, p, (x,)).square().sum()
    )(params)
    eager = fresh()
    eager(x).square().sum().backward()
    for name, p in eager.named_parameters():
        assert grads[name].shape == p.shape, name
        close(grads[name], p.grad, name)
    assert fresh().to("meta")(x.to("meta")).shape == x.shape


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpoint_recomputes_as_torch(reentrant, early_stop, backend):
    """``torch.utils.checkpoint`` around a model: outputs, gradients, running statistics and
    batch counts equal torch's, the recomputation counting the batch a second time as in
    torch, also where a non-reentrant recomputation stops once the last tensor for the
    backward is saved (its default early stop): bnlab's layers, like torch's, have accepted
    the batch's statistics before they save anything."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    model, x1, _ = build("cnn", "train")
    ref = bnlab.convert(copy.deepcopy(model), to="torch")
    before = [b.item() for b in model.buffers() if b.dtype == torch.int64]
    results = []
    for m in (model, ref):
        x = x1.clone().requires_grad_()
        with set_checkpoint_early_stop(early_stop):
            y = checkpoint(m, x, use_reentrant=reentrant)
        y.square().sum().backward()
        results.append([y, x.grad, *[p.grad for p in m.parameters()], *m.buffers()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    after = [b.item() for b in model.buffers() if b.dtype == torch.int64]
    assert before and after == [n + 2 for n in before]  # (forward and recomputation)


def test_selective_checkpoint_policy_saves_bnlabs_commit():
    """Selective activation checkpointing (a dispatch mode) sees bnlab's BN as its operators,
    so a policy can name them. Saving ``bnlab.commit_stats`` (with torch's layers,
    ``aten.native_batch_norm``) keeps the recomputation from updating the running statistics a
    second time: outputs, gradients and statistics equal torch's under its policy, and the
    statistics those of one eager step. bnlab counts the batch once; torch's layer counts it in
    Python, outside the saved operator, so its count doubles."""
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    saved = {"aten.native_batch_norm", "bnlab.commit_stats"}

    def policy(ctx, op, *args, **kwargs):
        name = str(getattr(op, "overloadpacket", op))
        return CheckpointPolicy.MUST_SAVE if name in saved else CheckpointPolicy.PREFER_RECOMPUTE

    context = functools.partial(create_selective_checkpoint_contexts, policy)
    model, x1, _ = build("cnn", "train")
    ref = bnlab.convert(copy.deepcopy(model), to="torch")
    once = copy.deepcopy(model)
    once(x1)
    before = [b.item() for b in model.buffers() if b.dtype == torch.int64]
    results = []
    for m in (model, ref):
        x = x1.clone().requires_grad_()
        y = checkpoint(m, x, use_reentrant=False, context_fn=context)
        y.square().sum().backward()
        results.append([y, x.grad, *[p.grad for p in m.parameters()]])
    for a, b in zip(*results, strict=True):
        close(a, b)
    assert_same_states(model, once)
    for a, b in zip(bn_states(model).values(), bn_states(ref).values(), strict=True):
        if a.dtype != torch.int64:
            close(a, b)
    assert [b.item() for b in ref.buffers() if b.dtype == torch.int64] == [n + 2 for n in before]


# ----------------------------------------------------------------------------- isinstance tools
def test_bnlab_layers_are_torch_batchnorm_layers():
    for ours, theirs in [(bnlab.BatchNorm1d, nn.BatchNorm1d), (bnlab.BatchNorm2d, nn.BatchNorm2d),
                         (bnlab.BatchNorm3d, nn.BatchNorm3d)]:  # fmt: skip
        layer = ours(3, activation="relu")
        assert isinstance(layer, theirs)
        assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
        assert layer.activation == "relu" and layer.frozen is False


def test_convert_sync_batchnorm_converts_bnlab_layers():
    """SyncBatchNorm.convert_sync_batchnorm finds bnlab's layers and moves their state over."""
    model, _, _ = build("resnet20", "train")
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    means = {n: m.running_mean.clone() for n, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d)}  # fmt: skip
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    converted = {n: m for n, m in synced.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert converted.keys() == weights.keys()
    for n, m in converted.items():
        assert m.weight is weights[n]
        assert torch.equal(m.running_mean, means[n])


def test_weight_decay_filter_by_isinstance_sees_bnlab_parameters():
    model = resnet20()
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                for p in m.parameters(recurse=False)}  # fmt: skip
    n_bn = sum(1 for m in model.modules() if isinstance(m, bnlab.BatchNorm2d))
    assert n_bn == 19 and len(no_decay) == 2 * n_bn


# ----------------------------------------------------------------------------- the operators
def _op_args(relu: bool, layout=torch.contiguous_format):
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(memory_format=layout).requires_grad_()
    w = (torch.rand(3) + 0.5).requires_grad_()
    b = torch.randn(3, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])  # fmt: skip
def test_opcheck_every_operator(relu, layout):
    """torch.library.opcheck: schema, fake (meta) implementation against the real one, the
    registered autograd, and AOT dispatch with dynamic shapes."""
    ops = torch.ops.bnlab
    x, w, b = _op_args(relu, layout)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    torch.library.opcheck(ops.batch_norm_train, (x, w, b, 1e-5, relu))
    torch.library.opcheck(ops.batch_norm_eval, (x, rm, rv, w, b, 1e-5, relu))
    y, stats = ops.batch_norm_train(x.detach(), w.detach(), b.detach(), 1e-5, relu)
    assert stats.shape == (5 if relu else 3, 3)
    dy = torch.randn_like(y)
    for train in (True, False):
        torch.library.opcheck(
            ops.batch_norm_backward,
            (dy, x.detach(), stats[0], stats[2], w.detach(), y if relu else None, train, True,
             True),
        )  # fmt: skip
    if relu:  # (the training forward's coefficients in place of its output)
        torch.library.opcheck(ops.batch_norm_backward, (dy, x.detach(), stats[0], stats[2],
                              w.detach(), None, True, True, True, stats[3:5]))  # fmt: skip
    for momentum in (0.1, None):
        args = (x.detach(), stats[0], stats[1], rm.clone(), rv.clone(), torch.tensor(3))
        torch.library.opcheck(ops.commit_stats, (*args, momentum, True, "layer"))


@pytest.mark.parametrize("relu", [False, True])
def test_operators_give_the_strides_their_fake_promises(relu):
    """Where eager outputs take their format's own strides and x's differ on a size-1 dimension
    (a channels_last (N, C, 1, 1) input, one with one channel), the operators still return the
    strides their fake implementation promises (``empty_like(x)``'s), which compiled code
    indexes by."""
    ops = torch.ops.bnlab
    for shape in [(8, 4, 1, 1), (8, 1, 5, 6)]:
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        c = shape[1]
        w, b = torch.rand(c) + 0.5, torch.randn(c)
        want = torch.empty_like(x).stride()
        assert want != torch.nn.BatchNorm2d(c)(x).stride()  # (torch's eager output differs)
        y, stats = ops.batch_norm_train(x, w, b, 1e-5, relu)
        assert y.stride() == want
        assert ops.batch_norm_eval(x, stats[0], stats[1], w, b, 1e-5, relu).stride() == want
        dx, _ = ops.batch_norm_backward(torch.randn_like(y), x, stats[0], stats[2], w,
                                        y if relu else None, True, True, True)  # fmt: skip
        assert dx.stride() == want


def test_operators_match_the_decomposition_and_torch():
    ops = torch.ops.bnlab
    x, w, b = _op_args(True)
    y, stats = ops.batch_norm_train(x, w, b, 1e-5, True)
    ref = torch.relu(nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    torch.testing.assert_close(y, ref, **TOL)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), gy)
    want = torch.autograd.grad(ref, (x, w, b), gy)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, **TOL)
    var, mean = torch.var_mean(x.detach(), (0, 2, 3), correction=0)
    torch.testing.assert_close(stats[0], mean, **TOL)
    torch.testing.assert_close(stats[1], var, **TOL)


FUSED_RELU_OP_CASES = [("auto", torch.float32), ("auto", torch.float64),
                       ("reference", torch.float32), ("auto", torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("backend,dtype", FUSED_RELU_OP_CASES,
                         ids=[f"{b}-{str(d)[6:]}" for b, d in FUSED_RELU_OP_CASES])  # fmt: skip
def test_fused_relu_operator_keeps_x_alone(backend, dtype):
    """The training operator with the fused ReLU keeps x and per-channel values for its backward,
    not its output (the mask is recomputed from x with the forward's coefficients, on the
    kernels' path and on the others), and gives torch's BN + ReLU: outputs and gradients."""
    ops = torch.ops.bnlab
    torch.manual_seed(0)
    x = (torch.randn(6, 3, 5, 5) * 2 + 0.3).to(dtype).requires_grad_()
    w = (torch.rand(3) + 0.5).requires_grad_()
    b = torch.randn(3).requires_grad_()
    big = []
    with (
        bnlab.use_backend(backend),
        torch.autograd.graph.saved_tensors_hooks(
            lambda t: big.append(t) or t if t.numel() > 3 * 5 else t, lambda t: t
        ),
    ):
        y, stats = ops.batch_norm_train(x, w, b, 1e-5, True)
    assert len(big) == 1
    assert big[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    dy = torch.randn_like(y)
    with bnlab.use_backend(backend):
        got = torch.autograd.grad(y, (x, w, b), dy)
    ref = torch.relu(nn.functional.batch_norm(x, None, None, w.to(dtype), b.to(dtype), True, 0.0,
                                              1e-5))  # fmt: skip
    want = torch.autograd.grad(ref, (x, w, b), dy)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else TOL
    torch.testing.assert_close(y, ref, **tol)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c.to(a.dtype), **tol)


def test_vmap_rules_of_the_operators():
    ops = torch.ops.bnlab
    xs = torch.randn(3, 4, 2, 5, 5)
    w, b = torch.rand(2) + 0.5, torch.randn(2)
    rm, rv = torch.randn(2), torch.rand(2) + 0.5
    ys, stats = torch.vmap(lambda x: ops.batch_norm_train(x, w, b, 1e-5, True))(xs)
    for x, y, s in zip(xs, ys, stats, strict=True):
        y1, s1 = ops.batch_norm_train(x, w, b, 1e-5, True)
        torch.testing.assert_close(y, y1, **TOL)
        torch.testing.assert_close(s, s1, **TOL)
    ye = torch.vmap(lambda x: ops.batch_norm_eval(x, rm, rv, w, b, 1e-5, False))(xs)
    torch.testing.assert_close(ye, torch.stack([ops.batch_norm_eval(x, rm, rv, w, b, 1e-5, False)
                                                for x in xs]), **TOL)  # fmt: skip
    with pytest.raises(ValueError, match="vmap"):
        torch.vmap(lambda x, m, v: ops.commit_stats(x, m, v, rm, rv, torch.tensor(0), 0.1, True,
                                                    "L"))(xs, stats[:, 0], stats[:, 1])  # fmt: skip


def test_every_test_named_in_the_readme_works_with_table_exists():
    """The README's "works with" table names the tests behind each row; each one must exist
    (in this file unless the row names another)."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split("## Works with", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(?:(tests/test_\w+\.py)::)?(test_\w+)`", table)
    assert len(named) > 20
    for file, name in named:
        source = (root / (file or "tests/test_toolchain.py")).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{file or 'here'}::{name} is missing"
