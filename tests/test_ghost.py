"""bnlab.GhostBatchNorm1d/2d/3d against torch BN applied to each ghost batch (float64 outputs
and gradients), torch BN itself when the batch fits in one ghost batch, hand-computed running
statistics, uneven batches, state dicts, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import bnlab
from bnlab.layers.ghost import ghost_sizes
from conftest import SHAPES, assert_captured_steps, captured, to_format

pytestmark = pytest.mark.usefixtures("backend")

CLASSES = {2: bnlab.GhostBatchNorm1d, 3: bnlab.GhostBatchNorm1d, 4: bnlab.GhostBatchNorm2d,
           5: bnlab.GhostBatchNorm3d}  # fmt: skip
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
         5: torch.nn.BatchNorm3d}  # fmt: skip


def per_ghost_reference(x, weight, bias, sizes, eps, relu=False):
    """torch's batch norm on each ghost batch, concatenated (the oracle)."""
    outs, start = [], 0
    for size in sizes:
        y = F.batch_norm(x[start : start + size], None, None, weight, bias, True, 0.0, eps)
        outs.append(y.relu() if relu else y)
        start += size
    return torch.cat(outs)


def test_ghost_sizes():
    assert ghost_sizes(8, 4) == [4, 4]
    assert ghost_sizes(10, 4) == [4, 4, 2]
    assert ghost_sizes(9, 4, values_per_example=1) == [4, 5]  # one (N, C) example joins
    assert ghost_sizes(9, 4, values_per_example=25) == [4, 4, 1]  # a feature map is enough
    assert ghost_sizes(3, 4) == [3]
    assert ghost_sizes(5, 1) == [1] * 5


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("n,v", [(12, 4), (10, 4), (9, 4), (7, 2), (6, 3)])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_matches_torch_bn_per_ghost_batch_float64(shape, n, v, fmt):
    shape = (n, *shape[1:])
    c = shape[1]
    layer = CLASSES[len(shape)](c, dtype=torch.float64, virtual_batch_size=v)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c) + 0.5)
        layer.bias.copy_(torch.randn(c))
    x = to_format(torch.randn(shape, dtype=torch.float64) * 2 + torch.arange(n).view(
        [-1] + [1] * (len(shape) - 1)), fmt)  # fmt: skip  (each ghost batch its own mean)
    per = x.numel() // n // c
    sizes = ghost_sizes(n, v, per)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    yo, yr = layer(xo), per_ghost_reference(xr, w, b, sizes, layer.eps)
    torch.testing.assert_close(yo, yr, rtol=1e-10, atol=1e-10)
    if fmt == "channels_last" and x.dim() >= 4:
        assert yo.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                else torch.channels_last_3d)  # fmt: skip
    dy = torch.randn(shape, dtype=torch.float64)
    yo.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-9, atol=1e-10)
    # running statistics: the batch mean and the pooled within-ghost-batch unbiased variance
    dims = [0] + list(range(2, x.dim()))
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    ss = sum(((x[s : s + k] - x[s : s + k].mean(dims, keepdim=True)) ** 2).sum(dims)
             for s, k in zip(starts, sizes, strict=True))  # fmt: skip
    total = n * per
    pooled = ss / (total - len(sizes))
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(dims))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * pooled)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_one_ghost_batch_is_exactly_batchnorm(shape):
    c = shape[1]
    layer = CLASSES[len(shape)](c, virtual_batch_size=shape[0], momentum=None)
    ref = TORCH[len(shape)](c, momentum=None)
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        torch.testing.assert_close(layer(x), ref(x))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v)
    layer.eval(), ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), ref(x))


