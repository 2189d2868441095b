"""Run directory -> ``report.md`` and a self-contained ``report.html``, for any experiment.

:func:`build_report` reads the run's ``config.json`` to find the experiment, asks it for its
:class:`~bnlab.report.content.Summary` (built from the run's files only, figures included), and
renders it: title, caveats, headline, then each section (figures first, each with a line on what
to look for; then text, tables and claim verdicts), then the setup (config, data, versions,
threads, timing). ``bnlab report DIR`` rebuilds the same report without retraining.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from .._fileutil import atomic_write_text
from ..runs import RunFiles, load_run
from .content import Claim, Figure, Summary, Table, code, literal

__all__ = ["build_report", "write_report", "summarize_run", "render_markdown", "render_html",
           "inline_html"]

_VERDICT_STYLE = {"holds": "holds", "fails": "fails", "not assessed": "na"}


# a backslash escape (any ASCII punctuation, as in CommonMark) or a code span: both literal text
_LITERAL = re.compile(r"\\([!-/:-@\[-`{-~])|`([^`]+)`")


def inline_html(text: str) -> str:
    """Escape ``text`` for HTML and render the inline markup of
    :mod:`bnlab.report.content` (backslash escapes, code, bold, emphasis, links). Code spans and
    escaped characters are taken out first, so nothing inside them is read as markup."""
    literals: list[str] = []

    def keep(m: re.Match) -> str:
        if m.group(1) is not None:
            literals.append(html.escape(m.group(1), quote=True))
        else:
            literals.append(f"<code>{html.escape(m.group(2), quote=True)}</code>")
        return f"\x00{len(literals) - 1}\x00"

    out = _LITERAL.sub(keep, str(text).replace("\x00", ""))
    out = html.escape(out, quote=True)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", out)
    out = re.sub(
        r"\[([^\]]+)\]\(((?:https?://|\.{0,2}/|#)[^)\s]*|[\w./-]+)\)",
        lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>',
        out,
    )
    return re.sub("\x00(\\d+)\x00", lambda m: literals[int(m.group(1))], out)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    lines = [f"**{t.title}**", ""] if t.title else []
    lines.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
    lines.append("|" + "---|" * len(t.header))
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
    if t.note:
        lines += ["", f"*{t.note}*"]
    return lines + [""]


def _setup_lines(files: RunFiles) -> list[str]:
    """What every report states about how the run was made (from config.json). Every value
    comes from the file, so it goes in as :func:`literal` or :func:`code` text, and a value of
    the wrong type is shown as '?' rather than failing the report."""
    m = files.meta
    lines = []
    status = m.get("status", "?")
    steps = ""
    done, total = m.get("steps_done"), files.config.get("steps")
    if _is_int(done) and _is_int(total):
        steps = f", {done:,} of {total:,} steps"
    lines.append(
        f"Status: **{literal(status)}**{steps}; wall time {literal(m.get('wall_time_s', '?'))} s; "
        f"started {literal(m.get('started', '?'))}, ended {literal(m.get('finished', '?'))}."
    )
    if m.get("command"):
        lines.append(f"Command: {code(m['command'])}")
    # a run of worker processes records their thread count as threads_per_process
    threads = literal(m.get("threads_per_process", m.get("threads", "?")))
    procs = m.get("processes")
    versions = m.get("versions")
    versions = versions if isinstance(versions, dict) else {}
    lines.append(
        f"Machine: {literal(m.get('cpu', '?'))}; "
        + (f"{literal(procs)} process(es) x {threads} thread(s)" if procs else
           f"{threads} thread(s)")
        + "; versions "
        + ", ".join(f"{literal(k)} {literal(v)}" for k, v in versions.items())
        + "."
    )
    ds = m.get("dataset")
    if isinstance(ds, dict) and ds.get("name"):
        name = literal(ds["name"])
        lines.append(
            f"Data: {name} ({ds['train']:,} train / {ds['test']:,} test)"
            if _is_int(ds.get("train")) and _is_int(ds.get("test"))
            else f"Data: {name}"
        )
    if files.config:
        lines.append(
            "Config: " + ", ".join(code(f"{k}={_fmt_value(v)}") for k, v in files.config.items())
        )
    return lines


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return str(v)


def _caveats(files: RunFiles, summary: Summary) -> list[str]:
    m = files.meta
    out = []
    if m.get("quick"):
        out.append(
            "**Smoke run (`--quick`)**: a few steps to check that everything works. Its numbers "
            "say nothing about the claims; run without `--quick` for the real experiment."
        )
    status = m.get("status")
    if status == "interrupted":
        out.append(
            "**Interrupted** (Ctrl-C): this report shows what was measured up to then; "
            + code(f"bnlab run {m.get('experiment', 'NAME')} --resume {files.path}")
            + " continues the run."
        )
    elif status == "failed":
        out.append(f"**The run failed**: {literal(m.get('error', 'see the terminal output'))}.")
    elif status == "running":
        out.append("**The run has not ended** (still running, or killed): numbers are partial.")
    out += summary.caveats
    out += [f"While reading the run's files: {literal(w)}." for w in files.warnings]
    return out


def render_markdown(files: RunFiles, summary: Summary) -> str:
    """The report as Markdown (figures linked by file name)."""
    md = [f"# {summary.title}", ""]
    desc = files.meta.get("description")
    if desc:
        md += [f"*{literal(desc)}*", ""]
    for c in _caveats(files, summary):
        md.append(f"> {c}")
        md.append(">")
    if md[-1] == ">":
        md[-1] = ""
    if summary.headline:
        md += [f"- {h}" for h in summary.headline] + [""]
    for sec in summary.sections:
        md += [f"## {sec.heading}", ""]
        for f in sec.figures:
            md += [f"![{f.title}]({f.file})", "", f"**{f.title}.** {f.look_for}".rstrip(), ""]
        for p in sec.text:
            md += [p, ""]
        for t in sec.tables:
            md += _md_table(t)
        if sec.claims:
            md += _md_table(_claims_table(sec.claims))
    md += ["## Setup", ""] + [f"- {line}" for line in summary.setup + _setup_lines(files)] + [""]
    return "\n".join(md)


def _claims_table(claims: list[Claim]) -> Table:
    """The claims as a table; a note every claim shares goes under the table, once."""
    with_paper = any(c.paper for c in claims)
    notes = {c.note for c in claims}
    shared = notes.pop() if len(notes) == 1 and len(claims) > 1 else ""
    header = ["#", "claim", "measured", "verdict"] + (["paper"] if with_paper else [])
    rows = [
        [c.id, c.claim,
         c.measured + (f" *({c.note})*" if c.note and not shared else ""), c.verdict]
        + ([c.paper] if with_paper else [])
        for c in claims
    ]  # fmt: skip
    return Table("", header, rows, f"Not assessed: {shared}." if shared else "")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1120px;margin:2em auto;
padding:0 1.2em;line-height:1.5;color:#222}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;
padding-bottom:.2em}.desc{color:#555;margin-top:0}
.caveat{background:#fff6dd;border-left:4px solid #e0a800;padding:.6em 1em;margin:.6em 0}
.headline{background:#f4f7fb;border-radius:6px;padding:.6em 1.2em}
figure{margin:1em 0 1.6em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{margin-top:.3em}figcaption .look{color:#444}
table{border-collapse:collapse;margin:.6em 0;font-size:.95em}
td,th{border:1px solid #ccc;padding:4px 9px;vertical-align:top;text-align:left}
th{background:#f3f3f3}caption{text-align:left;font-weight:bold;padding:.3em 0}
.note{color:#555;font-size:.92em;margin-top:.2em}
.verdict{font-weight:bold;white-space:nowrap;padding:1px 7px;border-radius:4px}
.v-holds{background:#dff3e4;color:#17692d}.v-fails{background:#fbe0e0;color:#a11}
.v-na{background:#eee;color:#555}
code{background:#f2f2f2;padding:0 3px;border-radius:3px;font-size:.92em}
.setup li{margin:.2em 0}
"""


