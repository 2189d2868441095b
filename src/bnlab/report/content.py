r"""What a report shows, as plain data: an experiment's ``report(files)`` returns a
:class:`Summary` of :class:`Section` s holding :class:`Figure` s, text, :class:`Table` s and
:class:`Claim` s; :mod:`bnlab.report.report` renders any summary to Markdown and HTML.

Text fields may use a small inline markup, rendered in HTML and kept as is in Markdown:
``**bold**``, ``*emphasis*``, ```code```, ``[text](url)`` and backslash escapes (``\*`` is a
literal star). Values that come from a run's files (config strings, the command line, paths, a
data set's note) are put in text through :func:`literal` or :func:`code`, so that whatever they
contain is shown as it is in both renderers, never read as markup or HTML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Claim", "Figure", "Section", "Summary", "Table", "VERDICTS", "code", "literal"]

# characters with a meaning in Markdown (CommonMark + GitHub tables/strikethrough) or HTML
_MARKUP = re.compile(r"([\\`*_\[\]<>&|~#!])")


def literal(value: Any) -> str:
    """``str(value)`` on one line, with every markup character backslash-escaped: Markdown
    (CommonMark allows escaping any ASCII punctuation) and :func:`bnlab.report.report.inline_html`
    both show it exactly as it is."""
    text = " ".join(str(value).splitlines())
    return _MARKUP.sub(r"\\\1", text)


def code(value: Any) -> str:
    """``value`` as a code span (shown verbatim: Markdown interprets nothing inside one), or as
    :func:`literal` text when it holds a backtick or a line break, which would end the span."""
    text = str(value)
    if "`" in text or "\n" in text or "\r" in text or not text.strip():
        return literal(text)
    return f"`{text}`"


#: A claim holds, fails, or cannot be judged from this run (too short, a variant missing...).
VERDICTS = ("holds", "fails", "not assessed")


@dataclass
class Claim:
    """One checked statement. ``measured`` gives the numbers the verdict rests on; ``note``
    why a claim was not assessed (or another remark on the verdict); ``paper`` what the paper
    reports for it (optional)."""

    id: str
    claim: str
    measured: str
    verdict: str
    paper: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(
                f"Claim {self.id}: verdict must be one of {VERDICTS}, got {self.verdict!r}"
            )

    @classmethod
    def check(
        cls,
        id: str,
        claim: str,
        measured: str,
        holds: bool | None,
        *,
        not_assessed: str = "",
        paper: str = "",
    ) -> Claim:
        """A claim whose verdict is ``holds`` / ``fails`` from ``holds``; with ``not_assessed``
        (the reason, kept in ``note``) or ``holds=None`` it is ``not assessed``."""
        if not_assessed or holds is None:
            return cls(id, claim, measured, "not assessed", paper,
                       not_assessed or "this run cannot tell")
        return cls(id, claim, measured, "holds" if holds else "fails", paper)


@dataclass
class Table:
    """A table of strings; ``note`` is a sentence under it (sources, units, 'n/a' meaning)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Figure:
    """A PNG in the run directory (``file`` is its name there) with a title and one line on
    what to look for in it."""

    file: str
    title: str
    look_for: str = ""


@dataclass
class Section:
    """A part of the report: figures first, then text paragraphs, tables and claims."""

    heading: str
    figures: list[Figure] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


@dataclass
class Summary:
    """Everything an experiment's report says. ``headline``: the few lines printed after a run
    and shown at the top; ``caveats``: what a reader must know before trusting the numbers;
    ``setup``: lines on the data, models and training (the generic report adds config,
    versions and timing)."""

    title: str
    sections: list[Section] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)

    @property
    def claims(self) -> list[Claim]:
        return [c for s in self.sections for c in s.claims]
