"""Off-policy estimators against the simulated world's exact truth: bias, RMSE and interval
coverage per estimator, log size and target policy (upstream sort, the teacher, the student).

    OMP_NUM_THREADS=1 python benchmarks/ope.py --teacher /tmp/qdef --student /tmp/onl/student \\
        --out runs/bench/ope.json

Design (what one replicate is):
- the world is the default one with seed `--world-seed` (the world the policies were trained
  on); one pool of `--pool` requests is drawn once (seed `--seed`), and each policy's pages,
  the evaluator's predictions on them, the logging policy's prefix probabilities and
  item-position marginals, and the exact truth are computed once per request;
- each of `--seeds` log seeds draws fresh logging pages and feedback for the whole pool
  (the requests stay: what varies is what the logging policy showed and what users did);
- a log of size N is a slice of N consecutive pool requests: per seed, the pool holds
  pool / N disjoint logs (100 of 1,000, 10 of 10,000, 1 of 100,000), each estimated on its
  own and compared with the exact value of the policy on *its* requests;
- so at 100,000 the replicates share their requests (the truth is conditional on them) and
  differ only in logging and feedback; the normal intervals also count request sampling,
  which makes them conservative there.

The estimand: mean page reward = w_click E[clicks] + w_lv E[long views] of the target's page
(train/ope.py). Columns: `truth` mean true value, `bias` mean(estimate - truth), `bias_%` of
the truth, `bias_se` its Monte-Carlo standard error (sd of the errors / sqrt(replicates)), `rmse`, `coverage` share of replicates whose interval holds the truth,
`ci_width` mean interval width, `support` share of replicates with at least one non-zero
weight. The target of issue 11: at 100,000 requests, some estimator with |bias| < 2% of
the truth and coverage >= 90% for each policy.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from dualrerank.models.checkpoint import load_checkpoint
from dualrerank.report import markdown_table
from dualrerank.sim import World, WorldConfig
from dualrerank.sim.catalogue import seeded
from dualrerank.train.ope import ESTIMATORS, LoggingPolicy, deterministic_inputs, estimate_all

SIZES = (1_000, 10_000, 100_000)


def _chunked(fn, B: int, chunk: int):
    return torch.cat([fn(slice(s, s + chunk)) for s in range(0, B, chunk)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("/tmp/qdef"), help="teacher run (its evaluator/ is the DM model)")
    ap.add_argument("--student", type=Path, default=Path("/tmp/onl/student"), help="student run")
    ap.add_argument("--evaluator", type=Path, default=None, help="evaluator checkpoint (default: TEACHER/evaluator/checkpoint)")
    ap.add_argument("--pool", type=int, default=100_000, help="requests in the pool (the largest log size)")
    ap.add_argument("--seeds", type=int, default=10, help="log seeds (logging pages and feedback) over the pool")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="log sizes (each divides --pool)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pool's requests (log seed s is seed + 1 + s)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--marginal-samples", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    if any(args.pool % n for n in args.sizes):
        ap.error("every --sizes value must divide --pool")
    t0 = time.perf_counter()
    clock: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        now = time.perf_counter()
        clock[name] = round(now - since, 1)
        print(f"[{now - t0:6.0f} s] {name}: {now - since:.1f} s", file=sys.stderr, flush=True)
        return now

    world = World(WorldConfig(), seed=args.world_seed)
    L = world.config.page_length
    weights = torch.tensor([world.config.utility.weight_click, world.config.utility.weight_long_view], dtype=torch.float64)
    state, batch = world.sample_requests(args.pool, seeded(args.seed, "ope-benchmark-requests"))
    B = args.pool
    t = tick("requests", t0)

    teacher = load_checkpoint(args.teacher / "checkpoint")
    student = load_checkpoint(args.student / "checkpoint")
    ev_dir = args.evaluator or args.teacher / "evaluator" / "checkpoint"
    evaluator = load_checkpoint(ev_dir)
    policies = {"upstream": world.upstream_pages(batch, L)}
    with torch.inference_mode():
        for name, model in (("teacher", teacher), ("student", student)):
            policies[name] = _chunked(lambda s: model.rerank(batch.select(s), L).long(), B, args.chunk)
            t = tick(f"{name} pages", t)
    names = list(policies)
    targets = torch.stack([policies[p] for p in names], 1)  # [B, P, L]
    P = len(names)
    exp = world.expectation(state, targets)
    truth = (exp.click.double() * weights[0] + exp.long_view.double() * weights[1]).sum(-1)  # [B, P]
    t = tick("truth", t)

    logging = LoggingPolicy.of_world(world, batch)
    prefix = logging.prefix_log_prob(targets).exp()  # [B, P, L]
    g = torch.Generator().manual_seed(args.seed)
    marginals = _chunked(lambda s: LoggingPolicy(logging.logits[s], logging.mask[s], logging.uniform_share)
                         .position_marginals(targets[s], args.marginal_samples, g), B, args.chunk)
    t = tick("logging prefix probabilities and marginals", t)

    # Every seed's logging pages and feedback for the whole pool (cheap), so that the
    # evaluator encodes each request once for its P target pages and S logged pages.
    logs = []
    for s in range(args.seeds):
        gs = seeded(args.seed + 1 + s, "ope-benchmark-logs")
        pages, propensity = world.logging_pages(state, L, gs)
        fb = world.sample_feedback(state, pages, gs)
        reward = (fb.click > 0).double() * weights[0] + (fb.long_view > 0).double() * weights[1]
        logs.append((pages, propensity, reward))
    t = tick("logs", t)
    all_pages = torch.cat([targets, torch.stack([lg[0] for lg in logs], 1)], 1)
    with torch.inference_mode():
        pred = _chunked(lambda s: evaluator.predict(batch.select(s), all_pages[s]).double() @ weights, B, args.chunk)
    t = tick(f"evaluator on {P} target + {args.seeds} logged pages per request", t)

    records: dict[tuple[int, str, str], list[tuple[float, float, bool, bool, float]]] = {}
    for s, (pages, propensity, reward) in enumerate(logs):
        for N in args.sizes:
            for k in range(B // N):
                sl = slice(k * N, (k + 1) * N)
                for j, name in enumerate(names):
                    x = deterministic_inputs(targets[sl, j], pages[sl], propensity[sl], reward[sl],
                                             marginals=marginals[sl, j], prefix_prob=prefix[sl, j],
                                             value=pred[sl, j].sum(1), predicted=pred[sl, P + s])
                    true = float(truth[sl, j].mean())
                    for est, fig in estimate_all(x, list(ESTIMATORS), truth=true).items():
                        if "estimate" not in fig:
                            continue
                        supported = fig.get("nonzero_share", 1.0) > 0
                        records.setdefault((N, name, est), []).append(
                            (fig["estimate"] - true, true, fig["covered"], supported, fig["ci_high"] - fig["ci_low"]))
    t = tick("estimates", t)

    rows = []
    for (N, name, est), rec in records.items():
        err = torch.tensor([r[0] for r in rec], dtype=torch.float64)
        tr = sum(r[1] for r in rec) / len(rec)
        bias = float(err.mean())
        rows.append({
            "requests": N, "policy": name, "estimator": est, "replicates": len(rec), "truth": tr, "bias": bias,
            "bias_%": 100 * bias / tr, "bias_se": float(err.std() / math.sqrt(len(rec))) if len(rec) > 1 else None,
            "rmse": float(err.pow(2).mean().sqrt()),
            "coverage": sum(r[2] for r in rec) / len(rec), "ci_width": sum(r[4] for r in rec) / len(rec),
            "support": sum(r[3] for r in rec) / len(rec),
        })
    columns = ["requests", "policy", "estimator", "replicates", "truth", "bias", "bias_%", "bias_se", "rmse", "coverage", "ci_width",
               "support"]
    print(markdown_table(rows, columns, digits=3))
    largest = max(args.sizes)
    verdict = {}
    for name in names:
        ok = [r["estimator"] for r in rows if r["requests"] == largest and r["policy"] == name
              and abs(r["bias_%"]) < 2 and r["coverage"] >= 0.9]
        verdict[name] = ok
        print(f"{largest:,} requests, {name}: |bias| < 2% and coverage >= 90%: {', '.join(ok) if ok else 'none'}")
    met = all(verdict.values())
    print(f"target (some estimator per policy): {'met' if met else 'not met'}; {time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "rows": rows, "verdict": verdict, "target_met": met, "seconds": clock, "args": {k: str(v) for k, v in vars(args).items()},
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
