"""Figures and reports, built from a run directory's files only (no retraining)."""

from .content import Claim, Figure, Section, Summary, Table
from .report import build_report, write_report

__all__ = ["Claim", "Figure", "Section", "Summary", "Table", "build_report", "write_report"]
