"""BatchWhitening (ZCA batch whitening) against independent oracles: numpy's eigendecomposition,
the output covariance being the identity, finite differences for the gradient (repeated
eigenvalues included), hand-computed running averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlab
from bnlab.layers import make_norm
from bnlab.layers.whitening import BatchWhitening, inverse_sqrt_psd


def _data(m, c, seed=0, dtype=torch.float64):
    """Correlated features with different scales and means."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, c, generator=g, dtype=dtype)
    mix = torch.randn(c, c, generator=g, dtype=dtype)
    return z @ mix + torch.linspace(-2, 3, c, dtype=dtype)


def _zca_numpy(x: np.ndarray, eps: float) -> np.ndarray:
    """The oracle: ZCA whitening of the rows of x with numpy (biased covariance)."""
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x)
    lam, u = np.linalg.eigh(cov)
    return xc @ (u @ np.diag(1.0 / np.sqrt(lam + eps)) @ u.T)


@pytest.mark.parametrize("group_size", [None, 3])
def test_training_output_is_whitened_and_matches_numpy(group_size):
    x = _data(200, 6)
    layer = BatchWhitening(6, group_size=group_size, eps=1e-9, dtype=torch.float64)
    y = layer(x)
    g = group_size or 6
    for k in range(6 // g):
        sl = slice(k * g, (k + 1) * g)
        ref = _zca_numpy(x[:, sl].numpy(), 1e-9)
        np.testing.assert_allclose(y[:, sl].detach().numpy(), ref, rtol=1e-8, atol=1e-9)
        block = y[:, sl].detach()
        cov = (block - block.mean(0)).T @ (block - block.mean(0)) / len(block)
        torch.testing.assert_close(cov, torch.eye(g, dtype=torch.float64), atol=1e-7, rtol=0)
    if group_size is None:  # full whitening: every pair decorrelated
        yc = y.detach() - y.detach().mean(0)
        torch.testing.assert_close(yc.T @ yc / 200, torch.eye(6, dtype=torch.float64),
                                   atol=1e-7, rtol=0)
    else:  # groups: features of different groups stay correlated
        yc = y.detach() - y.detach().mean(0)
        assert float((yc[:, :3].T @ yc[:, 3:] / 200).abs().max()) > 0.05


def test_affine_and_conv_inputs():
    x = _data(4 * 5 * 5, 4, seed=1).reshape(4, 5, 5, 4).movedim(-1, 1)  # (N, C, H, W)
    layer = BatchWhitening(4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 3.0]))
    y = layer(x)
    rows = x.movedim(1, -1).reshape(-1, 4).numpy()
    ref = _zca_numpy(rows, layer.eps) * layer.weight.detach().numpy() + layer.bias.detach().numpy()
    np.testing.assert_allclose(y.movedim(1, -1).reshape(-1, 4).detach().numpy(), ref,
                               rtol=1e-8, atol=1e-9)
    assert y.shape == x.shape


def test_running_statistics_and_inference():
    x1, x2 = _data(50, 5, seed=2), _data(50, 5, seed=3) * 2
    layer = BatchWhitening(5, momentum=0.1, dtype=torch.float64)
    layer(x1)
    layer(x2)

    def unbiased(x):
        xc = x - x.mean(0)
        return xc.T @ xc / (len(x) - 1)

    mean = 0.9 * (0.1 * x1.mean(0)) + 0.1 * x2.mean(0)
    cov = 0.9 * (0.9 * torch.eye(5, dtype=torch.float64) + 0.1 * unbiased(x1)) + 0.1 * unbiased(x2)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_cov[0], cov)
    assert int(layer.num_batches_tracked) == 2
    layer.eval()
    xt = _data(7, 5, seed=4)
    lam, u = np.linalg.eigh(cov.numpy())
    w = u @ np.diag(1.0 / np.sqrt(lam + layer.eps)) @ u.T
    np.testing.assert_allclose(layer(xt).detach().numpy(), (xt - mean).numpy() @ w, rtol=1e-9,
                               atol=1e-10)
    before = layer.running_cov.clone()
    layer(xt)  # inference changes nothing
    assert torch.equal(before, layer.running_cov)


def test_cumulative_momentum_none_averages_batches():
    x1, x2 = _data(30, 3, seed=5), _data(30, 3, seed=6)
    layer = BatchWhitening(3, momentum=None, dtype=torch.float64)
    layer(x1)
    layer(x2)
    torch.testing.assert_close(layer.running_mean, (x1.mean(0) + x2.mean(0)) / 2)


