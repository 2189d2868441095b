"""bnlab.batch_norm against torch.nn.functional.batch_norm, side by side: the same calls give
the same outputs, gradients, running statistics and strides, and the same refusals."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import bnlab

pytestmark = pytest.mark.usefixtures("backend")  # every test once per backend (conftest)

SHAPES = [(6, 5), (4, 3, 7), (4, 3, 5, 6), (2, 4, 3, 4, 5), (0, 3, 4, 4)]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last" and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed" and x.dim() == 3:  # a (N, L, C) sequence seen as (N, C, L)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["train", "train-without-stats", "eval"])
@pytest.mark.parametrize("affine", ["both", "none", "weight", "bias", "(C,1)"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_same_answers_as_torchs_function(shape, mode, affine, layout, grad):
    training, stats = mode != "eval", mode != "train-without-stats"
    c = shape[1]
    x = _layout(torch.randn(shape, dtype=torch.float64).mul(3).add(1).float(), layout)
    weight = torch.rand(c) + 0.5 if affine not in ("none", "bias") else None
    bias = torch.randn(c) if affine in ("both", "bias", "(C,1)") else None
    if affine == "(C,1)":
        weight, bias = weight.view(c, 1), bias.view(c, 1)
    rm, rv = (torch.randn(c), torch.rand(c) + 0.5) if stats else (None, None)
    results = []
    for fn in (bnlab.batch_norm, F.batch_norm):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
        # (torch's forward reads a (C, 1) weight and bias, its backward refuses them: the
        # oracle takes them as (C,), and bnlab's gradients come back in their own shape)
        flat = fn is F.batch_norm
        wi = None if weight is None else weight.reshape(-1 if flat else weight.shape).clone()
        bi = None if bias is None else bias.reshape(-1 if flat else bias.shape).clone()
        wi = None if wi is None else wi.requires_grad_()
        bi = None if bi is None else bi.requires_grad_()
        rmi = None if rm is None else rm.clone()
        rvi = None if rv is None else rv.clone()
        with torch.set_grad_enabled(grad):
            y = fn(xi, rmi, rvi, wi, bi, training, 0.3, 1e-4)
        if grad:
            y.mul(torch.linspace(-1, 2, y.numel()).view(y.shape)).sum().backward()
        results.append((y, xi.grad, wi, bi, rmi, rvi))
    (y, dx, w, b, rm1, rv1), (y_, dx_, w_, b_, rm2, rv2) = results
    torch.testing.assert_close(y, y_, rtol=2e-5, atol=2e-5)
    assert y.stride() == y_.stride() or y.numel() == 0
    torch.testing.assert_close(dx, dx_, rtol=2e-5, atol=2e-5)
    for ours, theirs in ((w, w_), (b, b_)):
        if ours is not None and grad:
            assert ours.grad.shape == ours.shape
            torch.testing.assert_close(ours.grad.view(-1), theirs.grad, rtol=2e-5, atol=5e-5)
    if stats:
        torch.testing.assert_close(rm1, rm2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv1, rv2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.0, 1.0, -0.5, 1.5, torch.tensor(0.25), 1])
def test_dtypes_and_every_momentum_torch_takes(dtype, momentum):
    shape = (8, 4, 3, 3)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    stats_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # (torch's mixed rule)
    weight = torch.rand(4, dtype=stats_dtype) + 0.5
    bias = torch.randn(4, dtype=stats_dtype)
    rm, rv = torch.randn(4, dtype=stats_dtype), torch.rand(4, dtype=stats_dtype) + 0.5
    outs = []
    for fn in (bnlab.batch_norm, F.batch_norm):
        rmi, rvi = rm.clone(), rv.clone()
        outs.append((fn(x, rmi, rvi, weight, bias, True, momentum, 1e-5), rmi, rvi))
    for ours, theirs in zip(*outs, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=_tol(dtype), atol=_tol(dtype))


BAD = {  # name: (call arguments after x, or a replacement x), expected torch class
    "momentum None": (dict(training=True, momentum=None), TypeError),
    "momentum string": (dict(training=True, momentum="fast"), TypeError),
    "eval without running_mean": (dict(rm=None), RuntimeError),
    "eval without running_var": (dict(rv=None), RuntimeError),
    "training with one of them": (dict(training=True, rv=None), ValueError),
    "eps 0 in training": (dict(training=True, eps=0.0), ValueError),
    "eps < 0 in eval": (dict(eps=-1.0), ValueError),
    "1-D input": (dict(x=torch.randn(3)), RuntimeError),
    "1 value per channel": (dict(x=torch.randn(1, 3), training=True), ValueError),
    "weight of another count": (dict(weight=torch.ones(4)), RuntimeError),
    "integer input": (dict(x=torch.ones(4, 3, 2, dtype=torch.int32)), NotImplementedError),
    "float8 input": (dict(x=torch.ones(4, 3, 2).to(torch.float8_e5m2)), NotImplementedError),
    "sparse input": (dict(x=torch.ones(4, 3, 2).to_sparse()), NotImplementedError),
    "jagged input": (dict(x=torch.nested.nested_tensor([torch.ones(3, 2), torch.ones(3, 4)],
                                                       layout=torch.jagged)), NotImplementedError),
    "training as a tensor": (dict(training=torch.tensor(True)), TypeError),
    "2-D running statistics": (dict(training=True, rm=torch.zeros(3, 1), rv=torch.ones(3, 1)),
                               RuntimeError),
    "float64 running statistics": (dict(training=True, rm=torch.zeros(3, dtype=torch.float64),
                                        rv=torch.ones(3, dtype=torch.float64)), RuntimeError),
    "running_mean requiring grad": (dict(rm=torch.zeros(3, requires_grad=True)), RuntimeError),
}  # fmt: skip


def test_repeated_calls_read_the_tensors_as_they_are_now():
    """The function keeps numpy views of the statistics and parameters between calls (found by
    the tensors' identities, checked by their memory): values changed in place, a tensor given
    new memory (``.data``, ``set_``), tensors freed and others made in their place, and more
    sets of tensors than the cache holds all give torch's answers, in eval and training."""
    from bnlab import autograd

    torch.manual_seed(0)
    x = torch.randn(6, 5)

    def fresh():
        return [torch.randn(5), torch.rand(5) + 0.5, torch.rand(5) + 0.5, torch.randn(5)]

    def same(rm, rv, w, b, training):
        ours_rm, ours_rv = rm.clone(), rv.clone()
        ours = bnlab.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-5)
        ours_state = (rm.clone(), rv.clone())
        rm.copy_(ours_rm), rv.copy_(ours_rv)
        theirs = F.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-5)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(ours_state, (rm, rv))

    for training in (False, True):
        rm, rv, w, b = fresh()
        same(rm, rv, w, b, training)
        with torch.no_grad():
            rm.add_(1.0), w.mul_(2.0)  # in place: read through the cached views
        same(rm, rv, w, b, training)
        rm.data = torch.randn(5)  # new memory behind the same tensor
        w.set_(torch.rand(5) + 0.5)
        same(rm, rv, w, b, training)
        for _ in range(3):  # freed, others (perhaps at the same ids) made in their place
            del rm, rv, w, b
            rm, rv, w, b = fresh()
            same(rm, rv, w, b, training)
        kept = [fresh() for _ in range(autograd._FUNCTION_VIEWS_MAX + 5)]  # (evicting the first)
        for tensors in kept + kept[:3]:
            same(*tensors, training)
        assert len(autograd._FUNCTION_VIEWS) <= autograd._FUNCTION_VIEWS_MAX


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_refusals_of_torchs_class_and_nothing_updated(case):
    change, error = BAD[case]
    args = dict(x=torch.randn(4, 3, 5), rm=torch.zeros(3), rv=torch.ones(3), weight=None,
                training=False, momentum=0.1, eps=1e-5) | change  # fmt: skip
    for fn in (F.batch_norm, bnlab.batch_norm):  # torch's class first: the oracle
        rm = None if args["rm"] is None else args["rm"].detach().clone()
        rv = None if args["rv"] is None else args["rv"].detach().clone()
        before = [None if t is None else t.clone() for t in (rm, rv)]
        call_rm = args["rm"] if args["rm"] is not None and args["rm"].requires_grad else rm
        with pytest.raises(error) as info:
            fn(args["x"], call_rm, rv, args["weight"], None, args["training"], args["momentum"],
               args["eps"])  # fmt: skip
        if fn is bnlab.batch_norm:
            assert "batch_norm" in str(info.value)
        for t, b in zip((rm, rv), before, strict=True):
            assert t is None or torch.equal(t, b)


