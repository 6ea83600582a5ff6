"""The HTTP service: valid requests (pages compared with the PyTorch models), every bad-input
case (4xx, one-line message, server still answering afterwards), Content-Type (415),
non-finite model output (422, both backends), the OpenAPI document and a property-based
run of schemathesis against it, /metrics format, the client, a real uvicorn process on
`--port 0`, CLI errors on bad checkpoints, and the serving path's import discipline."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dualrerank.cli import main
from dualrerank.errors import DataError
from dualrerank.models.checkpoint import save_checkpoint
from dualrerank.models.encoder import EncoderConfig
from dualrerank.models.evaluator import EvaluatorConfig, ListEvaluator
from dualrerank.models.student import NARStudent, StudentConfig
from dualrerank.serve.app import create_app
from dualrerank.serve.client import RerankClient, ServiceError, ServiceUnavailable
from dualrerank.serve.config import ServeConfig
from dualrerank.serve.bundle import load_serving_model, save_serving_bundle

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note that its TestClient is moving to httpx2
    from fastapi.testclient import TestClient

D, C, MAX_POS = 5, 2, 8


def tiny_models(seed: int = 0) -> tuple[NARStudent, ListEvaluator]:
    torch.manual_seed(seed)
    enc = EncoderConfig(candidate_dim=D, context_dim=C, d_model=16, n_heads=2, n_layers=1, dropout=0.0)
    student = NARStudent(StudentConfig(encoder=enc, n_layers=1, n_heads=2, dropout=0.0, max_positions=MAX_POS))
    evaluator = ListEvaluator(EvaluatorConfig(encoder=enc, n_layers=1, max_positions=MAX_POS))
    return student.eval(), evaluator.eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    student, evaluator = tiny_models()
    return save_serving_bundle(tmp_path_factory.mktemp("serve") / "ck", student, evaluator)


SERVE_CONFIG = ServeConfig(max_candidates=50, max_body_bytes=20_000, max_group=16)


@pytest.fixture(scope="module")
def client(bundle):
    app = create_app(load_serving_model(bundle, "onnx"), SERVE_CONFIG)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def torch_client(bundle):
    app = create_app(load_serving_model(bundle, "torch", warmup=False), SERVE_CONFIG)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def models(bundle):
    """The checkpoint's student and evaluator as PyTorch models: the reference for pages."""
    from dualrerank.models.checkpoint import load_checkpoint

    return load_checkpoint(bundle), load_checkpoint(bundle / "evaluator")


def body(n: int = 10, k: int = 4, request_id: str = "r1", **extra) -> dict:
    rng = np.random.default_rng(n)
    return {
        "request_id": request_id,
        "context": [0.5, -0.25],
        "candidates": [{"id": 100 + i, "features": rng.standard_normal(D).round(4).tolist()} for i in range(n)],
        "k": k,
        **extra,
    }


def as_batch(req: dict):
    from dualrerank.schema import RerankBatch

    X = torch.tensor([[c["features"] for c in req["candidates"]]], dtype=torch.float32)
    mask = torch.ones(1, X.shape[1], dtype=torch.bool)
    return RerankBatch(candidates=X, candidate_mask=mask, context=torch.tensor([req["context"]], dtype=torch.float32))


def greedy_ids(student, req: dict) -> list:
    """The PyTorch student's own greedy page for `req`, as ids."""
    page = student.rerank(as_batch(req), req["k"])[0].tolist()
    return [req["candidates"][i]["id"] for i in page]


def assert_valid_page(reply: dict, req: dict) -> None:
    ids = [c["id"] for c in req["candidates"]]
    assert len(reply["ids"]) == req["k"] == len(reply["scores"])
    assert len(set(reply["ids"])) == req["k"] and set(reply["ids"]) <= set(ids)
    assert all(0 < s <= 1 for s in reply["scores"])
    assert reply["latency_ms"] > 0 and reply["model_version"].startswith("student-")


# ------------------------------------------------------------------ valid requests
def test_valid_request_matches_student_greedy_page(client, models):
    req = body(12, 5)
    r = client.post("/v1/rerank", json=req)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert_valid_page(reply, req)
    assert reply["selected_by"] == "greedy" and reply["group"] == 1
    assert reply["ids"] == greedy_ids(models[0], req)
    assert math.isclose(sum(math.log(s) for s in reply["scores"]), reply["page_log_prob"], rel_tol=1e-4)


