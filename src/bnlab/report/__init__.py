"""Figures and reports, built from a run directory's files only (no retraining)."""

from .report import build_report

__all__ = ["build_report"]
