"""Off-policy evaluation (OPE): a reranker's page reward estimated from logs that carry
the logging policy's propensities, before the reranker serves any traffic.

    cfg = OpeConfig()                                   # or load_config(OpeConfig, "ope.yaml")
    summary = run_ope(cfg, "runs/teacher", "runs/ope")  # summary.json, report.md, config.yaml

**Estimand** [ours]. The page reward of a request is a weighted sum of the per-position
feedback events, `R = sum_t w_click [click_t > 0] + w_long_view [long_view_t > 0]`
(unit-free, like `feedback.page_events`; default weights 1 and 1, the simulated world's
utility weights on clicks and long views). The value of a target policy pi on the logged
requests is `V(pi) = mean_b E[R | request b, page pi(b)]`; in the simulated world that is
`w_click E[clicks] + w_long_view E[long views]` of the target's page under the user model,
computed exactly by `World.expectation` (the `truth` of summary.json). Watch time and query
reformulation, the world's other utility terms, are left out: the evaluator predicts
neither, and reformulation is a page-level event that breaks the cascade structure below.

The target is deterministic (its greedy / sorted page pi_b), so its probability of a
logged page s is `1[s == pi_b]`. Estimators (`ESTIMATORS`; weights are target over logging
probability):

- `ips`: whole-page IPS, `mean_b w_b R_b`, `w_b = 1[s_b = pi_b] / mu(s_b)`. Unbiased when
  mu(pi_b) > 0; with pages of 10 of 50 candidates a logged page almost never equals the
  target's (the default world: none in 100,000), so it has no support in practice.
- `snips`: self-normalised IPS, `sum w R / sum w` (undefined without a match).
- `pi`: the pseudo-inverse estimator for additive rewards (Swaminathan et al. 2017) in its
  per-position form: `mean_b sum_t 1[s_bt = pi_bt] r_bt / mu_t(pi_bt)`, with the logging
  policy's item-position marginals mu_t(i) = P(item i at position t). Unbiased when the
  reward observed at position t depends only on (t, the item there). The paper's slate
  form uses only the page reward and needs pairwise marginals (an nL x nL matrix per
  request); logs that observe each position's reward need only these marginals.
- `dm`: direct method, `mean_b sum_t r^_t(pi_b)`, r^ = the learned `ListEvaluator`'s
  predicted click and long-view probabilities, weighted like the reward. Only as good as
  the evaluator; its interval reflects request sampling, not the evaluator's error.
- `dr`: doubly robust with whole-page weights (Dudik et al. 2011):
  `dm + w_b (R_b - R^_b(s_b))`; unbiased if the propensities are right, = dm without matches.
- `pi_dr`: the same correction with the per-position marginal weights of `pi`.
- `cascade_dr`: Cascade-DR (Kiyohara et al. 2022): prefix weights
  `w_bt = 1[s_b,1:t = pi_b,1:t] / mu(s_b,1:t)`, `dm + sum_t w_bt (r_bt - r^_t(s_b))`.
  Unbiased under the cascade assumption (the reward at position t depends only on the items
  at positions <= t), for any evaluator: the simulated world satisfies it exactly for
  clicks and long views (examination, satiation and the complementarity bonus only look
  up the page). With a deterministic target and a causal evaluator the Q-function terms
  telescope to this form. Deep prefixes are rarely logged, so its variance is large.
- `cascade_sndr` [ours in this combination]: Cascade-DR with each position's correction
  self-normalised, `dm + sum_t (sum_b w_bt e_bt) / (sum_b w_bt)` (the weighted DR of
  Thomas & Brunskill 2016, per position); a position no logged prefix reaches keeps dm's
  value. Consistent, biased by O(1/matches), much smaller variance.

**Logging propensities.** Whole-page weights need only `RerankBatch.propensity`. The
position-wise and prefix weights need the logging policy itself: for the simulated world
it is known (`sim.policies.logging_pages`: with probability `uniform_share` a uniform
shuffle, else a Plackett-Luce draw from `softmax(upstream / temperature)`), so
`LoggingPolicy` rebuilds it from the logs' upstream scores, checks that it reproduces every
logged propensity, and gives exact prefix probabilities and Monte-Carlo item-position
marginals [ours: Rao-Blackwellised, seeded]. For logs of an unknown policy these two
families are reported as not run, with the reason.

**Intervals.** `normal` (default): estimate +- z * sd(influence terms) / sqrt(B), the
influence terms of the self-normalised estimators linearised by the delta method.
`bootstrap`: `scipy.stats.bootstrap` (percentile) resampling requests. Both assume enough
non-zero weights: with a handful of matches the interval is not to be trusted (see `ess`).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from dualrerank.config import dump_config, option, to_dict
from dualrerank.errors import CheckpointError, ConfigError, DataError
from dualrerank.feedback import CLICK, LONG_VIEW, page_events
from dualrerank.schema import RerankBatch
from dualrerank.sim.policies import gumbel
from dualrerank.train.splits import SPLIT_SOURCES

__all__ = [
    "ESTIMATORS",
    "LOG_SEED_OFFSET",
    "OpeDataConfig",
    "OpeConfig",
    "LoggingPolicy",
    "Terms",
    "ips",
    "snips",
    "position_ips",
    "direct",
    "doubly_robust",
    "self_normalised_dr",
    "weight_stats",
    "interval",
    "OpeInputs",
    "deterministic_inputs",
    "estimate_all",
    "run_ope",
]

_F = torch.float64

#: name -> (what it is, what it assumes / when it breaks); the order of summary.json and report.md.
ESTIMATORS: dict[str, tuple[str, str]] = {
    "ips": ("whole-page IPS", "logged page propensities; breaks when the target's page is (almost) never logged"),
    "snips": ("self-normalised whole-page IPS", "as ips; undefined without a logged page equal to the target's"),
    "pi": (
        "pseudo-inverse, per-position form (item-position marginals)",
        "the reward at position t depends only on (t, item): no effect of the items above",
    ),
    "dm": ("direct method (learned evaluator)", "the evaluator is right on the target's pages"),
    "dr": ("doubly robust, whole-page weights", "propensities right, or the evaluator right; = dm without matches"),
    "pi_dr": ("doubly robust, item-position marginal weights", "the evaluator's error at position t depends only on (t, item)"),
    "cascade_dr": ("cascade doubly robust, prefix weights", "the reward at t depends only on positions <= t (cascade)"),
    "cascade_sndr": ("cascade DR, self-normalised per position", "as cascade_dr; bias O(1/matches) per position"),
}
#: Logs of a generated world are drawn with `seed + LOG_SEED_OFFSET`, so that seed 0 draws
#: neither a run's training logs (its data seed) nor its valid/test requests (data seed +
#: 1,000,003 / + 2,000,003, train/splits.py).
LOG_SEED_OFFSET = 3_000_003
DEFAULT_REQUESTS = 10_000


@dataclass
class OpeDataConfig:
    """The logs to evaluate on."""

    source: str | None = option(
        None, "data source: synthetic, letor or mind (default: the policy run's)", choices=(None, *SPLIT_SOURCES)
    )
    path: str | None = option(
        None,
        "synthetic: a world YAML or a 'simulate --out' folder; letor/mind: the data "
        "(default: the policy run's when the source is the run's)",
    )
    world_seed: int | None = option(
        None,
        "synthetic, generated world: the world's seed (default: the policy run's "
        "data seed, i.e. the world it was trained on; else 0)",
    )
    num_requests: int | None = option(
        None,
        "synthetic: logged requests to draw (default 10,000), or the first N of a 'simulate --out' folder (default: all)",
        ge=1,
    )


@dataclass
class OpeConfig:
    """`dualrerank ope`: estimators, reward weights and intervals."""

    seed: int = option(
        0,
        "seed of the logs of a generated world (drawn with seed + 3,000,003), of the Monte-Carlo marginals and of the bootstrap",
    )
    data: OpeDataConfig = option(factory=OpeDataConfig, help="the logs")
    click_weight: float = option(1.0, "reward per click event (world default: utility.weight_click)", ge=0)
    long_view_weight: float = option(1.0, "reward per long-view event (world default: utility.weight_long_view)", ge=0)
    estimators: list[str] = option(
        help="estimators to run, in this order (any of ips, snips, pi, dm, dr, pi_dr, cascade_dr, cascade_sndr)",
        factory=lambda: list(ESTIMATORS),
    )
    interval: str = option(
        "normal", "confidence interval: normal (delta method) or bootstrap (scipy, percentile)", choices=("normal", "bootstrap")
    )
    level: float = option(0.95, "confidence level of the intervals", gt=0, lt=1)
    bootstrap_resamples: int = option(1000, "bootstrap resamples (interval: bootstrap)", ge=10)
    marginal_samples: int = option(256, "Plackett-Luce samples per request for the item-position marginals (pi, pi_dr)", ge=1)
    chunk_size: int = option(1024, "requests per chunk of policy decoding, evaluator calls and marginals (memory bound)", ge=1)

    def __post_init__(self) -> None:
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            raise ConfigError(f"estimators: {unknown or 'empty'}; choose among {list(ESTIMATORS)}")
        if self.click_weight == 0 and self.long_view_weight == 0:
            raise ConfigError("click_weight, long_view_weight: both 0 leave no reward to estimate")


# ---------------------------------------------------------------------------- logging policy
@dataclass(frozen=True)
class LoggingPolicy:
    """The simulated world's logging policy on a batch (see `sim.policies.logging_pages`):
    with probability `uniform_share` a uniformly shuffled page, else a Plackett-Luce draw of
    `softmax(upstream / temperature)` over the valid candidates.

    Attributes:
        logits: `[B, n]` float64 upstream / temperature, -inf at padding.
        mask: `[B, n]` bool valid candidates.
        uniform_share: share of uniformly shuffled pages.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    uniform_share: float

    @classmethod
    def of_world(cls, world: Any, batch: RerankBatch) -> LoggingPolicy:
        if batch.upstream_score is None:
            raise DataError("upstream_score: the logs have none, so the simulated logging policy cannot be rebuilt")
        lg = world.config.logging
        logits = (batch.upstream_score.double() / lg.temperature).masked_fill(~batch.candidate_mask, float("-inf"))
        return cls(logits, batch.candidate_mask, float(lg.uniform_share))

    def _mix(self, log_uniform: torch.Tensor, log_pl: torch.Tensor) -> torch.Tensor:
        share = self.uniform_share
        parts = []
        if share > 0:
            parts.append(math.log(share) + log_uniform)
        if share < 1:
            parts.append(math.log1p(-share) + log_pl)
        return parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1])

    def prefix_log_prob(self, pages: torch.Tensor) -> torch.Tensor:
        """`log mu(pages[..., :t+1])` for every t: `[B, L]` for pages `[B, L]`, `[B, K, L]`
        for `[B, K, L]` (float64, exact; -inf for a prefix with a padded or repeated item)."""
        grouped = pages.dim() == 3
        p = pages if grouped else pages.unsqueeze(1)
        B, K, L = p.shape
        logits = self.logits.unsqueeze(1).expand(B, K, -1)
        remaining = self.mask.unsqueeze(1).expand(B, K, -1).clone()
        valid = self.mask.sum(1).to(_F).view(B, 1)
        log_pl = torch.zeros(B, K, dtype=_F)
        log_uniform = torch.zeros(B, K, dtype=_F)
        out = []
        for t in range(L):  # loops over positions only
            item = p[..., t : t + 1]
            norm = logits.masked_fill(~remaining, float("-inf")).logsumexp(-1)
            ok = remaining.gather(2, item).squeeze(2)
            log_pl = log_pl + torch.where(ok, logits.gather(2, item).squeeze(2) - norm, torch.full_like(norm, float("-inf")))
            log_uniform = log_uniform + torch.where(ok, -torch.log(valid - t), torch.full_like(norm, float("-inf")))
            remaining = remaining.scatter(2, item, False)
            out.append(self._mix(log_uniform, log_pl))
        res = torch.stack(out, -1)
        return res if grouped else res.squeeze(1)

    def page_prob(self, pages: torch.Tensor) -> torch.Tensor:
        """`[B]` probability of whole pages `[B, L]` (what the logs' `propensity` holds)."""
        return self.prefix_log_prob(pages)[:, -1].exp()

    def position_marginals(self, items: torch.Tensor, samples: int, generator: torch.Generator, block: int = 64) -> torch.Tensor:
        """`[B, K, L]` P(item `items[b, k, t]` at position t) under the policy.

        Exact for the uniform part (1 / valid candidates). The Plackett-Luce part is a
        Rao-Blackwellised Monte-Carlo mean over `samples` draws per request [ours]: for
        each drawn prefix s_<t the exact conditional probability of the item at t,
        `1[item not in s_<t] exp(logit_item) / sum_{j not in s_<t} exp(logit_j)`, whose
        mean over prefixes is the marginal (lower variance than counting placements).
        """
        B, K, L = items.shape
        n = self.mask.shape[1]
        shift = self.logits.masked_fill(~self.mask, float("-inf")).amax(1, keepdim=True)
        e = torch.exp(self.logits - shift)  # [B, n], 0 at padding
        z0 = e.sum(1).view(B, 1, 1)
        flat = items.reshape(B, K * L)
        e_items = e.gather(1, flat).view(B, 1, K, L)
        t_idx = torch.arange(L).view(1, 1, 1, L)
        acc = torch.zeros(B, K, L, dtype=_F)
        done = 0
        while done < samples:
            m = min(block, samples - done)
            keys = (self.logits.unsqueeze(1) + gumbel((B, m, n), generator)).masked_fill(~self.mask.unsqueeze(1), float("-inf"))
            drawn = keys.topk(L, dim=2).indices  # [B, m, L]
            rank = torch.full((B, m, n), L, dtype=torch.long)
            rank.scatter_(2, drawn, torch.arange(L).view(1, 1, L).expand(B, m, L))
            e_drawn = e.gather(1, drawn.reshape(B, m * L)).view(B, m, L)
            # Normaliser before position t: everything minus what the prefix took (float64;
            # the clamp only guards against rounding when the prefix took nearly all mass).
            z = (z0 - (torch.cumsum(e_drawn, 2) - e_drawn)).clamp_min(torch.finfo(_F).tiny)
            free = rank.gather(2, flat.unsqueeze(1).expand(B, m, K * L)).view(B, m, K, L) >= t_idx
            acc += (free * e_items / z.unsqueeze(2)).sum(1)
            done += m
        pl = acc / samples
        uniform = self.mask.gather(1, flat).view(B, K, L).to(_F) / self.mask.sum(1).to(_F).view(B, 1, 1)
        return self.uniform_share * uniform + (1 - self.uniform_share) * pl


