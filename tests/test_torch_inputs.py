"""torch's answer on every input torch accepts, side by side with ``torch.nn.BatchNorm*``.

The same inputs go through torch's layer and bnlab's (both backends): outputs, gradients, running
statistics, ``num_batches_tracked``, and whether each raises. The inputs follow PyTorch's own
BatchNorm tests: empty batches (zero samples or zero positions), one sample with several
positions, momentum None, affine off, ``track_running_stats`` off (in training and in eval,
where torch then uses batch statistics) and switched after construction, ``eps = 0`` and
negative eps, running statistics that require grad (refused while autograd records, taken
under ``no_grad``), every combination of input and parameter dtypes, and tensor subclasses
that run torch's operators themselves. Where torch refuses after
having counted the batch in ``num_batches_tracked`` (one value per channel, ``eps <= 0`` in
training), bnlab refuses the same input before touching anything; and a running statistic
whose channels share memory, which torch's training call fills with one channel's average,
bnlab refuses: the two documented differences.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch
from torch import nn

import bnlab
from bnlab.errors import InputDtypeError, InputLayoutError
from conftest import RecordingMode, family_classes

pytestmark = pytest.mark.usefixtures("backend")  # every test once per backend (conftest)


def pair(shape, **kwargs):
    ours_cls, torch_cls = family_classes(shape)
    ours = ours_cls(shape[1], **kwargs)
    theirs = torch_cls(shape[1], **kwargs)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.uniform_(0.5, 1.5)
            ours.weight.copy_(theirs.weight)
        if theirs.bias is not None:
            theirs.bias.normal_()
            ours.bias.copy_(theirs.bias)
        if theirs.running_mean is not None:
            theirs.running_mean.normal_()
            theirs.running_var.uniform_(0.5, 2)
            ours.running_mean.copy_(theirs.running_mean)
            ours.running_var.copy_(theirs.running_var)
    return ours, theirs


def tol(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=2e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=4e-2),
        torch.float16: dict(rtol=2e-3, atol=4e-3),
    }[dtype]


def run(layer, x, dy):
    """(output, x grad, param grads, state, exception type) of one call (+ backward)."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    try:
        y = layer(x)
        y.backward(dy)
    except Exception as exc:  # noqa: BLE001 - the test compares what each raises
        return None, None, None, copy.deepcopy(layer.state_dict()), type(exc)
    grads = [p.grad for p in layer.parameters()]
    return y.detach(), x.grad, grads, copy.deepcopy(layer.state_dict()), None


def assert_same(ours, theirs, x, dy=None, raises_only_ours=False):
    """Run x through both; compare what comes out. ``raises_only_ours``: torch's refusal
    happens after it counted the batch; bnlab refuses before (the state stays as it was)."""
    dy = torch.randn_like(x) if dy is None else dy
    before = copy.deepcopy(ours.state_dict())
    yo, go, po, so, eo = run(ours, x, dy)
    yt, gt, pt, st, et = run(theirs, x, dy)
    assert (eo is None) == (et is None), f"bnlab raised {eo}, torch raised {et}"
    if eo is not None:
        assert issubclass(eo, (ValueError, TypeError, RuntimeError)), eo
        if raises_only_ours:
            for k in before:
                assert torch.equal(so[k], before[k]), f"{k} changed by a refused batch"
        return eo
    t = dict(tol(x.dtype), equal_nan=True)  # (a negative momentum can make running_var < 0)
    assert yo.dtype == yt.dtype and yo.shape == yt.shape
    torch.testing.assert_close(yo, yt, **t)
    torch.testing.assert_close(go, gt, **t)
    for a, b in zip(po, pt, strict=True):
        torch.testing.assert_close(a, b, **t)
    assert so.keys() == st.keys()
    for k in so:
        torch.testing.assert_close(so[k], st[k], **t, msg=k)
    return None


# ----------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (4, 3, 0), (2, 3, 0, 5)])
def test_empty_batch(shape, training, track, momentum):
    """torch returns an empty output, zero gradients for gamma and beta, counts the batch in
    training (with tracking) and leaves the running averages as they are."""
    ours, theirs = pair(shape, momentum=momentum, track_running_stats=track)
    ours.train(training)
    theirs.train(training)
    assert assert_same(ours, theirs, torch.randn(shape)) is None
    # and the next real batch averages as torch does (with momentum None the empty batch counted)
    full = (4,) + shape[1:2] + tuple(max(s, 2) for s in shape[2:])
    assert assert_same(ours, theirs, torch.randn(full) * 2 + 1) is None


