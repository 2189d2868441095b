"""Experiments: one module per paper figure or table, each registering an
:class:`~bnlab.experiments.protocol.Experiment` (name, description, config dataclass, quick
overrides, ``run``, ``report``). ``bnlab run``, ``bnlab list`` and ``bnlab report`` work from the
registry only; see :mod:`bnlab.experiments.protocol` and docs/architecture.md."""

from __future__ import annotations

from .protocol import (
    EXPERIMENTS,
    Experiment,
    execute,
    get_experiment,
    register,
    unregister,
    validate_config,
)

# The built-in experiments register themselves on import.
from . import mnist  # noqa: E402, F401  isort: skip
from . import why  # noqa: E402, F401  isort: skip
from . import questions  # noqa: E402, F401  isort: skip
from . import lr_acceleration  # noqa: E402, F401  isort: skip
from . import batch_size  # noqa: E402, F401  isort: skip
from . import non_iid  # noqa: E402, F401  isort: skip


def load_plugins() -> list[str]:
    """Import the modules named in ``$BNLAB_EXPERIMENTS`` (comma-separated), which register
    experiments of their own; returns their names. An experiment defined outside bnlab then
    runs, lists and reports through the same commands."""
    import importlib
    import os

    names = [n.strip() for n in os.environ.get("BNLAB_EXPERIMENTS", "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"BNLAB_EXPERIMENTS names {name!r}, which cannot be imported: "
                             f"{exc}") from exc
    return names

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "execute",
    "get_experiment",
    "load_plugins",
    "register",
    "unregister",
    "validate_config",
]
