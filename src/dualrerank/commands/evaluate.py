"""`dualrerank evaluate`: offline figures of a checkpoint on a held-out split.

    dualrerank evaluate --checkpoint runs/teacher --json          # the run's own test split
    dualrerank evaluate --checkpoint runs/lm --split valid
    dualrerank evaluate --checkpoint runs/teacher --data-seed 7   # another draw of the data

The held-out requests are the run's own: the data settings (source, path, data seed, split
sizes, loader options) are read from the `config.yaml` of the run the checkpoint belongs to,
whichever command wrote it (train, distill, an experiment row). Nothing here reshuffles
them: `--data-seed` is the one explicit way to evaluate on another draw, and it says what
it changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dualrerank.commands._common import add_config_args, note, print_json, run_data_section, user_config_has

_DATA_SEED_EFFECT = {
    "synthetic": "another simulated world with other requests (not the run's held-out requests)",
    "letor": "other simulated feedback on the same held-out queries",
    "mind": "nothing: MIND splits are fixed by impression id",
    "parquet": "nothing: parquet splits are fixed by request id",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.splits import SPLIT_SOURCES
    from dualrerank.train.supervised import TrainConfig

    p = subparsers.add_parser(
        "evaluate",
        help="normalized utility, NDCG@4/@10 and latency of a checkpoint",
        description="Evaluate a checkpoint on a held-out split of the data its run was trained on. The data "
        "settings come from the run's config.yaml (beside the checkpoint or its run directory); --config's "
        "'data' section, --data and --path replace them when given.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (or a run directory holding checkpoint/)")
    p.add_argument("--data", default=None, choices=SPLIT_SOURCES, help="data source (default: the run's)")
    p.add_argument("--path", default=None, help="data path (default: the run's)")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="which held-out split")
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="evaluate on another draw of the data (synthetic: another world and requests; letor: other "
        "simulated feedback; mind: no effect); default: the run's data seed",
    )
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_args(p, TrainConfig, seed=None)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.config import load_config
    from dualrerank.errors import ConfigError
    from dualrerank.models.checkpoint import load_checkpoint, resolve_checkpoint
    from dualrerank.train.evaluation import evaluate
    from dualrerank.train.splits import load_splits
    from dualrerank.train.supervised import TrainConfig

    if args.seed is not None:
        raise ConfigError(
            "evaluate has no run seed (--seed is a run's seed in train and distill); "
            "--data-seed S evaluates on another draw of the data"
        )
    model = load_checkpoint(resolve_checkpoint(args.checkpoint))  # a bad checkpoint fails before anything else
    overrides: dict[str, Any] = {}
    found = run_data_section(args.checkpoint)
    if not user_config_has(args, "data"):
        if found is not None:
            overrides["data"] = found[0]
        else:
            note(
                "evaluate",
                f"no run config beside {args.checkpoint}: using the default data settings "
                "(give --config with the run's 'data' section to evaluate on its held-out requests)",
            )
    overrides.update({"data.source": args.data, "data.path": args.path, "data.seed": args.data_seed})
    cfg = load_config(TrainConfig, args.config, overrides).data
    if args.data_seed is not None:
        note("evaluate", f"--data-seed {args.data_seed}: {_DATA_SEED_EFFECT[cfg.source]}")
    splits = load_splits(cfg)
    split = splits.valid if args.split == "valid" else splits.test
    figures = evaluate(model.rerank, split, splits.page_length)
    result = {
        "checkpoint": str(args.checkpoint),
        "source": cfg.source,
        "split": args.split,
        "data_seed": cfg.seed,
        "requests": split.batch.batch_size,
        "page_length": splits.page_length,
        **figures,
    }
    if args.json:
        print_json(result)
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0
