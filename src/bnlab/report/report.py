"""Run directory -> ``figure1.png``, ``report.md`` and a self-contained ``report.html``.

Reads only ``config.json`` and ``metrics.jsonl``, so ``bnlab report RUN_DIR`` rebuilds the same
report without retraining.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

__all__ = ["build_report"]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _mnist_sections(run_dir: Path, meta: dict, rows: list[dict]) -> tuple[str, list, list]:
    from ..experiments import mnist
    from .plots import figure1

    summary = mnist.summarize(meta, rows)
    # panels (b, c): evaluations after training started
    pct = {net: mnist.trained_series(rows, net, "tracked_pct") for net in mnist.NETS}
    cfg = meta["config"]
    fig = figure1(summary, pct, run_dir / "figure1.png", cfg["tracked_unit"], mnist.PAPER)
    ds = meta["dataset"]
    title = "MNIST, Figure 1 of Ioffe & Szegedy (2015): BN vs no BN on a sigmoid MLP"
    intro = [
        f"Dataset: **{ds['name']}** ({ds['train']} train / {ds['test']} test images). "
        + (ds.get("note") or ""),
        f"Network: 784-100-100-100-10, sigmoid, {meta['config']['seeds']} seeds "
        f"{meta['seeds']}; SGD lr {cfg['lr']}, momentum {cfg['momentum']}, batch "
        f"{cfg['batch_size']}, init N(0, {cfg['init_std']}^2), {meta.get('steps_done', '?')} of "
        f"{cfg['steps']} steps"
        + (" (**interrupted**)" if meta.get("interrupted") else "")
        + f"; binarized input: {cfg['binarize']}.",
        f"Wall time {meta.get('wall_time_s', '?')} s ({meta.get('steps_per_s', '?')} steps/s for "
        f"all {2 * cfg['seeds']} networks), {meta.get('processes', 1)} process(es) x "
        f"{meta['threads']} thread(s); versions "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        f"Final test accuracy (seed mean): BN {summary['final']['bn']:.4f}, baseline "
        f"{summary['final']['baseline']:.4f}.",
    ]
    table = (
        ["step", "paper: BN", "bnlab: BN", "paper: no BN", "bnlab: no BN"],
        [
            [
                f"{r['step']:,}",
                _fmt(r["paper_bn"]),
                _fmt(r["bnlab_bn"]),
                _fmt(r["paper_baseline"]),
                _fmt(r["bnlab_baseline"]),
            ]
            for r in summary["paper_table"]
        ],
    )
    claims = summary["claims"]
    note = (
        "Paper values are read off Figure 1(a) (approximate) and were measured on the full "
        "60,000-image MNIST; 'n/a' where this run has no evaluation at that step."
    )
    return (
        title,
        [("Setup", intro), ("Paper vs bnlab (test accuracy, seed mean)", (table, note))],
        [("claims", claims), ("figure", fig)],
    )


def build_report(run_dir: Path | str) -> tuple[Path, Path]:
    """Rebuild the figure and both reports of a run directory; returns (report.md, report.html)."""
    from ..experiments import mnist

    run_dir = Path(run_dir)
    meta, rows = mnist.load_run(run_dir)
    if meta.get("experiment") != mnist.NAME:
        raise ValueError(
            f"report: {run_dir} holds experiment {meta.get('experiment')!r}, which has no report"
        )
    title, sections, extras = _mnist_sections(run_dir, meta, rows)
    claims = dict(extras)["claims"]
    fig: Path = dict(extras)["figure"]

    md = [f"# {title}", ""]
    h = [f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        md += [f"## {heading}", ""]
        h.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(body, tuple):
            (header, trows), note = body
            md += [_md_table(header, trows), "", note, ""]
            h.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in header)
                + "</tr>"
                + "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                    for r in trows
                )
                + "</table>"
            )
            h.append(f"<p><em>{html.escape(note)}</em></p>")
        else:
            md += [f"- {line}" for line in body] + [""]
            h.append(
                "<ul>"
                + "".join(f"<li>{html.escape(line).replace('**', '')}</li>" for line in body)
                + "</ul>"
            )
    md += ["## Claim checks", ""]
    h.append(
        "<h2>Claim checks</h2><table><tr><th>#</th><th>claim</th><th>measured</th>"
        "<th>verdict</th></tr>"
    )
    for c in claims:
        i = c["id"]
        verdict = "holds" if c["holds"] else "fails"
        md.append(f"- ({i}) **{verdict}**: {c['claim']}. Measured: {c['measured']}.")
        color = "#2a7" if c["holds"] else "#c33"
        h.append(
            f"<tr><td>{i}</td><td>{html.escape(c['claim'])}</td>"
            f"<td>{html.escape(c['measured'])}</td>"
            f"<td style='color:{color};font-weight:bold'>{verdict}</td></tr>"
        )
    h.append("</table>")
    md += ["", "## Figure 1", "", f"![Figure 1]({fig.name})", ""]
    png = base64.b64encode(fig.read_bytes()).decode("ascii")
    h.append(
        f"<h2>Figure 1</h2><img alt='Figure 1' style='max-width:100%' "
        f"src='data:image/png;base64,{png}'>"
    )
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text("\n".join(md))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
    )
    html_path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
        + "\n".join(h)
        + "</body></html>"
    )
    return md_path, html_path
