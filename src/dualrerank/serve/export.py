"""ONNX export of the NAR student's logit matrix.

The graph computes the student's encoder and NAR decoder:

    inputs   candidates      float32 [B, n, d]
             context         float32 [B, c]
             candidate_mask  bool    [B, n]   (True = the candidate exists)
             positions       int64   [L]      (page positions to decode, normally 0..k-1)
    output   logits          float32 [B, L, n] (-inf at padded candidates)

B, n and L are all dynamic. The page length enters as the *shape* of `positions` rather
than as a Python int: the student's position queries attend to each other (non-causal),
so the first k rows of a longer matrix differ from a k-row matrix, and a graph traced
with a fixed L could not serve another k.

Greedy decoding is *not* in the graph: it is a loop of L masked argmaxes over `[B, n]`
rows, which the TorchScript exporter can only unroll for a fixed L, and which costs a few
microseconds in NumPy after the graph (`runtime.greedy_pages`). Group sampling
(Gumbel-Max) likewise runs after the graph, on the logits.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`; the torch.export
based exporter needs `onnxscript`, which is not a dependency. The file carries metadata
(`dualrerank.*` keys) with the feature widths, `max_positions` and a fingerprint of the
weights, so that a server can refuse an ONNX file exported from another checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dualrerank.errors import ConfigError
from dualrerank.files import atomic_write
from dualrerank.models.student import NARStudent
from dualrerank.serve.config import DEFAULT_OPSET

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "StudentLogitGraph",
    "weights_fingerprint",
    "student_metadata",
    "export_student_bytes",
    "export_student",
    "random_parity_batches",
    "check_parity",
]

INPUT_NAMES = ("candidates", "context", "candidate_mask", "positions")
OUTPUT_NAME = "logits"
GRAPH_FORMAT = "dualrerank.student_logits/1"
MIN_OPSET = 14  # scaled_dot_product_attention exports from opset 14 on
_DYNAMIC_AXES = {
    "candidates": {0: "batch", 1: "candidates"},
    "context": {0: "batch"},
    "candidate_mask": {0: "batch", 1: "candidates"},
    "positions": {0: "length"},
    OUTPUT_NAME: {0: "batch", 1: "length", 2: "candidates"},
}


class StudentLogitGraph(nn.Module):
    """`NARStudent.position_logits` as the exported graph's forward: the page length is the
    shape of the `positions [L]` input, so one graph serves every k (checked by `check_parity`)."""

    def __init__(self, student: NARStudent) -> None:
        super().__init__()
        self.student = student

    def forward(
        self, candidates: torch.Tensor, context: torch.Tensor, candidate_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return self.student.position_logits(candidates, context, candidate_mask, positions)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, values): identifies the weights
    independently of the file they were stored in."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def student_metadata(student: NARStudent) -> dict[str, str]:
    """The `dualrerank.*` metadata stored in (and checked against) an exported graph."""
    enc = student.config.encoder
    return {
        "dualrerank.format": GRAPH_FORMAT,
        "dualrerank.candidate_dim": str(enc.candidate_dim),
        "dualrerank.context_dim": str(enc.context_dim),
        "dualrerank.max_positions": str(student.config.max_positions),
        "dualrerank.weights_sha256": weights_fingerprint(student),
    }


def _max_opset() -> int:
    # Checked up front: on an unsupported opset the exporter dumps its whole IR graph to stderr.
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 20


def _dummy_inputs(student: NARStudent) -> tuple[torch.Tensor, ...]:
    enc = student.config.encoder
    B, n = 2, 5
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, 3:] = False  # trace with padding so nothing mask-specific gets constant-folded
    L = min(2, student.config.max_positions)
    return torch.zeros(B, n, enc.candidate_dim), torch.zeros(B, enc.context_dim), mask, torch.arange(L)


def export_student_bytes(student: NARStudent, opset: int = DEFAULT_OPSET, extra_metadata: dict[str, str] | None = None) -> bytes:
    """Serialized ONNX model of `StudentLogitGraph(student)` (see the module docstring)."""
    import onnx

    if not isinstance(student, NARStudent):
        raise ConfigError(f"export: expected a NARStudent, got {type(student).__name__}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= _max_opset():
        raise ConfigError(f"opset: must be an integer in [{MIN_OPSET}, {_max_opset()}] (this torch's exporter), got {opset!r}")
    graph = StudentLogitGraph(student)
    buf = io.BytesIO()
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about shape tests that are constant for a given model (e.g.
            # the encoder's zero-width-context branch) and that the exporter is the legacy one.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                _dummy_inputs(student),
                buf,  # type: ignore[arg-type]  # torch.onnx.export takes a file-like object too; its annotation omits it
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes=_DYNAMIC_AXES,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except (ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"export: torch.onnx.export failed with opset {opset} ({first})") from None
    finally:
        student.train(was_training)
    proto = onnx.load_model_from_string(buf.getvalue())
    meta = {**student_metadata(student), "dualrerank.opset": str(opset), **(extra_metadata or {})}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_student(
    student: NARStudent, path: str | Path, opset: int = DEFAULT_OPSET, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write the student's ONNX graph to `path` atomically (temp file, then rename)."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"out: {target} is a directory; give a file name such as {target / 'student.onnx'}")
    data = export_student_bytes(student, opset, extra_metadata)
    return atomic_write(target, lambda tmp: tmp.write_bytes(data))


def random_parity_batches(student: NARStudent, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Random padded batches `(candidates, context, mask, L)` drawn around the student's
    stored feature means (so the normalised inputs look like real data)."""
    enc = student.encoder
    rng = np.random.default_rng(seed)
    cand_mean, cand_std = enc.cand_mean.cpu().numpy(), enc.cand_std.cpu().numpy()
    c = student.config.encoder.context_dim
    ctx_mean, ctx_std = enc.ctx_mean.cpu().numpy()[:c], enc.ctx_std.cpu().numpy()[:c]
    max_l = student.config.max_positions
    out = []
    for B, n, L in ((1, 7, 3), (3, 23, 5), (5, 60, 10), (2, 4, 4)):
        L = min(L, max_l)
        X = (cand_mean + cand_std * rng.standard_normal((B, n, cand_mean.shape[0]))).astype(np.float32)
        C = (ctx_mean + ctx_std * rng.standard_normal((B, c))).astype(np.float32)
        valid = rng.integers(L, n + 1, size=B)
        valid[0] = n
        mask = np.arange(n)[None, :] < valid[:, None]
        X[~mask] = rng.standard_normal((int((~mask).sum()), X.shape[2])) * 1e3  # padding holds junk, never read
        out.append((X, C, mask, L))
    return out


