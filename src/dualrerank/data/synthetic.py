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
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, cast

import torch
import yaml
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
    "load_world_config",
    "LOG_FORMAT",
]

LOG_FORMAT = "dualrerank-synthetic-logs/1"
DEFAULT_REQUESTS = 1000  # requests the synthetic source generates when not told how many
EXPECTED = (
    "the synthetic source takes a world YAML (keys: `dualrerank simulate --help`, e.g. configs/synthetic.yaml) "
    "or a folder written by `dualrerank simulate --out`"
)
_SVMLIGHT_LINE = re.compile(r"\S+\s+qid:\S+")
_BATCH_TENSORS = (
    "candidates",
    "candidate_mask",
    "context",
    "labels",
    "item_ids",
    "logged_page",
    "logged_page_mask",
    "logged_feedback",
    "propensity",
    "upstream_score",
)


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
    return World(load_world_config(config))


def load_world_config(path: str | Path) -> WorldConfig:
    """The `WorldConfig` of a world YAML. A file that is not one (a LETOR/MSLR file, a MIND
    behaviors.tsv, a YAML list) is a one-line `ConfigError` that says what it is and what a
    synthetic path may be, rather than the YAML parser's complaint."""
    p = Path(path)
    if p.is_file():
        _check_world_yaml(p)
    return load_config(WorldConfig, p)


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


def load_synthetic(path: str | Path | None = None, seed: int = 0, num_requests: int | None = None) -> RerankBatch:
    """The synthetic data source.

    Args:
        path: None for the default world, a world YAML, or a folder written by `save_logs`
            / `dualrerank simulate --out`.
        seed: draws the requests, pages and feedback of a generated world (not of a folder).
        num_requests: requests to generate (default `DEFAULT_REQUESTS`), or the first
            `num_requests` logged requests of a folder (default all of them; asking for more
            than it holds is a `DataError`, never a silently smaller batch).
    """
    if path is None:
        return generate_logs(None, DEFAULT_REQUESTS if num_requests is None else num_requests, seed)
    p = Path(path)
    if p.is_dir():
        if not (p / "meta.json").is_file():
            raise DataError(f"synthetic: {p} is a folder without meta.json{_looks_like(p)}; {EXPECTED}")
        return load_logs(p, num_requests)
    if not p.is_file():
        raise ConfigError(f"synthetic: {p} is neither a world config file nor a logs folder; {EXPECTED}")
    return generate_logs(p, DEFAULT_REQUESTS if num_requests is None else num_requests, seed)


def _looks_like(folder: Path) -> str:
    """What a folder that is not a logs folder seems to hold, for the error message."""
    names = {q.name for q in folder.iterdir()}
    if "behaviors.tsv" in names:
        return " (it holds behaviors.tsv: MIND impressions, read with --source mind)"
    if any(re.fullmatch(r"S\d+\.txt|Fold\d+|.*\.(svm|svmlight|libsvm)|.*(train|test|vali).*\.txt", n) for n in names):
        return " (it holds SVMlight ranking files: read them with --source letor)"
    return ""


def _check_world_yaml(path: Path) -> None:
    """Refuse, in one line that says what `path` is, a file that is not a world YAML
    (a LETOR/MSLR file or a MIND behaviors.tsv would otherwise fail as 'not valid YAML')."""
    with path.open("rb") as fh:
        head = fh.read(1 << 16).decode("utf-8", errors="replace")
    for lineno, line in enumerate(head.splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if _SVMLIGHT_LINE.match(text):
            raise ConfigError(
                f"synthetic: {path} is an SVMlight/LETOR ranking file (line {lineno}: '<label> qid:...'), "
                f"not a world; read it with --source letor; {EXPECTED}"
            )
        if line.count("\t") == 4:
            raise ConfigError(
                f"synthetic: {path} looks like a MIND behaviors.tsv (line {lineno} has 5 tab-separated "
                f"fields), not a world; read it with --source mind; {EXPECTED}"
            )
        break
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"synthetic: {path} is not a world YAML (not valid YAML{at}); {EXPECTED}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(
            f"synthetic: {path} is not a world YAML (its top level is a {type(loaded).__name__}, "
            f"not a mapping of world keys); {EXPECTED}"
        )


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
        "page_length": int(cast(torch.Tensor, b.logged_page).shape[1]),  # simulated logs always have pages
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


def load_logs(
    directory: str | Path,
    num_requests: int | None = None,
    *,
    page_length: int | None = None,
    option: str = "num_requests",
) -> RerankBatch:
    """The validated logged `RerankBatch` saved by `save_logs` in `directory`.

    Args:
        num_requests: keep the first `num_requests` logged requests (None: all). More than
            the folder holds is a `DataError` naming `option` (the config key that asked).
        page_length: when given, the logged pages must have this many positions.
    """
    d = Path(directory)
    meta = _read_meta(d)
    if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1):
        raise ConfigError(f"{option}: must be a positive integer, got {num_requests!r}")
    tensors = _read_tensors(d / "logs.safetensors")
    missing = [name for name in ("candidates", "candidate_mask", "context") if name not in tensors]
    if missing:
        raise DataError(f"logs: {d / 'logs.safetensors'} lacks {missing}")
    unknown = sorted(set(tensors) - set(_BATCH_TENSORS))
    if unknown:
        raise DataError(f"logs: {d / 'logs.safetensors'} has unknown tensors {unknown}")
    batch = RerankBatch(
        **cast(dict[str, Any], tensors),
        label_names=tuple(meta.get("label_names", ())),
        feedback_names=tuple(meta.get("feedback_names", ())),
    ).validate()
    if num_requests is not None and num_requests > batch.batch_size:
        raise DataError(
            f"logs: {d} holds {batch.batch_size:,} logged requests but {option}={num_requests:,}; ask for at "
            f"most {batch.batch_size:,} or log more with `dualrerank simulate --requests {num_requests} --out DIR`"
        )
    logged_length = None if batch.logged_page is None else int(batch.logged_page.shape[1])
    if page_length is not None and logged_length != page_length:
        raise DataError(
            f"logs: the pages in {d} have {logged_length} positions but page_length={page_length}; "
            f"set page_length to {logged_length} or log pages of {page_length} with `dualrerank simulate --page-length`"
        )
    if num_requests is not None and num_requests < batch.batch_size:
        batch = batch.select(slice(0, num_requests))
    return batch


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
    logged = meta.get("duration_source")
    if world.catalogue.duration_source != logged:
        # Folders written before durations became an explicit option say 'durations: auto'
        # in world.yaml, and came from the shared KuaiRand file or the log-normal.
        spec = "kuairand:PATH (KuaiRand's video_features_basic_pure.csv)" if str(logged).startswith("kuairand:") else logged
        raise DataError(
            f"logs: the logs' durations came from {logged!r} but {d / 'world.yaml'} now gives "
            f"{world.catalogue.duration_source!r}; set catalogue.durations there to {spec}"
        )
    return world
