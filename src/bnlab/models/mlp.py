"""The MNIST network of Ioffe & Szegedy (2015), section 4.1: fully connected, 3 hidden layers of
100 units, ``y = act(W u + b)``, 10-way output. With ``norm`` set, a normalization layer sits
between each hidden ``Linear`` and its nonlinearity, and the hidden ``Linear`` has no bias (BN's
beta makes it redundant, section 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import backend as B
from .. import kernels as K
from ..layers import get_layer, name_layers

__all__ = ["MLP", "StackedMLP", "gaussian_init_", "ACTIVATIONS"]

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}

# Each activation written into a given buffer, and dL/d(input) from dL/d(output) and the output
# itself, as autograd computes it (sigmoid: g y (1 - y); tanh: g (1 - y^2); relu: g where y > 0),
# also into a given buffer: the same kernels as torch.sigmoid(z) and the autograd formulas.
_ACT_FORWARD = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": lambda z, out: torch.ops.aten.relu.out(z, out=out),
}
_ACT_BACKWARD = {
    "sigmoid": lambda g, y, out: torch.ops.aten.sigmoid_backward.grad_input(g, y, grad_input=out),
    "tanh": lambda g, y, out: torch.ops.aten.tanh_backward.grad_input(g, y, grad_input=out),
    "relu": lambda g, y, out: torch.ops.aten.threshold_backward.grad_input(
        g, y, 0, grad_input=out
    ),
}


def _mean_cross_entropy(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of each network, ``z (K, N, classes)``, ``y (K, N)``, and its gradient
    ``(softmax(z) - onehot(y)) / N``: one compiled pass when the kernels take it (about 8 small
    tensor ops otherwise, ~90 us on the MNIST step)."""
    if B.kernels_enabled():
        out = K.grouped_cross_entropy(z, y)
        if out is not None:
            return out
    logp = torch.log_softmax(z, 2)
    target = y.unsqueeze(2)
    loss = logp.gather(2, target).mean((1, 2)).neg_()
    g = logp.exp_().scatter_add_(2, target, torch.full(target.shape, -1.0, dtype=z.dtype))
    return loss, g.mul_(1.0 / z.shape[1])


class MLP(nn.Module):
    """``in_features -> hidden... -> num_classes``; ``norm`` is a registry name or None."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        norm: str | None = None,
        act: str = "sigmoid",
        init_std: float | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown act {act!r}; known: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=norm is None))
            if norm is not None:
                layers.append(get_layer(norm)(h))
            layers.append(ACTIVATIONS[act]())
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if init_std is not None:  # the paper: "weights initialized to small random Gaussian"
            linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
            gaussian_init_([m.weight for m in linears], init_seed, init_std)
            for m in linears:
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        name_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gaussian_init_(weights: Sequence[torch.Tensor], seed: int, std: float) -> None:
    """Fill each ``(out, in)`` weight with N(0, std^2) draws from one generator seeded by ``seed``,
    in order. The same seed gives the same weights to an :class:`MLP` and to one slice of a
    :class:`StackedMLP`, so batched and separate runs start identically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in weights:
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * std)