# ----------------------------------------------------------------------------- batch sizes
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (1, 3, 2), (2, 3), (1, 3, 1, 2)])
def test_small_batches_torch_accepts(shape, training):
    ours, theirs = pair(shape)
    ours.train(training)
    theirs.train(training)
    assert assert_same(ours, theirs, torch.randn(shape) * 3) is None


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_refused_as_torch_but_before_counting(shape, track):
    ours, theirs = pair(shape, track_running_stats=track)
    exc = assert_same(ours, theirs, torch.randn(shape), raises_only_ours=True)
    assert exc is ValueError
    if track:  # torch counted the refused batch; bnlab did not
        assert theirs.num_batches_tracked.item() == 1
        assert ours.num_batches_tracked.item() == 0
        theirs.num_batches_tracked.zero_()
    # eval mode with running statistics: accepted by both
    ours.eval()
    theirs.eval()
    x = torch.randn(shape)
    assert assert_same(ours, theirs, x) is (None if track else ValueError)


@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (6, 4)])
def test_a_running_statistic_sharing_memory_is_refused_untouched(shape, buffer):
    """A running statistic whose channels share one element (``expand``): torch's layer writes
    every channel's average into it and keeps the last one, a state no channel had; bnlab
    refuses the training call, naming the layer and the buffer, and changes nothing. Inference
    only reads the buffer: outputs and gradients as the float64 formula gives them (torch's
    own inference backward of a 2-D input reads such a buffer wrongly, so it is no oracle)."""
    ours, theirs = pair(shape)
    for layer in (ours, theirs):
        setattr(layer, buffer, torch.full((1,), 1.5).expand(shape[1]))
    x = torch.randn(shape)
    with torch.no_grad():
        theirs(x)
    kept = getattr(theirs, buffer)  # (one value: the last channel's update)
    assert kept.unique().numel() == 1 and kept[0].item() != 1.5
    before = {k: (v.clone(), v.stride()) for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"{type(ours).__name__}\(4\): {buffer} has elements "
                       "that share memory"):  # fmt: skip
        ours(x.clone().requires_grad_())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1], k
    ours.eval()
    dy = torch.randn(shape)
    xg = x.clone().requires_grad_()
    ours(xg).backward(dy)
    view = [1] * len(shape)
    view[1] = shape[1]
    x64 = x.double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (ours.weight, ours.bias))
    mean, var = (t.double().reshape(view) for t in (ours.running_mean, ours.running_var))
    y64 = (x64 - mean) / torch.sqrt(var + ours.eps) * w64.reshape(view) + b64.reshape(view)
    y64.backward(dy.double())
    for got, want in ((ours(x).detach(), y64.detach()), (xg.grad, x64.grad),
                      (ours.weight.grad, w64.grad), (ours.bias.grad, b64.grad)):  # fmt: skip
        torch.testing.assert_close(got, want.float(), **tol(torch.float32))


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
def test_a_running_statistic_that_requires_grad(buffer, training, mode):
    """A running statistic that requires grad: while autograd records, torch refuses the call
    (in training and in eval, whether or not the input requires grad) and so does bnlab, naming
    the layer and the buffer, with nothing counted or updated; under ``no_grad`` and
    ``inference_mode`` both take it, with the same output and state."""
    shape = (6, 4, 3, 3)
    ours, theirs = pair(shape)
    for layer in (ours, theirs):
        setattr(layer, buffer, getattr(layer, buffer).clone().requires_grad_())
        layer.train(training)
    x = torch.randn(shape)
    if mode == "grad":
        with pytest.raises(RuntimeError, match=buffer):
            theirs(x)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        for xi in (x, x.clone().requires_grad_()):
            with pytest.raises(RuntimeError, match=rf"BatchNorm2d\(4\): {buffer} requires grad"):
                ours(xi)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), k
        return
    with getattr(torch, mode)():
        got, want = ours(x), theirs(x)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, **tol(torch.float32), msg=k)
    assert getattr(ours, buffer).requires_grad


