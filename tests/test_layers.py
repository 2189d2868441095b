"""bnlab.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d, the oracle for a drop-in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from conftest import SHAPES, family_classes, to_format

pytestmark = pytest.mark.usefixtures("backend")  # every test once per backend (conftest)


def make_pair(shape, dtype=torch.float32, **kwargs):
    """A bnlab layer and a torch layer with identical (random) parameters."""
    ours_cls, torch_cls = family_classes(shape)
    ours = ours_cls(shape[1], dtype=dtype, **kwargs)
    ref = torch_cls(shape[1], dtype=dtype, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.copy_(torch.rand(shape[1]) + 0.5)
            ref.weight.copy_(ours.weight)
            if ours.bias is not None:
                ours.bias.copy_(torch.randn(shape[1]))
                ref.bias.copy_(ours.bias)
    return ours, ref


def tol(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=2e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    }[dtype]


def run_steps(ours, ref, shape, dtype, fmt, steps=4, scale=2.0, shift=1.0):
    """Train both for a few steps on identical batches; compare every output and gradient."""
    for step in range(steps):
        x = to_format(torch.randn(shape, dtype=torch.float64) * scale + shift * step, fmt)
        x = x.to(dtype)
        dy = to_format(torch.randn(shape, dtype=torch.float64), fmt).to(dtype)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        assert yo.dtype == yr.dtype and yo.shape == yr.shape
        torch.testing.assert_close(yo, yr, **tol(dtype))
        yo.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xo.grad, xr.grad, **tol(dtype))
        for po, pr in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(po.grad, pr.grad, **tol(dtype))
            po.grad = pr.grad = None


def assert_same_state(ours, ref, dtype):
    so, sr = ours.state_dict(), ref.state_dict()
    assert list(so) == list(sr)
    for k in so:
        if k == "num_batches_tracked":
            assert so[k].item() == sr[k].item()
        else:
            torch.testing.assert_close(so[k], sr[k], **tol(dtype))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cma"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_matches_torch_train_then_eval(shape, dtype, momentum, affine, track, fmt):
    if fmt == "channels_last" and len(shape) < 4:
        pytest.skip("channels_last applies to 4D/5D inputs")
    ours, ref = make_pair(shape, dtype, momentum=momentum, affine=affine, track_running_stats=track)
    run_steps(ours, ref, shape, dtype, fmt)
    assert_same_state(ours, ref, dtype)
    ours.eval()
    ref.eval()
    run_steps(ours, ref, shape, dtype, fmt, steps=2)
    assert_same_state(ours, ref, dtype)  # eval never touches running statistics


@pytest.mark.parametrize("shape", [(16, 6), (8, 4, 5, 5)])
@pytest.mark.parametrize("train", [True, False])
def test_scale_without_shift_bias_false(shape, train):
    ours, ref = make_pair(shape, bias=False)
    ours.train(train)
    ref.train(train)
    assert ours.bias is None and ref.bias is None
    run_steps(ours, ref, shape, torch.float32, "contiguous", steps=2)
    assert_same_state(ours, ref, torch.float32)


@pytest.mark.parametrize("shape", [(16, 6), (8, 4, 5, 5)])
def test_bfloat16_within_tolerance(shape):
    """bf16 input and params; statistics in float32. Tolerance: bf16 keeps 8 bits of mantissa,
    so outputs agree to ~2 ulp of bf16 (rtol 2e-2, atol 3e-2 on values of order 1)."""
    ours, ref = make_pair(shape, torch.bfloat16)
    run_steps(ours, ref, shape, torch.bfloat16, "contiguous")
    assert_same_state(ours, ref, torch.bfloat16)


def test_half_input_float32_params():
    ours, ref = make_pair((16, 4, 3, 3), torch.float32)
    x = torch.randn(16, 4, 3, 3).to(torch.bfloat16)
    torch.testing.assert_close(ours(x), ref(x), **tol(torch.bfloat16))
    assert ours(x).dtype == torch.bfloat16


def test_running_var_is_unbiased_hand_computed():
    bn = bnlab.BatchNorm2d(3, momentum=1.0)
    x = torch.randn(5, 3, 4, 4)
    bn(x)
    m = 5 * 4 * 4
    mean = x.mean((0, 2, 3))
    var_biased = ((x - mean.view(1, 3, 1, 1)) ** 2).mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var_biased * m / (m - 1))
    assert bn.num_batches_tracked.item() == 1


def test_cumulative_average_when_momentum_none():
    bn = bnlab.BatchNorm1d(4, momentum=None)
    xs = [torch.randn(10, 4) + i for i in range(5)]
    for x in xs:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))


def test_repr_and_buffers_match_torch():
    for cls, tcls in [
        (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
        (bnlab.BatchNorm2d, torch.nn.BatchNorm2d),
        (bnlab.BatchNorm3d, torch.nn.BatchNorm3d),
    ]:
        for kw in [
            {},
            dict(affine=False, track_running_stats=False, momentum=None, eps=1e-3),
            dict(bias=False),
        ]:
            a, b = cls(7, **kw), tcls(7, **kw)
            assert repr(a) == repr(b)
            assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
            assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
            assert (a.running_mean is None) == (b.running_mean is None)
            assert (a.num_batches_tracked is None) == (b.num_batches_tracked is None)


def test_reset_running_stats():
    bn = bnlab.BatchNorm1d(3)
    bn(torch.randn(8, 3) * 5 + 2)
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    assert bn.num_batches_tracked.item() == 0


def test_device_dtype_kwargs():
    bn = bnlab.BatchNorm2d(3, device="cpu", dtype=torch.float64)
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long


# ------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_state_dict_round_trips_both_ways(shape):
    ours, ref = make_pair(shape, momentum=0.3)
    run_steps(ours, ref, shape, torch.float32, "contiguous", steps=3)
    ours_cls, torch_cls = family_classes(shape)
    # ours -> torch
    t2 = torch_cls(shape[1])
    t2.load_state_dict(ours.state_dict())
    assert_same_state(ours, t2, torch.float32)
    # torch -> ours
    o2 = ours_cls(shape[1])
    o2.load_state_dict(ref.state_dict())
    assert_same_state(o2, ref, torch.float32)
    x = torch.randn(shape)
    o2.eval()
    t2.eval()
    torch.testing.assert_close(o2(x), t2(x))


def test_loads_old_checkpoint_without_num_batches_tracked():
    bn = bnlab.BatchNorm2d(4)
    sd = torch.nn.BatchNorm2d(4).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # written before num_batches_tracked existed
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked.item() == 0


def test_state_dict_wrong_shape_names_key():
    bn = bnlab.BatchNorm2d(4)
    sd = bnlab.BatchNorm2d(5).state_dict()
    with pytest.raises(RuntimeError, match="running_mean"):
        bn.load_state_dict(sd)


def test_state_dict_missing_key_names_key():
    bn = bnlab.BatchNorm2d(4)
    sd = bn.state_dict()
    del sd["running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        bn.load_state_dict(sd)


# ------------------------------------------------------------------------- bad input
def test_single_value_per_channel_raises_naming_layer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnlab.BatchNorm1d(4))
    bnlab.name_layers(model)
    with pytest.raises(ValueError, match=r"'1' BatchNorm1d\(4\).*\(1, 4\)"):
        model(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(2\).*\(1, 2, 1, 1\)"):
        bnlab.BatchNorm2d(2)(torch.randn(1, 2, 1, 1))
    # N=1 is fine when there are several positions per channel, and in eval mode
    bnlab.BatchNorm2d(2)(torch.randn(1, 2, 3, 3))
    bnlab.BatchNorm1d(4).eval()(torch.randn(1, 4))


def test_single_value_also_rejected_without_running_stats_in_eval():
    bn = bnlab.BatchNorm1d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4))


@pytest.mark.parametrize(
    "cls,shape",
    [
        (bnlab.BatchNorm1d, (2, 3, 4, 5)),
        (bnlab.BatchNorm1d, (3,)),
        (bnlab.BatchNorm2d, (2, 3, 4)),
        (bnlab.BatchNorm3d, (2, 3, 4, 5)),
    ],
)
def test_wrong_rank_raises(cls, shape):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(3\).*{len(shape)}D"):
        cls(3)(torch.randn(shape))


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\).*expected 3 channels.*\(2, 4, 5, 5\)"):
        bnlab.BatchNorm2d(3)(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_input_raise_type_error(dtype):
    with pytest.raises(TypeError, match=r"BatchNorm1d\(3\).*floating-point"):
        bnlab.BatchNorm1d(3)(torch.ones(4, 3, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_non_finite_batch_leaves_running_stats_untouched(bad, momentum):
    bn = bnlab.BatchNorm2d(3, momentum=momentum)
    bn.layer_name = "features.bn1"
    bn(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[2, 1, 3, 0] = bad
    with pytest.raises(FloatingPointError, match=r"'features.bn1' BatchNorm2d\(3\)"):
        bn(x)
    after = bn.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    bn(torch.randn(4, 3, 5, 5))  # still usable
    assert bn.num_batches_tracked.item() == 2


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_features"):
        bnlab.BatchNorm2d(0)
    for bad in (True, 3.0, torch.tensor(3.0), torch.tensor(True), "3"):
        with pytest.raises(ValueError, match="num_features"):
            bnlab.BatchNorm2d(bad)
    # the integers torch takes as a size, as torch takes them
    counts = (np.int64(3), torch.tensor(3), torch.tensor([3]), torch.tensor(3, dtype=torch.uint8))
    for count in counts:
        ours, ref = bnlab.BatchNorm2d(count), torch.nn.BatchNorm2d(count)
        assert ours.num_features == 3 and type(ours.num_features) is int
        assert ours.state_dict().keys() == ref.state_dict().keys()
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(ours(x), ref(x), **tol(x.dtype))
    with pytest.raises(TypeError, match=r"BatchNorm2d: eps must be a real number.*str"):
        bnlab.BatchNorm2d(3, eps="1e-5")
    with pytest.raises(TypeError, match=r"BatchNorm2d\(3\): momentum"):
        bnlab.BatchNorm2d(3, momentum="0.1")
    bnlab.BatchNorm2d(3, eps=0)  # as torch: eps is checked where it is used (see test_eps_*)


EPS_KINDS = {
    "tensor": torch.tensor(1e-3),
    "numpy": np.float32(1e-3),
    "int": 1,
    "bool": True,
}


@pytest.mark.parametrize("kind", list(EPS_KINDS), ids=list(EPS_KINDS))
def test_eps_of_every_type_torch_takes(kind):
    """torch's layers take as eps what their forward reads as a number (a 0-d tensor, a numpy
    scalar, an int, a bool); so do bnlab's, with torch's outputs and running statistics in
    both modes."""
    shape = (6, 4, 3, 3)
    ours, ref = make_pair(shape, eps=EPS_KINDS[kind])
    for train in (True, False):
        ours.train(train), ref.train(train)
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x), **tol(x.dtype))
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol(x.dtype))


# ------------------------------------------------------------------------- momentum
MOMENTA = [None, 0, 0.1, 1, -0.5, 1.5]


@pytest.mark.parametrize("momentum", MOMENTA, ids=[str(m) for m in MOMENTA])
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5, 6)], ids=["1d", "2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("when", ["constructor", "set-later"])
def test_running_stats_match_torch_for_every_momentum(momentum, shape, dtype, when):
    """torch.nn.BatchNorm applies running <- (1 - f) running + f batch for ANY number f
    (negative, above 1) and f = 1 / num_batches_tracked for None; every backend must give the
    same running_mean/var and num_batches_tracked over several steps, whether momentum was
    given to the constructor or set on the layer afterwards."""
    ours, ref = make_pair(shape, dtype, momentum=momentum if when == "constructor" else 0.1)
    if when == "set-later":  # one step at 0.1, then the momentum under test
        x = torch.randn(shape, dtype=dtype)
        ours(x), ref(x)
        ours.momentum = ref.momentum = momentum
    for step in range(5):
        x = torch.randn(shape, dtype=torch.float64).to(dtype) * 2 + step
        torch.testing.assert_close(ours(x), ref(x), **tol(dtype))
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol(dtype))
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol(dtype))
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


OTHER_MOMENTA = {
    "bool": True,
    "bool-false": False,
    "tensor": torch.tensor(0.3),
    "tensor-f64": torch.tensor(0.3, dtype=torch.float64),
    "tensor-int": torch.tensor(1),
    "numpy": np.float32(0.3),
    "numpy-int": np.int64(1),
}


@pytest.mark.parametrize("kind", list(OTHER_MOMENTA), ids=list(OTHER_MOMENTA))
@pytest.mark.parametrize("when", ["constructor", "set-later"])
def test_momentum_of_every_type_torch_takes(kind, when):
    """torch's training forward passes its momentum on as a number: a bool, a 0-d real tensor
    that does not require grad, numpy scalars. bnlab takes them the same, with the same
    running statistics and counter."""
    value = OTHER_MOMENTA[kind]
    shape = (6, 4, 3, 3)
    ours, ref = make_pair(shape, momentum=value if when == "constructor" else 0.1)
    if when == "set-later":
        ours.momentum = ref.momentum = value
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        torch.testing.assert_close(ours(x), ref(x), **tol(x.dtype))
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol(x.dtype))
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol(x.dtype))
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


BAD_MOMENTA = {
    "str": ("0.1", TypeError),
    "tensor-of-one": (torch.tensor([0.1]), TypeError),
    "tensor-needing-grad": (torch.tensor(0.1, requires_grad=True), TypeError),
    "complex": (0.1 + 0j, TypeError),
    "nan": (float("nan"), ValueError),
    "inf": (float("inf"), ValueError),
}


@pytest.mark.parametrize("bad", list(BAD_MOMENTA), ids=list(BAD_MOMENTA))
def test_bad_momentum_refused_at_construction_and_at_forward_state_untouched(bad):
    """A momentum that is not None or a finite real number raises, naming the layer, both when
    given to the constructor and when set later (at the next training forward, before any
    buffer moves). torch counts the batch in num_batches_tracked before failing on a string or
    a tensor it cannot read as a number, and writes NaN running statistics for a non-finite
    one: that is the poisoning refused here."""
    value, exc = BAD_MOMENTA[bad]
    with pytest.raises(exc, match=r"BatchNorm1d\(4\): momentum"):
        bnlab.BatchNorm1d(4, momentum=value)
    bn = bnlab.BatchNorm1d(4)
    bn.layer_name = "net.bn"
    bn(torch.randn(8, 4))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.momentum = value
    with pytest.raises(exc, match=r"'net.bn' BatchNorm1d\(4\): momentum"):
        bn(torch.randn(8, 4))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn.eval()
    bn(torch.randn(8, 4))  # inference never reads momentum (torch's neither)
    bn.train()
    bn.momentum = None
    bn(torch.randn(8, 4))
    assert bn.num_batches_tracked.item() == 2


# ------------------------------------------------------------------------- convert
def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8, momentum=None)
        ),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 6),
        torch.nn.BatchNorm1d(6, affine=False),
        torch.nn.Linear(6, 2),
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("training", [True, False])
def test_convert_small_cnn_identical_outputs_and_gradients(training):

    ref = small_cnn()
    ref(torch.randn(6, 3, 8, 8))  # give running stats non-trivial values
    ref.train(training)
    model = bnlab.convert(copy.deepcopy(ref))
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, bnlab.BatchNorm2d) for m in model.modules()) == 2
    assert all(m.training == training for m in model.modules())
    x = torch.randn(6, 3, 8, 8)
    yr, yo = ref(x), model(x)
    torch.testing.assert_close(yo, yr)
    yr.square().sum().backward()
    yo.square().sum().backward()
    gr, go = _grads(ref), _grads(model)
    assert gr.keys() == go.keys()
    # a conv bias before BN has a true gradient of 0 (BN removes it): compare on the model's
    # gradient scale, not each tensor's own
    scale = max(g.abs().max().item() for g in gr.values())
    for k in gr:
        torch.testing.assert_close(go[k], gr[k], rtol=1e-4, atol=1e-5 * scale)
    for (_, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b)
    # and back again
    back = bnlab.convert(model, to="torch")
    assert sum(type(m) is torch.nn.BatchNorm2d for m in back.modules()) == 2
    torch.testing.assert_close(back.eval()(x), ref.eval()(x))


def test_convert_keeps_parameter_objects_for_existing_optimizer():
    model = small_cnn()
    params = list(model.parameters())
    bnlab.convert(model)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))


def test_convert_root_layer_and_names():
    bn = torch.nn.BatchNorm2d(3).eval()
    out = bnlab.convert(bn)
    assert isinstance(out, bnlab.BatchNorm2d) and not out.training
    model = bnlab.convert(small_cnn())
    assert model[1].layer_name == "1" and model[3][1].layer_name == "3.1"


def test_convert_rejects_a_bad_target():
    with pytest.raises(ValueError, match="to must be"):
        bnlab.convert(small_cnn(), to="jax")
    # (lazy layers convert, sized or not: tests/test_lazy.py)


def _random_state(ours, ref):
    """Random running statistics (and the parameters of make_pair) on both layers."""
    with torch.no_grad():
        c = ours.num_features
        ours.running_mean.copy_(torch.randn(c))
        ours.running_var.copy_(torch.rand(c) + 0.5)
        ref.running_mean.copy_(ours.running_mean)
        ref.running_var.copy_(ours.running_var)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "relu"])
def test_inference_without_grad_is_the_general_path(shape, dtype, affine, fmt, act, backend):
    """Inference under no_grad (the common call, which takes a shorter path when it can: see
    ``_BatchNorm._eval_fast``) gives torch's answer and exactly what bnlab's general path
    gives; with the kernels, it does take the short path."""
    from bnlab import backend as B

    ours, ref = make_pair(shape, dtype, affine=affine)
    ours.activation = act
    _random_state(ours, ref)
    ours.eval(), ref.eval()
    x = to_format(torch.randn(shape, dtype=dtype) * 2 + 1, fmt)
    with torch.no_grad():
        y = ours(x)
        want = ref(x) if act is None else torch.relu(ref(x))
        torch.testing.assert_close(y, want, **tol(dtype))
        general = B.eval_forward(x, ours.running_mean, ours.running_var, ours.weight,
                                 ours.bias, ours.eps, relu=act is not None)[1]  # fmt: skip
        assert torch.equal(y, general) and y.stride() == general.stride()
        if backend == "auto":
            assert ours._eval_fast(x) is not None


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "relu"])
def test_bfloat16_inference_without_grad_is_the_general_path(shape, fmt, act, backend):
    """A bfloat16 input with float32 statistics and parameters (as under torch.autocast) at
    inference: torch's answer within bfloat16's precision, exactly the general path's, and with
    the kernels the short path takes it."""
    from bnlab import backend as B

    ours, ref = make_pair(shape)
    ours.activation = act
    _random_state(ours, ref)
    ours.eval(), ref.eval()
    x = to_format(torch.randn(shape) * 2 + 1, fmt).bfloat16()
    with torch.no_grad():
        y = ours(x)
        want = ref(x) if act is None else torch.relu(ref(x))
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want, **tol(torch.bfloat16))
        general = B.eval_forward(x, ours.running_mean, ours.running_var, ours.weight,
                                 ours.bias, ours.eps, relu=act is not None)[1]  # fmt: skip
        assert torch.equal(y, general) and y.stride() == general.stride()
        if backend == "auto":
            assert ours._eval_fast(x) is not None


def test_short_inference_path_sees_every_change_of_state(backend):
    """The short inference path keeps numpy views of the statistics and parameters between
    calls; every way of changing them (in place, ``.data``, new buffers, dtype conversion,
    load_state_dict, deep copies) shows in the next output, as in torch's layer."""
    shape = (4, 3, 5, 6)
    ours, ref = make_pair(shape)
    _random_state(ours, ref)
    ours.eval(), ref.eval()
    x = torch.randn(shape) * 2 + 1

    def check(o=ours, r=ref, inp=x):
        with torch.no_grad():
            torch.testing.assert_close(o(inp), r(inp), **tol(inp.dtype))

    check()
    for layer in (ours, ref):  # in place
        with torch.no_grad():
            layer.weight.mul_(2)
            layer.running_var.fill_(3.0)
    check()
    w, m, v = torch.rand(3) + 0.5, torch.randn(3), torch.rand(3) + 0.5
    for layer in (ours, ref):  # new storage under the same tensor
        layer.weight.data = w.clone()
    check()
    for layer in (ours, ref):  # a new buffer object
        layer.running_mean = m.clone()
    check()
    for layer in (ours, ref):
        layer.running_var.data = v.clone()
    check()
    for layer in (ours, ref):
        layer.bias = torch.nn.Parameter(m.clone())
    check()
    other = copy.deepcopy(ours)
    with torch.no_grad():
        other.bias.add_(5)
    check()  # the original does not see the copy's change
    with torch.no_grad():
        torch.testing.assert_close(other(x), ours(x) + 5)
    source, _ = make_pair(shape)
    _random_state(source, ref)
    ref.load_state_dict(source.state_dict())
    ours.load_state_dict(source.state_dict())
    check()
    ours.double(), ref.double()  # conversion: new storage of another dtype
    check(inp=x.double())