# ---------------------------------------------------------------------------- estimators
@dataclass(frozen=True)
class Terms:
    """An estimator as per-request terms: `estimate = mean_b base_b + sum_k ratio_k`, with
    `ratio_k = sum_b num_bk / sum_b den_bk` (0 where `sum_b den_bk = 0`). Plain averages
    have K = 0; self-normalised estimators put their weighted sums in num / den.

    Attributes:
        base: `[B]` float64.
        num: `[B, K]` float64.
        den: `[B, K]` float64.
    """

    base: torch.Tensor
    num: torch.Tensor
    den: torch.Tensor

    @staticmethod
    def mean_of(values: torch.Tensor) -> Terms:
        empty = torch.zeros(values.shape[0], 0, dtype=_F)
        return Terms(values.to(_F), empty, empty)

    def ratios(self) -> torch.Tensor:
        den = self.den.sum(0)
        return torch.where(den > 0, self.num.sum(0) / den.clamp_min(torch.finfo(_F).tiny), torch.zeros_like(den))

    def value(self) -> float:
        return float(self.base.mean() + self.ratios().sum())

    def influence(self) -> torch.Tensor:
        """`[B]` terms whose mean is the estimate and whose spread gives its standard error
        (the ratios linearised: ratio + (num_b - ratio den_b) / mean(den))."""
        B = self.base.shape[0]
        r = self.ratios()
        mean_den = self.den.mean(0)
        used = mean_den > 0
        lin = (self.num - r * self.den) / mean_den.clamp_min(torch.finfo(_F).tiny) + r
        return self.base + torch.where(used, lin, torch.zeros(B, 1, dtype=_F)).sum(1)


