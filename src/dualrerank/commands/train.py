"""`dualrerank train`: supervised training of one registered model.

dualrerank train --model teacher --data synthetic --out runs/teacher
dualrerank train --model lambdamart --data letor --path ../shared/data/letor/MQ2008 --out runs/lm
dualrerank train --model teacher --out runs/teacher --resume      # continue a stopped run
dualrerank train --model teacher --out runs/teacher --overwrite   # start that run over
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dualrerank.commands._common import add_config_args, add_run_args, load_run_config, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.splits import SPLIT_SOURCES
    from dualrerank.train.supervised import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train a model (teacher, seq2slate, nar, evaluator, dnn, prm, lambdamart, catboost, upstream)",
        description="Train one model on a data source; writes config.yaml, metrics.jsonl, a checkpoint, "
        "eval.json (test figures) and report.md into --out.",
    )
    p.add_argument("--model", default=None, help="registered model name (default: the config's, else teacher)")
    p.add_argument("--data", default=None, choices=SPLIT_SOURCES, help="data source (default: synthetic)")
    p.add_argument("--path", default=None, help="data path (letor folder, mind folder, world YAML or simulate --out folder)")
    add_run_args(p)
    p.add_argument(
        "--evaluator",
        type=Path,
        default=None,
        help="checkpoint of a trained evaluator for 'evaluator' targets (default: train one in OUT/evaluator)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override optim.epochs")
    p.add_argument("--json", action="store_true", help="print the test figures as JSON")
    add_config_args(p, TrainConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.train.supervised import TrainConfig, train_model

    overrides = {"model": args.model, "data.source": args.data, "data.path": args.path, "optim.epochs": args.epochs}
    cfg = load_run_config(TrainConfig, args, overrides)
    result = train_model(
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        evaluator_dir=args.evaluator,
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