@pytest.mark.parametrize("training", [True, False])
def test_running_statistics_that_require_grad_are_taken_outside_autograd(training):
    """torch refuses running statistics that require grad only while autograd records (the
    refusal above); under ``no_grad`` both functions take them, with the same answers."""
    x = torch.randn(4, 3, 5)
    stats = [torch.randn(3).requires_grad_(), (torch.rand(3) + 0.5).requires_grad_()]
    outs = []
    for fn in (F.batch_norm, bnlab.batch_norm):
        rm, rv = (t.detach().clone().requires_grad_() for t in stats)
        with torch.no_grad():
            outs.append((fn(x, rm, rv, None, None, training, 0.3, 1e-5), rm, rv))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)


def test_a_non_finite_batch_leaves_the_running_statistics_alone():
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = float("inf")
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    for requires_grad in (False, True):
        for xi in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):  # (and a sequence)
            with pytest.raises(FloatingPointError, match=r"batch_norm: non-finite.*\(4, 3, 5\)"):
                bnlab.batch_norm(xi.clone().requires_grad_(requires_grad), rm, rv, training=True)
            assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    with pytest.raises(ValueError, match="momentum"):  # torch would write NaN averages
        bnlab.batch_norm(torch.randn(4, 3), rm, rv, training=True, momentum=float("nan"))
    y = bnlab.batch_norm(x, None, None, training=True)  # no state to protect: torch's NaN
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), equal_nan=True)