def test_gradient_matches_finite_differences():
    x = _data(12, 4, seed=7).requires_grad_()
    layer = BatchWhitening(4, group_size=2, eps=1e-3, dtype=torch.float64)
    torch.autograd.gradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-6)


def test_inverse_sqrt_gradient_with_repeated_eigenvalues():
    """A singular batch covariance (fewer samples than features) has repeated zero eigenvalues:
    the Loewner backward stays finite and agrees with finite differences."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    xc = xs - xs.mean(0)
    cov = (xc.T @ xc / 3).requires_grad_()  # rank 2 of 6: four zero eigenvalues
    torch.autograd.gradcheck(lambda a: inverse_sqrt_psd(a, 1e-2), (cov,), eps=1e-7, atol=1e-5)
    out = inverse_sqrt_psd(cov, 1e-2)
    out.sum().backward()
    assert torch.isfinite(cov.grad).all()
    # distinct eigenvalues: the same gradient as autograd through torch.linalg.eigh
    a = (torch.randn(5, 5, generator=g, dtype=torch.float64))
    a = (a @ a.T + torch.eye(5, dtype=torch.float64)).requires_grad_()
    gw = torch.randn(5, 5, generator=g, dtype=torch.float64)
    (inverse_sqrt_psd(a, 1e-3) * gw).sum().backward()
    b = a.detach().clone().requires_grad_()
    lam, u = torch.linalg.eigh(0.5 * (b + b.T))
    ((u / (lam + 1e-3).sqrt()) @ u.T * gw).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_singular_batch_whitens_its_span():
    """m <= features: the covariance is singular (Ioffe & Szegedy, section 3); the output is
    whitened on the batch's span (eigenvalues of its covariance near 1 or 0) and finite."""
    x = _data(5, 8, seed=8).requires_grad_()
    layer = BatchWhitening(8, eps=1e-10, dtype=torch.float64)
    y = layer(x)
    yc = y.detach() - y.detach().mean(0)
    lam = torch.linalg.eigvalsh(yc.T @ yc / 5)
    assert int((lam > 0.5).sum()) == 4 and torch.allclose(lam[lam > 0.5], torch.ones(4,
                                                          dtype=torch.float64), atol=1e-6)
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_input_is_refused_and_state_is_kept():
    layer = BatchWhitening(4)
    layer(_data(10, 4, dtype=torch.float32))
    mean, cov, n = layer.running_mean.clone(), layer.running_cov.clone(), int(
        layer.num_batches_tracked)
    bad = _data(10, 4, dtype=torch.float32)
    bad[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="BatchWhitening\\(4\\).*left unchanged"):
        layer(bad)
    assert torch.equal(mean, layer.running_mean) and torch.equal(cov, layer.running_cov)
    assert int(layer.num_batches_tracked) == n
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, 4))
    with pytest.raises(ValueError, match="expected input \\(N, 4"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="group_size"):
        BatchWhitening(6, group_size=4)
    with pytest.raises(ValueError, match="eps"):
        BatchWhitening(6, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        inverse_sqrt_psd(torch.eye(2), 0.0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_parameters_and_buffers_of_another_shape_are_refused_and_state_is_kept(train):
    """A parameter or buffer reassigned to another shape through ``.data``: refused with the
    layer named before the running averages move (a (4, 1) weight would otherwise broadcast
    against 4 rows into a (4, 4) output)."""
    for name, bad in [("weight", lambda t: t[:2]), ("weight", lambda t: t.view(4, 1)),
                      ("bias", lambda t: t[:3]), ("running_mean", lambda t: t[:2]),
                      ("running_cov", lambda t: t[:, :1])]:  # fmt: skip
        layer = BatchWhitening(4)
        layer(_data(10, 4, dtype=torch.float32))
        layer.train(train)
        t = getattr(layer, name)
        t.data = bad(t.data)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(RuntimeError, match=f"BatchWhitening\\(4\\): {name} should have shape"):
            layer(_data(4, 4, seed=1, dtype=torch.float32))
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)


def test_registered_as_a_norm_family():
    layer = make_norm("whiten", 8, 2, group_size=4)
    assert isinstance(layer, BatchWhitening) and layer.group_size == 4 and layer.groups == 2
    assert bnlab.BatchWhitening is BatchWhitening
    y = layer(torch.randn(3, 8, 4, 4))
    assert y.shape == (3, 8, 4, 4)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_cov", "num_batches_tracked"}
    other = make_norm("whiten", 8, 2, group_size=4)
    other.load_state_dict(sd)
    assert torch.equal(other.running_cov, layer.running_cov)
