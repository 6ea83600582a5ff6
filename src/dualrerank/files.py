"""Atomic file writes: every file the package writes (configs, metrics summaries, logs,
checkpoints' side files, reports, plots, ONNX graphs) goes through `atomic_write`, so an
interrupted run never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a fresh temp file beside `path`, flush it to disk, then rename
    it onto `path`. The temp file is removed if `write` fails. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp creates 0600 files; the final file gets what the user's umask allows,
        # as a plain open() would have given it.
        os.chmod(tmp, umask_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def umask_mode(directory: bool = False) -> int:
    """The permission bits a new file (or directory) gets under the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_text(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) into `path`, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """`obj` as indented JSON (plus a final newline) into `path`, atomically."""
    return write_text(path, json.dumps(obj, indent=2, **dumps) + "\n")
