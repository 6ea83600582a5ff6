"""Serving checkpoints: write one (`save_serving_bundle`) and load one behind a
`ServingModel` (`load_serving_model`).

Checkpoint layout (a directory DIR):

    DIR/config.json, DIR/model.safetensors   the NAR student (`save_checkpoint(student, DIR, "student")`)
    DIR/evaluator/                           optional `ListEvaluator` checkpoint; picks the best page
                                             of a sampled group (requests with group > 1)
    DIR/student.onnx                         optional exported graph (`dualrerank export`); the onnx
                                             backend exports the student in memory when it is absent

`save_checkpoint` replaces its target directory as a whole, so the student must be saved
before `evaluator/` and `student.onnx` are added; `save_serving_bundle` does it in order.

This module sits above both halves of serving: `bundle.py -> export.py -> runtime.py`. It
exports (writing `student.onnx`, or in memory when loading a checkpoint without one) and
builds the runtime's `ServingModel`; `runtime.py` never imports the exporter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dualrerank.errors import CheckpointError, ConfigError
from dualrerank.serve.export import export_student, export_student_bytes, student_metadata
from dualrerank.serve.runtime import (
    EVALUATOR_DIR,
    ONNX_FILE,
    Backend,
    OnnxBackend,
    ServingModel,
    TorchBackend,
    load_student,
)

__all__ = ["EVALUATOR_DIR", "ONNX_FILE", "load_serving_model", "save_serving_bundle"]


def _load_evaluator(directory: Path, student: Any) -> Any:
    from dualrerank.models.checkpoint import load_checkpoint_of_kind

    evaluator = load_checkpoint_of_kind(directory, ("evaluator",), "an evaluator")
    s, e = student.config.encoder, evaluator.config.encoder
    if (s.candidate_dim, s.context_dim) != (e.candidate_dim, e.context_dim):
        raise CheckpointError(
            f"checkpoint {directory}: evaluator feature widths (d={e.candidate_dim}, c={e.context_dim}) differ "
            f"from the student's (d={s.candidate_dim}, c={s.context_dim})"
        )
    return evaluator


def load_serving_model(
    checkpoint: str | Path,
    backend: str = "onnx",
    onnx_path: str | Path | None = None,
    threads: int = 1,
    temperature: float = 1.0,
    include_greedy: bool = True,
    warmup: bool = True,
) -> ServingModel:
    """Load the layout described in the module docstring; every problem is a one-line
    `CheckpointError` (or `ConfigError` for a bad option)."""
    if backend not in ("onnx", "torch"):
        raise ConfigError(f"backend: {backend!r} is not one of ['onnx', 'torch']")
    if threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {threads}")
    from dualrerank.models.checkpoint import resolve_checkpoint

    root = resolve_checkpoint(checkpoint)
    student = load_student(root)
    evaluator = _load_evaluator(root / EVALUATOR_DIR, student) if (root / EVALUATOR_DIR).exists() else None
    expected = student_metadata(student)
    fingerprint = expected["dualrerank.weights_sha256"]
    impl: Backend
    if backend == "torch":
        impl = TorchBackend(student)
    else:
        path = Path(onnx_path) if onnx_path else root / ONNX_FILE
        if onnx_path or path.is_file():
            impl = OnnxBackend(path, threads, expected)
        else:
            impl = OnnxBackend(export_student_bytes(student), threads, expected)
    enc = student.config.encoder
    model = ServingModel(
        impl,
        enc.candidate_dim,
        enc.context_dim,
        student.config.max_positions,
        model_version=f"student-{fingerprint[:12]}",
        evaluator=evaluator,
        temperature=temperature,
        include_greedy=include_greedy,
    )
    if warmup:
        model.warmup()
    return model


def save_serving_bundle(
    directory: str | Path, student: Any, evaluator: Any | None = None, onnx: bool = True, opset: int | None = None
) -> Path:
    """Write a serving checkpoint: the student, then `evaluator/`, then `student.onnx`."""
    from dualrerank.models.checkpoint import save_checkpoint

    root = save_checkpoint(student, directory, "student")
    if evaluator is not None:
        save_checkpoint(evaluator, root / EVALUATOR_DIR, "evaluator")
    if onnx:
        opset_arg: dict[str, Any] = {} if opset is None else {"opset": opset}
        export_student(student, root / ONNX_FILE, **opset_arg)
    return root
