"""`dualrerank data inspect`: load a data source and print its statistics;
`dualrerank data convert`: write any source as a columnar request log (Parquet).

    dualrerank data inspect --source letor --path data/MQ2008 [--json]
    dualrerank data inspect --source letor --path data/MQ2008 --fold 1   # train/vali/test
    dualrerank data inspect --source mind --path data/MINDsmall_train
    dualrerank data inspect --source synthetic --seed 3 --num-requests 200
    dualrerank data convert --source letor --path data/MQ2008 --out mq2008.parquet
    dualrerank data inspect --source parquet --path mq2008.parquet
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dualrerank.commands._common import add_config_args, load_from_args, print_json
from dualrerank.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.data import SOURCES, DataConfig

    parser = subparsers.add_parser(
        "data",
        help="inspect and convert data sources (LETOR/MSLR SVMlight, MIND, Parquet request logs, synthetic)",
        description="Work with data sources.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    parser.set_defaults(func=lambda args: _usage(parser))

    p = actions.add_parser(
        "inspect",
        help="print lists, documents, items per list, label distribution, feature width",
        description="Load a data source into a RerankBatch and print its statistics.",
    )
    p.add_argument("--source", choices=sorted(SOURCES), default=None, help="data source (default: the config's, else synthetic)")
    p.add_argument(
        "--path",
        default=None,
        help="file or folder: an SVMlight file or a folder of S*.txt / *.txt (letor), a folder "
        "with behaviors.tsv and news.tsv (mind), a world YAML or a `simulate --out` folder "
        "(synthetic), a .parquet request log or a folder of them (parquet); required for "
        "letor, mind and parquet",
    )
    p.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="synthetic: requests to generate (default 1000), or the first N of a `simulate --out` folder (default all of them)",
    )
    p.add_argument(
        "--fold", type=int, default=None, help="letor only: report train/vali/test of this fold (1-5) instead of the whole set"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_args(p, DataConfig)
    p.set_defaults(func=_inspect)

    c = actions.add_parser(
        "convert",
        help="write a data source as a Parquet request log (one row per request)",
        description="Load a data source into a RerankBatch and write it as a columnar request log "
        "(docs/data.md, 'Columnar request logs'), readable with --source parquet.",
    )
    c.add_argument(
        "--source", choices=sorted(SOURCES), default=None, help="data source to read (default: the config's, else synthetic)"
    )
    c.add_argument(
        "--path", default=None, help="file or folder to read, as for `data inspect`; required for letor, mind and parquet"
    )
    c.add_argument(
        "--out", type=Path, required=True, metavar="FILE.parquet", help="Parquet file to write (replaced atomically if it exists)"
    )
    c.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="synthetic: requests to generate (default 1000), or the first N of a `simulate --out` folder; "
        "parquet: the first N requests",
    )
    c.add_argument(
        "--row-group-size",
        type=int,
        default=None,
        help="requests per row group, the unit read at once and shuffled (default 4096)",
    )
    c.add_argument("--json", action="store_true", help="print what was written as JSON")
    add_config_args(c, DataConfig)
    c.set_defaults(func=_convert)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _inspect(args: argparse.Namespace) -> int:
    from dualrerank.data import DataConfig, load_from_config
    from dualrerank.data.stats import dataset_stats, format_stats
    from dualrerank.data.svmlight import load_letor_folds

    cfg = load_from_args(DataConfig, args, {"source": args.source, "path": args.path, "num_requests": args.num_requests})
    if cfg.source in ("letor", "mind", "parquet") and not cfg.path:
        raise ConfigError(f"--path is required for --source {cfg.source}")
    if args.fold is not None and cfg.source != "letor":
        raise ConfigError("--fold applies to --source letor only")

    def load() -> dict[str, Any]:
        if args.fold is not None:
            assert cfg.path is not None  # --fold: letor only, which requires --path (checked above)
            splits = load_letor_folds(cfg.path, args.fold, cfg.letor)
            return {
                "source": cfg.source,
                "path": cfg.path,
                "fold": args.fold,
                "splits": {k: dataset_stats(v) for k, v in splits.items()},
            }
        return {"source": cfg.source, "path": cfg.path, **dataset_stats(load_from_config(cfg))}

    out, notes = _with_notes(load)
    out["notes"] = notes

    if args.json:
        print_json(out)
    elif args.fold is not None:
        header = {"source": out["source"], "path": out["path"]}
        blocks = [
            format_stats({**header, **s} if k == "train" else s, title=f"[fold {args.fold}: {k}]")
            for k, s in out["splits"].items()
        ]
        print("\n\n".join(blocks + [f"note: {n}" for n in notes]))
    else:
        print(format_stats(out))
    return 0


def _with_notes(load: Callable[[], Any]) -> tuple[Any, list[str]]:
    """`load()` and the `DataWarning` messages it issued (other warnings pass on as usual)."""
    from dualrerank.data import DataWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        result = load()
    notes = []
    for w in caught:
        if issubclass(w.category, DataWarning):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, notes


def _convert(args: argparse.Namespace) -> int:
    from dualrerank.data import DataConfig, load_from_config
    from dualrerank.data.columnar import DEFAULT_ROW_GROUP_SIZE, ParquetRequests, save_parquet

    cfg = load_from_args(DataConfig, args, {"source": args.source, "path": args.path, "num_requests": args.num_requests})
    if cfg.source in ("letor", "mind", "parquet") and not cfg.path:
        raise ConfigError(f"--path is required for --source {cfg.source}")
    if args.out.is_dir():
        raise ConfigError(f"--out: {args.out} is a folder; give the .parquet file to write")
    rows = DEFAULT_ROW_GROUP_SIZE if args.row_group_size is None else args.row_group_size
    if rows < 1:
        raise ConfigError(f"--row-group-size: must be >= 1, got {rows}")
    batch, notes = _with_notes(lambda: load_from_config(cfg))
    save_parquet(batch, args.out, row_group_size=rows)
    written = ParquetRequests(args.out)  # read back the footer: what a reader of the file will see
    out = {
        "source": cfg.source,
        "path": cfg.path,
        "out": str(args.out),
        "requests": written.num_requests,
        "row_groups": len(written.row_groups),
        "bytes": args.out.stat().st_size,
        "label_names": list(written.label_names),
        "feedback_names": list(written.feedback_names),
        "notes": notes,
    }
    if args.json:
        print_json(out)
    else:
        print(
            f"{args.out}: {out['requests']:,} requests in {out['row_groups']} row group(s), {out['bytes']:,} bytes "
            f"(from {cfg.source}{' ' + str(cfg.path) if cfg.path else ''})"
        )
        for n in notes:
            print(f"note: {n}")
    return 0
