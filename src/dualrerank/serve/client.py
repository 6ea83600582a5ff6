"""A small Python client of the reranking service (httpx).

    from dualrerank.serve.client import RerankClient
    with RerankClient("http://127.0.0.1:8000") as client:
        print(client.health())
        reply = client.rerank("r1", context=[0.2, 0.1], k=4,
                              candidates=[{"id": 7, "features": [...]}, ...])
        reply.ids, reply.scores, reply.latency_ms

Candidates may be dicts `{"id", "features"}` or `(id, features)` pairs; features may be
lists or NumPy arrays. NaN/inf values raise `DataError` before anything is sent. A 4xx/5xx
answer raises `ServiceError` carrying the status and the server's one-line message; an
unreachable server raises `ServiceUnavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from dualrerank.errors import DataError, DualRerankError

__all__ = ["RerankReply", "ServiceError", "ServiceUnavailable", "RerankClient"]


class ServiceError(DualRerankError):
    """The service answered with an error status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code, self.message = status_code, message


class ServiceUnavailable(DualRerankError, ConnectionError):
    """The service could not be reached (refused, timed out, ...)."""


@dataclass
class RerankReply:
    """A successful rerank answer."""

    request_id: str
    ids: list[Any]
    scores: list[float]
    model_version: str
    latency_ms: float
    page_log_prob: float
    selected_by: str
    group: int
    page_value: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _tolist(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _candidate(c: Any) -> dict[str, Any]:
    if isinstance(c, Mapping):
        cid, feats = c["id"], c["features"]
    else:
        cid, feats = c
    if hasattr(cid, "item"):  # NumPy integer ids
        cid = cid.item()
    return {"id": cid, "features": _tolist(feats)}


class RerankClient:
    """Client of `POST /v1/rerank`, `GET /healthz` and `GET /metrics`.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        timeout: seconds per request.
        client: an existing `httpx.Client` to use instead (e.g. FastAPI's `TestClient`).
    """

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", timeout: float = 10.0, client: httpx.Client | None = None
    ) -> None:
        self._own = client is None
        self._http = client if client is not None else httpx.Client(base_url=base_url, timeout=timeout)

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"cannot reach the reranking service at {self._http.base_url} ({exc})") from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text.strip()[:200]
            raise ServiceError(resp.status_code, message)
        return resp

    def rerank(
        self,
        request_id: str,
        context: Sequence[float] | Any,
        candidates: Iterable[Any],
        k: int,
        group: int | None = None,
    ) -> RerankReply:
        """Rerank `candidates` and return the page of `k` ids (see the module docstring)."""
        body: dict[str, Any] = {
            "request_id": request_id,
            "context": _tolist(context),
            "candidates": [_candidate(c) for c in candidates],
            "k": int(k),
        }
        if group is not None:
            body["group"] = int(group)
        try:
            content = json.dumps(body, allow_nan=False)
        except ValueError:
            raise DataError(f"request {request_id!r}: NaN/inf in features or context (JSON cannot carry them)") from None
        except TypeError as exc:
            raise DataError(f"request {request_id!r}: not JSON-serialisable ({exc})") from None
        headers = {"content-type": "application/json"}
        data = self._send("POST", "/v1/rerank", content=content, headers=headers).json()
        return RerankReply(
            request_id=data["request_id"],
            ids=data["ids"],
            scores=data["scores"],
            model_version=data["model_version"],
            latency_ms=data["latency_ms"],
            page_log_prob=data["page_log_prob"],
            selected_by=data["selected_by"],
            group=data["group"],
            page_value=data.get("page_value"),
            raw=data,
        )

    def health(self) -> dict[str, Any]:
        """The `/healthz` document (status, model_version, feature widths, limits)."""
        return self._send("GET", "/healthz").json()

    def metrics(self) -> str:
        """The Prometheus text of `/metrics`."""
        return self._send("GET", "/metrics").text