@pytest.mark.parametrize("training", [True, False])
def test_tools_see_the_function(training, tmp_path):
    """torch.compile (no graph break), torch.export, jit.script and fx, against torch's
    function: outputs and running statistics."""

    class Net(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn
            self.register_buffer("rm", torch.zeros(3))
            self.register_buffer("rv", torch.ones(3))
            self.weight = torch.nn.Parameter(torch.rand(3) + 0.5)

        def forward(self, x):
            return self.fn(x, self.rm, self.rv, self.weight, None, self.training, 0.2, 1e-5)

    class Ours(Net):
        def __init__(self):
            super().__init__(None)

        def forward(self, x):
            return bnlab.batch_norm(x, self.rm, self.rv, self.weight, None, self.training, 0.2,
                                    1e-5)  # fmt: skip

    x = torch.randn(6, 3, 4, 4) * 2 + 1
    ref = Net(F.batch_norm).train(training)
    expected = ref(x)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    made = {
        "compile": lambda m: torch.compile(m, backend=counter, fullgraph=True),
        "export": lambda m: torch.export.export(m, (x,)).module(),
        "script": torch.jit.script,
        "fx": torch.fx.symbolic_trace,
    }
    for tool, make in made.items():
        model = Ours().train(training)
        model.weight.data.copy_(ref.weight.data)
        run = make(model)
        run.rm.zero_()  # (tracing may have run the forward on the real buffers)
        run.rv.fill_(1.0)
        torch.testing.assert_close(run(x), expected, rtol=1e-5, atol=1e-5, msg=tool)
        torch.testing.assert_close(run.rm, ref.rm, msg=tool)
        torch.testing.assert_close(run.rv, ref.rv, msg=tool)
    assert counter.frame_count == 1


@pytest.mark.parametrize("mode", ["train", "train-without-stats", "eval"])
def test_vmap_as_torchs_function(mode):
    """Per-sample calls under torch.vmap give the loop's answers; an update of running
    statistics from per-sample statistics is refused with torch's class, naming the call."""
    training, stats = mode != "eval", mode != "train-without-stats"
    xs = torch.randn(5, 4, 3, 6) * 2 + 1
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    weight = torch.rand(3) + 0.5

    def call(fn, x):
        return fn(x, rm.clone() if stats else None, rv.clone() if stats else None, weight, None,
                  training)  # fmt: skip

    if training and stats:
        for fn in (F.batch_norm, bnlab.batch_norm):
            with pytest.raises(RuntimeError, match="batch_norm" if fn is bnlab.batch_norm else ""):
                torch.vmap(lambda x, fn=fn: call(fn, x))(xs)
        return
    ours = torch.vmap(lambda x: call(bnlab.batch_norm, x))(xs)
    torch.testing.assert_close(ours, torch.stack([call(F.batch_norm, x) for x in xs]))


class _ActBN(torch.nn.BatchNorm2d):
    """A torch BatchNorm subclass that calls the function itself and fuses an activation, as
    model libraries write them (bnlab.convert leaves subclasses alone)."""

    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)  # fmt: skip
        return torch.nn.functional.silu(y)


