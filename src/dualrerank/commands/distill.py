"""`dualrerank distill`: Sequential Knowledge Distillation of an AR teacher into the NAR student.

    dualrerank distill --teacher runs/teacher --data synthetic --out runs/student
    dualrerank distill --teacher runs/teacher --data synthetic --out runs/nar_direct --config direct.yaml  # soft: false
    dualrerank distill --teacher runs/teacher --out runs/student --resume      # continue a stopped run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dualrerank.commands._common import add_config_args, load_run_config, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.distill import DistillConfig

    p = subparsers.add_parser(
        "distill", help="distill a trained AR teacher into the NAR student (SKD)",
        description="Train the NAR student on the frozen teacher's step distributions along its paths; writes "
        "config.yaml, metrics.jsonl (with PTAR, collapse and certificate diagnostics), a checkpoint, "
        "eval.json (test figures) and report.md into --out.",
    )
    p.add_argument("--teacher", type=Path, required=True,
                   help="teacher checkpoint directory (or the teacher's run directory holding checkpoint/)")
    p.add_argument("--data", default=None, choices=("synthetic", "letor", "mind"), help="data source (default: synthetic)")
    p.add_argument("--path", default=None, help="data path (letor folder, mind folder, world YAML or simulate --out folder)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--epochs", type=int, default=None, help="override optim.epochs")
    p.add_argument("--json", action="store_true", help="print the test figures as JSON")
    add_config_args(p, DistillConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.train.distill import DistillConfig, distill_model

    overrides = {"data.source": args.data, "data.path": args.path, "optim.epochs": args.epochs}
    cfg = load_run_config(DistillConfig, args, overrides)
    result = distill_model(cfg, args.out, args.teacher, resume=args.resume)
    if args.json:
        print_json(result)
    else:
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if v is not None)
        print(f"{args.out}: {shown}")
    return 0
