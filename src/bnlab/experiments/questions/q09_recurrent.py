"""Question 9: what must change for recurrent networks?

A recurrent network applies the same weights at every time step, but its activations' statistics
change with the step (the state starts at zero and settles). Ioffe & Szegedy (2015, section 5)
left recurrent networks to future work. Cooijmans et al. (2016), "Recurrent Batch
Normalization", section 3: "simply averaging statistics over time severely degrades
performance"; they keep separate statistics per time step, and beyond the longest training
sequence reuse those of its last step, "straightforward thanks to the rapid convergence of the
activations to their steady-state distributions"; section 4: initialize gamma to 0.1 for tanh
units. Layer normalization (Ba et al. 2016) normalizes over the units of one example instead, so
it needs no statistics per step at all.

Run: a tanh recurrent network reading an image one row per step (28 steps of 28 pixels),
``h_t = tanh(N(W_x x_t + W_h h_{t-1}))``, classifying from the last state, with ``N``:

* **none** (a bias instead);
* **BN shared**: one bnlab ``BatchNorm1d`` used at every step (each step's batch statistics in
  training, but one set of running averages that mixes all steps);
* **BN per step**: :class:`bnlab.StepBatchNorm1d`, statistics per time step;
* **LayerNorm**: ``torch.nn.LayerNorm`` over the hidden units.

Then test accuracy in inference mode on the test images, and on longer sequences: the same image
after 7 to 56 blank rows (up to 84 steps; the digit arrives later). Every step's statistics of
BN per step then meet other content than in training, and steps beyond 28 reuse step 28's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...layers import BatchNorm1d, StepBatchNorm1d
from ...report import plots
from ...report.content import Claim, Figure, Table
from ...train import evaluate
from ._common import WITHIN_SPREAD, Answer, Context, Question, View, pct, seed_mean
from ._common import separated as _separated

NAME = "recurrent"
TITLE = "What must change for recurrent networks?"

HIDDEN = 64
ROWS = 28
LR = 2e-3
CLIP = 1.0
BATCH = 64
STEPS = 1500
GAMMA_INIT = 0.1
TEST_BLANK = (0, 7, 14, 28, 56)  # blank rows before the image at test (0: as in training)
VARIANTS = ("none", "BN shared", "BN per step", "LayerNorm")


class RowRNN(nn.Module):
    """Reads ``(N, 1, T, 28)`` images (or ``(N, T, 28)``) one row per step; logits from the last
    hidden state. ``norm`` is one of ``VARIANTS``."""

    def __init__(self, norm: str, hidden: int = HIDDEN, width: int = 28, steps: int = ROWS):
        super().__init__()
        if norm not in VARIANTS:
            raise ValueError(f"RowRNN: norm must be one of {VARIANTS}, got {norm!r}")
        self.norm_kind, self.width = norm, width
        self.wx = nn.Linear(width, hidden, bias=norm == "none")
        self.wh = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.wh.weight)
        self.norm: nn.Module | None = None
        if norm == "BN shared":
            self.norm = BatchNorm1d(hidden)
        elif norm == "BN per step":
            self.norm = StepBatchNorm1d(hidden, steps, gamma_init=GAMMA_INIT)
        elif norm == "LayerNorm":
            self.norm = nn.LayerNorm(hidden)
        if self.norm is not None and norm != "BN per step":
            with torch.no_grad():
                self.norm.weight.fill_(GAMMA_INIT)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.reshape(x.shape[0], -1, self.width)  # (N, T, 28)
        h = seq.new_zeros(seq.shape[0], self.wh.in_features)
        for t in range(seq.shape[1]):
            pre = self.wx(seq[:, t]) + self.wh(h)
            if self.norm_kind == "BN per step":
                pre = self.norm(pre, t)
            elif self.norm is not None:
                pre = self.norm(pre)
            h = torch.tanh(pre)
        return self.out(h)


class ClippedAdam(torch.optim.Adam):
    """Adam after clipping the gradients' global norm to ``clip`` (the usual guard for
    recurrent networks; Cooijmans et al. clip at 1)."""

    def __init__(self, params, lr: float, clip: float) -> None:
        super().__init__(params, lr=lr)
        self.clip = clip

    def step(self, closure=None):  # type: ignore[override]
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.clip)
        return super().step(closure)


def delayed(x: Tensor, blank: int) -> Tensor:
    """``(N, 1, 28, W)`` images after ``blank`` blank rows: ``(N, 1, blank + 28, W)``."""
    if blank == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], 1, blank, x.shape[-1]), x], dim=2)


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 100) -> float:
    """Accuracy with batch statistics (training mode) on batches of ``batch``, on a copy."""
    import copy

    net = copy.deepcopy(model).train()
    correct = n = 0
    for i in range(0, len(y) - batch + 1, batch):
        correct += int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
        n += batch
    return correct / n


def run(ctx: Context) -> None:
    steps = ctx.steps(STEPS)
    xt, yt = ctx.images_test, ctx.y_test
    for variant in VARIANTS:
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            model = RowRNN(variant)
            opt = ClippedAdam(model.parameters(), lr=LR, clip=CLIP)
            ctx.fit(model, opt, variant, seed, steps=steps, batch_size=BATCH,
                    train=(ctx.images_train, ctx.y_train), test=(xt, yt), evals=6)
            rows = [{"variant": variant, "seed": seed, "blank_rows": k,
                     "acc": evaluate(model, delayed(xt, k), yt)["acc"]} for k in TEST_BLANK]
            ctx.log("length", rows)
            if variant.startswith("BN"):
                ctx.log("train-mode", {"variant": variant, "seed": seed,
                                       "acc": train_mode_accuracy(model, xt, yt)})
            if variant == "BN per step":
                stats = [{"t": t, "mean_abs": float(layer.running_mean.abs().mean()),
                          "var": float(layer.running_var.mean())}
                         for t, layer in enumerate(model.norm.steps)]
                ctx.log("step-stats", {"seed": seed, "stats": stats})


COLORS = {"none": "#7f7f7f", "BN shared": "#ff7f0e", "BN per step": "#1f77b4",
          "LayerNorm": "#2ca02c"}


def _length(view: View, variant: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in view.kind("length", variant=variant):
        out.setdefault(r["blank_rows"], []).append(r["acc"])
    return out


def report(view: View) -> Answer:
    fname = view.figure()
    variants = [v for v in VARIANTS if v in view.variants()]
    with plots.style():
        fig, axes = plots.figure(3, height=4.0)
        for v in variants:
            steps, vals = view.curve(v, "test_acc")
            if steps:
                plots.band(axes[0], steps, vals, COLORS[v], v)
            acc = _length(view, v)
            ks = sorted(acc)
            plots.band(axes[1], [ROWS + k for k in ks], [acc[k] for k in ks], COLORS[v], v,
                       marker="o", ms=4)
        axes[0].set_xlabel("Adam step")
        axes[0].set_ylabel("test accuracy (inference)")
        axes[0].set_title(f"(a) training, {ROWS} steps")
        axes[0].set_ylim(0, 1)
        axes[1].set_xlabel("sequence length at test (blank rows, then the 28 image rows)")
        axes[1].set_ylabel("test accuracy")
        axes[1].set_title("(b) longer sequences than in training")
        axes[1].set_ylim(0, 1)
        axes[1].legend(fontsize=9, loc="upper right")
        stats = view.kind("step-stats")
        for r in stats:
            ts = [s["t"] for s in r["stats"]]
            axes[2].plot(ts, [s["var"] for s in r["stats"]], "-", color="#1f77b4", lw=1.5,
                         label="mean running variance" if r is stats[0] else None)
            axes[2].plot(ts, [s["mean_abs"] for s in r["stats"]], "--", color="#1f77b4",
                         lw=1.5, label="mean |running mean|" if r is stats[0] else None)
        axes[2].set_xlabel("time step (row)")
        axes[2].set_title("(c) BN per step: statistics by step")
        axes[2].set_yscale("log")
        top = max((s["var"] for r in stats for s in r["stats"]), default=1.0)
        axes[2].set_ylim(bottom=1e-4 * top)  # blank first rows: (near) zero variance
        axes[2].legend(fontsize=9)
        plots.save(fig, view.path / fname)
    acc0 = {v: _length(view, v).get(0, []) for v in variants}
    long_k = max(TEST_BLANK)
    claims = []
    if "BN shared" in acc0 and "BN per step" in acc0:
        verdict = _separated(acc0["BN per step"], acc0["BN shared"], lower=False)
        claims.append(Claim.check(
            "9a", "statistics averaged over time steps hurt at inference: the network with BN "
            "shared across steps is less accurate (inference mode) than with BN per step",
            f"per step {pct(seed_mean(acc0['BN per step']), 1)}, shared "
            f"{pct(seed_mean(acc0['BN shared']), 1)}",
            verdict, not_assessed=view.short_note or ("" if verdict is not None
                                                      else WITHIN_SPREAD),
            paper="Cooijmans et al. 2016, section 3",
        ))
    if "BN per step" in acc0 and "LayerNorm" in acc0:
        def drop(v):
            acc = _length(view, v)
            return [a - b for a, b in zip(acc.get(0, []), acc.get(long_k, []), strict=False)]
        d_bn, d_ln = drop("BN per step"), drop("LayerNorm")
        verdict = _separated_or_equal(d_bn, d_ln)
        claims.append(Claim.check(
            "9b", f"BN per step, with statistics tied to the time step (step {ROWS}'s reused "
            f"beyond it), handles longer sequences as well as LayerNorm: from {ROWS} to "
            f"{ROWS + long_k} steps it loses no more accuracy",
            f"drop BN per step {pct(seed_mean(d_bn), 1)}, LayerNorm {pct(seed_mean(d_ln), 1)}",
            verdict, not_assessed=view.short_note or ("" if verdict is not None
                                                      else WITHIN_SPREAD),
            paper="Cooijmans et al. 2016, section 3 (for steady-state continuations)",
        ))
    shared_train = [r["acc"] for r in view.kind("train-mode", variant="BN shared")]
    rows = []
    for v in variants:
        acc = _length(view, v)
        rows.append([v] + [pct(seed_mean(acc.get(k, [])), 1) for k in TEST_BLANK])
    table = Table("Test accuracy against the sequence length (seed means)",
                  ["normalization", *[f"{ROWS + k} steps" + (" (as trained)" if k == 0 else "")
                                      for k in TEST_BLANK]],
                  rows, f"Training sequences: the {ROWS} image rows; longer test sequences start "
                  f"with blank rows. BN per step uses step {ROWS}'s statistics for later steps.")
    best = (max(variants, key=lambda v: seed_mean(acc0[v])).replace("none", "no normalization")
            if variants else "n/a")
    verdicts = {c.id: c.verdict for c in claims}
    lead = ("With BN in a recurrent network, keep its statistics per time step: "
            if verdicts.get("9a") == "holds" else "Measured: ")
    answer = (
        f"{lead}in inference mode BN shared across steps reached "
        f"{pct(seed_mean(acc0.get('BN shared', [])), 1)}, BN per step "
        f"{pct(seed_mean(acc0.get('BN per step', [])), 1)}, LayerNorm "
        f"{pct(seed_mean(acc0.get('LayerNorm', [])), 1)}, no normalization "
        f"{pct(seed_mean(acc0.get('none', [])), 1)}; with the digit after {long_k} blank rows "
        f"({ROWS + long_k} steps): "
        + ", ".join(f"{v} {pct(seed_mean(_length(view, v).get(long_k, [])), 1)}"
                    for v in variants) + "."
        + (f" The best network at the training length had {best}." if variants else "")
    )
    text = [
        f"**What was run.** A tanh recurrent network with {HIDDEN} units reading the image one "
        "row per step, classifying from the last state, h_t = tanh(N(W_x x_t + W_h h_t-1)) "
        "with N: none (a bias instead), one BN shared by all steps (each step's batch "
        "statistics in training, one running average over all steps), BN per step "
        "(`bnlab.StepBatchNorm1d`: statistics and running averages per step), or LayerNorm; "
        f"gamma initialized to {GAMMA_INIT} (Cooijmans et al., section 4), recurrent weights "
        f"orthogonal; Adam (lr {LR}, gradient norm clipped at {CLIP}), batch {BATCH}.",
        f"**Answer.** {answer} The shared layer trains with each step's own batch statistics "
        "but keeps one running average over all steps, so inference normalizes every step with "
        "statistics that belong to none of them"
        + (f" (the same shared network with batch statistics at test: "
           f"{pct(seed_mean(shared_train), 1)})" if shared_train else "")
        + ". Panel (c) shows why statistics must follow the step: they change from step to step "
        "with the rows being read. The same tie to the step is the problem with longer "
        "sequences: when the digit arrives later, every step's statistics describe what that "
        "step held in training, not what it holds now; LayerNorm, computed per example, has no "
        "such tie. Cooijmans et al. reuse the last step's statistics beyond the training "
        "length, which suits a sequence that continues in a steady state, not one whose "
        "content moves.",
        "**See also.** Layer and group normalization against batch size: `bnlab run "
        "batch-size` (docs/small-batches.md).",
    ]
    fig = Figure(fname, "Row-by-row recurrent network: four normalizations (band: min-max over "
                 "seeds)",
                 "Look at (a) for the shared BN's inference accuracy, at (b) for what happens "
                 "when the digit arrives later than in training, and at (c) for the per-step "
                 "statistics changing with the step.")
    return Answer(answer, figures=[fig], text=text, tables=[table], claims=claims)


def _separated_or_equal(d_bn: list[float], d_ln: list[float]) -> bool | None:
    """'No more loss than LayerNorm': holds when every seed of BN per step lost at most what the
    worst LayerNorm seed lost, fails when every seed lost more than the best, else None."""
    if not d_bn or not d_ln:
        return None
    if max(d_bn) <= max(d_ln):
        return True
    if min(d_bn) > max(d_ln):
        return False
    return None


QUESTION = Question(9, NAME, TITLE, run, report)