@pytest.mark.parametrize("buffer", ["running_mean", "running_var", "num_batches_tracked"])
def test_buffers_made_in_inference_mode_take_the_update_as_ordinary_ones(buffer):
    """A model built under ``torch.inference_mode()`` and trained outside it: its buffers are
    inference tensors, which in-place operations outside that mode refuse. torch's operator
    writes them through its kernel under ``no_grad``; bnlab's layer takes the update on both
    backends, all of it (the state of a layer whose buffers are ordinary tensors), in training
    with autograd as well."""
    shape = (6, 4, 3, 3)
    ours, theirs = pair(shape)
    with torch.inference_mode():
        made = getattr(ours, buffer).clone()
    setattr(ours, buffer, made)
    x = torch.randn(shape)
    ours(x.clone().requires_grad_()).sum().backward()
    with torch.no_grad():
        theirs(x)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, **tol(torch.float32), msg=k)


# ----------------------------------------------------------------------------- eps
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), 1e-3])
@pytest.mark.parametrize("training", [True, False])
def test_eps(eps, training):
    """torch refuses eps <= 0 with batch statistics and eps < 0 with population statistics;
    eps = 0 in eval mode (and a NaN eps anywhere) is computed."""
    shape = (4, 3, 5, 5)
    ours, theirs = pair(shape, eps=eps)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(shape)
    if eps != eps:  # NaN: both compute a NaN output, running statistics from the data
        with torch.no_grad():
            yo, yt = ours(x), theirs(x)
        assert yo.isnan().all() and yt.isnan().all()
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        return
    exc = assert_same(ours, theirs, x, raises_only_ours=True)
    refused = eps <= 0 if training else eps < 0
    assert (exc is ValueError) == refused


def test_eps_set_after_construction_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 3), bnlab.BatchNorm1d(3))
    bnlab.name_layers(model)
    model[1].eps = 0
    with pytest.raises(ValueError, match=r"'1' BatchNorm1d\(3\): eps must be > 0"):
        model(torch.randn(5, 4))
    assert model[1].num_batches_tracked.item() == 0
    model.eval()
    model(torch.randn(5, 4))  # eps = 0 with population statistics: as torch, computed


# ----------------------------------------------------------------------------- dtypes
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
def test_dtype_combinations(x_dtype, training):
    """torch's CPU rule: parameters and running statistics all of the input's dtype, or all
    float32 under a float16/bfloat16 input; anything else raises on both, bnlab naming the
    layer."""
    shape = (6, 3, 4, 4)
    for p_dtype, r_dtype in itertools.product(DTYPES, DTYPES):
        ours, theirs = pair(shape)
        for layer in (ours, theirs):
            layer.train(training)
            layer.weight.data = layer.weight.data.to(p_dtype)
            layer.bias.data = layer.bias.data.to(p_dtype)
            layer.running_mean = layer.running_mean.to(r_dtype)
            layer.running_var = layer.running_var.to(r_dtype)
        x = (torch.randn(shape) * 2 + 1).to(x_dtype)
        exc = assert_same(ours, theirs, x, dy=torch.randn(shape).to(x_dtype))
        ok = {p_dtype, r_dtype} == {x_dtype} or (
            x_dtype in (torch.float16, torch.bfloat16) and {p_dtype, r_dtype} == {torch.float32}
        )
        assert (exc is None) == ok, (p_dtype, r_dtype)
        if not ok:
            with pytest.raises(TypeError, match=r"BatchNorm2d\(3\): input of dtype"):
                ours(x)


# ----------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("momentum", [None, 0.1, 0.0, 1.0, -0.5, 1.5])
@pytest.mark.parametrize("affine", [True, False])
def test_num_batches_tracked_and_averages_over_modes(momentum, affine):
    """num_batches_tracked exactly as torch's through training steps, eval steps, switching
    track_running_stats off and on after construction, and back to training."""
    shape = (5, 3, 4)
    ours, theirs = pair(shape, momentum=momentum, affine=affine)
    for training, track in [(True, True), (True, True), (False, True), (True, False),
                            (False, False), (True, True)]:  # fmt: skip
        for layer in (ours, theirs):
            layer.train(training)
            layer.track_running_stats = track
        assert assert_same(ours, theirs, torch.randn(shape) * 2 + 0.5) is None


