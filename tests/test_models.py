"""Model builders: the architectures their papers give."""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab.models import MLP, resnet20, resnet110


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
