"""Offline evaluation of any reranker on a split: utility under the user model, NDCG
against real labels, and latency.

A split may carry a world (the simulated world, or real lists placed in it by
`sim.real_lists`): then pages are scored by exact expected utility and normalized utility.
Graded labels (LETOR/MSLR) give NDCG@4/@10; MIND clicks give NDCG and AUC on real
feedback where a model exposes scores.

Requests shorter than the page length are ranked completely: requests are grouped by
`min(valid candidates, L)` and each group decoded at its own length (a loop over at most
L groups, each vectorised), so no decoder is ever asked for more items than exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dualrerank.metrics import batch_mean, ndcg_at_k
from dualrerank.schema import RerankBatch

RerankFn = Callable[[RerankBatch, int], torch.Tensor]


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
    return [(int(l), (eff == l).nonzero().flatten()) for l in torch.unique(eff).tolist()]


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


def evaluate(rerank: RerankFn, split: EvalSplit, L: int, timing: bool = True) -> dict[str, float | None]:
    """All offline figures of one reranker on one split."""
    pages, mask = rerank_all(rerank, split.batch, L, groups=split.groups(L))
    out = page_metrics(split, pages, mask, L)
    if timing:
        out.update(latency_ms(rerank, split.batch, L))
    return out
