"""bnlab's batch norm as PyTorch operators, so tools that look inside a model see real ops.

Ioffe & Szegedy (2015): Algorithm 1 (training transform), Algorithm 2 (inference transform and
the running averages it uses), the section 3 gradients. Three forms of the same contract:

* **custom operators** (``torch.library.custom_op``, namespace ``bnlab``), each with a fake
  (meta) implementation, registered autograd (``setup_context`` + backward), a vmap rule and a
  decomposition into standard torch ops::

      torch.ops.bnlab.batch_norm_train(x, weight?, bias?, eps, relu) -> (y, stats)
          stats = (3, C): mean, biased var, invstd = 1 / sqrt(var + eps)  (acc dtype);
          with relu (5, C): then the coefficients (a, c) of the ReLU's mask a x + c > 0
      torch.ops.bnlab.batch_norm_eval(x, running_mean, running_var, weight?, bias?, eps, relu) -> y
      torch.ops.bnlab.batch_norm_backward(dy, x, mean, invstd, weight?, y?, train, need_dx,
                                          need_dparams, coef?) -> (dx, dparams)   dparams = (2, C)
          (the ReLU's mask: from coef = stats[3:5] of the training forward, else y > 0)
      torch.ops.bnlab.commit_stats(x, mean, var, running_mean!?, running_var!?,
                                   num_batches_tracked!?, momentum?, update, layer) -> ()

  Their implementations run on the path :mod:`bnlab.backend` chooses (the fused Numba kernels or
  the reference functions), so compiled graphs keep bnlab's kernels; Numba is never called
  while tracing (the fake implementations only make empty outputs of the right shape, dtype
  and strides). ``commit_stats`` is the one place a batch's statistics are accepted: it raises
  ``FloatingPointError`` naming ``layer`` on non-finite statistics before any buffer is touched,
  and otherwise updates the running averages in place (so a compiled forward has no
  data-dependent Python branch).

* **decompositions** (:func:`decompose_train`, :func:`decompose_eval`,
  :func:`decompose_commit`): the same math in TorchScript-compatible standard ops
  (:mod:`bnlab.functional`; the inference transform is ``torch.nn.functional.batch_norm``, which
  every exporter and runtime knows). Running statistics are updated through ``torch.where`` on
  the finiteness flag, so a captured graph leaves them unchanged on a non-finite batch even
  where it cannot raise. :func:`decompositions` maps each operator to its decomposition for
  ``ExportedProgram.run_decompositions`` and ``make_fx``.

* **eager** (:mod:`bnlab.autograd`): the ``torch.autograd.Function`` s that call the backend
  directly, without the dispatcher's per-call cost.

:func:`route` picks one per call: the custom operators under ``torch.fx`` symbolic tracing,
``make_fx`` and other dispatch modes (``FakeTensorMode``, ``DebugMode``), on fake tensors, and
under ``torch.compile`` in the ``"ops"`` form (:func:`set_compile_form`; the default there is the
decomposition, which Inductor fuses); the decomposition under ``torch.export`` (and so ONNX with
``dynamo=True``), ``torch.jit.trace`` (and the TorchScript ONNX exporter), ``torch.jit.script``,
``torch.func`` transforms, on the meta device and on other tensor subclasses that run torch's
operators themselves (``DTensor``); eager otherwise.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import backend as B
from .errors import BatchedUpdateError
from .functional import (
    acc_dtype,
    batch_norm_train_forward,
    per_channel,
    pivot_values,
    reduce_dims,
    scale_shift,
)
from .kernels import dispatches_to_python

__all__ = [
    "EAGER",
    "OP",
    "DECOMPOSE",
    "SUBCLASS",
    "route",
    "COMPILE_FORMS",
    "set_compile_form",
    "get_compile_form",
    "compile_form",
    "check_batch",
    "shape_text",
    "decompose_train",
    "decompose_eval",
    "decompose_commit",
    "decompositions",
    "differentiable_grads",
    "standard_backward",
    "standard_grads",
    "non_finite_message",
    "relu_grad",
]

EAGER, OP, DECOMPOSE = 0, 1, 2
#: DECOMPOSE for an eager call on a tensor subclass that runs torch's operators itself: the
#: standard ops, with the input and output in the layouts torch's eager layer gives.
SUBCLASS = 3
COMPILE_FORMS = ("auto", "ops", "decompose")
# Under torch.compile, "auto" lets Inductor fuse the decomposition of every input. A custom
# operator is an opaque call back into Python per operator and keeps Inductor from fusing BN with
# the ReLU and the residual addition around it, and Inductor's own code for what it must then run
# apart can be slow (a ReLU and a max pooling after an operator: several times the fused loop).
# In float32 whole models, contiguous and channels_last, the decomposition was as fast as the
# operators or faster (docs/kernels.md, "Dispatch"); the operators remain ("ops") for other
# compile backends, for what Inductor's own loops do slowly (bfloat16 rows of few channels),
# and for comparison.


def _check_form(form: str, where: str = "compile form") -> str:
    if form not in COMPILE_FORMS:
        raise ValueError(f"{where} must be one of {', '.join(COMPILE_FORMS)}; got {form!r}")
    return form


_compile_form = _check_form(os.environ.get("BNLAB_COMPILE_FORM", "auto"), "BNLAB_COMPILE_FORM")


def set_compile_form(form: str) -> None:
    """How bnlab's BN is traced by ``torch.compile``: ``"ops"`` (its custom operators, which
    run bnlab's kernels), ``"decompose"`` (standard ops that Inductor fuses with their
    neighbours) or ``"auto"`` (the default: the decomposition, as fast as the operators or
    faster in the float32 models measured). Read when a graph is traced: a compiled function
    is traced again when the form changes."""
    global _compile_form
    _compile_form = _check_form(form)


def get_compile_form() -> str:
    """The selected compile form name."""
    return _compile_form


@contextlib.contextmanager
def compile_form(form: str) -> Iterator[None]:
    """``with compile_form("ops"): ...`` for a block, then restored."""
    previous = _compile_form
    set_compile_form(form)
    try:
        yield
    finally:
        set_compile_form(previous)


# (bound once: a layer between other layers finds every module attribute out of the caches)
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_functorch_active = torch._C._are_functorch_transforms_active
_Proxy = torch.fx.Proxy
_dispatch_modes = torch._C._len_torch_dispatch_stack
_Parameter = torch.nn.Parameter
_has_storage = torch._C._has_storage
_FakeTensor = torch._subclasses.fake_tensor.FakeTensor
_get_mode = torch._C._get_dispatch_mode
_PROXY = torch._C._TorchDispatchModeKey.PROXY


def _wraps_a_fake(t: Tensor) -> bool:
    """A tensor subclass that runs torch's operators itself, other than a fake tensor: what a
    DTensor or another wrapper is while Dynamo traces (its inner tensors fake)."""
    return type(t) is not _FakeTensor and type(t) is not _Parameter and dispatches_to_python(t)


def route(x: Tensor, *others: Tensor | None) -> int:
    """How a bnlab batch-norm call on ``x`` runs: ``OP`` (custom operators: ``torch.compile``,
    fx symbolic tracing, and eager calls under a ``TorchDispatchMode`` or on fake tensors),
    ``DECOMPOSE`` (standard ops: ``torch.export``, ``jit.trace``, ``torch.func`` transforms,
    forward-mode AD, meta tensors; under ``torch.compile`` as :func:`set_compile_form` says),
    ``SUBCLASS`` (standard ops too, for other tensor subclasses that run operators themselves,
    in torch's eager layouts) or ``EAGER`` (the autograd Functions).

    A dispatch mode (``FakeTensorMode``, ``make_fx``'s tracer, ``DebugMode``, a memory tracker)
    sees every operator a call runs and may stand in for its tensors: the operators show it
    bnlab's BN as the kernels run it (their fake implementations allocate what the kernels
    allocate), where the kernels, which read memory directly, would be invisible to it or read
    memory a fake tensor does not have. A subclass such as ``DTensor`` or a wrapper tensor knows
    torch's operators, not bnlab's, so it gets the standard ops
    (:func:`bnlab.kernels.dispatches_to_python`), also as one of ``others`` (the call's
    parameters and statistics) beside a plain ``x``: the eager paths' in-place arithmetic on
    plain tensors would take such an argument once per tensor it stands for."""
    if _is_compiling():  # torch.compile and torch.export set it
        if torch.compiler.is_exporting() or _compile_form != "ops":
            return DECOMPOSE
        # (while Dynamo traces, every tensor is fake; a subclass around one, such as DTensor,
        # knows torch's operators and not bnlab's)
        for t in (x, *others):
            if t is not None and _wraps_a_fake(t):
                return DECOMPOSE
        return OP
    if isinstance(x, _Proxy):
        return OP
    if (
        _is_tracing()
        or _functorch_active()
        or x.is_meta
        or _forward_ad._current_level >= 0  # inside torch.autograd.forward_ad.dual_level()
    ):
        return DECOMPOSE
    if type(x) is not Tensor and dispatches_to_python(x):  # (a plain tensor: no call)
        return OP if isinstance(x, _FakeTensor) else SUBCLASS
    for t in others:  # (parameters: most are Parameters, which run no operators themselves)
        if t is not None and type(t) is not _Parameter and dispatches_to_python(t):
            return SUBCLASS
    if _dispatch_modes() > 0:
        return OP
    return EAGER


def shape_text(shape: list[int]) -> str:
    """``(2, 3, 4)``, as a tuple prints (TorchScript-compatible)."""
    if len(shape) == 1:
        return "(" + str(shape[0]) + ",)"
    return "(" + ", ".join([str(s) for s in shape]) + ")"


def check_shapes(layer: str, expected) -> None:
    """Refuse, naming ``layer``, the first of ``(name, tensor, shape)`` whose tensor (None:
    absent, skipped) has another shape: a parameter or buffer reassigned through ``.data``,
    which a layer must see before its forward changes any state."""
    for name, t, shape in expected:
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(f"{layer}: {name} should have shape {shape}, got "
                               f"{tuple(t.shape)}")  # fmt: skip


def check_batch(x: Tensor, eps: float, batch_stats: bool, layer: str) -> None:
    """Refuse, with ``layer`` named, what torch refuses before it computes anything: batch
    statistics from one value per channel (``m = 1``; an empty batch, ``m = 0``, is accepted)
    or with ``eps <= 0``, and population statistics with ``eps < 0`` (``eps = 0`` is fine; a NaN
    eps passes both checks, as in torch, and gives a NaN output)."""
    if batch_stats:
        m = x.numel() // x.shape[1]
        if m == 1:
            raise ValueError(
                f"{layer}: expected more than 1 value per channel when using batch statistics, "
                f"got input of shape {shape_text(list(x.shape))} (1 value per channel)"
            )
        if eps <= 0:
            raise ValueError(f"{layer}: eps must be > 0 when using batch statistics, got {eps}")
    elif eps < 0:
        raise ValueError(f"{layer}: eps must be >= 0, got {eps}")


def non_finite_message(layer: str, shape: list[int] | None = None) -> str:
    where = "the input" if shape is None else "the input of shape " + shape_text(shape)
    return (
        f"{layer}: non-finite batch statistics (NaN or Inf in {where}, or a variance beyond "
        "the range of its dtype); running statistics were left unchanged"
    )


# ---------------------------------------------------------------------------- decompositions
def decompose_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 [+ ReLU] in standard ops: ``(y, mean, biased var, invstd)``."""
    y, mean, var, invstd = batch_norm_train_forward(x, weight, bias, eps)
    if relu:
        y = torch.relu(y)
    return y, mean, var, invstd


def graph_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`decompose_train` for a graph being captured: under ``torch.compile`` (not
    export) the form Inductor runs fastest, :class:`_InductorTrain`; for every other capture
    (export, ``jit.trace``, ``torch.func`` transforms, meta tensors) the decomposition itself,
    whose ops autograd differentiates (twice, if asked)."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting() and x.numel() > 0:
        return _InductorTrain.apply(x, weight, bias, eps, relu)[:4]
    return decompose_train(x, weight, bias, eps, relu)


def _pivot(x: Tensor) -> Tensor:
    """The shift of the statistics, (C,) in the accumulation dtype (:func:`pivot_values`)."""
    return pivot_values(x).to(acc_dtype(x.dtype))


def _shifted(x: Tensor) -> Tensor:
    """``x - pivot`` per channel in the accumulation dtype (exact for values near the pivot)."""
    return x.to(acc_dtype(x.dtype)) - per_channel(_pivot(x), x)


def relu_grad(dy: Tensor, y: Tensor | None) -> Tensor:
    """dy through the fused ReLU whose output is y (None: no ReLU)."""
    return dy if y is None else torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype))


