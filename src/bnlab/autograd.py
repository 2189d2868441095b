"""The functional entry points of bnlab's batch norm, and their eager ``autograd.Function`` s.

Three calls, one per step of the paper:

* :func:`batch_norm_train` - Algorithm 1 with mini-batch statistics; returns ``y`` and, as
  non-differentiable outputs, the per-channel ``mean`` and biased ``var`` so the caller can update
  running statistics (Algorithm 2) without computing them twice.
* :func:`batch_norm_eval` - the inference transform with given population statistics.
* :func:`commit_stats` - accept a batch's statistics (refuse non-finite ones) and fold them into
  the running averages.

and :func:`batch_norm`, ``torch.nn.functional.batch_norm``'s signature and answers on them.

Each call takes the form :func:`bnlab.ops.route` picks: in eager mode the Functions below
(:class:`BatchNormTrain`, :class:`BatchNormEval`), which run on the path :mod:`bnlab.backend`
chooses (fused CPU kernels or the reference functions) and run their backward on the same path;
bnlab's custom operators under ``torch.compile`` and fx tracing; the decomposition into standard
ops under ``torch.export``, ``jit.trace``/``jit.script`` and ``torch.func`` (see :mod:`bnlab.ops`).
The layers' short paths for common eager calls use :func:`batch_norm_train_lean` and
:func:`batch_norm_eval_lean` (:class:`BatchNormTrainLean`, :class:`BatchNormEvalLean`): the same
kernels through a plan of cached views (:func:`bnlab.backend.lean_plan`), the same values.

The backward is the hand-written one of section 3; when it must itself be differentiated
(``create_graph=True``: double backward, gradient penalties) it is computed instead by autograd
through the decomposition, so second derivatives are exact as well. ``activation="relu"`` fuses
``max(., 0)`` into the output; the backward then gates ``dy`` with the mask ``y > 0``: read from
the saved output by :class:`BatchNormTrain` and :class:`BatchNormEval`, recomputed from x by the
lean Functions, which keep no output (:func:`bnlab.kernels.lean_backward`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from . import backend as B
from . import kernels as K
from . import ops
from .errors import InputDtypeError, InputLayoutError, MixedDtypeError, NotATensorError
from .functional import (
    check_momentum,
    is_real_number,
    shared_buffer,
    shared_buffer_message,
    standard_layout,
    standard_strides,
)

__all__ = [
    "BatchNormTrain",
    "BatchNormEval",
    "BatchNormTrainLean",
    "BatchNormEvalLean",
    "batch_norm",
    "patch_functional",
    "batch_norm_train",
    "batch_norm_eval",
    "commit_stats",
    "standard_input",
]


def _relu_flag(activation: str | None) -> bool:
    if activation is None:
        return False
    if activation != "relu":
        raise ValueError(f"activation must be None or 'relu', got {activation}")
    return True


def _needs_graph(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """True when autograd would record the call (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def _per_channel(x: Tensor, t: Tensor | None, arg: str, fn: str) -> Tensor | None:
    """A weight or bias ``t`` as the (C,) tensor of x's C channels: C values in any shape, as
    torch's ``batch_norm`` reads them (reshaped; autograd records it, so their gradients come
    back in their own shapes), or a RuntimeError naming ``fn`` and ``arg`` for another count
    (the error torch raises)."""
    if t is None:
        return t
    _check_count(x, t, arg, fn, True)
    if t.dim() != 1:
        return t.reshape(-1)
    return t


def _check_count(x: Tensor, t: Tensor, arg: str, fn: str, any_shape: bool) -> None:
    """A RuntimeError (the error torch raises) naming ``fn`` and its argument ``arg`` unless
    ``t`` holds C values for x's C channels, 1-D unless ``any_shape`` (running statistics must
    be, as torch requires)."""
    if x.dim() < 2:
        return
    c = x.shape[1]
    if t.numel() != c or (t.dim() != 1 and not any_shape):
        raise RuntimeError(
            fn + ": " + arg + " should hold " + str(c) + " values for the " + str(c)
            + " channels of input of shape " + ops.shape_text(list(x.shape))
            + (" (in any shape)" if any_shape else ", 1-D") + ", got shape "
            + ops.shape_text(list(t.shape))
        )  # fmt: skip


_HALF = (torch.float16, torch.bfloat16)


def check_dtypes(x: Tensor, tensors: tuple[Tensor | None, ...], who: str) -> None:
    """torch's CPU rule for parameters and running statistics of another dtype than the input
    ``x``: allowed only as float32 for a float16/bfloat16 input (all of them); otherwise a
    :class:`~bnlab.errors.MixedDtypeError` naming ``who``."""
    dt = x.dtype
    for t in tensors:
        if t is not None and t.dtype != dt:
            break
    else:  # (the common call: every one of them in x's dtype, or none given)
        return
    dtypes = {t.dtype for t in tensors if t is not None}
    if x.dtype in _HALF and dtypes == {torch.float32}:
        return
    raise MixedDtypeError(
        f"{who}: input of dtype {x.dtype} with parameters/running statistics of "
        f"dtype {', '.join(sorted(str(d) for d in dtypes))}; they must all have the input's "
        "dtype (or be float32 for a float16/bfloat16 input): convert the input or the layer "
        "(e.g. layer.to(x.dtype))"
    )


def _param_grads(
    dgamma: Tensor | None, dbeta: Tensor | None, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The backward's parameter gradients as a Function returns them: None for an absent
    parameter, dbeta in the bias's dtype (the sums come in the weight's, and in the
    accumulation dtype when a bias has no weight beside it)."""
    if weight is None:
        dgamma = None
    if bias is None or dbeta is None:
        return dgamma, None
    return dgamma, dbeta if dbeta.dtype == bias.dtype else dbeta.to(bias.dtype)


class _ChannelsOuter(torch.autograd.Function):
    """``x.contiguous()`` of a 3-D ``x`` with its channels innermost
    (:func:`bnlab.kernels.channels_inner_3d`: a transposed ``(N, L, C)`` sequence), the layout
    torch gives batch norm's output for it. The backward hands a contiguous gradient back in
    x's layout, written by the kernels up to :data:`bnlab.kernels.SWAP_MAX_C` channels, where
    torch's strided copy in that direction is the slower (above it, autograd makes torch's
    copy); the same values either way."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        # (create_graph=True, or traced by compiled autograd: the identity, as it is)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            out = K.to_channels_inner(g)
            if out is not None:
                return out
        return g