@pytest.mark.parametrize("decomposed", [False, True], ids=["eager", "standard-ops"])
@pytest.mark.parametrize("removed", ["running stats", "counter", "counter, momentum None"])
@pytest.mark.parametrize("training", [True, False])
def test_buffers_set_to_none_after_construction(training, removed, decomposed):
    """Running statistics or the counter set to None on a tracking layer, as torch's layer
    allows: torch counts the batch whenever the counter is there (with or without running
    averages) and, without a counter, updates the averages with the momentum, or with a factor
    of 0 for momentum None. The same through the standard-op form (forward-mode AD takes it)."""
    import torch.autograd.forward_ad as fwAD

    shape = (5, 3, 4)
    ours, theirs = pair(shape, momentum=None if "momentum" in removed else 0.1)
    for layer in (ours, theirs):
        layer.train(training)
        if removed == "running stats":
            layer.running_mean = layer.running_var = None
        else:
            layer.num_batches_tracked = None
    for _ in range(2):
        x = torch.randn(shape) * 2 + 0.5
        if not decomposed:
            assert assert_same(ours, theirs, x) is None
            continue
        with torch.no_grad():
            want = theirs(x)
            with fwAD.dual_level():
                got = fwAD.unpack_dual(ours(fwAD.make_dual(x, torch.randn(shape)))).primal
        torch.testing.assert_close(got, want, **tol(torch.float32))
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, **tol(torch.float32), msg=k)


@pytest.mark.parametrize("training", [True, False])
def test_no_running_stats_uses_batch_statistics_in_both_modes(training):
    shape = (6, 4, 3, 3)
    ours, theirs = pair(shape, track_running_stats=False)
    ours.train(training)
    theirs.train(training)
    assert ours.num_batches_tracked is None
    for _ in range(2):
        assert assert_same(ours, theirs, torch.randn(shape) - 1) is None


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_inputs(layout):
    shape = (4, 3, 6, 6)
    ours, theirs = pair(shape)
    x = torch.randn(shape)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x[:, :, ::2, 1:]
    assert assert_same(ours, theirs, x) is None
    with torch.no_grad():
        assert ours(x).is_contiguous(memory_format=torch.channels_last) == (
            theirs(x).is_contiguous(memory_format=torch.channels_last)
        )


REFUSED = {
    "channels": (lambda m: None, lambda: torch.randn(4, 5, 5, 5), ValueError),
    "integer input": (lambda m: None, lambda: torch.ones(4, 3, 5, 5, dtype=torch.int64), TypeError),
    "bool input": (lambda m: None, lambda: torch.ones(4, 3, 5, 5, dtype=torch.bool), TypeError),
    "complex input": (lambda m: None, lambda: torch.randn(4, 3, 5, 5, dtype=torch.cfloat),
                      TypeError),
    "mixed dtypes": (lambda m: m.double(), lambda: torch.randn(4, 3, 5, 5), TypeError),
    "not a tensor": (lambda m: None, lambda: [[1.0, 2.0, 3.0]], TypeError),
    "rank": (lambda m: None, lambda: torch.randn(4, 3, 5), ValueError),
    "float8 input": (lambda m: None,
                     lambda: torch.randn(4, 3, 5, 5).to(torch.float8_e4m3fn), InputDtypeError),
    "quantized input": (lambda m: None,
                        lambda: torch.quantize_per_tensor(torch.randn(4, 3, 5, 5), 0.1, 0,
                                                          torch.quint8), InputDtypeError),
    "sparse input": (lambda m: None, lambda: torch.randn(4, 3, 5, 5).to_sparse(),
                     InputLayoutError),
    "nested input": (lambda m: None,
                     lambda: torch.nested.nested_tensor([torch.randn(3, 5, 5),
                                                         torch.randn(3, 4, 5)]), InputLayoutError),
    "jagged input": (lambda m: None,
                     lambda: torch.nested.nested_tensor([torch.randn(3, 5, 5),
                                                         torch.randn(3, 4, 5)],
                                                        layout=torch.jagged), InputLayoutError),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
@pytest.mark.parametrize("training", [True, False])
def test_refusals_are_of_the_class_torch_raises(case, training):
    """An input torch's layer refuses raises in bnlab's layer an exception of the class torch
    raises (so ``except RuntimeError:`` written against torch's layer catches it) and of
    bnlab's documented class, naming the layer; the state is untouched."""
    setup, make, ours_class = REFUSED[case]
    ours, theirs = bnlab.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for layer in (ours, theirs):
        setup(layer)
        layer.train(training)
    x = make()
    with pytest.raises(Exception) as caught:
        theirs(x)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ours_class, match=r"BatchNorm2d\(3\)") as ours_caught:
        ours(x)
    assert isinstance(ours_caught.value, type(caught.value)), (type(caught.value), ours_caught)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k


