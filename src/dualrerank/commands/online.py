"""`dualrerank online`: joint online training of the student (GRPO / Dr. GRPO / GDPO / LDRO)
and the teacher on a stream of the simulated world (docs/online.md).

    dualrerank online --from runs/student --out runs/online                       # LDRO, default world
    dualrerank online --from runs/student --config configs/online.yaml --method grpo --out runs/grpo
    dualrerank online --from runs/student --out runs/online --resume              # continue a stopped run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dualrerank.commands._common import add_config_args, add_run_args, load_run_config, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from dualrerank.train.online import METHODS, OnlineConfig

    p = subparsers.add_parser(
        "online",
        help="online RL of the student (ldro, grpo, dr_grpo, gdpo, ablations) with the teacher learning too",
        description="Stream requests from the simulated world (with its drift schedule), serve Gumbel-Max groups from the "
        "student, score them with the reward system, update the student with the chosen method and the teacher and "
        "evaluator on the exposures. Writes config.yaml, metrics.jsonl (one line per step), online.pt (resume point) "
        "and the final student/, teacher/, evaluator/ checkpoints into --out.",
    )
    p.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        default=None,
        help="a distill run directory: its student, the teacher it names and that teacher's evaluator "
        "(default: train them first, with the default train and distill settings, into OUT-bootstrap/)",
    )
    p.add_argument("--method", default=None, choices=sorted(METHODS), help="method preset (default: the config's, else ldro)")
    p.add_argument("--steps", type=int, default=None, help="override steps")
    add_run_args(p)
    p.add_argument("--json", action="store_true", help="print the last evaluation as JSON")
    add_config_args(p, OnlineConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.train.online import OnlineConfig, run_online

    cfg = load_run_config(OnlineConfig, args, {"method": args.method, "steps": args.steps})
    from_dir = args.from_dir
    if from_dir is None:
        from dualrerank.commands._common import note
        from dualrerank.train.online import bootstrap

        boot = args.out.parent / f"{args.out.name}-bootstrap"
        note("online", f"no --from: training the teacher, evaluator and student first into {boot} (reused when finished)")
        from_dir = bootstrap(cfg, boot, progress=not args.quiet)
    result = run_online(
        cfg, args.out, from_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, report_to=args.report_to
    )
    if args.json:
        print_json(result)
    else:
        print(f"{args.out}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0
