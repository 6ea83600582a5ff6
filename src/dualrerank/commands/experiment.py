"""`dualrerank experiment offline`: train or reuse every model of the comparison over
several seeds and write summary.json, report.md and plots.

    dualrerank experiment offline --config configs/offline_synthetic.yaml --out runs/offline_synthetic
    dualrerank experiment offline --config configs/offline_mq2008.yaml --out runs/offline_mq2008 --reuse
    dualrerank experiment offline --config configs/offline_synthetic.yaml --out runs/x --seeds 0 --models teacher student_skd
    dualrerank experiment online --from runs/student --config configs/online_experiment.yaml --out runs/online_exp
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from dualrerank.commands._common import add_config_args, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.experiment import ROWS, ExperimentConfig

    p = subparsers.add_parser(
        "experiment",
        help="run a whole experiment (offline: every model over several seeds)",
        description="Experiments that train and compare many models.",
    )
    sub = p.add_subparsers(dest="experiment", metavar="KIND")
    off = sub.add_parser(
        "offline",
        help="train/reuse every model on one data source and write summary.json, report.md, plots",
        description="Trains (or with --reuse reads back) each row over the seeds into OUT/runs/<row>/seed<k>/, "
        "evaluates on the test split, and writes OUT/summary.json (mean and <key>_std per row), OUT/report.md "
        f"and PNG plots. Rows: {', '.join(ROWS)}.",
    )
    off.add_argument("--out", type=Path, required=True, help="experiment directory")
    off.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="training seeds (default: the config's, else 0 1 2); --seed K is --seeds K",
    )
    off.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="ROW",
        help=f"rows to run (default: the config's, else all): {' '.join(ROWS)}",
    )
    off.add_argument("--reuse", action="store_true", help="do not retrain a run directory that already holds eval.json")
    off.add_argument("--json", action="store_true", help="print summary.json to stdout")
    off.add_argument("--quiet", action="store_true", help="no progress bars (the per-run lines are still printed)")
    add_config_args(off, ExperimentConfig)
    off.set_defaults(func=_offline)

    from dualrerank.train.online_experiment import OnlineExperimentConfig

    on = sub.add_parser(
        "online",
        help="every online method on the same streams over several seeds: summary.json, report.md, curves",
        description="Runs each (method, stream, seed) with 'dualrerank online' from the same distillation run into "
        "OUT/runs/<stream>/<method>/seed<k>/ and writes OUT/summary.json (final level, area under the curve, steps to "
        "90%, recovery steps after each shift, mean and std over seeds), OUT/report.md, curves CSV and one PNG per stream.",
    )
    on.add_argument("--from", dest="from_dir", type=Path, required=True, help="a distill run directory (see 'online --help')")
    on.add_argument("--out", type=Path, required=True, help="experiment directory")
    on.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (default: the config's); --seed K is --seeds K")
    on.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="methods (default: the config's)")
    on.add_argument("--reuse", action="store_true", help="read back runs that already finished instead of running them")
    on.add_argument("--quiet", action="store_true", help="no progress bars")
    on.add_argument("--json", action="store_true", help="print summary.json to stdout")
    add_config_args(on, OnlineExperimentConfig)
    on.set_defaults(func=_online)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _offline(args: argparse.Namespace) -> int:
    from dualrerank.config import load_config
    from dualrerank.train.experiment import ExperimentConfig, run_offline_experiment

    seeds = args.seeds if args.seeds is not None else ([args.seed] if args.seed is not None else None)
    cfg = load_config(ExperimentConfig, args.config, {"seeds": seeds, "models": args.models})
    summary = run_offline_experiment(cfg, args.out, reuse=args.reuse, progress=not args.quiet, command=_command(args))
    if args.json:
        print_json(summary)
    else:
        print(f"{args.out}/summary.json, {args.out}/report.md ({len(summary['rows'])} rows)")
    return 0


def _online(args: argparse.Namespace) -> int:
    from dualrerank.config import load_config
    from dualrerank.train.online_experiment import OnlineExperimentConfig, run_online_experiment

    seeds = args.seeds if args.seeds is not None else ([args.seed] if args.seed is not None else None)
    cfg = load_config(OnlineExperimentConfig, args.config, {"seeds": seeds, "methods": args.methods})
    command = shlex.join(
        ["dualrerank", "experiment", "online", "--from", str(args.from_dir)]
        + (["--config", str(args.config)] if args.config else [])
        + ["--out", str(args.out)]
        + (["--seeds", *map(str, seeds)] if seeds else [])
        + (["--methods", *args.methods] if args.methods else [])
    )
    summary = run_online_experiment(cfg, args.out, args.from_dir, reuse=args.reuse, progress=not args.quiet, command=command)
    if args.json:
        print_json(summary)
    else:
        print(f"{args.out}/summary.json, {args.out}/report.md")
    return 0


def _command(args: argparse.Namespace) -> str:
    parts = ["dualrerank", "experiment", "offline"]
    if args.config is not None:
        parts += ["--config", str(args.config)]
    parts += ["--out", str(args.out)]
    if args.seeds:
        parts += ["--seeds", *map(str, args.seeds)]
    elif args.seed is not None:
        parts += ["--seed", str(args.seed)]
    if args.models:
        parts += ["--models", *args.models]
    if args.reuse:
        parts.append("--reuse")
    return shlex.join(parts)
