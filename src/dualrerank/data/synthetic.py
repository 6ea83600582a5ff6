"""Offline logs from the simulated world, and their storage on disk.

    batch = generate_logs(WorldConfig(), num_requests=2000, seed=7)      # RerankBatch
    save_logs(simulate_logs(World(), 2000, 7), "runs/logs")            # what `simulate --out` writes
    batch = load_logs("runs/logs")                                     # what training reads back

A logged batch has the observable features (`candidates`, `context`, `item_ids`,
`upstream_score`), the page the logging policy showed (`logged_page`), its realised
feedback per position (`logged_feedback`, columns `click, long_view, watch_time`), the
page's probability under the logging policy (`propensity`), and per-candidate labels
(`labels`, same columns): the realised feedback for shown candidates and 0 for unshown
ones. **An unshown candidate's 0 is not a negative**: nobody saw it. Use
`logged_page`/`logged_page_mask` to tell shown from unshown.

The world itself is fixed by the config (including its `seed` key); `seed` here draws the
requests, the logging policy's pages and the feedback, so two seeds give two disjoint
samples of the same world (e.g. train and test).

On disk (`save_logs`): `logs.safetensors` (the batch's tensors), `reformulate.safetensors`
(the per-page query reformulation, which `RerankBatch` has no field for),
`hidden_state.safetensors` (the world's hidden latents of these requests: for exact
evaluation only, never for training), `meta.json` and `world.yaml` (the config, so that
`load_world` rebuilds the same world). Every file is written to a temporary name and
renamed, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dualrerank.config import dump_config, load_config
from dualrerank.errors import ConfigError, DataError
from dualrerank.files import atomic_write, write_json
from dualrerank.schema import RerankBatch
from dualrerank.sim.catalogue import seeded
from dualrerank.sim.config import FEEDBACK_NAMES, WorldConfig
from dualrerank.sim.state import Feedback, WorldState
from dualrerank.sim.world import World

__all__ = [
    "SyntheticLogs",
    "simulate_logs",
    "generate_logs",
    "load_synthetic",
    "save_logs",
    "load_logs",
    "load_logged_state",
    "load_logged_reformulate",
    "load_world",
    "LOG_FORMAT",
]

LOG_FORMAT = "dualrerank-synthetic-logs/1"
_BATCH_TENSORS = ("candidates", "candidate_mask", "context", "labels", "item_ids", "logged_page", "logged_page_mask",
                  "logged_feedback", "propensity", "upstream_score")


@dataclass(frozen=True)
class SyntheticLogs:
    """Logged requests with what produced them.

    Attributes:
        world: the world the logs come from.
        state: hidden latents of the B requests (evaluation only).
        batch: the logged `RerankBatch` (observable).
        feedback: the sampled feedback of the logged pages (reported units).
        seed: the seed of the requests, pages and feedback.
    """

    world: World
    state: WorldState
    batch: RerankBatch
    feedback: Feedback
    seed: int


def _world_from(config: WorldConfig | str | Path | None) -> World:
    if config is None or isinstance(config, WorldConfig):
        return World(config)
    return World(load_config(WorldConfig, config))


def simulate_logs(world: World, num_requests: int, seed: int, page_length: int | None = None) -> SyntheticLogs:
    """Draw requests from `world`, serve the logging policy's pages, sample their feedback."""
    if not isinstance(num_requests, int) or isinstance(num_requests, bool) or num_requests < 1:
        raise DataError(f"num_requests: must be a positive integer, got {num_requests!r}")
    L = world.config.page_length if page_length is None else page_length
    state, observed = world.sample_requests(num_requests, seeded(seed, "requests"))
    g = seeded(seed, "logging")
    pages, propensity = world.logging_pages(state, L, g)
    feedback = world.sample_feedback(state, pages, g)
    per_position = feedback.stacked()  # [B, L, 3]
    labels = torch.zeros(num_requests, state.num_candidates, len(FEEDBACK_NAMES))
    labels.scatter_(1, pages.unsqueeze(2).expand(-1, -1, len(FEEDBACK_NAMES)), per_position)
    batch = RerankBatch(
        candidates=observed.candidates,
        candidate_mask=observed.candidate_mask,
        context=observed.context,
        labels=labels,
        item_ids=observed.item_ids,
        logged_page=pages,
        logged_page_mask=torch.ones_like(pages, dtype=torch.bool),
        logged_feedback=per_position,
        propensity=propensity,
        upstream_score=observed.upstream_score,
        label_names=FEEDBACK_NAMES,
        feedback_names=FEEDBACK_NAMES,
    ).validate()
    return SyntheticLogs(world=world, state=state, batch=batch, feedback=feedback, seed=seed)


