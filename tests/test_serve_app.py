"""The HTTP service: valid requests, every bad-input case (4xx, one-line message, server
still answering afterwards), /metrics format, the client, a real uvicorn process, CLI
errors on bad checkpoints, and the serving path's import discipline."""

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
from dualrerank.serve.runtime import load_serving_model, save_serving_bundle

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


@pytest.fixture(scope="module")
def client(bundle):
    config = ServeConfig(max_candidates=50, max_body_bytes=20_000, max_group=16)
    app = create_app(load_serving_model(bundle, "onnx"), config)
    with TestClient(app) as c:
        yield c


def body(n: int = 10, k: int = 4, request_id: str = "r1", **extra) -> dict:
    rng = np.random.default_rng(n)
    return {
        "request_id": request_id,
        "context": [0.5, -0.25],
        "candidates": [{"id": 100 + i, "features": rng.standard_normal(D).round(4).tolist()} for i in range(n)],
        "k": k,
        **extra,
    }


def assert_valid_page(reply: dict, req: dict) -> None:
    ids = [c["id"] for c in req["candidates"]]
    assert len(reply["ids"]) == req["k"] == len(reply["scores"])
    assert len(set(reply["ids"])) == req["k"] and set(reply["ids"]) <= set(ids)
    assert all(0 < s <= 1 for s in reply["scores"])
    assert reply["latency_ms"] > 0 and reply["model_version"].startswith("student-")


# ------------------------------------------------------------------ valid requests
def test_valid_request_matches_student_greedy_page(client, bundle):
    from dualrerank.models.checkpoint import load_checkpoint
    from dualrerank.schema import RerankBatch

    req = body(12, 5)
    r = client.post("/v1/rerank", json=req)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert_valid_page(reply, req)
    assert reply["selected_by"] == "greedy" and reply["group"] == 1
    student = load_checkpoint(bundle)
    X = torch.tensor([[c["features"] for c in req["candidates"]]], dtype=torch.float32)
    batch = RerankBatch(candidates=X, candidate_mask=torch.ones(1, 12, dtype=torch.bool), context=torch.tensor([req["context"]]))
    page = student.rerank(batch, 5)[0].tolist()
    assert reply["ids"] == [req["candidates"][i]["id"] for i in page]
    assert math.isclose(sum(math.log(s) for s in reply["scores"]), reply["page_log_prob"], rel_tol=1e-4)


def test_group_request_uses_evaluator_and_is_reproducible(client):
    req = body(15, 4, request_id="g1", group=6)
    a, b = client.post("/v1/rerank", json=req).json(), client.post("/v1/rerank", json=req).json()
    assert_valid_page(a, req)
    assert a["selected_by"] == "evaluator" and a["group"] == 6 and "page_value" in a
    assert a["ids"] == b["ids"]  # noise seeded by (server seed, request_id)


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


def test_string_ids_and_upstream_score(client):
    req = body(6, 6)
    for i, cand in enumerate(req["candidates"]):
        cand["id"] = f"video-{i}"
    req["upstream_score"] = [0.1 * i for i in range(6)]
    reply = client.post("/v1/rerank", json=req).json()
    assert sorted(reply["ids"]) == sorted(c["id"] for c in req["candidates"])


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
    "upstream_len": (lambda: body(n=4, k=2, upstream_score=[1.0, 2.0]), 422, "upstream_score: shape"),
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
    "nan_upstream": (_raw(json.dumps(body(n=3, k=1, upstream_score=[0.0, 1.0, 2.0])).replace("2.0]", "NaN]")), 422, "upstream_score: NaN/inf"),
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


# ------------------------------------------------------------------ health and metrics
def test_healthz(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["candidate_dim"] == D and h["context_dim"] == C
    assert h["evaluator"] is True and h["backend"] == "onnx" and h["max_candidates"] == 50


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
        c.post("/v1/rerank", content=b"{")
        c.post("/v1/rerank", json=body(k=0))
        c.post("/v1/rerank", content=b"x" * 10_001)
        c.get("/nope")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    s = _parse_metrics(r.text)
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="200"}'] == 3
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="400"}'] == 1
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="422"}'] == 1
    assert s['dualrerank_http_requests_total{path="/v1/rerank",status="413"}'] == 1
    assert s['dualrerank_http_requests_total{path="other",status="404"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="invalid_json"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="invalid_request"}'] == 1
    assert s['dualrerank_rerank_errors_total{reason="body_too_large"}'] == 1
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
def test_real_uvicorn_server_via_cli(bundle, tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "dualrerank.cli", "serve", "--checkpoint", str(bundle), "--port", str(port),
           "--max-candidates", "30"]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        with RerankClient(f"http://127.0.0.1:{port}", timeout=5.0) as rc:
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert rc.health()["max_candidates"] == 30
                    break
                except ServiceUnavailable:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"server did not start: {log.read()[-2000:]}")
                    time.sleep(0.2)
            req = body(10, 4)
            reply = rc.rerank("live", req["context"], req["candidates"], k=4)
            assert len(reply.ids) == 4 and reply.latency_ms > 0
            with pytest.raises(ServiceError) as info:
                rc.rerank("live2", req["context"], body(31, 2)["candidates"], k=2)
            assert info.value.status_code == 422
            assert rc.rerank("live3", req["context"], req["candidates"], k=2).ids
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("damage", ["missing", "truncated_weights", "bad_json", "teacher", "corrupt_onnx", "bad_evaluator"])
def test_serve_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys, damage):
    ck = tmp_path / "ck"
    student, _ = tiny_models()
    if damage != "missing":
        save_serving_bundle(ck, student, onnx=False)
    if damage == "truncated_weights":
        w = ck / "model.safetensors"
        w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    elif damage == "bad_json":
        (ck / "config.json").write_text("{not json")
    elif damage == "teacher":
        from dualrerank.models.teacher import ARTeacher, TeacherConfig

        save_checkpoint(ARTeacher(TeacherConfig(encoder=student.config.encoder, n_layers=1, n_heads=2)), ck, "teacher")
    elif damage == "corrupt_onnx":
        (ck / "student.onnx").write_bytes(b"definitely not onnx")
    elif damage == "bad_evaluator":
        (ck / "evaluator").mkdir()
    assert main(["serve", "--checkpoint", str(ck), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dualrerank serve: error:"), err


def test_serving_path_imports_no_training_code_nor_simulator(bundle):
    code = (
        "import sys\n"
        "from dualrerank.serve.runtime import load_serving_model\n"
        "from dualrerank.serve.app import create_app\n"
        "import dualrerank.commands.serve\n"
        f"create_app(load_serving_model({str(bundle)!r}, 'onnx'))\n"
        "bad = [m for m in sys.modules if m.startswith(('dualrerank.train', 'dualrerank.sim', 'dualrerank.data', 'lightgbm'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