@pytest.mark.parametrize("shape", [SHAPES["1d-dense"], SHAPES["2d"]], ids=["dense", "2d"])
def test_an_inference_graph_sees_its_statistics_updated_by_a_training_step(shape, backend):
    """An inference forward keeps the running statistics for its backward; a training step
    before that backward updates them in place (the kernels write their memory), and autograd
    is told: the backward raises its in-place error instead of giving gradients of statistics
    the forward never used (torch's own layer does the latter). Without the step in between,
    the same backward runs; a training step's own backward is not affected."""
    ours, _ = make_pair(shape)
    x = torch.randn(shape, requires_grad=True)
    ours.eval()
    ours(x).sum().backward()
    y = ours(x)
    ours.train()
    z = ours(torch.randn(shape) * 2 + 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    z.sum().backward()  # (the training graph saved no running statistic)
    ours.zero_grad()
    ours(torch.randn(shape)).sum().backward()
    assert ours.weight.grad is not None


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_running_statistics_of_another_shape_are_refused_naming_the_layer(train, backend):
    """A running statistic of C values that is not 1-D: refused as torch refuses it, with the
    layer named, the state untouched."""
    shape = (4, 8, 5, 6)
    x = torch.randn(shape)
    for name in ("running_mean", "running_var"):
        ours, ref = make_pair(shape)
        ours.layer_name = "net.bn"
        ours.train(train), ref.train(train)
        with torch.no_grad():
            for layer in (ours, ref):
                t = getattr(layer, name)
                t.data = t.data.view(8, 1)
            state = {k: v.clone() for k, v in ours.state_dict().items()}
            with pytest.raises(RuntimeError):
                ref(x)
            with pytest.raises(RuntimeError, match=rf"net.bn.*{name} should be 1-D \(8,\)"):
                ours(x)
            for k, v in ours.state_dict().items():
                assert torch.equal(v, state[k]), k


_AFFINE_SHAPES = {"weight": (8, 1), "bias": (2, 4)}


@pytest.mark.parametrize("family", ["bn", "renorm", "ghost", "sync"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "relu"])
def test_weight_and_bias_of_c_values_in_any_shape(family, train, fmt, act, backend):
    """torch's layers read a weight or bias of C values in any shape ((C, 1), (2, C/2), ...,
    reassigned through ``.data``); so does every bnlab family, as its own layer with (C,)
    parameters does: the same output, input gradient, running statistics and counter, and the
    parameters' gradients in their own shapes (torch's backward refuses a 2-D weight, so the
    oracle is the (C,) layer, checked against torch's forward). Twice, so the short paths'
    caches see the shapes too."""
    shape = (6, 8, 5, 4)
    kinds = {
        "bn": lambda: bnlab.BatchNorm2d(8, activation=act),
        "renorm": lambda: bnlab.BatchRenorm2d(8, activation=act, warmup_steps=0),
        "ghost": lambda: bnlab.GhostBatchNorm2d(8, virtual_batch_size=4, activation=act),
        "sync": lambda: bnlab.SyncBatchNorm(8, activation=act),
    }
    flat = kinds[family]()
    _random_state(flat, flat)
    with torch.no_grad():
        flat.weight.uniform_(0.5, 2), flat.bias.normal_()
    shaped = copy.deepcopy(flat)
    for name, new in _AFFINE_SHAPES.items():
        t = getattr(shaped, name)
        t.data = t.data.view(new)
    flat.train(train), shaped.train(train)
    torch_bn = nn.BatchNorm2d(8).train(train)
    torch_bn.load_state_dict({k: v.view(-1) if v.dim() else v for k, v in
                              shaped.state_dict().items() if k in torch_bn.state_dict()})
    for name, new in _AFFINE_SHAPES.items():  # (torch's forward reads the reshaped ones)
        t = getattr(torch_bn, name)
        t.data = t.data.view(new)
    for step in range(2):
        x = to_format(torch.randn(shape) * 2 + step, fmt)
        dy = to_format(torch.randn(shape), fmt)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yf = shaped(xs), flat(xf)
        torch.testing.assert_close(ys, yf, rtol=0, atol=0)
        if family in ("bn", "sync"):
            with torch.no_grad():
                want = torch_bn(x)
            torch.testing.assert_close(ys, torch.relu(want) if act else want, **tol(x.dtype))
        ys.backward(dy), yf.backward(dy)
        torch.testing.assert_close(xs.grad, xf.grad, rtol=0, atol=0)
        for name, new in _AFFINE_SHAPES.items():
            g, gf = getattr(shaped, name).grad, getattr(flat, name).grad
            assert g.shape == new, name
            torch.testing.assert_close(g.reshape(-1), gf, rtol=0, atol=0)
        for key, v in flat.state_dict().items():
            torch.testing.assert_close(shaped.state_dict()[key].reshape(v.shape), v, rtol=0,
                                       atol=0)  # fmt: skip
        shaped.zero_grad(), flat.zero_grad()
    with torch.no_grad():  # (no graph: the inference and training short paths' own checks)
        x = to_format(torch.randn(shape), fmt)
        torch.testing.assert_close(shaped(x), flat(x), rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_short_paths_see_a_parameter_reshaped_in_its_own_storage(train, backend):
    """A statistic or parameter given a view of its own storage at the same address (its first
    values, a negative view of them, or its first value repeated by a zero stride): the short
    paths' cached views of the memory must not stand in for it. Torch's answer each time: an
    error for a parameter of the wrong size, the output and running statistics for a negative
    view (of a parameter or the mean; the running mean updated as its values, where torch
    updates the memory under the view) and for a repeated value (a running statistic only at
    inference, which writes none)."""
    shape = (4, 8, 5, 6)
    x = torch.randn(shape) * 2 + 1

    def primed(name, view):
        """A pair whose short paths have kept their views, then ``name`` given ``view`` of
        its own data in both."""
        ours, ref = make_pair(shape)
        _random_state(ours, ref)
        ours.train(train), ref.train(train)
        ours(x), ref(x)  # (the short path keeps its plan)
        for layer in (ours, ref):
            t = getattr(layer, name)
            t.data = view(t.data)
        return ours, ref

    for name in ("weight", "bias", "running_mean", "running_var"):
        with torch.no_grad():
            ours, ref = primed(name, lambda t: t[:4])
            errors = []
            for layer in (ref, ours):
                with pytest.raises(RuntimeError) as e:
                    layer(x)
                errors.append(str(e.value))
            assert errors[1].endswith(f"{name} should contain 8 elements, not 4"), errors
        if name == "running_var":
            continue  # (a negative view of a variance is a negative variance)
        with torch.no_grad():
            ours, ref = primed(name, torch._neg_view)
            before = ours.running_mean.clone()
            torch.testing.assert_close(ours(x), ref(x), **tol(x.dtype))
            torch.testing.assert_close(ours.running_var, ref.running_var, **tol(x.dtype))
            if train and name == "running_mean":
                # torch updates the memory under a negative view as if it were the values; the
                # values themselves follow the running-average rule here
                want = 0.9 * before + 0.1 * x.mean((0, 2, 3))
                torch.testing.assert_close(ours.running_mean, want, **tol(x.dtype))
            else:
                torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol(x.dtype))
        if train and name.startswith("running"):
            continue
        with torch.no_grad():  # (the same address, size and dtype)
            ours, ref = primed(name, lambda t: t.as_strided((8,), (0,)))
            torch.testing.assert_close(ours(x), ref(x), **tol(x.dtype))
            torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol(x.dtype))
            torch.testing.assert_close(ours.running_var, ref.running_var, **tol(x.dtype))


