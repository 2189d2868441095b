"""Figure 1's training step (bnlab.experiments.mnist_step): the stacked networks and their
hand-written SGD step against autograd + torch.optim.SGD (float64) and against separate plain
networks; the BN layers' state against the layer's own forward; the cross-entropy kernel
against torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.experiments import mnist
from bnlab.experiments.mnist_kernels import grouped_cross_entropy
from bnlab.experiments.mnist_step import StackedMLP
from bnlab.models import MLP


def _separate_run(seed, norm, x, y, steps, cfg):
    """One network, the plain way: nn.Linear layers, bnlab.BatchNorm1d(100), its own loop."""
    model = MLP(norm=norm, init_std=cfg.init_std, init_seed=seed).double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    idx = mnist.sample_indices(mnist.data_generator(seed), len(y), steps, cfg.batch_size)
    for t in range(steps):
        loss = nn.functional.cross_entropy(model(x[idx[t]]), y[idx[t]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("how", ["sgd_step", "autograd"])
@pytest.mark.parametrize("norm", [None, "batchnorm1d"])
def test_batched_equals_separate_runs_for_20_steps(norm, how):
    """The stack trained as the experiment trains it (``sgd_step``: hand-written backward) and
    through autograd + torch.optim.SGD, against separate plain networks."""
    steps = 20
    cfg = mnist.MnistConfig(seeds=3, seed=5, lr=0.5, momentum=0.9, batch_size=16)
    g = torch.Generator().manual_seed(0)
    # float64, so the comparison is not blurred by bmm and mm rounding differently
    x = torch.rand(200, 784, generator=g, dtype=torch.float64)
    y = torch.randint(10, (200,), generator=g)
    seeds = [5, 6, 7]
    stacked = StackedMLP(3, norm=norm)
    stacked.init_gaussian_(seeds, cfg.init_std)
    stacked.double()
    opt = torch.optim.SGD(stacked.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    idx = torch.stack(
        [mnist.sample_indices(mnist.data_generator(s), 200, steps, cfg.batch_size) for s in seeds]
    )
    velocity = {p: torch.zeros_like(p) for p in stacked.parameters()}
    for t in range(steps):
        if how == "sgd_step":
            stacked.sgd_step(x[idx[:, t]], y[idx[:, t]], cfg.lr, cfg.momentum, velocity)
            continue
        logits = stacked(x[idx[:, t]])
        ce = (
            nn.functional.cross_entropy(
                logits.reshape(-1, 10), y[idx[:, t]].reshape(-1), reduction="none"
            )
            .view(3, -1)
            .mean(1)
        )
        opt.zero_grad()
        ce.sum().backward()
        opt.step()
    xt = torch.rand(50, 784, generator=g, dtype=torch.float64)
    stacked.eval()
    out = stacked(xt.expand(3, -1, -1))
    for k, seed in enumerate(seeds):
        ref = _separate_run(seed, norm, x, y, steps, cfg).eval()
        torch.testing.assert_close(out[k], ref(xt), rtol=1e-9, atol=1e-10)
        linears = [m for m in ref.modules() if isinstance(m, nn.Linear)]
        for w, lin in zip(stacked.weights, linears, strict=True):
            torch.testing.assert_close(w[k], lin.weight.t(), rtol=1e-9, atol=1e-11)
        if norm:
            bns = [m for m in ref.modules() if isinstance(m, bnlab.BatchNorm1d)]
            for bs, b in zip(stacked.norms, bns, strict=True):
                sl = slice(k * 100, (k + 1) * 100)
                torch.testing.assert_close(
                    bs.running_mean[sl], b.running_mean, atol=1e-11, rtol=1e-9
                )
                torch.testing.assert_close(bs.running_var[sl], b.running_var, atol=1e-11, rtol=1e-9)
                torch.testing.assert_close(bs.weight[sl], b.weight, atol=1e-11, rtol=1e-9)


def test_stacked_bn_is_bnlab_batchnorm():
    m = StackedMLP(4, norm="batchnorm1d")
    assert all(type(n) is bnlab.BatchNorm1d and n.num_features == 400 for n in m.norms)


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


@pytest.mark.parametrize("bn_momentum", [True, torch.tensor(0.3), None],
                         ids=["bool", "tensor", "none"])  # fmt: skip
def test_sgd_step_reads_every_momentum_the_layer_takes(bn_momentum):
    """The BN layers' momentum of any kind the layer itself takes (a bool, a 0-d tensor, None):
    the step's running statistics and counters equal those of forward + autograd."""
    auto = StackedMLP(3, in_features=20, hidden=(16, 12), norm="batchnorm1d")
    auto.init_gaussian_([1, 2, 3], 0.3)
    auto.double()
    for n in auto.norms:
        n.momentum = bn_momentum
    explicit = copy.deepcopy(auto)
    opt = torch.optim.SGD(auto.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(3, 16, 20, generator=g, dtype=torch.float64)
        y = torch.randint(10, (3, 16), generator=g)
        ce = nn.functional.cross_entropy(auto(x).reshape(-1, 10), y.reshape(-1), reduction="none")
        opt.zero_grad()
        ce.view(3, -1).mean(1).sum().backward()
        opt.step()
        explicit.sgd_step(x, y, 0.3)
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
    with bnlab.use_backend("reference"):  # a step on the reference path, then back
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
            m.norms[1].num_batches_tracked = torch.tensor(7)  # a new buffer object
    step_both(16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_step_runs_the_loops_the_layers_compiled(monkeypatch, dtype):
    """The step takes the layers' own compiled entry points with arguments of the types the
    layers' calls pass (every argument passed, the streaming flag included), so it runs the
    loops a layer's training step compiled (:func:`bnlab.kernels.warm_up`) and compiles none
    of its own: Numba types a value by its kind (an omitted defaulted argument, a literal, an
    array of another layout apart) and compiles every loop below an entry once per type."""
    import numba

    from bnlab.kernels import _numba as loops

    layer = bnlab.BatchNorm1d(16).to(dtype)  # a layer's training step: its signatures exist
    layer(torch.randn(8, 16, dtype=dtype, requires_grad=True)).sum().backward()
    dispatchers = {k: v for k, v in vars(loops).items()
                   if isinstance(v, numba.core.dispatcher.Dispatcher)}  # fmt: skip
    before = {k: len(v.signatures) for k, v in dispatchers.items()}
    calls = []

    def spy(name):
        dispatcher = getattr(loops, name)

        def call(*args):
            types = tuple(numba.typeof(a) for a in args)
            calls.append((name, types in {tuple(s) for s in dispatcher.signatures}))
            return dispatcher(*args)

        return call

    for name in ("train_fwd_at", "backward_at"):
        monkeypatch.setattr(loops, name, spy(name))
    net = StackedMLP(2, in_features=20, hidden=(16,), norm="batchnorm1d").to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 20, generator=g, dtype=dtype)
    y = torch.randint(10, (2, 16), generator=g)
    with bnlab.use_backend("auto"):
        net.sgd_step(x, y, 0.1)
    assert net.norms[0].num_batches_tracked.item() == 1
    assert calls == [("train_fwd_at", True), ("backward_at", True)]
    assert {k: len(v.signatures) for k, v in dispatchers.items()} == before


def test_sgd_step_bad_arguments():
    m = StackedMLP(2, in_features=8, hidden=(4,))
    x, y = torch.randn(2, 5, 8), torch.randint(10, (2, 5))
    with pytest.raises(ValueError, match="momentum needs a velocity"):
        m.sgd_step(x, y, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"expected x \(K=2"):
        m.sgd_step(torch.randn(3, 5, 8), torch.randint(10, (3, 5)), 0.1)
    with pytest.raises(ValueError, match="y"):
        m.sgd_step(x, y[:, :4], 0.1)


def _autograd_step(model, x, y, lr):
    """The oracle step: forward (the BN layers' own forward), autograd, torch.optim.SGD."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    k = x.shape[0]
    ce = nn.functional.cross_entropy(model(x).reshape(-1, 10), y.reshape(-1), reduction="none")
    ce = ce.view(k, -1).mean(1)
    opt.zero_grad()
    ce.sum().backward()
    opt.step()
    return ce.detach()


def _assert_same_state(a, b, rtol=1e-10, atol=1e-12):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sb.items():
        if key.endswith("num_batches_tracked"):
            assert sa[key].item() == value.item(), key
        else:
            torch.testing.assert_close(sa[key], value, rtol=rtol, atol=atol, msg=key)


def _pair(k=3, hidden=(16, 12), setup=None):
    """(explicit, auto): the same float64 stack twice, ``setup`` applied to both."""
    explicit = StackedMLP(k, in_features=20, hidden=hidden, norm="batchnorm1d")
    explicit.init_gaussian_(list(range(1, k + 1)), 0.3)
    explicit.double()
    if setup is not None:
        setup(explicit)
    return explicit, copy.deepcopy(explicit)


def _batch(g, k=3, n=16):
    x = torch.randn(k, n, 20, generator=g, dtype=torch.float64)
    return x, torch.randint(10, (k, n), generator=g)


def _no_tracking(m):
    for i, bn in enumerate(m.norms):
        m.norms[i] = bnlab.BatchNorm1d(bn.num_features, track_running_stats=False).double()
    bnlab.name_layers(m)


BN_SETUPS = {
    "momentum-None": lambda m: [setattr(bn, "momentum", None) for bn in m.norms],
    "momentum-1.5": lambda m: [setattr(bn, "momentum", 1.5) for bn in m.norms],
    "momentum--0.5": lambda m: [setattr(bn, "momentum", -0.5) for bn in m.norms],
    "momentum-0": lambda m: [setattr(bn, "momentum", 0) for bn in m.norms],
    "eps-0.1": lambda m: [setattr(bn, "eps", 0.1) for bn in m.norms],
    "bn-relu": lambda m: [setattr(bn, "activation", "relu") for bn in m.norms],
    "no-tracking": _no_tracking,
    "gamma-fixed": lambda m: m.norms[0].weight.requires_grad_(False),
    "bias-alone": lambda m: [setattr(bn, "weight", None) for bn in m.norms],
    "recomputed-population": lambda m: [
        setattr(bn, "population_estimator", "unbiased") for bn in m.norms
    ],
}


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("setup", list(BN_SETUPS), ids=list(BN_SETUPS))
def test_sgd_step_updates_bn_state_as_the_layer_forward_does(setup):
    """Whatever the BN layers' momentum (None, 0, any sign or size), eps, fused ReLU, tracking,
    trainable parameters or recomputed population statistics: after each step, parameters,
    running_mean/var, num_batches_tracked and population_estimator equal those of the same model
    trained through the layers' forward + autograd + torch.optim.SGD (float64)."""
    explicit, auto = _pair(setup=BN_SETUPS[setup])
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = _batch(g)
        ce = _autograd_step(auto, x, y, 0.3)
        loss = explicit.sgd_step(x, y, 0.3)
        torch.testing.assert_close(loss, ce, rtol=1e-12, atol=1e-12)
        _assert_same_state(explicit, auto)
        for a, b in zip(explicit.norms, auto.norms, strict=True):
            assert a.population_estimator == b.population_estimator
    if setup == "recomputed-population":
        assert all(bn.population_estimator is None for bn in explicit.norms)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("where", ["input", "second-bn"])
def test_sgd_step_refuses_a_non_finite_batch_as_the_layer_forward_does(where):
    """A batch with non-finite statistics raises FloatingPointError naming the BN layer, and
    leaves every buffer as the layer's forward leaves it: nothing moves when the first BN
    refuses; when the second refuses, the first has committed (as in the layer's forward).
    No weight moves (updates come after the forward). The step still works afterwards."""
    explicit, auto = _pair()
    g = torch.Generator().manual_seed(4)
    x, y = _batch(g)
    _autograd_step(auto, x, y, 0.3)
    explicit.sgd_step(x, y, 0.3)
    before = copy.deepcopy(explicit.state_dict())
    x, y = _batch(g)
    if where == "input":
        x[1, 3, 5] = float("nan")
        name = r"'norms.0' BatchNorm1d\(48\)"
    else:
        for m in (explicit, auto):  # net 0's first unit of the second layer: inf - inf = NaN
            m.weights[1].data[0, :, 0] = float("inf")
        before = copy.deepcopy(explicit.state_dict())
        name = r"'norms.1' BatchNorm1d\(36\)"
    with pytest.raises(FloatingPointError, match=name):
        auto(x)
    with pytest.raises(FloatingPointError, match=name + ".*left unchanged"):
        explicit.sgd_step(x, y, 0.3)
    _assert_same_state(explicit, auto)
    changed = {k for k, v in explicit.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == (set() if where == "input" else {
        "norms.0.running_mean", "norms.0.running_var", "norms.0.num_batches_tracked"
    })  # fmt: skip
    if where == "input":
        x, y = _batch(g)
        torch.testing.assert_close(explicit.sgd_step(x, y, 0.3), _autograd_step(auto, x, y, 0.3))
        _assert_same_state(explicit, auto)


def test_sgd_step_refuses_what_it_does_not_write_out_and_bad_momentum():
    """Eval mode, frozen BN, BN variants, one example per batch and a momentum that is not a
    finite number raise, naming the layer, before any state moves."""
    m = StackedMLP(2, in_features=8, hidden=(4, 4), norm="batchnorm1d")
    x, y = torch.randn(2, 5, 8), torch.randint(10, (2, 5))
    m.sgd_step(x, y, 0.1)
    before = copy.deepcopy(m.state_dict())
    m.eval()
    with pytest.raises(RuntimeError, match=r"'norms.0' BatchNorm1d\(8\) is in eval mode"):
        m.sgd_step(x, y, 0.1)
    m.train()
    bnlab.freeze(m)
    with pytest.raises(RuntimeError, match="frozen"):
        m.sgd_step(x, y, 0.1)
    bnlab.unfreeze(m)
    for bad, exc in [("0.1", TypeError), (torch.tensor([0.1]), TypeError),
                     (float("nan"), ValueError)]:  # fmt: skip
        m.norms[0].momentum = bad
        with pytest.raises(exc, match=r"'norms.0' BatchNorm1d\(8\): momentum"):
            m.sgd_step(x, y, 0.1)
    m.norms[0].momentum = 0.1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m.sgd_step(x[:, :1], y[:, :1], 0.1)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k

    class Shifted(bnlab.BatchNorm1d):
        def _train_forward(self, x):
            return super()._train_forward(x + 1)

    m.norms[1] = Shifted(8)
    with pytest.raises(TypeError, match="Shifted.*not a plain bnlab BatchNorm1d"):
        m.sgd_step(x, y, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["plain", "huge-logits"])
def test_grouped_cross_entropy_matches_torch(dtype, scale):
    """Loss and gradient of the one-pass kernel against torch's cross_entropy + autograd
    (float64 oracle); logits of magnitude 1e3 must not overflow."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(3, 17, 10, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(10, (3, 17), generator=g)
    loss, grad = grouped_cross_entropy(z, t)
    zr = z.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(zr.reshape(-1, 10), t.reshape(-1), reduction="none")
    ref = ref.view(3, 17).mean(1)
    ref.sum().backward()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(grad.double(), zr.grad, rtol=tol, atol=tol)
    assert loss.dtype == grad.dtype == dtype


def test_grouped_cross_entropy_bad_target_and_unsupported_input():
    z = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        grouped_cross_entropy(z, torch.full((2, 4), 5))
    assert grouped_cross_entropy(z.half(), torch.zeros(2, 4, dtype=torch.int64)) is None
    assert grouped_cross_entropy(z.transpose(0, 1), torch.zeros(4, 2, dtype=torch.int64)) is None
    assert grouped_cross_entropy(z, torch.zeros(2, 3, dtype=torch.int64)) is None  # shapes differ