def as_rows(x: Tensor) -> bool:
    """Whether an eager call on ``x`` that autograd records runs on the ``(N * L, C)`` rows of
    a transposed ``(N, L, C)`` sequence (x of shape ``(N, C, L)``, channels innermost), its
    output then made contiguous by :func:`rows_to_sequence`. The same statistics as on x (per
    channel, over N and L); the layout's conversion moves from the input to the output, so
    that a gradient coming back in the sequence's own layout
    (``bn(x.transpose(1, 2)).transpose(1, 2)``, as sequence models call it) reaches the loops
    and x without a copy, and any other is converted by whichever copy is the faster for its
    channel count (:class:`_ChannelsOuter`)."""
    return (
        x.dim() == 3
        and x.requires_grad
        and torch.is_grad_enabled()
        and B.kernels_enabled()
        and K.channels_inner_3d(x)
    )


def sequence_rows(x: Tensor) -> tuple[Tensor, int, int]:
    """``(rows, N, L)``: the ``(N * L, C)`` view of a sequence x for which :func:`as_rows`
    holds."""
    n, c, length = x.shape
    return x.transpose(1, 2).reshape(n * length, c), n, length


def rows_to_sequence(y: Tensor, n: int, length: int) -> Tensor:
    """The output ``y`` of a call on the ``(N * L, C)`` rows (:func:`as_rows`) as the
    contiguous ``(N, C, L)`` tensor torch's batch norm returns for the sequence."""
    return _ChannelsOuter.apply(y.view(n, length, y.shape[1]).transpose(1, 2))


def standard_input(x: Tensor) -> Tensor:
    """:func:`bnlab.functional.standard_layout` of an eager call's input: x in the layout torch
    gives batch norm's output for it, a copy where it is in another one. A channels-innermost
    3-D input whose gradient is wanted goes through :class:`_ChannelsOuter`."""
    if x.is_contiguous():
        return x
    if (
        x.requires_grad
        and torch.is_grad_enabled()
        and B.kernels_enabled()
        and K.channels_inner_3d(x)
    ):
        return _ChannelsOuter.apply(x)
    return standard_layout(x)


def _captured(x: Tensor) -> bool:
    """Whether bnlab's operators are being put into a graph (fx symbolic tracing, or
    ``torch.compile``, which lays out its buffers itself) rather than called eagerly (under a
    dispatch mode, or on fake tensors)."""
    return isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling()


