"""bnlab.inference: population statistics (Algorithm 2), fold, freeze, diagnose.

Oracles: statistics of the concatenated data computed by hand (torch.mean / torch.var over one big
batch), torch.nn.BatchNorm* in eval mode, and the unfolded eval model.
"""

from __future__ import annotations

import copy
import io
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab
from bnlab.inference import ChannelAffine
from bnlab.models import MLP, resnet20

SRC = str(Path(__file__).resolve().parents[1] / "src")

BN = {
    ("bnlab", 1): bnlab.BatchNorm1d,
    ("bnlab", 2): bnlab.BatchNorm2d,
    ("bnlab", 3): bnlab.BatchNorm3d,
    ("torch", 1): nn.BatchNorm1d,
    ("torch", 2): nn.BatchNorm2d,
    ("torch", 3): nn.BatchNorm3d,
}


def channel_stats(x: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of x over every dim but 1, in float64 (the oracle)."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=unbiased)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BN in model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (bnlab.layers.batchnorm._BatchNorm, nn.modules.batchnorm._BatchNorm)):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                    m.num_batches_tracked.fill_(7)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) * 2 - 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g))
    return model


# ------------------------------------------------------------------------------------ recompute
@pytest.mark.parametrize("family", ["bnlab", "torch"])
@pytest.mark.parametrize(
    "rank,shapes",
    [
        (1, [(7, 4), (2, 4), (13, 4)]),
        (2, [(3, 4, 5, 6), (1, 4, 5, 6), (6, 4, 5, 6)]),
        (3, [(2, 4, 3, 2, 5), (5, 4, 3, 2, 5)]),
    ],
)
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_uneven_batches_give_stats_of_concatenation(family, rank, shapes, estimator):
    bn = BN[(family, rank)](4, momentum=0.3)
    bn.eval()
    batches = [torch.randn(s) * 3 + 5 for s in shapes]
    bnlab.recompute_population_stats(bn, batches, estimator=estimator, progress=False)
    mean, var = channel_stats(torch.cat(batches), unbiased=estimator == "unbiased")
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=1e-6)
    assert int(bn.num_batches_tracked) == len(shapes)
    assert not bn.training and bn.momentum == 0.3  # mode and momentum restored
    assert bn.population_estimator == estimator
    if family == "bnlab":
        assert f"population={estimator}" in repr(bn)


def test_train_mode_stats_are_algorithm_2_over_training_network():
    """mode='train': deeper layers see inputs normalized with batch statistics (as in training).
    Oracle: the inputs of each layer captured from a copy run batch by batch in train mode."""
    model = nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4), bnlab.BatchNorm1d(4)
    )
    model.eval()
    batches = [torch.randn(n, 6) + 1 for n in (9, 4, 17)]
    oracle = copy.deepcopy(model).train()
    seen: list[torch.Tensor] = []
    oracle[4].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    for x in batches:
        oracle(x)
    bnlab.recompute_population_stats(model, batches, progress=False)
    mean, var = channel_stats(torch.cat(seen))
    torch.testing.assert_close(model[4].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[4].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert not model.training and not any(m.training for m in model.modules())


def test_eval_mode_is_exact_layer_by_layer_and_independent_of_batching():
    """mode='eval': each layer gets the statistics of what the updated inference network feeds
    it, so uneven batches equal one big batch, and the oracle is computed layer by layer."""
    model = nn.Sequential(
        nn.Linear(6, 5),
        bnlab.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4),
        nn.Dropout(0.5),
    ).eval()
    data = torch.randn(40, 6) * 2 + 1
    batches = [data[:3], data[3:25], data[25:]]
    a = bnlab.recompute_population_stats(copy.deepcopy(model), batches, mode="eval", progress=False)
    b = bnlab.recompute_population_stats(copy.deepcopy(model), [data], mode="eval", progress=False)
    # hand oracle
    with torch.no_grad():
        z1 = model[0](data)
        m1, v1 = channel_stats(z1)
        h = torch.tanh(
            (z1.double() - m1) / torch.sqrt(v1 + 1e-5) * model[1].weight.double()
            + model[1].bias.double()
        )
        z2 = model[3](h.float())
        m2, v2 = channel_stats(z2)
    for net in (a, b):
        torch.testing.assert_close(net[1].running_mean.double(), m1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net[1].running_var.double(), v1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net[4].running_mean.double(), m2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net[4].running_var.double(), v2, rtol=1e-5, atol=1e-5)
    assert not a[5].training  # other modules keep their mode