def test_group_request_uses_evaluator_and_is_reproducible(client, models):
    student, evaluator = models
    req = body(15, 4, request_id="g1", group=6)
    a, b = client.post("/v1/rerank", json=req).json(), client.post("/v1/rerank", json=req).json()
    assert_valid_page(a, req)
    assert a["selected_by"] == "evaluator" and a["group"] == 6
    assert a["ids"] == b["ids"]  # noise seeded by (server seed, request_id)
    # page_value is the evaluator's value of the returned page, and the group holds the
    # greedy page, so the chosen page is worth at least as much to the evaluator.
    index = {c["id"]: i for i, c in enumerate(req["candidates"])}

    def value(ids: list) -> float:
        with torch.no_grad():
            return float(evaluator.page_value(as_batch(req), torch.tensor([[[index[i] for i in ids]]]))[0, 0])

    assert math.isclose(a["page_value"], value(a["ids"]), rel_tol=1e-4, abs_tol=1e-5)
    assert a["page_value"] >= value(greedy_ids(student, req)) - 1e-5


def test_group_without_evaluator_picks_by_log_prob(tmp_path):
    student, _ = tiny_models(seed=5)
    save_serving_bundle(tmp_path / "ck", student, onnx=False)
    model = load_serving_model(tmp_path / "ck", "torch")
    with TestClient(create_app(model)) as c:
        req = body(9, 3, group=8)
        reply = c.post("/v1/rerank", json=req).json()
        greedy = c.post("/v1/rerank", json=body(9, 3)).json()
    assert reply["selected_by"] == "log_prob" and "page_value" not in reply
    # The group holds the greedy page, so the chosen page is at least as likely.
    assert reply["page_log_prob"] >= greedy["page_log_prob"] - 1e-5


def test_string_ids_get_the_student_page(client, models):
    req = body(9, 4)
    for i, cand in enumerate(req["candidates"]):
        cand["id"] = f"video-{i}"
    reply = client.post("/v1/rerank", json=req).json()
    assert reply["ids"] == greedy_ids(models[0], req)
    assert reply["ids"] != [c["id"] for c in req["candidates"][:4]]  # not just the input order


def test_upstream_score_is_refused_not_ignored(client):
    # The served models read features only; a field that changes nothing is refused so
    # that nobody believes it reorders the page.
    r = client.post("/v1/rerank", json=body(6, 2, upstream_score=[0.1 * i for i in range(6)]))
    assert r.status_code == 422
    assert r.json()["error"].startswith("upstream_score: unknown field (the served model reads only features")