def _op_input(x: Tensor) -> Tensor:
    """x for an eager call of bnlab's operators, which give their outputs x's strides: in the
    layout torch gives its output (:func:`standard_input`); as it is in a graph."""
    return x if _captured(x) else standard_input(x)


def _op_output(x: Tensor, y: Tensor) -> Tensor:
    """An eager operator call's output with the strides torch's has (a size-1 dimension's
    stride: :func:`bnlab.functional.standard_strides`); as it is in a graph."""
    return y if _captured(x) else standard_strides(y)


class BatchNormTrain(torch.autograd.Function):
    """y, mean, var = BN_train(x, gamma, beta) [then ReLU]; gradients flow to x, gamma, beta.

    ``commit`` (optional, a callable of ``(mean, var)``) runs once the statistics exist and
    before the tensors for the backward are saved: a layer accepts its batch there, as torch's
    operator updates its running statistics before it saves, which decides what a
    recomputation that stops at the last saved tensor (non-reentrant activation checkpointing)
    has done."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                relu: bool, commit=None):  # fmt: skip
        path, y, mean, var, invstd, mask = B.train_forward(x, weight, bias, eps, relu=relu,
                                                           keep_mask=True)  # fmt: skip
        if commit is not None:
            commit(mean, var)
        # (the ReLU's mask: the forward's coefficients, recomputing it from x on the fused path)
        ctx.save_for_backward(x, weight, bias, mean, invstd, mask)
        ctx.path, ctx.eps, ctx.relu = path, eps, relu
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):
        x, weight, bias, mean, invstd, mask = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if ops.standard_backward(dy):
            dx, dgamma, dbeta = ops.standard_grads(
                dy, x, weight, bias, ctx.eps, ctx.relu, None, None, needs
            )
            return dx, dgamma, dbeta, None, None, None
        dx, dgamma, dbeta = B.train_backward(
            ctx.path, dy, x, mean, invstd, weight, need_dx=needs[0],
            need_dparams=needs[1] or needs[2], mask=mask,
        )  # fmt: skip
        return dx, *_param_grads(dgamma, dbeta, weight, bias), None, None, None


class BatchNormTrainLean(torch.autograd.Function):
    """y = BN_train(x, gamma, beta) [then ReLU] of a planned fused call (:func:`bnlab.kernels.
    lean_plan`): :class:`BatchNormTrain`'s math and kernels with fewer steps per call, and the
    batch's statistics committed to the plan's running averages before the save, in the same
    call of the loops (:func:`bnlab.kernels.lean_train_forward`). Returns ``(y, ok)`` (``ok``
    False: non-finite statistics, nothing updated); the forward's numpy array of statistics
    stays with the node for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, plan, eps: float,
                relu: bool, momentum: float | None):  # fmt: skip
        # (the commit comes before the save, see BatchNormTrain)
        y, stats, ok = K.lean_train_forward(x, plan, eps, relu, momentum)
        ctx.save_for_backward(x, weight, bias)  # (the ReLU's mask is recomputed from x)
        ctx.plan, ctx.stats, ctx.eps, ctx.relu = plan, stats, eps, relu
        return y, ok

    @staticmethod
    def backward(ctx, dy: Tensor, _ok: None):
        x, weight, bias = ctx.saved_tensors
        n = ctx.needs_input_grad
        if ops.standard_backward(dy):
            dx, dgamma, dbeta = ops.standard_grads(
                dy, x, weight, bias, ctx.eps, ctx.relu, None, None, (n[0], n[1], n[2])
            )
            return dx, dgamma, dbeta, None, None, None, None
        dx, dgamma, dbeta = K.lean_backward(
            dy, x, weight, None, ctx.relu, ctx.plan, ctx.stats, True, n[0], n[1] or n[2]
        )
        return dx, *_param_grads(dgamma, dbeta, weight, bias), None, None, None, None


