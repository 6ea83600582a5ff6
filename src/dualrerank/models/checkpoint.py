"""Checkpoints: a directory holding the weights and a JSON description, written atomically.

Layout of a checkpoint directory:
    config.json         {"format_version", "model" (registry name), "kind", "config"
                         (the model's config as a dict), "files" (name -> sha256),
                         "extra" (caller's JSON-ready dict), "dualrerank_version"}
    model.safetensors   the state dict (nn.Module models), or
    lightgbm.txt        LightGBM's model text file (LambdaMART)

Atomicity: everything is written into a hidden sibling temp directory, every file and the
directory are fsync'ed, then the temp directory is renamed onto the target (an existing
checkpoint is first renamed aside, then removed). A reader therefore sees the old complete
checkpoint, the new complete one, or none, never a partial one.

Loading rebuilds the model from the registry and checks everything it reads: a missing
directory or file, corrupt JSON, a checksum mismatch, a truncated or corrupt safetensors
file, an unknown model name, a config the model rejects, or weights whose names or shapes
do not fit the model all raise `CheckpointError` with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dualrerank import __version__
from dualrerank.config import to_dict
from dualrerank.errors import CheckpointError, ConfigError, DataError
from dualrerank.files import umask_mode
from dualrerank.models.registry import build_model, config_from_dict, get_spec

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_info",
    "resolve_checkpoint",
    "load_checkpoint_of_kind",
    "check_state_fits",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the renames durable; not every platform allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(obj: Any) -> Any:
    """`json.dumps` fallback: tensors/NumPy scalars and arrays become numbers and lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def save_checkpoint(model: Any, directory: str | Path, name: str, extra: dict | None = None) -> Path:
    """Write `model` (registry name `name`) to `directory` atomically; returns the directory.

    Args:
        model: an instance of the registry entry's class (it must keep `model.config`).
        directory: target directory (replaced atomically if it exists).
        name: registry name, e.g. "teacher", "evaluator", "lambdamart".
        extra: JSON-ready metadata to store (epoch, validation figures, ...).
    """
    spec = get_spec(name)
    if not isinstance(model, spec.model_class):
        raise ConfigError(
            f"checkpoint: model is a {type(model).__name__}, registry entry {name!r} is {spec.model_class.__name__}"
        )
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"checkpoint: {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the directory 0700; a checkpoint is meant to be read by a server that
    # may run as another user, so it gets the umask's permissions like any other directory.
    os.chmod(tmp, umask_mode(directory=True))
    try:
        if isinstance(model, nn.Module):
            # Clones: safetensors refuses tensors that share storage, and wants them contiguous.
            state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"model": name})
        else:
            model.save(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        for fname in files:
            # Writers of weights (safetensors, tree libraries) may create 0600 files.
            os.chmod(tmp / fname, umask_mode())
            _fsync_file(tmp / fname)
        meta = {
            "format_version": FORMAT_VERSION,
            "model": name,
            "kind": spec.kind,
            "config": to_dict(model.config),
            "files": files,
            "extra": extra or {},
            "dualrerank_version": __version__,
        }
        try:
            text = json.dumps(meta, indent=2, default=_jsonable)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint: extra metadata is not JSON-serialisable ({exc})") from None
        with open(tmp / CONFIG_FILE, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists():
            aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, aside)
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_checkpoint_info(directory: str | Path) -> dict[str, Any]:
    """The parsed and checked `config.json` of a checkpoint directory."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint: directory not found: {d}")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {d}: {CONFIG_FILE} missing (incomplete or not a checkpoint)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {d}: {CONFIG_FILE} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {d}: cannot read {CONFIG_FILE} ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {d}: {CONFIG_FILE} must hold a JSON object")
    missing = [k for k in ("format_version", "model", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {d}: {CONFIG_FILE} lacks {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {d}: format_version {meta['format_version']!r} unsupported (this dualrerank reads {FORMAT_VERSION})"
        )
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"checkpoint {d}: {CONFIG_FILE} field 'config' must be a JSON object")
    _check_manifest(d, meta.get("files"))
    return meta


def _check_manifest(d: Path, files: Any) -> None:
    """The manifest is required, non-empty, and names plain files of this directory only:
    without it nothing would be verified, and a `../` entry would read outside it."""
    if not isinstance(files, dict) or not files:
        raise CheckpointError(
            f"checkpoint {d}: {CONFIG_FILE} has no 'files' manifest (name -> sha256); refusing unverified weights"
        )
    for fname, digest in files.items():
        if (
            not isinstance(fname, str)
            or not fname
            or fname in (".", "..")
            or Path(fname).name != fname
            or "\\" in fname
            or fname == CONFIG_FILE
        ):
            raise CheckpointError(f"checkpoint {d}: manifest entry {fname!r} is not a file name inside the checkpoint")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise CheckpointError(f"checkpoint {d}: manifest entry {fname!r} has no sha256 digest")


def _check_files(d: Path, files: dict[str, str]) -> None:
    for fname, digest in files.items():
        path = d / fname
        if not path.is_file():
            raise CheckpointError(f"checkpoint {d}: {fname} missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint {d}: {fname} is corrupt or truncated (checksum mismatch)")


def _load_state(model: nn.Module, d: Path, files: dict[str, str], map_location: str | torch.device) -> None:
    path = d / WEIGHTS_FILE
    if WEIGHTS_FILE not in files:
        raise CheckpointError(f"checkpoint {d}: the manifest does not list {WEIGHTS_FILE}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {d}: {WEIGHTS_FILE} missing")
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {d}: {WEIGHTS_FILE} is unreadable ({first})") from None
    check_state_fits(model, state, f"checkpoint {d}")
    model.load_state_dict(state, strict=True)


def check_state_fits(model: nn.Module, state: Any, where: str) -> None:
    """One-line `CheckpointError` (prefixed by `where`) unless `state` is a state dict whose
    names and shapes are the model's and whose floats are finite."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where}: weights are not a state dict of tensors")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{where}: weights do not fit the model ({what})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{where}: weight {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            # A NaN/inf weight makes every output NaN: refuse it here rather than serve garbage.
            raise CheckpointError(f"{where}: weight {key!r} holds NaN/inf")


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Rebuild the model saved in `directory` (in eval mode for nn.Module models)."""
    d = Path(directory)
    meta = read_checkpoint_info(d)
    name = meta["model"]
    try:
        get_spec(name)
        config = config_from_dict(name, meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {d}: {exc}") from None
    _check_files(d, meta["files"])
    try:
        model = build_model(name, config)
    except (ConfigError, DataError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {d}: the stored config does not build a {name!r} model ({exc})") from None
    if isinstance(model, nn.Module):
        _load_state(model, d, meta["files"], map_location)
        model.to(map_location)
        model.eval()
    else:
        model.load(d)
    return model


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given either itself or a run directory that holds `checkpoint/`."""
    p = Path(path)
    if (p / "checkpoint" / "config.json").is_file():
        return p / "checkpoint"
    if not p.exists():
        raise CheckpointError(f"checkpoint: {p} does not exist")
    return p


def load_checkpoint_of_kind(path: str | Path, kinds: tuple[str, ...], what: str) -> Any:
    """`load_checkpoint` of a checkpoint (or run directory) whose model has one of the
    registry `kinds`; else a one-line `CheckpointError` saying it is not `what`."""
    directory = resolve_checkpoint(path)
    name = read_checkpoint_info(directory)["model"]
    try:
        kind = get_spec(name).kind
    except ConfigError:
        raise CheckpointError(f"checkpoint {directory}: unknown model {name!r}") from None
    if kind not in kinds:
        raise CheckpointError(f"checkpoint {directory}: holds a {name!r} model, not {what}")
    return load_checkpoint(directory)
