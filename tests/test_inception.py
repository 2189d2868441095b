"""SmallInception: the scaled-down Inception of Ioffe & Szegedy (2015), section 4.2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.layers import register_norm
from bnlab.layers.registry import NORMS
from bnlab.models import SmallInception
from bnlab.models.inception import ConvUnit, Mixed, Reduction


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_shapes_for_mnist_and_cifar_inputs(shape):
    m = SmallInception(shape[0], 10)
    x = torch.randn(4, *shape)
    assert m(x).shape == (4, 10)
    # stem + pool: 14x14 (16x16); the reduction halves it: 7x7 (8x8)
    side = (shape[1] + 1) // 2
    feats = m.features[:2](x)
    assert feats.shape == (4, 32, side, side)
    out = m.features(x)
    assert out.shape == (4, m.num_features, (side + 1) // 2, (side + 1) // 2)


def test_parameter_count_and_width():
    # width 16 on 1x28x28: 118,162 parameters with BN (the number the experiment reports)
    assert _params(SmallInception(1, norm="bn")) == 118_162
    # without a norm: a bias per conv channel instead of BN's scale and shift per channel
    units = SmallInception(1, norm="none").units()
    n_channels = sum(u.conv.out_channels for u in units)
    assert _params(SmallInception(1, norm="none")) == 118_162 - n_channels
    assert _params(SmallInception(1, width=32)) > 3.5 * _params(SmallInception(1, width=16))


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("act", ["relu", "sigmoid"])
@pytest.mark.parametrize("norm", ["none", "bn", "batchnorm2d", None])
def test_every_norm_and_act_builds_and_backprops(norm, act, fuse):
    torch.manual_seed(0)
    m = SmallInception(1, 10, norm=norm, act=act, dropout=0.3, width=8, fuse_relu=fuse)
    x = torch.randn(6, 1, 28, 28)
    loss = nn.functional.cross_entropy(m(x), torch.arange(6) % 10)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # every parameter gets a gradient


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
@pytest.mark.parametrize("fuse", [False, True])
def test_bn_per_feature_map_before_each_nonlinearity_and_no_conv_bias(act, fuse):
    """Every nonlinearity's input is the output of a BN over the conv's feature maps
    (section 3.2: z = g(BN(Wu)), per feature map), and convs followed by BN have no bias."""
    m = SmallInception(1, norm="bn", act=act, fuse_relu=fuse)
    units = m.units()
    assert len(units) == 34  # 1 stem + 4 mixed x 7 + 1 reduction x 5
    n_acts = 0
    for u in units:
        assert isinstance(u.norm, bnlab.BatchNorm2d)
        assert u.norm.num_features == u.conv.out_channels
        assert u.conv.bias is None
        if fuse and act == "relu":  # the ReLU lives inside the BN layer
            assert u.norm.activation == "relu" and isinstance(u.act, nn.Identity)
        else:
            assert u.norm.activation is None
            assert isinstance(u.act, nn.ReLU if act == "relu" else nn.Sigmoid)
    # no nonlinearity lives outside a unit: the order inside a unit is conv -> norm -> act
    for mod in m.modules():
        if isinstance(mod, (nn.ReLU, nn.Sigmoid)):
            n_acts += 1
            assert any(u.act is mod for u in units)
    assert n_acts == (0 if fuse and act == "relu" else 34)
    # the computation: act(BN(conv(x))) with batch statistics per feature map
    u = units[5]
    x = torch.randn(4, u.conv.in_channels, 7, 7)
    z = u.conv(x)
    mu, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    ref = (z - mu) / torch.sqrt(var + u.norm.eps)
    ref = torch.relu(ref) if act == "relu" else torch.sigmoid(ref)
    torch.testing.assert_close(u(x), ref, rtol=1e-4, atol=1e-5)


def test_without_norm_convs_have_biases_and_no_norm_layers():
    m = SmallInception(1, norm="none")
    assert all(u.norm is None and u.conv.bias is not None for u in m.units())
    assert not any(isinstance(x, nn.modules.batchnorm._NormBase) or
                   isinstance(x, bnlab.BatchNorm2d) for x in m.modules())


def test_a_registered_norm_family_is_used():
    """Any family registered with register_norm is what the units get."""
    calls = []

    def factory(c, dims):  # a family without bnlab's fused activation
        calls.append((c, dims))
        return nn.GroupNorm(1, c)

    register_norm("test-groupnorm", factory)
    try:
        m = SmallInception(1, norm="test-groupnorm", width=4)
        assert all(isinstance(u.norm, nn.GroupNorm) for u in m.units())
        assert all(d == 2 for _, d in calls) and len(calls) == 34
        m(torch.randn(2, 1, 28, 28)).sum().backward()
        # a family without the fused ReLU refuses fuse_relu, naming the family
        with pytest.raises(TypeError, match="test-groupnorm"):
            SmallInception(1, norm="test-groupnorm", fuse_relu=True)
    finally:
        NORMS.pop("test-groupnorm")


def test_mixed_and_reduction_shapes():
    x = torch.randn(2, 10, 9, 9)
    mixed = Mixed(10, 3, 4, 5, 2, 6, 7, norm="bn", act="relu")
    assert mixed(x).shape == (2, 3 + 5 + 6 + 7, 9, 9) and mixed.out_channels == 21
    red = Reduction(10, 4, 5, 2, 6, norm="bn", act="relu")
    assert red(x).shape == (2, 5 + 6 + 10, 5, 5) and red.out_channels == 21
    # the double-3x3 branch replaces the 5x5: two 3x3 convolutions in a row
    convs = [u.conv for u in mixed.bd if isinstance(u, ConvUnit)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3)]


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    m = SmallInception(1, dropout=0.5, width=4).eval()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(m(x), m(x))
    m.train()
    drop = [d for d in m.modules() if isinstance(d, nn.Dropout)]
    assert len(drop) == 1 and drop[0].p == 0.5


def test_init_depends_on_the_nonlinearity():
    relu = SmallInception(1, norm="none", act="relu")
    sig = SmallInception(1, norm="none", act="sigmoid")
    w_relu, w_sig = relu.units()[1].conv.weight.detach(), sig.units()[1].conv.weight.detach()
    fan_in = w_relu[0].numel()
    fan_out = w_relu.shape[0] * w_relu[0, 0].numel()
    assert abs(float(w_relu.std()) / (2 / fan_in) ** 0.5 - 1) < 0.15  # He
    assert abs(float(w_sig.std()) / (2 / (fan_in + fan_out)) ** 0.5 - 1) < 0.15  # Glorot
    assert all(float(u.conv.bias.detach().abs().max()) == 0 for u in relu.units())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"act": "tanh"}, "act must be one of"),
        ({"width": 0}, "width must be a positive int"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"norm": "nope"}, "unknown normalization 'nope'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmallInception(1, **kwargs)


def test_channels_last_gives_the_same_numbers():
    torch.manual_seed(0)
    m = SmallInception(1, width=4).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    ref = m(x)
    cl = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), ref)