class BatchNormEvalLean(torch.autograd.Function):
    """y = BN_inference(x; E[x], Var[x], gamma, beta) [then ReLU] of a planned fused inference
    call (:func:`bnlab.kernels.lean_plan`): :class:`BatchNormEval`'s math and kernels with
    fewer steps per call; the forward's array of statistics stays with the node for the
    backward."""

    @staticmethod
    def forward(ctx, x: Tensor, running_mean: Tensor, running_var: Tensor,
                weight: Tensor | None, bias: Tensor | None, plan, eps: float,
                relu: bool):  # fmt: skip
        y, stats = K.lean_eval_forward(x, plan, eps, relu)
        ctx.save_for_backward(x, running_mean, running_var, weight, bias)  # (as above)
        ctx.plan, ctx.stats, ctx.eps, ctx.relu = plan, stats, eps, relu
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, running_mean, running_var, weight, bias = ctx.saved_tensors
        n = ctx.needs_input_grad
        if ops.standard_backward(dy):
            dx, dgamma, dbeta = ops.standard_grads(
                dy, x, weight, bias, ctx.eps, ctx.relu, running_mean, running_var,
                (n[0], n[3], n[4]),
            )  # fmt: skip
            return dx, None, None, dgamma, dbeta, None, None, None
        dx, dgamma, dbeta = K.lean_backward(
            dy, x, weight, running_mean, ctx.relu, ctx.plan, ctx.stats, False, n[0], n[3] or n[4]
        )
        return dx, None, None, *_param_grads(dgamma, dbeta, weight, bias), None, None, None


class BatchNormEval(torch.autograd.Function):
    """y = BN_inference(x; E[x], Var[x], gamma, beta) [then ReLU]; statistics are constants."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        relu: bool,
    ):
        path, y, invstd, mask = B.eval_forward(x, running_mean, running_var, weight, bias, eps,
                                               relu=relu, keep_mask=True)  # fmt: skip
        ctx.save_for_backward(x, running_mean, running_var, invstd, weight, bias, mask)
        ctx.path, ctx.eps, ctx.relu = path, eps, relu
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, running_mean, running_var, invstd, weight, bias, mask = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[3], n[4])
        if ops.standard_backward(dy):
            dx, dgamma, dbeta = ops.standard_grads(
                dy, x, weight, bias, ctx.eps, ctx.relu, running_mean, running_var, needs
            )
            return dx, None, None, dgamma, dbeta, None, None
        dx, dgamma, dbeta = B.eval_backward(
            ctx.path, dy, x, running_mean, invstd, weight, need_dx=needs[0],
            need_dparams=needs[1] or needs[2], mask=mask,
        )  # fmt: skip
        return dx, None, None, *_param_grads(dgamma, dbeta, weight, bias), None, None


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable Algorithm 1: returns ``(y, mean, biased_var)``; ``activation="relu"`` returns
    ``max(y, 0)`` (fused on the kernel path)."""
    relu = _relu_flag(activation)
    if torch.jit.is_scripting():
        weight = _per_channel(x, weight, "weight", "batch_norm_train")
        bias = _per_channel(x, bias, "bias", "batch_norm_train")
        y, mean, var, _ = ops.decompose_train(x, weight, bias, eps, relu)
        return y, mean, var
    else:
        how = ops.route(x, weight, bias)
        if not isinstance(x, torch.fx.Proxy):  # (fx symbolic tracing: no shapes to read)
            weight = _per_channel(x, weight, "weight", "batch_norm_train")
            bias = _per_channel(x, bias, "bias", "batch_norm_train")
        if how == ops.EAGER:
            if as_rows(x):  # (a transposed sequence: its rows, the output made contiguous)
                rows, n, length = sequence_rows(x)
                y, mean, var = batch_norm_train(rows, weight, bias, eps, activation)
                return rows_to_sequence(y, n, length), mean, var
            x = standard_input(x)  # (so y has the strides torch's output has)
            if not _needs_graph(x, weight, bias):  # no autograd bookkeeping when nothing needs it
                return B.train_forward(x, weight, bias, eps, relu=relu)[1:4]
            return BatchNormTrain.apply(x, weight, bias, eps, relu)
        if how == ops.OP:
            x = _op_input(x)
            y, stats = torch.ops.bnlab.batch_norm_train(x, weight, bias, eps, relu)
            return _op_output(x, y), stats[0], stats[1]
        if how == ops.SUBCLASS:  # (eager: the layouts torch's layer gives)
            x = standard_input(x)
            y, mean, var, _ = ops.graph_train(x, weight, bias, eps, relu)
            return standard_strides(y), mean, var
        y, mean, var, _ = ops.graph_train(x, weight, bias, eps, relu)
        return y, mean, var


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` on bnlab's kernels: the same arguments and answers.
    With ``training`` the batch's statistics normalize ``input`` (Algorithm 1) and, when running
    statistics are given, are folded into them in place (``(1 - momentum) * running + momentum
    * batch``, the variance unbiased as in Algorithm 2); otherwise the running statistics
    normalize it. Gradients flow to ``input``, ``weight`` and ``bias``.

    What torch refuses is refused, naming ``batch_norm`` and the argument, with the class torch
    raises (``momentum`` None, running statistics missing in evaluation or only one of them
    given, one value per channel or ``eps <= 0`` in training, counts or dtypes that do not
    match, running statistics that require grad while autograd records). Stricter where torch
    would poison the running statistics: a non-finite momentum is refused before anything is
    read, and a training batch with non-finite statistics raises ``FloatingPointError`` and
    leaves them as they were (without running statistics its output is NaN, as torch's)."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       True)  # fmt: skip


def _batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    momentum_checked: bool,
) -> Tensor:
    """:func:`batch_norm`, the momentum's check skipped unless ``momentum_checked``: for one
    torch's layer computed (``1 / num_batches_tracked`` for ``momentum=None``, a number a
    captured graph knows only when it runs, so its finiteness cannot be asked while tracing)."""
    if not torch.jit.is_scripting():
        if not isinstance(x, torch.fx.Proxy):
            _check_call(x, running_mean, running_var, weight, bias, training,
                        momentum if momentum_checked else 0.0, eps)  # fmt: skip
            if x.is_mkldnn:  # (torch's function takes these; so do the layers: a dense copy)
                return _batch_norm(x.to_dense(), running_mean, running_var, weight, bias,
                                   training, momentum, eps, momentum_checked).to_mkldnn()
            if ops.route(x, running_mean, running_var, weight, bias) == ops.EAGER:
                return _eager_call(x, running_mean, running_var, weight, bias, training,
                                   float(momentum), float(eps))  # fmt: skip
    if not training:
        assert running_mean is not None and running_var is not None  # (checked; TorchScript)
        return batch_norm_eval(x, running_mean, running_var, weight, bias, eps)
    y, mean, var = batch_norm_train(x, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        if not torch.jit.is_scripting():
            if not isinstance(momentum, torch.SymFloat):  # (a traced number stays symbolic)
                momentum = float(momentum)
        commit_stats(x, mean, var, running_mean, running_var, None, momentum, True,
                     "batch_norm")  # fmt: skip
    return y


_PATCH_LOCK = threading.Lock()
_patch_depth = 0  # open patch_functional blocks (the function is put back when the last ends)
_torch_batch_norm = None  # torch.nn.functional.batch_norm as it was before the first block


def _patched_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` inside :func:`patch_functional`: :func:`batch_norm`,
    except for tensors that override torch functions (``__torch_function__`` subclasses), which
    keep torch's function and so their own handling of it."""
    original = _torch_batch_norm
    relevant = (input, running_mean, running_var, weight, bias)
    if original is not None and torch.overrides.has_torch_function_variadic(*relevant):
        return torch.overrides.handle_torch_function(
            original, relevant, input, running_mean, running_var, weight=weight, bias=bias,
            training=training, momentum=momentum, eps=eps,
        )  # fmt: skip
    # (torch's layers compute the momentum they pass: 1 / num_batches_tracked for momentum
    # None, finite, and a number a captured graph knows only when it runs)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       not torch.compiler.is_compiling())  # fmt: skip