def _torch_model(cumulative=True):
    """``cumulative``: the last layer's momentum None (which torch's layer turns into a number
    read from num_batches_tracked: torch.export refuses it in training, torch's own model too)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), _ActBN(4), torch.nn.Flatten(),
        torch.nn.Linear(4 * 36, 5), torch.nn.BatchNorm1d(5, momentum=None if cumulative else 0.1),
    )  # fmt: skip


@pytest.mark.parametrize("training", [True, False])
def test_patch_functional_runs_torchs_layers_on_bnlab_with_torchs_answers(training):
    original = F.batch_norm
    ours, ref = _torch_model().train(training), _torch_model().train(training)
    for step in range(2):
        x = torch.randn(6, 3, 6, 6) * 2 + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with bnlab.patch_functional():
            assert F.batch_norm is not original
            ya = ours(xa)
            ya.square().sum().backward()
        yb = ref(xb)
        yb.square().sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
            # (float32 sums in another order, through two BN backwards of a batch of 6, where
            # the parameters before a BN get gradients that are rounding left after cancellation)
            scale = 1e-3 * float(b.grad.abs().max()) + 1e-4
            assert float((a.grad - b.grad).abs().max()) <= scale, name
    assert F.batch_norm is original


def test_patch_functional_is_bnlabs_function_and_is_put_back_however_the_block_ends():
    original = F.batch_norm
    layer = torch.nn.BatchNorm2d(3)
    bad = torch.randn(4, 3, 5, 5)
    bad[1, 2, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="batch_norm: non-finite"):  # bnlab's refusal
        with bnlab.patch_functional():
            with bnlab.patch_functional():  # (nested: put back by the outer block)
                pass
            assert F.batch_norm is not original
            layer(bad)
    assert F.batch_norm is original
    assert torch.equal(layer.running_mean, torch.zeros(3))  # (torch's layer counted it first)
    assert int(layer.num_batches_tracked) == 1

    class Logged(torch.Tensor):  # a tensor that overrides torch functions keeps torch's one
        seen: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    with bnlab.patch_functional():
        F.batch_norm(torch.randn(4, 3).as_subclass(Logged), None, None, training=True)
    assert "batch_norm" in Logged.seen


@pytest.mark.parametrize("tool", ["compile", "export", "trace"])
def test_tools_inside_patch_functional(tool):
    """A torch-BN model compiled (no graph break), exported or traced inside the block gives
    the eager answers; in eval, the exported program holds torch's own operator."""
    import torch._dynamo.testing

    for training in (True, False):
        cumulative = not (tool == "export" and training)
        ref = _torch_model(cumulative).train(training)
        model = _torch_model(cumulative).train(training)
        x = torch.randn(6, 3, 6, 6)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        with bnlab.patch_functional():
            if tool == "compile":
                torch._dynamo.reset()
                run = torch.compile(model, backend=counter, fullgraph=True)
            elif tool == "export":
                run = torch.export.export(model, (x,)).module()
            else:
                run = torch.jit.trace(model, (x,), check_trace=False)
                run.load_state_dict(ref.state_dict())
            y = run(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        if tool == "compile":
            assert counter.frame_count == 1


@pytest.mark.parametrize("shape,training", [((4, 3, 5, 5), True), ((4, 3, 5, 5), False),
                                            ((2, 3, 4, 5, 5), False)])  # fmt: skip
def test_mkldnn_inputs_as_torchs_function(shape, training):
    """An MKL-DNN tensor, which torch's function takes for a 4-D batch in training (gradients
    to the weight and bias included) and 4-D and 5-D ones at inference: the same output (an
    MKL-DNN tensor too), running statistics and gradients, through a dense copy as the layers
    do."""
    x = (torch.randn(shape) * 2 + 1).to_mkldnn()
    got = []
    for fn in (F.batch_norm, bnlab.batch_norm):
        rm, rv = torch.zeros(3), torch.ones(3)
        w = torch.linspace(0.5, 1.5, 3).requires_grad_()
        b = torch.linspace(-1, 1, 3).requires_grad_()
        with torch.set_grad_enabled(training):  # (torch's MKL-DNN backward is for training)
            y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
            assert y.is_mkldnn
            y = y.to_dense()
            if training:
                y.square().sum().backward()
        got.append((y, rm, rv, w.grad, b.grad))
    for ours, theirs in zip(got[1], got[0], strict=True):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
