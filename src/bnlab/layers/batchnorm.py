"""Drop-in ``BatchNorm1d/2d/3d``: subclasses of ``torch.nn.BatchNorm1d/2d/3d`` with bnlab's forward.

Ioffe & Szegedy (2015): Algorithm 1 in training mode (mini-batch statistics), Algorithm 2 at
inference (population statistics kept as running averages). Each layer IS a torch BatchNorm
layer (``isinstance(bnlab.BatchNorm2d(c), torch.nn.BatchNorm2d)``): constructor arguments,
buffers, state_dict keys and versions, ``reset_*`` and train/eval semantics are torch's, so
checkpoints interchange in both directions and torch's ``isinstance``-based tools
(``SyncBatchNorm.convert_sync_batchnorm``, fusers, weight-decay filters) treat them as BN. Only
``forward`` (and ``extra_repr``) are bnlab's.

Running statistics (updated only in training mode with ``track_running_stats=True``)::

    f = momentum                       if momentum is a number (any finite value, as torch)
    f = 1 / num_batches_tracked        if momentum is None (cumulative moving average)
    running_mean <- (1 - f) * running_mean + f * mu_B
    running_var  <- (1 - f) * running_var  + f * m / (m - 1) * sigma_B^2   (unbiased, Alg. 2)

where ``m = N * prod(spatial)`` values per channel. Note PyTorch's momentum convention: ``f`` is the
weight of the *new* batch (0.1 by default), the opposite of the "decay" of some other libraries.
An empty batch (``m = 0``) gives an empty output and is counted in ``num_batches_tracked``
without changing the averages, as torch.

Every input torch accepts gets torch's answer; what torch refuses is refused with the layer named
(``layer_name``), and where torch would still change state before refusing (it counts a batch
of one value per channel or with ``eps <= 0`` in ``num_batches_tracked`` first), bnlab refuses
before touching anything. A batch that would corrupt state never reaches it: non-finite batch
statistics raise ``FloatingPointError`` before any buffer is touched (the check looks at the C
per-channel statistics, not the input, so it costs one reduction of C values).

``activation="relu"`` (bnlab only) returns ``max(BN(x), 0)``, fused into the kernel on the fused
backend; the default ``None`` is the plain layer. torch's own tools know nothing of it: use
``bnlab.fold`` (and bnlab's entries for ``torch.ao.quantization.fuse_modules``) rather than
``torch.nn.utils.fusion`` or ``convert_sync_batchnorm`` on such layers, which would drop the
ReLU.

The forward is one path for every tool (eager, ``torch.compile``, ``torch.export``, ONNX,
``jit.trace``/``jit.script``, fx, ``torch.func``): :mod:`bnlab.autograd` picks the form of each
call (:mod:`bnlab.ops`). Variants (batch renorm, ghost BN, ...) subclass :class:`_BatchNorm` and
override :meth:`_BatchNorm._train_forward`, the one place where statistics are computed;
:meth:`_BatchNorm._commit_batch_stats` is the one place where they are accepted or refused.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, nn

from .. import backend as B
from ..autograd import (
    BatchNormTrain,
    _needs_graph,
    _relu_flag,
    as_rows,
    batch_norm_eval,
    batch_norm_eval_lean,
    batch_norm_train,
    batch_norm_train_lean,
    check_dtypes,
    commit_stats,
    input_kind_error,
    rows_to_sequence,
    sequence_rows,
    standard_input,
)
from ..errors import ChannelCountError, NotATensorError
from ..functional import check_momentum, is_real_number
from ..ops import EAGER, check_batch, non_finite_message, route

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "name_layers",
]


def _positive_int(value: object) -> int | None:
    """``value`` as a positive int where it is an integer torch takes as a size (an int, a
    numpy integer, a 0-d integer tensor; not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor) and (value.is_floating_point() or value.dtype == torch.bool):
        return None
    try:
        count = operator.index(value)
    except TypeError:
        return None
    return count if count >= 1 else None


