"""bnlab's layers in ``torch.ao.quantization.fuse_modules`` (and ``fuse_modules_qat``).

torch's fuser looks its methods up by the exact types of the modules it is given
(``(nn.Conv2d, nn.BatchNorm2d)``, ...), so a subclass such as ``bnlab.BatchNorm2d`` finds none.
:func:`fuser_methods` gives, for every torch entry with a BatchNorm in it, the same entry with
bnlab's class, and :func:`register` adds them to torch's default table (done on
``import bnlab``), so ``fuse_modules(model, [["conv", "bn", "relu"]])`` works unchanged; pass
``fuse_custom_config_dict={"additional_fuser_method_mapping": bnlab.fusers.fuser_methods()}``
to keep torch's table untouched instead.

Each method hands torch's own fuser a torch BatchNorm that shares bnlab's parameters and
buffers, so the folding arithmetic (``torch.nn.utils.fusion``) and the QAT modules
(``torch.ao.nn.intrinsic``) are torch's. A bnlab layer with ``activation="relu"`` is fused
*with* its ReLU (``relu(relu(z)) = relu(z)``, so an explicit ``nn.ReLU`` after it may be fused
too); where torch has no fused module for that pattern the result is the fused layer followed by
``nn.ReLU``, and the QAT patterns it has no module for raise. A frozen layer (``bnlab.freeze``)
fuses for inference (it normalizes with its population statistics, exactly what folding
uses) but not for QAT, whose modules would train its statistics again.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .convert import _swap
from .layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["fuser_methods", "register"]

_TORCH_OF = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}
_BNLAB_OF = {v: k for k, v in _TORCH_OF.items()}


def _torch_bn(bn: _BatchNorm, is_qat: bool) -> nn.Module:
    """torch's BatchNorm of bn's class sharing its parameters and buffers (mode kept)."""
    if is_qat and bn.frozen:
        raise ValueError(
            f"fuse_modules_qat: {bn._describe()} is frozen (bnlab.freeze); the QAT modules would "
            "train its statistics again. Unfreeze it, or fuse it for inference (fuse_modules)"
        )
    return _swap(bn, _TORCH_OF[type(bn)])


def _wrap(torch_method: Callable, key: tuple) -> Callable:
    """A fuser method for ``key`` (module types with a bnlab layer in place of torch's
    BatchNorm) that calls torch's ``torch_method``."""
    ends_in_relu = key[-1] is nn.ReLU

    def method(is_qat: bool, *mods: nn.Module) -> nn.Module:
        bn = next(m for m in mods if isinstance(m, _BatchNorm))
        fused = [_torch_bn(m, is_qat) if isinstance(m, _BatchNorm) else m for m in mods]
        if bn.activation is None or ends_in_relu:  # relu(relu(z)) = relu(z)
            return torch_method(is_qat, *fused)
        from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

        with_relu = tuple(_TORCH_OF.get(t, t) for t in key) + (nn.ReLU,)
        relu = nn.ReLU()
        relu.train(bn.training)
        relu_method = _DEFAULT_OP_LIST_TO_FUSER_METHOD.get(with_relu)
        if relu_method is not None:
            return relu_method(is_qat, *fused, relu)
        if is_qat:
            raise NotImplementedError(
                "fuse_modules_qat: torch has no QAT module for "
                f"{' + '.join(t.__name__ for t in with_relu)} ({bn._describe()} has "
                "activation='relu')"
            )
        return nn.Sequential(torch_method(is_qat, *fused), relu)

    return method


def fuser_methods() -> dict[tuple, Callable]:
    """{module types: fuser method} for every entry of torch's default fuser table that has a
    BatchNorm, with bnlab's class in its place."""
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

    out: dict[tuple, Callable] = {}
    for key, method in list(_DEFAULT_OP_LIST_TO_FUSER_METHOD.items()):
        if not any(t in _BNLAB_OF for t in key):
            continue
        ours = tuple(_BNLAB_OF.get(t, t) for t in key)
        out[ours] = _wrap(method, ours)
    return out


def register() -> None:
    """Add :func:`fuser_methods` to torch's default fuser table (only keys with bnlab classes)."""
    try:
        from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD
    except ImportError:  # a torch without the table: fuse_modules then refuses bnlab layers
        return
    for key, method in fuser_methods().items():
        _DEFAULT_OP_LIST_TO_FUSER_METHOD.setdefault(key, method)
