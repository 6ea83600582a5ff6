"""HTTP reranking service (FastAPI): `POST /v1/rerank`, `GET|HEAD /healthz`, `GET /metrics`,
`GET /openapi.json`.

Request (JSON, `Content-Type: application/json`):
    {"request_id": "r1", "context": [0.1, ...], "k": 4, "group": 8 (optional),
     "candidates": [{"id": 17, "features": [...]}, ...]}
Response:
    {"request_id", "ids" (page order), "scores" (step probability of each returned item),
     "page_log_prob", "selected_by", "group", "model_version", "latency_ms"} (+ "page_value"
     when the evaluator chose the page).

Every rejected input gets a 4xx with `{"error": "<one line>", "request_id": ...}`:
400 malformed JSON, 413 body over `max_body_bytes` (checked before parsing), 415 a
Content-Type other than `application/json` (checked first: a browser can send text/plain
or form bodies cross-site without a CORS preflight, never application/json), 422
everything else (schema, widths, NaN/inf, k, group, duplicate ids, too many candidates,
and a model output that is not finite). An unexpected failure is a 500 with a one-line
message; the server keeps running.

Validation reuses `RerankBatch.validate` for the rules the schema already has (feature and
context widths, NaN/inf, empty candidate list, 1 <= k <= valid candidates); the rest (JSON
structure, ids, limits) is checked here. The body is parsed by pydantic directly from
bytes, in a worker thread, so the event loop only moves bytes. The OpenAPI document is
built per app: it carries the served model's feature widths and the server's limits.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, Literal

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictStr, ValidationError, field_validator

from dualrerank import __version__
from dualrerank.errors import ConfigError, DataError, DualRerankError
from dualrerank.schema import RerankBatch
from dualrerank.serve.config import ServeConfig
from dualrerank.serve.metrics import ServiceMetrics
from dualrerank.serve.runtime import NonFiniteOutput, ServingModel, request_seed

__all__ = ["CandidateIn", "ErrorOut", "HealthOut", "RerankRequestIn", "RerankResponseOut", "create_app"]

log = logging.getLogger("dualrerank.serve")

MAX_ID_CHARS = 256
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _integral(value: Any) -> Any:
    """A JSON integer: JSON Schema counts 4.0 as one (so generated clients may send it);
    a string, a boolean or 4.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("Input should be a valid integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]


class CandidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Typed Any so that the validator below gives one clear message for floats and booleans;
    # the schema says what is accepted.
    id: Any = Field(
        description="item id, an integer or a string, unique within the request",
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
                {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
            ]
        },
    )
    features: list[StrictFloat] = Field(description="the candidate's feature vector (the model's width d)")

    @field_validator("id", mode="before")
    @classmethod
    def _id_type(cls, value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
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
    k: JsonInt = Field(description="page length")
    group: JsonInt | None = Field(default=None, description="pages to sample; > 1 picks the best of a group")


class RerankResponseOut(BaseModel):
    """A served page (documents the 200 answer; the handler writes the JSON itself)."""

    request_id: str
    ids: list[int | str] = Field(min_length=1, description="the page, top first")
    scores: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        min_length=1, description="student probability of each item given the items above it"
    )
    page_log_prob: float = Field(le=0.0, description="sum of the logs of `scores`")
    selected_by: Literal["greedy", "evaluator", "log_prob"]
    group: int = Field(ge=1)
    model_version: str
    page_value: float | None = Field(default=None, description="evaluator page value, present when it chose the page")
    latency_ms: float = Field(ge=0.0, description="server-side time from body received to answer built")


class ErrorOut(BaseModel):
    """Every refused or failed request: one line, and the request id when it was readable."""

    error: str
    request_id: str | None


class HealthOut(BaseModel):
    """What a client needs to build valid requests."""

    status: Literal["ok"]
    model_version: str
    backend: str
    candidate_dim: int
    context_dim: int
    max_positions: int
    max_candidates: int
    max_group: int
    max_body_bytes: int
    evaluator: bool


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
        if tuple(err["loc"]) == ("upstream_score",):
            # Accepted and ignored in earlier versions: say why it is refused now.
            msg = "unknown field (the served model reads only features: put an upstream score among them)"
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
        batch = RerankBatch(
            candidates=torch.from_numpy(X),
            candidate_mask=torch.ones(1, n, dtype=torch.bool),
            context=torch.from_numpy(C),
            request_ids=(req.request_id,),
        )
        return batch.validate(k=req.k, candidate_dim=m.candidate_dim, context_dim=m.context_dim)

    def __call__(self, body: bytes, started: float) -> tuple[int, str]:
        """(HTTP status, JSON text) for one request body."""
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
            except NonFiniteOutput as exc:
                raise _Rejected(422, "non_finite_output", str(exc)) from None
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
            # allow_nan=False: the runtime guarantees finite numbers, so a ValueError here is
            # a bug and becomes a 500 below rather than invalid JSON on the wire.
            text = json.dumps(out, allow_nan=False)
            # Only answered pages enter the latency histogram; refusals are counted by reason.
            self.metrics.observe_latency(elapsed)
            return 200, text
        except _Rejected as rej:
            self.metrics.observe_error(rej.reason)
            return rej.status, json.dumps({"error": rej.message, "request_id": request_id})
        except DualRerankError as exc:
            self.metrics.observe_error("invalid_request")
            return 422, json.dumps({"error": str(exc).splitlines()[0], "request_id": request_id})
        except Exception as exc:  # the service must outlive any single bad request
            log.exception("rerank failed for request %r", request_id)
            self.metrics.observe_error("internal")
            return 500, json.dumps({"error": f"internal error ({type(exc).__name__})", "request_id": request_id})


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


