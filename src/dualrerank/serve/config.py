"""Config dataclasses of the serving commands (`dualrerank export`, `dualrerank serve`).

Kept apart from the runtime so that building the CLI parser (which lists these keys in
`--help`) imports neither PyTorch models nor ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualrerank.config import option

__all__ = ["DEFAULT_OPSET", "ExportConfig", "ServeConfig"]

DEFAULT_OPSET = 17


@dataclass
class ExportConfig:
    checkpoint: str = option("", "student checkpoint directory (kind 'nar')")
    out: str = option("", "path of the ONNX file to write (written atomically)")
    opset: int = option(DEFAULT_OPSET, "ONNX opset (17 has a native LayerNormalization op)")
    check: bool = option(True, "after export, compare ONNX Runtime against PyTorch on random padded batches")
    check_tolerance: float = option(1e-4, "largest absolute logit difference the parity check accepts")
    seed: int = option(0, "seed of the parity check's random batches")


@dataclass
class ServeConfig:
    checkpoint: str = option("", "serving checkpoint directory: the student, optionally evaluator/ and student.onnx inside")
    backend: str = option("onnx", "inference backend of the student's logit matrix", choices=("onnx", "torch"))
    onnx_path: str = option(
        "",
        "ONNX file of the student (default: CHECKPOINT/student.onnx if present, "
        "else the student is exported in memory at startup)",
    )
    host: str = option("127.0.0.1", "interface to bind (loopback by default; 0.0.0.0 exposes the service)")
    port: int = option(8000, "TCP port (0: the system picks a free one; `serve` prints it once serving)")
    max_candidates: int = option(1000, "largest number of candidates one request may carry (more -> 422)")
    max_body_bytes: int = option(4 * 1024 * 1024, "largest request body in bytes (more -> 413, body not parsed)")
    max_group: int = option(64, "largest group of sampled pages a request may ask for")
    temperature: float = option(1.0, "Gumbel-Max sampling temperature for group > 1")
    include_greedy: bool = option(True, "a group of pages always contains the greedy page")
    threads: int = option(1, "intra-op threads of one inference (torch.set_num_threads / ORT intra_op_num_threads)")
    workers: int = option(2, "requests computed at the same time (the rest wait their turn)")
    warmup: bool = option(True, "run one dummy inference at startup so the first request is not slow")
    access_log: bool = option(False, "log one line per request (uvicorn access log)")
    log_level: str = option("info", "server log level", choices=("critical", "error", "warning", "info", "debug"))
    seed: int = option(0, "seed of group sampling; each request's noise is derived from (seed, request_id)")