def test_short_inference_path_reads_every_dense_layout(backend):
    """The short inference path hands the loops the addresses of x and y: inputs with a storage
    offset, size-1 dimensions of any stride, channels_last ones give exactly the general path's
    output, with torch's strides and values; a strided input that is not dense, or a 3-D one in
    (N, L, C) memory order (whose output torch makes contiguous), is left to the general
    path."""
    torch.manual_seed(0)
    cl = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last) * 2 + 1
    dense = [
        (torch.randn(3, 4, 5, 6) * 2 + 1)[1:],  # storage offset
        cl[1:],  # channels_last with a storage offset
        torch.randn(2, 4, 1, 5).as_strided((2, 4, 1, 5), (20, 5, 7, 1)),  # size-1 dim, stride 7
        cl[:1].as_strided((1, 4, 5, 6), (999, 1, 24, 4)),  # batch of one, any batch stride
        (torch.randn(5, 4) * 2 + 1)[1:],  # dense (N, C) with an offset
    ]
    # not strided as the loops read (or, for a dense (N, C, L) with its channels innermost, not
    # as torch writes the output: contiguous)
    not_dense = [
        cl[:, :, :, :4],
        torch.randn(2, 7, 5)[:, :, :4].transpose(1, 2),
        torch.randn(3, 7, 4).transpose(1, 2) * 2 + 1,
    ]
    for x in dense + not_dense:
        c = x.shape[1]
        ours = bnlab.BatchNorm2d(c) if x.dim() == 4 else bnlab.BatchNorm1d(c)
        ref = torch.nn.BatchNorm2d(c) if x.dim() == 4 else torch.nn.BatchNorm1d(c)
        with torch.no_grad():
            ours.running_mean.normal_()
            ours.running_var.uniform_(0.5, 2)
            ours.weight.normal_()
            ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
        ours.eval(), ref.eval()
        with torch.no_grad():
            y, want = ours(x), ref(x)
            torch.testing.assert_close(y, want, **tol(x.dtype))
            assert y.stride() == want.stride()
            general = bnlab.batch_norm_eval(x, ours.running_mean, ours.running_var, ours.weight,
                                            ours.bias, ours.eps)  # fmt: skip
            assert torch.equal(y, general) and general.stride() == want.stride()
            short = ours._eval_fast(x)
            if backend == "auto" and any(x is d for d in dense):
                assert short is not None and torch.equal(short, general)
                assert short.stride() == want.stride()
            else:
                assert short is None


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_negative_views_get_torchs_answer(fmt, backend):
    """A negative view (``torch._neg_view``: memory holding -x, read as x) as input, upstream
    gradient or parameter gets torch's outputs, gradients and running statistics: the kernels,
    which read memory as it is, never see one (such a call takes the reference path, a dy is
    copied first)."""
    torch.manual_seed(0)
    shape = (4, 3, 5, 6)
    ours, ref = make_pair(shape)
    _random_state(ours, ref)
    base = to_format(torch.randn(shape) * 2 + 1, fmt)
    g = to_format(torch.randn(shape), fmt)
    for negative_input in (True, False):  # (a plain input: the kernels' backward gets the dy)
        make = torch._neg_view if negative_input else torch.clone
        xs = [make(base.clone()).requires_grad_() for _ in range(2)]
        ys = [layer(x) for layer, x in zip((ours, ref), xs, strict=True)]
        torch.testing.assert_close(ys[0], ys[1], **tol(base.dtype))
        for layer, y in zip((ours, ref), ys, strict=True):
            layer.zero_grad()
            y.backward(torch._neg_view(g.clone()))
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol(base.dtype))
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol(base.dtype))
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol(base.dtype))
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol(base.dtype))
    ours.eval(), ref.eval()
    with torch.no_grad():
        n = torch._neg_view(base.clone())
        torch.testing.assert_close(ours(n), ref(n), **tol(base.dtype))
        for layer in (ours, ref):
            layer.weight.data = torch._neg_view(layer.weight.data.clone())
        torch.testing.assert_close(ours(base), ref(base), **tol(base.dtype))


