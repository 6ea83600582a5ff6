"""`dualrerank ab`: a simulated online A/B test of trained rerankers (docs/evaluation.md).

dualrerank ab --arm upstream --arm teacher=runs/teacher --arm student=runs/student --requests 20000 --out runs/ab
dualrerank ab --arm teacher=runs/teacher --arm student=runs/student --design split --world world.yaml --out runs/ab2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dualrerank.commands._common import add_config_args, load_from_args, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.abtest import ABConfig

    p = subparsers.add_parser(
        "ab",
        help="simulated online A/B test of trained rerankers on fresh traffic from the world",
        description="Serve fresh requests of the simulated world (with its drift schedule) to two or more arms, sample "
        "the users' feedback, and compare CTR, long-view rate, reformulation, watch time, exact normalized utility and "
        "batch-1 serving latency against the control, with confidence intervals and a power line. Writes config.yaml, "
        "summary.json, report.md and lifts.png into --out.",
    )
    p.add_argument(
        "--arm",
        action="append",
        default=None,
        metavar="NAME=RUN_DIR",
        help="an arm: NAME=PATH (a run directory or checkpoint of any trained reranker) or 'upstream' (sort "
        "by the upstream score); repeat for each arm, at least two; the first is the control unless --control",
    )
    p.add_argument("--control", default=None, metavar="NAME", help="the control arm (default: the first --arm)")
    p.add_argument(
        "--requests", type=int, default=None, metavar="N", help="requests of fresh traffic (default: the config's, 10000)"
    )
    p.add_argument(
        "--design",
        default=None,
        choices=("paired", "split"),
        help="paired: every arm serves every request; split: each request goes to one arm at random "
        "(default: the config's, paired)",
    )
    p.add_argument(
        "--world", default=None, metavar="WORLD.yaml", help="world YAML, drift schedule included (default: the default world)"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (refused if it holds results, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the results --out holds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout")
    add_config_args(p, ABConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.errors import ConfigError
    from dualrerank.train.abtest import ABConfig, run_ab

    if args.requests is not None and args.requests < 1:
        raise ConfigError(f"--requests: must be >= 1, got {args.requests}")
    overrides = {"arms": args.arm, "control": args.control, "requests": args.requests, "design": args.design, "world": args.world}
    cfg = load_from_args(ABConfig, args, overrides)
    command = (
        "dualrerank " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:2] == ["ab"]
        else "dualrerank ab " + " ".join(f"--arm {shlex.quote(a)}" for a in cfg.arms) + f" --out {shlex.quote(str(args.out))}"
    )
    summary = run_ab(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet, commands=[command])
    if args.json:
        print_json(summary)
    else:
        from dualrerank.report import ab_results_table

        print(ab_results_table(summary))
        print(summary["power"]["line"])
        print(f"{args.out}: summary.json, report.md" + (", lifts.png" if summary["plots"] else ""))
    return 0
