"""bnlab.LazyBatchNorm1d/2d/3d against torch.nn.LazyBatchNorm1d/2d/3d, side by side: the layer
sized by its first input, its state, conversion, and refusals that keep it unsized."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import bnlab

pytestmark = pytest.mark.usefixtures("backend")  # every test once per backend (conftest)

CASES = [  # (bnlab lazy, torch lazy, bnlab sized class, torch sized class, input shape)
    (bnlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnlab.BatchNorm1d, nn.BatchNorm1d, (6, 5)),
    (bnlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnlab.BatchNorm1d, nn.BatchNorm1d, (4, 3, 7)),
    (bnlab.LazyBatchNorm2d, nn.LazyBatchNorm2d, bnlab.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6)),
    (bnlab.LazyBatchNorm3d, nn.LazyBatchNorm3d, bnlab.BatchNorm3d, nn.BatchNorm3d,
     (2, 4, 3, 4, 5)),
]  # fmt: skip
OPTIONS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
    {"eps": 1e-3, "dtype": torch.float64},
]


def _ids(case):
    return f"{case[0].__name__}-{len(case[4])}d"


def _state_equal(ours: nn.Module, ref: nn.Module) -> None:
    so, sr = ours.state_dict(), ref.state_dict()
    assert list(so) == list(sr)
    for key in so:
        assert so[key].shape == sr[key].shape and so[key].dtype == sr[key].dtype, key
        torch.testing.assert_close(so[key], sr[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sized_by_the_first_input_as_torchs(case, options, mode):
    lazy, torch_lazy, sized, torch_sized, shape = case
    ours, ref = lazy(**options), torch_lazy(**options)
    assert isinstance(ours, torch_lazy) and not isinstance(ours, torch_sized)  # torch's kinds
    assert ours.num_features == 0 and ours.has_uninitialized_params() == (
        ref.has_uninitialized_params()
    )
    ours.train(mode == "train")
    ref.train(mode == "train")
    dtype = options.get("dtype", torch.float32)
    for step in range(3):  # the sizing call, then two more
        x = (torch.randn(shape, dtype=torch.float64) * 2 + step).to(dtype)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        assert type(ours) is sized and type(ref) is torch_sized
        assert ours.num_features == shape[1]  # (torch's keeps 0 when it had nothing to size)
        torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
        dy = torch.randn(shape, dtype=dtype)
        yo.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-5)
        for po, pr in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(po.grad, pr.grad, rtol=1e-5, atol=1e-5)
            assert po.dtype == pr.dtype
            po.grad = pr.grad = None
        _state_equal(ours, ref)


@pytest.mark.parametrize("case", CASES[1:3], ids=_ids)
def test_fused_relu_and_constructor_arguments_survive_the_sizing(case):
    lazy, _, sized, torch_sized, shape = case
    ours = lazy(eps=1e-3, momentum=0.3, activation="relu")
    assert "activation='relu'" in repr(ours)
    x = torch.randn(shape)
    y = ours(x)
    ref = torch_sized(shape[1], eps=1e-3, momentum=0.3)
    torch.testing.assert_close(y, torch.relu(ref(x)))
    assert type(ours) is sized and ours.activation == "relu" and ours.momentum == 0.3
    _state_equal(ours, ref)


@pytest.mark.parametrize("kwargs, match", [
    ({"activation": "gelu"}, "LazyBatchNorm2d: activation"),
    ({"momentum": "fast"}, "LazyBatchNorm2d: momentum"),
    ({"momentum": float("nan")}, "LazyBatchNorm2d: momentum"),
])  # fmt: skip
def test_constructor_refusals_name_the_class(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        bnlab.LazyBatchNorm2d(**kwargs)


@pytest.mark.parametrize("bad, error", [
    (torch.randn(3, 4, 5), ValueError),  # another rank: torch's layer takes its size first
    (torch.ones(2, 3, 4, 4, dtype=torch.int32), NotImplementedError),  # torch's class
    ([[1.0, 2.0]], AttributeError),  # not a tensor
])  # fmt: skip
def test_a_refused_first_input_leaves_the_layer_unsized(bad, error):
    model = bnlab.name_layers(nn.Sequential(bnlab.LazyBatchNorm2d()))
    with pytest.raises(error, match="'0' LazyBatchNorm2d"):
        model(bad)
    layer = model[0]
    assert type(layer) is bnlab.LazyBatchNorm2d and layer.num_features == 0
    assert layer.has_uninitialized_params()
    x = torch.randn(4, 6, 3, 3)  # the next good input sizes it
    torch.testing.assert_close(model(x), nn.BatchNorm2d(6)(x))
    assert type(layer) is bnlab.BatchNorm2d and layer.num_features == 6


def test_state_loads_both_ways_and_sizes_the_layer():
    sized = nn.BatchNorm2d(5)
    with torch.no_grad():
        sized.weight.uniform_(0.5, 1.5)
        sized.bias.normal_()
        sized.running_mean.normal_()
        sized.running_var.uniform_(0.5, 2.0)
        sized.num_batches_tracked.fill_(7)
    ours = bnlab.LazyBatchNorm2d()
    ours.load_state_dict(sized.state_dict())
    assert not ours.has_uninitialized_params() and ours.num_features == 5  # (torch's: 0)
    _state_equal(ours, sized)
    ours.eval()
    sized.eval()
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(ours(x), sized(x))
    assert type(ours) is bnlab.BatchNorm2d
    loaded = bnlab.LazyBatchNorm2d()
    loaded.load_state_dict(sized.state_dict())
    with pytest.raises(RuntimeError, match="expected 5 channels"):  # the state's count
        loaded(torch.randn(3, 4, 4, 4))
    back = nn.LazyBatchNorm2d()  # and bnlab's sized state into torch's lazy layer
    back.load_state_dict(ours.state_dict())
    _state_equal(back, sized)
    unsized = bnlab.LazyBatchNorm2d().state_dict()  # an unsized layer's state loads unsized
    other = bnlab.LazyBatchNorm2d()
    other.load_state_dict(unsized)
    assert other.has_uninitialized_params() and other.num_features == 0


def test_an_unsized_layer_pickles_and_saves():
    layer = bnlab.LazyBatchNorm2d(momentum=0.2, activation="relu")
    copy = pickle.loads(pickle.dumps(layer))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 3, 2, 2)
    for other in (copy, saved):
        assert type(other) is bnlab.LazyBatchNorm2d
        torch.testing.assert_close(other(x), torch.relu(nn.BatchNorm2d(3, momentum=0.2)(x)))
        assert type(other) is bnlab.BatchNorm2d and other.activation == "relu"


def _lazy_cnn(bn2d, bn1d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.LazyConv2d(4, 3), bn2d(momentum=None), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3),
        bn1d(eps=1e-3),
    )  # fmt: skip


def test_convert_keeps_lazy_layers_lazy_both_ways():
    model = _lazy_cnn(nn.LazyBatchNorm2d, nn.LazyBatchNorm1d)
    ref = _lazy_cnn(nn.LazyBatchNorm2d, nn.LazyBatchNorm1d)
    weight = model[1].weight
    out = bnlab.convert(model)
    assert out is model and type(model[1]) is bnlab.LazyBatchNorm2d
    assert type(model[5]) is bnlab.LazyBatchNorm1d and model[1].weight is weight
    assert model[1].momentum is None and model[5].eps == 1e-3 and model[1].layer_name == "1"
    x = torch.randn(8, 2, 6, 6)
    torch.manual_seed(1)  # (the lazy convolution and linear layers draw when they are sized)
    y = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(y, ref(x))
    assert type(model[1]) is bnlab.BatchNorm2d and type(model[5]) is bnlab.BatchNorm1d
    _state_equal(model, ref)
    back = bnlab.convert(_lazy_cnn(bnlab.LazyBatchNorm2d, bnlab.LazyBatchNorm1d), to="torch")
    assert type(back[1]) is nn.LazyBatchNorm2d and type(back[5]) is nn.LazyBatchNorm1d
    with pytest.raises(ValueError, match="layer '0' has activation='relu'"):
        bnlab.convert(nn.Sequential(bnlab.LazyBatchNorm2d(activation="relu")), to="torch")


def test_convert_of_a_lazy_layer_with_a_loaded_state():
    sized = nn.BatchNorm2d(5)
    with torch.no_grad():
        sized.running_mean.normal_()
    lazy = nn.LazyBatchNorm2d()
    lazy.load_state_dict(sized.state_dict())  # sized by the state, still of the lazy class
    ours = bnlab.convert(nn.Sequential(lazy))[0]
    assert type(ours) is bnlab.LazyBatchNorm2d and ours.num_features == 5
    ours.eval()
    sized.eval()
    x = torch.randn(3, 5, 2, 2)
    torch.testing.assert_close(ours(x), sized(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_sizes_the_layers_and_matches_eager(mode):
    """torch.compile of a model whose layers are not sized yet (dynamo sizes them before it
    traces): no graph break, and eager's outputs, gradients and running statistics."""
    compiled_model = _lazy_cnn(bnlab.LazyBatchNorm2d, bnlab.LazyBatchNorm1d).train(mode == "train")
    eager = _lazy_cnn(bnlab.LazyBatchNorm2d, bnlab.LazyBatchNorm1d).train(mode == "train")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    for step in range(2):
        x = torch.randn(8, 2, 6, 6) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(1)
        ya = compiled(xa)
        torch.manual_seed(1)
        yb = eager(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        _state_equal(compiled_model, eager)
    assert counter.frame_count == 1
    assert type(compiled_model[1]) is bnlab.BatchNorm2d


@pytest.mark.parametrize("tool", ["freeze", "unfreeze", "recompute", "diagnose", "fold"])
def test_state_tools_refuse_an_unsized_layer_and_change_nothing(tool):
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bnlab.LazyBatchNorm2d(), bnlab.BatchNorm2d(3))
    before = {k: v.clone() for k, v in model[2].state_dict().items()}
    batches = [torch.randn(4, 2, 3, 3)]
    call = {
        "freeze": lambda: bnlab.freeze(model),
        "unfreeze": lambda: bnlab.unfreeze(model),
        "recompute": lambda: bnlab.recompute_population_stats(model, batches),
        "diagnose": lambda: bnlab.diagnose(model, batches),
        "fold": lambda: bnlab.fold(model.eval()),
    }[tool]
    with pytest.raises(ValueError, match="lazy layer '1'"):
        call()
    assert type(model[1]) is bnlab.LazyBatchNorm2d and model[1].has_uninitialized_params()
    assert not model[2].frozen and model[2].weight.requires_grad
    for key, value in model[2].state_dict().items():
        assert torch.equal(value, before[key]), key
    model(batches[0])  # sized, every tool takes it
    bnlab.recompute_population_stats(model, batches)
    bnlab.freeze(model)
    assert model[1].frozen and model[2].frozen