def generate_logs(config: WorldConfig | str | Path | None, num_requests: int, seed: int, L: int | None = None) -> RerankBatch:
    """Logged `RerankBatch` of `num_requests` requests of the world `config` (a WorldConfig,
    a YAML path or None for the default), drawn with `seed`; L defaults to `config.page_length`."""
    return simulate_logs(_world_from(config), num_requests, seed, L).batch


def load_synthetic(path: str | Path | None = None, seed: int = 0, num_requests: int = 1000) -> RerankBatch:
    """The synthetic data source: logs of the world in YAML `path` (None = default world),
    or, when `path` is a folder written by `save_logs` / `dualrerank simulate --out`, its
    logs (the first `num_requests` of them)."""
    if path is not None and Path(path).is_dir():
        batch = load_logs(path)
        return batch.select(slice(0, num_requests)) if num_requests < batch.batch_size else batch
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"synthetic: {path} is neither a world config file nor a logs folder")
    return generate_logs(path, num_requests, seed)


# ---------------------------------------------------------------------------- storage
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def save_logs(logs: SyntheticLogs, directory: str | Path) -> list[str]:
    """Write `logs` into `directory` (created if needed); returns the file names written."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise DataError(f"out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    b = logs.batch
    _save_tensors({name: getattr(b, name) for name in _BATCH_TENSORS}, out / "logs.safetensors")
    _save_tensors({"reformulate": logs.feedback.reformulate}, out / "reformulate.safetensors")
    _save_tensors({f.name: getattr(logs.state, f.name) for f in fields(WorldState)}, out / "hidden_state.safetensors")
    meta = {
        "format": LOG_FORMAT,
        "num_requests": b.batch_size,
        "num_candidates": b.num_candidates,
        "page_length": int(b.logged_page.shape[1]),
        "seed": logs.seed,
        "world_seed": logs.world.seed,
        "world_step": logs.world.step,
        "duration_source": logs.world.catalogue.duration_source,
        "label_names": list(b.label_names),
        "feedback_names": list(b.feedback_names),
        "candidate_feature_names": list(logs.world.candidate_feature_names),
        "context_feature_names": list(logs.world.context_feature_names),
        "note": "labels are realised feedback for shown candidates and 0 for unshown ones: unshown is not negative",
    }
    write_json(out / "meta.json", meta)
    dump_config(replace(logs.world.config, seed=logs.world.seed), out / "world.yaml")
    return ["logs.safetensors", "reformulate.safetensors", "hidden_state.safetensors", "meta.json", "world.yaml"]


def _read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    if not path.is_file():
        raise DataError(f"logs: {directory} has no meta.json (not a folder written by `dualrerank simulate --out`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"logs: {path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != LOG_FORMAT:
        raise DataError(f"logs: {path} is not a {LOG_FORMAT} file")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"logs: missing file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"logs: {path} is corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def load_logs(directory: str | Path) -> RerankBatch:
    """The validated logged `RerankBatch` saved by `save_logs` in `directory`."""
    d = Path(directory)
    meta = _read_meta(d)
    tensors = _read_tensors(d / "logs.safetensors")
    missing = [name for name in ("candidates", "candidate_mask", "context") if name not in tensors]
    if missing:
        raise DataError(f"logs: {d / 'logs.safetensors'} lacks {missing}")
    unknown = sorted(set(tensors) - set(_BATCH_TENSORS))
    if unknown:
        raise DataError(f"logs: {d / 'logs.safetensors'} has unknown tensors {unknown}")
    return RerankBatch(
        **tensors,
        label_names=tuple(meta.get("label_names", ())),
        feedback_names=tuple(meta.get("feedback_names", ())),
    ).validate()


def load_logged_reformulate(directory: str | Path) -> torch.Tensor:
    """`[B]` 0/1 query reformulation after each logged page."""
    d = Path(directory)
    _read_meta(d)
    return _read_tensors(d / "reformulate.safetensors")["reformulate"]


def load_logged_state(directory: str | Path) -> WorldState:
    """Hidden latents of the logged requests: for exact evaluation of pages on them only."""
    d = Path(directory)
    _read_meta(d)
    tensors = _read_tensors(d / "hidden_state.safetensors")
    names = {f.name for f in fields(WorldState)}
    if set(tensors) != names:
        raise DataError(f"logs: {d / 'hidden_state.safetensors'} does not hold a WorldState")
    return WorldState(**tensors)


def load_world(directory: str | Path) -> World:
    """The world the logs in `directory` were drawn from (same config and seed)."""
    d = Path(directory)
    meta = _read_meta(d)
    world = World(load_config(WorldConfig, d / "world.yaml"), step=int(meta.get("world_step", 0)))
    if world.catalogue.duration_source != meta.get("duration_source"):
        raise DataError(
            f"logs: the logs' durations came from {meta.get('duration_source')!r} but world.yaml now gives "
            f"{world.catalogue.duration_source!r}; set catalogue.durations to the same source"
        )
    return world