@contextlib.contextmanager
def patch_functional() -> Iterator[None]:
    """A block in which ``torch.nn.functional.batch_norm`` is :func:`batch_norm`: every call of
    it - torch's BatchNorm layers' forwards, subclasses of them that call it (a layer fusing
    an activation, say), code of your own - runs bnlab's kernels, with torch's answers, in
    models that :func:`bnlab.convert` leaves alone. torch's function is put back when the
    block ends, however it ends (blocks may nest, and overlap across threads: it is put back
    when the last one ends). The replacement is process-wide, as the function is.

    torch's layers count a training batch in ``num_batches_tracked`` before they call the
    function, so a batch with non-finite statistics, which :func:`batch_norm` refuses before
    the running averages move, is still counted by them."""
    global _patch_depth, _torch_batch_norm
    import torch.nn.functional as TF

    with _PATCH_LOCK:
        if _patch_depth == 0:
            _torch_batch_norm = TF.batch_norm
            TF.batch_norm = _patched_batch_norm
        _patch_depth += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _patch_depth -= 1
            if _patch_depth == 0:
                TF.batch_norm = _torch_batch_norm
                _torch_batch_norm = None


# The lean training loops count each batch in a counter (a layer's num_batches_tracked);
# the function has none, and its momentum is a number, so they count in this one, never read.
_UNREAD_COUNT = torch.zeros((), dtype=torch.int64)

