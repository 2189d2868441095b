"""Figure 1's training step: K copies of the paper's MNIST MLP trained at once, the backward
pass written out (Ioffe & Szegedy 2015, section 4.1).

:class:`StackedMLP` holds K independent networks as ``(K, in, out)`` weights for ``torch.bmm``;
its ``forward`` is the plain layer-by-layer computation (autograd works through it, and the
evaluation uses it). :meth:`StackedMLP.sgd_step` is the experiment's training step: the forward
pass, the backward pass by hand (cross-entropy, activation and weight gradients, and the Batch
Normalizing Transform's section 3 gradients) and the SGD update fused into the weight-gradient
``bmm``, on buffers kept from step to step.

The BN layers are plain :class:`bnlab.BatchNorm1d` modules: the step reads their parameters and
mode and updates their running statistics, but computes the transform itself through the pure
functions of bnlab's functional/kernels contract (:mod:`bnlab.backend`: ``train_forward``,
``commit_stats``, ``train_backward``; or the compiled entry points of :mod:`bnlab.kernels` the
layers' own calls take, called with addresses and numpy views kept across steps). The
running-statistic update is the one the layer's ``forward`` makes: same values, same refusal of
a non-finite batch before any buffer moves, same ``num_batches_tracked`` (tested against the
layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from .. import backend as B
from .. import kernels as K
from ..functional import check_momentum
from ..layers import BatchNorm1d, get_layer, name_layers
from ..models.mlp import ACTIVATIONS, gaussian_init_

__all__ = ["StackedMLP", "mean_cross_entropy"]

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


def _step_kernels() -> ModuleType:
    """:mod:`bnlab.experiments.mnist_kernels`, imported on first use (it imports Numba)."""
    from . import mnist_kernels

    return mnist_kernels


def mean_cross_entropy(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of each network, ``z (K, N, classes)``, ``y (K, N)``, and its gradient
    ``(softmax(z) - onehot(y)) / N``: one compiled pass when the kernels are enabled and take the
    tensors, else tensor ops (same formula)."""
    if B.kernels_enabled():
        out = _step_kernels().grouped_cross_entropy(z, y)
        if out is not None:
            return out
    logp = torch.log_softmax(z, 2)
    target = y.unsqueeze(2)
    loss = logp.gather(2, target).mean((1, 2)).neg_()
    g = logp.exp_().scatter_add_(2, target, torch.full(target.shape, -1.0, dtype=z.dtype))
    return loss, g.mul_(1.0 / z.shape[1])


class StackedMLP(nn.Module):
    """``K`` independent copies of :class:`bnlab.models.MLP`, computed at once with batched
    matmuls.

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

    def forward(self, x: Tensor) -> Tensor:
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
        x: Tensor,
        y: Tensor,
        lr: float,
        momentum: float = 0.0,
        velocity: dict[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """One SGD step of every network on its own mini-batch, the backward pass written out.

        ``x`` ``(K, N, in_features)``, ``y`` ``(K, N)`` class indices. The loss of network ``k``
        is its mean cross-entropy over its ``N`` examples; the step is what ``forward``, autograd
        and ``torch.optim.SGD(lr=lr, momentum=momentum)`` would do in training mode (no
        dampening, weight decay or Nesterov; tested equal in float64), in about a third of the
        tensor operations::

            dL/dlogits = (softmax(logits) - onehot(y)) / N
            dL/dW_l    = a_{l-1}^T  dL/dz_l        dL/da_{l-1} = dL/dz_l  W_l^T
            dL/dz_l    = act'(a_l) * dL/da_l       (through BN first: its section 3 gradients)
            v <- momentum v + g,   p <- p - lr v   (v = g without momentum; fused with the bmm)

        The BN layers normalize with the statistics of the mini-batch (Algorithm 1) and update
        their running statistics as their ``forward`` does (see the module docstring). A BN
        layer in eval mode or frozen (:func:`bnlab.freeze`), or a BN variant, is refused: this
        step writes out the plain training transform only (train such models with autograd).
        Buffers and views are kept from step to step in a workspace (:class:`_StepWorkspace`),
        rebuilt when the batch size, dtype or the parameters' storage change. With ``momentum``,
        ``velocity`` maps each parameter to its buffer (start from zeros, e.g. ``{p:
        torch.zeros_like(p) for p in model.parameters()}``); it is updated in place.
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
        loss, g = mean_cross_entropy(z, y)  # (K,), dL/dlogits (K, N, classes)

        # (parameter, gradient) pairs of the biases and BN's gamma/beta, updated together at the
        # end with foreach ops (one call, not one per tensor); the weights update in their bmm
        small: list[tuple[Tensor, Tensor]] = []
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
            dgamma, dbeta = below.bn.backward()  # dL/dx into below.bn.dx
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

    def _step_workspace(self, x: Tensor) -> _StepWorkspace:
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