def test_num_batches_limits_and_checks():
    bn = bnlab.BatchNorm1d(3)
    batches = [torch.randn(5, 3) + i for i in range(4)]
    bnlab.recompute_population_stats(bn, iter(batches), num_batches=2, progress=False)
    mean, var = channel_stats(torch.cat(batches[:2]))
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_batches=9"):
        bnlab.recompute_population_stats(bn, batches, num_batches=9, progress=False)
    with pytest.raises(ValueError, match="empty"):
        bnlab.recompute_population_stats(bn, [], progress=False)
    with pytest.raises(ValueError, match="estimator"):
        bnlab.recompute_population_stats(bn, batches, estimator="ema")
    with pytest.raises(TypeError, match="re-iterable"):
        bnlab.recompute_population_stats(bn, iter(batches), mode="eval", progress=False)


def test_no_grad_tuple_batches_progress_bar_and_frozen_layers(capsys):
    model = nn.Sequential(
        nn.Linear(4, 3), bnlab.BatchNorm1d(3), nn.Linear(3, 2), bnlab.BatchNorm1d(2)
    )
    bnlab.freeze(model[3:])
    frozen_before = model[3].running_mean.clone()
    grad_enabled: list[bool] = []
    model[1].register_forward_pre_hook(lambda m, a: grad_enabled.append(torch.is_grad_enabled()))
    batches = [(torch.randn(6, 4), torch.zeros(6)) for _ in range(3)]
    bnlab.recompute_population_stats(model, batches, progress=True)
    assert grad_enabled == [False] * 3
    assert "population statistics" in capsys.readouterr().err
    assert torch.equal(model[3].running_mean, frozen_before)  # frozen layer left alone
    assert int(model[1].num_batches_tracked) == 3


def test_training_after_recompute_clears_estimator():
    bn = bnlab.BatchNorm1d(3)
    bnlab.recompute_population_stats(bn, [torch.randn(8, 3)], progress=False)
    assert "population=unbiased" in repr(bn)
    bn.train()(torch.randn(8, 3))
    assert bn.population_estimator is None and "population" not in repr(bn)


