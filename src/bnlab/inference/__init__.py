"""Batch Normalization at inference: population statistics, folding, freezing, diagnosis.

Ioffe & Szegedy (2015), section 3.1 and Algorithm 2. After training, the mini-batch statistics of
Algorithm 1 are replaced by population statistics, and the transform becomes a fixed per-channel
linear map::

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma * E[x] / sqrt(Var[x] + eps))

One module per subject:

* :mod:`.population` - :func:`recompute_population_stats` ("precise BN"): re-estimate
  ``running_mean``/``running_var`` of every BatchNorm layer by a true, element-count-weighted
  average over given batches, instead of the exponential moving average kept during training.
* :mod:`.fold` - :func:`fold`: an inference copy of a model with each BN folded into the preceding
  ``Linear``/``Conv``/``ConvTranspose`` (or turned into a :class:`ChannelAffine`).
* :mod:`.freeze` - :func:`freeze` / :func:`unfreeze`: BN layers that use population statistics and
  stop updating, whatever ``model.train()``/``model.eval()`` says.
* :mod:`.diagnose` - :func:`diagnose`: the train/eval gap per layer, statistics of given data
  against the stored ones (:class:`LayerDiagnosis`).
* ``_common`` (private) - finding BN layers, iterating over batches, exact float64 moments.

Both bnlab layers and ``torch.nn.BatchNorm1d/2d/3d`` are handled by the statistics, folding and
diagnosis functions; freezing needs bnlab layers (``bnlab.convert(model)``).
"""

from .diagnose import LayerDiagnosis, diagnose
from .fold import ChannelAffine, fold
from .freeze import freeze, unfreeze
from .population import recompute_population_stats

__all__ = [
    "ChannelAffine",
    "LayerDiagnosis",
    "diagnose",
    "fold",
    "freeze",
    "recompute_population_stats",
    "unfreeze",
]