class _InductorTrain(torch.autograd.Function):
    """Algorithm 1 [+ ReLU] in standard ops with its backward written out, for Inductor.

    Differentiated by autograd, :func:`decompose_train` makes Inductor read the input more often
    than the math needs: its statistics are two reductions (the shifted mean, then the squared
    deviations about it) and autograd's backward of that chain adds its own. Here the statistics
    are one Welford reduction (``torch.var_mean``) of the same shifted values ``d = x - pivot``,
    so just as exact for inputs with a large mean, and the backward is the section 3 gradients
    as the ``batch_norm_backward`` operator decomposes them (:func:`_backward_decomposition`:
    the two per-channel sums in one pass, then one elementwise pass) on the shifted values,
    ``x_hat = (d - mean(d)) invstd`` (from the rounded mean, ``x - mean`` would lose the digits
    a large mean leaves), with ReLU's mask taken from the saved output. Returns
    ``(y, mean, biased var, invstd, mean(d))``; x has at least one value per channel. Dynamo
    inlines both methods into the traced forward and backward graphs."""

    @staticmethod
    def forward(x, weight, bias, eps, relu):
        d = _shifted(x)
        var, mean_d = torch.var_mean(d, reduce_dims(x), correction=0, keepdim=True)
        invstd = torch.rsqrt(var + eps)
        y = scale_shift(d - mean_d, invstd.view(-1), weight, bias).to(x.dtype)
        if relu:
            y = torch.relu(y)
        mean_d = mean_d.view(-1)
        return y, _pivot(x) + mean_d, var.view(-1), invstd.view(-1), mean_d

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _eps, relu = inputs
        y, mean, var, invstd, mean_d = output
        ctx.save_for_backward(x, weight, mean_d, invstd, y if relu else None)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var, invstd, mean_d)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dinvstd, _dmean_d):
        x, weight, mean_d, invstd, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        d = _shifted(x)
        dx, dparams = _backward_decomposition(
            dy, d, mean_d, invstd, weight, y, True, need[0], need[1] or need[2]
        )
        dgamma = dparams[0] if need[1] and weight is not None else None
        dbeta = dparams[1] if need[2] and ctx.has_bias else None
        return dx.to(x.dtype) if need[0] else None, dgamma, dbeta, None, None


