"""HTTP reranking service (FastAPI): `POST /v1/rerank`, `GET /healthz`, `GET /metrics`.

Request (JSON):
    {"request_id": "r1", "context": [0.1, ...], "k": 4, "group": 8 (optional),
     "candidates": [{"id": 17, "features": [...]}, ...], "upstream_score": [...] (optional)}
Response:
    {"request_id", "ids" (page order), "scores" (step probability of each returned item),
     "page_log_prob", "selected_by", "group", "model_version", "latency_ms"} (+ "page_value"
     when the evaluator chose the page).

Every rejected input gets a 4xx with `{"error": "<one line>", "request_id": ...}`:
400 malformed JSON, 413 body over `max_body_bytes` (checked before parsing), 422
everything else (schema, widths, NaN/inf, k, group, duplicate ids, too many candidates).
An unexpected failure is a 500 with a one-line message; the server keeps running.

Validation reuses `RerankBatch.validate` for the rules the schema already has (feature and
context widths, NaN/inf, empty candidate list, 1 <= k <= valid candidates, upstream score
shape); the rest (JSON structure, ids, limits) is checked here. The body is parsed by
pydantic directly from bytes, in a worker thread, so the event loop only moves bytes.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from dualrerank import __version__
from dualrerank.errors import ConfigError, DataError, DualRerankError
from dualrerank.schema import RerankBatch
from dualrerank.serve.config import ServeConfig
from dualrerank.serve.metrics import ServiceMetrics
from dualrerank.serve.runtime import ServingModel, request_seed

__all__ = ["CandidateIn", "RerankRequestIn", "create_app"]

log = logging.getLogger("dualrerank.serve")

MAX_ID_CHARS = 256


class CandidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Any = Field(description="item id, an integer or a string, unique within the request")
    features: list[StrictFloat] = Field(description="the candidate's feature vector (the model's width d)")

    @field_validator("id", mode="before")
    @classmethod
    def _id_type(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"must be an integer or a string, got {type(value).__name__}")
        if isinstance(value, str) and not 1 <= len(value) <= MAX_ID_CHARS:
            raise ValueError(f"a string id must have 1 to {MAX_ID_CHARS} characters, got {len(value)}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError("an integer id must fit in 64 bits")
        return value


class RerankRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=256)
    context: list[StrictFloat] = Field(default_factory=list, description="context features (the model's width c)")
    candidates: list[CandidateIn] = Field(min_length=1)
    k: StrictInt = Field(description="page length")
    group: StrictInt | None = Field(default=None, description="pages to sample; > 1 picks the best of a group")
    upstream_score: list[StrictFloat] | None = Field(default=None, description="optional upstream score per candidate")


class _Rejected(Exception):
    """A request the service refuses: HTTP status, metric reason, one-line message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _pydantic_message(exc: ValidationError) -> tuple[int, str, str]:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return 400, "invalid_json", f"malformed JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
    where = ""
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return 422, "invalid_request", f"{where or 'body'}: {msg}{suffix}"


def _first_duplicate(ids: list[Any]) -> Any:
    seen: set[Any] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