DIST_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import bnlab

    def data(rank):
        g = torch.Generator().manual_seed(rank)
        return [torch.randn(n, 3, 4, 4, generator=g) * (rank + 1) + rank for n in (2 + rank, 5)]

    def worker(rank, port, out):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2)
        bn = bnlab.BatchNorm2d(3)
        bnlab.recompute_population_stats(bn, data(rank), progress=False)
        torch.save({"mean": bn.running_mean, "var": bn.running_var,
                    "n": bn.num_batches_tracked}, f"{out}.{rank}")
        dist.destroy_process_group()

    if __name__ == "__main__":
        worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    """
)


def test_distributed_two_ranks_reduce_to_same_exact_stats(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dist_job.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "stats"
    env = dict(os.environ, PYTHONPATH=SRC, GLOO_SOCKET_IFNAME="lo")
    # two ranks as two processes started side by side (cheaper than a spawning parent)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(port), str(out)], env=env)
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    r0 = torch.load(f"{out}.0", weights_only=True)
    r1 = torch.load(f"{out}.1", weights_only=True)
    for key in ("mean", "var", "n"):
        assert torch.equal(r0[key], r1[key])  # every rank ends with identical statistics
    everything = []
    for rank in (0, 1):
        g = torch.Generator().manual_seed(rank)
        everything += [
            torch.randn(n, 3, 4, 4, generator=g) * (rank + 1) + rank for n in (2 + rank, 5)
        ]
    mean, var = channel_stats(torch.cat(everything))
    torch.testing.assert_close(r0["mean"].double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r0["var"].double(), var, rtol=1e-6, atol=1e-6)
    assert int(r0["n"]) == 4


# ------------------------------------------------------------------------------------ fold
def _pairs():
    yield "linear", lambda b: nn.Linear(6, 5, bias=b), 1, (8, 6)
    yield "conv1d", lambda b: nn.Conv1d(4, 6, 3, groups=2, bias=b), 1, (3, 4, 9)
    yield (
        "conv2d",
        lambda b: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=b),
        2,
        (2, 4, 7, 7),
    )
    yield "conv3d", lambda b: nn.Conv3d(2, 4, 2, bias=b), 3, (2, 2, 4, 4, 4)
    yield "convT1d", lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, bias=b), 1, (2, 4, 5)
    yield (
        "convT2d",
        lambda b: nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, bias=b),
        2,
        (2, 6, 4, 4),
    )
    yield "convT3d", lambda b: nn.ConvTranspose3d(2, 3, 2, bias=b), 3, (1, 2, 3, 3, 3)


@pytest.mark.parametrize("name,make,rank,shape", list(_pairs()), ids=[p[0] for p in _pairs()])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("family", ["bnlab", "torch"])
def test_fold_pair_matches_unfolded(name, make, rank, shape, bias, family):
    lin = make(bias)
    out_ch = lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels
    model = randomize_bn(nn.Sequential(lin, BN[(family, rank)](out_ch), nn.ReLU())).eval()
    folded = bnlab.fold(model)
    x = torch.randn(shape)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(folded, nn.Sequential) and isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None and type(folded[0]) is type(lin)
    assert not any(isinstance(m, (ChannelAffine,)) for m in folded.modules())


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_lone_bn_becomes_channel_affine(affine, bias):
    model = randomize_bn(
        nn.Sequential(
            bnlab.BatchNorm2d(3, affine=affine, bias=bias),
            nn.ReLU(),
            nn.Conv2d(3, 3, 1),
            nn.ReLU(),
            nn.BatchNorm2d(3),
        )
    ).eval()
    folded = bnlab.fold(model)
    assert isinstance(folded[0], ChannelAffine) and isinstance(folded[4], ChannelAffine)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bnlab", "torch"])
def test_fold_resnet20_through_fx(family):
    model = resnet20()
    if family == "torch":
        model = bnlab.convert(model, to="torch")
    model = randomize_bn(model).eval()
    before = copy.deepcopy(model.state_dict())
    folded = bnlab.fold(model)
    assert type(folded) is type(model)
    assert not any(
        isinstance(
            m, (bnlab.layers.batchnorm._BatchNorm, nn.modules.batchnorm._BatchNorm, ChannelAffine)
        )
        for m in folded.modules()
    )
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # input model untouched


def test_fold_nested_and_custom_children():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.sigmoid(self.bn(self.conv(x))) * 2 + x

    model = randomize_bn(
        nn.Sequential(Block(), nn.Sequential(nn.Conv2d(3, 4, 1), bnlab.BatchNorm2d(4)))
    ).eval()
    folded = bnlab.fold(model)
    assert isinstance(folded[1][1], nn.Identity)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_refuses_training_mode_unsafe_graph_and_batch_stats_layers():
    model = nn.Sequential(nn.Linear(3, 3), bnlab.BatchNorm1d(3))
    with pytest.raises(ValueError, match="training mode"):
        bnlab.fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="layer '1' is in training mode"):
        bnlab.fold(model)

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = bnlab.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output also used outside the BN

    with pytest.raises(ValueError, match="output of 'conv' feeds 'bn' and also"):
        bnlab.fold(Reuse().eval())

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnlab.BatchNorm1d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.bn(x)
            return x

    with pytest.raises(ValueError, match="cannot trace"):
        bnlab.fold(Branchy().eval())
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnlab.fold(
            nn.Sequential(nn.Linear(2, 2), bnlab.BatchNorm1d(2, track_running_stats=False)).eval()
        )


def test_fold_takes_torchs_parameters_of_any_shape_and_refuses_other_sizes():
    """torch's BN reads a weight or bias of C values in any shape (a (C, 1) one assigned through
    ``.data``): the folded model computes what torch's does; a parameter or statistic of another
    count is refused with the layer named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2), bn.bias.normal_()
        bn.weight.data = bn.weight.data.view(4, 1)
        bn.bias.data = bn.bias.data.view(1, 4)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(bnlab.fold(copy.deepcopy(model))(x), model(x))
        model[1].running_var.data = model[1].running_var.data[:3]
    with pytest.raises(ValueError, match="layer '1' has a running_var of 3 values for 4"):
        bnlab.fold(model)


def test_convert_keeps_torch_parameters_of_any_shape():
    """torch's BN reads a weight or bias of C values in any shape (a (C, 1) one assigned through
    ``.data``); the converted layer keeps those Parameters and computes what torch's does in
    both modes, its gradients in the parameters' own shapes (torch's backward refuses a 2-D
    weight; the gradients are those of the same layer with (C,) parameters)."""
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        flat[1].weight.uniform_(0.5, 2), flat[1].bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    for train in (True, False):
        ref = copy.deepcopy(flat).train(train)
        model = copy.deepcopy(flat).train(train)
        model[1].weight.data = model[1].weight.data.view(4, 1)
        model[1].bias.data = model[1].bias.data.view(1, 4)
        ours = bnlab.convert(copy.deepcopy(model))
        with torch.no_grad():
            want = model(x)  # torch's forward, on the reshaped parameters
        assert isinstance(ours[1], bnlab.BatchNorm2d) and ours[1].weight.shape == (4, 1)
        y = ours(x)
        torch.testing.assert_close(y, want)
        y.square().sum().backward()
        ref(x).square().sum().backward()
        assert ours[1].weight.grad.shape == (4, 1) and ours[1].bias.grad.shape == (1, 4)
        torch.testing.assert_close(ours[1].weight.grad.view(4), ref[1].weight.grad)
        torch.testing.assert_close(ours[1].bias.grad.view(4), ref[1].bias.grad)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours[1], key), getattr(model[1], key))