def _layout(t: Tensor | None) -> tuple | None:
    """What a view of ``t`` depends on: its storage address, dtype and shape."""
    return None if t is None else (t.data_ptr(), t.dtype, t.shape)


def _same_objects(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(p is q for p, q in zip(a, b, strict=True))


def _np(t: Tensor):
    """numpy view of a layer's tensor (:func:`bnlab.kernels.array_view`: its storage stays
    resizable, as the model's owner may need it)."""
    return K.array_view(t)


class _BatchNormStep:
    """One BN layer's transform inside :meth:`StackedMLP.sgd_step`: Algorithm 1 on the
    mini-batch written into :attr:`x` ``(N, C)``, the layer's running-statistic update, and the
    section 3 backward of :attr:`dy` (written by the caller) into :attr:`dx`. ``x``, ``y``,
    ``dy``, ``dx``, ``dgamma``, ``dbeta`` are buffers owned by this object and overwritten by
    every call.

    Every call reads the layer's current parameters, ``eps``, ``momentum``, ``activation`` and
    mode. Two paths with the same arithmetic: when the kernels are enabled and take the tensors
    (:func:`bnlab.backend.kernels_enabled`, :func:`bnlab.kernels.unsupported_reason`), the
    compiled entry points the layers' own calls take (``train_fwd_at``, the statistics and their
    commit in one call, and ``backward_at`` of :mod:`bnlab.kernels._numba`), with arguments of
    the same types, so the step runs the loops :func:`bnlab.kernels.warm_up` compiled: this
    object's buffers by address and numpy views of the layer's tensors re-made only when a
    tensor object or its storage changes (checked every call); otherwise
    :func:`bnlab.backend.train_forward`, ``commit_stats`` and ``train_backward``, which also give
    the reference backend.
    """

    def __init__(self, layer: nn.Module, n: int, dtype: torch.dtype) -> None:
        if type(layer) is not BatchNorm1d:
            raise TypeError(
                f"StackedMLP.sgd_step: {_describe(layer)} is not a plain bnlab BatchNorm1d; the "
                "step writes out Algorithm 1's backward only (train this model with autograd)"
            )
        if n < 2:
            raise ValueError(
                f"StackedMLP.sgd_step: {_describe(layer)} needs more than 1 value per channel "
                f"for batch statistics, got a mini-batch of {n}"
            )
        c = layer.num_features
        self.layer, self.n, self.c = layer, n, c
        self.x = torch.zeros(n, c, dtype=dtype)
        self.y, self.dy, self.dx = (torch.empty_like(self.x) for _ in range(3))
        grads = torch.empty(2, c, dtype=dtype)
        self.dgamma, self.dbeta = grads[0], grads[1]
        self._stats = torch.empty(5, c, dtype=dtype)  # mean, var, invstd, 2 coefficients
        # the loops, the buffers' addresses and numpy views of the statistics (first kernel call)
        self._np = None
        self._tensors: tuple = ()  # weight, bias, running_mean, running_var, num_batches_tracked
        self._layouts: tuple = ()
        self._views: tuple | None = None  # their numpy views, None: the kernels do not take them
        self._last: tuple = ()  # what the backward needs from the last forward

    def _bind(self, tensors: tuple) -> bool:
        """Numpy views of the layer's tensors for the compiled loops, kept while the same
        objects keep the same storage, dtype and shape; False when the kernels do not take them
        (another dtype or device, not contiguous)."""
        layouts = tuple(_layout(t) for t in tensors)
        if layouts == self._layouts and _same_objects(tensors, self._tensors):
            return self._views is not None
        self._tensors, self._layouts, self._views = tensors, layouts, None
        w, b, rm, rv, nbt = tensors
        if K.unsupported_reason(self.x, w, b, rm, rv) is not None or not all(
            t is None or t.is_contiguous() for t in tensors[:4]
        ):
            return False
        if nbt is not None and (nbt.dtype != torch.int64 or not nbt.is_cpu):
            return False
        if self._np is None:
            k = K.compiled()
            stats = self._stats.numpy()  # rows: mean, var, invstd, 2 coefficients
            self._np = (
                k.train_fwd_at, k.backward_at, k.commit_stats, self.x.data_ptr(),
                self.y.data_ptr(), self.dy.data_ptr(), self.dx.data_ptr(), stats, stats[0],
                stats[1], stats[2], stats[3:5], self.dgamma.data_ptr(), self.dbeta.data_ptr(),
                np.empty(0, stats.dtype),
            )  # fmt: skip
        empty = self._np[-1]  # placeholder for an absent tensor
        has = rm is not None
        self._views = (
            empty if w is None else _np(w), w is not None,
            empty if b is None else _np(b), b is not None,
            _np(rm) if has else empty, _np(rv) if has else empty,
            _np(nbt) if has else _NO_COUNT, has,
        )  # fmt: skip
        return True

    def forward(self) -> Tensor:
        """Algorithm 1 on :attr:`x` [+ ReLU if the layer has it] and the running-statistic
        update; returns ``y`` (a buffer)."""
        layer = self.layer
        self._last = ()
        if not layer.training or layer.frozen:
            raise RuntimeError(
                f"StackedMLP.sgd_step: {_describe(layer)} is "
                f"{'frozen' if layer.frozen else 'in eval mode'}; the step normalizes with "
                "mini-batch statistics only (call model.train(), or train with autograd)"
            )
        update = layer.track_running_stats
        momentum = layer.momentum
        if update:
            try:
                momentum = check_momentum(momentum)  # (a float, or None)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{_describe(layer)}: {exc}") from None
        relu = layer.activation == "relu"
        params, buffers = layer._parameters, layer._buffers  # (no Module.__getattr__ lookups)
        w, b = params["weight"], params["bias"]
        rm, rv, nbt = (buffers[k] for k in ("running_mean", "running_var", "num_batches_tracked"))
        if B.kernels_enabled() and self._bind((w, b, rm, rv, nbt)):
            fwd, _, commit, xp, yp, _, _, stats, mean, var, _, _, _, _, none = self._np
            wv, has_w, bv, has_b, rmv, rvv, nbtv, has = self._views
            n, c = self.n, self.c
            cumulative, f = momentum is None, 0.0 if momentum is None else float(momentum)
            # the layers' own entry point and argument types (one compiled loop for both): the
            # statistics, then, for a layer that keeps running averages, their update
            ok = fwd(
                xp, yp, n, c, 1, wv, bv, has_w, has_b, float(layer.eps), relu, stats, rmv, rvv,
                nbtv, update and has, cumulative, f, none, False,
            )  # fmt: skip
            if not (update and has):  # (nothing to update: the statistics' check alone)
                ok = commit(mean, var, rmv, rvv, nbtv, False, cumulative, f, float(self.n))
            out, saved = self.y, None
        else:
            path, out, mean, var, invstd = B.train_forward(self.x, w, b, layer.eps, relu)
            ok = B.commit_stats(mean, var, rm, rv, nbt, momentum, self.n, update)
            saved = (path, mean, invstd)
        if not ok:
            raise FloatingPointError(
                f"StackedMLP.sgd_step: {_describe(layer)}: non-finite batch statistics (NaN or "
                f"Inf in the input of shape {tuple(self.x.shape)}); running statistics were left "
                "unchanged"
            )
        if update and rm is not None and layer.population_estimator is not None:
            layer.population_estimator = None  # a running average again, as the layer's forward
        # gradients for the parameters that take them
        want_w = w is not None and w.requires_grad
        want_b = b is not None and b.requires_grad
        self._last = (saved, relu, out, w, want_w, want_b)
        return out

    def backward(self) -> tuple[Tensor | None, Tensor | None]:
        """The backward of the last :meth:`forward` for ``dy`` (the buffer :attr:`dy`): dL/dx
        into :attr:`dx`; returns ``(dgamma, dbeta)`` (buffers; None for a parameter that is
        absent or does not require grad), with the weight's values as of now."""
        saved, relu, y, w, want_w, want_b = self._last
        need = want_w or want_b
        if saved is None:
            _, bwd, _, xp, _, dyp, dxp, _, mean, _, invstd, coef, gp, bp, none = self._np
            wv, has_w = self._views[0], self._views[1]
            n, c = self.n, self.c
            # (the ReLU's mask recomputed from x with the forward's coefficients, as
            # bnlab.kernels.lean_backward does)
            bwd(
                dyp, xp, xp, relu, coef, K.RELU_FLOOR[self.x.dtype], n, c, 1, mean, invstd, wv,
                has_w, True, need, dxp, gp, bp, none, False,
            )  # fmt: skip
            dgamma, dbeta = self.dgamma, self.dbeta
        else:
            path, mean, invstd = saved
            dx, dgamma, dbeta = B.train_backward(
                path, self.dy, self.x, mean, invstd, w, need_dparams=need, y=y if relu else None
            )
            self.dx.copy_(dx)
        return dgamma if want_w else None, dbeta if want_b else None


_NO_COUNT = np.zeros((), np.int64)  # placeholder for num_batches_tracked without tracking


def _describe(layer: nn.Module) -> str:
    """``'norms.0' BatchNorm1d(300)``, as the layer's own errors name it."""
    name = getattr(layer, "layer_name", None)
    size = getattr(layer, "num_features", "")
    prefix = f"'{name}' " if name else ""
    return f"{prefix}{type(layer).__name__}({size})"


class _LayerWorkspace:
    """One layer's buffers and views for :meth:`StackedMLP.sgd_step` (see
    :class:`_StepWorkspace`)."""

    def __init__(self, w, bias, norm, n: int, dtype: torch.dtype, hidden: bool) -> None:
        k, c = w.shape[0], w.shape[2]
        self.w, self.w_t = w, w.transpose(1, 2)  # W, and W^T for dL/da = dL/dz W^T
        self.bias = bias
        self.bias_row = None if bias is None else bias.unsqueeze(1)  # (K, 1, C) for baddbmm
        self.bn = None if norm is None else _BatchNormStep(norm, n, dtype)
        if self.bn is not None:  # (N, K*C) rows, what BN takes; the bmm works on (K, N, C) views
            self.z_out = _kn(self.bn.x, k)  # the matmul writes the BN input
            self.g_out = _kn(self.bn.dx, k)  # dL/dz for the bmm below and the weight update
        else:
            self.z_out = torch.empty(k, n, c, dtype=dtype)
        if hidden:
            shape = (n, k * c) if self.bn is not None else (k, n, c)
            self.a = torch.empty(shape, dtype=dtype)  # activation output
            self.da = torch.empty(shape, dtype=dtype)  # dL/da
            # dL/d(activation input): with BN, its dL/dy buffer
            self.dz = self.bn.dy if self.bn is not None else torch.empty(shape, dtype=dtype)
            self.a_kn = _kn(self.a, k) if self.bn is not None else self.a  # next layer's input
            self.a_t = self.a_kn.transpose(1, 2)  # its transpose, for the next weight update
            self.da_out = _kn(self.da, k) if self.bn is not None else self.da


def _kn(rows: Tensor, k: int) -> Tensor:
    """The (K, N, C) view of (N, K*C) rows."""
    return rows.view(rows.shape[0], k, -1).transpose(0, 1)


class _StepWorkspace:
    """What :meth:`StackedMLP.sgd_step` would otherwise allocate or view afresh at every step
    (dozens of small tensor calls per step): per layer the pre-activation, activation and
    gradient buffers in the layouts the bmm calls and the BN take, their transposed views, the
    views ``W^T`` and ``b[:, None]`` of the parameters, and the BN layers' :class:`_BatchNormStep`
    (their own input and output buffers). Buffers are overwritten by the next step; views of
    parameters stay valid while the parameters keep their storage, which
    ``StackedMLP._step_workspace`` checks every step (``key``, ``objects``): ``model.double()``,
    a new Parameter or another batch size builds a new workspace; ``load_state_dict`` copies in
    place and keeps it."""

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
