"""The item catalogue: latent topic, category, quality and duration of every item.

Durations follow `catalogue.durations`: by default the quantile table of KuaiRand-Pure's
`video_duration` shipped inside the package (kuairand_duration_quantiles.json, CC BY-SA
4.0, built by benchmarks/kuairand_duration_table.py), sampled by inverse-CDF
interpolation with the world's seeded generator; or the KuaiRand CSV at a path the config
names; or a log-normal. Nothing outside the package and the config is read, so a
checkout, an installed wheel and a machine with or without the data sets build the same
world. Everything else is drawn from the world's seed. Observable per-item features (a
noisy topic embedding, a noisy quality estimate, noisy projections) are fixed per item,
like an item embedding or a historical statistic in a real system.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from dualrerank.errors import ConfigError, DataError
from dualrerank.sim.config import CatalogueConfig, RequestConfig, ResponseConfig, duration_spec

__all__ = [
    "Catalogue",
    "build_catalogue",
    "load_durations",
    "packaged_duration_table",
    "sample_durations",
    "seeded",
    "MEDIAN_DURATION_S",
    "LOG_DURATION_STD",
    "DURATION_TABLE",
    "KUAIRAND_CSV",
]

# Measured on KuaiRand-Pure `video_features_basic_pure.csv` (7,344 videos with a positive
# `video_duration`, in ms): median 81.17 s, std of ln(duration) 1.03. They scale the
# observable log-duration feature and the watch model, and parametrise the log-normal.
MEDIAN_DURATION_S = 81.17
LOG_DURATION_STD = 1.03
KUAIRAND_CSV = "video_features_basic_pure.csv"
DURATION_TABLE = "kuairand_duration_quantiles.json"


def seeded(seed: int, salt: str) -> torch.Generator:
    """A generator for one named random stream of a world: independent streams per salt.

    Uses a stable hash (not Python's salted `hash`) so that the same seed gives the same
    stream in every process.
    """
    h = 1469598103934665603
    for ch in f"{seed}/{salt}".encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return torch.Generator().manual_seed(h % (1 << 63))


@lru_cache(maxsize=1)
def packaged_duration_table() -> np.ndarray:
    """`[K]` seconds: the packaged KuaiRand `video_duration` quantiles at levels k/(K-1)."""
    where = f"durations: packaged table {DURATION_TABLE}"
    try:
        table = json.loads(resources.files("dualrerank.sim").joinpath(DURATION_TABLE).read_text(encoding="utf-8"))
        q = np.asarray(table["quantiles"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where} is missing or corrupt ({type(exc).__name__}); reinstall dualrerank") from None
    if q.ndim != 1 or len(q) < 2 or not np.isfinite(q).all() or q[0] <= 0 or (np.diff(q) < 0).any():
        raise DataError(f"{where} is not an increasing list of positive quantiles; reinstall dualrerank")
    q.setflags(write=False)
    return q


def quantile_durations(quantiles: np.ndarray, num: int, g: torch.Generator) -> torch.Tensor:
    """`[num]` durations by inverse-CDF sampling of quantiles at levels k/(K-1).

    Interpolates linearly in ln(duration) between neighbouring quantiles: durations span
    two orders of magnitude and the user model reads them through ln(duration), so this
    keeps the log-distribution piecewise linear rather than bunching draws in wide bins.
    """
    log_q = torch.from_numpy(np.log(quantiles))
    pos = torch.rand(num, generator=g, dtype=torch.float64) * (len(log_q) - 1)
    lo = pos.floor().long().clamp(max=len(log_q) - 2)
    frac = pos - lo
    return torch.exp(log_q[lo] + frac * (log_q[lo + 1] - log_q[lo])).float()


def load_durations(path: str | Path) -> np.ndarray:
    """Positive durations in seconds from a CSV with a `video_duration` column in ms."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"durations: file not found: {p}")
    values = []
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "video_duration" not in reader.fieldnames:
            raise DataError(f"durations: {p} has no 'video_duration' column")
        for row in reader:
            try:
                v = float(row["video_duration"])
            except (TypeError, ValueError):
                continue  # empty cells are common in the public table
            if math.isfinite(v) and v > 0:
                values.append(v / 1000.0)
    if not values:
        raise DataError(f"durations: {p} has no positive video_duration value")
    return np.asarray(values, dtype=np.float64)


def sample_durations(spec: str, num: int, g: torch.Generator) -> tuple[torch.Tensor, str]:
    """(`[num]` durations in seconds, a description of their source) for `catalogue.durations`."""
    kind, path = duration_spec(spec)
    if kind == "packaged":
        return quantile_durations(packaged_duration_table(), num, g), f"packaged:{DURATION_TABLE}"
    if kind == "lognormal":
        ln = LOG_DURATION_STD * torch.randn(num, generator=g, dtype=torch.float64)
        return (MEDIAN_DURATION_S * torch.exp(ln)).float(), "lognormal"
    assert path is not None  # duration_spec: only "kuairand:PATH" is left, with its path
    file = Path(path)
    file = file / KUAIRAND_CSV if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"catalogue.durations: file not found: {file}")
    pool = torch.from_numpy(load_durations(file))
    return pool[torch.randint(len(pool), (num,), generator=g)].float(), f"kuairand:{file.name}"


