"""bnlab.BatchRenorm1d/2d/3d: torch BN during the warm-up, the paper's transform (float64
autograd through the reference math, r and d held constant), hand-computed r and d, the
schedule, the paper's running averages, state dicts and resume, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import bnlab
from bnlab.layers.renorm import renorm_limits
from conftest import SHAPES, assert_captured_steps, captured, to_format

pytestmark = pytest.mark.usefixtures("backend")

CLASSES = {2: bnlab.BatchRenorm1d, 3: bnlab.BatchRenorm1d, 4: bnlab.BatchRenorm2d,
           5: bnlab.BatchRenorm3d}  # fmt: skip
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
         5: torch.nn.BatchNorm3d}  # fmt: skip


def dims(x):
    return [0] + list(range(2, x.dim()))


def pc(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2)) if x.dim() > 2 else t


def reference(x, gamma, beta, mu, sigma, rmax, dmax, eps):
    """Ioffe (2017), Algorithm 1, in float64 autograd: r and d detached."""
    mean = x.mean(dims(x))
    var = x.var(dims(x), unbiased=False)
    sigma_b = torch.sqrt(var + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mean - mu) / sigma).clamp(-dmax, dmax).detach()
    x_hat = (x - pc(mean, x)) / pc(sigma_b, x) * pc(r, x) + pc(d, x)
    return pc(gamma, x) * x_hat + pc(beta, x), r, d


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_warmup_is_batchnorm_outputs_gradients_and_mean(shape, fmt):
    """rmax = 1, dmax = 0 during the warm-up: torch's BN output, gradients and running mean."""
    c = shape[1]
    brn = CLASSES[len(shape)](c, dtype=torch.float64, warmup_steps=10)
    ref = TORCH[len(shape)](c, dtype=torch.float64)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(c) + 0.5)
        brn.bias.copy_(torch.randn(c))
        ref.load_state_dict(brn.state_dict(), strict=False)
    for step in range(3):
        x = to_format(torch.randn(shape, dtype=torch.float64) * 3 + step, fmt)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = brn(xo), ref(xr)
        torch.testing.assert_close(yo, yr)
        dy = torch.randn(shape, dtype=torch.float64)
        yo.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xo.grad, xr.grad)
        torch.testing.assert_close(brn.weight.grad, ref.weight.grad)
        torch.testing.assert_close(brn.bias.grad, ref.bias.grad)
        brn.weight.grad = brn.bias.grad = ref.weight.grad = ref.bias.grad = None
    torch.testing.assert_close(brn.running_mean, ref.running_mean)
    assert int(brn.renorm_steps) == 3 and int(brn.num_batches_tracked) == 3


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("step", [30, 55, 200], ids=["ramp-start", "ramp", "full"])
def test_transform_and_gradients_match_float64_reference(shape, step):
    c = shape[1]
    kw = dict(rmax=2.0, dmax=0.5, warmup_steps=20, rmax_steps=120, dmax_steps=80)
    brn = CLASSES[len(shape)](c, dtype=torch.float64, **kw)
    with torch.no_grad():
        brn.weight.copy_(torch.rand(c) + 0.5)
        brn.bias.copy_(torch.randn(c))
        # moving averages far from the batch's on some channels (both r and d clip there) and
        # close on others (the identity part)
        brn.running_mean.copy_(torch.tensor([3.0, -3.0, 0.3] * c)[:c])
        brn.running_var.copy_(torch.tensor([0.05, 9.0, 2.2] * c)[:c])
        brn.renorm_steps.fill_(step)
    rmax, dmax = renorm_limits(step, **kw)
    sigma = torch.sqrt(brn.running_var + brn.eps)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    g, b = brn.weight.detach().clone().requires_grad_(), brn.bias.detach().clone().requires_grad_()
    yr, r, d = reference(xr, g, b, brn.running_mean.clone(), sigma, rmax, dmax, brn.eps)
    yo = brn(xo)
    torch.testing.assert_close(yo, yr, rtol=1e-10, atol=1e-10)
    dy = torch.randn(shape, dtype=torch.float64)
    yo.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(brn.weight.grad, g.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(brn.bias.grad, b.grad, rtol=1e-9, atol=1e-10)
    if step >= 55:  # the clipping is exercised, not only the identity
        assert (r == rmax).any() or (r == 1 / rmax).any()
        assert (d.abs() == dmax).any()


def test_r_and_d_by_hand():
    """x = 0, 2, 4, 6 in one channel: mu_B = 3, var_B = 5; moving averages mu = 0, sigma = 1;
    rmax = 2, dmax = 0.5: r = clip(sqrt(5), 1/2, 2) = 2, d = clip(3, -0.5, 0.5) = 0.5."""
    eps = 1e-5
    brn = bnlab.BatchRenorm1d(1, eps=eps, affine=False, dtype=torch.float64, rmax=2.0, dmax=0.5,
                              warmup_steps=0, rmax_steps=0, dmax_steps=0)  # fmt: skip
    with torch.no_grad():
        brn.running_var.fill_(1.0 - eps)  # sigma = sqrt(running_var + eps) = 1
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]], dtype=torch.float64)
    y = brn(x).flatten()
    sigma_b = math.sqrt(5 + eps)
    expect = [(v - 3) / sigma_b * 2 + 0.5 for v in (0, 2, 4, 6)]
    torch.testing.assert_close(y, torch.tensor(expect, dtype=torch.float64))
    # the paper's moving averages, f = 0.1: mu = 0.3, sigma = 1 + 0.1 (sqrt(5 + eps) - 1)
    assert brn.running_mean.item() == pytest.approx(0.3)
    new_sigma = 1 + 0.1 * (sigma_b - 1)
    assert brn.running_var.item() == pytest.approx(new_sigma**2 - eps)
    assert math.sqrt(brn.running_var.item() + eps) == pytest.approx(new_sigma)


