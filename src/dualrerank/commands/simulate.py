"""`dualrerank simulate`: draw logs from the simulated world and report its calibration.

    dualrerank simulate --requests 2000 --seed 7 --out runs/sim [--json] [--config configs/synthetic.yaml]

Writes the logged data to --out (see `dualrerank.data.synthetic.save_logs`) plus
summary.json: the mean exact expected utility and normalized utility of the oracle,
greedy, perfect pointwise sorter, upstream sort, logging and random pages, and the
calibration checks of docs/simulator.md. --seed draws the requests, pages and feedback;
the world itself (catalogue, category structure) is fixed by the config's `seed` key.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import cast

from dualrerank.commands._common import add_config_args, print_json
from dualrerank.config import load_config
from dualrerank.errors import ConfigError
from dualrerank.files import write_json
from dualrerank.sim.calibration import POLICIES, calibration_checks, evaluate_policies
from dualrerank.sim.config import WorldConfig
from dualrerank.sim.world import World

DEFAULT_REQUESTS = 2000


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="draw logs from the simulated world; report oracle/pointwise/upstream/logging/random utility and calibration",
        description=__doc__.split("\n\n")[0],
    )
    add_config_args(
        p,
        WorldConfig,
        seed_help="seed of the requests, pages and feedback (default 0); the world itself is fixed by the config's `seed` key",
    )
    p.add_argument(
        "--requests", type=int, default=DEFAULT_REQUESTS, metavar="N", help=f"number of requests (default {DEFAULT_REQUESTS})"
    )
    p.add_argument("--page-length", type=int, default=None, metavar="L", help="page length (default: config's page_length, 10)")
    p.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="folder for the logs and summary.json (default: write nothing)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=run)


def build_summary(world: World, logs, config_path: Path | None, progress: bool) -> dict:
    """summary.json: utilities, normalized utilities, calibration checks, log statistics."""
    batch, fb = logs.batch, logs.feedback
    L = int(batch.logged_page.shape[1])
    scores = evaluate_policies(world, logs.state, L, logging_pages=batch.logged_page, progress=progress)
    scale = world.params.scales
    return {
        "seed": logs.seed,
        "world_seed": world.seed,
        "config": str(config_path) if config_path is not None else None,
        "requests": batch.batch_size,
        "num_candidates": batch.num_candidates,
        "page_length": L,
        "viewport": world.config.response.viewport,
        "duration_source": world.catalogue.duration_source,
        "policies": list(POLICIES),
        **scores,
        # the utilities are finite (None only for NaN) on a working world
        "calibration": calibration_checks(cast(dict[str, dict[str, float]], scores)),
        "logs": {
            "mean_clicks_per_page": round(float(fb.click.sum(-1).double().mean()) / scale["click"], 6),
            "mean_long_views_per_page": round(float(fb.long_view.sum(-1).double().mean()) / scale["long_view"], 6),
            "mean_watch_seconds_per_page": round(float(fb.watch_time.sum(-1).double().mean()) / scale["watch_time"], 6),
            "reformulation_rate": round(float(fb.reformulate.double().mean()), 6),
            "uniform_share": world.config.logging.uniform_share,
            "label_names": list(batch.label_names),
        },
    }


def _print_table(summary: dict) -> None:
    print(f"{summary['requests']} requests, n={summary['num_candidates']}, L={summary['page_length']}, seed {summary['seed']}")
    print(f"{'policy':<18}{'utility':>10}{'normalized':>12}")
    for name in summary["policies"]:
        nu = summary["normalized_utility"][name]
        print(f"{name:<18}{summary['utility'][name]:>10.4f}{(nu if nu is not None else float('nan')):>12.4f}")
    for key, value in summary["calibration"].items():
        print(f"  {key}: {value}")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1:
        raise ConfigError(f"--requests: must be >= 1, got {args.requests}")
    overrides = {"page_length": args.page_length} if args.page_length is not None else None
    config = load_config(WorldConfig, args.config, overrides)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out: {args.out} exists and is not a folder")
    from dualrerank.data.synthetic import save_logs, simulate_logs

    seed = 0 if args.seed is None else args.seed
    start = time.perf_counter()
    world = World(config)
    logs = simulate_logs(world, args.requests, seed, config.page_length)
    summary = build_summary(world, logs, args.config, progress=True)
    if args.out is not None:
        files = save_logs(logs, args.out)
        write_json(args.out / "summary.json", summary)
        print(f"simulate: wrote {', '.join(files + ['summary.json'])} to {args.out}", file=sys.stderr)
    print(f"simulate: {args.requests} requests in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.json:
        print_json(summary)
    else:
        _print_table(summary)
    return 0
