"""`dualrerank distill`: Sequential Knowledge Distillation of an AR teacher into the NAR student.

dualrerank distill --teacher runs/teacher --data synthetic --out runs/student
dualrerank distill --teacher runs/teacher --data synthetic --out runs/nar_direct --config direct.yaml  # soft: false
dualrerank distill --teacher runs/teacher --out runs/student --resume      # continue a stopped run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dualrerank.commands._common import (
    add_config_args,
    add_run_args,
    load_run_config,
    note,
    print_json,
    run_data_section,
    user_config_has,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.distill import DistillConfig
    from dualrerank.train.splits import SPLIT_SOURCES

    p = subparsers.add_parser(
        "distill",
        help="distill a trained AR teacher into the NAR student (SKD)",
        description="Train the NAR student on the frozen teacher's step distributions along its paths; writes "
        "config.yaml, metrics.jsonl (with PTAR, collapse and certificate diagnostics), a checkpoint, "
        "eval.json (test figures) and report.md into --out.",
    )
    p.add_argument(
        "--teacher",
        type=Path,
        required=True,
        help="teacher checkpoint directory (or the teacher's run directory holding checkpoint/)",
    )
    p.add_argument("--data", default=None, choices=SPLIT_SOURCES, help="data source (default: the teacher run's, else synthetic)")
    p.add_argument(
        "--path",
        default=None,
        help="data path (letor folder, mind folder, world YAML or simulate --out folder; default: the teacher run's)",
    )
    add_run_args(p)
    p.add_argument("--epochs", type=int, default=None, help="override optim.epochs")
    p.add_argument("--json", action="store_true", help="print the test figures as JSON")
    add_config_args(p, DistillConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.train.distill import DistillConfig, distill_model

    overrides: dict = {}
    if not args.resume and not user_config_has(args, "data"):
        # The student must see the data its teacher learned from: another world or another
        # fold would distil the teacher's pages on requests it never saw.
        found = run_data_section(args.teacher)
        if found is not None:
            data, source = found
            overrides["data"] = data
            what = ", ".join(f"{k}={data.get(k)}" for k in ("source", "path", "seed") if k in data)
            changed = [f"--{k}" for k, v in (("data", args.data), ("path", args.path)) if v is not None]
            note(
                "distill",
                f"using the teacher's data settings from {source} ({what})"
                + (f", changed by {' '.join(changed)}" if changed else ""),
            )
        else:
            note(
                "distill",
                f"no run config beside {args.teacher}: using the data settings of --config/--data/--path "
                "and the defaults; they must match the teacher's",
            )
    overrides.update({"data.source": args.data, "data.path": args.path, "optim.epochs": args.epochs})
    cfg = load_run_config(DistillConfig, args, overrides)
    result = distill_model(
        cfg,
        args.out,
        args.teacher,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        report_to=args.report_to,
    )
    if args.json:
        print_json(result)
    else:
        shown = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.items()
            if v is not None and not isinstance(v, dict)
        )
        print(f"{args.out}: {shown}")
    return 0
