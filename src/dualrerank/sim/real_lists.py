"""Real ranked lists (LETOR / MSLR / any graded `RerankBatch`) in the simulated world.

A request is a query, its candidates are its documents. The hidden state the user model
needs is built from what the list has:

* relevance: from the graded label, `offset + per_grade * grade / max_grade * top_grade`
  (see `RealListConfig`); no user vector, so preference rotation has no effect;
* topic: each document's features standardised within its query, projected by a fixed
  seeded Gaussian matrix onto the world's topic space and normalised: documents with
  similar features are similar topics, so they satiate each other;
* category: the world's category whose centre is closest to the topic (a quantisation
  that does not depend on which batch the request is in);
* duration: drawn from the world's catalogue (by default KuaiRand-distributed), seeded;
* quality and patience: 0.

The world's own user model (`World.expected_utility`, `sample_feedback`, `oracle_pages`,
`normalized_utility`) then works on this state unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dualrerank.config import option
from dualrerank.errors import ConfigError, DataError
from dualrerank.schema import RerankBatch
from dualrerank.sim.catalogue import seeded
from dualrerank.sim.state import WorldState

if TYPE_CHECKING:
    from dualrerank.sim.world import World

__all__ = ["RealListConfig", "real_list_state"]


@dataclass
class RealListConfig:
    """How graded lists map onto the world's latent state."""

    label_column: int = option(0, "column of batch.labels holding the graded relevance")
    relevance_offset: float = option(-1.0, "relevance of a grade-0 document")
    relevance_range: float = option(3.0, "relevance added between grade 0 and the top grade")
    max_grade: float | None = option(None, "grade mapped to the top relevance (None = the batch's highest label)")
    upstream_noise: float = option(0.7, "std of the noise of the simulated upstream score when the batch has none")

    def __post_init__(self) -> None:
        if self.label_column < 0:
            raise ConfigError(f"real_lists.label_column: must be >= 0, got {self.label_column}")
        if self.max_grade is not None and self.max_grade <= 0:
            raise ConfigError(f"real_lists.max_grade: must be > 0, got {self.max_grade}")
        if self.upstream_noise < 0:
            raise ConfigError(f"real_lists.upstream_noise: must be >= 0, got {self.upstream_noise}")


def _standardise(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-request z-scores of features `[B, n, d]` over the valid candidates."""
    w = mask.unsqueeze(2).to(x.dtype)
    count = w.sum(1, keepdim=True).clamp_min(1)
    mean = (x * w).sum(1, keepdim=True) / count
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / count
    # constant features (std 0) carry no similarity information: they become 0
    return torch.where(var > 1e-12, (x - mean) / var.clamp_min(1e-12).sqrt(), torch.zeros(())) * w


def real_list_state(batch: RerankBatch, world: World, seed: int = 0, config: RealListConfig | None = None) -> WorldState:
    """Hidden state for the graded lists of `batch` in `world` (B requests, n padded docs).

    Args:
        batch: a validated batch with `labels [B, n, m]` (graded relevance in `label_column`).
        world: supplies the topic space, categories, durations and user model.
        seed: seed of the durations and of the simulated upstream noise.
        config: the label mapping (default `RealListConfig()`).
    """
    cfg = config if config is not None else RealListConfig()
    if batch.labels is None:
        raise DataError("labels: real lists need graded labels (labels[..., label_column])")
    if cfg.label_column >= batch.labels.shape[2]:
        raise DataError(f"labels: label_column {cfg.label_column} >= {batch.labels.shape[2]} label columns")
    mask = batch.candidate_mask
    grade = batch.labels[..., cfg.label_column].float().masked_fill(~mask, 0.0)
    if bool((grade < 0).any()):
        raise DataError(f"labels: negative graded label in request {int((grade < 0).any(1).nonzero()[0])}")
    top = cfg.max_grade if cfg.max_grade is not None else max(float(grade.max()), 1.0)
    rel = (cfg.relevance_offset + cfg.relevance_range * grade / top).masked_fill(~mask, 0.0)

    cat = world.catalogue
    B, n, d = batch.candidates.shape
    k = cat.topic.shape[1]
    projection = torch.randn(d, k, generator=seeded(world.seed, f"real-lists/projection/{d}")) / d**0.5
    topic = _standardise(batch.candidates.float(), mask) @ projection
    topic = topic / topic.norm(dim=2, keepdim=True).clamp_min(1e-12)
    category = (topic @ cat.centres.T).argmax(dim=2)

    g = seeded(seed, "real-lists")
    duration = cat.duration[torch.randint(cat.num_items, (B, n), generator=g)]
    if batch.upstream_score is not None:
        upstream = batch.upstream_score.float()
    else:
        upstream = rel + cfg.upstream_noise * torch.randn(B, n, generator=g)
    item_ids = batch.item_ids if batch.item_ids is not None else torch.arange(n).expand(B, n).clone()
    return WorldState(
        user=torch.zeros(B, k),
        patience=torch.zeros(B),
        topic=topic,
        category=category,
        quality=torch.zeros(B, n),
        match=rel,
        duration=duration,
        candidate_mask=mask.clone(),
        item_ids=item_ids,
        upstream_score=upstream.masked_fill(~mask, 0.0),
    )
