"""Question 8: what happens under distribution shift at test time (distorted images)?

At inference BN normalizes with population statistics of the *training* data (section 3.1 of
Ioffe & Szegedy 2015). When the test images are distorted, the activations' statistics move and
the population statistics no longer standardize them. Section 5 of the paper suggests that BN
might help domain adaptation "with just a recomputation of the population means and variances
(Alg. 2)" on the new data. Run: a small convolutional network trained on clean images, tested
on the same test images distorted three ways at five strengths:

* **noise**: additive Gaussian noise (clipped to [0, 1]);
* **blur**: a Gaussian blur;
* **contrast**: the image pulled towards its mean grey level;

with four ways of normalizing at test time: the population statistics from training (the
default), **test-batch statistics** (each batch of ``TEST_BATCH`` distorted test images
normalized by its own statistics, as in training), the population statistics **recomputed** on
all distorted test images (Algorithm 2 on the new data, without labels), and the same network
without BN for reference.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...inference import recompute_population_stats
from ...layers import BatchNorm2d
from ...report import plots
from ...report.content import Claim, Figure, Table
from ...train import evaluate
from ._common import WITHIN_SPREAD, Answer, Context, Question, View, pct, seed_mean
from ._common import separated as _separated

NAME = "shift"
TITLE = "What happens under distribution shift at test time (distorted images)?"

LR = 0.05
MOMENTUM = 0.9
BATCH = 64
STEPS = 1500
TEST_BATCH = 100
CORRUPTIONS = {
    "noise": (0.1, 0.2, 0.3, 0.4, 0.5),       # std of the added noise
    "blur": (0.6, 0.9, 1.2, 1.6, 2.0),        # std of the Gaussian kernel, pixels
    "contrast": (0.7, 0.5, 0.35, 0.25, 0.15),  # remaining contrast
}
METHODS = ("population (training)", "test-batch statistics", "recomputed on shifted data",
           "no BN")


def small_cnn(norm: bool) -> nn.Sequential:
    """conv3x3/2(16)-[BN]-ReLU-conv3x3/2(32)-[BN]-ReLU-linear: 1x28x28 -> 10 (strided
    convolutions instead of pooling: the same 28 -> 14 -> 7 maps at a fraction of the cost on
    a CPU)."""
    def block(cin, cout):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=not norm)]
        if norm:
            layers.append(BatchNorm2d(cout))
        return layers + [nn.ReLU()]
    return nn.Sequential(*block(1, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def corrupt(x: Tensor, kind: str, level: float, seed: int = 0) -> Tensor:
    """``x`` ``(N, 1, H, W)`` in [0, 1] distorted by ``kind`` at strength ``level`` (see the
    module docstring); seeded noise; the result stays in [0, 1]."""
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return (x + level * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)
    if kind == "blur":
        r = max(1, math.ceil(3 * level))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-t**2 / (2 * level**2))
        k = k / k.sum()
        out = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    if kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + level * (x - mean)).clamp(0.0, 1.0)
    raise ValueError(f"corrupt: unknown kind {kind!r}; known: {', '.join(CORRUPTIONS)}")


@torch.no_grad()
def test_batch_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """Accuracy with every batch of ``batch`` images normalized by its own statistics (a copy of
    the model in training mode; the model's own statistics are untouched)."""
    net = copy.deepcopy(model).train()
    correct = n = 0
    for i in range(0, len(y) - batch + 1, batch):
        correct += int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
        n += batch
    return correct / n


def run(ctx: Context) -> None:
    steps = ctx.steps(STEPS)
    xt, yt = ctx.images_test, ctx.y_test
    pick = (0, 2, 4) if ctx.smoke else range(5)  # a smoke run: fewer strengths
    for seed in ctx.seeds:
        nets = {}
        for norm in (True, False):
            torch.manual_seed(seed)
            model = small_cnn(norm)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            ctx.fit(model, opt, "bn" if norm else "no BN", seed, steps=steps, batch_size=BATCH,
                    train=(ctx.images_train, ctx.y_train), test=(xt, yt), evals=5)
            nets[norm] = model
        rows = []
        xe, ye = xt, yt
        for kind, levels in CORRUPTIONS.items():
            for severity, level in enumerate((None, *levels)):
                if severity and severity - 1 not in pick:
                    continue
                xc = xe if level is None else corrupt(xe, kind, level, seed=seed)
                adapted = copy.deepcopy(nets[True])
                recompute_population_stats(adapted, xc.split(TEST_BATCH), mode="eval")
                acc = {
                    "population (training)": evaluate(nets[True], xc, ye)["acc"],
                    "test-batch statistics": test_batch_accuracy(nets[True], xc, ye,
                                                                 TEST_BATCH),
                    "recomputed on shifted data": evaluate(adapted, xc, ye)["acc"],
                    "no BN": evaluate(nets[False], xc, ye)["acc"],
                }
                rows += [{"seed": seed, "corruption": kind, "severity": severity,
                          "level": level, "method": m, "acc": a} for m, a in acc.items()]
        ctx.log("shift", rows)


COLORS = {"population (training)": "#1f77b4", "test-batch statistics": "#2ca02c",
          "recomputed on shifted data": "#9467bd", "no BN": "#d62728"}


def _acc(view: View, kind: str, method: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in view.kind("shift", corruption=kind, method=method):
        out.setdefault(r["severity"], []).append(r["acc"])
    return out


def report(view: View) -> Answer:
    fname = view.figure()
    kinds = [k for k in CORRUPTIONS if view.kind("shift", corruption=k)]
    with plots.style():
        fig, axes = plots.figure(len(kinds), height=4.0, sharey=True)
        for ax, kind in zip(axes, kinds, strict=True):
            for method in METHODS:
                acc = _acc(view, kind, method)
                sev = sorted(acc)
                plots.band(ax, sev, [acc[s] for s in sev], COLORS[method], method, marker="o",
                           ms=4)
            ax.set_xticks(range(len(CORRUPTIONS[kind]) + 1),
                          ["clean", *(f"{v:g}" for v in CORRUPTIONS[kind])])
            ax.set_xlabel({"noise": "noise std", "blur": "blur std (pixels)",
                           "contrast": "contrast kept"}[kind])
            ax.set_title(kind)
        axes[0].set_ylabel("test accuracy")
        axes[0].legend(loc="lower left", fontsize=9)
        plots.save(fig, view.path / fname)
    claims, rows, parts = [], [], []
    for i, kind in enumerate(kinds):
        pop = _acc(view, kind, "population (training)")
        tb = _acc(view, kind, "test-batch statistics")
        top = max(pop)
        verdict = _separated(tb.get(top, []), pop.get(top, []), lower=False)
        claims.append(Claim.check(
            f"8{'abc'[i]}", f"{kind}: at the strongest distortion, normalizing with the test "
            "batch's statistics recovers accuracy lost with the training population statistics",
            f"test-batch {pct(seed_mean(tb.get(top, [])), 1)} vs population "
            f"{pct(seed_mean(pop.get(top, [])), 1)} (clean: {pct(seed_mean(pop.get(0, [])), 1)})",
            verdict, not_assessed=view.short_note or ("" if verdict is not None
                                                      else WITHIN_SPREAD),
            paper="section 5 (recomputing population statistics for new data)",
        ))
        for method in METHODS:
            acc = _acc(view, kind, method)
            rows.append([kind, method] + [pct(seed_mean(acc.get(s, [])), 1)
                                          for s in range(len(CORRUPTIONS[kind]) + 1)])
        rec = _acc(view, kind, "recomputed on shifted data")
        nobn = _acc(view, kind, "no BN")
        parts.append(f"{kind} {pct(seed_mean(pop.get(top, [])), 0)} / "
                     f"{pct(seed_mean(rec.get(top, [])), 0)} / "
                     f"{pct(seed_mean(tb.get(top, [])), 0)} / "
                     f"{pct(seed_mean(nobn.get(top, [])), 0)}")
    clean_pop = seed_mean(_acc(view, kinds[0], "population (training)").get(0, [])) if kinds \
        else float("nan")
    clean_tb = seed_mean(_acc(view, kinds[0], "test-batch statistics").get(0, [])) if kinds \
        else float("nan")
    table = Table("Test accuracy by distortion strength (seed means)",
                  ["distortion", "normalization", "clean", "1", "2", "3", "4", "5"], rows,
                  "Strengths: noise std " + ", ".join(map(str, CORRUPTIONS["noise"]))
                  + "; blur std " + ", ".join(map(str, CORRUPTIONS["blur"]))
                  + " pixels; contrast kept " + ", ".join(map(str, CORRUPTIONS["contrast"]))
                  + f". Test batches of {TEST_BATCH} images.")
    answer = (
        "With the training statistics BN's accuracy falls as the images move away from the "
        "training data; at the strongest distortions (training statistics / recomputed on the "
        "distorted images / per test batch / no BN): " + ", ".join(parts)
        + f". Test-batch statistics cost {pct(clean_pop - clean_tb, 1)} on clean images."
    )
    text = [
        "**What was run.** A small CNN (two 3x3 convolutions with stride 2, 16 and 32 maps, each "
        "followed by BN and ReLU, then a linear layer) trained on clean images (SGD lr "
        f"{LR}, momentum {MOMENTUM}, batch {BATCH}), "
        "and the same CNN without BN; then the test set, distorted three ways at five "
        "strengths, classified with the four normalizations above. Test-batch statistics need "
        f"a batch of images that share the shift ({TEST_BATCH} here); a single image cannot "
        "supply them.",
        f"**Answer.** {answer} New statistics can only undo what a per-channel shift and scale "
        "of the activations can express; a distortion changes more than that, so part of the "
        "loss remains whatever the statistics. Statistics from a batch of "
        f"{TEST_BATCH} are noisier than from all distorted images, which is what the gap "
        "between the green and purple lines shows.",
        "**See also.** Batch statistics from non-i.i.d. batches and batch renormalization: "
        "`bnlab run non-iid` (docs/small-batches.md).",
    ]
    fig = Figure(fname, "Accuracy on distorted test images with training statistics, "
                 "test-batch statistics, statistics recomputed on the distorted images, and "
                 "without BN (band: min-max over seeds)",
                 "Compare the blue line (training statistics) with the purple and green ones "
                 "(statistics of the distorted images) as the distortion grows, and with red "
                 "(no BN).")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=claims)


QUESTION = Question(8, NAME, TITLE, run, report)
