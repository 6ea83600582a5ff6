"""`dualrerank experiment offline`: train or reuse every model of the comparison over
several seeds and write summary.json, report.md and plots.

    dualrerank experiment offline --config configs/offline_synthetic.yaml --out runs/offline_synthetic
    dualrerank experiment offline --config configs/offline_mq2008.yaml --out runs/offline_mq2008 --reuse
    dualrerank experiment offline --config configs/offline_synthetic.yaml --out runs/x --seeds 0 --models teacher student_skd
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from dualrerank.commands._common import add_config_args, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.experiment import ROWS, ExperimentConfig

    p = subparsers.add_parser(
        "experiment", help="run a whole experiment (offline: every model over several seeds)",
        description="Experiments that train and compare many models.",
    )
    sub = p.add_subparsers(dest="experiment", metavar="KIND")
    off = sub.add_parser(
        "offline", help="train/reuse every model on one data source and write summary.json, report.md, plots",
        description="Trains (or with --reuse reads back) each row over the seeds into OUT/runs/<row>/seed<k>/, "
        "evaluates on the test split, and writes OUT/summary.json (mean and <key>_std per row), OUT/report.md "
        f"and PNG plots. Rows: {', '.join(ROWS)}.",
    )
    off.add_argument("--out", type=Path, required=True, help="experiment directory")
    off.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="training seeds (default: the config's, else 0 1 2); --seed K is --seeds K")
    off.add_argument("--models", nargs="+", default=None, metavar="ROW",
                     help=f"rows to run (default: the config's, else all): {' '.join(ROWS)}")
    off.add_argument("--reuse", action="store_true", help="do not retrain a run directory that already holds eval.json")
    off.add_argument("--json", action="store_true", help="print summary.json to stdout")
    off.add_argument("--quiet", action="store_true", help="no progress bars (the per-run lines are still printed)")
    add_config_args(off, ExperimentConfig)
    off.set_defaults(func=_offline)
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