def _html_table(t: Table, verdict_col: int | None = None) -> str:
    parts = ["<table>"]
    if t.title:
        parts.append(f"<caption>{inline_html(t.title)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in t.header) + "</tr>")
    for r in t.rows:
        cells = []
        for i, c in enumerate(r):
            if i == verdict_col:
                cls = _VERDICT_STYLE.get(str(c), "na")
                cells.append(f"<td><span class='verdict v-{cls}'>{html.escape(str(c))}</span></td>")
            else:
                cells.append(f"<td>{inline_html(c)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    if t.note:
        parts.append(f"<p class='note'>{inline_html(t.note)}</p>")
    return "".join(parts)


def _html_figure(run_dir: Path, f: Figure) -> str:
    path = run_dir / f.file
    if not path.is_file():
        return f"<p class='caveat'>Figure {html.escape(f.file)} is missing.</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    look = f" <span class='look'>{inline_html(f.look_for)}</span>" if f.look_for else ""
    return (
        f"<figure><img alt='{html.escape(f.title, quote=True)}' "
        f"src='data:image/png;base64,{data}'><figcaption><strong>{inline_html(f.title)}.</strong>"
        f"{look}</figcaption></figure>"
    )


def render_html(files: RunFiles, summary: Summary) -> str:
    """The report as one self-contained HTML page (figures embedded as base64 PNG)."""
    h = [f"<h1>{inline_html(summary.title)}</h1>"]
    desc = files.meta.get("description")
    if desc:
        h.append(f"<p class='desc'>{inline_html(literal(desc))}</p>")
    h += [f"<div class='caveat'>{inline_html(c)}</div>" for c in _caveats(files, summary)]
    if summary.headline:
        h.append(
            "<div class='headline'><ul>"
            + "".join(f"<li>{inline_html(x)}</li>" for x in summary.headline)
            + "</ul></div>"
        )
    for sec in summary.sections:
        h.append(f"<h2>{inline_html(sec.heading)}</h2>")
        h += [_html_figure(files.path, f) for f in sec.figures]
        h += [f"<p>{inline_html(p)}</p>" for p in sec.text]
        h += [_html_table(t) for t in sec.tables]
        if sec.claims:
            h.append(_html_table(_claims_table(sec.claims), verdict_col=3))
    h.append("<h2>Setup</h2><ul class='setup'>")
    h += [f"<li>{inline_html(line)}</li>" for line in summary.setup + _setup_lines(files)]
    h.append("</ul>")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(summary.title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(h)
        + "\n</body></html>\n"
    )


def summarize_run(files: RunFiles) -> Summary:
    """The experiment's summary of a loaded run (figures written into the run directory).
    ValueError naming the run when the experiment is unknown or the files lack what its report
    needs."""
    from ..experiments import get_experiment

    name = files.meta.get("experiment")
    if not isinstance(name, str):
        raise ValueError(f"{files.path / 'config.json'} names no experiment")
    exp = get_experiment(name)
    try:
        summary = exp.report(files)
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(
            f"report: the files of {files.path} do not hold what the {name} report needs "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(summary, Summary):
        raise TypeError(f"experiment {name!r}: report() returned {type(summary).__name__}, "
                        "not a Summary")
    return summary


def write_report(run_dir: Path | str) -> tuple[Summary, Path, Path]:
    """Rebuild the figures and both reports of a run directory; returns the summary and the
    paths of report.md and report.html."""
    files = load_run(run_dir)
    summary = summarize_run(files)
    md_path, html_path = files.path / "report.md", files.path / "report.html"
    atomic_write_text(md_path, render_markdown(files, summary))
    atomic_write_text(html_path, render_html(files, summary))
    return summary, md_path, html_path


def build_report(run_dir: Path | str) -> tuple[Path, Path]:
    """Rebuild the figures and both reports of a run directory; returns (report.md,
    report.html)."""
    _, md_path, html_path = write_report(run_dir)
    return md_path, html_path