@pytest.mark.parametrize("shape", [SHAPES["2d"], SHAPES["3d"]], ids=["2d", "3d"])
def test_mkldnn_inputs_get_torchs_answer(shape, backend):
    """An MKL-DNN tensor, which torch's BatchNorm2d takes in training (gradients included) and
    inference and BatchNorm3d in inference: the same output (an MKL-DNN tensor too), running
    statistics and parameter gradients as torch's."""
    torch.manual_seed(0)
    ours, ref = make_pair(shape)
    _random_state(ours, ref)
    x = (torch.randn(shape) * 2 + 1).to_mkldnn()
    if len(shape) == 4:  # (torch trains on 2-D MKL-DNN inputs only)
        ys = [layer(x) for layer in (ours, ref)]
        assert ys[0].layout == ys[1].layout == torch._mkldnn
        torch.testing.assert_close(ys[0].to_dense(), ys[1].to_dense(), **tol(torch.float32))
        for y in ys:
            y.to_dense().square().sum().backward()
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol(torch.float32))
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **tol(torch.float32))
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol(torch.float32))
    ours.eval(), ref.eval()
    with torch.no_grad():
        ys = [layer(x) for layer in (ours, ref)]
    assert ys[0].layout == ys[1].layout == torch._mkldnn
    torch.testing.assert_close(ys[0].to_dense(), ys[1].to_dense(), **tol(torch.float32))