def test_fold_carries_the_fused_relu():
    """A bnlab BN with activation="relu" computes max(BN(x), 0): folded, the ReLU stays (as
    nn.ReLU after a folded conv, inside ChannelAffine for a lone BN)."""
    torch.manual_seed(0)
    model = randomize_bn(resnet20(fuse_relu=True)).eval()  # statistics away from their init
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    tol = 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(bnlab.fold(model)(x), ref, rtol=1e-4, atol=tol)
    lone = randomize_bn(nn.Sequential(nn.ReLU(), bnlab.BatchNorm2d(3, activation="relu"))).eval()
    folded = bnlab.fold(lone)
    assert isinstance(folded[1], ChannelAffine) and folded[1].activation == "relu"
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(x), lone(x), rtol=1e-5, atol=1e-6)
    assert bool((folded(x) >= 0).all())


def test_fold_keeps_every_position_of_a_module_used_twice():
    """nn.Sequential calls each entry of its _modules; the same object at two positions is two
    calls, and each keeps its place in the folded model (named_children() would list it once)."""
    relu, lin = nn.ReLU(), nn.Linear(4, 4)
    bn = nn.BatchNorm1d(4)
    models = [
        nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), bnlab.BatchNorm1d(4), relu),
        nn.Sequential(lin, nn.Tanh(), lin, bnlab.BatchNorm1d(4)),  # a shared Linear
        nn.Sequential(nn.Linear(4, 4), bn, nn.Tanh(), bn),  # a shared BN: folded, then affine
    ]
    x = torch.randn(6, 4)
    for model in models:
        model = randomize_bn(model).eval()
        folded = bnlab.fold(model)
        assert len(folded._modules) == len(model._modules)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_refuses_a_layer_registered_under_two_names():
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = bnlab.BatchNorm2d(2)
            self.same_bn = self.bn  # torch.fx calls it 'bn'; the forward uses the other name

        def forward(self, x):
            return self.same_bn(self.conv(x))

    with pytest.raises(ValueError, match=r"'bn' is registered under several names"):
        bnlab.fold(randomize_bn(Alias()).eval())


def test_folded_linear_refuses_input_where_bn_normalizes_another_dimension():
    """Linear acts on the last dim, BN on dim 1: on (N, C, L) input the folded weights would scale
    the wrong dimension (a difference of several units here), so the folded layer refuses it."""
    model = randomize_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).eval()
    folded = bnlab.fold(model)
    x3 = torch.randn(5, 3, 4)
    model(x3)  # the unfolded pair accepts it
    with pytest.raises(ValueError, match=r"folded layer '0': expected a 2D input.*'1' was folded"):
        folded(x3)
    x2 = torch.randn(5, 4)
    torch.testing.assert_close(folded(x2), model(x2), rtol=1e-5, atol=1e-6)
    conv = randomize_bn(nn.Sequential(nn.Conv1d(3, 5, 1), nn.BatchNorm1d(5))).eval()
    with pytest.raises(ValueError, match="expected a 3D input"):  # unbatched (C, L)
        bnlab.fold(conv)(torch.randn(3, 5))
    traced = torch.fx.symbolic_trace(folded)  # the check survives tracing of the folded model
    with pytest.raises(ValueError, match="expected a 2D input"):
        traced(x3)


