"""Probes record exact percentiles of known data, remove themselves, never change a mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.probes import (
    excess_kurtosis,
    percentiles,
    record_channel_stats,
    record_inputs,
    record_output_grads,
)


def test_percentiles_match_numpy_definition():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 5, generator=g)
    got = percentiles(x, (15, 50, 85), dim=0)
    want = np.percentile(x.double().numpy(), [15, 50, 85], axis=0)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_percentiles_of_hand_computed_data():
    x = torch.arange(11, dtype=torch.float32)  # 0..10: q-th percentile is q/10 exactly
    torch.testing.assert_close(
        percentiles(x, (15, 50, 85)), torch.tensor([1.5, 5.0, 8.5], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="qs must be in"):
        percentiles(x, (101,))


@pytest.mark.parametrize("training", [True, False])
def test_hooks_capture_and_remove_themselves_without_changing_mode(training):
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)).train(training)
    x = torch.randn(5, 4)
    with record_inputs({"sig": model[1], "lin": model[0]}) as got_in:
        y = model(x)
    expected = model[0](x)
    torch.testing.assert_close(got_in["sig"], expected)
    torch.testing.assert_close(got_in["lin"], x)
    assert not got_in["sig"].requires_grad
    assert all(m.training == training for m in model.modules())
    assert not model[1]._forward_pre_hooks and not model[0]._forward_pre_hooks
    torch.testing.assert_close(model(x), y)


def test_percentiles_nan_slice_gives_nan_and_others_stay_exact():
    x = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    x[2, 1] = float("nan")
    got = percentiles(x, (15, 50, 85), dim=1)
    assert got[:, 2].isnan().all()
    keep = [0, 1, 3]
    ref = torch.quantile(x[keep].double(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64), 1)
    torch.testing.assert_close(got[:, keep], ref, rtol=0, atol=0)


# ---------------------------------------------------------------- gradient and statistics hooks
def test_output_grads_are_softmax_minus_onehot_and_hooks_go_away():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x, y = torch.randn(7, 6, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    with record_output_grads({"fc": model[2], "hidden": model[0]}) as got:
        logits = model(x)
        nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    # d(sum of cross-entropies)/d logits = softmax(logits) - onehot(y), by hand
    want = torch.softmax(logits.detach(), 1) - nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(got["fc"], want)
    # chain rule by hand for the hidden layer: dL/dh = (dL/dz2 * relu'(z1)) ... via W2
    z1 = model[0](x).detach()
    torch.testing.assert_close(got["hidden"], (want @ model[2].weight.detach()) * (z1 > 0))
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    out = model[2](torch.randn(2, 5, requires_grad=True))
    assert out._backward_hooks is None  # outputs made after the block carry no gradient hook


def test_output_grads_skip_outputs_without_grad():
    lin = nn.Linear(3, 2).requires_grad_(False)
    with record_output_grads({"lin": lin}) as got:
        lin(torch.randn(4, 3))
    assert got == {} and not lin._forward_hooks


@pytest.mark.parametrize("training", [True, False])
def test_channel_stats_by_hand(training):
    conv = nn.Identity()
    x = torch.zeros(2, 2, 1, 2)
    x[:, 0] = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # channel 0: 1, 2, 3, 4
    x[:, 1] = 5.0  # channel 1: constant
    model = nn.Sequential(conv).train(training)
    with record_channel_stats({"c": conv}) as got:
        model(x)
    mean, std = got["c"]
    torch.testing.assert_close(mean, torch.tensor([2.5, 5.0], dtype=torch.float64))
    # biased std of 1, 2, 3, 4: sqrt(((1.5^2 + 0.5^2) * 2) / 4) = sqrt(1.25)
    torch.testing.assert_close(std, torch.tensor([1.25**0.5, 0.0], dtype=torch.float64))
    assert not conv._forward_hooks and model.training == training
    with record_channel_stats({"c": conv}), pytest.raises(ValueError, match="'c' returned"):
        conv(torch.ones(3))


def test_channel_stats_of_a_dense_layer_match_torch():
    lin = nn.Linear(4, 3)
    x = torch.randn(50, 4)
    with record_channel_stats({"lin": lin}) as got:
        out = lin(x).double()
    torch.testing.assert_close(got["lin"][0], out.mean(0))
    torch.testing.assert_close(got["lin"][1], out.std(0, correction=0))


def test_excess_kurtosis_by_hand_and_on_known_distributions():
    # two symmetric points: m2 = 1, m4 = 1 -> 1 - 3
    assert excess_kurtosis(torch.tensor([-1.0, 1.0])) == pytest.approx(-2.0)
    # 0, 0, 0, 1: m2 = 0.1875, m4 = 0.08203125 -> 7/3 - 3
    assert excess_kurtosis(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(7 / 3 - 3)
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    assert excess_kurtosis(torch.randn(n, generator=g)) == pytest.approx(0.0, abs=0.03)
    assert excess_kurtosis(torch.rand(n, generator=g)) == pytest.approx(-1.2, abs=0.02)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5  # Laplace by inverse CDF
    laplace = -u.sign() * torch.log1p(-2 * u.abs())
    assert excess_kurtosis(laplace) == pytest.approx(3.0, abs=0.15)
    with pytest.raises(ValueError, match="zero variance"):
        excess_kurtosis(torch.ones(5))
    with pytest.raises(ValueError, match="at least 2"):
        excess_kurtosis(torch.ones(1))
