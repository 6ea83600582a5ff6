"""`dualrerank evaluate`: offline figures of a checkpoint on a data source's test split.

    dualrerank evaluate --checkpoint runs/teacher/checkpoint --data synthetic --json
    dualrerank evaluate --checkpoint runs/lm --data letor --path ../shared/data/letor/MQ2008
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dualrerank.commands._common import add_config_args, load_from_args, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.supervised import TrainConfig

    p = subparsers.add_parser(
        "evaluate", help="normalized utility, NDCG@4/@10 and latency of a checkpoint",
        description="Evaluate a checkpoint on the held-out split of a data source. The split settings come from "
        "--config (a training config: its 'data' section), else from the run's own config.yaml when --checkpoint "
        "is a run directory, so the same data seed gives the same held-out requests as training.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (or a run directory holding checkpoint/)")
    p.add_argument("--data", default=None, choices=("synthetic", "letor", "mind"), help="data source (default: synthetic)")
    p.add_argument("--path", default=None, help="data path")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="which held-out split")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_args(p, TrainConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.api import resolve_checkpoint
    from dualrerank.models.checkpoint import load_checkpoint
    from dualrerank.train.evaluation import evaluate
    from dualrerank.config import load_config
    from dualrerank.train.splits import load_splits
    from dualrerank.train.supervised import TrainConfig

    overrides = {"data.source": args.data, "data.path": args.path}
    run_config = args.checkpoint / "config.yaml"
    if args.config is None and run_config.is_file():
        cfg = load_config(TrainConfig, run_config, overrides).data
    else:
        cfg = load_from_args(TrainConfig, args, overrides).data
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    model = load_checkpoint(resolve_checkpoint(args.checkpoint))
    splits = load_splits(cfg)
    split = splits.valid if args.split == "valid" else splits.test
    figures = evaluate(model.rerank, split, splits.page_length)
    result = {"checkpoint": str(args.checkpoint), "source": cfg.source, "split": args.split,
              "requests": split.batch.batch_size, "page_length": splits.page_length, **figures}
    if args.json:
        print_json(result)
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0
