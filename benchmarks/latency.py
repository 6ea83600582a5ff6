"""Reranking latency: AR teacher (incremental greedy decoding) vs NAR student (PyTorch)
vs NAR student (ONNX Runtime), over candidates n, page length L and batch size.

    python benchmarks/latency.py --quick
    python benchmarks/latency.py --threads 1 --out runs/bench/latency.json

What is timed, per call (one batch of B requests, inputs already tensors):
    teacher        ARTeacher.rerank: encoder, then L incremental decoder steps (KV cache)
    student_torch  NARStudent.rerank: one encoder + NAR decoder pass, then L masked argmaxes
    student_onnx   the exported student graph in ONNX Runtime, then the NumPy greedy decode
                   (`dualrerank.serve.runtime.greedy_pages`), i.e. the serving path minus HTTP
Teacher and student share d_model, heads and depth. Weights are random (untrained):
latency does not depend on their values. All candidates are valid (no padding).
p50/p99 are per call; for batch 1 that is per request, for batch B > 1 the per-request
cost is the call time / B (column `req_p50_ms`). Measurements are interleaved (one call
of each model in turn) so that load changes on the machine hit all models alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dualrerank.models.encoder import EncoderConfig
from dualrerank.models.student import NARStudent, StudentConfig
from dualrerank.models.teacher import ARTeacher, TeacherConfig
from dualrerank.schema import RerankBatch
from dualrerank.serve.export import export_student_bytes
from dualrerank.serve.runtime import OnnxBackend, greedy_pages

MODELS = ("teacher", "student_torch", "student_onnx")


def build_models(args: argparse.Namespace, max_length: int) -> tuple[ARTeacher, NARStudent, OnnxBackend]:
    torch.manual_seed(args.seed)
    enc = EncoderConfig(candidate_dim=args.features, context_dim=args.context, d_model=args.d_model,
                        n_heads=args.heads, n_layers=args.layers, dropout=0.0)
    teacher = ARTeacher(TeacherConfig(encoder=enc, n_layers=args.layers, n_heads=args.heads, dropout=0.0, max_length=max_length))
    student = NARStudent(StudentConfig(encoder=enc, n_layers=args.layers, n_heads=args.heads, dropout=0.0, max_positions=max_length))
    return teacher.eval(), student.eval(), OnnxBackend(export_student_bytes(student), threads=args.threads)


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    # min and p10 show the undisturbed cost when other processes preempt the benchmark.
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "p10_ms": float(np.percentile(a, 10)), "min_ms": float(a.min()), "mean_ms": float(a.mean()), "reps": int(a.size)}


def time_cell(fns: dict, min_reps: int, max_reps: int, max_seconds: float, warmup: int = 3) -> dict[str, dict[str, float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < max_seconds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        reps += 1
    return {name: percentiles(s) for name, s in samples.items()}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    grid_n = [50] if args.quick else [20, 50, 100, 200]
    grid_l = [4, 10] if args.quick else [4, 10, 20]
    grid_b = [1, 64] if args.quick else [1, 64]
    teacher, student, onnx = build_models(args, max(grid_l))
    rng = np.random.default_rng(args.seed)
    results = []
    for B in grid_b:
        for n in grid_n:
            for L in grid_l:
                if L > n:
                    continue
                X = rng.standard_normal((B, n, args.features)).astype(np.float32)
                C = rng.standard_normal((B, args.context)).astype(np.float32)
                M = np.ones((B, n), bool)
                batch = RerankBatch(candidates=torch.from_numpy(X), candidate_mask=torch.from_numpy(M), context=torch.from_numpy(C))

                def teacher_fn(batch=batch, L=L):
                    with torch.inference_mode():
                        return teacher.rerank(batch, L)

                def student_fn(batch=batch, L=L):
                    with torch.inference_mode():
                        return student.rerank(batch, L)

                def onnx_fn(X=X, C=C, M=M, L=L):
                    return greedy_pages(onnx.logits(X, C, M, L), M)[0]

                # Same pages from the student in both backends: the comparison is like for like.
                assert (student_fn().numpy() == onnx_fn()).all(), "ONNX and PyTorch student pages differ"
                stats = time_cell({"teacher": teacher_fn, "student_torch": student_fn, "student_onnx": onnx_fn},
                                  args.min_reps, args.max_reps, args.max_seconds)
                row = {"n": n, "L": L, "batch": B, **stats}
                row["ratio_student_torch_vs_teacher"] = stats["student_torch"]["p50_ms"] / stats["teacher"]["p50_ms"]
                row["ratio_student_onnx_vs_teacher"] = stats["student_onnx"]["p50_ms"] / stats["teacher"]["p50_ms"]
                row["ratio_onnx_vs_torch"] = stats["student_onnx"]["p50_ms"] / stats["student_torch"]["p50_ms"]
                results.append(row)
                print(format_row(row), flush=True)
    import onnxruntime

    meta = {
        "note": "random-init weights (latency does not depend on them); all candidates valid",
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
        "features": args.features, "context": args.context, "seed": args.seed,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return {"meta": meta, "results": results}


HEADER = (f"{'n':>4} {'L':>3} {'B':>3} | {'teacher p50/p99':>17} | {'st.torch p50/p99':>17} | {'st.onnx p50/p99':>17} | "
          f"{'req p50 (onnx)':>14} | {'torch/teach':>11} {'onnx/teach':>10} {'onnx/torch':>10}")


def format_row(r: dict) -> str:
    cell = lambda m: f"{r[m]['p50_ms']:7.3f}/{r[m]['p99_ms']:8.3f}"  # noqa: E731
    per_req = r["student_onnx"]["p50_ms"] / r["batch"]
    return (f"{r['n']:>4} {r['L']:>3} {r['batch']:>3} | {cell('teacher')} | {cell('student_torch')} | {cell('student_onnx')} | "
            f"{per_req:14.4f} | {r['ratio_student_torch_vs_teacher']:11.3f} {r['ratio_student_onnx_vs_teacher']:10.3f} "
            f"{r['ratio_onnx_vs_torch']:10.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid: n=50, L in {4,10}, batch in {1,64}")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads and ORT intra-op threads")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="encoder blocks and decoder blocks (each)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--features", type=int, default=16, help="candidate feature width d")
    p.add_argument("--context", type=int, default=8, help="context feature width c")
    p.add_argument("--min-reps", type=int, default=50)
    p.add_argument("--max-reps", type=int, default=400)
    p.add_argument("--max-seconds", type=float, default=3.0, help="time budget per grid cell (after min-reps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads < 1 or args.min_reps < 1 or args.max_reps < args.min_reps:
        p.error("need --threads >= 1 and 1 <= --min-reps <= --max-reps")
    print(HEADER)
    print("-" * len(HEADER))
    report = run(args)
    key = next((r for r in report["results"] if (r["n"], r["L"], r["batch"]) == (50, 10, 1)), None)
    if key is not None:
        print(f"\nn=50, L=10, batch 1: student_torch/teacher = {key['ratio_student_torch_vs_teacher']:.3f} "
              f"(target <= 0.33), student_onnx/teacher = {key['ratio_student_onnx_vs_teacher']:.3f}, "
              f"onnx p50 {key['student_onnx']['p50_ms']:.3f} ms vs torch p50 {key['student_torch']['p50_ms']:.3f} ms "
              f"(p10: teacher {key['teacher']['p10_ms']:.3f}, torch {key['student_torch']['p10_ms']:.3f}, "
              f"onnx {key['student_onnx']['p10_ms']:.3f} ms)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