# The function's caches of lean plans (what a layer keeps in its _fast_views), one per set of
# statistics and parameters, found by the tensors' identities and checked by their key
# (bnlab.kernels._lean_plan: a stale entry is a miss, never a wrong view). Bounded, so that
# the running statistics the training plans hold stay few; the oldest entry goes first.
_FUNCTION_VIEWS: dict[tuple[int, ...], list] = {}
_FUNCTION_VIEWS_MAX = 256  # (a model of up to 256 BN layers calling the function hits)


def _function_views(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None
) -> list:
    """The view cache (:func:`bnlab.kernels.new_views`, as a layer keeps) of one set of the
    function's tensors."""
    key = (id(running_mean), id(running_var), id(weight), id(bias))
    views = _FUNCTION_VIEWS.get(key)
    if views is None:
        while len(_FUNCTION_VIEWS) >= _FUNCTION_VIEWS_MAX:  # (threads may have added more)
            try:
                del _FUNCTION_VIEWS[next(iter(_FUNCTION_VIEWS))]
            except (KeyError, StopIteration, RuntimeError):  # (another thread got there)
                break
        views = _FUNCTION_VIEWS[key] = K.new_views()
    return views


@torch.jit.unused
def _eager_call(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """:func:`batch_norm`'s eager call, checked: the Functions (when autograd records the call)
    or the chosen path directly. A training call recorded by autograd updates the running
    statistics inside the Function, before it saves its tensors, as torch's operator does (what
    a recomputation that stops at the last saved tensor has done depends on it)."""
    if weight is not None and weight.dim() != 1:  # (C values in any shape, as torch reads them)
        weight = weight.reshape(-1)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    if as_rows(x):  # (a transposed sequence: its rows, the output made contiguous)
        rows, n, length = sequence_rows(x)
        try:
            y = _eager_call(rows, running_mean, running_var, weight, bias, training, momentum, eps)
        except FloatingPointError:  # (named with the shape the caller gave)
            raise FloatingPointError(ops.non_finite_message("batch_norm", list(x.shape))) from None
        return rows_to_sequence(y, n, length)
    x = standard_input(x)  # (so y has the strides torch's output has)
    graph = _needs_graph(x, weight, bias)
    if not training:
        assert running_mean is not None and running_var is not None  # (checked)
        views = _function_views(running_mean, running_var, weight, bias)
        if graph:
            plan = B.lean_plan(x, weight, bias, running_mean, running_var, None, views)
            if plan is not None:
                return batch_norm_eval_lean(
                    x, running_mean, running_var, weight, bias, plan, eps, False
                )
            return BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps, False)
        y = B.eval_fast(x, running_mean, running_var, weight, bias, eps, False, views)
        if y is not None:
            return y
        return B.eval_forward(x, running_mean, running_var, weight, bias, eps)[1]
    commit = None
    if running_mean is not None and running_var is not None:
        rm, rv = running_mean, running_var
        if x.numel() > x.shape[1]:  # (the lean loops: 2 or more values per channel)
            views = _function_views(rm, rv, weight, bias)
            plan = B.lean_plan(x, weight, bias, rm, rv, _UNREAD_COUNT, views)
            if plan is not None:
                y, ok = batch_norm_train_lean(x, weight, bias, plan, eps, momentum, False)
                if not ok:
                    raise FloatingPointError(ops.non_finite_message("batch_norm", list(x.shape)))
                return y

        def commit(mean: Tensor, var: Tensor) -> None:
            commit_stats(x, mean, var, rm, rv, None, momentum, True, "batch_norm")

    if graph:
        return BatchNormTrain.apply(x, weight, bias, eps, False, commit)[0]
    _, y, mean, var, _ = B.train_forward(x, weight, bias, eps)
    if commit is not None:
        commit(mean, var)
    return y