class StackedMLP(nn.Module):
    """``K`` independent copies of :class:`MLP`, computed at once with batched matmuls.

    Input ``(K, N, in_features)``, output ``(K, N, num_classes)``: net ``k`` sees ``x[k]``.
    Weights are stored as ``(K, in, out)`` for ``torch.bmm``. With ``norm``, each hidden layer's
    pre-activations ``(K, N, C)`` are viewed as ``(N, K*C)`` and normalized by ONE bnlab
    BatchNorm1d with ``K*C`` features: per-activation BN over the mini-batch is exactly K separate
    BNs of C features, so the stack is the same computation as K separate networks.
    """

    def __init__(
        self,
        num_nets: int,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        norm: str | None = None,
        act: str = "sigmoid",
        bn_momentum: float | None = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"StackedMLP: unknown act {act!r}; known: {', '.join(ACTIVATIONS)}")
        k = num_nets
        widths = [in_features, *hidden, num_classes]
        self.num_nets = k
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(k, a, b)) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        # hidden biases only without norm (BN's beta makes them redundant); output bias always
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(k, b))
            for i, b in enumerate(widths[1:])
            if norm is None or i == len(hidden)
        )
        self.norms = (
            nn.ModuleList(get_layer(norm)(k * h, momentum=bn_momentum, eps=bn_eps) for h in hidden)
            if norm is not None
            else None
        )
        self.acts = nn.ModuleList(ACTIVATIONS[act]() for _ in hidden)
        self.act = act
        name_layers(self)

    def init_gaussian_(self, seeds: Sequence[int], std: float) -> None:
        """Net ``k`` gets the weights ``MLP`` would get from :func:`gaussian_init_` with
        ``seeds[k]``; biases zero, BN reset."""
        if len(seeds) != self.num_nets:
            raise ValueError(f"StackedMLP: {len(seeds)} seeds for {self.num_nets} nets")
        for k, seed in enumerate(seeds):
            mats = [torch.empty(w.shape[2], w.shape[1]) for w in self.weights]  # (out, in)
            gaussian_init_(mats, seed, std)
            with torch.no_grad():
                for w, m in zip(self.weights, mats, strict=True):
                    w[k].copy_(m.t())
        with torch.no_grad():
            for b in self.biases:
                b.zero_()
        if self.norms is not None:
            for n in self.norms:
                n.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = x.shape[0], x.shape[1]
        h = x.reshape(k, n, -1)
        biases = iter(self.biases)
        last = len(self.weights) - 1
        for i, w in enumerate(self.weights):
            if self.norms is None or i == last:
                h = torch.baddbmm(next(biases).unsqueeze(1), h, w)  # (K, N, out)
            else:
                h = torch.bmm(h, w)  # (K, N, C)
                c = h.shape[2]
                # (K, N, C) -> (N, K*C): per-activation BN of K*C features
                h = self.norms[i](h.transpose(0, 1).reshape(n, k * c))
                h = h.view(n, k, c).transpose(0, 1)
            if i < last:
                h = self.acts[i](h)
        return h

    @torch.no_grad()
    def sgd_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: float,
        momentum: float = 0.0,
        velocity: dict[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One SGD step of every network on its own mini-batch, the backward pass written out.

        ``x`` ``(K, N, in_features)``, ``y`` ``(K, N)`` class indices. The loss of network ``k``
        is its mean cross-entropy over its ``N`` examples; the step is what ``forward``, autograd
        and ``torch.optim.SGD(lr=lr, momentum=momentum)`` would do (no dampening, weight decay or
        Nesterov; tested equal in float64), in about a third of the tensor operations::

            dL/dlogits = (softmax(logits) - onehot(y)) / N
            dL/dW_l    = a_{l-1}^T  dL/dz_l        dL/da_{l-1} = dL/dz_l  W_l^T
            dL/dz_l    = act'(a_l) * dL/da_l       (through BN first: its section 3 gradients)
            v <- momentum v + g,   p <- p - lr v   (v = g without momentum; fused with the bmm)

        The normalization layers run through :meth:`BatchNorm1d.prepare_forward_with_backward`
        (``forward_with_backward`` on reused buffers): the same transform, kernels, checks and
        running-statistic updates as their ``forward``. Buffers and views are kept from step to
        step in a workspace (see :class:`_StepWorkspace`), rebuilt when the batch size, dtype or
        the parameters' storage change. With ``momentum``, ``velocity`` maps each parameter to
        its buffer (start from zeros, e.g. ``{p: torch.zeros_like(p) for p in
        model.parameters()}``); it is updated in place.
        Returns the ``(K,)`` losses before the step.
        """
        if momentum and velocity is None:
            raise ValueError("StackedMLP.sgd_step: momentum needs a velocity dict of buffers")
        if x.dim() != 3 or x.shape[0] != self.num_nets or y.shape != x.shape[:2]:
            raise ValueError(
                f"StackedMLP.sgd_step: expected x (K={self.num_nets}, N, features) and y (K, N), "
                f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        act, act_backward = _ACT_FORWARD[self.act], _ACT_BACKWARD[self.act]
        layers = self._step_workspace(x).layers
        last = len(layers) - 1

        # Forward. The hidden activations go into the workspace's buffers; with norms they are
        # (N, K*C) rows, what BN takes, and the bmm writes its output through a (K, N, C) view of
        # the BN input buffer (out=), without copies.
        h = x
        for lay in layers[:last]:
            if lay.bn is None:
                z = torch.baddbmm(lay.bias_row, h, lay.w, out=lay.z_out)
            else:
                torch.bmm(h, lay.w, out=lay.z_out)
                z = lay.bn.forward()  # per-activation BN of K*C features (see class docstring)
            act(z, out=lay.a)
            h = lay.a_kn
        top = layers[last]
        z = torch.baddbmm(top.bias_row, h, top.w, out=top.z_out)
        loss, g = _mean_cross_entropy(z, y)  # (K,), dL/dlogits (K, N, classes)

        # (parameter, gradient) pairs of the biases and BN's gamma/beta, updated together at the
        # end with foreach ops (one call, not one per tensor); the weights update in their bmm
        small: list[tuple[torch.Tensor, torch.Tensor]] = []
        # backward, last layer first; g = dL/dz of layer i, (K, N, width) (maybe a strided view)
        for i in range(last, -1, -1):
            lay = layers[i]
            below = layers[i - 1] if i > 0 else None
            if below is not None:  # dL/da of the layer below, taken before W changes
                torch.bmm(g, lay.w_t, out=below.da_out)
            a_t = x.transpose(1, 2) if below is None else below.a_t  # this layer's input^T
            w = lay.w
            if momentum:
                v = velocity[w]
                v.baddbmm_(a_t, g, beta=momentum)
                w.sub_(v, alpha=lr)
            else:
                w.baddbmm_(a_t, g, alpha=-lr)
            if lay.bias is not None:
                small.append((lay.bias, g.sum(1)))
            if below is None:
                break
            act_backward(below.da, below.a, below.dz)  # dL/dz (with norms: dL/dy of the BN)
            if below.bn is None:
                g = below.dz
                continue
            _, dgamma, dbeta = below.bn.backward(below.dz)  # dL/dx into below.bn.dx
            if dgamma is not None:
                small.append((below.bn.layer.weight, dgamma))
            if dbeta is not None:
                small.append((below.bn.layer.bias, dbeta))
            g = below.g_out  # the (K, N, C) view of the BN's dx
        params, grads = [p for p, _ in small], [g for _, g in small]
        if momentum:
            buffers = [velocity[p] for p in params]
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-lr)
        else:
            torch._foreach_add_(params, grads, alpha=-lr)
        return loss

    # The workspace of sgd_step, rebuilt when its key changes; never copied or pickled.
    _workspace: _StepWorkspace | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_workspace"] = None  # buffers and views of this object's tensors (not a copy's)
        return state

    def _step_workspace(self, x: torch.Tensor) -> _StepWorkspace:
        """The buffers and views of a step on ``x``: the cached workspace while it fits (same
        N and dtype, the same weight and bias objects with the same storage, dtype and shape,
        the same norm layers), else a new one."""
        params = (*self.weights._parameters.values(), *self.biases._parameters.values())
        norms = () if self.norms is None else tuple(self.norms._modules.values())
        key = (x.shape[1], x.dtype, *(_layout(p) for p in params))
        ws = self._workspace
        if ws is None or ws.key != key or not _same_objects(ws.objects, (*params, *norms)):
            ws = _StepWorkspace(self, x.shape[1], x.dtype)
            ws.key, ws.objects = key, (*params, *norms)
            self._workspace = ws
        return ws


def _layout(t: torch.Tensor) -> tuple:
    """What a view of ``t`` depends on: its storage address, dtype and shape."""
    return t.data_ptr(), t.dtype, t.shape


def _same_objects(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(p is q for p, q in zip(a, b, strict=True))


class _LayerWorkspace:
    """One layer's buffers and views for :meth:`StackedMLP.sgd_step` (see
    :class:`_StepWorkspace`)."""

    def __init__(self, w, bias, norm, n: int, dtype: torch.dtype, hidden: bool) -> None:
        k, c = w.shape[0], w.shape[2]
        self.w, self.w_t = w, w.transpose(1, 2)  # W, and W^T for dL/da = dL/dz W^T
        self.bias = bias
        self.bias_row = None if bias is None else bias.unsqueeze(1)  # (K, 1, C) for baddbmm
        self.bn = None if norm is None else norm.prepare_forward_with_backward((n, k * c), dtype)
        if self.bn is not None:  # (N, K*C) rows, what BN takes; the bmm works on (K, N, C) views
            self.z_out = _kn(self.bn.x, k)  # the matmul writes the BN input
            self.g_out = _kn(self.bn.dx, k)  # dL/dz for the bmm below and the weight update
        else:
            self.z_out = torch.empty(k, n, c, dtype=dtype)
        if hidden:
            shape = (n, k * c) if self.bn is not None else (k, n, c)
            self.a = torch.empty(shape, dtype=dtype)  # activation output
            self.da = torch.empty(shape, dtype=dtype)  # dL/da
            self.dz = torch.empty(shape, dtype=dtype)  # dL/d(activation input)
            self.a_kn = _kn(self.a, k) if self.bn is not None else self.a  # next layer's input
            self.a_t = self.a_kn.transpose(1, 2)  # its transpose, for the next weight update
            self.da_out = _kn(self.da, k) if self.bn is not None else self.da


def _kn(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The (K, N, C) view of (N, K*C) rows."""
    return rows.view(rows.shape[0], k, -1).transpose(0, 1)