def test_cumulative_average_of_sigma_when_momentum_none():
    eps = 1e-5
    brn = bnlab.BatchRenorm1d(2, momentum=None, eps=eps, dtype=torch.float64)
    xs = [torch.randn(6, 2, dtype=torch.float64) * s for s in (1.0, 2.0, 3.0)]
    for x in xs:
        brn(x)
    mean = torch.stack([x.mean(0) for x in xs]).mean(0)
    sigma = torch.stack([torch.sqrt(x.var(0, unbiased=False) + eps) for x in xs]).mean(0)
    torch.testing.assert_close(brn.running_mean, mean)
    torch.testing.assert_close(torch.sqrt(brn.running_var + eps), sigma)


def test_schedule_values_and_scaling():
    kw = dict(rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000)
    assert renorm_limits(0, **kw) == (1.0, 0.0)
    assert renorm_limits(4999, **kw) == (1.0, 0.0)
    assert renorm_limits(5000, **kw) == (1.0, 0.0)
    assert renorm_limits(22500, **kw) == pytest.approx((2.0, 5.0 * 17500 / 20000))
    assert renorm_limits(25000, **kw) == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert renorm_limits(40000, **kw) == (3.0, 5.0)
    assert renorm_limits(10**6, **kw) == (3.0, 5.0)
    assert bnlab.renorm_schedule(1600) == {"warmup_steps": 50, "rmax_steps": 400,
                                           "dmax_steps": 250}  # fmt: skip
    assert bnlab.renorm_schedule(160_000) == {"warmup_steps": 5000, "rmax_steps": 40000,
                                              "dmax_steps": 25000}  # fmt: skip
    with pytest.raises(ValueError, match="steps"):
        bnlab.renorm_schedule(0)
    brn = bnlab.BatchRenorm2d(3, **bnlab.renorm_schedule(1600))
    for step in (0, 49, 50, 120, 250, 399, 400, 1000):
        brn.renorm_steps.fill_(step)
        expect = renorm_limits(step, 3.0, 5.0, 50, 400, 250)
        assert brn.limits() == pytest.approx(expect)
        r, d = brn._limit_tensors(brn.renorm_steps.double())
        assert (r.item(), d.item()) == pytest.approx(expect)


