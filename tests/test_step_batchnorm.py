"""StepBatchNorm1d (per-time-step statistics for recurrent networks) against hand-computed
statistics and against torch.nn.BatchNorm1d layers, one per step, with a shared affine map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.layers import StepBatchNorm1d


def _steps(t, n=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # each step its own mean and scale, as a recurrent network's transient gives
    return [torch.randn(n, c, generator=g, dtype=torch.float64) * (1 + k) + 3 * k
            for k in range(t)]


def test_per_step_batch_statistics_and_running_averages_by_hand():
    xs = _steps(3)
    layer = StepBatchNorm1d(5, max_steps=3, momentum=0.1, gamma_init=0.1, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 5))
    for t, x in enumerate(xs):
        y = layer(x, t)
        mu, var = x.mean(0), x.var(0, unbiased=False)
        ref = 0.1 * (x - mu) / (var + 1e-5).sqrt() + torch.linspace(-1, 1, 5, dtype=torch.float64)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(layer.steps[t].running_mean, 0.1 * mu)
        torch.testing.assert_close(layer.steps[t].running_var,
                                   0.9 + 0.1 * x.var(0, unbiased=True))
    layer(xs[0] * 2, 0)  # step 0 again: only step 0's statistics move
    assert int(layer.steps[0].num_batches_tracked) == 2
    assert int(layer.steps[1].num_batches_tracked) == 1


def test_equals_torch_batchnorm_per_step_with_shared_affine_forward_and_backward():
    """A small tanh RNN normalized per step, against the same RNN built from torch layers."""
    torch.manual_seed(0)
    n, c, t_max = 12, 4, 4
    x = torch.randn(t_max, n, c, dtype=torch.float64)
    w = torch.randn(c, c, dtype=torch.float64) * 0.5
    ours = StepBatchNorm1d(c, t_max, gamma_init=0.5, dtype=torch.float64)
    ref = nn.ModuleList(nn.BatchNorm1d(c, affine=False, dtype=torch.float64)
                        for _ in range(t_max))
    gamma = torch.full((c,), 0.5, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ha = hb = torch.zeros(n, c, dtype=torch.float64)
    for t in range(t_max):
        ha = torch.tanh(ours(xa[t] + ha @ w, t))
        hb = torch.tanh(ref[t](xb[t] + hb @ w) * gamma + beta)
    torch.testing.assert_close(ha, hb)
    ha.pow(2).sum().backward()
    hb.pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, gamma.grad)
    torch.testing.assert_close(ours.bias.grad, beta.grad)
    for t in range(t_max):
        torch.testing.assert_close(ours.steps[t].running_mean, ref[t].running_mean)
        torch.testing.assert_close(ours.steps[t].running_var, ref[t].running_var)


def test_inference_beyond_the_last_step_uses_its_statistics_training_is_refused():
    xs = _steps(2, seed=1)
    layer = StepBatchNorm1d(5, max_steps=2, dtype=torch.float64)
    for t, x in enumerate(xs):
        layer(x, t)
    layer.eval()
    probe = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(probe, 7), layer(probe, 1))
    assert not torch.allclose(layer(probe, 0), layer(probe, 1))
    layer.train()
    before = layer.steps[1].running_mean.clone()
    with pytest.raises(ValueError, match="max_steps=2.*step 2"):
        layer(probe, 2)
    assert torch.equal(before, layer.steps[1].running_mean)
    with pytest.raises(ValueError, match="time step"):
        layer(probe, -1)
    with pytest.raises(ValueError, match="max_steps"):
        StepBatchNorm1d(5, 0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_shared_parameters_of_another_shape_are_refused_before_the_step_moves(train):
    """The shared gamma or beta reassigned to another shape through ``.data`` (fewer values, or
    (C, 1), which would broadcast against C rows): refused with the layer named before the
    step's running statistics move."""
    for name, bad in [("weight", lambda t: t[:2]), ("bias", lambda t: t.view(5, 1))]:
        layer = StepBatchNorm1d(5, max_steps=2, dtype=torch.float64)
        layer(_steps(1)[0], 0)
        layer.train(train)
        p = getattr(layer, name)
        p.data = bad(p.data)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(RuntimeError, match=f"StepBatchNorm1d\\(5\\): {name} should have"):
            layer(_steps(1, n=5, seed=2)[0], 0)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)


def test_state_dict_round_trip():
    layer = StepBatchNorm1d(3, 2)
    layer(torch.randn(4, 3), 0)
    layer(torch.randn(4, 3), 1)
    keys = set(layer.state_dict())
    assert {"weight", "bias", "steps.0.running_mean", "steps.1.running_var"} <= keys
    other = bnlab.StepBatchNorm1d(3, 2)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.steps[1].running_mean, layer.steps[1].running_mean)
