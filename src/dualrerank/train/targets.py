"""Target lists for the list generators (method.md section 2, teacher targets [ours]).

`logged_targets` turns what a batch carries into a target page:
- logs (a `logged_page` with click / long-view feedback): the shown items reordered by
  realised per-item gain (`feedback.page_gain`: long view > click > nothing, unit-free;
  ties keep the logged order), weighted per request by its page reward (the page's total
  gain) relative to the batch (reward-weighted MLE);
- graded lists (LETOR/MSLR labels, no logged feedback): candidates sorted by the graded
  label (`feedback.graded_column`), ties by upstream score.

The evaluator target (beam search over a learned evaluator) is built by the trainer from
the evaluator model itself (`ListEvaluator.beam_pages`); it needs no helper here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualrerank.errors import DataError
from dualrerank.feedback import graded_column, has_page_gain, page_gain
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


def logged_targets(batch: RerankBatch, length: int, reward_weighted: bool = True) -> Targets:
    """Target pages of at most `length` positions from logs or graded labels (see module doc)."""
    if has_page_gain(batch):
        page = batch.logged_page
        assert page is not None  # has_page_gain
        gain, pmask = page_gain(batch)
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
    rel = graded_column(batch)
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
