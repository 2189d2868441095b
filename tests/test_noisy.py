"""Noisy BN (Santurkar et al. 2018, Algorithm 1): the noise's distribution, its gradient, eval
mode, the "noisy-bn" and "noise" families in a ResNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.layers import ScaleShiftNoise, make_norm
from bnlab.models import ResNetCifar


def test_noise_has_the_papers_distribution():
    noise = ScaleShiftNoise(3)
    x = torch.zeros(100, 3, 4, 4, dtype=torch.float64)
    mus, sigmas, dm, ds = [], [], [], []
    for _ in range(100):
        s, m = noise.sample(x)
        # per value: m ~ U(mu_t -+ 0.1), so per channel a range of width 0.2 around mu_t
        lo, hi = m.amin((0, 2, 3)), m.amax((0, 2, 3))  # (3,)
        assert ((hi - lo) <= 0.2 + 1e-12).all() and ((hi - lo) > 0.19).all()
        mus.append((lo + hi) / 2)  # mu_t to within 0.005
        dm.append(m - m.mean((0, 2, 3), keepdim=True))
        # s ~ N(sigma_t, 0.1^2)
        sigma_t = s.mean((0, 2, 3))
        sigmas.append(sigma_t)
        ds.append(s - sigma_t.view(1, 3, 1, 1))
    assert float(torch.cat(dm).std()) == pytest.approx(0.1 / 3**0.5, rel=0.01)
    assert float(torch.cat(ds).std()) == pytest.approx(0.1, rel=0.01)
    mus, sigmas = torch.cat(mus), torch.cat(sigmas)
    # mu_t ~ U(-0.5, 0.5): variance 1/12; sigma_t ~ U(1, 1.25): variance 0.25^2 / 12
    assert float(mus.abs().max()) <= 0.5 + 1e-3 and float(mus.var()) == pytest.approx(1 / 12,
                                                                                        rel=0.15)
    # (sigma_t estimated by a mean of 1,600 values: standard error 0.0025)
    assert 1 - 0.01 <= float(sigmas.min()) and float(sigmas.max()) <= 1.25 + 0.01
    assert float(sigmas.var()) == pytest.approx(0.25**2 / 12, rel=0.15)


def test_forward_is_s_times_x_plus_m_with_gradient_s():
    noise = ScaleShiftNoise(4, activation=None)
    x = torch.randn(6, 4, 5, requires_grad=True)
    torch.manual_seed(7)
    s, m = noise.sample(x.detach())
    torch.manual_seed(7)
    y = noise(x)
    torch.testing.assert_close(y, s * x.detach() + m)
    y.sum().backward()
    torch.testing.assert_close(x.grad, s)
    torch.manual_seed(7)
    torch.testing.assert_close(noise(x), y)  # same seed, same noise
    assert not torch.equal(noise(x), y)  # next step, new noise


def test_eval_mode_is_identity_and_relu_comes_after_the_noise():
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(ScaleShiftNoise(3).eval()(x), x)
    assert torch.equal(ScaleShiftNoise(3, activation="relu").eval()(x), x.clamp_min(0))
    noise = ScaleShiftNoise(3, activation="relu")
    torch.manual_seed(1)
    s, m = noise.sample(x)
    torch.manual_seed(1)
    torch.testing.assert_close(noise(x), (s * x + m).clamp_min(0))


def test_bad_arguments_and_inputs_are_refused():
    with pytest.raises(ValueError, match="scale_noise >= 1"):
        ScaleShiftNoise(3, scale_noise=0.5)
    with pytest.raises(ValueError, match="activation"):
        ScaleShiftNoise(3, activation="tanh")
    with pytest.raises(ValueError, match=r"expected an input of shape \(N, 3"):
        ScaleShiftNoise(3)(torch.zeros(2, 4))


def test_families_build_resnets_that_train():
    layer = make_norm("noisy-bn", 8, 2)
    assert isinstance(layer[0], bnlab.BatchNorm2d) and isinstance(layer[1], ScaleShiftNoise)
    assert isinstance(make_norm("noise", 8, 0, activation="relu"), ScaleShiftNoise)
    x, y = torch.rand(8, 1, 12, 12), torch.randint(10, (8,))
    for norm in ("noisy-bn", "noise"):
        torch.manual_seed(0)
        model = ResNetCifar(8, norm=norm, fuse_relu=True, in_channels=1)
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters())
    # noisy-bn in eval mode is the BN network with the same weights
    torch.manual_seed(0)
    noisy = ResNetCifar(8, norm="noisy-bn", in_channels=1)
    torch.manual_seed(0)
    plain = ResNetCifar(8, norm="bn", in_channels=1)
    plain_params = dict(plain.named_parameters())
    for (name, p), q in zip(noisy.named_parameters(), plain.parameters(), strict=True):
        assert p.shape == q.shape, name
        torch.testing.assert_close(p, q)
    assert len(plain_params) == len(dict(noisy.named_parameters()))
    torch.testing.assert_close(noisy.eval()(x), plain.eval()(x))
