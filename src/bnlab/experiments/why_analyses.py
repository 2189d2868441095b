"""The measurements behind `bnlab run why`, as plain functions of a model and a batch (each
leaves the model it is given as it was: parameters, buffers, mode).

Bjorck, Gomes, Selman & Weinberger, "Understanding Batch Normalization" (NeurIPS 2018):

* :func:`relative_loss` - the loss along the gradient direction against the step size, relative to
  the loss before the step (their section 2: without BN the loss explodes for steps above about
  1e-3; with BN it stays within 10^(+-0.5) up to 0.1-0.2);
* :func:`channel_stats_by_depth` - per-channel mean and standard deviation of every convolution's
  output at initialization (their section 3: exponential growth with depth without BN);
* :func:`gradient_snapshot` - one forward/backward on a batch: a middle layer's weight gradient
  (heavy tails without BN), the output gradients (one class column hot without BN), the
  predicted classes, and :func:`kernel_gradient_similarity` of that layer's kernel gradients
  across examples and spatial positions;
* :func:`product_singular_values` and :func:`spectrum_skew` - singular values of products of
  Gaussian matrices (their section 4: increasingly skewed with more factors).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..probes import excess_kurtosis, record_channel_stats, record_inputs, record_output_grads

__all__ = [
    "relative_loss",
    "conv_layers",
    "channel_stats_by_depth",
    "gradient_snapshot",
    "kernel_gradient_similarity",
    "mean_pairwise_cosine",
    "class_bias",
    "histogram",
    "product_singular_values",
    "spectrum_skew",
    "fuss_catalan_edge",
]

Loss = Callable[[Tensor, Tensor], Tensor]


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def relative_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    step_sizes: Sequence[float],
    loss_fn: Loss = F.cross_entropy,
) -> dict:
    """The loss on ``(x, y)`` after a gradient step of each size, on a copy of ``model`` in its
    current mode (training mode: BN with this batch's statistics, as the optimizer sees it).

    With ``g`` the gradient of ``L(theta) = loss_fn(model(x), y)``, for each ``eta`` in
    ``step_sizes``: ``L(theta - eta * g)``. The same points lie on the normalized gradient
    direction ``theta - t * g / |g|`` at distance ``t = eta * |g|``. A step whose forward gives a
    non-finite loss, or that a bnlab BN layer refuses (non-finite batch statistics), counts as
    an infinite loss.

    Returns ``{"loss0": L(theta), "grad_norm": |g|, "loss": [L(theta - eta g) ...]}`` (floats,
    ``inf`` for diverged steps). ``model`` itself is not touched (running statistics included).
    """
    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    loss0 = loss_fn(work(x), y)
    grads = torch.autograd.grad(loss0, params)
    grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    start = [p.detach().clone() for p in params]
    losses = []
    with torch.no_grad():
        for eta in step_sizes:
            for p, p0, g in zip(params, start, grads, strict=True):
                # in float64, so a huge step overflows to inf in p instead of raising
                p.copy_(p0.double() - float(eta) * g.double())
            try:
                value = float(loss_fn(work(x), y))
            except FloatingPointError:
                value = math.inf
            losses.append(_finite_or_inf(value))
    return {"loss0": _finite_or_inf(float(loss0.detach())), "grad_norm": grad_norm, "loss": losses}


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's ``Conv2d`` layers with their qualified names, in registration order (the
    order of the forward pass in the CIFAR ResNets: layer ``i`` is the ``i``-th convolution)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def channel_stats_by_depth(model: nn.Module, x: Tensor) -> dict:
    """Per-channel mean and standard deviation (over batch and positions) of every convolution's
    output for the input batch ``x``, in the model's current mode, on a copy (running statistics
    untouched). Returns ``{"layers": [names], "mean_abs": [mean over channels of |channel mean|],
    "std": [mean over channels of the channel std]}``, one entry per convolution in order."""
    work = copy.deepcopy(model)
    convs = conv_layers(work)
    with record_channel_stats(dict(convs)) as got:
        work(x)
    names = [n for n, _ in convs]
    return {
        "layers": names,
        "mean_abs": [float(got[n][0].abs().mean()) for n in names],
        "std": [float(got[n][1].mean()) for n in names],
    }


def mean_pairwise_cosine(rows: Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of ``rows`` (``(n, d)``), in
    float64. Rows of zero norm are left out; NaN when fewer than two rows remain."""
    z = rows.detach().double().flatten(1)
    norms = z.norm(dim=1)
    z = z[norms > 0] / norms[norms > 0, None]
    n = z.shape[0]
    if n < 2:
        return math.nan
    total = z.sum(0)
    # sum over i != j of <z_i, z_j> = |sum_i z_i|^2 - sum_i |z_i|^2, and |z_i| = 1
    return float((total @ total - n) / (n * (n - 1)))