def test_a_folded_model_goes_through_torchscript():
    """A model folded by bnlab.fold scripts, and freezes with optimize_for_inference, with the
    folded model's outputs (the folded layers' refusal of input of another rank included, which
    TorchScript compiles with them); freezing then leaves no batch norm. ConvTranspose layers are
    left out: TorchScript compiles no pre-hook on a layer whose forward takes an optional
    argument, so a folded one runs under jit.trace, torch.export and ONNX only."""
    from bnlab.models import resnet20

    cases = [
        (nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()), (5, 4)),
        (nn.Sequential(nn.Conv1d(3, 5, 1), bnlab.BatchNorm1d(5, activation="relu")), (2, 3, 6)),
        (resnet20(num_classes=4, fuse_relu=True), (2, 3, 8, 8)),
    ]
    for model, shape in cases:
        model = randomize_bn(model)
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(shape) * 2 + 1)
        folded = bnlab.fold(model.eval())
        scripted = torch.jit.script(folded)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(folded)))
        assert "batch_norm" not in str(frozen.graph)
        x = torch.randn(shape)
        for run in (scripted, frozen):
            torch.testing.assert_close(run(x), model(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(torch.jit.Error, match=rf"expected a {len(shape)}D input"):
            scripted(torch.randn(shape[1:]))


def test_fold_leaves_layers_it_does_not_understand_and_refuses_such_bns():
    class Doubled(nn.Linear):  # an overridden forward: W' = s * W would not be BN(forward(x))
        def forward(self, x):
            return 2 * super().forward(x) + 1

    seen = []
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.randn(6, 4)
    for first in (
        Doubled(4, 4),
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)),
        nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4)),
        hooked,  # a forward hook sees the layer's own output
    ):
        model = randomize_bn(nn.Sequential(first, bnlab.BatchNorm1d(4))).eval()
        ref = model(x)
        folded = bnlab.fold(model)
        assert isinstance(folded[1], ChannelAffine), type(first).__name__
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(seen[-1], seen[-2])  # the hook saw the same values, unfolded and folded
    with pytest.warns(FutureWarning):  # torch's old weight_norm: its weight cannot be copied
        old = nn.utils.weight_norm(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="fold: the model cannot be copied"):
        bnlab.fold(nn.Sequential(old, bnlab.BatchNorm1d(4)).eval())
    pre = nn.Linear(4, 4)
    pre.register_forward_pre_hook(lambda m, args: (args[0] * 2,))  # kept: it acts on the input
    model = randomize_bn(nn.Sequential(pre, bnlab.BatchNorm1d(4))).eval()
    torch.testing.assert_close(bnlab.fold(model)(x), model(x), rtol=1e-5, atol=1e-5)

    class Shifted(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) + 1

    with pytest.raises(ValueError, match=r"layer '1' \(Shifted\) overrides the BatchNorm forward"):
        bnlab.fold(nn.Sequential(nn.Linear(4, 4), Shifted(4)).eval())
    model = nn.Sequential(nn.Linear(4, 4), bnlab.BatchNorm1d(4)).eval()
    handle = model[1].register_forward_hook(lambda m, i, o: o * 0)
    with pytest.raises(ValueError, match="layer '1' has a forward hook"):
        bnlab.fold(model)
    handle.remove()
    model[1].activation = "gelu"  # set after construction: nothing fold can carry
    with pytest.raises(ValueError, match="activation='gelu', which fold cannot carry"):
        bnlab.fold(model)


# ------------------------------------------------------------------------------------ freeze
def test_frozen_layer_survives_train_and_matches_torch_eval():
    model = randomize_bn(nn.Sequential(nn.Linear(5, 4), bnlab.BatchNorm1d(4)))
    ref = nn.BatchNorm1d(4)
    ref.load_state_dict(model[1].state_dict())
    ref.eval()
    bnlab.freeze(model)
    model.train()  # must not undo the freeze
    assert model[1].training and model[1].frozen and "frozen=True" in repr(model)
    state = {k: v.clone() for k, v in model[1].state_dict().items()}
    x = torch.randn(6, 5)
    z = model[0](x)
    z_ref = z.detach().clone().requires_grad_(True)
    y = model[1](z)
    torch.testing.assert_close(y, ref(z_ref), rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref(z_ref).backward(dy)
    assert model[0].weight.grad is not None  # gradients flow through a frozen layer
    assert model[1].weight.grad is None and not model[1].weight.requires_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    opt.step()
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, state[k]), k  # neither statistics nor gamma/beta moved
    bnlab.unfreeze(model)
    assert "frozen" not in repr(model) and model[1].weight.requires_grad
    model(torch.randn(6, 5))
    assert int(model[1].num_batches_tracked) == state["num_batches_tracked"] + 1


def test_freeze_params_false_keeps_gamma_trainable_and_torch_layers_refused():
    model = nn.Sequential(nn.Linear(3, 3), bnlab.BatchNorm1d(3))
    bnlab.freeze(model, params=False)
    model.train()
    model(torch.randn(4, 3)).sum().backward()
    assert model[1].weight.grad is not None
    assert int(model[1].num_batches_tracked) == 0
    with pytest.raises(TypeError, match="layer '1'.*bnlab.convert"):
        bnlab.freeze(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))


def test_unfreeze_gives_back_only_the_gradients_freeze_took():
    model = nn.Sequential(nn.Linear(3, 3), bnlab.BatchNorm1d(3), nn.Linear(3, 3),
                          bnlab.BatchNorm1d(3))
    model[1].weight.requires_grad_(False)  # the user's choice: gamma of layer 1 stays fixed
    bnlab.freeze(model, params=False)
    bnlab.unfreeze(model)
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    bnlab.freeze(model)  # params=True: switches off what is on
    bnlab.freeze(model)  # twice: still remembers what it switched off
    assert not any(p.requires_grad for m in (model[1], model[3]) for p in m.parameters())
    bnlab.unfreeze(model, params=False)  # the layers thaw, the parameters stay frozen
    assert not model[1].frozen and not model[3].bias.requires_grad
    bnlab.unfreeze(model)
    assert not model[1].weight.requires_grad  # off before freeze: still off
    assert model[1].bias.requires_grad and model[3].weight.requires_grad


