"""Model builders: the architectures their papers give."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.models import MLP, StackedMLP, resnet20, resnet110


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_resnet_sizes_match_he_et_al():
    # He et al. (2016), Table 6: ResNet-20 0.27M, ResNet-110 1.7M parameters (option A)
    assert 0.26e6 < _params(resnet20(norm=None)) < 0.28e6
    assert 1.6e6 < _params(resnet110()) < 1.8e6
    assert _params(resnet20(shortcut="B")) > _params(resnet20())  # projections add weights


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_forward_backward_and_bn_layers(shortcut):
    m = resnet20(shortcut=shortcut)
    y = m(torch.randn(3, 3, 32, 32))
    assert y.shape == (3, 10)
    y.sum().backward()
    n_bn = sum(isinstance(x, bnlab.BatchNorm2d) for x in m.modules())
    assert n_bn == 19 + (2 if shortcut == "B" else 0)
    with pytest.raises(ValueError, match="shortcut"):
        resnet20(shortcut="C")


def test_mlp_has_no_hidden_bias_with_bn():
    m = MLP(norm="batchnorm1d")
    linears = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert [lin.bias is None for lin in linears] == [True, True, True, False]
    assert all(lin.bias is not None for lin in MLP().modules() if isinstance(lin, torch.nn.Linear))


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("act", ["sigmoid", "relu", "tanh"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("norm", [None, "batchnorm1d"])
def test_sgd_step_equals_autograd_and_torch_sgd(norm, momentum, act):
    """StackedMLP.sgd_step (backward written out, update fused into the bmm) against forward +
    autograd + torch.optim.SGD, in float64, over 6 steps: losses, parameters, BN buffers."""
    auto = StackedMLP(3, in_features=20, hidden=(16, 12), norm=norm, act=act)
    auto.init_gaussian_([1, 2, 3], 0.3)
    auto.double()
    explicit = copy.deepcopy(auto)
    opt = torch.optim.SGD(auto.parameters(), lr=0.3, momentum=momentum)
    velocity = {p: torch.zeros_like(p) for p in explicit.parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(3, 16, 20, generator=g, dtype=torch.float64)
        y = torch.randint(10, (3, 16), generator=g)
        logits = auto(x)
        ce = nn.functional.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="none")
        ce = ce.view(3, -1).mean(1)
        opt.zero_grad()
        ce.sum().backward()
        opt.step()
        loss = explicit.sgd_step(x, y, 0.3, momentum, velocity)
        torch.testing.assert_close(loss, ce.detach(), rtol=1e-12, atol=1e-12)
    for key, value in auto.state_dict().items():
        torch.testing.assert_close(explicit.state_dict()[key], value, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("norm", [None, "batchnorm1d"])
def test_sgd_step_workspace_follows_dtype_batch_size_loads_and_new_parameters(norm):
    """sgd_step's cached buffers and views (its workspace, and the BN layers' cached numpy views)
    are rebuilt when they no longer fit: model.double() swapping param.data, another batch size,
    a new Parameter; an in-place load_state_dict is seen through them. Oracle: autograd +
    torch.optim.SGD on a copy, in float64, step by step."""
    explicit = StackedMLP(3, in_features=20, hidden=(16, 12), norm=norm)
    explicit.init_gaussian_([1, 2, 3], 0.3)
    g = torch.Generator().manual_seed(0)

    def batch(n, dtype=torch.float64):
        x = torch.randn(3, n, 20, generator=g, dtype=dtype)
        return x, torch.randint(10, (3, n), generator=g)

    explicit.sgd_step(*batch(16, torch.float32), 0.3)  # a float32 workspace
    assert explicit._workspace is not None
    explicit.double()  # new storage for every parameter and buffer
    auto = copy.deepcopy(explicit)
    assert auto._workspace is None  # copies never share (or copy) the workspace

    def step_both(n):
        x, y = batch(n)
        opt = torch.optim.SGD(auto.parameters(), lr=0.3)
        logits = auto(x)
        ce = nn.functional.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="none")
        ce = ce.view(3, -1).mean(1)
        opt.zero_grad()
        ce.sum().backward()
        opt.step()
        loss = explicit.sgd_step(x, y, 0.3)
        torch.testing.assert_close(loss, ce.detach(), rtol=1e-12, atol=1e-12)
        for key, value in auto.state_dict().items():
            torch.testing.assert_close(explicit.state_dict()[key], value, rtol=1e-10, atol=1e-12)

    for n in (16, 16, 8, 16):
        step_both(n)
    other = StackedMLP(3, in_features=20, hidden=(16, 12), norm=norm).double()
    other.init_gaussian_([4, 5, 6], 0.2)
    for m in (explicit, auto):
        m.load_state_dict(other.state_dict())  # in place
    step_both(16)
    for m in (explicit, auto):  # new Parameter objects
        m.weights[1] = nn.Parameter(other.weights[1].detach() * 0.5)
        m.biases[-1] = nn.Parameter(torch.ones(3, 10, dtype=torch.float64))
        if norm:
            m.norms[0].weight = nn.Parameter(torch.full((48,), 1.5, dtype=torch.float64))
    step_both(16)
    if norm:  # only a BN parameter replaced: the model's workspace stays, the BN's views follow
        for m in (explicit, auto):
            m.norms[1].bias = nn.Parameter(torch.full((36,), 0.5, dtype=torch.float64))
            m.norms[0].running_var.data = torch.full((48,), 3.0, dtype=torch.float64)
    step_both(16)


def test_sgd_step_bad_arguments():
    m = StackedMLP(2, in_features=8, hidden=(4,))
    x, y = torch.randn(2, 5, 8), torch.randint(10, (2, 5))
    with pytest.raises(ValueError, match="momentum needs a velocity"):
        m.sgd_step(x, y, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"expected x \(K=2"):
        m.sgd_step(torch.randn(3, 5, 8), torch.randint(10, (3, 5)), 0.1)
    with pytest.raises(ValueError, match="y"):
        m.sgd_step(x, y[:, :4], 0.1)