def ips(reward: torch.Tensor, weight: torch.Tensor) -> Terms:
    """Whole-page IPS: reward `[B]` (page reward), weight `[B]` (target / logging probability
    of the logged page) -> terms `w_b R_b`."""
    return Terms.mean_of(weight.to(_F) * reward.to(_F))


def snips(reward: torch.Tensor, weight: torch.Tensor) -> Terms:
    """Self-normalised IPS `sum w R / sum w`; reward, weight `[B]`."""
    w = weight.to(_F)
    return Terms(torch.zeros_like(w), (w * reward.to(_F)).unsqueeze(1), w.unsqueeze(1))


def position_ips(reward: torch.Tensor, weight: torch.Tensor) -> Terms:
    """Per-position IPS `mean_b sum_t w_bt r_bt`; reward, weight `[B, L]` (0 at absent positions).
    With item-position marginal weights this is `pi`."""
    return Terms.mean_of((weight.to(_F) * reward.to(_F)).sum(1))


def direct(value: torch.Tensor) -> Terms:
    """Direct method: `[B]` the evaluator's predicted reward of the target's page."""
    return Terms.mean_of(value)


def doubly_robust(value: torch.Tensor, reward: torch.Tensor, predicted: torch.Tensor, weight: torch.Tensor) -> Terms:
    """`value_b + sum_t w_bt (r_bt - r^_bt)`: value `[B]` (dm), reward and predicted `[B, L]`
    (realised and predicted reward of the logged positions), weight `[B, L]` or `[B, 1]`
    (a whole-page weight applies to every position)."""
    resid = reward.to(_F) - predicted.to(_F)
    return Terms.mean_of(value.to(_F) + (weight.to(_F) * resid).sum(1))