def _fused_pair(shape, act: str | None):
    """:func:`make_pair` with random running statistics, bnlab's layer fusing ``act`` (torch's
    twin applies it after its layer)."""
    ours, ref = make_pair(shape)
    if act:
        ours = family_classes(shape)[0](shape[1], activation=act)
        ours.load_state_dict(ref.state_dict())
    _random_state(ours, ref)
    return ours, ref


def _gather_elsewhere(t: torch.Tensor) -> None:
    """What ``fully_shard`` does to a parameter between its uses: the storage freed, then
    allocated again (elsewhere: the memory just freed is taken meanwhile) and written through
    another tensor, so that the parameter's version does not change."""
    values, at = t.detach().clone(), t.data_ptr()
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    taken = torch.empty(nbytes, dtype=torch.uint8)  # (likely where the storage was)
    storage.resize_(nbytes)
    alias = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())
    alias.copy_(values)
    assert t.data_ptr() != at, "the storage came back where it was"
    del taken


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_parameters_gathered_elsewhere_between_forward_and_backward(mode, act, backend):
    """A sharding tool (``fully_shard``) frees a layer's parameters after the forward and
    gathers them into new memory for the backward and again for the next step; in an
    inference-mode step of a model being tuned, the running statistics move the same way here.
    The layers' storages stay resizable, as torch's do, and the backward reads the memory the
    saved tensors have then: torch's outputs, gradients and statistics, step after step."""
    shape = (4, 3, 5, 6)
    ours, ref = _fused_pair(shape, act)
    ours.train(mode == "train"), ref.train(mode == "train")
    moved = [ours.weight, ours.bias, ref.weight, ref.bias]
    if mode == "eval":
        moved += [ours.running_mean, ours.running_var, ref.running_mean, ref.running_var]
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        dy = torch.randn(shape)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [ours(xs[0]), ref(xs[1]).relu() if act else ref(xs[1])]
        for t in moved:
            _gather_elsewhere(t)
        for layer, y in zip((ours, ref), ys, strict=True):
            layer.zero_grad(set_to_none=True)
            y.backward(dy)
        torch.testing.assert_close(ys[0], ys[1], **tol(torch.float32))
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol(torch.float32))
        for name in ("weight", "bias", "running_mean", "running_var"):
            a, b = getattr(ours, name), getattr(ref, name)
            torch.testing.assert_close(a, b, **tol(torch.float32))
            if name in ("weight", "bias"):
                torch.testing.assert_close(a.grad, b.grad, **tol(torch.float32))
                assert a.grad.untyped_storage().resizable()
            assert a.untyped_storage().resizable()
        for t in moved:
            _gather_elsewhere(t)  # (and before the next forward)


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_saved_tensors_mutated_under_allow_mutation_as_torch(mode, act, backend):
    """Under ``torch.autograd.graph.allow_mutation_on_saved_tensors`` a tensor the forward saved
    may be changed in place before the backward, which then reads the saved values (autograd
    keeps a copy): the weight and the running statistics changed between forward and backward
    give torch's gradients (the planned backward reads the saved tensors, not the plan's views
    of the layer's)."""
    shape = (6, 4, 5, 5)
    ours, ref = _fused_pair(shape, act)
    x = torch.randn(shape) * 2 + 1
    grads = []
    for layer in (ours, ref):
        layer.train(mode == "train")
        xg = x.clone().requires_grad_()
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            y = layer(xg)
            y = y.relu() if act and layer is ref else y
            with torch.no_grad():
                layer.weight.mul_(3)
                layer.running_mean.add_(1)
                layer.running_var.mul_(2)
            y.square().sum().backward()
        grads.append((xg.grad, layer.weight.grad, layer.bias.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hooks", ["copies", "save_on_cpu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_saved_tensor_hooks_as_torch(mode, hooks, backend):
    """Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, as activation
    offloading uses them; ``save_on_cpu``): what the forward saves comes back to the backward
    as other tensors, elsewhere in memory (and the input may change meanwhile), and the
    gradients are torch's."""
    shape = (6, 4, 5, 5)
    ours, ref = _fused_pair(shape, "relu")
    x = torch.randn(shape) * 2 + 1
    grads = []
    for layer in (ours, ref):
        layer.train(mode == "train")
        xg = x.clone().requires_grad_()
        if hooks == "copies":
            context = torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t)
        else:
            context = torch.autograd.graph.save_on_cpu()
        with context:
            y = layer(xg)
            y = y.relu() if layer is ref else y
        if hooks == "copies":  # (the backward must read the saved copy, not the input)
            with torch.no_grad():
                xg.mul_(-2)
        y.square().sum().backward()
        grads.append((xg.grad, layer.weight.grad, layer.bias.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def _resizable(*tensors) -> list[bool]:
    return [t.untyped_storage().resizable() for t in tensors if t is not None]


@pytest.mark.parametrize("case", ["nchw", "channels_last", "dense", "sequence", "bf16", "relu"])
def test_every_storage_stays_resizable_as_torchs(case, backend):
    """torch's layers, function and results leave every storage resizable (a sharding tool
    frees and reallocates parameters' storages; buffers reused with ``resize_`` are common):
    so do bnlab's layers, its function and its operators, for their inputs, parameters,
    buffers, outputs, statistics and gradients, in training, inference and the backward."""
    shape = {"dense": (8, 5), "sequence": (4, 5, 7)}.get(case, (4, 5, 3, 3))
    x = torch.randn(shape) * 2 + 1
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.bfloat16() if case == "bf16" else x
    for layer in family_classes(shape)[::-1]:  # (torch's first: the oracle)
        fused = case == "relu" and layer is bnlab.BatchNorm2d
        m = layer(5, activation="relu") if fused else layer(5)
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.sum().backward()
        m.eval()
        xe = x.clone().requires_grad_()
        ye = m(xe)
        ye.square().sum().backward()
        with torch.no_grad():
            yn = m(x)
        tensors = (x, xg, xg.grad, y, xe, xe.grad, ye, yn, *m.parameters(), *m.buffers(),
                   m.weight.grad, m.bias.grad)  # fmt: skip
        assert all(_resizable(*tensors)), (layer, _resizable(*tensors))
    rm, rv = torch.zeros(5), torch.ones(5)
    w, b = torch.ones(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    for fn in (torch.nn.functional.batch_norm, bnlab.batch_norm):
        xg = x.float().clone().requires_grad_()
        for training in (True, False):
            fn(xg, rm, rv, w, b, training=training).sum().backward()
        assert all(_resizable(xg, xg.grad, rm, rv, w, b, w.grad, b.grad)), fn
    xf = x.float()
    y, stats = torch.ops.bnlab.batch_norm_train(xf, w.detach(), b.detach(), 1e-5, case == "relu")
    ye = torch.ops.bnlab.batch_norm_eval(xf, rm, rv, w.detach(), None, 1e-5, False)
    grads = torch.ops.bnlab.batch_norm_backward(
        torch.ones_like(y), xf, stats[0], stats[2], w.detach(), None, True, True, True
    )
    torch.ops.bnlab.commit_stats(xf, stats[0], stats[1], rm, rv, None, 0.1, True, "bn")
    assert all(_resizable(xf, y, stats, ye, *grads, rm, rv))


def test_short_inference_path_declines_what_it_does_not_take(backend):
    """Calls the short inference path leaves to the general one (which checks them, raises
    or records a graph): training mode, an autograd graph to record, strides that are neither
    contiguous nor channels_last, float16, 16-bit parameters, other mismatched dtypes, meta
    tensors, a tensor subclass, a wrong rank or channel count, a negative eps, the reference
    backend."""
    layer = bnlab.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        if backend == "reference":
            assert layer._eval_fast(x) is None
            return
        assert layer._eval_fast(x) is not None
        assert layer.train()._eval_fast(x) is None
        layer.eval()
        assert layer._eval_fast(x.transpose(2, 3)) is None  # (neither layout)
        assert layer._eval_fast(x.half()) is None
        half_params = copy.deepcopy(layer).bfloat16()
        assert half_params._eval_fast(x.bfloat16()) is None
        assert layer._eval_fast(x.double()) is None  # (float32 parameters: torch refuses)
        assert layer._eval_fast(x.to("meta")) is None
        assert layer._eval_fast(torch.nn.Parameter(x)) is None
        assert layer._eval_fast(x[:, :2]) is None
        assert layer._eval_fast(x[0]) is None
        layer.eps = -1.0
        assert layer._eval_fast(x) is None
        layer.eps = 1e-5
    with torch.no_grad():
        layer.train()
        layer.frozen = True  # frozen: population statistics in training mode too
        assert layer._eval_fast(x) is not None


def _general_path(layer):
    """``layer`` with its short paths switched off (instance attributes), so that every call
    takes the general path of ``forward``."""
    layer._train_fast = layer._eval_fast = lambda x: None
    return layer


def _short_path_cases(test):
    """The cases on which a short path is compared with the general one: every rank, float32,
    float64 and bfloat16 (with float32 parameters), with and without weight and bias, both
    memory formats, with and without the fused ReLU."""
    marks = [
        pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES)),
        pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                                ids=["f32", "f64", "bf16"]),  # fmt: skip
        pytest.mark.parametrize("params", ["affine", "nobias", "noaffine"]),
        pytest.mark.parametrize("fmt", ["contiguous", "channels_last"]),
        pytest.mark.parametrize("act", [None, "relu"]),
    ]
    for mark in marks:
        test = mark(test)
    return test


@_short_path_cases
def test_short_inference_path_with_a_graph_is_the_general_path(shape, dtype, params, fmt, act,
                                                               backend):  # fmt: skip
    """Inference with an autograd graph to record (an eval-mode or frozen layer that a model
    is fine-tuned through, which takes a shorter path when it can: see
    ``_BatchNorm._eval_fast``) gives exactly what bnlab's general path gives: output, input
    and parameter gradients, and buffers left as they were; with the kernels, it does take the
    short path."""
    if fmt == "channels_last" and len(shape) < 4:
        pytest.skip("channels_last applies to 4D/5D inputs")
    if backend == "reference":
        pytest.skip("the short paths take no call on the reference backend")
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # (bfloat16: float32)
    short, ref = make_pair(shape, pdt, affine=params != "noaffine", bias=params != "nobias")
    _random_state(short, ref)
    short.activation = act
    if params == "nobias":  # (a frozen layer in training mode: population statistics too)
        short.frozen = True
    else:
        short.eval()
    general = _general_path(copy.deepcopy(short))
    x = to_format(torch.randn(shape) * 2 + 1, fmt).to(dtype)
    dy = to_format(torch.randn(shape), fmt).to(dtype)
    outs = []
    for layer in (short, general):
        xi = x.clone().requires_grad_(params != "affine")  # (parameters only, or both)
        y = layer(xi)
        y.backward(dy)
        grads = [xi.grad] + [p.grad for p in layer.parameters()]
        outs.append((y, grads, list(layer.buffers())))
    (ys, gs, bs), (yg, gg, bg) = outs
    assert torch.equal(ys, yg) and ys.stride() == yg.stride()
    for a, b in zip(gs + bs, gg + bg, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert short._fast_views[0] is not None  # (the short path made and cached its plan)


@_short_path_cases
def test_short_training_path_is_the_general_path(shape, dtype, params, fmt, act, backend):
    """A training step (the common call, which takes a shorter path when it can: see
    ``_BatchNorm._train_fast``) gives exactly what bnlab's general path gives: output, input
    and parameter gradients, running averages and the batch count, over several steps with
    and without an autograd graph (a bfloat16 input with float32 parameters, as under
    torch.autocast); with the kernels, it does take the short path."""
    if fmt == "channels_last" and len(shape) < 4:
        pytest.skip("channels_last applies to 4D/5D inputs")
    if backend == "reference":
        pytest.skip("the short paths take no call on the reference backend")
    momentum = None if params == "nobias" else 0.3  # (both update rules, fewer cases)
    kwargs = dict(affine=params != "noaffine", bias=params != "nobias", momentum=momentum)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # (bfloat16: float32)
    short, _ = make_pair(shape, pdt, **kwargs)
    short.activation = act
    general = _general_path(copy.deepcopy(short))
    for step in range(4):
        x = to_format(torch.randn(shape) * 3 + step, fmt).to(dtype)
        dy = to_format(torch.randn(shape), fmt).to(dtype)
        grad = step != 2  # (one step without a graph: no_grad in training mode)
        outs = []
        for layer in (short, general):
            xi = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = layer(xi)
            if grad:
                y.backward(dy)
            grads = [xi.grad] + [p.grad for p in layer.parameters()]
            outs.append((y, grads, [b.clone() for b in layer.buffers()]))
            layer.zero_grad()
        (ys, gs, bs), (yg, gg, bg) = outs
        assert torch.equal(ys, yg) and ys.stride() == yg.stride()
        for a, b in zip(gs + bs, gg + bg, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    assert short._fast_views[1] is not None  # (the short path made and cached its plan)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_short_training_path_refuses_non_finite_batches_untouched(bad, backend):
    """A non-finite batch on the short training path: FloatingPointError naming the layer and
    the shape, running averages and count as they were, as on the general path."""
    layer = bnlab.BatchNorm2d(3)
    layer.layer_name = "block.bn"
    layer(torch.randn(4, 3, 2, 2))
    before = [b.clone() for b in layer.buffers()]
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    with torch.no_grad():
        x[1, 2, 0, 1] = bad
    with pytest.raises(FloatingPointError, match=r"'block.bn' BatchNorm2d\(3\).*\(4, 3, 2, 2\)"):
        layer(x)
    for a, b in zip(before, layer.buffers(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (8, 3)])
def test_a_variance_beyond_float32_is_refused_untouched(shape, backend):
    """Finite float32 values whose batch variance exceeds float32's range: torch's layer puts
    Inf into running_var (and outputs the bias); bnlab's refuses the batch, says that the
    variance may be the cause, and keeps its state, with and without a graph to record."""
    for grad in (False, True):
        layer = bnlab.BatchNorm1d(3) if len(shape) == 2 else bnlab.BatchNorm2d(3)
        x = torch.randn(shape) * 1e20
        dims = [d for d in range(x.dim()) if d != 1]
        assert torch.isfinite(x).all() and torch.isinf(x.double().var(dims).float()).all()
        before = [b.clone() for b in layer.buffers()]
        with pytest.raises(FloatingPointError, match="a variance beyond the range of its dtype"):
            layer(x.requires_grad_(grad))
        for a, b in zip(before, layer.buffers(), strict=True):
            assert torch.equal(a, b)


def test_short_training_path_sees_every_change_of_state(backend):
    """The short training path keeps numpy views of the parameters, running averages and
    count between calls; every way of changing them (in place, ``.data``, new buffers,
    load_state_dict, dtype conversion) shows in the next step, as in torch's layer."""
    shape = (4, 3, 5, 6)
    ours, ref = make_pair(shape, momentum=None)
    x = torch.randn(shape) * 2 + 1

    def check(o=ours, r=ref, inp=x):
        xo, xr = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        yo, yr = o(xo), r(xr)
        torch.testing.assert_close(yo, yr, **tol(inp.dtype))
        yo.sum().backward(), yr.sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, **tol(inp.dtype))
        assert_same_state(o, r, torch.float32)  # (float32 history before .double())

    check()
    for layer in (ours, ref):  # in place
        with torch.no_grad():
            layer.weight.mul_(2)
            layer.running_var.fill_(3.0)
            layer.num_batches_tracked.fill_(7)
    check()
    w, m = torch.rand(3) + 0.5, torch.randn(3)
    for layer in (ours, ref):  # new storage under the same tensor, new buffer objects
        layer.weight.data = w.clone()
        layer.running_mean = m.clone()
        layer.num_batches_tracked = torch.tensor(2)
    check()
    source, _ = make_pair(shape)
    source(torch.randn(shape))
    for layer in (ours, ref):
        layer.load_state_dict(source.state_dict())
    check()
    ours.double(), ref.double()  # conversion: new storage of another dtype
    check(inp=x.double())


def test_short_training_path_declines_what_it_does_not_take(backend):
    """Training calls the short path leaves to the general one (which checks them, raises or
    computes them as torch does): eval mode, a frozen layer, a variant with its own statistics,
    no tracking, strides that are neither contiguous nor channels_last, float16, mismatched
    dtypes, meta tensors, a tensor subclass, a wrong rank or channel count, one value per
    channel, eps <= 0, a momentum that is not None or a finite float, the reference
    backend."""
    layer = bnlab.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    if backend == "reference":
        assert layer._train_fast(x) is None
        return
    assert layer._train_fast(x) is not None
    declined = [
        x.transpose(2, 3), x.half(), x.double(), x.to("meta"), torch.nn.Parameter(x),
        x[:, :2], x[0], x[:1, :, :1, :1],
    ]  # fmt: skip
    for bad in declined:
        assert layer._train_fast(bad) is None
    assert layer.eval()._train_fast(x) is None
    layer.train().frozen = True
    assert layer._train_fast(x) is None
    layer.frozen = False
    for name, value in [("eps", 0.0), ("eps", float("nan")), ("momentum", 1),
                        ("momentum", float("nan")), ("track_running_stats", False)]:  # fmt: skip
        old = getattr(layer, name)
        setattr(layer, name, value)
        assert layer._train_fast(x) is None
        setattr(layer, name, old)
    assert copy.deepcopy(layer).bfloat16()._train_fast(x.bfloat16()) is None  # (16-bit params)
    assert bnlab.GhostBatchNorm2d(3, virtual_batch_size=1)._train_fast(x) is None
    plain = copy.deepcopy(layer)  # (a weight that is a plain attribute, not a parameter)
    weight = plain.weight.detach() * 2
    del plain.weight
    plain.weight = weight
    assert plain._train_fast(x) is None
    with torch.no_grad():
        assert plain.eval()._eval_fast(x) is None
    assert layer._train_fast(x) is not None  # (every setting restored)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_functional_call_substitutes_parameters_and_buffers_as_torch(fmt, backend):
    """``torch.func.functional_call`` with substitute parameters and buffers: bnlab's layer
    (whose short paths keep views of the tensors they last saw) normalizes with the substitutes,
    updates the substitute buffers (its own when only parameters are substituted), and reads
    its own tensors again afterwards, as torch's layer does; in training and in inference with
    a graph."""
    from torch.func import functional_call

    shape = (4, 3, 5, 5)
    for training, names in [(True, 2), (True, 5), (False, 2), (False, 4)]:  # (the first names)
        ours, ref = make_pair(shape)
        _random_state(ours, ref)
        ours.train(training), ref.train(training)
        x = to_format(torch.randn(shape) * 2 + 1, fmt)
        results = []
        for layer in (ours, ref):
            layer(x)  # (the short paths' views of the layer's own tensors)
            w = (torch.rand(3, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
            state = {"weight": w * 2, "bias": torch.ones(3), "running_mean": torch.full((3,), 0.5),
                     "running_var": torch.full((3,), 2.0), "num_batches_tracked": torch.tensor(4)}
            state = dict(list(state.items())[:names])
            own = [b.clone() for b in layer.buffers()]
            y = functional_call(layer, state, (x,))
            y.square().sum().backward()
            kept = all(torch.equal(a, b) for a, b in zip(own, layer.buffers(), strict=True))
            results.append((y, w.grad, *list(state.values())[2:], layer(x), kept))
        for a, b in zip(*results, strict=True):
            if isinstance(a, bool):
                assert a == b  # (own buffers untouched exactly when torch's are)
            else:
                torch.testing.assert_close(a, b, **tol(torch.float32))


def test_the_readmes_python_example_runs():
    """The code of the README's "The layer in Python" section runs as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## The layer in Python", 1)[1].split("```python", 1)[1]
    code = code.split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["model"][1], bnlab.BatchNorm2d)
    assert isinstance(namespace["lazy"][1], bnlab.BatchNorm2d)  # (sized by its first input)
