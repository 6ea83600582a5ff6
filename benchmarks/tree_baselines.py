"""Tree rankers against each other (and the upstream order) over LETOR folds and seeds.

    OMP_NUM_THREADS=1 python benchmarks/tree_baselines.py --config configs/offline_mq2008.yaml \
        --folds 1 2 3 4 5 --seeds 0 1 2 --out runs/trees_mq2008
    OMP_NUM_THREADS=1 python benchmarks/tree_baselines.py --config configs/offline_mslr.yaml \
        --seeds 0 1 2 --out runs/trees_mslr

Each fold is one ordinary offline experiment (`train.experiment.run_offline_experiment`,
the code behind `dualrerank experiment offline`) restricted to `--models` (default:
upstream, lambdamart, catboost), written to OUT/fold<k>/ with its own summary.json and
report.md: the same loaders, splits, early stopping on the validation partition, and test
metrics as the full experiment. `--catboost-loss LOSS ...` adds the catboost row trained
with each other loss (OUT/fold<k>-<loss>/, row `catboost[<loss>]`). Reruns reuse finished
runs (`--reuse` of the experiment), so an interrupted benchmark resumes.

Printed and written to OUT/tree_baselines.json: per row, `--metric` (default ndcg@10) on
the test split per fold (mean over seeds), then the mean over folds ± the sample std over
folds; with one fold (the MSLR sample has no fold layout) the std is over seeds instead.
`seed_std` is the mean over folds of the std over seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dualrerank.config import load_config
from dualrerank.train.experiment import ExperimentConfig, run_offline_experiment


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="an offline experiment config (configs/offline_*.yaml)")
    p.add_argument("--out", type=Path, required=True, help="benchmark directory")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="LETOR folds (default: the config's data.fold)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the config's)")
    p.add_argument("--models", nargs="+", default=["upstream", "lambdamart", "catboost"], help="experiment rows to run")
    p.add_argument("--catboost-loss", nargs="+", default=[], metavar="LOSS",
                   help="also run the catboost row with each of these losses (e.g. LambdaMart QueryRMSE)")
    p.add_argument("--metric", default="ndcg@10", help="summary figure to tabulate")
    return p.parse_args(argv)


def _run(args: argparse.Namespace, fold: int | None, loss: str | None) -> tuple[dict[str, Any], float]:
    overrides: dict[str, Any] = {"seeds": args.seeds, "models": ["catboost"] if loss else args.models}
    if fold is not None:
        overrides["data.fold"] = fold
    if loss is not None:
        overrides["overrides.catboost.model_config.loss"] = loss
    cfg = load_config(ExperimentConfig, args.config, overrides)
    name = ("fold" + str(fold) if fold is not None else "run") + (f"-{loss}" if loss else "")
    command = shlex.join(["python", *sys.argv])
    t0 = time.perf_counter()
    summary = run_offline_experiment(cfg, args.out / name, reuse=True, progress=False, command=command)
    return summary, time.perf_counter() - t0


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    folds: list[int | None] = list(args.folds) if args.folds else [None]
    key = args.metric
    per_fold: dict[str, list[float | None]] = {}
    seed_std: dict[str, list[float]] = {}
    seeds_run: list[int] = []
    seconds = 0.0
    for fold in folds:
        for loss in [None, *args.catboost_loss]:
            summary, took = _run(args, fold, loss)
            seconds += took
            seeds_run = summary["config"]["seeds"]
            for row in summary["rows"]:
                name = row["model"] + (f"[{loss}]" if loss else "")
                per_fold.setdefault(name, []).append(row.get(key))
                if row.get(f"{key}_std") is not None:
                    seed_std.setdefault(name, []).append(row[f"{key}_std"])
            print(f"fold {fold if fold is not None else '-'}{' ' + loss if loss else ''}: {took:.0f} s", file=sys.stderr)

    table = []
    for name, values in per_fold.items():
        finite = [v for v in values if v is not None]
        mean = statistics.mean(finite) if finite else None
        if len(folds) > 1:
            std = statistics.stdev(finite) if len(finite) > 1 else None
        else:
            std = seed_std[name][0] if seed_std.get(name) else None
        table.append({
            "model": name, "per_fold": values, key: mean, f"{key}_std": std,
            "std_over": "folds" if len(folds) > 1 else "seeds",
            "seed_std": statistics.mean(seed_std[name]) if seed_std.get(name) else None,
        })
    result = {
        "config": str(args.config), "folds": folds, "seeds": seeds_run, "metric": key, "rows": table,
        "seconds": round(seconds, 1), "command": shlex.join(["python", *sys.argv]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tree_baselines.json").write_text(json.dumps(result, indent=2) + "\n")

    fold_cols = [f"fold {f}" for f in folds] if len(folds) > 1 else []
    over = "folds" if len(folds) > 1 else "seeds"
    print(f"| model | " + " | ".join(fold_cols + [f"{key} (mean ± std over {over})", "std over seeds (mean)"]) + " |")
    print("| :-- | " + " | ".join(["--:"] * (len(fold_cols) + 2)) + " |")
    for r in table:
        cells = [_fmt(v, None) for v in r["per_fold"]] if fold_cols else []
        cells += [_fmt(r[key], r[f"{key}_std"]), _fmt(r["seed_std"], None)]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    print(f"\n{len(folds)} fold(s) x seeds {seeds_run}; {seconds:.0f} s in all; {args.out / 'tree_baselines.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