def self_normalised_dr(value: torch.Tensor, reward: torch.Tensor, predicted: torch.Tensor, weight: torch.Tensor) -> Terms:
    """`mean_b value_b + sum_t (sum_b w_bt e_bt) / (sum_b w_bt)`, e = reward - predicted; shapes
    as `doubly_robust` with weight `[B, L]`; a position without weight keeps `value`'s part."""
    w = weight.to(_F)
    return Terms(value.to(_F), w * (reward.to(_F) - predicted.to(_F)), w)


def weight_stats(weight: torch.Tensor) -> dict[str, Any]:
    """Kish effective sample size `(sum w)^2 / sum w^2` of weights `[B]` or `[B, L]` (per
    position, `ess` being the smallest), the largest weight and the share of requests with a
    non-zero weight."""
    w = weight.to(_F)
    w2 = w if w.dim() == 2 else w.unsqueeze(1)
    sq = (w2 * w2).sum(0)
    ess = torch.where(sq > 0, w2.sum(0) ** 2 / sq.clamp_min(torch.finfo(_F).tiny), torch.zeros_like(sq))
    B = w2.shape[0]
    return {
        "ess": float(ess.min()),
        "ess_share": float(ess.min()) / B,
        "ess_by_position": [float(x) for x in ess] if w.dim() == 2 else None,
        "weight_max": float(w2.max()) if w2.numel() else 0.0,
        "nonzero_share": float((w2 != 0).any(1).double().mean()),
    }


