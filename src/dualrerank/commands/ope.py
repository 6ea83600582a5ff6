"""`dualrerank ope`: off-policy evaluation of a reranker's page reward from logged pages with
propensities, before it serves any traffic (docs/evaluation.md).

    dualrerank ope --policy runs/teacher --out runs/ope/teacher                      # the run's own world
    dualrerank ope --policy runs/student --evaluator runs/teacher/evaluator --out runs/ope/student
    dualrerank ope --policy runs/teacher --data synthetic --path runs/simulate --out runs/ope/logs
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dualrerank.commands._common import add_config_args, load_from_args, print_json, run_data_section


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.ope import OpeConfig
    from dualrerank.train.splits import SPLIT_SOURCES

    p = subparsers.add_parser(
        "ope",
        help="off-policy estimates (IPS, SNIPS, PI, DM, DR, cascade DR) of a reranker's page reward from logs",
        description="Estimate a trained reranker's mean page reward (weighted click and long-view events) from logs "
        "that carry the logging policy's propensities, with confidence intervals; on the simulated world the exact "
        "true value is reported beside them. Writes config.yaml, summary.json and report.md into --out. Logs without "
        "propensities (LETOR, MIND) are refused with one line (exit status 2).",
    )
    p.add_argument("--policy", type=Path, required=True, help="the reranker: a run directory or its checkpoint/")
    p.add_argument("--data", default=None, choices=SPLIT_SOURCES, help="source of the logs (default: the policy run's)")
    p.add_argument(
        "--path",
        default=None,
        help="data path: world YAML or 'simulate --out' folder (synthetic), data folder (letor, mind); default: the policy run's",
    )
    p.add_argument(
        "--evaluator",
        type=Path,
        default=None,
        help="ListEvaluator checkpoint for dm and the DR estimators (default: the policy run's evaluator/)",
    )
    p.add_argument("--requests", type=int, default=None, help="override data.num_requests")
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (refused if it holds an evaluation, unless --overwrite)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the evaluation in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print summary.json")
    add_config_args(p, OpeConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.train.ope import OpeConfig, run_ope

    cfg = load_from_args(OpeConfig, args, {"data.source": args.data, "data.path": args.path, "data.num_requests": args.requests})
    found = run_data_section(args.policy) if args.policy.exists() else None
    summary = run_ope(
        cfg,
        args.policy,
        args.out,
        evaluator=args.evaluator,
        run_data=found[0] if found else None,
        overwrite=args.overwrite,
        progress=not args.quiet,
        command=shlex.join(["dualrerank", *sys.argv[1:]]) if sys.argv[1:2] == ["ope"] else None,
    )
    if args.json:
        print_json(summary)
        return 0
    truth = summary.get("truth")
    print(
        f"{args.out}: {summary['data']['requests']:,} logged requests, logged reward {summary['logged_reward']:.4f}"
        + (f", true value {truth:.4f}" if truth is not None else "")
    )
    for name, fig in summary["estimators"].items():
        if fig.get("estimate") is None:
            print(f"  {name:>13}: not run ({fig['reason']})")
            continue
        ess = f", ess {fig['ess']:.1f}" if fig.get("ess") is not None else ""
        flag = f" ({fig['status']}: {fig['reason']})" if fig["status"] != "ok" else ""
        print(f"  {name:>13}: {fig['estimate']:.4f} [{fig['ci_low']:.4f}, {fig['ci_high']:.4f}]{ess}{flag}")
    return 0