def test_convert_to_torch_refuses_a_frozen_layer_and_changes_nothing():
    model = nn.Sequential(bnlab.BatchNorm1d(3), nn.Linear(3, 3), bnlab.BatchNorm1d(3))
    bnlab.freeze(model[2:])
    with pytest.raises(ValueError, match=r"layer '2' is frozen .*bnlab.unfreeze"):
        bnlab.convert(model, to="torch")
    # checked before anything was replaced: the first layer is still bnlab's
    assert [type(m) for m in model] == [bnlab.BatchNorm1d, nn.Linear, bnlab.BatchNorm1d]
    bnlab.unfreeze(model)
    out = bnlab.convert(model, to="torch")
    assert type(out[0]) is nn.BatchNorm1d and type(out[2]) is nn.BatchNorm1d


def test_convert_replaces_a_layer_at_every_place_it_is_registered():
    bn = nn.BatchNorm1d(3)
    model = bnlab.convert(nn.Sequential(bn, nn.ReLU(), bn))
    assert type(model[0]) is bnlab.BatchNorm1d and model[2] is model[0]


# ------------------------------------------------------------------------------------ diagnose
def test_diagnose_after_exact_recompute_reports_no_gap_and_restores_state():
    model = MLP(in_features=8, hidden=(6, 5), norm="batchnorm1d")
    batches = [torch.randn(n, 8) * 2 + 1 for n in (7, 20, 3)]
    bnlab.recompute_population_stats(model, batches, mode="eval", progress=False)
    model.train()
    state = copy.deepcopy(model.state_dict())
    buf = io.StringIO()
    rows = bnlab.diagnose(model, batches, file=buf)
    assert [r.name for r in rows] == ["net.2", "net.5"]
    for r in rows:
        assert r.flags == [] and r.mean_shift_max < 1e-5
        assert abs(r.var_ratio_min - 1) < 1e-5 and abs(r.var_ratio_max - 1) < 1e-5
    assert "net.2" in buf.getvalue() and "shift max" in buf.getvalue()
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_diagnose_flags_and_hand_computed_shift():
    bn = bnlab.BatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
        bn.num_batches_tracked.fill_(10)
    x = torch.tensor([[1.0, 1.0], [3.0, 1.5], [5.0, 0.5]])  # means (3, 1), variances (4, 0.25)
    (row,) = bnlab.diagnose(bn, [x], file=None)
    assert row.mean_shift_max == pytest.approx(3 / (4 + 1e-5) ** 0.5)
    assert row.var_ratio_min == pytest.approx(0.25) and row.var_ratio_max == pytest.approx(1.0)
    assert row.flags == ["stale"]
    fresh = torch.nn.BatchNorm1d(2)
    (row,) = bnlab.diagnose(fresh, [x], file=None)
    assert "never-updated" in row.flags and row.kind == "torch.BatchNorm1d"


def test_diagnose_says_when_the_data_has_one_value_per_channel():
    """One value per channel has no variance (var_ratio is NaN): the flag says that, and 'stale'
    is judged on the mean shift alone."""
    bn = bnlab.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
        bn.num_batches_tracked.fill_(3)
    (row,) = bnlab.diagnose(bn, [torch.tensor([[[[0.1]], [[1.0]]]])], file=None)
    assert row.flags == ["one-value-per-channel"]
    assert row.var_ratio_min != row.var_ratio_min  # NaN
    (row,) = bnlab.diagnose(bn, [torch.tensor([[[[3.0]], [[1.0]]]])], file=None)
    assert row.flags == ["one-value-per-channel", "stale"]
    assert row.mean_shift_max == pytest.approx(3 / (4 + 1e-5) ** 0.5)


