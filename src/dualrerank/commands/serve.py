"""`dualrerank serve`: the HTTP reranking service (FastAPI + uvicorn).

    dualrerank serve --checkpoint runs/demo/checkpoint [--backend onnx|torch] [--port 8000]
"""

from __future__ import annotations

import argparse
import sys

from dualrerank.commands._common import add_config_args, load_from_args
from dualrerank.errors import ConfigError
from dualrerank.serve.config import ServeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the student over HTTP: POST /v1/rerank, GET /healthz, GET /metrics",
        description="Serve a checkpoint's NAR student (and optional evaluator) over HTTP. See docs/serving.md.",
    )
    p.add_argument("--checkpoint", default=None, help="serving checkpoint directory (student; optional evaluator/, student.onnx)")
    p.add_argument("--backend", choices=("onnx", "torch"), default=None, help="inference backend (default: onnx)")
    p.add_argument("--onnx", dest="onnx_path", default=None, help="ONNX file (default: CHECKPOINT/student.onnx, else exported in memory)")
    p.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    p.add_argument("--max-candidates", type=int, default=None, help="largest candidate list per request (default 1000)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per inference (default 1)")
    p.add_argument("--workers", type=int, default=None, help="requests computed at the same time (default 2)")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in ("checkpoint", "backend", "onnx_path", "host", "port", "max_candidates", "threads", "workers")}
    cfg = load_from_args(ServeConfig, args, overrides)
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port: must be in [0, 65535], got {cfg.port}")
    if cfg.threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {cfg.threads}")

    import torch
    import uvicorn

    from dualrerank.serve.app import create_app
    from dualrerank.serve.runtime import load_serving_model

    # Process-wide setting, made once here (the library never touches it).
    torch.set_num_threads(cfg.threads)
    model = load_serving_model(cfg.checkpoint, cfg.backend, cfg.onnx_path or None, cfg.threads,
                               cfg.temperature, cfg.include_greedy, cfg.warmup)
    app = create_app(model, cfg)
    print(f"dualrerank serve: {model.model_version} ({model.backend.name}"
          f"{', evaluator' if model.evaluator is not None else ''}) on http://{cfg.host}:{cfg.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log)
    return 0
