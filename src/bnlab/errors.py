"""Exceptions bnlab's layers raise for inputs torch's layers also refuse, each of bnlab's own
class and of the class torch raises for the same input, so that code written against torch's
layers (``except RuntimeError:`` around a probing call, say) catches them the same."""

from __future__ import annotations

__all__ = [
    "BatchedUpdateError",
    "ChannelCountError",
    "InputDtypeError",
    "MixedDtypeError",
    "NotATensorError",
]


class BatchedUpdateError(ValueError, RuntimeError):
    """A running-statistics update from per-sample statistics under ``torch.vmap`` (torch:
    RuntimeError)."""


class ChannelCountError(ValueError, RuntimeError):
    """An input whose channel count is not the layer's (torch: RuntimeError)."""


class InputDtypeError(TypeError, NotImplementedError):
    """A non-floating-point input (torch: NotImplementedError, a RuntimeError)."""


class MixedDtypeError(TypeError, RuntimeError):
    """Parameters or running statistics of a dtype the input cannot be used with (torch:
    RuntimeError)."""


class NotATensorError(TypeError, AttributeError):
    """An input that is not a tensor (torch: AttributeError, from reading its rank)."""
