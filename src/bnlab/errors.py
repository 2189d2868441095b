"""Exceptions bnlab's layers raise for inputs torch's layers also refuse, each of bnlab's own
class and of the class torch raises for the same input, so that code written against torch's
layers (``except RuntimeError:`` around a probing call, say) catches them the same."""

from __future__ import annotations

__all__ = [
    "BatchedUpdateError",
    "ChannelCountError",
    "InputDtypeError",
    "InputLayoutError",
    "MixedDtypeError",
    "NotATensorError",
]


class BatchedUpdateError(ValueError, RuntimeError):
    """A running-statistics update from per-sample statistics under ``torch.vmap`` (torch:
    RuntimeError)."""


class ChannelCountError(ValueError, RuntimeError):
    """An input whose channel count is not the layer's (torch: RuntimeError)."""


class InputDtypeError(TypeError, NotImplementedError):
    """An input of a dtype batch norm is not implemented for: not floating point, or a float8
    (torch: NotImplementedError, a RuntimeError)."""


class InputLayoutError(TypeError, NotImplementedError):
    """A sparse or nested input (torch: NotImplementedError, or a RuntimeError for sparse
    compressed layouts)."""


class MixedDtypeError(TypeError, RuntimeError):
    """Parameters or running statistics of a dtype the input cannot be used with (torch:
    RuntimeError)."""


class NotATensorError(TypeError, AttributeError):
    """An input that is not a tensor (torch: AttributeError, from reading its rank)."""
