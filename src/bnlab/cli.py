"""The ``bnlab`` command line: ``bnlab run|list|report|data|bench``.

Generic over the experiment registry (:mod:`bnlab.experiments`): every registered experiment is a
``bnlab run NAME`` subcommand whose flags are its config dataclass's fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "add_config_flags", "config_from_args", "plain"]

_EXAMPLES = """\
examples:
  bnlab list                          the experiments, one line each
  bnlab run mnist                     Figure 1 of the paper (the main job)
  bnlab run mnist --quick             a smoke run in seconds
  bnlab run mnist --help              an experiment's flags
  bnlab run NAME --resume runs/NAME/RUN-ID    continue an interrupted run
  bnlab report runs/mnist/RUN-ID      rebuild a run's figures and report from its files
  bnlab data list                     where each data set would load from
  bnlab data fetch fashion-mnist      download a data set (the only command that goes online)
  bnlab bench --threads 1             kernel benchmarks
"""


def plain(text: str) -> str:
    """Docstring markup out of help text: ``:class:`x` `` -> x, ````x```` -> x, `x` -> x."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    text = text.replace("``", "").replace("`", "")
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------- config <-> flags
def _field_type(f: dataclasses.Field) -> type:
    if isinstance(f.type, type):
        return f.type
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, quick: dict | None = None) -> None:
    """One type-checked ``--field-name`` flag per dataclass field (help from the field's
    metadata, ``choices`` listed). Booleans take ``--flag`` / ``--no-flag``. Unset flags keep
    the dataclass default (or the ``--quick`` value)."""
    group = parser.add_argument_group("experiment config (each field of the config)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = plain(f.metadata.get("help", ""))
        helptext += f" (default: {default}"
        if quick and f.name in quick:
            helptext += f"; --quick: {quick[f.name]}"
        helptext += ")"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=helptext)
            continue
        choices = f.metadata.get("choices")
        group.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=None,
            choices=choices,
            help=helptext,
            metavar="{" + ",".join(map(str, choices)) + "}" if choices else kind.__name__.upper(),
        )


def config_from_args(cls: type, args: argparse.Namespace, overrides: dict | None = None):
    """Dataclass defaults, then ``overrides`` (e.g. --quick), then the flags the user gave."""
    values = dict(overrides or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def _given_flags(cls: type, args: argparse.Namespace) -> list[str]:
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None]


# ----------------------------------------------------------------------- commands
def _cmd_list(args) -> int:
    from .experiments import EXPERIMENTS

    width = max((len(n) for n in EXPERIMENTS), default=0) + 2
    for name, exp in sorted(EXPERIMENTS.items()):
        print(f"{name:<{width}}{exp.description}")
    return 0


def _print_summary(summary, html: Path) -> None:
    for line in summary.headline:
        print(plain(line.replace("**", "")))
    notes: list[str] = []
    for c in summary.claims:
        verdict = c.verdict.upper() if c.verdict == "fails" else c.verdict
        if c.note and c.note not in notes:
            notes.append(c.note)
        mark = f" [{notes.index(c.note) + 1}]" if c.note else ""
        print(f"  claim {c.id}: {verdict}{mark} - {plain(c.measured)}")
    for i, note in enumerate(notes, 1):
        print(f"  [{i}] {plain(note)}")
    print(f"report: {html}")


def _cmd_run(args) -> int:
    from .experiments import execute, get_experiment
    from .report.report import write_report

    exp = get_experiment(args.experiment)
    if args.resume is not None:
        given = _given_flags(exp.config, args) + (["--quick"] if args.quick else []) + (
            ["--out"] if args.out else [])
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be combined with --resume: a resumed run keeps the "
                "config it started with"
            )
        cfg = None
    else:
        cfg = config_from_args(exp.config, args, dict(exp.quick) if args.quick else None)
    print(f"bnlab run {exp.name}: {exp.description}")
    run = execute(exp, cfg, args.out, resume=args.resume, quick=args.quick,
                  progress=not args.no_progress)
    status = run.meta.get("status")
    print(f"run directory: {run.path} ({status}, {run.meta.get('wall_time_s')} s)")
    if status == "interrupted" and not (run.path / "config.json").is_file():
        print("interrupted before anything was measured; nothing was kept")
        return 130
    try:
        summary, _, html = write_report(run.path)
    except ValueError as exc:
        if status != "interrupted":
            raise
        print(f"no report: {exc}")
    else:
        _print_summary(summary, html)
    if status == "interrupted":
        if exp.resumable:
            print(f"interrupted: continue with `bnlab run {exp.name} --resume {run.path}`")
        return 130
    return 0


def _cmd_report(args) -> int:
    from .report.report import write_report

    summary, md, html = write_report(args.run_dir)
    _print_summary(summary, html)
    print(f"        {md}")
    return 0


def _cmd_data(args) -> int:
    from . import data

    if args.data_command == "list":
        for name, status in data.dataset_status(args.root).items():
            print(f"{name:<14} {status}")
        return 0
    path = data.fetch(args.name, root=args.root, mirror=args.mirror)
    print(f"{args.name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch Normalization lab: the layer, the experiments that test the papers' "
        "claims, and their reports.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks for errors (off: one line per error)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run an experiment (see `bnlab list`)",
                       description="Run an experiment; `bnlab run NAME --help` lists its flags.")
    runs = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, exp in EXPERIMENTS.items():
        examples = "".join(f"\n  {e}" for e in exp.examples)
        q = runs.add_parser(
            name,
            help=plain(exp.description),
            description=plain(exp.description) + ("\n\n" + _wrap(plain(exp.about))
                                                   if exp.about else ""),
            epilog=("examples:" + examples) if examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_config_flags(q, exp.config, dict(exp.quick))
        g = q.add_argument_group("run options")
        g.add_argument(
            "--quick", action="store_true",
            help="smoke run: " + ", ".join(f"{k}={v}" for k, v in exp.quick.items()),
        )
        g.add_argument("--out", default=None, metavar="DIR",
                       help=f"new run directory (default: runs/{name}/<date-time>)")
        g.add_argument("--resume", default=None, metavar="DIR",
                       help="continue the interrupted run in DIR with its saved config"
                       + ("" if exp.resumable else " (not supported by this experiment)"))
        g.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=_cmd_run)

    p = sub.add_parser("list", help="list the experiments")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("report", help="rebuild a run's figures and report from its files",
                       epilog="example:\n  bnlab report runs/mnist/20261202-101500",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("data", help="data sets: where they are, and downloads")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    f = dsub.add_parser("fetch", help="download a data set into the cache ($BNLAB_DATA)",
                        epilog="example:\n  bnlab data fetch fashion-mnist",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10"])
    f.add_argument("--root", default=None,
                   help="cache directory (default: $BNLAB_DATA or ~/.cache/bnlab)")
    f.add_argument("--mirror", default=None, help="base URL to download from instead")
    f.set_defaults(func=_cmd_data)
    f = dsub.add_parser("list", help="data sets and where each would load from (no network)")
    f.add_argument("--root", default=None, help="cache directory")
    f.set_defaults(func=_cmd_data)

    sub.add_parser("bench", help="kernel benchmarks (`bnlab bench --help` for its flags)",
                   add_help=False)
    # listed here for `bnlab --help`; main() hands `bnlab bench ...` to bnlab.bench.main whole
    return parser


def _wrap(text: str, width: int = 78) -> str:
    import textwrap

    return textwrap.fill(text, width)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bnlab`` command. Errors a user can cause (a bad flag value, a
    missing file, a taken run directory) print one line and return 2; ``--debug`` shows the
    traceback instead. Ctrl-C returns 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    lead = [a for a in argv[:2] if a != "--debug"]
    if lead[:1] == ["bench"]:  # every further argument (--help included) belongs to bench
        from . import bench

        return bench.main(argv[argv.index("bench") + 1 :])
    try:
        from .experiments import load_plugins

        load_plugins()
    except ValueError as exc:
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\nbnlab: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
