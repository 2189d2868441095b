"""The ``bnlab`` command line: ``bnlab run|list|report|data|bench``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

__all__ = ["main", "add_config_flags", "config_from_args"]


# ----------------------------------------------------------------------- config <-> flags
def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One type-checked ``--field-name`` flag per dataclass field (help from field metadata).
    Booleans take ``--flag`` / ``--no-flag``. Unset flags keep the dataclass default."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "") + f" (default: {f.default})"
        kind = (
            f.type
            if isinstance(f.type, type)
            else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        )
        if kind is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=helptext,
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=None,
                help=helptext,
                metavar=kind.__name__.upper(),
            )


def config_from_args(cls: type, args: argparse.Namespace, overrides: dict | None = None):
    """Dataclass defaults, then ``overrides`` (e.g. --quick), then flags the user gave."""
    values = dict(overrides or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


# ----------------------------------------------------------------------- commands
def _cmd_list(args) -> int:
    from .experiments import EXPERIMENTS

    for name, mod in sorted(EXPERIMENTS.items()):
        print(f"{name:<12} {mod.DESCRIPTION}")
    return 0


def _cmd_run(args) -> int:
    from .experiments import get_experiment
    from .report import build_report

    exp = get_experiment(args.experiment)
    cfg = config_from_args(exp.MnistConfig, args, exp.QUICK if args.quick else None)
    out = Path(args.out) if args.out else exp.default_run_dir()
    print(f"bnlab run {exp.NAME}: {exp.DESCRIPTION}")
    run_dir = exp.run(cfg, out, progress=not args.no_progress)
    meta, _ = exp.load_run(run_dir)
    ds = meta["dataset"]
    print(
        f"dataset: {ds['name']} ({ds['train']} train / {ds['test']} test)"
        + (f". {ds['note']}" if ds.get("note") else "")
    )
    md, html = build_report(run_dir)
    from .experiments.mnist import summarize

    summary = summarize(*exp.load_run(run_dir))
    print(
        f"final test accuracy (seed mean): BN {summary['final']['bn']:.4f}, "
        f"baseline {summary['final']['baseline']:.4f}; wall time {meta['wall_time_s']} s"
    )
    for c in summary["claims"]:
        print(f"  claim {c['id']}: {'holds' if c['holds'] else 'FAILS'} - {c['measured']}")
    print(f"report: {html}\n        {md}")
    return 130 if meta.get("interrupted") else 0


def _cmd_report(args) -> int:
    from .report import build_report

    md, html = build_report(args.run_dir)
    print(f"report: {html}\n        {md}")
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
    from .experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(prog="bnlab", description="Batch Normalization lab.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an experiment (see `bnlab list`)")
    runs = p.add_subparsers(dest="experiment", required=True)
    for name, mod in EXPERIMENTS.items():
        q = runs.add_parser(
            name,
            help=mod.DESCRIPTION,
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_config_flags(q, mod.MnistConfig)
        q.add_argument(
            "--quick",
            action="store_true",
            help="smoke run: " + ", ".join(f"{k}={v}" for k, v in mod.QUICK.items()),
        )
        q.add_argument("--out", default=None, help="run directory (default: runs/<exp>/<time>)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=_cmd_run)

    p = sub.add_parser("list", help="list experiments")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("report", help="rebuild figures and report of a run from its files")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("data", help="datasets: `bnlab data fetch mnist|fashion-mnist|cifar10`")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download a dataset into the cache ($BNLAB_DATA)")
    f.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10"])
    f.add_argument(
        "--root", default=None, help="cache directory (default: $BNLAB_DATA or ~/.cache/bnlab)"
    )
    f.add_argument("--mirror", default=None, help="base URL to download from instead")
    f.set_defaults(func=_cmd_data)
    f = dsub.add_parser("list", help="datasets and where each would load from (no network)")
    f.add_argument("--root", default=None, help="cache directory")
    f.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "bench", help="kernel benchmarks (args passed on; see `bnlab bench -h`)", add_help=False
    )
    # listed here for `bnlab -h`; main() hands `bnlab bench ...` to bnlab.bench.main whole

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every further argument (--help included) belongs to bench
        from . import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"bnlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