def test_integral_numbers_count_as_integers(client, models):
    # JSON Schema (and so the OpenAPI document) calls 4.0 an integer; generated clients send it.
    req = body(10, 4)
    reply = client.post("/v1/rerank", json={**req, "k": 4.0, "candidates": [{**c, "id": float(c["id"])} for c in req["candidates"]]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["ids"] == greedy_ids(models[0], req)


# ------------------------------------------------------------------ bad input
def _raw(text: str) -> bytes:
    return text.encode()


BAD_JSON = {
    "wrong_width_all": (lambda: body(candidates=[{"id": i, "features": [0.1] * (D + 1)} for i in range(5)]), 422, "features, the model expects"),
    "wrong_width_one": (lambda: body(candidates=[{"id": i, "features": [0.1] * (D - (i == 3))} for i in range(5)]), 422, "candidates[3] (id 3)"),
    "context_width": (lambda: body(context=[1.0, 2.0, 3.0]), 422, "context: width 3 != expected 2"),
    "k_too_large": (lambda: body(n=3, k=4), 422, "k=4 > 3 valid candidates"),
    "k_zero": (lambda: body(k=0), 422, "k: page length must be >= 1"),
    "k_negative": (lambda: body(k=-2), 422, "k: page length must be >= 1"),
    "k_over_max_positions": (lambda: body(n=20, k=MAX_POS + 1), 422, "max_positions"),
    "k_not_int": (lambda: body(k="4"), 422, "k: Input should be a valid integer"),
    "dup_int_ids": (lambda: body(candidates=[{"id": 1, "features": [0.0] * D}, {"id": 1, "features": [1.0] * D}], k=1), 422, "duplicate id 1"),
    "dup_str_ids": (lambda: body(candidates=[{"id": "a", "features": [0.0] * D}, {"id": "a", "features": [1.0] * D}], k=1), 422, "duplicate id 'a'"),
    "float_id": (lambda: body(candidates=[{"id": 1.5, "features": [0.0] * D}], k=1), 422, "candidates[0].id: must be an integer or a string"),
    "long_string_id": (lambda: body(candidates=[{"id": "x" * 257, "features": [0.0] * D}], k=1), 422, "1 to 256 characters"),
    "huge_int_id": (lambda: body(candidates=[{"id": 2**70, "features": [0.0] * D}], k=1), 422, "64 bits"),
    "string_feature": (lambda: body(candidates=[{"id": 1, "features": ["1.0"] * D}], k=1), 422, "candidates[0].features[0]"),
    "too_many": (lambda: body(n=51, k=2), 422, "max_candidates 50"),
    "empty_candidates": (lambda: body(candidates=[]), 422, "candidates: List should have at least 1 item"),
    "missing_k": (lambda: {k: v for k, v in body().items() if k != "k"}, 422, "k: Field required"),
    "unknown_field": (lambda: body(temperature=2.0), 422, "temperature: unknown field"),
    "group_zero": (lambda: body(group=0), 422, "group: must be in [1, 16]"),
    "group_too_big": (lambda: body(group=17), 422, "group: must be in [1, 16]"),
    "k_float": (lambda: body(k=2.5), 422, "k: Input should be a valid integer"),
    "not_an_object": (lambda: [1, 2, 3], 422, "body: Input should be an object"),
}

BAD_RAW = {
    "malformed": (_raw('{"request_id": "x", "k": '), 400, "malformed JSON"),
    "empty_body": (b"", 400, "malformed JSON"),
    "not_utf8": (b"\xff\xfe{}", 400, "malformed JSON"),
    "nan_feature": (_raw(json.dumps(body(n=3, k=1)).replace(json.dumps(body(n=3, k=1)["candidates"][1]["features"][2]), "NaN", 1)),
                    422, "NaN/inf in features of candidate 1"),
    "inf_context": (_raw(json.dumps(body()).replace("0.5", "Infinity", 1)), 422, "context: NaN/inf"),
    "overflow_float32": (_raw(json.dumps(body(n=3, k=1)).replace(json.dumps(body(n=3, k=1)["candidates"][0]["features"][0]), "1e39", 1)),
                         422, "NaN/inf in features of candidate 0"),
    "oversized": (_raw(json.dumps(body(n=40, k=2, pad="x" * 30_000))), 413, "limit of 20000"),
}


def _check_rejected(client, response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    payload = response.json()
    assert fragment in payload["error"], payload["error"]
    assert "\n" not in payload["error"] and "Traceback" not in payload["error"]
    ok = client.post("/v1/rerank", json=body())  # the server is still serving
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_request_is_rejected_and_server_survives(client, case):
    make, status, fragment = BAD_JSON[case]
    _check_rejected(client, client.post("/v1/rerank", json=make()), status, fragment)


@pytest.mark.parametrize("case", sorted(BAD_RAW))
def test_bad_raw_body_is_rejected_and_server_survives(client, case):
    raw, status, fragment = BAD_RAW[case]
    r = client.post("/v1/rerank", content=raw, headers={"content-type": "application/json"})
    _check_rejected(client, r, status, fragment)


def test_oversized_chunked_body_is_413(client):
    chunk = b" " * 4096
    r = client.post("/v1/rerank", content=iter([chunk] * 8), headers={"content-type": "application/json"})
    _check_rejected(client, r, 413, "limit of 20000")


def test_request_id_is_echoed_in_errors(client):
    r = client.post("/v1/rerank", json=body(n=3, k=5, request_id="abc"))
    assert r.status_code == 422 and r.json()["request_id"] == "abc"
    assert "request 0 ('abc')" in r.json()["error"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "application/json; charset=latin-1"])
def test_post_that_is_not_json_is_415(client, content_type):
    # text/plain, form and multipart bodies are what a web page may POST cross-site without
    # a CORS preflight; the service takes none of them, even when the bytes are valid JSON.
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post("/v1/rerank", content=json.dumps(body()).encode(), headers=headers)
    _check_rejected(client, r, 415, "Content-Type: ")
    assert r.json()["request_id"] is None


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", 'Application/JSON; Charset="UTF-8"'])
def test_json_with_a_utf8_charset_is_accepted(client, content_type):
    r = client.post("/v1/rerank", content=json.dumps(body()).encode(), headers={"content-type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("where", ["features", "context"])
def test_non_finite_model_output_is_422_not_a_page(client, torch_client, backend, group, where):
    # 3e38 is a finite float32, but the network overflows on it: every logit is NaN. Before,
    # group 1 answered 200 with the input order and invented scores, group > 1 a 500.
    c = {"onnx": client, "torch": torch_client}[backend]
    req = body(6, 3, request_id="big", group=group)
    if where == "features":
        req["candidates"][2]["features"] = [3e38] * D
    else:
        req["context"] = [3e38, -3e38]
    before = _parse_metrics(c.get("/metrics").text)
    r = c.post("/v1/rerank", json=req)
    _check_rejected(c, r, 422, "model output is not finite for request 0 ('big'): input features too large?")
    after = _parse_metrics(c.get("/metrics").text)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    # The refusal is an error by reason and status; the one success (_check_rejected's
    # follow-up request) is the only new entry of the latency histogram.
    assert delta['dualrerank_rerank_errors_total{reason="non_finite_output"}'] == 1
    assert delta['dualrerank_http_requests_total{path="/v1/rerank",status="422"}'] == 1
    assert delta["dualrerank_rerank_latency_seconds_count"] == 1


def test_non_finite_evaluator_value_is_422(bundle):
    model = load_serving_model(bundle, "torch", warmup=False)
    model.evaluator.page_value = lambda batch, pages: torch.full(pages.shape[:2], float("nan"))
    with TestClient(create_app(model)) as c:
        r = c.post("/v1/rerank", json=body(8, 3, group=4))
        assert r.status_code == 422 and "evaluator page value is not finite" in r.json()["error"], r.text
        assert c.post("/v1/rerank", json=body(8, 3)).status_code == 200  # greedy needs no evaluator


def test_serving_model_refuses_non_finite_inputs_that_skipped_validation(bundle):
    model = load_serving_model(bundle, "torch", warmup=False)
    batch = as_batch(body(5, 2))
    batch.candidates[0, 3, 1] = float("nan")
    with pytest.raises(DataError, match=r"NaN/inf in the features of request 0"):
        model.rerank(batch, 2)


# ------------------------------------------------------------------ OpenAPI
def test_openapi_document_describes_this_deployment(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert set(doc["paths"]) == {"/v1/rerank", "/healthz", "/metrics"}
    rerank = doc["paths"]["/v1/rerank"]["post"]
    assert rerank["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RerankRequestIn"}
    assert set(rerank["responses"]) == {"200", "400", "413", "415", "422", "500"}
    schemas = doc["components"]["schemas"]
    features = schemas["CandidateIn"]["properties"]["features"]
    assert features["minItems"] == features["maxItems"] == D
    request = schemas["RerankRequestIn"]["properties"]
    assert request["context"]["minItems"] == request["context"]["maxItems"] == C
    assert request["candidates"]["maxItems"] == 50 and request["k"]["maximum"] == MAX_POS
    assert "upstream_score" not in request
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_head_healthz(client):
    r = client.head("/healthz")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json" and r.content == b""


def test_schemathesis_finds_no_server_error_and_no_schema_violation(bundle):
    """Property-based run over the OpenAPI document: requests that fit the schema (and, in
    the second mode, requests that do not) must never get a 500, an undocumented status, or
    a response that breaks the documented schema. Bounded and derandomized: the same
    examples on every run, about a second."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks

    app = create_app(load_serving_model(bundle, "onnx"), ServeConfig(max_candidates=20, max_body_bytes=20_000, max_group=8))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: list[int] = []
    verdicts = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                checks.response_schema_conformance, checks.response_headers_conformance]

    for mode, examples in ((schemathesis.GenerationMode.POSITIVE, 50), (schemathesis.GenerationMode.NEGATIVE, 25)):

        @given(case=schema.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call()
            seen.append(response.status_code)
            case.validate_response(response, checks=verdicts)

        run()
    # The run reached the model, not only the validators.
    assert seen.count(200) >= 5 and 422 in seen, sorted(set(seen))


# ------------------------------------------------------------------ health and metrics
def test_healthz(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["candidate_dim"] == D and h["context_dim"] == C
    assert h["evaluator"] is True and h["backend"] == "onnx" and h["max_candidates"] == 50
    assert h["max_body_bytes"] == 20_000


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*)?\})? (\S+)$')


def _parse_metrics(text: str) -> dict[str, float]:
    samples, typed = {}, set()
    for line in text.strip().splitlines():
        if line.startswith("# TYPE"):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP ")
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert family in typed, f"{m.group(1)} has no TYPE line before it"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(5))
    return samples


def test_metrics_format_and_counts(bundle):
    app = create_app(load_serving_model(bundle, "torch", warmup=False), ServeConfig(max_body_bytes=10_000))
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/v1/rerank", json=body()).status_code == 200
        as_json = {"content-type": "application/json"}
        c.post("/v1/rerank", content=b"{", headers=as_json)
        c.post("/v1/rerank", json=body(k=0))
        c.post("/v1/rerank", content=b"x" * 10_001, headers=as_json)
        c.post("/v1/rerank", content=json.dumps(body()), headers={"content-type": "text/plain"})
        c.post("/v1/rerank", json={**body(), "context": [3e38, 3e38]})
        c.get("/nope")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    s = _parse_metrics(r.text)
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="200"}'] == 3
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="400"}'] == 1
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="422"}'] == 2
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="413"}'] == 1
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="415"}'] == 1
    assert s['dualrerank_http_requests_total{path="other",status="404"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="invalid_json"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="invalid_request"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="body_too_large"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="unsupported_media_type"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="non_finite_output"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="internal"}'] == 0
    buckets = [(k, v) for k, v in s.items() if k.startswith("dualrerank_rerank_latency_seconds_bucket")]
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0].endswith('{le="+Inf"}')
    assert values[-1] == s["dualrerank_rerank_latency_seconds_count"] == 3
    assert s["dualrerank_rerank_latency_seconds_sum"] > 0
    assert any(k.startswith("dualrerank_model_info{") for k in s)


def test_internal_error_is_500_and_server_survives(bundle):
    model = load_serving_model(bundle, "torch", warmup=False)
    app = create_app(model, ServeConfig())

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    real = model.backend.logits
    with TestClient(app) as c:
        model.backend.logits = broken
        r = c.post("/v1/rerank", json=body())
        assert r.status_code == 500 and r.json()["error"] == "internal error (RuntimeError)"
        model.backend.logits = real
        assert c.post("/v1/rerank", json=body()).status_code == 200
        assert 'dualrerank_rerank_errors_total{reason="internal"} 1' in c.get("/metrics").text


def test_bad_server_config_is_rejected(bundle):
    from dualrerank.errors import ConfigError

    with pytest.raises(ConfigError, match="max_candidates"):
        create_app(load_serving_model(bundle, "torch", warmup=False), ServeConfig(max_candidates=0))


# ------------------------------------------------------------------ client
def test_client_against_in_process_app(client):
    rc = RerankClient(client=client)
    assert rc.health()["status"] == "ok"
    req = body(8, 3)
    feats = np.array([c["features"] for c in req["candidates"]], dtype=np.float32)
    reply = rc.rerank("c1", np.array(req["context"]), [(np.int64(100 + i), feats[i]) for i in range(8)], k=3)
    assert reply.request_id == "c1" and len(reply.ids) == 3 and reply.selected_by == "greedy"
    assert all(isinstance(i, int) for i in reply.ids)
    grouped = rc.rerank("c2", req["context"], req["candidates"], k=3, group=4)
    assert grouped.selected_by == "evaluator" and grouped.page_value is not None
    with pytest.raises(ServiceError) as info:
        rc.rerank("c3", req["context"], req["candidates"][:3], k=4)
    assert info.value.status_code == 422 and "valid candidates" in info.value.message
    assert "dualrerank_http_requests_total" in rc.metrics()
    with pytest.raises(DataError, match="NaN/inf"):
        rc.rerank("c4", [float("nan"), 0.0], req["candidates"], k=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_unreachable_server():
    with RerankClient(f"http://127.0.0.1:{_free_port()}", timeout=2.0) as rc:
        with pytest.raises(ServiceUnavailable, match="cannot reach"):
            rc.health()


# ------------------------------------------------------------------ real server, CLI
def _wait_for_serving_line(proc: subprocess.Popen, out_path: Path, log_path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        lines = out_path.read_text().splitlines()
        if lines:
            return lines[0]
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"server did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)


def test_real_uvicorn_server_via_cli_on_port_0(bundle, models, tmp_path):
    import httpx

    # No --host: the default bind address is loopback.
    cmd = [sys.executable, "-m", "dualrerank.cli", "serve", "--checkpoint", str(bundle), "--port", "0",
           "--max-candidates", "30"]
    out_path, log_path = tmp_path / "server.out", tmp_path / "server.log"
    with open(out_path, "w") as out, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=out, stderr=log)
    try:
        line = _wait_for_serving_line(proc, out_path, log_path)
        m = re.fullmatch(r"serving on (http://127\.0\.0\.1:(\d+))", line)
        assert m and int(m.group(2)) > 0, line
        base = m.group(1)
        with RerankClient(base, timeout=10.0) as rc:
            assert rc.health()["max_candidates"] == 30  # the printed line came after startup
            req = body(10, 4)
            reply = rc.rerank("live", req["context"], req["candidates"], k=4)
            assert reply.ids == greedy_ids(models[0], req) and reply.latency_ms > 0
            with pytest.raises(ServiceError) as info:
                rc.rerank("live2", req["context"], body(31, 2)["candidates"], k=2)
            assert info.value.status_code == 422
        head = httpx.head(f"{base}/healthz", timeout=10.0)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0  # GET's headers, body dropped by uvicorn
        assert httpx.get(f"{base}/openapi.json", timeout=10.0).json()["info"]["title"] == "dualrerank"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_on_a_taken_port_is_one_line_exit_2(bundle, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(bundle), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dualrerank serve: error: port: cannot bind 127.0.0.1:{port}"), err


@pytest.mark.parametrize("damage", ["missing", "truncated_weights", "changed_weight", "bad_json", "teacher", "corrupt_onnx", "bad_evaluator"])
def test_serve_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys, damage):
    ck = tmp_path / "ck"
    student, _ = tiny_models()
    if damage != "missing":
        save_serving_bundle(ck, student, onnx=False)
    if damage == "truncated_weights":
        w = ck / "model.safetensors"
        w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    elif damage == "changed_weight":
        # Same size, still valid safetensors, one weight changed: only the checksum tells.
        w = ck / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 0x01
        w.write_bytes(bytes(data))
    elif damage == "bad_json":
        (ck / "config.json").write_text("{not json")
    elif damage == "teacher":
        from dualrerank.models.teacher import ARTeacher, TeacherConfig

        save_checkpoint(ARTeacher(TeacherConfig(encoder=student.config.encoder, n_layers=1, n_heads=2)), ck, "teacher")
    elif damage == "corrupt_onnx":
        (ck / "student.onnx").write_bytes(b"definitely not onnx")
    elif damage == "bad_evaluator":
        (ck / "evaluator").mkdir()
    assert main(["serve", "--checkpoint", str(ck), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dualrerank serve: error:"), err
    if damage == "changed_weight":
        assert "checksum mismatch" in err


def test_serving_path_imports_no_training_code_nor_simulator(bundle):
    code = (
        "import sys\n"
        "from dualrerank.serve.bundle import load_serving_model\n"
        "from dualrerank.serve.app import create_app\n"
        "import dualrerank.commands.serve\n"
        f"create_app(load_serving_model({str(bundle)!r}, 'onnx'))\n"
        "bad = [m for m in sys.modules if m.startswith(('dualrerank.train', 'dualrerank.sim', 'dualrerank.data', 'lightgbm'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
