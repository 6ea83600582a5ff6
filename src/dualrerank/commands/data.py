"""`dualrerank data inspect`: load a data source and print its statistics.

    dualrerank data inspect --source letor --path data/MQ2008 [--json]
    dualrerank data inspect --source letor --path data/MQ2008 --fold 1   # train/vali/test
    dualrerank data inspect --source mind --path data/MINDsmall_train
    dualrerank data inspect --source synthetic --seed 3 --num-requests 200
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from dualrerank.commands._common import add_config_args, load_from_args, print_json
from dualrerank.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.data import SOURCES, DataConfig

    parser = subparsers.add_parser("data", help="inspect data sources (LETOR/MSLR SVMlight, MIND, synthetic)",
                                   description="Work with data sources.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    parser.set_defaults(func=lambda args: _usage(parser))

    p = actions.add_parser(
        "inspect", help="print lists, documents, items per list, label distribution, feature width",
        description="Load a data source into a RerankBatch and print its statistics.",
    )
    p.add_argument("--source", choices=sorted(SOURCES), default=None,
                   help="data source (default: the config's, else synthetic)")
    p.add_argument("--path", default=None,
                   help="file or folder: an SVMlight file or a folder of S*.txt / *.txt (letor), a folder "
                        "with behaviors.tsv and news.tsv (mind), a world YAML or a `simulate --out` folder "
                        "(synthetic); required for letor and mind")
    p.add_argument("--num-requests", type=int, default=None,
                   help="synthetic: requests to generate (default 1000), or the first N of a `simulate --out` folder "
                        "(default all of them)")
    p.add_argument("--fold", type=int, default=None,
                   help="letor only: report train/vali/test of this fold (1-5) instead of the whole set")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_args(p, DataConfig)
    p.set_defaults(func=_inspect)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _inspect(args: argparse.Namespace) -> int:
    from dualrerank.data import DataConfig, DataWarning, load_from_config
    from dualrerank.data.stats import dataset_stats, format_stats
    from dualrerank.data.svmlight import load_letor_folds

    cfg = load_from_args(DataConfig, args, {"source": args.source, "path": args.path, "num_requests": args.num_requests})
    if cfg.source in ("letor", "mind") and not cfg.path:
        raise ConfigError(f"--path is required for --source {cfg.source}")
    if args.fold is not None and cfg.source != "letor":
        raise ConfigError("--fold applies to --source letor only")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        if args.fold is not None:
            splits = load_letor_folds(cfg.path, args.fold, cfg.letor)
            out: dict[str, Any] = {"source": cfg.source, "path": cfg.path, "fold": args.fold,
                                   "splits": {k: dataset_stats(v) for k, v in splits.items()}}
        else:
            out = {"source": cfg.source, "path": cfg.path, **dataset_stats(load_from_config(cfg))}
    notes = []
    for w in caught:
        if issubclass(w.category, DataWarning):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out["notes"] = notes

    if args.json:
        print_json(out)
    elif args.fold is not None:
        header = {"source": out["source"], "path": out["path"]}
        blocks = [format_stats({**header, **s} if k == "train" else s, title=f"[fold {args.fold}: {k}]")
                  for k, s in out["splits"].items()]
        print("\n\n".join(blocks + [f"note: {n}" for n in notes]))
    else:
        print(format_stats(out))
    return 0
