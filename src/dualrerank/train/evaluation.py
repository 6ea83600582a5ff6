"""Offline evaluation of any reranker on a split: utility under the user model, NDCG
against real labels, and latency.

A split may carry a world (the simulated world, or real lists placed in it by
`sim.real_lists`): then pages are scored by exact expected utility and normalized utility.
Graded labels (LETOR/MSLR) give NDCG@4/@10, and so do MIND clicks where no world scores
pages. Where the split logs clicks of the items it showed (MIND impressions; the simulated
logs of the held-out requests) and the model gives every shown item a click score
(`click_scorer`: score-and-sort models, the list-wise evaluator), `auc` and `gauc` measure
those scores against the clicks. The names of every figure are `metrics.FIGURES`'.

Requests shorter than the page length are ranked completely: requests are grouped by
`min(valid candidates, L)` and each group decoded at its own length (a loop over at most
L groups, each vectorised), so no decoder is ever asked for more items than exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dualrerank.metrics import auc_figures, batch_mean, ndcg_at_k
from dualrerank.schema import RerankBatch

RerankFn = Callable[[RerankBatch, int], torch.Tensor]
#: `batch -> [B, L]` a click score for each position of the batch's logged page, NaN where
#: the model gives none (see `click_scorer`).
ClickScoreFn = Callable[[RerankBatch], torch.Tensor]


@dataclass
class EvalSplit:
    """Requests to evaluate on; `world`/`state` present when utility can be computed."""

    batch: RerankBatch
    world: Any = None
    state: Any = None
    name: str = "test"
    _cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def groups(self, L: int) -> list[tuple[int, torch.Tensor]]:
        """`(page length, request indices)` for each distinct `min(n_valid, L)`."""
        key = ("groups", L)
        if key not in self._cache:
            self._cache[key] = _length_groups(self.batch, L)
        return self._cache[key]

    def world_reference(self, L: int, length: int, idx: torch.Tensor):
        """The world's oracle/random utilities for one length group (beam search: computed once)."""
        key = ("reference", L, length)
        if key not in self._cache:
            self._cache[key] = self.world.reference(self.state.select(idx), length)
        return self._cache[key]


def _length_groups(batch: RerankBatch, L: int) -> list[tuple[int, torch.Tensor]]:
    eff = batch.num_valid.clamp(max=L)
    return [(int(length), (eff == length).nonzero().flatten()) for length in torch.unique(eff).tolist()]