def interval(
    terms: Terms, level: float, method: str = "normal", *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(standard error, low, high) of the estimate of `terms` at confidence `level`:
    `normal` from the influence terms; `bootstrap` with scipy.stats.bootstrap (percentile,
    requests resampled with their terms paired)."""
    from scipy import stats

    est = terms.value()
    phi = terms.influence()
    B = phi.shape[0]
    se = float(phi.std(unbiased=True) / math.sqrt(B)) if B > 1 else float("nan")
    if method == "normal":
        z = float(stats.norm.ppf(0.5 + level / 2))
        return se, est - z * se, est + z * se
    if method != "bootstrap":
        raise ConfigError(f"interval: {method!r} is not one of ['normal', 'bootstrap']")
    K = terms.num.shape[1]
    data = (terms.base.numpy(), *terms.num.T.numpy(), *terms.den.T.numpy())

    def statistic(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        total = arrays[0].mean(axis=axis)
        for k in range(K):
            num, den = arrays[1 + k].sum(axis=axis), arrays[1 + K + k].sum(axis=axis)
            total = total + np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        return total

    # Memory of one vectorised batch: resamples x B x arrays floats; keep it near 2e7.
    batch = max(1, int(2e7 // max(1, B * len(data))))
    res = stats.bootstrap(
        data,
        statistic,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        paired=True,
        vectorized=True,
        batch=batch,
        random_state=np.random.default_rng(seed),
    )
    return se, float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class OpeInputs:
    """What the estimators read, for one target policy on B logged requests of L positions.

    Attributes:
        reward: `[B, L]` realised reward of each logged position (0 at absent ones).
        page_weight: `[B]` target / logging probability of the logged page.
        position_weight: `[B, L]` target / logging marginal of the logged item at each
            position, or None (with `position_reason`).
        prefix_weight: `[B, L]` target / logging probability of the logged prefix up to each
            position, or None (with `prefix_reason`).
        value: `[B]` the evaluator's predicted reward of the target's page, or None.
        predicted: `[B, L]` the evaluator's predicted reward of the logged positions, or None
            (with `model_reason` when both are None).
    """

    reward: torch.Tensor
    page_weight: torch.Tensor
    position_weight: torch.Tensor | None = None
    prefix_weight: torch.Tensor | None = None
    value: torch.Tensor | None = None
    predicted: torch.Tensor | None = None
    position_reason: str = "no item-position marginals of the logging policy"
    prefix_reason: str = "no prefix propensities of the logging policy"
    model_reason: str = "no evaluator"


def deterministic_inputs(
    pages: torch.Tensor,
    logged: torch.Tensor,
    propensity: torch.Tensor,
    reward: torch.Tensor,
    *,
    marginals: torch.Tensor | None = None,
    prefix_prob: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    predicted: torch.Tensor | None = None,
) -> OpeInputs:
    """`OpeInputs` of a deterministic target whose page is `pages [B, L]`, on logs with pages
    `logged [B, L]`, page propensities `propensity [B]` and rewards `reward [B, L]`.

    marginals: `[B, L]` logging probability of the target's item at each position;
    prefix_prob: `[B, L]` logging probability of the target's prefix up to each position.
    A weight is 1 / probability where the logged page (prefix, item) equals the target's, else 0.
    """
    same = logged == pages
    full = same.all(1)
    page_weight = torch.where(full, 1.0 / propensity.to(_F), torch.zeros(full.shape, dtype=_F))

    def weigh(match: torch.Tensor, prob: torch.Tensor | None) -> torch.Tensor | None:
        if prob is None:
            return None
        if bool((match & ~(prob > 0)).any()):
            raise DataError(
                "marginals: a logged item equal to the target's has logging probability 0 (raise "
                "marginal_samples, or the logs do not come from this logging policy)"
            )
        return torch.where(match, 1.0 / prob.to(_F).clamp_min(torch.finfo(_F).tiny), torch.zeros(match.shape, dtype=_F))

    prefix = same.long().cumprod(1).bool()
    return OpeInputs(
        reward=reward.to(_F),
        page_weight=page_weight,
        position_weight=weigh(same, marginals),
        prefix_weight=weigh(prefix, prefix_prob),
        value=value,
        predicted=predicted,
    )


def _terms_of(name: str, x: OpeInputs) -> tuple[Terms | None, torch.Tensor | None, str | None]:
    """(terms, the weights behind them, why not run) of estimator `name`."""
    page_reward = x.reward.sum(1)
    model = x.value is not None and x.predicted is not None
    if name == "ips":
        return ips(page_reward, x.page_weight), x.page_weight, None
    if name == "snips":
        if float(x.page_weight.sum()) == 0:
            return None, x.page_weight, "no logged page equals the target's page (self-normalised IPS is 0/0)"
        return snips(page_reward, x.page_weight), x.page_weight, None
    if name in ("pi", "pi_dr") and x.position_weight is None:
        return None, None, x.position_reason
    if name in ("cascade_dr", "cascade_sndr") and x.prefix_weight is None:
        return None, None, x.prefix_reason
    if name == "pi":
        assert x.position_weight is not None  # checked above
        return position_ips(x.reward, x.position_weight), x.position_weight, None
    if not model:
        return None, None, x.model_reason
    assert x.value is not None and x.predicted is not None  # model
    if name == "dm":
        return direct(x.value), None, None
    if name == "dr":
        return doubly_robust(x.value, x.reward, x.predicted, x.page_weight.unsqueeze(1)), x.page_weight, None
    if name == "pi_dr":
        assert x.position_weight is not None  # checked above
        return doubly_robust(x.value, x.reward, x.predicted, x.position_weight), x.position_weight, None
    if name == "cascade_dr":
        assert x.prefix_weight is not None  # checked above
        return doubly_robust(x.value, x.reward, x.predicted, x.prefix_weight), x.prefix_weight, None
    if name == "cascade_sndr":
        assert x.prefix_weight is not None  # checked above
        return self_normalised_dr(x.value, x.reward, x.predicted, x.prefix_weight), x.prefix_weight, None
    raise ConfigError(f"estimators: unknown estimator {name!r}; choose among {list(ESTIMATORS)}")


_NO_SUPPORT = {
    "ips": "no logged page equals the target's",
    "snips": "no logged page equals the target's",
    "dr": "no logged page equals the target's",
    "pi": "no logged item sits where the target puts it",
    "pi_dr": "no logged item sits where the target puts it",
    "cascade_dr": "no logged page starts with the target's first item",
    "cascade_sndr": "no logged page starts with the target's first item",
}


def estimate_all(
    x: OpeInputs,
    names: list[str] | tuple[str, ...] = tuple(ESTIMATORS),
    *,
    level: float = 0.95,
    method: str = "normal",
    resamples: int = 1000,
    seed: int = 0,
    truth: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Every estimator in `names`: `{name: {status, reason, estimate, se, ci_low, ci_high,
    ess, ess_share, ess_by_position, weight_max, nonzero_share, error, covered}}` (error and
    covered only with `truth`; an estimator that cannot run has status 'not run' and a reason)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        terms, weights, reason = _terms_of(name, x)
        rec: dict[str, Any] = {"status": "ok" if terms is not None else "not run", "reason": reason}
        if terms is not None:
            se, lo, hi = interval(terms, level, method, resamples=resamples, seed=seed)
            rec.update(estimate=terms.value(), se=se, ci_low=lo, ci_high=hi)
            if truth is not None:
                rec.update(error=rec["estimate"] - truth, covered=bool(lo <= truth <= hi))
        if weights is not None:
            rec.update(weight_stats(weights))
            if terms is not None and rec["nonzero_share"] == 0:
                # The estimator still has a value (0, or dm's for the DR forms) but no logged
                # page supports it: say so instead of showing a confident zero-width interval.
                rec["status"] = "no support"
                rec["reason"] = (
                    _NO_SUPPORT[name]
                    + ": the value is "
                    + ("dm's" if name in ("dr", "pi_dr", "cascade_dr", "cascade_sndr") else "0")
                    + ", not an estimate"
                )
        out[name] = rec
    return out


# ---------------------------------------------------------------------------- the run
def _chunks(B: int, size: int, progress: bool, desc: str):
    starts = range(0, B, size)
    return tqdm(starts, desc=desc, unit="chunk", leave=False, disable=not progress, file=sys.stderr)


def _policy(path: Path) -> tuple[Any, str]:
    from dualrerank.models.checkpoint import load_checkpoint, read_checkpoint_info, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--policy: {p} does not exist (give a run directory or its checkpoint/)")
    directory = resolve_checkpoint(p)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"--policy: {p} is not a run directory or checkpoint (no checkpoint/config.json)")
    model = load_checkpoint(directory)
    if not hasattr(model, "rerank"):
        raise CheckpointError(f"--policy: the model in {directory} cannot rerank")
    return model, read_checkpoint_info(directory)["model"]


def _evaluator_dir(policy: Path, given: str | Path | None) -> Path | None:
    """--evaluator, else the policy run's own evaluator/ (beside checkpoint/ or in the run)."""
    if given is not None:
        return Path(given)
    p = Path(policy)
    run = p.parent if p.name == "checkpoint" else p
    own = run / "evaluator"
    return own if (own / "checkpoint" / "config.json").is_file() or (own / "config.json").is_file() else None


@dataclass
class _Logs:
    batch: RerankBatch
    world: Any = None
    state: Any = None
    description: dict[str, Any] = field(default_factory=dict)


def _load_logs(cfg: OpeConfig, run_data: Mapping[str, Any] | None) -> _Logs:
    """The logs `cfg.data` names (missing settings from the policy run's data section)."""
    d = cfg.data
    run_data = dict(run_data or {})
    source = d.source or run_data.get("source") or "synthetic"
    same_source = source == run_data.get("source", "synthetic")
    path = d.path if d.path is not None else (run_data.get("path") if same_source else None)
    if source != "synthetic":
        from dualrerank.data import load_dataset

        if not path:
            raise ConfigError(f"--path: the {source} source needs a path")
        # Loader notes (e.g. no BM25 column) matter only if the logs can be used: held back
        # until the propensity check, so that a refusal stays one line.
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            batch = load_dataset(source, path)
        _check_logs(batch, source)
        for w in held:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return _Logs(batch, description={"source": source, "path": str(path)})

    from dualrerank.data.synthetic import load_logged_state, load_logs, load_world, load_world_config, simulate_logs
    from dualrerank.sim import World, WorldConfig

    p = Path(path) if path else None
    if p is not None and p.is_dir():
        batch = load_logs(p, d.num_requests, option="data.num_requests")
        world = load_world(p)
        state = load_logged_state(p)
        if d.num_requests is not None and d.num_requests < state.batch_size:
            state = state.select(slice(0, d.num_requests))
        return _Logs(batch, world, state, {"source": source, "path": str(p), "world_seed": world.seed, "logs_seed": None})
    world_cfg = load_world_config(p) if p is not None else WorldConfig()
    world_seed = d.world_seed if d.world_seed is not None else int(run_data.get("seed", 0) or 0) if same_source else 0
    world = World(world_cfg, seed=world_seed)
    logs = simulate_logs(world, d.num_requests or DEFAULT_REQUESTS, cfg.seed + LOG_SEED_OFFSET)
    return _Logs(
        logs.batch,
        world,
        logs.state,
        {"source": source, "path": str(p) if p else None, "world_seed": world_seed, "logs_seed": cfg.seed + LOG_SEED_OFFSET},
    )


def _check_logs(batch: RerankBatch, source: str) -> int:
    """The logged page length L, or a one-line DataError naming what OPE needs and the logs lack."""
    missing = [
        name
        for name, value in (
            ("logged_page", batch.logged_page),
            ("logged_feedback or labels", batch.logged_feedback if batch.logged_feedback is not None else batch.labels),
            ("propensity", batch.propensity),
        )
        if value is None
    ]
    if missing:
        raise DataError(
            f"{source} logs carry no {' and no '.join(missing)}: off-policy evaluation needs each logged "
            "page's probability under the logging policy (RerankBatch.propensity) with the page and its "
            "feedback (docs/evaluation.md)"
        )
    # No mask means every logged position exists (the schema's convention).
    if batch.logged_page_mask is not None and not bool(batch.logged_page_mask.all()):
        raise DataError("logged_page_mask: some logged pages are shorter than others; ope compares whole pages of one length L")
    return int(cast(torch.Tensor, batch.logged_page).shape[1])  # not None: checked above


def _reward(batch: RerankBatch, weights: torch.Tensor) -> torch.Tensor:
    """`[B, L]` realised reward per logged position: weighted click / long-view events."""
    events, pmask = page_events(batch, (CLICK, LONG_VIEW))
    return torch.where(pmask, events.to(_F) @ weights, torch.zeros(pmask.shape, dtype=_F))


def _predict(
    evaluator: Any, batch: RerankBatch, pages: torch.Tensor, weights: torch.Tensor, chunk: int, progress: bool
) -> torch.Tensor:
    """`[B, G, L]` the evaluator's predicted reward per position of pages `[B, G, L]`
    (one encoder call per request for its G pages)."""
    out = []
    with torch.inference_mode():
        for s in _chunks(batch.batch_size, chunk, progress, "evaluator"):
            part = batch.select(slice(s, s + chunk))
            out.append(evaluator.predict(part, pages[s : s + chunk]).to(_F) @ weights)
    return torch.cat(out)


def _rerank(model: Any, batch: RerankBatch, L: int, chunk: int, progress: bool) -> torch.Tensor:
    from dualrerank.decoding import check_pages

    batch.validate(k=L)
    out = []
    with torch.inference_mode():
        for s in _chunks(batch.batch_size, chunk, progress, "policy pages"):
            out.append(model.rerank(batch.select(slice(s, s + chunk)), L).long())
    pages = torch.cat(out)
    check_pages(pages, batch.candidate_mask)
    return pages


def _logging_policy(world: Any, batch: RerankBatch) -> tuple[LoggingPolicy | None, str | None]:
    """The rebuilt logging policy, or why it cannot be used: it must reproduce every logged
    propensity (float32 in the logs, so to 1e-4 relative)."""
    if world is None:
        return None, "the logs' logging policy is unknown (only the simulated world's can be rebuilt)"
    policy = LoggingPolicy.of_world(world, batch)
    assert batch.logged_page is not None and batch.propensity is not None  # _check_logs
    again = policy.page_prob(batch.logged_page.long())
    logged = batch.propensity.to(_F)
    floor = torch.finfo(torch.float32).tiny
    rel = ((again.clamp_min(floor) - logged).abs() / logged).max()
    if not bool(rel <= 1e-4):
        return None, (
            f"the world's logging policy does not reproduce the logged propensities (relative error "
            f"{float(rel):.2g}): the logs come from another policy"
        )
    return policy, None


def _truth(world: Any, state: Any, pages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`[B]` exact expected page reward of `pages` under the world's user model."""
    exp = world.expectation(state, pages)
    return (exp.click.to(_F) * weights[0] + exp.long_view.to(_F) * weights[1]).sum(-1)


def run_ope(
    cfg: OpeConfig,
    policy: str | Path,
    out: str | Path,
    *,
    evaluator: str | Path | None = None,
    run_data: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Estimate the page reward of the reranker in `policy` (a run directory or checkpoint)
    from the logs `cfg.data` names; write config.yaml, summary.json and report.md into `out`.
    `run_data` is the policy run's `data:` section (its source, path and data seed fill
    what `cfg.data` leaves unset). Returns the summary."""
    from dualrerank.models.checkpoint import load_checkpoint_of_kind
    from dualrerank.report import write_ope_report
    from dualrerank.train.runstate import prepare_run_dir

    started = time.perf_counter()
    policy, out = Path(policy), Path(out)
    model, model_name = _policy(policy)
    ev_dir = _evaluator_dir(policy, evaluator)
    reads = [policy] + ([ev_dir] if ev_dir is not None else [])
    if (out / "summary.json").exists() and not overwrite:
        raise ConfigError(
            f"--out {out} already holds an evaluation (summary.json); pass --overwrite to replace it, or choose another directory"
        )
    logs = _load_logs(cfg, run_data)
    source = logs.description.get("source", "synthetic")
    L = _check_logs(logs.batch, source)
    if cfg.data.path and Path(cfg.data.path).exists():
        reads.append(Path(cfg.data.path))
    prepare_run_dir(out, overwrite=overwrite, reads=reads)
    if overwrite:
        (out / "summary.json").unlink(missing_ok=True)
    dump_config(cfg, out / "config.yaml")

    batch = logs.batch
    B = batch.batch_size
    weights = torch.tensor([cfg.click_weight, cfg.long_view_weight], dtype=_F)
    pages = _rerank(model, batch, L, cfg.chunk_size, progress)
    assert batch.logged_page is not None and batch.propensity is not None  # _check_logs
    logged = batch.logged_page.long()
    reward = _reward(batch, weights)

    value = predicted = None
    model_reason = "no evaluator: the policy run has no evaluator/; give --evaluator DIR (a ListEvaluator checkpoint)"
    if ev_dir is not None:
        ev = load_checkpoint_of_kind(ev_dir, ("evaluator",), "a list-wise evaluator")
        both = _predict(ev, batch, torch.stack([pages, logged], 1), weights, cfg.chunk_size, progress)
        value, predicted = both[:, 0].sum(1), both[:, 1]

    logging_policy, why = _logging_policy(logs.world, batch)
    marginals = prefix = None
    if logging_policy is not None:
        prefix = logging_policy.prefix_log_prob(pages).exp()
        needs_marginals = any(e in cfg.estimators for e in ("pi", "pi_dr"))
        if needs_marginals:
            g = torch.Generator().manual_seed(cfg.seed)
            parts = []
            for s in _chunks(B, cfg.chunk_size, progress, "marginals"):
                sub = LoggingPolicy(
                    logging_policy.logits[s : s + cfg.chunk_size],
                    logging_policy.mask[s : s + cfg.chunk_size],
                    logging_policy.uniform_share,
                )
                parts.append(sub.position_marginals(pages[s : s + cfg.chunk_size].unsqueeze(1), cfg.marginal_samples, g)[:, 0])
            marginals = torch.cat(parts)
    x = deterministic_inputs(
        pages, logged, batch.propensity, reward, marginals=marginals, prefix_prob=prefix, value=value, predicted=predicted
    )
    if why is not None:
        x.position_reason = x.prefix_reason = f"needs the logging policy's item-position marginals / prefix propensities; {why}"
    x.model_reason = model_reason

    truth = None
    if logs.world is not None and logs.state is not None:
        truth = float(_truth(logs.world, logs.state, pages, weights).mean())
    estimates = estimate_all(
        x, cfg.estimators, level=cfg.level, method=cfg.interval, resamples=cfg.bootstrap_resamples, seed=cfg.seed, truth=truth
    )
    matches = int((logged == pages).all(1).sum())
    notes = [
        f"{matches:,} of {B:,} logged pages equal the policy's page of {L} positions; whole-page estimators (ips, snips, dr) "
        "need such matches, which become rare as pages get longer.",
        "logged prefixes equal to the policy's, by depth: "
        + ", ".join(f"{t + 1}: {int(c):,}" for t, c in enumerate((logged == pages).long().cumprod(1).sum(0)) if t < 6)
        + " ...",
    ]
    if why is not None:
        notes.append(f"pi, pi_dr, cascade_dr, cascade_sndr: {why}")
    if ev_dir is None:
        notes.append(model_reason)
    summary = {
        "title": f"dualrerank ope: {policy}",
        "commands": [command] if command else [],
        "policy": str(policy),
        "policy_model": model_name,
        "evaluator": str(ev_dir) if ev_dir is not None else None,
        "data": {**logs.description, "requests": B, "page_length": L},
        "reward_weights": {CLICK: cfg.click_weight, LONG_VIEW: cfg.long_view_weight},
        "logged_reward": float(reward.sum(1).mean()),
        "truth": truth,
        "estimators": estimates,
        "support_notes": notes,
        "elapsed_seconds": time.perf_counter() - started,
        "config": to_dict(cfg),
    }
    return write_ope_report(
        out, summary, {k: v for k, v in ESTIMATORS.items() if k in cfg.estimators}, level=cfg.level, interval_method=cfg.interval
    )