def _odd_layouts():
    """Inputs of unusual strides, as views of other tensors give them: ``(name, x)``."""
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    return [
        ("expanded", torch.randn(8, 4, 5, 1).expand(8, 4, 5, 6)),
        ("transposed H, W", torch.randn(8, 4, 6, 5).transpose(2, 3)),
        ("transposed N, C", torch.randn(4, 8, 5, 6).transpose(0, 1)),
        ("every other batch", torch.randn(16, 4, 5, 6)[::2]),
        ("every other channel", torch.randn(8, 8, 5, 6)[:, ::2]),
        ("overlapping", torch.as_strided(torch.randn(1000), (8, 4, 5, 6), (30, 7, 6, 1))),
        ("channels_last, every other column",
            torch.randn(8, 4, 5, 12).to(memory_format=cl)[..., ::2]),
        ("permuted, channels innermost", torch.randn(5, 6, 8, 4).permute(2, 3, 0, 1)),
        ("channels_last (N, C, 1, 1)", torch.randn(8, 4, 1, 1).to(memory_format=cl)),
        ("channels_last, one channel", torch.randn(8, 1, 5, 6).to(memory_format=cl)),
        ("channels_last, size-1 stride", torch.randn(8, 4, 1, 6).to(memory_format=cl)
            .as_strided((8, 4, 1, 6), (24, 1, 999, 4))),
        ("channels_last, spatial transposed", torch.randn(8, 4, 5, 6).to(memory_format=cl)
            .transpose(2, 3)),
        ("(N, C) transposed", torch.randn(4, 8).t()),
        ("(N, L, C) transposed", torch.randn(8, 5, 4).transpose(1, 2)),
        ("channels_last_3d", torch.randn(2, 4, 3, 5, 6).to(memory_format=cl3)),
        ("5-D permuted", torch.randn(2, 3, 5, 6, 4).permute(0, 4, 1, 2, 3)),
    ]  # fmt: skip


def _memory_order(t):
    """t's strides on its dimensions of more than one element (its memory order)."""
    return [s for s, n in zip(t.stride(), t.shape, strict=True) if n > 1]