def decompose_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
) -> Tensor:
    """The inference transform [+ ReLU] as ``torch.nn.functional.batch_norm`` computes it, the
    operator it calls (exports as one BatchNormalization node that runtimes fold into a
    preceding convolution). The operator itself, not the Python function, which
    :func:`bnlab.patch_functional` may have replaced by bnlab's."""
    y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)
    if relu:
        y = torch.relu(y)
    return y


def decompose_commit(
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
    """The running-statistics commit of :func:`bnlab.functional.commit_running_stats` in
    standard ops. Non-finite statistics raise ``FloatingPointError`` where the values can be
    read (``jit.script``, ``torch.func.grad``), and an assertion (``RuntimeError``) in an exported
    graph; in every case the running averages and the count are written through ``torch.where``
    on the finiteness flag, so a graph that cannot raise (``jit.trace``) leaves them unchanged.
    Under ``vmap`` the running statistics cannot take per-sample values (as for torch's
    BatchNorm): a ValueError naming ``layer``."""
    m = x.numel() // x.shape[1]
    if m == 0:  # an empty batch: counted, statistics unchanged (as torch)
        if update and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    ok = torch.isfinite(var).all()
    if torch.jit.is_scripting():
        if not bool(ok):
            raise FloatingPointError(non_finite_message(layer))
    else:
        if not _accept_python(x, var, ok, running_mean, update, layer):
            return
    if not update:
        return
    # (as torch's layer: the counter counted whenever given, the averages updated when given)
    buffers: list[Tensor] = []
    values: list[Tensor] = []
    count: Tensor | None = None
    if num_batches_tracked is not None:
        count = num_batches_tracked + ok.to(num_batches_tracked.dtype)
        buffers.append(num_batches_tracked)
        values.append(count)
    # (no counter and momentum None: torch's factor is 0, the averages stay as they are)
    if running_mean is not None and running_var is not None and (
        momentum is not None or count is not None
    ):
        dtype = running_mean.dtype
        new_mean = mean.detach().to(dtype)
        new_var = (var.detach() * (m / (m - 1))).to(dtype)
        if momentum is not None:
            new_mean = torch.lerp(running_mean, new_mean, momentum)
            new_var = torch.lerp(running_var, new_var, momentum)
        elif count is not None:  # cumulative average: f = 1 / num_batches_tracked
            f = torch.reciprocal(count.to(dtype))
            new_mean = torch.lerp(running_mean, new_mean, f)
            new_var = torch.lerp(running_var, new_var, f)
        buffers += [running_mean, running_var]
        values += [new_mean, new_var]
    if torch.jit.is_scripting():
        for i in range(len(buffers)):
            buffers[i].copy_(values[i])
    else:
        _write_python(ok, tuple(buffers), tuple(values), layer)


def _accept_python(x, var, ok, running_mean, update, layer) -> bool:
    """The finiteness refusal of :func:`decompose_commit` outside TorchScript: an assertion in a
    graph being captured (``torch.compile``, ``jit.trace``, ``make_fx``), on meta and fake
    tensors and on other tensor subclasses whose values cannot be read, a FloatingPointError
    where values can be read (eager ``torch.func.grad``, ``DTensor``), a ValueError for an
    update under ``vmap``. False when there is nothing more to do (vmap without an update)."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or var.is_meta
        or isinstance(var, _FakeTensor)
        or _get_mode(_PROXY) is not None  # (make_fx: a graph being captured)
    ):
        torch._assert_async(_local(ok), non_finite_message(layer))
        return True
    try:
        bad = not bool(ok)
    except RuntimeError:
        if dispatches_to_python(var):  # (values it will not give)
            torch._assert_async(_local(ok), non_finite_message(layer))
            return True
        # vmap: per-sample statistics cannot be read (nor averaged in)
        if update and running_mean is not None:
            raise BatchedUpdateError(
                f"{layer}: running statistics cannot be updated from per-sample statistics "
                "under vmap (torch.nn.BatchNorm refuses this too); use eval mode, "
                "track_running_stats=False or bnlab.freeze"
            ) from None
        return False
    if bad:
        raise FloatingPointError(non_finite_message(layer, list(x.shape)))
    return True


def _local(ok: Tensor) -> Tensor:
    """The finiteness flag as this process holds it: a DTensor's local tensor (the flag of
    statistics every rank shares, which DTensor has no assertion operator for), else itself.
    (DTensor's module is looked up, not imported: a DTensor exists only once it is.)"""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(ok, dtensor.DTensor):
        return ok.to_local()
    return ok


def _is_functional(t: Tensor) -> bool:
    return torch._C._functorch.is_functionaltensor(t)


def _unwrap_functional(t: Tensor) -> Tensor:
    """The value of a tensor of ``torch.func.functionalize``, outside its wrapper: what a buffer
    captured from outside the transform (a layer's running statistics) can take in place, as
    torch's batch-norm kernel writes such buffers under functionalization."""
    torch._sync(t)
    return torch._C._functorch._unwrap_functional_tensor(t, False)


def _write_python(ok, buffers, values, layer) -> None:
    """buffer <- where(ok, value, buffer) for each; under a torch.func transform that cannot
    write into buffers captured from outside (torch's BatchNorm cannot either), a RuntimeError
    naming the layer, before any buffer is written."""
    functionalizing = not _is_compiling() and _functorch_active()
    try:
        for buffer, value in zip(buffers, values, strict=True):
            new = torch.where(ok, value, buffer)
            if functionalizing and _is_functional(new) and not _is_functional(buffer):
                new = _unwrap_functional(new)  # (torch.func.functionalize: a module's buffer)
            buffer.copy_(new)
    except RuntimeError as exc:
        if "captured Tensor" not in str(exc):
            raise
        raise RuntimeError(
            f"{layer}: cannot update running statistics inside this torch.func transform "
            "(torch.nn.BatchNorm cannot either); use eval mode, track_running_stats=False or "
            f"bnlab.freeze. ({exc})"
        ) from None


def differentiable_grads(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dgamma, dbeta) as differentiable functions of (dy, x, gamma, beta), for a backward
    that must itself be differentiated (``create_graph=True``): the decomposition is recomputed
    from the saved inputs and differentiated by autograd. ``running_mean`` None means the
    training transform (batch statistics), else the inference one. ``needs`` says which
    gradients are wanted (each such input requires grad)."""
    inputs = [t for t, n in zip((x, weight, bias), needs, strict=True) if n and t is not None]
    with torch.enable_grad():
        if running_mean is None or running_var is None:
            y = decompose_train(x, weight, bias, eps, relu)[0]
        else:
            y = decompose_eval(x, running_mean, running_var, weight, bias, eps, relu)
        grads = list(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    out: list[Tensor | None] = []
    for t, n in zip((x, weight, bias), needs, strict=True):
        g = grads.pop(0) if n and t is not None else None
        if g is None and n and t is not None:
            g = torch.zeros_like(t)
        out.append(g)
    return out[0], out[1], out[2]


def standard_backward(dy: Tensor) -> bool:
    """Whether an eager call's autograd Function must take its gradients in standard ops
    (:func:`standard_grads`) rather than from the kernels: a backward that must itself be
    differentiated (``create_graph=True``), one Dynamo traces (compiled autograd with the
    forward left eager), which must not call into the kernels, and one the kernels cannot read
    or a tool must see: under ``vmap`` or a dispatch mode, and for a gradient ``dy`` without
    memory of its own (a batch of gradients, as ``is_grads_batched=True`` and the vectorized
    ``torch.autograd.functional.jacobian`` and ``hessian`` hand it, or a tensor subclass)."""
    return (
        torch.is_grad_enabled()
        or _is_compiling()
        or _functorch_active()
        or _dispatch_modes() > 0
        or not _has_storage(dy)
        or (type(dy) is not Tensor and dispatches_to_python(dy))
    )


def standard_grads(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dgamma, dbeta) in standard ops for :func:`standard_backward`'s cases: under
    ``create_graph=True`` :func:`differentiable_grads`; while Dynamo traces the backward
    (compiled autograd with the forward left eager) the section 3 gradients as
    :func:`_backward_decomposition` writes them, the statistics recomputed from the saved
    inputs (``running_mean`` None means the training transform) and the fused ReLU's mask from
    their coefficients, so the traced graph has no call into the kernels."""
    if torch.is_grad_enabled():
        return differentiable_grads(dy, x, weight, bias, eps, relu, running_mean, running_var,
                                    needs)  # fmt: skip
    acc = acc_dtype(x.dtype)
    train = running_mean is None or running_var is None
    if train:
        var, mean = torch.var_mean(x.to(acc), reduce_dims(x), correction=0)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    coef = _mask_coef(mean, invstd, weight, bias) if relu else None
    dx, dparams = _backward_decomposition(dy, x, mean, invstd, weight, None, train, needs[0],
                                          needs[1] or needs[2], coef)  # fmt: skip
    return _split_grads(dx, dparams, needs, bias)


# ---------------------------------------------------------------------------- custom operators
def _empty_like_out(y: Tensor, x: Tensor) -> Tensor:
    """``y`` with the strides ``torch.empty_like(x)`` has, which is what the fake implementation
    promises: eager outputs take the strides torch's batch norm gives (their format's own,
    which differ from x's where a size-1 dimension of x has another stride), and the reference
    path may pick others for unusual input strides; a copy only then."""
    if y.stride() == x.stride():  # (a dense x: empty_like keeps its strides)
        return y
    like = torch.empty_like(x)
    if like.stride() == y.stride():
        return y
    return like.copy_(y)


# Every operator takes its tensors in any strides (the kernels read both dense layouts, the
# reference path any other), and its outputs (and dx) take x's as torch.empty_like gives them, in
# the fake implementations too. So Inductor may hand them its buffers as it laid them out: without
# this tag it copies each tensor argument to the strides of the traced call first (for a
# contiguous model whose convolutions it runs channels_last: x, y, dy and dx around every call,
# and x once more for commit_stats, which reads only its shape).
_ANY_LAYOUT = (torch.Tag.flexible_layout,)


def _mask_coef(mean: Tensor, invstd: Tensor, weight: Tensor | None,
               bias: Tensor | None) -> Tensor:  # fmt: skip
    """(2, C): the normalize coefficients ``(a, c)`` of ``BN(x) = a x + c`` in mean's dtype."""
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    c = -mean * a if bias is None else bias.to(a.dtype) - mean * a
    return torch.stack((a, c))


def _gate(t: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    """t where the fused ReLU's mask ``a x + c > 0`` holds, else 0; the mask in standard ops in
    coef's dtype, the same ops for the output in the forward and for dy in the backward, so both
    see the same mask."""
    mask = x.to(coef.dtype) * per_channel(coef[0], x) + per_channel(coef[1], x) > 0
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype))


