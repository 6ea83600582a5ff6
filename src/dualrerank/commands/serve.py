"""`dualrerank serve`: the HTTP reranking service (FastAPI + uvicorn).

    dualrerank serve --checkpoint runs/demo/checkpoint [--backend onnx|torch] [--port 8000]

Once the server accepts connections it prints one line on stdout,
`serving on http://HOST:PORT`, with the port actually bound: with `--port 0` the system
picks a free one, and a script (or test) reads it from that line instead of guessing a
free port and racing other processes for it.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from dualrerank.commands._common import add_config_args, load_from_args
from dualrerank.errors import ConfigError
from dualrerank.serve.config import ServeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the student over HTTP: POST /v1/rerank, GET /healthz, GET /metrics",
        description="Serve a checkpoint's NAR student (and optional evaluator) over HTTP. See docs/serving.md.",
    )
    p.add_argument("--checkpoint", default=None, help="serving checkpoint directory (student; optional evaluator/, student.onnx)")
    p.add_argument("--backend", choices=("onnx", "torch"), default=None, help="inference backend (default: onnx)")
    p.add_argument(
        "--onnx", dest="onnx_path", default=None, help="ONNX file (default: CHECKPOINT/student.onnx, else exported in memory)"
    )
    p.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000; 0: a free port, printed once serving)")
    p.add_argument("--max-candidates", type=int, default=None, help="largest candidate list per request (default 1000)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per inference (default 1)")
    p.add_argument("--workers", type=int, default=None, help="requests computed at the same time (default 2)")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides = {
        k: getattr(args, k)
        for k in ("checkpoint", "backend", "onnx_path", "host", "port", "max_candidates", "threads", "workers")
    }
    cfg = load_from_args(ServeConfig, args, overrides)
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port: must be in [0, 65535], got {cfg.port}")
    if cfg.threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {cfg.threads}")

    import torch

    from dualrerank.serve.app import create_app
    from dualrerank.serve.bundle import load_serving_model

    # Bound before the (slow) model load so that a taken port fails at once; connections
    # are refused, not queued, until uvicorn listens.
    sock = bind_socket(cfg.host, cfg.port)
    try:
        # Process-wide setting, made once here (the library never touches it).
        torch.set_num_threads(cfg.threads)
        model = load_serving_model(
            cfg.checkpoint, cfg.backend, cfg.onnx_path or None, cfg.threads, cfg.temperature, cfg.include_greedy, cfg.warmup
        )
        app = create_app(model, cfg)
        print(
            f"dualrerank serve: {model.model_version} ({model.backend.name}"
            f"{', evaluator' if model.evaluator is not None else ''})",
            file=sys.stderr,
            flush=True,
        )
        _run_server(app, sock, cfg)
    finally:
        sock.close()
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), IPv4 or IPv6 as `host` resolves; port 0 lets
    the system choose. A name that does not resolve or a taken port is a `ConfigError`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"host: cannot resolve {host!r} ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may rebind while old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"port: cannot bind {host}:{port} ({exc.strerror})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def _run_server(app: Any, sock: socket.socket, cfg: ServeConfig) -> None:
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        """uvicorn's server, printing `serving on URL` once it accepts connections."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                print(f"serving on {url_of(sock)}", flush=True)

    AnnouncingServer(uvicorn.Config(app, log_level=cfg.log_level, access_log=cfg.access_log)).run(sockets=[sock])
