"""The item catalogue: latent topic, category, quality and duration of every item.

Durations come from the real KuaiRand-Pure `video_duration` column when it is available
(or from a CSV path a user gives), else from a log-normal with the same median and spread.
Everything else is drawn from the world's seed. Observable per-item features (a noisy
topic embedding, a noisy quality estimate, noisy projections) are fixed per item, like an
item embedding or a historical statistic in a real system.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dualrerank.errors import ConfigError, DataError
from dualrerank.sim.config import CatalogueConfig, RequestConfig, ResponseConfig

__all__ = [
    "Catalogue",
    "build_catalogue",
    "load_durations",
    "shared_duration_file",
    "seeded",
    "MEDIAN_DURATION_S",
    "LOG_DURATION_STD",
]

# Measured on KuaiRand-Pure `video_features_basic_pure.csv` (7,344 videos with a positive
# `video_duration`, in ms): median 81.17 s, std of ln(duration) 1.03. The log-normal
# fallback uses both, so that worlds with and without the file behave alike.
MEDIAN_DURATION_S = 81.17
LOG_DURATION_STD = 1.03
KUAIRAND_FILE = Path("kuairand_pure_features") / "video_features_basic_pure.csv"


def seeded(seed: int, salt: str) -> torch.Generator:
    """A generator for one named random stream of a world: independent streams per salt.

    Uses a stable hash (not Python's salted `hash`) so that the same seed gives the same
    stream in every process.
    """
    h = 1469598103934665603
    for ch in f"{seed}/{salt}".encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return torch.Generator().manual_seed(h % (1 << 63))


def shared_duration_file() -> Path | None:
    """The KuaiRand video table in $DUALRERANK_DATA when set, else in ../shared/data beside
    the checkout; None when absent."""
    env = os.environ.get("DUALRERANK_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"
    return root / KUAIRAND_FILE if (root / KUAIRAND_FILE).is_file() else None


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


def duration_pool(source: str) -> tuple[torch.Tensor | None, str]:
    """(durations in seconds or None for the log-normal, a description of the source)."""
    if source == "lognormal":
        return None, "lognormal"
    if source == "auto":
        path = shared_duration_file()
        if path is None:
            return None, "lognormal"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"catalogue.durations: file not found: {path}")
    return torch.from_numpy(load_durations(path)), f"kuairand:{path.name}"


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


def sample_durations(pool: torch.Tensor | None, num: int, g: torch.Generator) -> torch.Tensor:
    if pool is None:
        return MEDIAN_DURATION_S * torch.exp(LOG_DURATION_STD * torch.randn(num, generator=g, dtype=torch.float64)).float()
    return pool[torch.randint(len(pool), (num,), generator=g)].float()


def build_catalogue(
    cat: CatalogueConfig, req: RequestConfig, resp: ResponseConfig, seed: int
) -> Catalogue:
    """Draw the catalogue of a world from its seed (deterministic)."""
    g = seeded(seed, "catalogue")
    N, C, k = cat.num_items, cat.num_categories, cat.topic_dim
    centres = _unit(torch.randn(C, k, generator=g))
    popularity = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** cat.category_skew
    category = torch.multinomial(popularity, N, replacement=True, generator=g)
    # randn / sqrt(k) has norm ~1, so topic_spread is the noise-to-centre ratio.
    topic = _unit(centres[category] + cat.topic_spread * torch.randn(N, k, generator=g) / math.sqrt(k))
    quality = cat.quality_std * torch.randn(N, generator=g)
    pool, source = duration_pool(cat.durations)
    duration = sample_durations(pool, N, seeded(seed, "durations"))
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