# The fused ReLU's backward needs its mask, y > 0. Saving y for it keeps a second tensor beside
# x wherever nothing else keeps y (a ReLU before a pooling, whose compiled backward keeps only
# its indices). The training operator returns the normalize coefficients instead, from which the
# backward recomputes the mask from x: the kernels' own (their forward's, bit for bit) where
# they read x as it is (:func:`bnlab.backend.mask_from_coef`), :func:`_gate`'s on the other
# paths, whose output is made to agree with it.
@torch.library.custom_op("bnlab::batch_norm_train", mutates_args=(), tags=_ANY_LAYOUT)
def _train_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool
) -> tuple[Tensor, Tensor]:
    check_batch(x, eps, True, "bnlab::batch_norm_train")
    path, y, mean, var, invstd, mask = B.train_forward(x, weight, bias, eps, relu=relu,
                                                       keep_mask=True)  # fmt: skip
    if not relu:
        return _empty_like_out(y, x), torch.stack((mean, var, invstd))
    if B.mask_from_coef(path, x):  # (the kernels' coefficients, their mask)
        coef = mask
    else:
        coef = _mask_coef(mean, invstd, weight, bias)
        y = _gate(y, x, coef)
    return _empty_like_out(y, x), torch.cat((torch.stack((mean, var, invstd)), coef))


