"""Simulator throughput: exact page evaluations per second and sampled-feedback throughput.

    python benchmarks/simulator.py [--batch 1024] [--candidates 50] [--page-length 10]
                                   [--repeats 50] [--threads N] [--out FILE.json]

Measures, on one batch of requests of the default world:
  * exact expected utility of B pages `[B, L]` (pages/s; target >= 50,000 on 2 cores),
  * the same for groups `[B, 8, L]`,
  * sampled feedback (pages/s),
  * oracle beam search and greedy search (requests/s).
Each figure is the median over `--repeats` timed calls after warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from dualrerank.sim import World, WorldConfig


def _median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--page-length", type=int, default=10)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = WorldConfig()
    config = replace(base, requests=replace(base.requests, num_candidates=args.candidates))
    world = World(config, seed=0)
    state, _ = world.sample_requests(args.batch, 1)
    B, L, G = args.batch, args.page_length, args.group
    pages = world.random_pages(state, L, 2)
    groups = world.random_pages(state, L, 3, groups=G)
    gen = torch.Generator().manual_seed(4)

    t_eval = _median_seconds(lambda: world.expected_utility(state, pages), args.repeats)
    t_group = _median_seconds(lambda: world.expected_utility(state, groups), max(args.repeats // 4, 3))
    t_sample = _median_seconds(lambda: world.sample_feedback(state, pages, gen), args.repeats)
    t_greedy = _median_seconds(lambda: world.greedy_pages(state, L), 3, warmup=1)
    t_oracle = _median_seconds(lambda: world.oracle_pages(state, L), 3, warmup=1)

    result = {
        "batch": B,
        "candidates": args.candidates,
        "page_length": L,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "exact_pages_per_s": round(B / t_eval),
        "exact_ms_per_batch": round(1000 * t_eval, 3),
        "exact_group_pages_per_s": round(B * G / t_group),
        "sampled_feedback_pages_per_s": round(B / t_sample),
        "greedy_requests_per_s": round(B / t_greedy),
        "oracle_requests_per_s": round(B / t_oracle),
        "oracle_beam_width": config.oracle.beam_width,
    }
    print(f"simulator benchmark: B={B}, n={args.candidates}, L={L}, {result['threads']} threads, torch {torch.__version__}")
    rows = [
        ("exact utility [B, L]", f"{result['exact_pages_per_s']:>12,} pages/s", f"({result['exact_ms_per_batch']} ms per batch; target >= 50,000)"),
        (f"exact utility [B, {G}, L]", f"{result['exact_group_pages_per_s']:>12,} pages/s", ""),
        ("sampled feedback [B, L]", f"{result['sampled_feedback_pages_per_s']:>12,} pages/s", ""),
        ("greedy over exact utility", f"{result['greedy_requests_per_s']:>12,} requests/s", ""),
        (f"oracle beam search (W={config.oracle.beam_width})", f"{result['oracle_requests_per_s']:>12,} requests/s", ""),
    ]
    for name, value, note in rows:
        print(f"  {name:<30}{value}  {note}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