def _content_type_problem(header: bytes | None) -> str | None:
    """None when `header` names JSON in UTF-8, else the one-line reason for a 415.

    Any other parameter is ignored: what matters is that a browser cannot send
    `application/json` cross-site without a CORS preflight, which this service never grants.
    """
    if header is None:
        return "Content-Type: missing; send application/json"
    media, _, params = header.decode("latin-1").partition(";")
    media = media.strip()
    if media.lower() != "application/json":
        return f"Content-Type: {media[:100]!r} is not supported; send application/json"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return f"Content-Type: charset {charset[:40]!r} is not supported; send UTF-8"
    return None


class _RequestGuardMiddleware:
    """Refuses, before any parsing: a body that is not JSON on the JSON endpoints (415),
    then a body over `max_bytes` (413).

    A declared Content-Length over the limit is refused without reading the body; a
    chunked body is read up to the limit and refused as soon as it crosses it. Accepted
    bodies are replayed to the app unchanged.
    """

    def __init__(self, app: Any, max_bytes: int, metrics: ServiceMetrics, json_paths: tuple[str, ...]) -> None:
        self.app, self.max_bytes, self.metrics, self.json_paths = app, max_bytes, metrics, json_paths

    async def _refuse(self, scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
        reason = {413: "body_too_large", 415: "unsupported_media_type"}.get(status, "invalid_request")
        self.metrics.observe_error(reason)
        await JSONResponse({"error": message, "request_id": None}, status_code=status)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope.get("path") in self.json_paths:
            problem = _content_type_problem(headers.get(b"content-type"))
            if problem is not None:
                await self._refuse(scope, receive, send, 415, problem)
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, receive, send, 400, "Content-Length: not a number")
                return
            if int(declared) > self.max_bytes:
                await self._refuse(
                    scope, receive, send, 413, f"body: {int(declared)} bytes > the server's limit of {self.max_bytes}"
                )
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


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "body is not JSON (malformed, empty, not UTF-8)"},
    413: {"model": ErrorOut, "description": "body over the server's max_body_bytes"},
    415: {"model": ErrorOut, "description": "Content-Type is not application/json (a charset parameter may say UTF-8)"},
    422: {
        "model": ErrorOut,
        "description": "a request the model cannot serve: schema, widths, k, group, ids, "
        "NaN/inf, too many candidates, or a model output that is not finite",
    },
    500: {"model": ErrorOut, "description": "a bug (logged with its traceback on the server)"},
}


def _openapi_document(app: FastAPI, model: ServingModel, config: ServeConfig) -> dict[str, Any]:
    """FastAPI's document plus the rerank request body, with this deployment's widths and
    limits written into it (the handler reads raw bytes, so FastAPI cannot infer the body)."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    request = RerankRequestIn.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(request.pop("$defs", {}))
    schemas["RerankRequestIn"] = request
    d, c = model.candidate_dim, model.context_dim
    # The model computes in float32: a larger magnitude would become inf and is refused.
    f32 = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    schemas["CandidateIn"]["properties"]["features"].update(minItems=d, maxItems=d, items=f32)
    props = request["properties"]
    props["context"].update(minItems=c, maxItems=c, items=f32)
    if c:  # the model's own default ([]) only fits a model without context features
        request["required"].append("context")
    props["candidates"]["maxItems"] = config.max_candidates
    props["k"].update(minimum=1, maximum=model.max_positions)
    for branch in props["group"]["anyOf"]:
        if branch.get("type") == "integer":
            branch.update(minimum=1, maximum=config.max_group)
    doc["paths"]["/v1/rerank"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RerankRequestIn"}}},
    }
    return doc


def create_app(model: ServingModel, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (no global state: everything hangs off this app)."""
    config = config or ServeConfig()
    for name in ("max_candidates", "max_body_bytes", "max_group", "workers"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(config, name)}")
    metrics = ServiceMetrics(model.model_version, model.backend.name)
    handler = _Reranker(model, config, metrics)
    limiter = anyio.CapacityLimiter(config.workers)
    # The OpenAPI document is served (clients generate code from it); the interactive
    # /docs and /redoc pages are not: they load scripts from a CDN into an operator's browser.
    app = FastAPI(
        title="dualrerank",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        description=f"Generative list-wise reranking: the NAR student {model.model_version} ({model.backend.name}).",
    )
    app.state.metrics, app.state.model = metrics, model

    @app.post("/v1/rerank", responses={200: {"model": RerankResponseOut, "description": "the page"}, **_ERROR_RESPONSES})
    async def rerank(request: Request) -> Response:
        started = time.perf_counter()
        body = await request.body()
        status, text = await anyio.to_thread.run_sync(handler, body, started, limiter=limiter)
        return Response(text, status_code=status, media_type="application/json")

    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_version": model.model_version,
            "backend": model.backend.name,
            "candidate_dim": model.candidate_dim,
            "context_dim": model.context_dim,
            "max_positions": model.max_positions,
            "max_candidates": config.max_candidates,
            "max_group": config.max_group,
            "max_body_bytes": config.max_body_bytes,
            "evaluator": model.evaluator is not None,
        }

    @app.get("/healthz", response_model=HealthOut)
    async def healthz() -> dict[str, Any]:
        return health()

    # Load balancers probe with HEAD; the answer carries GET's headers (uvicorn drops the body).
    @app.head("/healthz", response_class=JSONResponse, responses={200: {"description": "healthy (no body)"}})
    async def healthz_head() -> JSONResponse:
        return JSONResponse(health())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    document: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not document:
            document.update(_openapi_document(app, model, config))
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to replace the schema
    app.add_middleware(_RequestGuardMiddleware, max_bytes=config.max_body_bytes, metrics=metrics, json_paths=("/v1/rerank",))
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app