class _Reranker:
    """Parses, validates and answers one rerank body (runs in a worker thread)."""

    def __init__(self, model: ServingModel, config: ServeConfig, metrics: ServiceMetrics) -> None:
        self.model, self.config, self.metrics = model, config, metrics

    def build_batch(self, req: RerankRequestIn) -> RerankBatch:
        m, n = self.model, len(req.candidates)
        if n > self.config.max_candidates:
            raise DataError(f"candidates: {n} candidates > the server's max_candidates {self.config.max_candidates}")
        feats = [c.features for c in req.candidates]
        widths = np.fromiter(map(len, feats), dtype=np.int64, count=n)
        wrong = np.flatnonzero(widths != m.candidate_dim)
        if wrong.size:
            i = int(wrong[0])
            raise DataError(
                f"candidates[{i}] (id {req.candidates[i].id!r}): {int(widths[i])} features, the model expects {m.candidate_dim}"
            )
        ids = [c.id for c in req.candidates]
        if len(set(ids)) < n:
            raise DataError(f"candidates: duplicate id {_first_duplicate(ids)!r}")
        if req.k > m.max_positions:
            raise DataError(f"k: page length {req.k} > the model's max_positions {m.max_positions}")
        group = 1 if req.group is None else req.group
        if not 1 <= group <= self.config.max_group:
            raise DataError(f"group: must be in [1, {self.config.max_group}], got {group}")
        # Values beyond float32's range become inf here and are refused by validate() below.
        with np.errstate(over="ignore"):
            X = np.asarray(feats, dtype=np.float32).reshape(1, n, m.candidate_dim)
            C = np.asarray(req.context, dtype=np.float32).reshape(1, -1)
            up = None if req.upstream_score is None else torch.from_numpy(np.asarray(req.upstream_score, np.float32)[None])
        batch = RerankBatch(
            candidates=torch.from_numpy(X), candidate_mask=torch.ones(1, n, dtype=torch.bool),
            context=torch.from_numpy(C), upstream_score=up, request_ids=(req.request_id,),
        )
        return batch.validate(k=req.k, candidate_dim=m.candidate_dim, context_dim=m.context_dim)

    def __call__(self, body: bytes, started: float) -> tuple[int, dict[str, Any]]:
        request_id = None
        try:
            try:
                req = RerankRequestIn.model_validate_json(body)
            except ValidationError as exc:
                raise _Rejected(*_pydantic_message(exc)) from None
            request_id = req.request_id
            try:
                batch = self.build_batch(req)
            except DataError as exc:
                raise _Rejected(422, "invalid_request", str(exc)) from None
            group = 1 if req.group is None else req.group
            try:
                result = self.model.rerank(batch, req.k, group, request_seed(self.config.seed, req.request_id))
            except (DataError, ConfigError) as exc:  # e.g. k beyond the evaluator's max_positions
                raise _Rejected(422, "invalid_request", str(exc)) from None
            page = result.pages[0].tolist()
            out: dict[str, Any] = {
                "request_id": req.request_id,
                "ids": [req.candidates[i].id for i in page],
                "scores": [round(float(s), 7) for s in result.scores[0]],
                "page_log_prob": float(result.page_log_prob[0]),
                "selected_by": result.selected_by,
                "group": group,
                "model_version": self.model.model_version,
            }
            if result.page_value is not None:
                out["page_value"] = float(result.page_value[0])
            elapsed = time.perf_counter() - started
            out["latency_ms"] = round(1000.0 * elapsed, 3)
            self.metrics.observe_latency(elapsed)
            return 200, out
        except _Rejected as rej:
            self.metrics.observe_error(rej.reason)
            return rej.status, {"error": rej.message, "request_id": request_id}
        except DualRerankError as exc:
            self.metrics.observe_error("invalid_request")
            return 422, {"error": str(exc).splitlines()[0], "request_id": request_id}
        except Exception as exc:  # the service must outlive any single bad request
            log.exception("rerank failed for request %r", request_id)
            self.metrics.observe_error("internal")
            return 500, {"error": f"internal error ({type(exc).__name__})", "request_id": request_id}


class _MetricsMiddleware:
    """Counts every response by path and status (outermost, so 413s are counted too)."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.observe_response(scope.get("path", ""), int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


class _BodyLimitMiddleware:
    """Rejects bodies over `max_bytes` with 413 before any parsing.

    A declared Content-Length over the limit is refused without reading the body; a
    chunked body is read up to the limit and refused as soon as it crosses it. Accepted
    bodies are replayed to the app unchanged.
    """

    def __init__(self, app: Any, max_bytes: int, metrics: ServiceMetrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def _refuse(self, scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
        self.metrics.observe_error("body_too_large" if status == 413 else "invalid_request")
        await JSONResponse({"error": message, "request_id": None}, status_code=status)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, receive, send, 400, "Content-Length: not a number")
                return
            if int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send, 413, f"body: {int(declared)} bytes > the server's limit of {self.max_bytes}")
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, f"body: more than the server's limit of {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(model: ServingModel, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (no global state: everything hangs off this app)."""
    config = config or ServeConfig()
    for name in ("max_candidates", "max_body_bytes", "max_group", "workers"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(config, name)}")
    metrics = ServiceMetrics(model.model_version, model.backend.name)
    handler = _Reranker(model, config, metrics)
    limiter = anyio.CapacityLimiter(config.workers)
    # No interactive docs/OpenAPI: the service exposes exactly its three endpoints.
    app = FastAPI(title="dualrerank", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.model = metrics, model

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> Response:
        started = time.perf_counter()
        body = await request.body()
        status, payload = await anyio.to_thread.run_sync(handler, body, started, limiter=limiter)
        try:
            text = json.dumps(payload, allow_nan=False)
        except ValueError:  # a non-finite score must never reach a client as invalid JSON
            log.error("non-finite value in the response to request %r", payload.get("request_id"))
            metrics.observe_error("internal")
            status, text = 500, json.dumps({"error": "internal error (non-finite output)", "request_id": payload.get("request_id")})
        return Response(text, status_code=status, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_version": model.model_version,
            "backend": model.backend.name,
            "candidate_dim": model.candidate_dim,
            "context_dim": model.context_dim,
            "max_positions": model.max_positions,
            "max_candidates": config.max_candidates,
            "max_group": config.max_group,
            "evaluator": model.evaluator is not None,
        }

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_BodyLimitMiddleware, max_bytes=config.max_body_bytes, metrics=metrics)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app