def check_parity(student: NARStudent, session: Any, seed: int = 0) -> dict[str, Any]:
    """Compare an ONNX Runtime session of the exported graph with PyTorch.

    Returns `{"max_abs_diff", "pages_equal", "padding_is_neg_inf", "batches"}` over
    `random_parity_batches`: logits at valid candidates, the greedy pages, and -inf exactly
    at padding.
    """
    from dualrerank.decoding import masked_greedy
    from dualrerank.serve.runtime import greedy_pages

    worst, pages_equal, pad_ok = 0.0, True, True
    was_training = student.training
    student.eval()
    try:
        for X, C, mask, L in random_parity_batches(student, seed):
            feeds = {"candidates": X, "context": C, "candidate_mask": mask, "positions": np.arange(L, dtype=np.int64)}
            z_onnx = session.run([OUTPUT_NAME], feeds)[0]
            with torch.no_grad():
                z_ref = student(torch.from_numpy(X), torch.from_numpy(C), torch.from_numpy(mask), L)
                ref_pages = masked_greedy(z_ref, torch.from_numpy(mask)).numpy()
            valid = np.broadcast_to(mask[:, None, :], z_onnx.shape)
            worst = max(worst, float(np.abs(z_onnx[valid] - z_ref.numpy()[valid]).max()))
            pad_ok &= bool(np.isneginf(z_onnx[~valid]).all())
            pages_equal &= bool((greedy_pages(z_onnx, mask)[0] == ref_pages).all())
    finally:
        student.train(was_training)
    return {"max_abs_diff": worst, "pages_equal": pages_equal, "padding_is_neg_inf": pad_ok, "batches": 4}
