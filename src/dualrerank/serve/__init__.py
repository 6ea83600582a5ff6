"""Serving: ONNX export of the NAR student, the HTTP reranking service and its client.

- `export`: `export_student(student, path)` writes the student's logit graph to ONNX.
- `runtime`: `ServingModel`, the student's logits (ONNX Runtime or PyTorch) and decoding
  behind one `ServingModel.rerank` call.
- `bundle`: `load_serving_model(checkpoint, backend)` loads a serving checkpoint (student,
  optional evaluator, optional ONNX file) as a `ServingModel`; `save_serving_bundle` writes one.
- `app`: `create_app(model, config)`, the FastAPI service.
- `client`: `RerankClient(base_url)`.

Names are imported lazily so that `import dualrerank.serve` loads neither ONNX nor FastAPI.
Nothing here imports training code or the simulator.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "ExportConfig": "dualrerank.serve.config",
    "ServeConfig": "dualrerank.serve.config",
    "export_student": "dualrerank.serve.export",
    "export_student_bytes": "dualrerank.serve.export",
    "check_parity": "dualrerank.serve.export",
    "ServingModel": "dualrerank.serve.runtime",
    "RerankResult": "dualrerank.serve.runtime",
    "NonFiniteOutput": "dualrerank.serve.runtime",
    "load_serving_model": "dualrerank.serve.bundle",
    "save_serving_bundle": "dualrerank.serve.bundle",
    "greedy_pages": "dualrerank.serve.runtime",
    "create_app": "dualrerank.serve.app",
    "RerankClient": "dualrerank.serve.client",
    "RerankReply": "dualrerank.serve.client",
    "ServiceError": "dualrerank.serve.client",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dualrerank.serve' has no attribute {name!r}")


__all__ = sorted(_LAZY)