@pytest.mark.parametrize("under_a_mode", [False, True], ids=["eager", "dispatch-mode"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
def test_outputs_and_gradients_have_torchs_strides(training, relu, under_a_mode):
    """The output has the strides torch's layer gives it for every input layout (contiguous, or
    the input's channels_last format with that format's own strides, or the layout torch's
    reading of the strides suggests), so views and formats downstream behave as with torch; the
    gradient of a leaf input has the memory order torch's has (the strides of size-1 dimensions
    aside, which torch sets differently from one graph to another). Values and running
    statistics as torch's, gradients as float64 autograd's, with and without a graph; also
    under a dispatch mode, where bnlab's layers run as their operators (whose outputs follow
    their inputs' strides in a graph)."""
    with RecordingMode() if under_a_mode else contextlib.nullcontext():
        _check_strides_as_torchs(training, relu)


def _check_strides_as_torchs(training: bool, relu: bool) -> None:
    for name, base in _odd_layouts():
        ours, theirs = pair(tuple(base.shape))
        ours.activation = "relu" if relu else None
        ours.train(training), theirs.train(training)
        with torch.no_grad():
            y, want = ours(base), theirs(base)
            want = torch.relu(want) if relu else want
        torch.testing.assert_close(y, want, **tol(base.dtype), msg=name)
        assert y.stride() == want.stride(), name
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, msg=name)
        if 0 in base.stride():
            continue  # (no leaf tensor has such strides)
        xs = [torch.empty_strided(base.shape, base.stride()).copy_(base).requires_grad_()
              for _ in range(2)]  # fmt: skip
        state = copy.deepcopy(ours)
        y, want = ours(xs[0]), theirs(xs[1])
        want = torch.relu(want) if relu else want
        assert y.stride() == want.stride(), name
        dy = torch.randn(base.shape)
        y.backward(dy), want.backward(dy)
        assert _memory_order(xs[0].grad) == _memory_order(xs[1].grad), name
        # the values against float64 autograd: torch's own gradient is wrong for a channels_last
        # input whose size-1 dimension has another stride
        xd = base.detach().double().requires_grad_()
        dims = [d for d in range(xd.dim()) if d != 1]
        view = [1, -1] + [1] * (xd.dim() - 2)
        if training:
            mean, var = xd.mean(dims, keepdim=True), xd.var(dims, unbiased=False, keepdim=True)
        else:
            mean = state.running_mean.double().view(view)
            var = state.running_var.double().view(view)
        yd = (xd - mean) / (var + state.eps).sqrt() * state.weight.double().view(view)
        yd = yd + state.bias.double().view(view)
        (torch.relu(yd) if relu else yd).backward(dy.double())
        torch.testing.assert_close(xs[0].grad, xd.grad.float(), **tol(base.dtype), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_a_transposed_sequence_gets_torchs_gradients_first_and_second_order(dtype, training):
    """BatchNorm1d on a (N, L, C) sequence transposed to (N, C, L) (channels innermost, whose
    gradient the kernels write back in that layout): the leaf's gradient as torch's (values and
    memory order), and a gradient penalty through it (double backward) as torch's."""
    tol_ = tol(dtype) if dtype != torch.bfloat16 else dict(rtol=3e-2, atol=5e-2)
    for c in (6, 40, 200):  # (the kernels write it up to SWAP_MAX_C channels, torch's copy above)
        ours, theirs = pair((5, c, 7))
        ours.to(dtype if dtype != torch.bfloat16 else torch.float32)
        theirs.to(dtype if dtype != torch.bfloat16 else torch.float32)
        ours.train(training), theirs.train(training)
        base = torch.randn(5, 7, c, dtype=torch.float64).to(dtype)
        dy = torch.randn(5, c, 7, dtype=torch.float64).to(dtype)
        grads = []
        for layer in (ours, theirs):
            leaf = base.clone().requires_grad_()
            layer(leaf.transpose(1, 2)).backward(dy)
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1], **tol_)
        assert grads[0].stride() == grads[1].stride() == base.stride()
        if dtype == torch.bfloat16:
            continue  # (second order in float32/float64 only)
        penalties = []
        for layer in (ours, theirs):
            leaf = base.clone().requires_grad_()
            (g,) = torch.autograd.grad(layer(leaf.transpose(1, 2)).square().sum(), leaf,
                                       create_graph=True)  # fmt: skip
            penalty = g.square().sum()
            penalties.append((penalty, torch.autograd.grad(penalty, leaf)[0]))
        torch.testing.assert_close(penalties[0][0], penalties[1][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(penalties[0][1], penalties[1][1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad(training):
    """Dual tensors (torch.autograd.forward_ad): the same output, tangent and running
    statistics as torch's layer."""
    import torch.autograd.forward_ad as fwAD

    shape = (4, 3, 5, 5)
    ours, theirs = pair(shape)
    x, t = torch.randn(shape), torch.randn(shape)
    out = []
    for layer in (ours, theirs):
        layer.train(training)
        with fwAD.dual_level():
            out.append(fwAD.unpack_dual(layer(fwAD.make_dual(x, t))))
    torch.testing.assert_close(out[0].primal, out[1].primal, **tol(torch.float32))
    torch.testing.assert_close(out[0].tangent, out[1].tangent, **tol(torch.float32))
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, **tol(torch.float32), msg=k)


@pytest.mark.parametrize("training", [True, False])
def test_functions_read_weight_and_bias_in_any_shape_and_name_wrong_counts(training):
    """bnlab.batch_norm_train/eval read a weight or bias of C values in any shape, as
    ``torch.nn.functional.batch_norm`` does (its output the oracle), gradients in their own
    shapes (those of the (C,) call: torch's backward refuses a 2-D weight); another count, or a
    running statistic that is not 1-D, is refused naming the function and argument."""
    x = torch.randn(6, 4, 3, 5, requires_grad=True)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    w = (torch.rand(4, 1) + 0.5).requires_grad_()
    b = torch.randn(2, 2).requires_grad_()

    def ours(w, b):
        if training:
            return bnlab.batch_norm_train(x, w, b, 1e-5, "relu")[0]
        return bnlab.batch_norm_eval(x, rm, rv, w, b, 1e-5, "relu")

    y = ours(w, b)
    with torch.no_grad():
        want = torch.relu(nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training))
    torch.testing.assert_close(y, want)
    grads = torch.autograd.grad(y.square().sum(), [x, w, b])
    flat = torch.autograd.grad(ours(w.view(4), b.view(4)).square().sum(), [x, w, b])
    for g, f, t in zip(grads, flat, (x, w, b), strict=True):
        assert g.shape == t.shape
        torch.testing.assert_close(g, f)
    name = "batch_norm_train" if training else "batch_norm_eval"
    with pytest.raises(RuntimeError, match=rf"{name}: weight should hold 4 values.*\(3,\)"):
        ours(torch.ones(3), None)
    with pytest.raises(RuntimeError, match=rf"{name}: bias should hold 4 values.*\(5,\)"):
        ours(None, torch.ones(5))
    if not training:
        with pytest.raises(RuntimeError, match=r"running_var should hold 4 values.*1-D.*\(4, 1\)"):
            bnlab.batch_norm_eval(x, rm, rv.view(4, 1), None, None, 1e-5)


def _bias_alone_cases():
    """(name, make(training) -> (bnlab layer, its torch oracle as a function of x))."""

    def plain(cls, torch_cls, relu=False):
        def make():
            ours = cls(3, activation="relu") if relu else cls(3)
            theirs = torch_cls(3)
            for layer in (ours, theirs):
                layer.weight = None  # a bias alone: torch's layers take it
            with torch.no_grad():
                theirs.bias.normal_()
                ours.bias.copy_(theirs.bias)
            return ours, theirs, (lambda x: torch.relu(theirs(x))) if relu else theirs

        return make

    return {
        "BatchNorm1d": ((6, 3), plain(bnlab.BatchNorm1d, nn.BatchNorm1d)),
        "BatchNorm2d": ((4, 3, 2, 5), plain(bnlab.BatchNorm2d, nn.BatchNorm2d)),
        "BatchNorm2d+relu": ((4, 3, 2, 5), plain(bnlab.BatchNorm2d, nn.BatchNorm2d, True)),
        "BatchNorm3d": ((2, 3, 2, 2, 3), plain(bnlab.BatchNorm3d, nn.BatchNorm3d)),
        "SyncBatchNorm": ((4, 3, 2, 5), plain(bnlab.SyncBatchNorm, nn.BatchNorm2d)),
    }


BIAS_ALONE = _bias_alone_cases()


@pytest.mark.parametrize("case", list(BIAS_ALONE), ids=list(BIAS_ALONE))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("tool", ["eager", "channels_last", "ops", "standard-ops", "func.grad"])
def test_a_bias_without_a_weight_gets_torchs_gradient(case, training, tool):
    """A layer whose weight was set to None keeps a bias: torch's layer gives it a gradient, in
    every form of bnlab's call (eager paths, bnlab's operators and standard ops under
    torch.compile, torch.func)."""
    shape, make = BIAS_ALONE[case]
    if tool == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    ours, theirs, oracle = make()
    ours.train(training)
    theirs.train(training)
    x = torch.randn(shape) * 2 + 1
    if tool == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape)
    xr = x.clone().requires_grad_()
    oracle(xr).backward(dy)
    if tool == "func.grad":
        if training:
            ours.track_running_stats = False  # (torch.func refuses an update, as with torch's)
            ours.running_mean = ours.running_var = None

        def loss(bias, x):
            out = torch.func.functional_call(ours, {"bias": bias}, (x,))
            return (out * dy).sum()

        gb, gx = torch.func.grad(loss, argnums=(0, 1))(ours.bias.detach(), x)
    else:
        run = ours
        if tool in ("ops", "standard-ops"):
            torch._dynamo.reset()
            run = torch.compile(ours, backend="aot_eager", fullgraph=True)
        xo = x.clone().requires_grad_()
        with bnlab.ops.compile_form("ops" if tool == "ops" else "decompose"):
            run(xo).backward(dy)
        gb, gx = ours.bias.grad, xo.grad
    assert gb is not None
    torch.testing.assert_close(gb, theirs.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
def test_a_sequence_transposed_there_and_back_gets_torchs_answers(training, relu):
    """``bn(x.transpose(1, 2)).transpose(1, 2)`` on an (N, L, C) leaf, as sequence models call
    BatchNorm1d (the gradient comes back in the sequence's own layout): output, its strides,
    the leaf's gradient in its memory order, the parameters' gradients and the running
    statistics as torch's, over two steps; a non-finite batch refused naming the layer with the
    statistics untouched."""
    for c in (6, 40, 200):
        ours, theirs = pair((5, c, 7), momentum=None)
        ours.train(training)
        theirs.train(training)
        if relu:
            ours.activation = "relu"
        for step in range(2):
            base = torch.randn(5, 7, c, dtype=torch.float64).float() * 2 + step
            g = torch.randn(5, 7, c)
            outs = []
            for layer in (ours, theirs):
                leaf = base.clone().requires_grad_()
                y = layer(leaf.transpose(1, 2))
                if relu and layer is theirs:
                    y = torch.relu(y)
                (y.transpose(1, 2) * g).sum().backward()
                outs.append((y, leaf.grad))
            (y, dx), (y_, dx_) = outs
            torch.testing.assert_close(y, y_, **tol(torch.float32))
            assert y.stride() == y_.stride()
            torch.testing.assert_close(dx, dx_, **tol(torch.float32))
            assert dx.stride() == dx_.stride() == base.stride()
            for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
            for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(),
                                   strict=True):  # fmt: skip
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
        bad = torch.randn(5, 7, c)
        bad[2, 3, 1] = float("nan")
        if training:
            before = {k: v.clone() for k, v in ours.state_dict().items()}
            with pytest.raises(FloatingPointError, match=rf"BatchNorm1d\({c}\).*\(5, {c}, 7\)"):
                ours(bad.requires_grad_().transpose(1, 2))
            for key, value in ours.state_dict().items():
                assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- tensor subclasses
def _components(t):
    """A TwoTensor's two tensors (a plain tensor twice)."""
    return (t.a, t.b) if hasattr(t, "a") else (t, t)


@pytest.mark.parametrize("where", ["input", "weight", "gradient"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,transposed", [((6, 5), False), ((4, 5, 3, 3), False),
                                              ((4, 5, 3, 3), True)])  # fmt: skip
def test_a_wrapper_subclass_gets_torchs_answer(shape, transposed, training, where):
    """A tensor subclass that runs torch's operators itself (torch's test ``TwoTensor``, which
    runs each on two tensors; ``FakeTensor`` and ``DTensor`` are of this kind and have no
    memory of their own) as the input, the weight or only the output's gradient: the output,
    the input's and parameters' gradients are torch's, a TwoTensor of each component's
    answer, the output with torch's strides (a transposed input too). The kernels never read
    it (its address is 0: a call crashed the process). Running
    statistics in eval mode too; in training torch's layer writes the buffer once per
    component, an update of the update bnlab does not imitate."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    ours, theirs = pair(shape)
    for layer in (ours, theirs):
        layer.train(training)
        if where == "weight":
            w = layer.weight.detach()
            layer.weight = nn.Parameter(TwoTensor(w.clone(), w.clone() * 2))
    a = torch.randn(shape) * 2 + 1
    if transposed:
        a = a.transpose(2, 3)
    dy = torch.randn(a.shape)
    results = []
    for layer in (ours, theirs):
        x = (TwoTensor(a.clone(), a * 3) if where == "input" else a.clone()).requires_grad_()
        y = layer(x)
        y.backward(TwoTensor(dy, dy * 2))
        results.append((y, x.grad, layer.weight.grad, layer.bias.grad, layer.state_dict()))
    for i, (o, t) in enumerate(zip(*results, strict=True)):
        if i == 4:
            if not training:
                for k in t:
                    torch.testing.assert_close(o[k], t[k], msg=k)
            continue
        assert type(o) is type(t), i
        if i == 0:
            assert o.stride() == t.stride()
        for oc, tc in zip(_components(o), _components(t), strict=True):
            torch.testing.assert_close(oc, tc, **tol(torch.float32))