@_train_op.register_fake
def _train_fake(x, weight, bias, eps, relu):
    rows = 5 if relu else 3
    return torch.empty_like(x), x.new_empty((rows, x.shape[1]), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("bnlab::batch_norm_eval", mutates_args=(), tags=_ANY_LAYOUT)
def _eval_op(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
) -> Tensor:
    check_batch(x, eps, False, "bnlab::batch_norm_eval")
    _, y, _ = B.eval_forward(x, running_mean, running_var, weight, bias, eps, relu=relu)
    return _empty_like_out(y, x)


@_eval_op.register_fake
def _eval_fake(x, running_mean, running_var, weight, bias, eps, relu):
    return torch.empty_like(x)


@torch.library.custom_op("bnlab::batch_norm_backward", mutates_args=(), tags=_ANY_LAYOUT)
def _backward_op(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    y: Tensor | None,
    train: bool,
    need_dx: bool,
    need_dparams: bool,
    coef: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """dx (x's shape; empty (0,) when not needed) and dparams = (dgamma; dbeta) as (2, C) in
    :func:`_param_dtype` (empty (0,) when not needed). The fused ReLU's mask comes from ``coef``
    (rows 3-4 of the training operator's stats, its mask recomputed from x) when given, else
    from ``y`` (its output) when given."""
    path = B.choose(x, weight)
    fn = B.train_backward if train else B.eval_backward
    if coef is not None and train and B.mask_from_coef(path, x):
        dx, dgamma, dbeta = fn(path, dy, x, mean, invstd, weight, need_dx=need_dx,
                               need_dparams=need_dparams, mask=coef.contiguous())  # fmt: skip
    else:
        if coef is not None:
            dy, y = _gate(dy, x, coef), None
        dx, dgamma, dbeta = fn(
            path, dy, x, mean, invstd, weight, need_dx=need_dx, need_dparams=need_dparams, y=y
        )
    dx = x.new_empty(0) if dx is None else _empty_like_out(dx, x)
    if dgamma is None or dbeta is None:
        return dx, x.new_empty(0)
    return dx, torch.stack((dgamma, dbeta))


@_backward_op.register_fake
def _backward_fake(dy, x, mean, invstd, weight, y, train, need_dx, need_dparams, coef=None):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    if not need_dparams:
        return dx, x.new_empty(0)
    return dx, x.new_empty((2, x.shape[1]), dtype=_param_dtype(x, weight))


@torch.library.custom_op(
    "bnlab::commit_stats",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    tags=_ANY_LAYOUT,
)
def _commit_op(
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
    m = x.numel() // x.shape[1]
    args = (mean, var, running_mean, running_var, num_batches_tracked, momentum, m, update)
    if not B.commit_stats(*args):
        raise FloatingPointError(non_finite_message(layer, list(x.shape)))


@_commit_op.register_fake
def _commit_fake(x, mean, var, running_mean, running_var, num_batches_tracked, momentum, update,
                 layer):  # fmt: skip
    return None


# autograd: the backward operator; a backward that must itself be differentiated
# (create_graph=True) goes through the decomposition instead.
def _train_setup(ctx, inputs, output):
    x, weight, bias, eps, relu = inputs
    y, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, weight, bias, stats)  # (the ReLU's mask: stats' coefficients)
    ctx.eps, ctx.relu = eps, relu


def _train_backward(ctx, dy, _dstats):
    x, weight, bias, stats = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():
        dx, dw, db = differentiable_grads(dy, x, weight, bias, ctx.eps, ctx.relu, None, None,
                                          needs)  # fmt: skip
    else:
        dxo, dparams = torch.ops.bnlab.batch_norm_backward(
            dy, x, stats[0], stats[2], weight, None, True, needs[0], needs[1] or needs[2],
            stats[3:5] if ctx.relu else None,
        )  # fmt: skip
        dx, dw, db = _split_grads(dxo, dparams, needs, bias)
    return dx, dw, db, None, None


def _split_grads(dx, dparams, needs, bias):
    """(dx, dgamma, dbeta) from the backward operator's outputs, None where not needed (dbeta
    in the bias's dtype: without a weight the sums come in :func:`_param_dtype`)."""
    dx = dx if needs[0] else None
    if dparams.numel() == 0:
        return dx, None, None
    dgamma = dparams[0] if needs[1] else None
    if not needs[2] or bias is None:
        return dx, dgamma, None
    return dx, dgamma, dparams[1].to(bias.dtype)


def _param_dtype(x: Tensor, weight: Tensor | None) -> torch.dtype:
    """The dtype of the parameter gradients of the backward operator: the weight's, or without a
    weight (a bias alone) the accumulation dtype of x."""
    return acc_dtype(x.dtype) if weight is None else weight.dtype


_train_op.register_autograd(_train_backward, setup_context=_train_setup)


def _eval_setup(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, eps, relu = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight, bias, output if relu else None)
    ctx.eps, ctx.relu = eps, relu


def _eval_backward(ctx, dy):
    x, running_mean, running_var, weight, bias, y = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[3], n[4])
    if torch.is_grad_enabled():
        dx, dw, db = differentiable_grads(dy, x, weight, bias, ctx.eps, ctx.relu, running_mean,
                                          running_var, needs)  # fmt: skip
    else:
        invstd = torch.rsqrt(running_var.to(acc_dtype(x.dtype)) + ctx.eps)
        dxo, dparams = torch.ops.bnlab.batch_norm_backward(
            dy, x, running_mean.to(invstd.dtype), invstd, weight, y, False, needs[0],
            needs[1] or needs[2],
        )  # fmt: skip
        dx, dw, db = _split_grads(dxo, dparams, needs, bias)
    return dx, None, None, dw, db, None, None


_eval_op.register_autograd(_eval_backward, setup_context=_eval_setup)


# vmap: each slice of the vmapped dimension B is a batch norm of its own. The rules fold B into
# the channels (x: (B, N, C, *s) -> (N, B*C, *s); per-channel tensors -> (B*C,)) and call the
# operator once, which computes exactly those B*C per-channel statistics.
def _fold_channels(x, bdim, size):
    """x with its vmapped dim (or a broadcast one when bdim is None) folded into channels."""
    x = x.unsqueeze(0).expand(size, *x.shape) if bdim is None else x.movedim(bdim, 0)
    x = x.movedim(0, 1)  # (N, B, C, *s)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _fold_param(t, bdim, size):
    if t is None:
        return None
    t = t.unsqueeze(0).expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)
    return t.reshape(-1)


