"""Experiments: one module per paper figure or table; each module's docstring states its claim.

Each module provides ``NAME``, ``DESCRIPTION``, a config dataclass, ``run(config, out_dir)``,
``QUICK`` (overrides for a smoke run), and the analysis its report needs.
"""

from __future__ import annotations

from types import ModuleType

from . import mnist

EXPERIMENTS: dict[str, ModuleType] = {mnist.NAME: mnist}

__all__ = ["EXPERIMENTS", "get_experiment"]


def get_experiment(name: str) -> ModuleType:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(
            f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}"
        ) from None