@dataclass(frozen=True)
class Catalogue:
    """All items of a world (N items, k topic dims, C categories).

    Attributes:
        topic: `[N, k]` unit latent topic vectors.
        category: `[N]` int64 category in [0, C).
        quality: `[N]` hidden quality (engagement-logit offset).
        duration: `[N]` seconds.
        centres: `[C, k]` unit category centres.
        complement: `[C, C]` bool, True where showing category b right after a earns a bonus.
        obs_topic: `[N, k]` observable noisy topic embedding.
        obs_quality: `[N]` observable noisy quality estimate.
        obs_projection: `[N, p]` observable noisy projections of (topic, quality).
        duration_source: where the durations came from.
    """

    topic: torch.Tensor
    category: torch.Tensor
    quality: torch.Tensor
    duration: torch.Tensor
    centres: torch.Tensor
    complement: torch.Tensor
    obs_topic: torch.Tensor
    obs_quality: torch.Tensor
    obs_projection: torch.Tensor
    duration_source: str

    @property
    def num_items(self) -> int:
        return int(self.topic.shape[0])

    @property
    def num_categories(self) -> int:
        return int(self.centres.shape[0])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def complement_pattern(C: int, density: float, g: torch.Generator) -> torch.Tensor:
    """`[C, C]` bool: which transitions a -> b (a != b) earn the complementarity bonus."""
    draw = torch.rand(C, C, generator=g) < density
    draw.fill_diagonal_(False)  # a same-category follow-up is redundancy, never a complement
    return draw


def build_catalogue(cat: CatalogueConfig, req: RequestConfig, resp: ResponseConfig, seed: int) -> Catalogue:
    """Draw the catalogue of a world from its seed (deterministic)."""
    g = seeded(seed, "catalogue")
    N, C, k = cat.num_items, cat.num_categories, cat.topic_dim
    centres = _unit(torch.randn(C, k, generator=g))
    popularity = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** cat.category_skew
    category = torch.multinomial(popularity, N, replacement=True, generator=g)
    # randn / sqrt(k) has norm ~1, so topic_spread is the noise-to-centre ratio.
    topic = _unit(centres[category] + cat.topic_spread * torch.randn(N, k, generator=g) / math.sqrt(k))
    quality = cat.quality_std * torch.randn(N, generator=g)
    duration, source = sample_durations(cat.durations, N, seeded(seed, "durations"))
    complement = complement_pattern(C, resp.complement_density, seeded(seed, "complement"))

    og = seeded(seed, "observation")
    obs_topic = topic + req.topic_noise * torch.randn(N, k, generator=og)
    obs_quality = quality + req.quality_noise * torch.randn(N, generator=og)
    proj = torch.randn(k + 1, req.num_projections, generator=og) / math.sqrt(k + 1)
    latent = torch.cat([topic, quality.unsqueeze(1)], dim=1)
    obs_projection = latent @ proj + req.projection_noise * torch.randn(N, req.num_projections, generator=og)
    return Catalogue(
        topic=topic,
        category=category,
        quality=quality,
        duration=duration,
        centres=centres,
        complement=complement,
        obs_topic=obs_topic,
        obs_quality=obs_quality,
        obs_projection=obs_projection,
        duration_source=source,
    )