def _unfold_channels(y, size):
    """(N, B*C, *s) -> (B, N, C, *s)."""
    return y.reshape(y.shape[0], size, -1, *y.shape[2:]).movedim(1, 0)


def _train_vmap(info, in_dims, x, weight, bias, eps, relu):
    size = info.batch_size
    y, stats = torch.ops.bnlab.batch_norm_train(
        _fold_channels(x, in_dims[0], size), _fold_param(weight, in_dims[1], size),
        _fold_param(bias, in_dims[2], size), eps, relu,
    )  # fmt: skip
    return (_unfold_channels(y, size), stats.reshape(stats.shape[0], size, -1)), (0, 1)


def _eval_vmap(info, in_dims, x, running_mean, running_var, weight, bias, eps, relu):
    size = info.batch_size
    if all(d is None for d in in_dims[1:5]):  # shared statistics: B joins N
        xb = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(size, *x.shape)
        y = torch.ops.bnlab.batch_norm_eval(
            xb.reshape(-1, *xb.shape[2:]), running_mean, running_var, weight, bias, eps, relu
        )
        return y.reshape(xb.shape), 0
    folded = [_fold_param(t, d, size) for t, d in zip(
        (running_mean, running_var, weight, bias), in_dims[1:5], strict=True)]  # fmt: skip
    y = torch.ops.bnlab.batch_norm_eval(_fold_channels(x, in_dims[0], size), *folded, eps, relu)
    return _unfold_channels(y, size), 0