def test_state_dict_resume_continues_the_schedule():
    kw = dict(warmup_steps=2, rmax_steps=8, dmax_steps=6)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnlab.BatchRenorm2d(3, **kw))
    batches = [torch.randn(4, 2, 6, 6) * (1 + i % 3) + i for i in range(10)]
    for x in batches[:5]:
        model(x)
    sd = copy.deepcopy(model.state_dict())
    assert int(sd["1.renorm_steps"]) == 5
    resumed = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnlab.BatchRenorm2d(3, **kw))
    resumed.load_state_dict(sd)
    for x in batches[5:]:
        torch.testing.assert_close(resumed(x), model(x), rtol=0, atol=0)
    assert int(resumed[1].renorm_steps) == 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_state_dict_interchange_with_batchnorm():
    torch_bn = torch.nn.BatchNorm2d(3)
    torch_bn(torch.randn(4, 3, 5, 5) * 2 + 1)
    brn = bnlab.BatchRenorm2d(3)
    brn.renorm_steps.fill_(7)
    brn.load_state_dict(torch_bn.state_dict())  # strict: a BN checkpoint loads
    assert int(brn.renorm_steps) == 0  # ... and its schedule starts at the beginning
    torch.testing.assert_close(brn.running_var, torch_bn.running_var)
    brn.eval(), torch_bn.eval()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(brn(x), torch_bn(x))  # inference is BN's
    with pytest.raises(RuntimeError, match="renorm_steps"):
        torch.nn.BatchNorm2d(3).load_state_dict(brn.state_dict())  # torch's strict rule
    back = torch.nn.BatchNorm2d(3)
    result = back.load_state_dict(brn.state_dict(), strict=False)
    assert result.unexpected_keys == ["renorm_steps"]
    with pytest.raises(RuntimeError, match="running_mean"):
        brn.load_state_dict({**brn.state_dict(), "running_mean": torch.zeros(4)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_raises_and_changes_nothing(bad):
    brn = bnlab.BatchRenorm2d(3, warmup_steps=0, rmax_steps=1, dmax_steps=1)
    brn.layer_name = "block.brn"
    brn(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in brn.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 0, 0] = bad
    with pytest.raises(FloatingPointError, match=r"'block.brn' BatchRenorm2d\(3\)"):
        brn(x)
    for k, v in brn.state_dict().items():
        assert torch.equal(v, before[k]), k
    brn(torch.randn(4, 3, 5, 5))
    assert int(brn.renorm_steps) == 2


def test_eval_fold_freeze_and_recompute():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), bnlab.BatchRenorm2d(4, warmup_steps=1,
                                rmax_steps=3, dmax_steps=2), torch.nn.ReLU())  # fmt: skip
    for i in range(6):
        model(torch.randn(8, 2, 7, 7) + i * 0.1)
    model.eval()
    x = torch.randn(3, 2, 7, 7)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.load_state_dict(model[1].state_dict(), strict=False)
    torch.testing.assert_close(model[1](model[0](x)), bn(model[0](x)))
    torch.testing.assert_close(bnlab.fold(model)(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    bnlab.freeze(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 2, 7, 7))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), bn(model[0](x)).relu())
    bnlab.unfreeze(model)
    batches = [torch.randn(8, 2, 7, 7) for _ in range(3)]
    bnlab.recompute_population_stats(model, batches)
    feats = torch.cat([model[0](b) for b in batches]).detach()
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)))
    assert int(model[1].renorm_steps) == 6  # recomputing the statistics leaves the schedule


def test_without_running_stats_it_is_batchnorm():
    brn = bnlab.BatchRenorm1d(3, track_running_stats=False, warmup_steps=0, rmax_steps=0,
                              dmax_steps=0)  # fmt: skip
    assert brn.renorm_steps is None
    ref = torch.nn.BatchNorm1d(3, track_running_stats=False)
    x = torch.randn(6, 3)
    torch.testing.assert_close(brn(x), ref(x))
    brn.eval(), ref.eval()
    torch.testing.assert_close(brn(x), ref(x))


def test_activation_affine_off_empty_batch_and_bfloat16():
    kw = dict(warmup_steps=0, rmax_steps=2, dmax_steps=2)
    brn = bnlab.BatchRenorm2d(3, activation="relu", **kw)
    plain = bnlab.BatchRenorm2d(3, **kw)
    plain.load_state_dict(brn.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(brn(x), plain(x).relu())
    off = bnlab.BatchRenorm1d(3, affine=False, **kw)
    assert off(torch.randn(5, 3)).shape == (5, 3)
    before = off.running_mean.clone()
    y = off(torch.randn(0, 3))
    assert y.shape == (0, 3) and torch.equal(off.running_mean, before)
    assert int(off.renorm_steps) == 2 and int(off.num_batches_tracked) == 2
    b16 = bnlab.BatchRenorm2d(3, **kw)
    f32 = copy.deepcopy(b16)
    xb = torch.randn(4, 3, 5, 5)
    yb = b16(xb.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), f32(xb), rtol=3e-2, atol=3e-2)


