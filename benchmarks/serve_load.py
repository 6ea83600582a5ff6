"""Load test of the HTTP service: a real `dualrerank serve` process on 127.0.0.1 (`--port 0`:
the server picks a free port and prints it), a fixed number of concurrent clients, a fixed duration and request cap; it stops
by itself and stops the server.

    python benchmarks/serve_load.py --quick
    python benchmarks/serve_load.py --backend onnx --concurrency 4 --duration 20 --out runs/bench/load.json
    python benchmarks/serve_load.py --checkpoint runs/demo/checkpoint --n 100 --k 10 --group 8

Without --checkpoint a random-init student (d_model 64, 2+2 layers, d=16, c=8) is saved
to a temporary directory and exported to ONNX: throughput does not depend on the weights.
Clients are asyncio tasks on one httpx.AsyncClient in this process; on a small machine
they compete with the server for the CPU, so the numbers are a floor.
Reported: throughput (successful requests / s), client-side p50/p99 (request sent ->
answer parsed), server-side p50/p99 (`latency_ms` of the answers), errors, and the
server's own /metrics counts as a cross-check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def make_checkpoint(directory: Path, args: argparse.Namespace) -> Path:
    import torch

    from dualrerank.models.encoder import EncoderConfig
    from dualrerank.models.student import NARStudent, StudentConfig
    from dualrerank.serve.bundle import save_serving_bundle

    torch.manual_seed(args.seed)
    enc = EncoderConfig(candidate_dim=args.features, context_dim=args.context, d_model=64, n_heads=4, n_layers=2, dropout=0.0)
    student = NARStudent(StudentConfig(encoder=enc, n_layers=2, n_heads=4, dropout=0.0, max_positions=max(20, args.k)))
    return save_serving_bundle(directory / "checkpoint", student)


def start_server(checkpoint: Path, args: argparse.Namespace, log_path: Path, out_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dualrerank.cli", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", "0", "--backend", args.backend, "--threads", str(args.threads), "--workers", str(args.workers)]
    with open(log_path, "w") as log, open(out_path, "w") as out:  # the child keeps its own handles
        return subprocess.Popen(cmd, stdout=out, stderr=log)


def wait_serving(proc: subprocess.Popen, log_path: Path, out_path: Path, timeout: float = 90.0) -> str:
    """The base URL from the server's `serving on URL` line (printed once it accepts connections)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out_path.read_text().splitlines():
            if line.startswith("serving on "):
                return line.removeprefix("serving on ").strip()
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    raise SystemExit(f"server did not start serving within {timeout:.0f} s")


def make_bodies(health: dict, args: argparse.Namespace, count: int = 64) -> list[bytes]:
    rng = np.random.default_rng(args.seed)
    d, c = health["candidate_dim"], health["context_dim"]
    bodies = []
    for i in range(count):
        body = {
            "request_id": f"load-{i}",
            "context": rng.standard_normal(c).round(5).tolist(),
            "candidates": [{"id": int(j), "features": rng.standard_normal(d).round(5).tolist()} for j in range(args.n)],
            "k": args.k,
        }
        if args.group > 1:
            body["group"] = args.group
        bodies.append(json.dumps(body).encode())
    return bodies


async def load(base: str, bodies: list[bytes], args: argparse.Namespace) -> dict:
    client_lat: list[float] = []
    server_lat: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as client:
        end = time.perf_counter() + args.duration

        async def worker() -> None:
            nonlocal sent
            while sent < args.max_requests and time.perf_counter() < end:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
                    data = r.json()
                except (httpx.HTTPError, ValueError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    continue
                client_lat.append(time.perf_counter() - t0)
                server_lat.append(data["latency_ms"] / 1e3)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    pct = lambda a, q: float(np.percentile(np.asarray(a) * 1e3, q)) if a else float("nan")  # noqa: E731
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith('dualrerank_http_requests_total{path="/v1/rerank",status="200"}'))
    return {
        "requests": sent, "ok": len(client_lat), "errors": sum(errors.values()), "error_kinds": errors,
        "wall_s": wall, "throughput_rps": len(client_lat) / wall,
        "client_p50_ms": pct(client_lat, 50), "client_p99_ms": pct(client_lat, 99),
        "server_p50_ms": pct(server_lat, 50), "server_p99_ms": pct(server_lat, 99),
        "server_counted_ok": counted,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="serving checkpoint (default: a random-init student)")
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load (the run stops earlier at --max-requests)")
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--n", type=int, default=50, help="candidates per request")
    p.add_argument("--k", type=int, default=10, help="page length")
    p.add_argument("--group", type=int, default=1, help="pages sampled per request (> 1: best of a Gumbel-Max group)")
    p.add_argument("--features", type=int, default=16, help="feature width of the random-init student")
    p.add_argument("--context", type=int, default=8, help="context width of the random-init student")
    p.add_argument("--threads", type=int, default=1, help="server: intra-op threads per inference")
    p.add_argument("--workers", type=int, default=2, help="server: requests computed at the same time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="5 s, at most 1000 requests")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.max_requests = min(args.duration, 5.0), min(args.max_requests, 1000)
    if min(args.concurrency, args.max_requests, args.n, args.k) < 1 or args.duration <= 0:
        p.error("--concurrency, --max-requests, --n, --k must be >= 1 and --duration > 0")

    with tempfile.TemporaryDirectory(prefix="dualrerank-load-") as tmp:
        tmp_dir = Path(tmp)
        checkpoint = args.checkpoint or make_checkpoint(tmp_dir, args)
        log_path, out_path = tmp_dir / "server.log", tmp_dir / "server.out"
        proc = start_server(checkpoint, args, log_path, out_path)
        try:
            base = wait_serving(proc, log_path, out_path)
            health = httpx.get(f"{base}/healthz", timeout=10.0).json()
            bodies = make_bodies(health, args)
            result = asyncio.run(load(base, bodies, args))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result.update({
        "url": base, "backend": args.backend, "concurrency": args.concurrency, "n": args.n, "k": args.k, "group": args.group,
        "server_threads": args.threads, "server_workers": args.workers, "model_version": health["model_version"],
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "checkpoint": "random-init student" if args.checkpoint is None else str(args.checkpoint),
    })
    print(f"{'backend':>7} {'conc':>4} {'n':>4} {'k':>3} {'G':>3} | {'ok':>6} {'err':>4} {'req/s':>8} | "
          f"{'client p50':>10} {'p99':>8} | {'server p50':>10} {'p99':>8}  (ms)")
    print(f"{args.backend:>7} {args.concurrency:>4} {args.n:>4} {args.k:>3} {args.group:>3} | {result['ok']:>6} "
          f"{result['errors']:>4} {result['throughput_rps']:8.1f} | {result['client_p50_ms']:10.2f} {result['client_p99_ms']:8.2f} | "
          f"{result['server_p50_ms']:10.2f} {result['server_p99_ms']:8.2f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
