"""Hidden per-request state of the world, and the feedback a page receives.

`WorldState` holds the latents the user model needs and models never see. `Feedback`
holds what the world reports for shown pages (in the reported units of each dimension).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from dualrerank.errors import DataError

__all__ = ["WorldState", "Feedback", "check_pages"]


@dataclass(frozen=True)
class WorldState:
    """Hidden latents of B requests with n (padded) candidates each; k = topic dim.

    Attributes:
        user: `[B, k]` user/query preference vector (zeros for real lists).
        patience: `[B]` offset of the user's examination (continue) logit.
        topic: `[B, n, k]` unit latent topic of each candidate.
        category: `[B, n]` int64 category of each candidate.
        quality: `[B, n]` hidden quality.
        match: `[B, n]` hidden user-item match term of the relevance (the graded-label
            relevance for real lists).
        duration: `[B, n]` seconds.
        candidate_mask: `[B, n]` bool, True where a candidate exists.
        item_ids: `[B, n]` int64 item ids.
        upstream_score: `[B, n]` the upstream ranker's score (observable).
    """

    user: torch.Tensor
    patience: torch.Tensor
    topic: torch.Tensor
    category: torch.Tensor
    quality: torch.Tensor
    match: torch.Tensor
    duration: torch.Tensor
    candidate_mask: torch.Tensor
    item_ids: torch.Tensor
    upstream_score: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.topic.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.topic.shape[1])

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> WorldState:
        """Sub-state of the requests at `index` (a slice, index list or bool mask)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def split(self, size: int) -> list[WorldState]:
        """Consecutive sub-states of at most `size` requests."""
        return [self.select(slice(s, s + size)) for s in range(0, self.batch_size, size)]

    @staticmethod
    def cat(states: Sequence[WorldState]) -> WorldState:
        """Concatenate states with the same n along the request axis."""
        first = states[0]
        return replace(first, **{f.name: torch.cat([getattr(s, f.name) for s in states]) for f in fields(first)})


@dataclass(frozen=True)
class Feedback:
    """Sampled feedback for pages `[*P, L]` (P = (B,) or (B, G)), in reported units.

    Attributes:
        click: `[*P, L]` 0/1 (times the click unit).
        long_view: `[*P, L]` 0/1 (times the long-view unit).
        watch_time: `[*P, L]` watched duration (seconds times the watch-time unit).
        reformulate: `[*P]` 0/1, the user reformulated the query after this page.
    """

    click: torch.Tensor
    long_view: torch.Tensor
    watch_time: torch.Tensor
    reformulate: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """`[*P, L, 3]` per-position feedback in `FEEDBACK_NAMES` order (click, long_view, watch_time)."""
        return torch.stack([self.click, self.long_view, self.watch_time], dim=-1)


def check_pages(pages: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Validate pages `[B, L]` or `[B, G, L]` against `candidate_mask [B, n]`; raise DataError."""
    if not isinstance(pages, torch.Tensor) or pages.dtype not in (torch.int64, torch.int32):
        raise DataError(
            f"pages: expected an integer tensor [B, L] or [B, G, L], got {getattr(pages, 'dtype', type(pages).__name__)}"
        )
    if pages.dim() not in (2, 3):
        raise DataError(f"pages: expected shape [B, L] or [B, G, L], got {tuple(pages.shape)}")
    B, n = candidate_mask.shape
    if pages.shape[0] != B:
        raise DataError(f"pages: {pages.shape[0]} rows for {B} requests")
    if pages.shape[-1] == 0:
        raise DataError("pages: page length must be >= 1")
    pages = pages.long()
    flat = pages.reshape(B, -1)
    bad = (flat < 0) | (flat >= n)
    if bool(bad.any()):
        raise DataError(f"pages: candidate index out of range [0, {n}) in request {int(bad.any(1).nonzero()[0])}")
    hidden = ~candidate_mask.gather(1, flat)
    if bool(hidden.any()):
        raise DataError(f"pages: points at a padded candidate in request {int(hidden.any(1).nonzero()[0])}")
    L = pages.shape[-1]
    dup = (pages.unsqueeze(-1) == pages.unsqueeze(-2)) & ~torch.eye(L, dtype=torch.bool)
    if bool(dup.any()):
        b = int(dup.reshape(B, -1).any(1).nonzero()[0])
        raise DataError(f"pages: a page repeats a candidate in request {b}")
    return pages
