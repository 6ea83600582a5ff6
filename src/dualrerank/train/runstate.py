"""Run directories and the state that lets a run stop and continue.

A run directory (`--out`) holds one run: `config.yaml`, `metrics.jsonl`, `last.pt` (the
resumable state of the last finished epoch), `checkpoint/` (the best model), `eval.json`,
`report.md`, plots, and for runs with phases a sub-run per phase (`evaluator/`). This
module is the one place that
- decides whether a directory may receive a run (`prepare_run_dir`): a directory that holds
  a run is refused unless the run is resumed or explicitly overwritten, and a run may never
  be written into a directory it reads from (distilling into the teacher's run);
- removes what a crash left behind (`clean_stale`): temp files of atomic writes, half-built
  checkpoint directories, and a checkpoint set aside during a replace (restored when the
  replace did not finish);
- writes and reads the resumable state (`save_snapshot`, `load_snapshot`) without
  executing anything on load: `torch.load(weights_only=True)` only rebuilds tensors and
  plain containers, so a crafted `last.pt` cannot run code;
- keeps `metrics.jsonl` and `last.pt` consistent (`MetricsLog`): each snapshot records the
  log's length, and a resume truncates the log to it, so an epoch whose snapshot was never
  written is not logged twice.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dualrerank.errors import CheckpointError, ConfigError
from dualrerank.files import atomic_write

__all__ = [
    "RUN_FILES",
    "prepare_run_dir",
    "clean_stale",
    "save_snapshot",
    "load_snapshot",
    "MetricsLog",
    "PhaseClock",
    "optimizer_step",
]

#: Where a run's metrics go besides metrics.jsonl (`--report-to`).
REPORT_TO = ("none", "tensorboard")

# What a finished or interrupted run leaves in its directory; `--overwrite` removes these.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "last.pt",
    "checkpoint",
    "eval.json",
    "report.md",
    "curves.png",
    "evaluator",
    "targets.pt",
    "tensorboard",
    "online.pt",
    "student",
    "teacher",
)
# A directory holding any of these holds a run's work (a lone config.yaml is a run that
# failed before its first epoch: nothing to lose, so it does not block a new start).
_MARKERS = ("metrics.jsonl", "last.pt", "checkpoint", "eval.json", "evaluator", "targets.pt")
# Leftovers of `files.atomic_write` (.NAME.XXXX.tmp) and of `save_checkpoint`
# (.NAME.tmp-XXXX / .NAME.old-XXXX directories).
_TMP_FILE = re.compile(r"^\..+\.tmp$")
_TMP_DIR = re.compile(r"^\.(?P<name>.+)\.tmp-[^/]+$")
_OLD_DIR = re.compile(r"^\.(?P<name>.+)\.old-[^/]+$")


def _inside(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def prepare_run_dir(
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reads: Iterable[Path] = (),
) -> None:
    """Make `run_dir` ready for a run, or raise a one-line `ConfigError`.

    Args:
        run_dir: the run directory (`--out`).
        resume: the run continues what is in `run_dir`.
        overwrite: the run replaces what is in `run_dir` (its run files are removed).
        reads: directories the run reads from (a teacher's run, an evaluator): `run_dir`
            may not be one of them, nor lie inside one.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; give one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is an existing file; give a directory for the run")
    for src in reads:
        src = Path(src)
        if src.exists() and (_inside(run_dir, src) or _inside(src, run_dir)):
            raise ConfigError(f"--out {run_dir} would write into {src}, which this run reads from; choose another directory")
    held = [m for m in _MARKERS if (run_dir / m).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(
            f"--out {run_dir} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another directory"
        )
    if resume and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir / 'config.yaml'} not found; start the run without --resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(run_dir)
    if overwrite:
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def clean_stale(directory: Path) -> list[str]:
    """Remove what an interrupted write left in `directory` (and its sub-run directories);
    returns the names removed or restored. A checkpoint that was set aside for a replace
    that never finished is put back under its name."""
    directory = Path(directory)
    touched: list[str] = []
    if not directory.is_dir():
        return touched
    for entry in sorted(directory.iterdir()):
        name = entry.name
        old = _OLD_DIR.match(name)
        if entry.is_dir() and old:
            target = directory / old.group("name")
            if not target.exists():
                os.replace(entry, target)
                touched.append(f"{name} -> {target.name}")
            else:
                shutil.rmtree(entry, ignore_errors=True)
                touched.append(name)
        elif entry.is_dir() and _TMP_DIR.match(name):
            shutil.rmtree(entry, ignore_errors=True)
            touched.append(name)
        elif entry.is_file() and _TMP_FILE.match(name):
            entry.unlink(missing_ok=True)
            touched.append(name)
    for sub in ("evaluator",):
        if (directory / sub).is_dir():
            touched += [f"{sub}/{n}" for n in clean_stale(directory / sub)]
    return touched


def save_snapshot(path: Path, snapshot: dict[str, Any]) -> None:
    """Write the resumable state atomically. Only tensors, numbers, strings, lists, tuples
    and dicts may appear in it: `load_snapshot` refuses anything else."""
    atomic_write(path, lambda tmp: torch.save(snapshot, tmp))


def load_snapshot(path: Path) -> dict[str, Any]:
    """The state written by `save_snapshot`; a file that is not one (truncated, random bytes,
    or a pickle that would build arbitrary objects or run code) is a one-line
    `CheckpointError`, and nothing in it is executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (was the run started in this directory?)")
    try:
        # weights_only: the unpickler rebuilds tensors and plain containers only; a
        # GLOBAL/REDUCE opcode naming anything else is refused before it runs.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"cannot resume from {path}: it holds objects other than tensors and plain data (refused, nothing was run)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is that file's fault
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot resume from {path}: not a dualrerank run state ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume from {path}: not a dualrerank run state")
    return state


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, appended as epochs finish.

    `size()` is stored in each snapshot; `truncate(size)` on resume drops lines written
    after the snapshot that was resumed from.
    """

    def __init__(self, path: Path, report_to: str = "none") -> None:
        self.path = Path(path)
        if report_to not in REPORT_TO:
            raise ConfigError(f"--report-to: {report_to!r} is not one of {list(REPORT_TO)}")
        self._writer: Any = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "--report-to tensorboard needs the tensorboard package: pip install 'dualrerank[tensorboard]'"
                ) from None
            # Event files beside metrics.jsonl: `tensorboard --logdir RUN` shows every run.
            self._writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._writer is not None:
            step = record.get("epoch", record.get("step", 0))
            for key, value in record.items():
                if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, int(step))
            self._writer.flush()

    def size(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    def truncate(self, size: int) -> None:
        if self.path.is_file() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as fh:
                fh.truncate(size)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


class PhaseClock:
    """Wall-clock seconds per named phase of a run (data, evaluator, evaluator targets,
    model, test), so a report's training time counts every phase, not only the last fit.
    A resumed run counts the time of this process only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def figures(self) -> dict[str, Any]:
        """`{"phase_seconds": {phase: s}, "train_seconds": total}` (rounded to ms)."""
        return {
            "phase_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "train_seconds": round(sum(v for k, v in self.seconds.items() if k != "test"), 3),
        }


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One gradient step on `loss`: zero, backward, clip the global norm to `grad_clip`
    (0 = off), step. The one place both the offline loop and the online step update a model."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
