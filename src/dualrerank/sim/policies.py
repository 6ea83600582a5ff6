"""Page policies of the world: instruments (oracle beam search, perfect pointwise sorter),
baselines (upstream sort, random) and the logging policy with its propensities.

All functions are vectorised over requests; loops run over page positions only. Padded
candidates (`mask` False) are never placed. The oracle and the pointwise sorter read the
hidden state and are for evaluation only: no model may train on them.
"""

from __future__ import annotations

import math

import torch

from dualrerank.sim.response import ItemView, ResponseParams, continue_prob, item_gain, reformulate_prob, similarity, watch_terms

__all__ = ["gumbel", "top_pages", "random_pages", "logging_pages", "beam_search"]

NEG = float("-inf")


def top_pages(scores: torch.Tensor, mask: torch.Tensor, L: int) -> torch.Tensor:
    """`[B, L]` the L highest-scoring valid candidates of `scores [B, n]`, best first."""
    return scores.masked_fill(~mask, NEG).topk(L, dim=1).indices


def random_pages(mask: torch.Tensor, L: int, generator: torch.Generator, groups: int | None = None) -> torch.Tensor:
    """Uniformly random pages of distinct valid candidates: `[B, L]`, or `[B, G, L]` with `groups`."""
    B, n = mask.shape
    G = 1 if groups is None else groups
    keys = torch.rand(B, G, n, generator=generator).masked_fill(~mask.unsqueeze(1), NEG)
    pages = keys.topk(L, dim=-1).indices
    return pages[:, 0] if groups is None else pages


def gumbel(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard Gumbel noise (u = 0 and u = 1 are clamped away from infinities)."""
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, generator=generator, dtype=dtype).clamp(tiny, 1.0 - torch.finfo(dtype).eps)
    return -torch.log(-torch.log(u))


def logging_pages(
    upstream: torch.Tensor,
    mask: torch.Tensor,
    L: int,
    temperature: float,
    uniform_share: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages of the logging policy and their probabilities under it.

    With probability `uniform_share` a request gets a uniformly shuffled page; otherwise a
    Plackett-Luce sample of `softmax(upstream / temperature)` (Gumbel top-L). The
    propensity is the probability of the page under this mixture (computed in float64
    log space; floored at the smallest positive float32 so that it stays a valid
    probability after the cast).

    Args:
        upstream: `[B, n]` upstream scores.
        mask: `[B, n]` bool valid candidates.

    Returns:
        pages `[B, L]` int64 and propensity `[B]` float32.
    """
    B, n = mask.shape
    logits = upstream.double() / temperature
    uniform = torch.rand(B, generator=generator, dtype=torch.float64) < uniform_share
    noise = gumbel((B, n), generator)
    keys = torch.where(uniform.unsqueeze(1), noise, logits + noise).masked_fill(~mask, NEG)
    pages = keys.topk(L, dim=1).indices

    remaining = mask.clone()
    log_pl = torch.zeros(B, dtype=torch.float64)
    valid = mask.sum(1).double()
    log_uniform = torch.zeros(B, dtype=torch.float64)
    rows = torch.arange(B)
    for t in range(L):
        chosen = pages[:, t]
        log_pl += logits[rows, chosen] - logits.masked_fill(~remaining, NEG).logsumexp(dim=1)
        log_uniform -= torch.log(valid - t)
        remaining[rows, chosen] = False
    log_share = math.log(uniform_share) if uniform_share > 0 else NEG
    log_rest = math.log1p(-uniform_share) if uniform_share < 1 else NEG
    logp = torch.logaddexp(log_share + log_uniform, log_rest + log_pl)
    propensity = logp.exp().clamp(torch.finfo(torch.float32).tiny, 1.0).float()
    return pages, propensity


def beam_search(params: ResponseParams, view: ItemView, L: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the exact expected utility (width 1 = greedy).

    Every quantity at position t depends only on the items at positions <= t, so a
    prefix's utility is exact and extends incrementally: each beam keeps its examination
    probability, accumulated dissatisfaction, expected viewport clicks, and the decayed
    satiation every candidate would suffer next. The reformulation term enters once the
    viewport (or the whole page, if shorter) is filled.

    Returns:
        the final beams' pages `[B, W, L]` and their exact utilities `[B, W]`, best first
        (`-inf` for beams that found no valid page, possible only when fewer than W pages
        exist).
    """
    B, n = view.mask.shape
    W = width
    dtype = view.base.dtype
    sim = similarity(params, view.category, view.topic, view.category, view.topic) * params.redundancy  # [B, n, n]
    C = params.complement.shape[0]
    # comp[b, i, j]: bonus of candidate j right after candidate i
    comp = params.complement.reshape(-1)[view.category.unsqueeze(2) * C + view.category.unsqueeze(1)]
    patience = view.patience.unsqueeze(1)
    V = min(params.viewport, L)

    utility = torch.full((B, W), NEG, dtype=dtype)
    utility[:, 0] = 0.0  # one live empty beam; the others start dead so that no beam repeats
    examine = torch.ones(B, W, dtype=dtype)
    dissatisfied = torch.zeros(B, W, dtype=dtype)
    viewport_clicks = torch.zeros(B, W, dtype=dtype)
    satiation = torch.zeros(B, W, n, dtype=dtype)
    placed = torch.zeros(B, W, n, dtype=torch.bool)
    last = torch.zeros(B, W, dtype=torch.long)
    pages = torch.zeros(B, W, 0, dtype=torch.long)
    base = view.base.unsqueeze(1)
    duration = view.duration.unsqueeze(1)
    log_duration = view.log_duration.unsqueeze(1)
    blocked = ~view.mask.unsqueeze(1)

    for t in range(L):
        logit = base - satiation - params.position_bias * math.log(t + 1)
        if t > 0:
            logit = logit + comp.gather(1, last.unsqueeze(2).expand(B, W, n))
        p = torch.sigmoid(logit)
        _, frac, p_long = watch_terms(params, logit, log_duration)
        gain = examine.unsqueeze(2) * item_gain(params, p, frac, p_long, duration)
        score = utility.unsqueeze(2) + gain
        clicks_next = viewport_clicks.unsqueeze(2) + (examine.unsqueeze(2) * p if t < V else 0.0)
        if t == V - 1:
            score = score - params.weights["reformulate"] * reformulate_prob(params, clicks_next)
        score = score.masked_fill(placed | blocked, NEG)

        top = score.reshape(B, W * n).topk(W, dim=1)
        parent, item = top.indices // n, top.indices % n
        utility = top.values

        # pick/chosen are only called within this iteration; the defaults bind this step's parent/item explicitly
        def pick(x: torch.Tensor, parent: torch.Tensor = parent) -> torch.Tensor:
            if x.dim() == 2:
                return x.gather(1, parent)
            return x.gather(1, parent.unsqueeze(2).expand(B, W, x.shape[2]))

        def chosen(x: torch.Tensor, item: torch.Tensor = item) -> torch.Tensor:
            return pick(x).gather(2, item.unsqueeze(2)).squeeze(2)

        p_chosen = chosen(p)
        if t < V:
            viewport_clicks = chosen(clicks_next)
        dissatisfied = pick(dissatisfied) + (1 - p_chosen)
        cont = continue_prob(params, patience, torch.tensor(t), dissatisfied)
        examine = pick(examine) * cont
        satiation = params.redundancy_decay * pick(satiation) + sim.gather(1, item.unsqueeze(2).expand(B, W, n))
        placed = pick(placed).scatter(2, item.unsqueeze(2), True)
        pages = torch.cat([pick(pages), item.unsqueeze(2)], dim=2)
        last = item
    return pages, utility
