"""The ``norm=`` families of the small-batch layers: brn, ghost, sync (bnlab) and gn, ln
(torch.nn's own layers), built by make_norm for every input rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.layers import make_norm, norm_names
from bnlab.layers.registry import default_groups


def test_families_are_listed_and_build_the_right_class():
    for name in ("bn", "brn", "ghost", "sync", "gn", "ln"):
        assert name in norm_names()
    assert type(make_norm("brn", 4, 0)) is bnlab.BatchRenorm1d
    assert type(make_norm("brn", 4, 2)) is bnlab.BatchRenorm2d
    assert type(make_norm("brn", 4, 3, **bnlab.renorm_schedule(100))) is bnlab.BatchRenorm3d
    ghost = make_norm("ghost", 4, 2, virtual_batch_size=8)
    assert type(ghost) is bnlab.GhostBatchNorm2d and ghost.virtual_batch_size == 8
    assert make_norm("ghost", 4, 1).virtual_batch_size == 32
    assert type(make_norm("sync", 4, 3)) is bnlab.SyncBatchNorm
    assert type(make_norm("syncbatchnorm", 4, 2)) is bnlab.SyncBatchNorm
    assert type(make_norm("ghostbatchnorm1d", 4, 0)) is bnlab.GhostBatchNorm1d
    gn = make_norm("gn", 64, 2)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32
    assert make_norm("gn", 16, 2, groups=4).num_groups == 4
    assert type(make_norm("ln", 8, 0)) is nn.LayerNorm
    ln = make_norm("ln", 8, 2)
    assert type(ln) is nn.GroupNorm and ln.num_groups == 1


def test_default_groups():
    assert default_groups(64) == 32  # the Group Norm paper's G = 32
    assert default_groups(256) == 32
    assert default_groups(32) == 16  # at least 2 channels per group
    assert default_groups(16) == 8
    assert default_groups(6) == 3
    assert default_groups(7) == 1
    assert default_groups(1) == 1


def test_ln_on_feature_maps_normalizes_each_example_over_channels_and_positions():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3 + 2
    ln = make_norm("ln", 4, 2).double()
    with torch.no_grad():
        ln.weight.copy_(torch.rand(4) + 0.5)
        ln.bias.copy_(torch.randn(4))
    flat = x.flatten(1)
    x_hat = ((flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False,
             keepdim=True) + ln.eps)).view_as(x)  # fmt: skip
    expected = x_hat * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), expected)
    # batch-independent: an example's output does not depend on the rest of the batch
    torch.testing.assert_close(ln(x[:1]), ln(x)[:1])
    gn = make_norm("gn", 4, 2).double()
    torch.testing.assert_close(gn(x[:1]), gn(x)[:1])


def test_family_errors_name_the_family_and_argument():
    with pytest.raises(TypeError, match="normalization 'gn'"):
        make_norm("gn", 8, 2, activation="relu")
    with pytest.raises(ValueError, match="gn: 6 channels cannot be split into 4 groups"):
        make_norm("gn", 6, 2, groups=4)
    with pytest.raises(ValueError, match="brn: dims must be"):
        make_norm("brn", 4, 4)
    with pytest.raises(TypeError, match="normalization 'ln'"):
        make_norm("ln", 4, 2, virtual_batch_size=2)


@pytest.mark.parametrize("norm", ["bn", "brn", "ghost", "sync", "gn", "ln", "none"])
def test_small_cnn_builds_with_every_family_and_backpropagates(norm):
    from bnlab.models import SmallCNN

    kw = {"virtual_batch_size": 2} if norm == "ghost" else {}
    torch.manual_seed(0)
    model = SmallCNN(1, 10, norm=norm, norm_kwargs=kw)
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((m.bias is None) == (norm != "none") for m in convs)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm,
             nn.modules.batchnorm._BatchNorm))]  # fmt: skip
    assert len(norms) == (0 if norm == "none" else 3)
    if norm in ("bn", "brn"):
        assert norms[1].layer_name == "features.5"
    torch.manual_seed(0)
    again = SmallCNN(1, 10, norm="gn")  # same seed, same convolutions whatever the norm layer
    last = [m for m in again.modules() if isinstance(m, nn.Conv2d)][-1]
    assert torch.equal(convs[-1].weight, last.weight) == (norm != "none")
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(widths=(8, 16))