# ------------------------------------------------------------------------------------ docs
def test_docs_examples_run(tmp_path):
    """Every ```python block of docs/inference.md runs, in order, in one namespace."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "inference.md"
    text = doc.read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) >= 5
    code = "\n".join(blocks)
    env = dict(os.environ, PYTHONPATH=SRC)
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


def test_fold_refuses_bn_parameters_read_directly():
    class Peek(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = bnlab.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) * self.bn.weight.sum()

    with pytest.raises(ValueError, match="reads 'bn.weight' directly"):
        bnlab.fold(Peek().eval())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nan_batch_leaves_every_layer_unchanged(mode):
    model = randomize_bn(
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), bnlab.BatchNorm1d(2))
    ).eval()
    before = copy.deepcopy(model.state_dict())
    bad = torch.randn(5, 3)
    bad[2, 1] = float("nan")
    batches = [torch.randn(5, 3), bad, torch.randn(5, 3)]
    with pytest.raises(FloatingPointError):
        bnlab.recompute_population_stats(model, batches, mode=mode, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[3].population_estimator is None


# ------------------------------------------------------------------------------------ state kept
def _calibration_model() -> nn.Module:
    """Dropout and two BN layers (a torch one with momentum 0.3, a bnlab one with momentum None),
    a frozen bnlab layer and one without running statistics, and user hooks on some modules."""
    model = randomize_bn(
        nn.Sequential(
            nn.Linear(4, 5),
            nn.BatchNorm1d(5, momentum=0.3),
            nn.Dropout(0.5),
            nn.ReLU(),
            nn.Linear(5, 3),
            bnlab.BatchNorm1d(3, momentum=None),
            bnlab.BatchNorm1d(3),
            nn.BatchNorm1d(3, track_running_stats=False),
        )
    )
    bnlab.freeze(model[6], params=False)
    model[0].register_forward_hook(lambda m, a, y: None)
    model[1].register_forward_pre_hook(lambda m, a: None)
    model[5].register_forward_hook(lambda m, a, y: None)
    return model


def _module_state(model: nn.Module) -> dict[str, object]:
    """Everything recompute_population_stats could disturb, per module, plus the RNG."""
    out: dict[str, object] = {"rng": torch.get_rng_state()}
    for name, m in model.named_modules():
        out[f"{name}:mode"] = m.training
        out[f"{name}:hooks"] = (len(m._forward_hooks), len(m._forward_pre_hooks))
        out[f"{name}:attrs"] = {
            k: v for k, v in vars(m).items() if k in ("momentum", "population_estimator", "frozen")
        }
        for k, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            out[f"{name}.{k}"] = (t.detach().clone(), t.requires_grad, t.data_ptr())
    return out


def _assert_same_state(after: dict[str, object], before: dict[str, object], skip=()) -> None:
    assert after.keys() == before.keys()
    for key, old in before.items():
        if key in skip:
            continue
        new = after[key]
        if isinstance(old, tuple) and old and isinstance(old[0], torch.Tensor):
            assert torch.equal(new[0], old[0]) and new[1:] == old[1:], key
        elif isinstance(old, torch.Tensor):
            assert torch.equal(new, old), key
        else:
            assert new == old, key


class _Batches:
    """Re-iterable batches; the 2nd batch of every pass is ``bad`` (or raises it, if an
    exception class or instance)."""

    def __init__(self, bad=None):
        g = torch.Generator().manual_seed(3)
        self.good = [torch.randn(6, 4, generator=g) for _ in range(3)]
        self.bad = bad

    def __iter__(self):
        for i, x in enumerate(self.good):
            if i == 1 and self.bad is not None:
                if isinstance(self.bad, BaseException) or (
                    isinstance(self.bad, type) and issubclass(self.bad, BaseException)
                ):
                    raise self.bad
                yield self.bad
            else:
                yield x


_TARGET_STATE = {
    f"{i}.{k}" for i in (1, 5) for k in ("running_mean", "running_var", "num_batches_tracked")
} | {"1:attrs", "5:attrs"}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("model_mode", ["train", "eval", "mixed"])
def test_recompute_changes_only_the_statistics_it_recomputes(mode, model_mode):
    model = _calibration_model()
    model.train(model_mode == "train")
    if model_mode == "mixed":
        model[2].train()  # dropout active, BN layers in eval
        model[5].train()
    before = _module_state(model)
    bnlab.recompute_population_stats(model, _Batches(), mode=mode)
    after = _module_state(model)
    _assert_same_state(after, before, skip=_TARGET_STATE)
    assert int(model[1].num_batches_tracked) == int(model[5].num_batches_tracked) == 3
    assert model[1].population_estimator == model[5].population_estimator == "unbiased"
    for k in ("running_mean", "running_var"):  # the targets did change
        assert not torch.equal(after[f"1.{k}"][0], before[f"1.{k}"][0])
        assert not torch.equal(after[f"5.{k}"][0], before[f"5.{k}"][0])


def _nan_batch() -> torch.Tensor:
    x = torch.randn(6, 4)
    x[0, 0] = float("nan")
    return x


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "bad,error",
    [
        (_nan_batch(), FloatingPointError),
        (torch.randn(6, 7), RuntimeError),  # wrong feature count: the first Linear refuses it
        ("not a batch", TypeError),
        (KeyboardInterrupt, KeyboardInterrupt),  # Ctrl-C while the 2nd batch is fetched
    ],
    ids=["nan", "shape", "type", "ctrl-c"],
)
@pytest.mark.parametrize("model_mode", ["train", "eval"])
def test_recompute_raising_at_the_second_batch_changes_nothing(mode, bad, error, model_mode):
    model = _calibration_model().train(model_mode == "train")
    before = _module_state(model)
    with pytest.raises(error):
        bnlab.recompute_population_stats(model, _Batches(bad), mode=mode)
    _assert_same_state(_module_state(model), before)
    assert "population_estimator" not in vars(model[1])  # no attribute left on a torch layer


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recompute_interrupted_inside_the_forward_changes_nothing(mode):
    """Ctrl-C inside the 2nd forward pass (raised by a hook of the first module)."""
    model = _calibration_model().train()
    calls = []

    def interrupt(m, a, y):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = model[0].register_forward_hook(interrupt)
    before = _module_state(model)
    with pytest.raises(KeyboardInterrupt):
        bnlab.recompute_population_stats(model, _Batches(), mode=mode)
    _assert_same_state(_module_state(model), before)
    handle.remove()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recompute_restores_other_modules_buffers_and_rng(mode):
    """A non-BN module that updates a buffer in its forward (here: a counter) and dropout drawing
    random numbers: both end as they started, so the caller's random stream is not shifted."""

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1
            return x

    model = nn.Sequential(nn.Linear(4, 3), Counter(), nn.Dropout(0.3), nn.BatchNorm1d(3)).train()
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    bnlab.recompute_population_stats(model, _Batches(), mode=mode)
    assert int(model[1].calls) == 0
    assert torch.equal(torch.rand(3), expected_next)