def kernel_gradient_similarity(conv: nn.Conv2d, x_in: Tensor, grad_out: Tensor,
                               top_fraction: float = 0.05) -> dict:
    """How the kernel gradient of ``conv`` splits over examples, positions and channels, from its
    input ``x_in`` ``(N, Cin, H, W)`` and the loss gradient ``grad_out`` ``(N, Cout, H', W')``
    with respect to its output.

    The weight gradient is ``dW = sum_{n, p} dy[n, :, p] (x) patch[n, :, p]`` over examples
    ``n`` and output positions ``p``. Returns:

    * ``example_cosine``: mean pairwise cosine similarity of the per-example gradients
      ``sum_p dy[n, :, p] (x) patch[n, :, p]``;
    * ``position_cosine``: the same for the per-position gradients ``sum_n ...``;
    * ``top_pair_share``: the share of ``|dW|^2`` carried by the ``top_fraction`` of
      (output, input) channel pairs with the largest gradient norm (``top_fraction`` of an even
      spread would carry that fraction);
    * ``out_channel_ratio`` / ``in_channel_ratio``: largest over median gradient norm of the
      output / input channels;
    * ``weight_grad``: ``dW`` itself (for checking against autograd; not JSON).
    """
    if conv.groups != 1:
        raise ValueError("kernel_gradient_similarity: grouped convolutions are not supported")
    x = x_in.detach().double()
    dy = grad_out.detach().double().flatten(2)  # (N, Cout, P)
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    # (N, Cin*kh*kw, P)
    per_example = torch.einsum("nop,nkp->nok", dy, patches)  # (N, Cout, Cin*kh*kw)
    per_position = torch.einsum("nop,nkp->pok", dy, patches)  # (P, Cout, Cin*kh*kw)
    dw = per_example.sum(0)
    cout, cin = conv.out_channels, conv.in_channels
    pair = dw.view(cout, cin, -1).pow(2).sum(-1)  # (Cout, Cin) squared norms
    k = max(1, round(top_fraction * pair.numel()))
    total = float(pair.sum())
    top = float(pair.flatten().topk(k).values.sum())
    out_norm, in_norm = pair.sum(1).sqrt(), pair.sum(0).sqrt()
    return {
        "example_cosine": mean_pairwise_cosine(per_example),
        "position_cosine": mean_pairwise_cosine(per_position),
        "top_pair_share": top / total if total > 0 else math.nan,
        "top_fraction": top_fraction,
        "out_channel_ratio": float(out_norm.max() / out_norm.median()),
        "in_channel_ratio": float(in_norm.max() / in_norm.median()),
        "weight_grad": dw.view_as(conv.weight),
    }


def class_bias(logits: Tensor, num_classes: int | None = None) -> dict:
    """Predicted classes of a batch of logits ``(N, K)``: ``counts`` per class, the most common
    class ``top_class`` and ``top_fraction``, the share of the batch predicted as it."""
    k = num_classes or logits.shape[1]
    counts = torch.bincount(logits.detach().argmax(1), minlength=k)
    top = int(counts.argmax())
    return {"counts": counts.tolist(), "top_class": top,
            "top_fraction": float(counts[top]) / max(1, logits.shape[0])}


