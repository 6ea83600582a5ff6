"""ONNX export of the student: parity with PyTorch (logits, -inf padding, greedy pages),
dynamic batch / candidates / page length, metadata checks, the NumPy greedy decoder, and
the `dualrerank export` command."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from dualrerank.cli import main
from dualrerank.decoding import masked_greedy, sequential_log_prob
from dualrerank.errors import CheckpointError, ConfigError
from dualrerank.models.checkpoint import save_checkpoint
from dualrerank.models.encoder import EncoderConfig
from dualrerank.models.student import NARStudent, StudentConfig
from dualrerank.serve.bundle import load_serving_model, save_serving_bundle
from dualrerank.serve.export import check_parity, export_student, export_student_bytes, weights_fingerprint
from dualrerank.serve.runtime import OnnxBackend, TorchBackend, greedy_pages


def tiny_student(seed: int = 0, d: int = 6, c: int = 3, max_positions: int = 12) -> NARStudent:
    torch.manual_seed(seed)
    enc = EncoderConfig(candidate_dim=d, context_dim=c, d_model=16, n_heads=2, n_layers=1, dropout=0.0)
    student = NARStudent(StudentConfig(encoder=enc, n_layers=2, n_heads=2, dropout=0.0, max_positions=max_positions))
    # Non-trivial normaliser so that the exported graph must carry it.
    student.encoder.cand_mean.copy_(torch.linspace(-1, 1, d))
    student.encoder.cand_std.copy_(torch.linspace(0.5, 2, d))
    return student.eval()


def random_inputs(g: torch.Generator, B: int, n: int, d: int, c: int, L: int):
    X = torch.randn(B, n, d, generator=g)
    C = torch.randn(B, c, generator=g)
    valid = torch.randint(L, n + 1, (B,), generator=g)
    valid[0] = n
    mask = torch.arange(n).unsqueeze(0) < valid.unsqueeze(1)
    X = torch.where(mask.unsqueeze(-1), X, torch.full_like(X, 1e6))  # junk at padding must not leak
    return X, C, mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    student = tiny_student()
    path = export_student(student, tmp_path_factory.mktemp("onnx") / "student.onnx")
    return student, path, OnnxBackend(path)


@pytest.mark.parametrize("B,n,L", [(1, 5, 5), (2, 9, 4), (4, 37, 12), (7, 100, 10)])
def test_onnx_logits_and_pages_match_torch(exported, B, n, L):
    student, _, backend = exported
    g = torch.Generator().manual_seed(B * 1000 + n)
    X, C, mask = random_inputs(g, B, n, 6, 3, L)
    with torch.no_grad():
        ref = student(X, C, mask, L)
    z = backend.logits(X.numpy(), C.numpy(), mask.numpy(), L)
    assert z.shape == (B, L, n)
    valid = mask.unsqueeze(1).expand(B, L, n).numpy()
    assert np.isneginf(z[~valid]).all()
    assert np.abs(z[valid] - ref.numpy()[valid]).max() < 1e-4
    pages, _ = greedy_pages(z, mask.numpy())
    assert (pages == masked_greedy(ref, mask).numpy()).all()
    assert (pages == student.rerank(_batch(X, C, mask), L).numpy()).all()


def _batch(X, C, mask):
    from dualrerank.schema import RerankBatch

    return RerankBatch(candidates=X, candidate_mask=mask, context=C)


def test_zero_width_context_exports(tmp_path):
    student = tiny_student(seed=3, c=0)
    backend = OnnxBackend(export_student(student, tmp_path / "s.onnx"))
    report = check_parity(student, backend.session, seed=1)
    assert report["max_abs_diff"] < 1e-4 and report["pages_equal"] and report["padding_is_neg_inf"]


def test_check_parity_detects_a_different_model(exported):
    _, _, backend = exported
    other = tiny_student(seed=99)
    report = check_parity(other, backend.session)
    assert report["max_abs_diff"] > 1e-3


def test_metadata_and_dynamic_axes(exported):
    student, path, backend = exported
    meta = backend.metadata
    assert meta["dualrerank.candidate_dim"] == "6" and meta["dualrerank.context_dim"] == "3"
    assert meta["dualrerank.max_positions"] == "12"
    assert meta["dualrerank.weights_sha256"] == weights_fingerprint(student)
    proto = onnx.load(str(path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["candidates"][:2] == ["batch", "candidates"]
    assert dims["positions"] == ["length"]


def test_onnx_from_other_weights_is_refused(tmp_path):
    student = tiny_student(seed=1)
    save_serving_bundle(tmp_path / "ck", student, onnx=False)
    export_student(tiny_student(seed=2), tmp_path / "ck" / "student.onnx")
    with pytest.raises(CheckpointError, match="does not match the checkpoint"):
        load_serving_model(tmp_path / "ck", "onnx")


def test_corrupt_onnx_is_a_checkpoint_error(tmp_path):
    save_serving_bundle(tmp_path / "ck", tiny_student(), onnx=False)
    (tmp_path / "ck" / "student.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(CheckpointError, match="onnx: cannot load"):
        load_serving_model(tmp_path / "ck", "onnx")


def test_in_memory_export_when_no_onnx_file(tmp_path):
    student = tiny_student()
    save_serving_bundle(tmp_path / "ck", student, onnx=False)
    model = load_serving_model(tmp_path / "ck", "onnx")
    assert model.backend.name == "onnx"
    assert model.model_version == f"student-{weights_fingerprint(student)[:12]}"


def test_bad_opset_is_a_config_error():
    with pytest.raises(ConfigError, match="opset"):
        export_student_bytes(tiny_student(), opset=9)


def test_backends_agree_through_serving_model(tmp_path):
    student = tiny_student(seed=4)
    save_serving_bundle(tmp_path / "ck", student)
    g = torch.Generator().manual_seed(0)
    X, C, mask = random_inputs(g, 3, 20, 6, 3, 6)
    a = load_serving_model(tmp_path / "ck", "onnx").rerank(_batch(X, C, mask), 6)
    b = load_serving_model(tmp_path / "ck", "torch").rerank(_batch(X, C, mask), 6)
    assert (a.pages == b.pages).all()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert isinstance(load_serving_model(tmp_path / "ck", "torch").backend, TorchBackend)


# ------------------------------------------------------------------ NumPy greedy decoder
@pytest.mark.parametrize("seed", range(6))
def test_numpy_greedy_matches_decoding_masked_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, n = 5, 6, 11
    # Few distinct values: many ties, which must break to the lowest index like masked_greedy.
    z = torch.randint(-2, 3, (B, L, n), generator=g).float()
    mask = torch.rand(B, n, generator=g) < 0.8
    mask[:, :L] = True
    z[0, 0, 3] = float("nan")
    z[1, :, 0] = float("-inf")  # a valid candidate scored -inf still beats padding
    z[2, 2, 5] = float("inf")
    z = z.masked_fill(~mask.unsqueeze(1), float("-inf"))
    pages, probs = greedy_pages(z.numpy(), mask.numpy())
    assert (pages == masked_greedy(z, mask).numpy()).all()
    assert np.isfinite(probs).all() and (probs > 0).all() and (probs <= 1).all()


def test_numpy_greedy_step_probabilities_are_sequential_softmax():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, 9, generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    z = z.masked_fill(~mask.unsqueeze(1), float("-inf"))
    pages, probs = greedy_pages(z.numpy(), mask.numpy())
    ref = sequential_log_prob(z, mask, torch.from_numpy(pages)).exp().numpy()
    np.testing.assert_allclose(probs, ref, rtol=1e-5)


# ------------------------------------------------------------------ CLI
def test_export_command_writes_and_checks(tmp_path, capsys):
    save_checkpoint(tiny_student(), tmp_path / "ck", "student")
    out = tmp_path / "m" / "student.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(out), "--opset", "17"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["parity"]["ok"] and report["parity"]["max_abs_diff"] < 1e-4


def test_export_and_serving_accept_a_run_directory(tmp_path, capsys):
    from dualrerank.serve.bundle import load_serving_model

    run = tmp_path / "run"
    save_checkpoint(tiny_student(), run / "checkpoint", "student")  # the layout train/distill write
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "s.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["ok"]
    model = load_serving_model(run, backend="torch", warmup=False)
    assert model.model_version.startswith("student-")


@pytest.mark.parametrize("damage", ["missing", "truncated", "not_a_student"])
def test_export_command_bad_checkpoint_exits_2(tmp_path, capsys, damage):
    ck = tmp_path / "ck"
    if damage == "truncated":
        save_checkpoint(tiny_student(), ck, "student")
        w = ck / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "not_a_student":
        from dualrerank.models.evaluator import EvaluatorConfig, ListEvaluator

        enc = EncoderConfig(candidate_dim=6, context_dim=3, d_model=16, n_heads=2, n_layers=1)
        save_checkpoint(ListEvaluator(EvaluatorConfig(encoder=enc, n_layers=1)), ck, "evaluator")
    assert main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dualrerank export: error:")
    assert not (tmp_path / "x.onnx").exists()


def test_export_into_a_closed_pipe_exits_quietly(tmp_path):
    """`dualrerank export ... | head`: the reader is gone before the report is printed. The
    export itself succeeded, so its status stands; no traceback, no 'Exception ignored'."""
    import subprocess
    import sys

    save_checkpoint(tiny_student(), tmp_path / "ck", "student")
    out = tmp_path / "s.onnx"
    cmd = [sys.executable, "-m", "dualrerank.cli", "export", "--checkpoint", str(tmp_path / "ck"), "--out", str(out), "--no-check"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # no reader left: the command's first write gets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == "" and out.is_file()