def test_constructor_validation_names_the_argument():
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        bnlab.BatchRenorm2d(3, rmax=0.5)
    with pytest.raises(ValueError, match="dmax must be >= 0"):
        bnlab.BatchRenorm2d(3, dmax=-1.0)
    with pytest.raises(ValueError, match="rmax_steps"):
        bnlab.BatchRenorm2d(3, warmup_steps=10, rmax_steps=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        bnlab.BatchRenorm2d(3, warmup_steps=-1)
    with pytest.raises(TypeError, match="rmax"):
        bnlab.BatchRenorm2d(3, rmax="3")
    with pytest.raises(ValueError, match="rmax must be finite"):
        bnlab.BatchRenorm2d(3, rmax=float("inf"))
    with pytest.raises(ValueError, match=r"BatchRenorm2d.*expected 4D"):
        bnlab.BatchRenorm2d(3)(torch.randn(4, 3))


def test_reset_running_stats_restarts_the_schedule():
    brn = bnlab.BatchRenorm1d(2)
    brn(torch.randn(4, 2))
    brn.reset_running_stats()
    assert int(brn.renorm_steps) == 0 and int(brn.num_batches_tracked) == 0
    assert "rmax=3" in repr(brn) and "warmup_steps=5000" in repr(brn)


def _renorm_states(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("tool", ["compile", "export", "trace", "fx", "script"])
def test_tools_capture_the_training_step(tool, momentum):
    """torch.compile (no graph break), torch.export, jit.trace, fx symbolic tracing and
    jit.script of a training-mode layer whose correction is active: each step gives eager's
    output (and, where the tool keeps autograd, gradients) and leaves the same running
    statistics and counters; the captured layer then gives eager's inference output."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    schedule = dict(rmax=2.0, dmax=1.0, warmup_steps=0, rmax_steps=2, dmax_steps=2)
    eager = bnlab.BatchRenorm2d(3, momentum=momentum, **schedule)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
        eager.running_mean.normal_()
        eager.running_var.uniform_(0.2, 3.0)
    layer = copy.deepcopy(eager)
    xs = [torch.randn(6, 3, 4, 4) * 2 + 1 for _ in range(3)]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    run, model = captured(layer, tool, xs[0], counter)
    assert_captured_steps(run, model, layer, eager, tool, xs, torch.randn(5, 3, 4, 4))
    assert int(eager.renorm_steps) == 3
    if tool == "compile":
        assert counter.frame_count == 1


def test_a_captured_step_refuses_a_non_finite_batch_and_keeps_the_state():
    """Compiled: an assertion naming the layer's class and size (its name stays out of compiled
    graphs); traced (a graph that cannot raise): nothing written, the counters included;
    symbolically traced and scripted: the layer's refusal, naming the layer."""
    layer = bnlab.BatchRenorm2d(3, warmup_steps=0, rmax_steps=2, dmax_steps=2)
    layer.layer_name = "block.bn"
    bad = torch.randn(4, 3, 5, 5)
    bad[1, 2, 0, 0] = float("nan")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(4, 3, 5, 5))

    def unchanged(before):
        for key, value in _renorm_states(layer).items():
            assert torch.equal(value, before[key]), key

    before = _renorm_states(layer)
    unnamed = r"^BatchRenorm2d\(3\) \(names stay out of compiled graphs\): non-finite"
    with pytest.raises(RuntimeError, match=unnamed):
        compiled(bad)
    unchanged(before)
    traced = torch.jit.trace(layer, (torch.randn(4, 3, 5, 5),), check_trace=False)
    before = _renorm_states(layer)
    traced(bad)
    unchanged(before)
    for run, error in ((torch.fx.symbolic_trace(layer), FloatingPointError),
                       (torch.jit.script(layer), torch.jit.Error)):  # fmt: skip
        run(torch.randn(4, 3, 5, 5))
        before = _renorm_states(layer)
        with pytest.raises(error, match=r"'block.bn' \w+\(3\): non-finite"):
            run(bad)
        unchanged(before)
