"""Probes record exact percentiles of known data, remove themselves, never change a mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.probes import percentiles, record_inputs


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