def _commit_vmap(info, in_dims, x, mean, var, running_mean, running_var, num_batches_tracked,
                 momentum, update, layer):  # fmt: skip
    if update and running_mean is not None and in_dims[1] is not None:
        raise BatchedUpdateError(
            f"{layer}: running statistics cannot be updated from per-sample statistics under "
            "vmap (torch.nn.BatchNorm refuses this too); use eval mode, "
            "track_running_stats=False or bnlab.freeze"
        )
    if not bool(torch.isfinite(var).all()):
        raise FloatingPointError(non_finite_message(layer))
    return None, None


torch.library.register_vmap("bnlab::batch_norm_train", _train_vmap)
torch.library.register_vmap("bnlab::batch_norm_eval", _eval_vmap)
torch.library.register_vmap("bnlab::commit_stats", _commit_vmap)


def _train_decomposition(x, weight, bias, eps, relu):
    y, mean, var, invstd = decompose_train(x, weight, bias, eps, relu)
    stats = torch.stack((mean, var, invstd))
    if not relu:
        return y, stats
    coef = _mask_coef(mean, invstd, weight, bias)
    return _gate(y, x, coef), torch.cat((stats, coef))


def _backward_decomposition(dy, x, mean, invstd, weight, y, train, need_dx, need_dparams,
                            coef=None):  # fmt: skip
    """bnlab::batch_norm_backward in functional standard ops (the section 3 gradients)."""
    acc = acc_dtype(x.dtype)
    dims = reduce_dims(x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if coef is not None:
        dy, y = _gate(dy, x, coef), None
    g = relu_grad(dy, y).to(acc)
    x_hat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
    sum_g, sum_gx = g.sum(dims), (g * x_hat).sum(dims)
    dx = x.new_empty(0)
    if need_dx:
        scale = invstd if weight is None else invstd * weight.to(acc)
        if train:
            m = x.numel() // x.shape[1]
            g = g - (sum_g / m).view(shape) - x_hat * (sum_gx / m).view(shape)
        dx = (g * scale.view(shape)).to(x.dtype)
    if not need_dparams:
        return dx, x.new_empty(0)
    return dx, torch.stack((sum_gx, sum_g)).to(_param_dtype(x, weight))


def decompositions() -> dict:
    """{bnlab operator overload: decomposition into standard ops}, for a graph that contains
    bnlab's operators (e.g. from ``torch.fx.symbolic_trace``): pass it to
    ``ExportedProgram.run_decompositions`` (merged into ``torch.export.default_decompositions()``)
    or ``make_fx(..., decomposition_table=...)``."""
    ops = torch.ops.bnlab
    return {
        ops.batch_norm_train.default: _train_decomposition,
        ops.batch_norm_eval.default: decompose_eval,
        ops.batch_norm_backward.default: _backward_decomposition,
        ops.commit_stats.default: decompose_commit,
    }
