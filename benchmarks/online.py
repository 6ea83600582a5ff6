"""Throughput of the online step: requests per second through serve -> feedback -> reward
-> advantage -> K clipped epochs -> teacher and evaluator steps, and each stage's share.

    python benchmarks/online.py                      # B=64, G=8, n=50, L=10, 20 timed steps
    python benchmarks/online.py --method grpo --steps 10 --out runs/bench/online.json

Models have the offline experiment's sizes (configs/offline_synthetic.yaml: d_model 32,
4 heads, 2 encoder and 2 decoder layers); weights are untrained (the step's cost does not
depend on their values). The world is the default one (n = 50 candidates). The first
`--warmup` steps are not timed. Issue 10's target: at least 500 requests per second on 2
cores, and no stage above half of the step unless it is the policy update itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from dualrerank.files import write_json
from dualrerank.models.checkpoint import save_checkpoint
from dualrerank.sim import World
from dualrerank.train.online import METHODS, OnlineConfig, OnlineState, RewardScale, _parts_from, online_step, reward_system
from dualrerank.train.supervised import build_for_data

SIZES = {"encoder": {"d_model": 32, "n_heads": 4, "n_layers": 2}, "n_layers": 2, "n_heads": 4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ldro", choices=sorted(METHODS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="K clipped epochs per step")
    ap.add_argument("--exposure", default="one", choices=("one", "all"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    world = World()
    _, sample = world.sample_requests(256, 0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_checkpoint(build_for_data("teacher", SIZES, sample, 1), root / "teacher" / "checkpoint", "teacher")
        save_checkpoint(build_for_data("evaluator", {"encoder": SIZES["encoder"]}, sample, 2),
                        root / "teacher" / "evaluator" / "checkpoint", "evaluator")
        save_checkpoint(build_for_data("nar", SIZES, sample, 3), root / "student" / "checkpoint", "nar",
                        extra={"distilled_from": str(root / "teacher")})
        student, teacher, evaluator, _ = _parts_from(root / "student")
    cfg = OnlineConfig(method=args.method, batch_size=args.batch, group=args.group, epochs=args.epochs,
                       exposure=args.exposure, steps=10**9, eval_every=10**9)
    state = OnlineState(
        student=student, teacher=teacher, evaluator=evaluator,
        reference=build_for_data("nar", SIZES, sample, 3).requires_grad_(False).eval(),
        student_opt=torch.optim.AdamW(student.parameters(), lr=cfg.lr),
        teacher_opt=torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr),
        evaluator_opt=torch.optim.AdamW(evaluator.parameters(), lr=cfg.evaluator_lr),
        scale=RewardScale(len(reward_system(cfg, evaluator).names), cfg.scale_momentum, cfg.scale_warmup, cfg.scale_jump),
        watch_ratio=RewardScale(1, cfg.scale_momentum, cfg.scale_warmup, cfg.scale_jump),
    )
    rps, stages = [], {}
    for i in range(args.warmup + args.steps):
        rec = online_step(state, world, cfg)
        if i >= args.warmup:
            rps.append(rec["perf/requests_per_second"])
            for k, v in rec.items():
                if k.startswith("perf/seconds/"):
                    stages.setdefault(k.split("/")[-1], []).append(v)
    total = sum(sum(v) for v in stages.values())
    share = {k: sum(v) / total for k, v in stages.items()}
    out = {
        "method": args.method, "B": args.batch, "G": args.group, "n": world.config.requests.num_candidates, "L": cfg.page_length,
        "K": args.epochs, "exposure": args.exposure, "threads": args.threads, "steps": args.steps,
        "requests_per_second_median": statistics.median(rps), "stage_share": share,
        "machine": platform.platform(), "torch": torch.__version__,
    }
    print(f"online step, {args.method}, B={args.batch} G={args.group} n={out['n']} L={out['L']} K={args.epochs} "
          f"exposure={args.exposure} threads={args.threads}: {out['requests_per_second_median']:.0f} requests/s (median of {args.steps})")
    print(f"{'stage':<20}{'share':>8}")
    for k, v in sorted(share.items(), key=lambda kv: -kv[1]):
        print(f"{k:<20}{v:>8.1%}")
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