#: The dtypes batch norm is implemented for (torch's CPU kernels: no float8, no integers).
BN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def input_kind_error(x: Tensor, who) -> Exception | None:
    """The refusal, naming ``who`` (a name, or a callable that makes it: a layer's name is made
    only to raise, so that it stays out of compiled graphs), of an input whose dtype or layout
    batch norm is not implemented for (torch raises NotImplementedError, or a RuntimeError for
    sparse compressed layouts), or None. MKL-DNN tensors pass: the layers and the function
    take them through a dense copy, as torch's do."""
    bad_dtype = x.dtype not in BN_DTYPES
    bad_layout = x.is_nested or (x.layout != torch.strided and not x.is_mkldnn)
    if not (bad_dtype or bad_layout):
        return None
    who = who if isinstance(who, str) else who()
    if bad_dtype:
        return InputDtypeError(f"{who}: expected a floating-point input (float16, bfloat16, "
                               f"float32 or float64), got dtype {x.dtype}")  # fmt: skip
    kind = "nested" if x.is_nested else str(x.layout).removeprefix("torch.")
    return InputLayoutError(f"{who}: a {kind} input is not supported; batch norm takes "
                            "dense (strided) tensors")  # fmt: skip


@torch.jit.unused
def _check_call(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: object,
    eps: object,
) -> None:
    """:func:`batch_norm`'s refusals, before anything is computed or updated."""
    fn = "batch_norm"
    if not isinstance(x, Tensor):
        raise NotATensorError(f"{fn}: input must be a Tensor, got {type(x).__name__}")
    error = input_kind_error(x, fn)
    if error is not None:
        raise error
    if x.dim() < 2:
        raise RuntimeError(
            f"{fn}: expected an input (N, C, ...) of 2 or more dimensions, got shape "
            f"{ops.shape_text(list(x.shape))}"
        )
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: training must be a bool, got {type(training).__name__}")
    if not is_real_number(momentum) or not is_real_number(eps):
        name, value = ("momentum", momentum) if not is_real_number(momentum) else ("eps", eps)
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    if training and running_mean is not None and running_var is not None:
        try:
            check_momentum(momentum)  # (finite: the running statistics take it)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{fn}: {exc}") from None
    if training and (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{fn}: running_mean and running_var must both be None or neither be None"
        )
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None and not training:
            raise RuntimeError(f"{fn}: {name} must be given in evaluation mode (training=False)")
        if t is not None:
            _check_count(x, t, name, fn, False)
            if t.requires_grad and torch.is_grad_enabled():  # (torch's refusal, under autograd)
                raise RuntimeError(f"{fn}: {name} cannot require grad (it is not differentiated)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_count(x, t, name, fn, True)
    check_dtypes(x, (weight, bias, running_mean, running_var), fn)
    ops.check_batch(x, float(eps), training, fn)


def _direct_apply(cls):
    """``cls.apply`` without the Python prologue of ``torch.autograd.Function.apply``: the C
    entry that prologue ends in (``torch._C._FunctionBase.apply``), bound to ``cls``; or
    ``cls.apply`` itself where torch has no such entry. For the lean Functions on eager calls,
    where :func:`bnlab.ops.route` has found no functorch transform active: the prologue then
    only binds default arguments (for Functions that define ``setup_context``, which these do
    not) and unwraps dead functorch wrappers, which the callers do themselves
    (:func:`_alive`). A layer runs between other layers, which leave the caches cold, and
    there each Python frame of the prologue costs many times what it costs in a loop of calls
    (measurements in docs/kernels.md)."""
    entry = getattr(torch._C, "_FunctionBase", None)
    entry = None if entry is None else entry.__dict__.get("apply")
    return cls.apply if entry is None else entry.__get__(None, cls)


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _alive(t: Tensor | None) -> Tensor | None:
    """``t`` unwrapped if it is a functorch wrapper whose transform has exited (a tensor kept
    from inside ``torch.func.grad`` or ``vmap``), as ``Function.apply`` unwraps its inputs."""
    return None if t is None else _unwrap_if_dead(t)


def batch_norm_train_lean(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    plan,
    eps: float,
    momentum: float | None,
    relu: bool,
) -> tuple[Tensor, bool]:
    """An eager training call (:func:`bnlab.ops.route` EAGER) planned by
    :func:`bnlab.backend.lean_plan` (more than one value per channel): Algorithm 1 [+ ReLU]
    (recorded for autograd when it needs to be), then the batch's statistics committed to the
    plan's running averages (:func:`bnlab.kernels.lean_train_forward`: ``momentum`` None or a
    finite float). Returns ``(y, ok)``; ``ok`` False means non-finite statistics, nothing
    updated, for the caller to refuse."""
    if _needs_graph(x, weight, bias):
        x = _unwrap_if_dead(x)
        return _TRAIN_LEAN(x, _alive(weight), _alive(bias), plan, eps, relu, momentum)
    y, _, ok = K.lean_train_forward(x, plan, eps, relu, momentum)
    return y, ok


def batch_norm_eval_lean(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    plan,
    eps: float,
    relu: bool,
) -> Tensor:
    """An eager inference call (:func:`bnlab.ops.route` EAGER) with an autograd graph to
    record, planned by :func:`bnlab.backend.lean_plan` (without a counter):
    :class:`BatchNormEvalLean`."""
    x = _unwrap_if_dead(x)
    return _EVAL_LEAN(x, running_mean, running_var, _alive(weight), _alive(bias), plan, eps, relu)


_TRAIN_LEAN = _direct_apply(BatchNormTrainLean)
_EVAL_LEAN = _direct_apply(BatchNormEvalLean)


def batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None = None,
) -> Tensor:
    """Differentiable inference transform with population statistics [then ReLU]."""
    relu = _relu_flag(activation)
    fn = "batch_norm_eval"
    if torch.jit.is_scripting():
        _check_count(x, running_mean, "running_mean", fn, False)
        _check_count(x, running_var, "running_var", fn, False)
        weight = _per_channel(x, weight, "weight", fn)
        bias = _per_channel(x, bias, "bias", fn)
        return ops.decompose_eval(x, running_mean, running_var, weight, bias, eps, relu)
    else:
        how = ops.route(x, running_mean, running_var, weight, bias)
        if not isinstance(x, torch.fx.Proxy):  # (fx symbolic tracing: no shapes to read)
            _check_count(x, running_mean, "running_mean", fn, False)
            _check_count(x, running_var, "running_var", fn, False)
            weight = _per_channel(x, weight, "weight", fn)
            bias = _per_channel(x, bias, "bias", fn)
        if how == ops.EAGER:
            if as_rows(x):  # (a transposed sequence: its rows, the output made contiguous)
                rows, n, length = sequence_rows(x)
                y = batch_norm_eval(rows, running_mean, running_var, weight, bias, eps, activation)
                return rows_to_sequence(y, n, length)
            x = standard_input(x)  # (so y has the strides torch's output has)
            if not _needs_graph(x, weight, bias):
                return B.eval_forward(x, running_mean, running_var, weight, bias, eps, relu=relu)[1]
            return BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps, relu)
        if how == ops.OP:
            x = _op_input(x)
            y = torch.ops.bnlab.batch_norm_eval(x, running_mean, running_var, weight, bias, eps,
                                                relu)  # fmt: skip
            return _op_output(x, y)
        return ops.decompose_eval(x, running_mean, running_var, weight, bias, eps, relu)