def test_recompute_and_diagnose_draw_no_progress_bar_by_default(capsys):
    model = _calibration_model().eval()
    bnlab.recompute_population_stats(model, _Batches())
    bnlab.recompute_population_stats(model, _Batches(), mode="eval")
    bnlab.diagnose(model, _Batches(), file=None)
    assert capsys.readouterr().err == ""
    bnlab.recompute_population_stats(model, _Batches(), mode="eval", progress=True)
    assert "population statistics" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recompute_refuses_a_layer_the_forward_never_calls(mode):
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
            self.unused = bnlab.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.lin(x))

    model = randomize_bn(Unused()).eval()
    before = _module_state(model)
    with pytest.raises(ValueError, match="'unused'.*not called|not called.*unused"):
        bnlab.recompute_population_stats(model, _Batches(), mode=mode)
    _assert_same_state(_module_state(model), before)


def test_recompute_eval_mode_empty_batches_and_bad_num_batches_are_clear_errors():
    bn = bnlab.BatchNorm1d(3)
    with pytest.raises(ValueError, match="empty"):
        bnlab.recompute_population_stats(bn, [], mode="eval")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_batches"):
            bnlab.recompute_population_stats(bn, [torch.randn(4, 3)], num_batches=bad)
    with pytest.raises(ValueError, match="mode"):
        bnlab.recompute_population_stats(bn, [torch.randn(4, 3)], mode="test")
    assert int(bn.num_batches_tracked) == 0


def test_recompute_eval_mode_refuses_a_layer_called_twice_per_forward():
    """mode='eval' stops each pass at a layer's first call, so a BN called twice would silently
    miss the inputs of its second call: refused; mode='train' sees both calls."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.bn(x) * 2 + 1)

    model = Twice().eval()
    batches = [torch.randn(6, 4) * 3 + 2 for _ in range(2)]
    with pytest.raises(ValueError, match="'bn' is called 2 times.*mode='train'"):
        bnlab.recompute_population_stats(model, batches, mode="eval")
    assert int(model.bn.num_batches_tracked) == 0
    bnlab.recompute_population_stats(model, batches, mode="train")
    oracle = copy.deepcopy(model).train()
    seen: list[torch.Tensor] = []
    oracle.bn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for x in batches:
        oracle(x)
    mean, var = channel_stats(torch.cat(seen))
    torch.testing.assert_close(model.bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), var, rtol=1e-6, atol=1e-6)


def test_recompute_unbiased_with_one_value_per_channel_is_a_clear_error():
    bn = bnlab.BatchNorm1d(3).eval()
    with pytest.raises(ValueError, match="layer 'BatchNorm1d'.*1 value per channel"):
        bnlab.recompute_population_stats(bn, [torch.randn(1, 3)], mode="eval")
    assert int(bn.num_batches_tracked) == 0
    bnlab.recompute_population_stats(bn, [torch.randn(1, 3)], mode="eval", estimator="biased")
    assert torch.equal(bn.running_var, torch.zeros(3))


def test_num_batches_fetches_no_batch_beyond_it():
    batches = [torch.randn(5, 3) + i for i in range(4)]
    it = iter(batches)
    bnlab.recompute_population_stats(bnlab.BatchNorm1d(3), it, num_batches=2)
    assert next(it) is batches[2]  # the caller's iterator lost nothing


@pytest.mark.parametrize(
    "bad", [None, KeyboardInterrupt, _nan_batch()], ids=["ok", "ctrl-c", "nan"]
)
def test_diagnose_changes_nothing(bad):
    model = _calibration_model().train()
    before = _module_state(model)
    if bad is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            bnlab.diagnose(model, _Batches(bad), file=None)
    else:
        bnlab.diagnose(model, _Batches(bad), file=None)
    _assert_same_state(_module_state(model), before)
