"""The user-response model: exact expected feedback of any page, and sampled feedback.

A user examines a page top-down (position t = 1..L). At position t:

    logit_t = bias + rel + quality
              - redundancy * sum_{j<t} decay^(t-1-j) * sim(pi_j, pi_t)     satiation
              + complement[cat(pi_{t-1}), cat(pi_t)]                       transition bonus
              - position_bias * ln t
    p_t     = sigmoid(logit_t)                          P(click | examined)
    D_t     = sum_{j<=t} (1 - p_j)                      dissatisfaction so far (mean field)
    c_t     = sigmoid(continue_bias + patience + viewport_bonus [t < V] - dissatisfaction * D_t)
    E_1 = 1, E_{t+1} = E_t c_t                          P(examined)
    watch fraction | click ~ Kumaraswamy(a_t, 1) with a_t = exp(g_t),
        g_t = watch_engagement * logit_t + watch_bias - watch_duration * ln(dur / median)
        so E[fraction] = sigmoid(g_t) and P(fraction >= theta) = 1 - theta^a_t
    P(reformulate) = sigmoid(reformulate_bias - reformulate_viewport * sum_{t<=V} E_t p_t)

with sim(i, j) = category_overlap [cat_i = cat_j] + topic_overlap * relu(<z_i, z_j>)^2.
Because every quantity is a deterministic function of the page (mean-field examination:
continuing depends on expected, not realised, dissatisfaction), the expectation is exact
and costs O(L^2) per page; the sampler draws the cascade (examine t+1 only if t was
examined), clicks, watch fractions and reformulation from exactly these probabilities, so
the Monte-Carlo mean of sampled feedback converges to the exact expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dualrerank.sim.catalogue import MEDIAN_DURATION_S
from dualrerank.sim.config import FEEDBACK_NAMES
from dualrerank.sim.state import Feedback, WorldState

__all__ = [
    "ResponseParams",
    "ItemView",
    "Expectation",
    "relevance",
    "item_view",
    "similarity",
    "expected",
    "sample",
    "realised_utility",
    "standalone_utility",
]


@dataclass(frozen=True)
class ResponseParams:
    """Effective user-model parameters of a world at one stream step (drift applied)."""

    relevance_scale: float
    rotation: torch.Tensor  # [k, k] applied to user vectors
    engagement_bias: float
    redundancy: float
    redundancy_decay: float
    category_overlap: float
    topic_overlap: float
    complement: torch.Tensor  # [C, C] logit bonus of transition a -> b
    position_bias: float
    viewport: int
    continue_bias: float
    viewport_bonus: float
    dissatisfaction: float
    watch_engagement: float
    watch_bias: float
    watch_duration: float
    long_view_threshold: float
    reformulate_bias: float
    reformulate_viewport: float
    weights: dict[str, float]  # per REWARD_DIMENSIONS, utility per true unit
    scales: dict[str, float]  # per FEEDBACK_NAMES, reported = true x scale
    upstream_rotation: torch.Tensor | None = None  # [k, k] the upstream ranker's view of preferences (None: rotation)


@dataclass(frozen=True)
class ItemView:
    """Per-candidate quantities the response model needs (B requests, n candidates).

    Attributes:
        base: `[B, n]` stand-alone engagement logit without position: bias + rel + quality.
        category: `[B, n]` int64.
        topic: `[B, n, k]`.
        duration: `[B, n]` seconds.
        log_duration: `[B, n]` ln(duration / median duration).
        patience: `[B]`.
        mask: `[B, n]` bool.
    """

    base: torch.Tensor
    category: torch.Tensor
    topic: torch.Tensor
    duration: torch.Tensor
    log_duration: torch.Tensor
    patience: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class Expectation:
    """Exact expectations for pages `[*P, L]`.

    Attributes:
        examine: `[*P, L]` P(position examined).
        click_prob: `[*P, L]` P(click | examined).
        click, long_view, watch_time: `[*P, L]` expected feedback in true units (seconds).
        reformulate: `[*P]` P(reformulate).
        utility: `[*P]` expected utility.
        continue_prob: `[*P, L]` P(examine t+1 | examined t) (the sampler's cascade).
        watch_shape: `[*P, L]` Kumaraswamy shape a_t of the watch fraction.
        duration: `[*P, L]` seconds of the shown items.
    """

    examine: torch.Tensor
    click_prob: torch.Tensor
    click: torch.Tensor
    long_view: torch.Tensor
    watch_time: torch.Tensor
    reformulate: torch.Tensor
    utility: torch.Tensor
    continue_prob: torch.Tensor
    watch_shape: torch.Tensor
    duration: torch.Tensor


def relevance(params: ResponseParams, state: WorldState) -> torch.Tensor:
    """`[B, n]` true relevance under the world's current (possibly rotated) preferences."""
    return _relevance(params, state.user, state.topic, state.match)


def _relevance(params: ResponseParams, user: torch.Tensor, topic: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """user `[B, k]`, topic `[B, *P, k]`, match `[B, *P]` -> `[B, *P]`."""
    preference = (user @ params.rotation.T).reshape(user.shape[0], *([1] * (topic.dim() - 3)), 1, user.shape[1])
    return params.relevance_scale * torch.matmul(preference, topic.transpose(-1, -2)).squeeze(-2) + match


def item_view(params: ResponseParams, state: WorldState, pages: torch.Tensor | None = None) -> ItemView:
    """Response-model quantities of every candidate `[B, n]`, or only of the items on
    `pages` `[B, *P]` (cheaper: nothing is computed for candidates not shown)."""
    if pages is None:
        topic, match, quality, duration, category = state.topic, state.match, state.quality, state.duration, state.category
        mask = state.candidate_mask
    else:
        topic, match, quality, duration, category = (
            _gather(x, pages) for x in (state.topic, state.match, state.quality, state.duration, state.category)
        )
        mask = torch.ones_like(pages, dtype=torch.bool)
    return ItemView(
        base=params.engagement_bias + _relevance(params, state.user, topic, match) + quality,
        category=category,
        topic=topic,
        duration=duration,
        log_duration=torch.log(duration * (1.0 / MEDIAN_DURATION_S)),
        patience=state.patience,
        mask=mask,
    )


def similarity(
    params: ResponseParams, cat_a: torch.Tensor, top_a: torch.Tensor, cat_b: torch.Tensor, top_b: torch.Tensor
) -> torch.Tensor:
    """`[..., a, b]` satiation similarity between items `[..., a]` and `[..., b]` (topics `[..., *, k]`)."""
    same = (cat_a.unsqueeze(-1) == cat_b.unsqueeze(-2)).to(top_a.dtype)
    cos = torch.matmul(top_a, top_b.transpose(-1, -2)).clamp_min(0)
    return params.category_overlap * same + params.topic_overlap * cos * cos


def _gather(x: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """x `[B, n, *f]`, pages `[B, *P]` -> `[B, *P, *f]`."""
    B = x.shape[0]
    flat = pages.reshape(B, -1)
    if x.dim() == 2:
        return x.gather(1, flat).reshape(pages.shape)
    f = x.shape[2:]
    idx = flat.reshape(B, -1, *([1] * len(f))).expand(B, flat.shape[1], *f)
    return x.gather(1, idx).reshape(*pages.shape, *f)


def _decay_matrix(L: int, decay: float) -> torch.Tensor:
    """`[L, L]` with decay^(t-1-j) below the diagonal (j < t), 0 elsewhere."""
    t = torch.arange(L)
    lag = (t.unsqueeze(1) - t.unsqueeze(0) - 1).clamp_min(0).float()
    return torch.where(t.unsqueeze(1) > t.unsqueeze(0), decay**lag, torch.zeros(()))


def watch_terms(
    params: ResponseParams, logit: torch.Tensor, log_duration: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Kumaraswamy shape a, E[fraction], P(fraction >= threshold)) for engagement logits."""
    # clamped so that a stays a finite positive float32; E[fraction] = a / (1 + a) = sigmoid(g)
    g = (params.watch_engagement * logit + params.watch_bias - params.watch_duration * log_duration).clamp(-30, 30)
    a = torch.exp(g)
    p_long = -torch.expm1(a * math.log(params.long_view_threshold))
    return a, torch.sigmoid(g), p_long


def item_gain(
    params: ResponseParams, p: torch.Tensor, frac: torch.Tensor, p_long: torch.Tensor, duration: torch.Tensor
) -> torch.Tensor:
    """Expected utility of an examined item from its click, long-view and watch terms."""
    w = params.weights
    return p * (w["click"] + w["long_view"] * p_long + w["watch_time"] * frac * duration)


def continue_prob(
    params: ResponseParams, patience: torch.Tensor, t_index: torch.Tensor, dissatisfied: torch.Tensor
) -> torch.Tensor:
    """P(go on from position t to t+1 | examined t); t_index is 0-based."""
    inside = (t_index < params.viewport - 1).to(dissatisfied.dtype)
    return torch.sigmoid(params.continue_bias + patience + params.viewport_bonus * inside - params.dissatisfaction * dissatisfied)


def reformulate_prob(params: ResponseParams, viewport_clicks: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(params.reformulate_bias - params.reformulate_viewport * viewport_clicks)


def expected(params: ResponseParams, state: WorldState, pages: torch.Tensor) -> Expectation:
    """Exact expected feedback and utility of pages `[B, L]` or `[B, G, L]` (valid pages)."""
    L = pages.shape[-1]
    extra = pages.dim() - 2  # 1 for [B, G, L]
    view = item_view(params, state, pages)
    base, cat, top, dur, logd = view.base, view.category, view.topic, view.duration, view.log_duration

    logit = base - params.position_bias * torch.log(torch.arange(1, L + 1, dtype=base.dtype))
    if params.redundancy > 0 and L > 1:
        sim = similarity(params, cat, top, cat, top)
        logit = logit - params.redundancy * (sim * _decay_matrix(L, params.redundancy_decay)).sum(-1)
    if L > 1:
        C = params.complement.shape[0]
        bonus = params.complement.reshape(-1)[cat[..., :-1] * C + cat[..., 1:]]
        logit = torch.cat([logit[..., :1], logit[..., 1:] + bonus], dim=-1)
    p = torch.sigmoid(logit)
    patience = view.patience.reshape(-1, *([1] * (extra + 1)))
    cont = continue_prob(params, patience, torch.arange(L), torch.cumsum(1 - p, dim=-1))
    examine = torch.cat([torch.ones_like(p[..., :1]), torch.cumprod(cont[..., :-1], dim=-1)], dim=-1)
    a, frac, p_long = watch_terms(params, logit, logd)
    click = examine * p
    long_view = click * p_long
    watch = click * frac * dur
    reform = reformulate_prob(params, click[..., : params.viewport].sum(-1))
    w = params.weights
    utility = (
        w["click"] * click.sum(-1)
        + w["long_view"] * long_view.sum(-1)
        + w["watch_time"] * watch.sum(-1)
        - w["reformulate"] * reform
    )
    return Expectation(examine, p, click, long_view, watch, reform, utility, cont, a, dur)


def sample(params: ResponseParams, exp: Expectation, generator: torch.Generator) -> Feedback:
    """Draw feedback for the pages `exp` was computed on (cascade examination)."""
    shape = exp.click_prob.shape
    u = torch.rand(*shape, 3, generator=generator)
    u_ref = torch.rand(shape[:-1], generator=generator)
    go_on = (u[..., 0] < exp.continue_prob).float()
    examined = torch.cat([torch.ones_like(go_on[..., :1]), torch.cumprod(go_on[..., :-1], dim=-1)], dim=-1)
    click = examined * (u[..., 1] < exp.click_prob).float()
    # Kumaraswamy(a, 1) by inversion: F(x) = x^a  =>  x = U^(1/a)
    fraction = u[..., 2].clamp_min(1e-12) ** (1.0 / exp.watch_shape)
    long_view = click * (fraction >= params.long_view_threshold).float()
    watch = click * fraction * exp.duration
    s = params.scales
    return Feedback(
        click=click * s["click"],
        long_view=long_view * s["long_view"],
        watch_time=watch * s["watch_time"],
        reformulate=(u_ref < exp.reformulate).float(),
    )


def realised_utility(params: ResponseParams, fb: Feedback) -> torch.Tensor:
    """`[*P]` utility of sampled feedback (reported units converted back to true units)."""
    w, s = params.weights, params.scales
    total = w["reformulate"] * -fb.reformulate
    for name in FEEDBACK_NAMES:
        total = total + w[name] * getattr(fb, name).sum(-1) / s[name]
    return total


def standalone_utility(params: ResponseParams, view: ItemView) -> torch.Tensor:
    """`[B, n]` expected utility of each candidate shown alone at position 1 (no page effects)."""
    _, frac, p_long = watch_terms(params, view.base, view.log_duration)
    return item_gain(params, torch.sigmoid(view.base), frac, p_long, view.duration)