def commit_stats(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    update: bool,
    layer: str,
) -> None:
    """Accept the statistics ``mean``/``var`` of the batch ``x``: ``FloatingPointError`` naming
    ``layer`` (a name; outside TorchScript also a callable that makes it), touching nothing, if
    they are not finite; otherwise, when ``update``, fold them
    into the running averages (:func:`bnlab.functional.commit_running_stats`: ``momentum`` None
    for the cumulative average, any finite number as torch's factor). An empty batch is only
    counted in ``num_batches_tracked``. A running statistic whose elements share memory
    (:func:`bnlab.functional.shared_buffer`) raises RuntimeError naming ``layer``, touching
    nothing."""
    if update:
        shared = shared_buffer(running_mean, running_var)
        if shared:
            name = layer if isinstance(layer, str) else layer()
            raise RuntimeError(shared_buffer_message(name, shared))
    if torch.jit.is_scripting():
        ops.decompose_commit(x, mean, var, running_mean, running_var, num_batches_tracked,
                             momentum, update, layer)  # fmt: skip
    else:
        how = ops.route(x, running_mean, running_var, num_batches_tracked)
        if how == ops.EAGER:
            m = x.numel() // x.shape[1]
            if not B.commit_stats(mean, var, running_mean, running_var, num_batches_tracked,
                                  momentum, m, update):  # fmt: skip
                name = layer if isinstance(layer, str) else layer()
                raise FloatingPointError(ops.non_finite_message(name, list(x.shape)))
            return
        args = (x, mean, var, running_mean, running_var, num_batches_tracked, momentum, update)
        name = layer if isinstance(layer, str) else layer()
        if how == ops.OP:
            torch.ops.bnlab.commit_stats(*args, name)
        else:
            ops.decompose_commit(*args, name)
