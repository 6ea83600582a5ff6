"""`dualrerank export`: the NAR student of a checkpoint to ONNX, checked against PyTorch.

dualrerank export --checkpoint runs/demo/checkpoint --out runs/demo/checkpoint/student.onnx
"""

from __future__ import annotations

import argparse
import os
import sys

from dualrerank.commands._common import add_config_args, load_from_args, print_json
from dualrerank.errors import ConfigError
from dualrerank.serve.config import ExportConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the NAR student to ONNX (dynamic batch, candidates and page length)",
        description="Export the student's encoder + NAR decoder (the [B, L, n] logit matrix) to ONNX, "
        "then check ONNX Runtime against PyTorch on random padded batches.",
    )
    p.add_argument("--checkpoint", default=None, help="student checkpoint directory")
    p.add_argument("--out", default=None, help="ONNX file to write (e.g. CHECKPOINT/student.onnx, which `serve` picks up)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    add_config_args(p, ExportConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dualrerank.serve.export import check_parity, export_student
    from dualrerank.serve.runtime import OnnxBackend, load_student

    overrides = {"checkpoint": args.checkpoint, "out": args.out, "opset": args.opset}
    if args.no_check:
        overrides["check"] = False
    cfg = load_from_args(ExportConfig, args, overrides)
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required")
    if not cfg.out:
        raise ConfigError("--out is required")
    student = load_student(cfg.checkpoint)
    path = export_student(student, cfg.out, cfg.opset)
    report = {
        "out": str(path),
        "opset": cfg.opset,
        "bytes": path.stat().st_size,
        "inputs": ["candidates [B,n,d] float32", "context [B,c] float32", "candidate_mask [B,n] bool", "positions [L] int64"],
        "outputs": ["logits [B,L,n] float32 (-inf at padding)"],
    }
    ok = True
    if cfg.check:
        parity = check_parity(student, OnnxBackend(path).session, seed=cfg.seed)
        ok = parity["max_abs_diff"] <= cfg.check_tolerance and parity["pages_equal"] and parity["padding_is_neg_inf"]
        report["parity"] = {**parity, "tolerance": cfg.check_tolerance, "ok": ok}
    try:
        print_json(report)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left early (`| head`): the ONNX file is written and checked, so the
        # status stays the export's. stdout now points at /dev/null, or the interpreter's
        # final flush would hit the closed pipe again and print a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0 if ok else 1
