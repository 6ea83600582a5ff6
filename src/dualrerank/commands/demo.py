"""`dualrerank demo`: the whole method end to end on the simulated world (the README's first
command): teacher, SKD student, baselines, LDRO vs GRPO online across a shift, a simulated
A/B test, ONNX export, report.

    dualrerank demo                       # about 10 minutes on 2 cores
    dualrerank demo --fast                # about 2 minutes: smaller world sample, fewer epochs and steps
    dualrerank demo --out runs/demo       # re-run with the same --out: finished stages are reused
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dualrerank.commands._common import add_config_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.demo import DemoConfig

    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline end to end on the simulated world, with a report",
        description="Simulated world -> logs -> AR teacher -> SKD student (with baselines) -> LDRO vs GRPO online "
        "across a preference shift -> simulated A/B test -> ONNX export -> report.md, summary.json and plots in --out. "
        "Interrupted and re-run with the same --out, it reuses the finished stages.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo directory (default: runs/demo)")
    p.add_argument("--fast", action="store_true", help="smaller sizes: about 2 minutes instead of about 10")
    p.add_argument("--quiet", action="store_true", help="no progress bars (stage lines are still printed)")
    add_config_args(p, DemoConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import yaml

    from dualrerank.demo import demo_config, run_demo
    from dualrerank.errors import ConfigError

    overrides: dict[str, Any] = {}
    if args.config is not None:
        from dualrerank.config import load_config
        from dualrerank.demo import DemoConfig

        load_config(DemoConfig, args.config)  # one-line errors for a bad file or key
        overrides = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is an existing file; give a directory for the demo")
    cfg = demo_config(args.fast, overrides)
    t0 = time.perf_counter()
    summary = run_demo(cfg, args.out, progress=not args.quiet)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {args.out / 'report.md'}")
    serve = summary.get("serve", {}).get("checkpoint")
    if serve:
        print(f"serve the student: dualrerank serve --checkpoint {serve}")
    return 0