def test_activation_affine_off_and_running_average_over_steps():
    layer = bnlab.GhostBatchNorm2d(3, virtual_batch_size=2, activation="relu", affine=False,
                                   dtype=torch.float64)  # fmt: skip
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
        y = layer(x)
        torch.testing.assert_close(y, per_ghost_reference(x, None, None, [2, 2, 2], layer.eps,
                                                          relu=True))  # fmt: skip
        chunks = x.view(3, 2, 3, 4, 4)
        within = ((chunks - chunks.mean((1, 3, 4), keepdim=True)) ** 2).sum((0, 1, 3, 4))
        mean = 0.9 * mean + 0.1 * x.mean((0, 2, 3))
        var = 0.9 * var + 0.1 * within / (6 * 16 - 3)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)
    assert int(layer.num_batches_tracked) == 3


def test_virtual_size_one():
    conv = bnlab.GhostBatchNorm2d(2, virtual_batch_size=1, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(conv(x), per_ghost_reference(x, conv.weight, conv.bias, [1, 1, 1],
                                                            conv.eps))  # fmt: skip
    dense = bnlab.GhostBatchNorm1d(2, virtual_batch_size=1)
    dense.layer_name = "head.bn"
    before = copy.deepcopy(dense.state_dict())
    with pytest.raises(ValueError, match=r"'head.bn' GhostBatchNorm1d\(2\).*virtual_batch_size=1"):
        dense(torch.randn(4, 2))
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        bnlab.GhostBatchNorm1d(2, virtual_batch_size=0)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        bnlab.GhostBatchNorm1d(2, virtual_batch_size=2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_batch_raises_and_changes_nothing(bad):
    layer = bnlab.GhostBatchNorm2d(3, virtual_batch_size=2)
    layer.layer_name = "features.3"
    layer(torch.randn(6, 3, 4, 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, 3, 4, 4)
    x[5, 0, 1, 1] = bad  # in the last ghost batch only
    with pytest.raises(FloatingPointError, match=r"'features.3' GhostBatchNorm2d\(3\)"):
        layer(x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_state_dict_interchange_eval_fold_freeze_recompute():
    ref = torch.nn.BatchNorm2d(4)
    ref(torch.randn(8, 4, 5, 5) * 3 + 1)
    ghost = bnlab.GhostBatchNorm2d(4, virtual_batch_size=2)
    ghost.load_state_dict(ref.state_dict())  # both directions, strict
    torch.nn.BatchNorm2d(4).load_state_dict(ghost.state_dict())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), ghost, torch.nn.ReLU())
    for _ in range(4):
        model(torch.randn(8, 3, 7, 7))
    model.eval()
    x = torch.randn(5, 3, 7, 7)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.load_state_dict(ghost.state_dict())
    torch.testing.assert_close(model(x), bn(model[0](x)).relu())
    torch.testing.assert_close(bnlab.fold(model)(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    bnlab.freeze(model)
    torch.testing.assert_close(model(x), bn(model[0](x)).relu())
    bnlab.unfreeze(model)
    batches = [torch.randn(8, 3, 7, 7) for _ in range(3)]
    bnlab.recompute_population_stats(model, batches)
    feats = torch.cat([model[0](b) for b in batches]).detach()
    torch.testing.assert_close(ghost.running_mean, feats.mean((0, 2, 3)))
    assert "virtual_batch_size=2" in repr(ghost)


@pytest.mark.parametrize("tool", ["compile", "export", "trace", "fx", "script"])
def test_tools_capture_the_training_step(tool):
    """torch.compile (no graph break), torch.export, jit.trace, fx symbolic tracing and
    jit.script of a training-mode layer with ghost batches of two sizes: eager's outputs (and,
    where the tool keeps autograd, gradients) and running statistics at every step; the
    captured layer then gives eager's inference output."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    eager = bnlab.GhostBatchNorm2d(3, virtual_batch_size=4, momentum=None)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
    layer = copy.deepcopy(eager)
    xs = [torch.randn(10, 3, 4, 4) * 2 + 1 for _ in range(3)]  # ghost batches of 4, 4, 2
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    run, model = captured(layer, tool, xs[0], counter)
    assert_captured_steps(run, model, layer, eager, tool, xs, torch.randn(5, 3, 4, 4))
    assert int(eager.num_batches_tracked) == 3
    if tool == "compile":
        assert counter.frame_count == 1
