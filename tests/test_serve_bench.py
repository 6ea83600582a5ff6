"""The serving benchmarks run end to end on a tiny grid and write their JSON reports."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_quick_grid(tmp_path, capsys):
    out = tmp_path / "latency.json"
    args = ["--quick", "--min-reps", "3", "--max-reps", "3", "--max-seconds", "0", "--d-model", "16",
            "--layers", "1", "--heads", "2", "--out", str(out)]
    assert _load("latency").main(args) == 0
    report = json.loads(out.read_text())
    cells = {(r["n"], r["L"], r["batch"]) for r in report["results"]}
    assert cells == {(50, 4, 1), (50, 10, 1), (50, 4, 64), (50, 10, 64)}
    row = report["results"][0]
    for model in ("teacher", "student_torch", "student_onnx"):
        assert row[model]["reps"] == 3 and 0 < row[model]["p50_ms"] <= row[model]["p99_ms"]
    assert "random-init" in report["meta"]["note"]
    assert "student_torch/teacher" in capsys.readouterr().out


def test_serve_load_benchmark_stops_by_itself(tmp_path, capsys):
    out = tmp_path / "load.json"
    args = ["--duration", "3", "--max-requests", "40", "--concurrency", "2", "--n", "12", "--k", "4", "--out", str(out)]
    assert _load("serve_load").main(args) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 40 and report["ok"] == 40 and report["errors"] == 0
    assert report["server_counted_ok"] == 40 and report["throughput_rps"] > 0
    assert report["client_p50_ms"] <= report["client_p99_ms"]
    # The server was started with --port 0 and the benchmark read the bound port from its output.
    assert re.fullmatch(r"http://127\.0\.0\.1:[1-9][0-9]*", report["url"]), report["url"]