class _StepWorkspace:
    """What :meth:`StackedMLP.sgd_step` would otherwise allocate or view afresh at every step
    (about 60 small tensor calls, a third of the step at the MNIST size): per layer the
    pre-activation, activation and gradient buffers in the layouts the bmm calls and the BN
    take, their transposed views, the views ``W^T`` and ``b[:, None]`` of the parameters, and the
    norm layers' :class:`bnlab.layers.batchnorm.ExplicitBatchNorm` (their own input and output
    buffers). Buffers are overwritten by the next step; views of parameters stay valid while
    the parameters keep their storage, which ``StackedMLP._step_workspace`` checks every step
    (``key``, ``objects``): ``model.double()``, a new Parameter or another batch size builds a
    new workspace; ``load_state_dict`` copies in place and keeps it."""

    key: tuple = ()
    objects: tuple = ()

    def __init__(self, model: StackedMLP, n: int, dtype: torch.dtype) -> None:
        weights = list(model.weights)
        biases = iter(model.biases)
        last = len(weights) - 1
        hidden_bias = model.norms is None
        self.layers = [
            _LayerWorkspace(
                w,
                next(biases) if hidden_bias or i == last else None,
                None if model.norms is None or i == last else model.norms[i],
                n,
                dtype,
                hidden=i < last,
            )
            for i, w in enumerate(weights)
        ]
