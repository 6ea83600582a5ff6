"""Target lists for the list generators (method.md section 2, teacher targets [ours]).

`logged_targets` turns what a batch carries into a target page:
- logs (a `logged_page` with per-position feedback): the shown items reordered by realised
  per-item gain (long view > click > nothing; ties keep the logged order), weighted per
  request by its page reward relative to the batch (reward-weighted MLE);
- graded lists (LETOR/MSLR labels, no logged page): candidates sorted by label, ties by
  upstream score.

The evaluator target (beam search over a learned evaluator) is built by the trainer from
the evaluator model itself (`ListEvaluator.beam_pages`); it needs no helper here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualrerank.errors import DataError
from dualrerank.schema import RerankBatch


@dataclass
class Targets:
    """Target pages for teacher-forced training.

    Attributes:
        pages: `[B, L]` candidate indices.
        mask: `[B, L]` bool, True where the target has a position (short lists are shorter).
        weights: `[B]` per-request weight (mean 1 over the batch).
    """

    pages: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor


def item_gain(batch: RerankBatch) -> torch.Tensor:
    """`[B, L]` realised gain of each logged position: 2 = long view, 1 = click, 0 = nothing."""
    if batch.logged_feedback is None:
        raise DataError("logged_feedback: needed for logged targets but absent")
    names = list(batch.feedback_names)
    gain = torch.zeros(batch.logged_feedback.shape[:2])
    if "click" in names:
        gain = gain + batch.logged_feedback[..., names.index("click")].clamp(0, 1)
    if "long_view" in names:
        gain = gain + batch.logged_feedback[..., names.index("long_view")].clamp(0, 1)
    return gain


def logged_targets(batch: RerankBatch, length: int, reward_weighted: bool = True) -> Targets:
    """Target pages of at most `length` positions from logs or graded labels (see module doc)."""
    if batch.logged_page is not None and batch.logged_feedback is not None:
        page, pmask = batch.logged_page, batch.logged_page_mask
        if pmask is None:
            pmask = torch.ones_like(page, dtype=torch.bool)
        gain = item_gain(batch)
        # Stable descending sort on gain; absent positions sink below every real one.
        key = torch.where(pmask, gain, torch.full_like(gain, -1.0))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        pages = torch.gather(page, 1, order)[:, :length]
        mask = torch.gather(pmask, 1, order)[:, :length]
        if reward_weighted:
            reward = (gain * pmask).sum(1)
            weights = (reward + 1.0) / (reward + 1.0).mean()
        else:
            weights = torch.ones(batch.batch_size)
        return Targets(pages, mask, weights)
    if batch.labels is None:
        raise DataError("labels: a batch needs labels or a logged page with feedback to build training targets")
    rel = batch.labels[..., 0]
    up = batch.upstream_score if batch.upstream_score is not None else torch.zeros_like(rel)
    # Lexicographic (label, upstream) order: sort by the secondary key first, then stably by the primary.
    neg_inf = torch.finfo(rel.dtype).min
    by_up = torch.sort(torch.where(batch.candidate_mask, up, neg_inf), dim=1, descending=True, stable=True).indices
    rel_sorted = torch.gather(torch.where(batch.candidate_mask, rel, neg_inf), 1, by_up)
    order = torch.gather(by_up, 1, torch.sort(rel_sorted, dim=1, descending=True, stable=True).indices)
    L = min(length, batch.num_candidates)
    pages = order[:, :L]
    mask = torch.arange(L).unsqueeze(0) < batch.num_valid.unsqueeze(1)
    return Targets(pages, mask, torch.ones(batch.batch_size))