def histogram(values: Tensor, bins: int = 81) -> dict:
    """A histogram of ``values`` on bins symmetric about 0 spanning the largest magnitude:
    ``{"edges": [bins + 1], "counts": [bins]}``."""
    v = values.detach().double().flatten()
    lim = float(v.abs().max()) or 1.0
    counts = torch.histc(v, bins=bins, min=-lim, max=lim)
    edges = torch.linspace(-lim, lim, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


def gradient_snapshot(model: nn.Module, x: Tensor, y: Tensor, layer: str,
                      loss_fn: Loss = F.cross_entropy) -> dict:
    """One forward/backward of a copy of ``model`` (its current mode) on ``(x, y)`` with the mean
    loss, as one training step would compute it. ``layer`` names a ``Conv2d`` of the model.

    Returns: ``loss``; ``weight_grad`` statistics of ``layer`` (``std``, ``max_abs``, ``p99_9``
    the 99.9th percentile of ``|g|``, ``excess_kurtosis``, ``histogram``); ``output_grad`` the
    ``(N, K)`` gradient of the *summed* loss with respect to the logits (``N`` times that of the
    mean; for cross-entropy ``softmax - onehot``), its ``output_grad_cosine`` (mean pairwise
    cosine over examples); ``bias`` (:func:`class_bias` of the logits); ``kernel``
    (:func:`kernel_gradient_similarity` of ``layer``, without the tensor); ``layer`` and its
    index among the convolutions.
    """
    work = copy.deepcopy(model)
    convs = conv_layers(work)
    names = [n for n, _ in convs]
    if layer not in names:
        raise ValueError(f"gradient_snapshot: no Conv2d named {layer!r} in the model")
    conv = dict(convs)[layer]
    head = [m for m in work.modules() if isinstance(m, nn.Linear)]
    if not head:
        raise ValueError("gradient_snapshot: the model has no nn.Linear output layer")
    work.zero_grad(set_to_none=True)
    with record_inputs({"conv": conv}) as inputs, \
            record_output_grads({"conv": conv, "logits": head[-1]}) as grads:
        logits = work(x)
        loss = loss_fn(logits, y)
        loss.backward()
    g = conv.weight.grad.detach().double().flatten()
    kernel = kernel_gradient_similarity(conv, inputs["conv"], grads["conv"])
    kernel.pop("weight_grad")
    out_grad = grads["logits"].double() * x.shape[0]
    return {
        "layer": layer,
        "layer_index": names.index(layer) + 1,
        "loss": _finite_or_inf(float(loss.detach())),
        "weight_grad": {
            "std": float(g.std(correction=0)),
            "max_abs": float(g.abs().max()),
            "p99_9": float(torch.quantile(g.abs(), 0.999)),
            "excess_kurtosis": excess_kurtosis(g),
            "histogram": histogram(g),
            "count": g.numel(),
        },
        "output_grad": out_grad.tolist(),
        "output_grad_cosine": mean_pairwise_cosine(out_grad),
        "bias": class_bias(logits),
        "labels": y.tolist(),
        "kernel": kernel,
    }


def product_singular_values(n: int, factors: int, seed: int = 0) -> Tensor:
    """Singular values (descending, float64) of ``W_factors ... W_1`` with independent ``n x n``
    matrices of i.i.d. N(0, 1/n) entries (the variance that keeps ``E|Wx|^2 = |x|^2``, as the
    standard initializations do)."""
    if n < 1 or factors < 1:
        raise ValueError(f"product_singular_values: need n, factors >= 1, got {n}, {factors}")
    g = torch.Generator().manual_seed(seed)
    p = torch.eye(n, dtype=torch.float64)
    for _ in range(factors):
        p = (torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)) @ p
    return torch.linalg.svdvals(p)


def fuss_catalan_edge(factors: int) -> float:
    """The largest singular value of a product of ``factors`` square N(0, 1/n) matrices as
    n -> infinity: sqrt((k+1)^(k+1) / k^k) (the edge of the Fuss-Catalan law of the squared
    singular values; 2 for one matrix, the Marchenko-Pastur edge)."""
    k = factors
    return math.sqrt((k + 1) ** (k + 1) / k**k)


def spectrum_skew(s: Tensor) -> dict:
    """How uneven a spectrum is: ``max``, ``median``, ``max_over_median``, ``below_tenth`` (share
    of singular values below a tenth of the largest), ``top10_share`` (share of ``sum s^2``, the
    squared Frobenius norm, carried by the largest 10% of the singular values)."""
    s = s.detach().double().flatten().sort(descending=True).values
    energy = s * s
    k = max(1, round(0.1 * s.numel()))
    return {
        "max": float(s[0]),
        "median": float(s.median()),
        "max_over_median": float(s[0] / s.median()),
        "below_tenth": float((s < 0.1 * s[0]).double().mean()),
        "top10_share": float(energy[:k].sum() / energy.sum()),
        "mean_square": float(energy.mean()),
    }