def _as_vector(t: Tensor | None) -> Tensor | None:
    """``t`` reshaped to 1-D when it is not (a parameter of C values in another shape, which
    torch's layers take); otherwise ``t`` itself."""
    if t is not None and t.dim() != 1:
        return t.reshape(-1)
    return t


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Common state and behaviour of the bnlab BatchNorm layers (torch's ``_BatchNorm`` with
    bnlab's forward)."""

    # (no class-level annotations here: torch.jit.script reads the class's annotations and
    # torch's own, on _NormBase, describe the shared attributes)
    _valid_ranks = ()
    _rank_text = ""
    # Inference state (bnlab.inference): class-level defaults, also set per instance in __init__
    # (TorchScript reads instance attributes), so every construction path starts unfrozen with
    # running averages from training.
    frozen = False  # freeze(): population statistics in train and eval, no updates
    _fast_views = None  # the short paths' cache (views, a plan: bnlab.kernels.new_views), on use
    population_estimator = None  # recompute_population_stats(): "unbiased"/"biased"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        name = type(self).__name__
        count = _positive_int(num_features)  # (an int, as a numpy or 0-d tensor one torch takes)
        if count is None and num_features == 0 and isinstance(self, _LazyBatchNorm):
            count = 0  # (torch's lazy base constructs with 0 features until the first input)
        if count is None:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        num_features = count
        if not is_real_number(eps):  # (as torch's forward reads it: a bool or 0-d tensor too)
            raise TypeError(f"{name}: eps must be a real number, got {type(eps).__name__} {eps!r}")
        if activation not in (None, "relu"):
            raise ValueError(f"{name}: activation must be None or 'relu', got {activation!r}")
        try:
            check_momentum(momentum)
        except (TypeError, ValueError) as exc:
            label = f"{name}({num_features})" if num_features else name  # (a lazy layer: 0)
            raise type(exc)(f"{label}: {exc}") from None
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.activation = activation
        self.layer_name: str | None = None  # qualified name in a model, set by name_layers()
        self.frozen = False
        self.population_estimator = None

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.population_estimator:
            text += f", population={self.population_estimator}"
        if self.frozen:
            text += ", frozen=True"
        return text if self.activation is None else f"{text}, activation={self.activation!r}"

    # ----------------------------------------------------------------------------- checks
    def _describe(self) -> str:
        kind = "BatchNorm"
        if not torch.jit.is_scripting():
            kind = type(self).__name__
        name = self.layer_name
        prefix = "" if name is None else "'" + name + "' "
        return prefix + kind + "(" + str(self.num_features) + ")"

    @torch.jit.unused
    def _graph_describe(self) -> str:
        """:meth:`_describe` for the texts a call makes whether or not it refuses, such as the
        non-finite refusal a compiled graph carries: the class and size, and that the name is
        left out, while ``torch.compile`` traces the layer. A name in the graph is a constant
        Dynamo guards on, so code traced for one layer (a residual block's forward, compiled as
        a region or between a sharding tool's hooks) would be compiled again for every other
        layer of the same shape instead of reused, and compiling stops at Dynamo's recompile
        limit. Texts made only to raise, and all eager ones, name the layer."""
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return f"{type(self).__name__}({self.num_features}) (names stay out of compiled graphs)"
        return self._describe()

    def _check_input(
        self,
        x: Tensor,
        batch_stats: bool,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
    ) -> None:
        """Refuse, naming the layer, what torch refuses (and what it would refuse only after
        counting the batch): a non-tensor or non-float input, a wrong rank or channel count,
        mixed dtypes, a parameter or running statistic of another size than the channel count,
        a running statistic that is not 1-D (a weight or bias of C values may have any shape, as
        in torch: :meth:`_affine`), one value per channel or ``eps <= 0`` with batch statistics,
        ``eps < 0`` with population statistics, a running statistic that requires grad while
        autograd records. The running statistics are given when this call uses or updates
        them."""
        if torch.jit.is_scripting():
            self._check_input_dim(x)  # torch's rank check; the ops check the rest
        else:
            if isinstance(x, torch.fx.Proxy):  # symbolic tracing: no values to check yet
                return
            self._check_kind(x)
            if x.shape[1] != self.num_features:
                raise ChannelCountError(
                    f"{self._describe()}: expected {self.num_features} channels in dim 1, "
                    f"got input of shape {tuple(x.shape)}"
                )
            dt = x.dtype
            if not (
                (weight is None or weight.dtype == dt)
                and (bias is None or bias.dtype == dt)
                and (running_mean is None or running_mean.dtype == dt)
                and (running_var is None or running_var.dtype == dt)
            ):
                self._check_mixed_dtypes(x, (weight, bias, running_mean, running_var))
            c = self.num_features
            for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                            ("running_var", running_var)):  # fmt: skip
                if t is not None and t.numel() != c:  # (torch's rule: the count)
                    raise RuntimeError(
                        f"{self._describe()}: {name} should contain {c} elements, not "
                        f"{t.numel()}"
                    )
                if t is not None and t.dim() != 1 and name.startswith("running"):
                    raise RuntimeError(  # (torch refuses them; it reads weight/bias in any shape)
                        f"{self._describe()}: {name} should be 1-D ({c},), got shape "
                        f"{tuple(t.shape)}"
                    )
                if (t is not None and t.requires_grad and name.startswith("running")
                        and torch.is_grad_enabled()):  # (torch refuses it under autograd only)
                    raise RuntimeError(
                        f"{self._describe()}: {name} requires grad, but a running statistic is "
                        "not differentiated: detach it, or call the layer under torch.no_grad()"
                    )
        if batch_stats:
            if x.numel() == x.shape[1] or self.eps <= 0:  # m = 1, or no eps (NaN passes: torch)
                check_batch(x, self.eps, True, self._describe())
        elif self.eps < 0:
            check_batch(x, self.eps, False, self._describe())

    @torch.jit.unused
    def _check_kind(self, x: Tensor) -> None:
        """Refuse, naming the layer and with torch's exception class, a non-tensor, an input
        of a dtype or layout batch norm is not implemented for, or one of another rank than the
        layer's."""
        if not isinstance(x, Tensor):
            raise NotATensorError(f"{self._describe()}: expected a Tensor, got {type(x).__name__}")
        error = input_kind_error(x, self._describe)
        if error is not None:
            raise error
        if x.dim() not in self._valid_ranks:
            raise ValueError(
                f"{self._describe()}: expected {self._rank_text} input, "
                f"got {x.dim()}D input of shape {tuple(x.shape)}"
            )

    @torch.jit.unused
    def _check_mixed_dtypes(self, x: Tensor, tensors: tuple[Tensor | None, ...]) -> None:
        """torch's CPU rule for parameters and running statistics of another dtype than the
        input (:func:`bnlab.autograd.check_dtypes`), which torch.autocast's calls meet every
        time."""
        check_dtypes(x, tensors, self._graph_describe())

    def _check_momentum(self) -> float | None:
        """The momentum as a float (None stays None), or a TypeError/ValueError naming the layer
        for one that is not None or a finite real number (:func:`bnlab.functional.
        check_momentum`); checked at construction and before every running-statistics update,
        since ``momentum`` may be set at any time."""
        try:
            return check_momentum(self.momentum)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{self._describe()}: {exc}") from None

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        """``(weight, bias)`` as (C,) tensors. torch's layer reads a weight or bias of C values
        in any shape (a (C, 1) weight, say); the computations take (C,), so such a parameter
        goes in as its reshape, which autograd records: its gradient comes back in the
        parameter's own shape."""
        weight, bias = self.weight, self.bias
        if torch.jit.is_scripting():
            return _as_vector(weight), _as_vector(bias)
        return self._traced_vector("weight", weight), self._traced_vector("bias", bias)

    @torch.jit.unused
    def _traced_vector(self, name: str, t: Tensor | None) -> Tensor | None:
        """:func:`_as_vector` of the parameter ``name`` read as ``t``, which fx symbolic tracing
        gives as a proxy of unknown rank: the rank is then the registered tensor's."""
        if not isinstance(t, torch.fx.Proxy):
            return _as_vector(t)
        real = self._parameters.get(name)
        return t if real is None or real.dim() == 1 else t.reshape(-1)

    # ----------------------------------------------------------------------------- forward
    def _use_batch_stats(self) -> bool:
        """Training mode, or no population statistics to use (track_running_stats=False); a frozen
        layer (``bnlab.freeze``) uses its population statistics in both modes."""
        if self.frozen and self.running_mean is not None:
            return False
        return self.training or self.running_mean is None

    def _train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalize with statistics of this batch. Returns ``(y, mean, biased_var)`` with (C,)
        statistics. The one method variants override; ``y`` includes ``self.activation``."""
        weight, bias = self._affine()
        return batch_norm_train(x, weight, bias, self.eps, self.activation)

    def _commit_batch_stats(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        """The one place where a batch's statistics are accepted or refused. Non-finite
        statistics raise FloatingPointError before any buffer is touched; finite ones (training
        mode with tracking) update the running averages, see the module docstring. A momentum
        that is not None or a finite number is refused first, since it may be set at any time."""
        update = self.training and self.track_running_stats
        if torch.jit.is_scripting():
            commit_stats(
                x, mean, var, self.running_mean, self.running_var, self.num_batches_tracked,
                self.momentum, update, self._describe(),
            )  # fmt: skip
        else:
            momentum = self._check_momentum() if update else None  # (a float, or None)
            commit_stats(
                x, mean, var, self.running_mean, self.running_var, self.num_batches_tracked,
                momentum, update, self._graph_describe,  # (the name is made only when needed)
            )  # fmt: skip
            if update and self.population_estimator is not None:
                self.population_estimator = None  # a running average again, not a recomputed one

    @torch.jit.unused
    def _lean_state(self) -> tuple[Tensor | None, ...] | None:
        """``(weight, bias, running_mean, running_var, num_batches_tracked)`` for the short
        paths, read from the module's dictionaries of parameters and buffers, which is what
        attribute access returns for them (``nn.Module.__getattr__``, reached only after a
        search of the class hierarchy that costs several times more); None when one of them is
        not registered there (deleted, or assigned as a plain attribute) or a running statistic
        requires grad (refused under autograd, :meth:`_check_input`), for the general path."""
        p, b = self._parameters, self._buffers
        try:
            state = (p["weight"], p["bias"], b["running_mean"], b["running_var"],
                     b["num_batches_tracked"])  # fmt: skip
        except KeyError:
            return None
        for t in state[2:4]:
            if t is not None and t.requires_grad:
                return None
        return state

    @torch.jit.unused
    def _eval_fast(self, x: Tensor) -> Tensor | None:
        """The inference forward of a common eager call in few steps, or None: the general path
        of :meth:`forward` then takes the call, with every check and error. Same result as that
        path (:func:`bnlab.backend.eval_fast`; with an autograd graph to record, as when a
        frozen or eval-mode layer is fine-tuned through,
        :func:`bnlab.autograd.batch_norm_eval_lean`, gradients included). The call has
        population statistics to use, a plain tensor of a valid rank and channel count,
        ``eps >= 0`` and no tool looking inside it (:func:`bnlab.ops.route`); an inference
        layer runs between layers that leave the caches cold, where every step of the general
        path costs many times what it costs in a loop of calls."""
        if self.training and not self.frozen:
            return None
        if type(x) is not Tensor or route(x) != EAGER:
            return None
        shape = x.shape  # (one call into torch for the rank and the channels)
        if len(shape) not in self._valid_ranks:
            return None
        state = self._lean_state()
        if state is None:
            return None
        weight, bias, running_mean, running_var, _ = state
        act = self.activation
        if shape[1] != self.num_features or not self.eps >= 0 or act not in (None, "relu"):
            return None
        if running_mean is None or running_var is None:
            return None
        views = self._fast_views
        if views is None:
            views = self._fast_views = B.new_views()
        if _needs_graph(x, weight, bias):
            plan = B.lean_plan(x, weight, bias, running_mean, running_var, None, views)
            if plan is None:
                return None
            return batch_norm_eval_lean(
                x, running_mean, running_var, weight, bias, plan, self.eps, act is not None
            )
        return B.eval_fast(
            x, running_mean, running_var, weight, bias, self.eps, act is not None, views
        )

    @torch.jit.unused
    def _own_statistics(self) -> bool:
        """Whether this class computes and commits a batch's statistics as this one does (not a
        variant that overrides :meth:`_train_forward` or :meth:`_commit_batch_stats`)."""
        cls = type(self)
        return (
            cls._train_forward is _BatchNorm._train_forward
            and cls._commit_batch_stats is _BatchNorm._commit_batch_stats
        )

    @torch.jit.unused
    def _train_fast(self, x: Tensor) -> Tensor | None:
        """The training forward of a common eager call in few steps, or None: the general path
        of :meth:`forward` then takes the call, with every check and error. Same result and
        state as that path (:func:`bnlab.autograd.batch_norm_train_lean`): the output, the
        gradients, the running averages and ``num_batches_tracked``, and ``FloatingPointError``
        with nothing updated on non-finite statistics. The call is a training step of this
        class's own statistics and commit (not a variant's), with tracking, a plain tensor of a
        valid rank and channel count with more than one value per channel, ``eps > 0``, a
        momentum that is None or a finite float, no tool looking inside it
        (:func:`bnlab.ops.route`), and tensors the fused kernels take
        (:func:`bnlab.backend.lean_plan`)."""
        if not self.training or self.frozen or type(x) is not Tensor:
            return None
        if not self._own_statistics() or route(x) != EAGER:
            return None
        shape = x.shape  # (one call into torch for the rank, the channels and the count)
        if len(shape) not in self._valid_ranks:
            return None
        c, eps, momentum, act = self.num_features, self.eps, self.momentum, self.activation
        if shape[1] != c or not eps > 0 or act not in (None, "relu"):
            return None
        if not (momentum is None or (type(momentum) is float and math.isfinite(momentum))):
            return None
        m = math.prod(shape) // c
        state = self._lean_state()
        if m < 2 or not self.track_running_stats or state is None:
            return None
        weight, bias, running_mean, running_var, count = state
        if running_mean is None or running_var is None or count is None:
            return None
        views = self._fast_views
        if views is None:
            views = self._fast_views = B.new_views()
        plan = B.lean_plan(x, weight, bias, running_mean, running_var, count, views)
        if plan is None:
            return None
        y, ok = batch_norm_train_lean(x, weight, bias, plan, eps, momentum, act is not None)
        if not ok:
            raise FloatingPointError(non_finite_message(self._describe(), list(x.shape)))
        if self.population_estimator is not None:
            self.population_estimator = None  # a running average again, not a recomputed one
        return y

    @torch.jit.unused
    def _train_recorded(self, x: Tensor) -> Tensor | None:
        """The general path's training forward of this class's own statistics and commit when
        autograd records it (eager, a graph to record), or None: :meth:`_train_forward` and
        :meth:`_commit_batch_stats` in one autograd Function that commits before it saves its
        tensors (:class:`bnlab.autograd.BatchNormTrain`), as torch's layer does; the input has
        been checked."""
        weight, bias = self._affine()
        if not self._own_statistics() or route(x, weight, bias) != EAGER:
            return None
        if not _needs_graph(x, weight, bias):
            return None

        def commit(mean: Tensor, var: Tensor) -> None:
            self._commit_batch_stats(x, mean, var)

        relu = _relu_flag(self.activation)
        return BatchNormTrain.apply(x, weight, bias, self.eps, relu, commit)[0]

    @torch.jit.unused
    def _rows_forward(self, x: Tensor) -> Tensor:
        """The forward of a transposed ``(N, L, C)`` sequence on its ``(N * L, C)`` rows, the
        output made contiguous (:func:`bnlab.autograd.as_rows`); x has been checked."""
        rows, n, length = sequence_rows(x)
        try:
            y = self.forward(rows)
        except FloatingPointError:  # (named with the shape the caller gave)
            raise FloatingPointError(non_finite_message(self._describe(), list(x.shape))) from None
        return rows_to_sequence(y, n, length)

    def __getstate__(self) -> dict[str, Any]:
        """The module's state without the short paths' cache (numpy views and a plan,
        :meth:`_eval_fast`): pickles and deep copies carry only tensors, and a copy makes its
        own."""
        state = super().__getstate__()
        state.pop("_fast_views", None)
        return state

    @torch.jit.unused
    def _mkldnn_forward(self, x: Tensor) -> Tensor:
        """The forward of an MKL-DNN tensor, which torch's layers take (training and inference,
        gradients included) and which has no strides to compute on: through a dense copy, the
        output converted back, as torch's layer returns it."""
        return self.forward(x.to_dense()).to_mkldnn()

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if type(input) is Tensor and input.is_mkldnn:  # (a Proxy or subclass: not one)
                return self._mkldnn_forward(input)
            y = None
            if type(input) is not Tensor or not input.is_nested:  # (no shape: refused below)
                y = self._eval_fast(input)
                if y is None:
                    y = self._train_fast(input)
            if y is not None:
                return y
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        batch_stats = self._use_batch_stats()
        tracked = not batch_stats or self.track_running_stats
        self._check_input(
            input, batch_stats, weight, bias, running_mean if tracked else None,
            running_var if tracked else None,
        )  # fmt: skip
        if not torch.jit.is_scripting():
            if isinstance(input, Tensor) and route(input, weight, bias) == EAGER:
                if self._own_statistics() and as_rows(input):  # (a transposed sequence)
                    return self._rows_forward(input)
                input = standard_input(input)  # (every path's output takes its input's layout)
        if batch_stats or running_mean is None or running_var is None:
            if not torch.jit.is_scripting():
                y = self._train_recorded(input)
                if y is not None:
                    return y
            y, mean, var = self._train_forward(input)
            self._commit_batch_stats(input, mean, var)
            return y
        weight, bias = self._affine()
        return batch_norm_eval(
            input, running_mean, running_var, weight, bias, self.eps, self.activation
        )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch Normalization over ``(N, C)`` (per activation) or ``(N, C, L)`` (per channel)."""

    _valid_ranks = (2, 3)
    _rank_text = "2D (N, C) or 3D (N, C, L)"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch Normalization over ``(N, C, H, W)``, per feature map (section 3.2)."""

    _valid_ranks = (4,)
    _rank_text = "4D (N, C, H, W)"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch Normalization over ``(N, C, D, H, W)``, per feature map."""

    _valid_ranks = (5,)
    _rank_text = "5D (N, C, D, H, W)"


class _LazyBatchNorm(nn.modules.batchnorm._LazyNormBase, _BatchNorm):
    """A bnlab layer whose ``num_features`` comes from its first input, as torch's
    ``LazyBatchNorm*d``: the weight, bias and running statistics are uninitialized until the
    first forward (or a ``load_state_dict`` of an initialized layer's state), which sizes them
    from ``input.shape[1]`` and turns the layer into the bnlab layer of ``cls_to_become``. The
    other arguments are those of the non-lazy layer (``activation`` included).

    Stricter than torch only where torch's layer would keep a wrong state: an input that is not
    a floating-point tensor of the layer's rank is refused, naming the layer, before anything is
    sized (torch's layer takes its size first and stays so), and a layer given its state by
    ``load_state_dict`` takes its ``num_features`` from that state (torch's keeps 0)."""

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        if activation not in (None, "relu"):  # (torch's lazy base hands the rest to _BatchNorm)
            raise ValueError(
                f"{type(self).__name__}: activation must be None or 'relu', got {activation!r}"
            )
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation = activation

    @torch.jit.unused
    def _describe(self) -> str:
        if self.num_features:
            return super()._describe()
        name = self.layer_name
        return ("" if name is None else f"'{name}' ") + type(self).__name__ + " (not sized yet)"

    @torch.jit.unused
    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        """Size the layer from ``input`` (checked first: nothing is sized from an input the
        forward would refuse), as torch's lazy layers do; also gives ``num_features`` to a layer
        whose tensors were sized already (by a state loaded, or with none to size)."""
        self._check_kind(input)
        if self.has_uninitialized_params():
            super().initialize_parameters(input)  # (sizes, then resets them as torch's)
        if self.num_features == 0:
            self.num_features = self._loaded_features() or int(input.shape[1])

    @torch.jit.unused
    def _loaded_features(self) -> int:
        """The channel count of the tensors this layer holds (0 when none is sized)."""
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None and not nn.parameter.is_lazy(t):
                return t.numel()
        return 0

    @torch.jit.unused
    def _lazy_load_hook(self, state_dict, prefix, *args: Any) -> None:
        """torch's hook (tensors sized as the state's), then ``num_features`` read from them, so
        the layer checks its input against the count of the state it holds."""
        super()._lazy_load_hook(state_dict, prefix, *args)
        if self.num_features == 0:
            self.num_features = self._loaded_features()


class LazyBatchNorm1d(_LazyBatchNorm, nn.LazyBatchNorm1d):
    """:class:`BatchNorm1d` with ``num_features`` taken from the first input (torch's
    ``LazyBatchNorm1d``)."""

    cls_to_become = BatchNorm1d  # type: ignore[assignment]
    _valid_ranks = BatchNorm1d._valid_ranks
    _rank_text = BatchNorm1d._rank_text


class LazyBatchNorm2d(_LazyBatchNorm, nn.LazyBatchNorm2d):
    """:class:`BatchNorm2d` with ``num_features`` taken from the first input (torch's
    ``LazyBatchNorm2d``)."""

    cls_to_become = BatchNorm2d  # type: ignore[assignment]
    _valid_ranks = BatchNorm2d._valid_ranks
    _rank_text = BatchNorm2d._rank_text


class LazyBatchNorm3d(_LazyBatchNorm, nn.LazyBatchNorm3d):
    """:class:`BatchNorm3d` with ``num_features`` taken from the first input (torch's
    ``LazyBatchNorm3d``)."""

    cls_to_become = BatchNorm3d  # type: ignore[assignment]
    _valid_ranks = BatchNorm3d._valid_ranks
    _rank_text = BatchNorm3d._rank_text


def name_layers(model: nn.Module) -> nn.Module:
    """Record each bnlab layer's qualified name in ``model`` so errors name it; returns model."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            module.layer_name = name or type(module).__name__
    return model