def rerank_all(
    rerank: RerankFn, batch: RerankBatch, L: int, chunk: int = 512, groups: list[tuple[int, torch.Tensor]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages `[B, L]` and page mask `[B, L]`, decoding each request at `min(n_valid, L)`."""
    groups = groups if groups is not None else _length_groups(batch, L)
    B = batch.batch_size
    pages = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for length, idx in groups:
        for s in range(0, len(idx), chunk):
            part = idx[s : s + chunk]
            with torch.inference_mode():
                pages[part, :length] = rerank(batch.select(part), length)
            mask[part, :length] = True
    return pages, mask


def page_metrics(split: EvalSplit, pages: torch.Tensor, page_mask: torch.Tensor, L: int) -> dict[str, float | None]:
    """Utility / normalized utility (with a world) and NDCG@4/@10 (with graded labels)."""
    out: dict[str, float | None] = {"utility": None, "normalized_utility": None, "ndcg@4": None, "ndcg@10": None}
    batch = split.batch
    if split.world is not None and split.state is not None:
        util, norm_num, norm_den = [], 0.0, 0.0
        for length, idx in split.groups(L):
            ref = split.world_reference(L, length, idx)
            u = split.world.expected_utility(split.state.select(idx), pages[idx, :length])
            util.append(u)
            # Ratio of sums (as metrics.normalized_utility_mean): requests weigh by attainable gain.
            norm_num += float((u - ref.random).sum())
            norm_den += float((ref.oracle - ref.random).sum())
        out["utility"] = float(torch.cat(util).mean())
        out["normalized_utility"] = norm_num / norm_den if norm_den > 0 else None
    if batch.labels is not None and batch.label_names[:1] == ("relevance",):
        rel = batch.labels[..., 0]
        for k in (4, 10):
            out[f"ndcg@{k}"] = batch_mean(ndcg_at_k(rel, pages, batch.candidate_mask, k, page_mask=page_mask))
    elif batch.labels is not None and batch.label_names[:1] == ("click",) and split.world is None:
        rel = batch.labels[..., 0]
        for k in (4, 10):
            out[f"ndcg@{k}"] = batch_mean(ndcg_at_k(rel, pages, batch.candidate_mask, k, page_mask=page_mask))
    return out


def latency_ms(rerank: RerankFn, batch: RerankBatch, L: int, requests: int = 50, warmup: int = 5) -> dict[str, float]:
    """Per-request latency at batch size 1 (p50, p99) over the first `requests` requests."""
    idx = [b for b in range(batch.batch_size) if int(batch.num_valid[b]) >= L][: requests + warmup]
    if not idx:
        return {"latency_ms_p50": float("nan"), "latency_ms_p99": float("nan")}
    times = []
    with torch.inference_mode():
        for j, b in enumerate(idx):
            one = batch.select([b])
            t0 = time.perf_counter()
            rerank(one, L)
            if j >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times or [float("nan")])
    return {"latency_ms_p50": float(np.percentile(arr, 50)), "latency_ms_p99": float(np.percentile(arr, 99))}


def logged_clicks(batch: RerankBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(clicked [B, L], shown [B, L])` bool along the logged page, or None where the batch
    logs no click column for the items it showed.

    The click comes from `logged_feedback` (else from `labels`, gathered along the page).
    A click is a value > 0, so a click column reported in other units (a rescaled feedback
    column) still marks the same clicks; a negative or non-finite value at a shown item
    means the column is not clicks, and there is no AUC.
    """
    page = batch.logged_page
    if page is None:
        return None
    if batch.logged_feedback is not None and "click" in batch.feedback_names:
        clicks = batch.logged_feedback[..., batch.feedback_names.index("click")]
    elif batch.labels is not None and "click" in batch.label_names:
        index = page.long().clamp(0, batch.num_candidates - 1)
        clicks = batch.labels[..., batch.label_names.index("click")].gather(1, index)
    else:
        return None
    shown = batch.logged_page_mask if batch.logged_page_mask is not None else torch.ones_like(page, dtype=torch.bool)
    clicks = clicks.double()
    if bool(((~torch.isfinite(clicks) | (clicks < 0)) & shown).any()):
        return None
    return clicks > 0, shown


def click_scorer(model: Any) -> ClickScoreFn | None:
    """The model's click score of each logged item, for AUC; None where it has none.

    - score-and-sort models (`scores(batch) -> [B, n]`: upstream, DNN, PRM, tree rankers):
      the item's score, read along the logged page;
    - the list-wise evaluator: its predicted click probability of each logged item at its
      logged position given the items above it, the very thing it is trained to predict
      (positions beyond its `max_positions` get NaN: unscored).
    List generators (teacher, student, Seq2Slate) score positions, not items: None.
    """
    from dualrerank.models.evaluator import ListEvaluator, eval_mode

    if isinstance(model, ListEvaluator):

        def evaluator_scores(batch: RerankBatch) -> torch.Tensor:
            # Absent positions may hold any index; clamped, they are only ever masked out.
            assert batch.logged_page is not None  # scored on splits with logged pages only
            page = batch.logged_page.long().clamp(0, batch.num_candidates - 1)
            pmask = batch.logged_page_mask if batch.logged_page_mask is not None else torch.ones_like(page, dtype=torch.bool)
            keep = min(page.shape[1], model.config.max_positions)
            out = torch.full(page.shape, float("nan"), dtype=torch.float64)
            # A causal model: cutting the page after `keep` positions leaves the first ones' predictions unchanged.
            with eval_mode(model):
                out[:, :keep] = model.predict(batch, page[:, :keep], pmask[:, :keep])[..., 0].double()
            return out

        return evaluator_scores
    scores = getattr(model, "scores", None)
    if not callable(scores):
        return None

    def item_scores(batch: RerankBatch) -> torch.Tensor:
        assert batch.logged_page is not None  # scored on splits with logged pages only
        index = batch.logged_page.long().clamp(0, batch.num_candidates - 1)
        if isinstance(model, torch.nn.Module):
            with eval_mode(model):
                s = scores(batch)
        else:
            s = scores(batch)
        return s.double().gather(1, index)

    return item_scores


def click_metrics(score: ClickScoreFn | None, batch: RerankBatch, chunk: int = 512) -> dict[str, float | None]:
    """`auc` and `gauc` of `score` against the logged clicks (`metrics.auc_figures`:
    pooled over every shown item, and per request with impression weights); None where
    the model has no click scores, the batch logs no clicks, or one class is missing."""
    out: dict[str, float | None] = {"auc": None, "gauc": None}
    clicks = logged_clicks(batch)
    if score is None or clicks is None:
        return out
    clicked, shown = clicks
    parts = []
    with torch.inference_mode():
        for s in range(0, batch.batch_size, chunk):
            parts.append(score(batch.select(torch.arange(s, min(s + chunk, batch.batch_size)))))
    if not parts:
        return out
    scores = torch.cat(parts)
    scored = shown & ~torch.isnan(scores)
    figures = auc_figures(torch.where(scored, scores, 0.0), clicked, scored)
    return {k: (v if v == v else None) for k, v in figures.items()}


def evaluate(
    rerank: RerankFn, split: EvalSplit, L: int, timing: bool = True, *, click_scores: ClickScoreFn | None = None
) -> dict[str, float | None]:
    """All offline figures of one reranker on one split (`metrics.FIGURES` names).

    `click_scores` gives the model's click scores for `auc` / `gauc`; by default they come
    from the model whose bound `rerank` method was passed (`click_scorer`), so that every
    caller handing `model.rerank` gets them without asking.
    """
    pages, mask = rerank_all(rerank, split.batch, L, groups=split.groups(L))
    out = page_metrics(split, pages, mask, L)
    scorer = click_scores if click_scores is not None else click_scorer(getattr(rerank, "__self__", None))
    out.update(click_metrics(scorer, split.batch))
    if timing:
        out.update(latency_ms(rerank, split.batch, L))
    return out
