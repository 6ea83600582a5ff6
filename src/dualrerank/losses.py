"""Training losses: pure functions on tensors, shapes in the docstrings.

Nothing here knows a model, a batch type or the world: callers pass logits, targets and
boolean masks (True = exists / allowed). Conventions shared by every function:

- B requests, n padded candidates, L page positions.
- `step_logits [B, L, n]` are per-position scores over candidates, already masked by the
  caller (padding and, for autoregressive decoders, already-placed candidates at -inf).
- Masked-out entries never produce NaN, neither in the value nor in the gradient: masked
  rows are replaced by zeros before any log-softmax so that no fully -inf row is seen.
- Every loss is a mean over the units it names (requests, positions, pairs); a batch
  with no unit to score returns a zero that is still attached to the graph.

Method references: `mle_loss` and `bpr_loss` are the AR teacher's `L_MLE + L_BPR`
(Dual-Rerank arXiv 2604.07420, Figure 2 [paper]); `kd_loss` is the sequential knowledge
distillation loss `L_KD` of method.md section 3 (exact form [ours]); the unlikelihood term
follows NAR4Rec's use of unlikelihood training against repeated items [ours to include].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dualrerank.decoding import placed_before
from dualrerank.errors import ConfigError

__all__ = [
    "listwise_softmax_ce",
    "pointwise_bce",
    "mle_loss",
    "bpr_loss",
    "kd_loss",
    "position_weights",
    "group_advantage",
    "clipped_policy_loss",
    "kl_to_reference",
]


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A 0 that keeps `backward()` valid when nothing in the batch can be scored."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t)).sum() * 0.0


def listwise_softmax_ce(scores: torch.Tensor, gains: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ListNet-style listwise softmax cross-entropy with a graded-gain target.

    The target distribution over a request's candidates is its gains normalised to sum 1,
    `y_i = g_i / sum_j g_j` over `mask`; the loss is `-sum_i y_i log softmax_mask(s)_i`,
    averaged over requests whose total gain is positive (a request with no gain carries
    no preference and is skipped rather than pushed towards uniform scores).

    Args:
        scores: `[B, n]` model scores (values at masked entries are ignored).
        gains: `[B, n]` non-negative gains (e.g. graded relevance, click + long view).
        mask: `[B, n]` bool, candidates that take part (padding and, for logs, unshown
            items excluded: unshown is not negative).

    Returns:
        scalar loss.
    """
    if bool((gains[mask] < 0).any()):
        raise ValueError("listwise_softmax_ce: gains must be non-negative")
    g = torch.where(mask, gains, torch.zeros_like(gains))
    total = g.sum(dim=1)
    rows = (total > 0) & mask.any(dim=1)
    if not bool(rows.any()):
        return _zero_like_graph(scores)
    safe = torch.where(mask, scores, torch.full_like(scores, -math.inf))
    safe = torch.where(rows.unsqueeze(1), safe, torch.zeros_like(scores))
    logp = torch.log_softmax(safe, dim=1)
    target = g / total.clamp_min(1e-12).unsqueeze(1)
    per_req = -(target * torch.where(mask, logp, torch.zeros_like(logp))).sum(dim=1)
    return per_req[rows].mean()


def pointwise_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the entries where `mask` is True.

    Args:
        logits: any shape `[...]`.
        targets: same shape, values in [0, 1] (soft targets allowed).
        mask: same shape (or broadcastable), bool.

    Returns:
        scalar loss (0 attached to the graph when the mask is empty).
    """
    mask = mask.expand_as(logits)
    if not bool(mask.any()):
        return _zero_like_graph(logits)
    per = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return per[mask].mean()


def mle_loss(
    step_logits: torch.Tensor,
    target: torch.Tensor,
    target_mask: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced negative log-likelihood of a target list.

    `-sum_{b,t} w_b m_bt log softmax(step_logits[b, t])[target[b, t]] / sum_{b,t} w_b m_bt`:
    the weights are *relative* (scaling all of them leaves the loss unchanged), which is
    what reward-weighted MLE needs.

    Args:
        step_logits: `[B, L, n]` logits at each step, already masked (-inf allowed).
        target: `[B, L]` candidate index to place at each step.
        target_mask: `[B, L]` bool, True where position t of the target exists.
        weights: `[B]` non-negative per-request weights, or None (all 1).

    Returns:
        scalar loss.
    """
    B, L, n = step_logits.shape
    w = torch.ones(B, dtype=step_logits.dtype, device=step_logits.device) if weights is None else weights.to(step_logits.dtype)
    m = target_mask.to(step_logits.dtype) * w.unsqueeze(1)
    if not bool((m > 0).any()):
        return _zero_like_graph(step_logits)
    safe = torch.where(target_mask.unsqueeze(-1), step_logits, torch.zeros_like(step_logits))
    logp = torch.log_softmax(safe, dim=-1).gather(-1, target.clamp(0, n - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(target_mask, logp, torch.zeros_like(logp))
    return -(m * logp).sum() / m.sum()


def bpr_loss(
    step_logits: torch.Tensor,
    target: torch.Tensor,
    target_mask: torch.Tensor,
    labels: torch.Tensor,
    pair_mask: torch.Tensor,
    num_pairs: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pairwise BPR term over not-yet-placed labelled candidates at each step.

    At every valid step t of the teacher-forced target, `num_pairs` pairs are sampled
    independently: a positive uniformly among the eligible candidates that have some
    eligible candidate with a strictly lower label, then a negative uniformly among the
    eligible candidates with a strictly lower label than it. Eligible = `pair_mask`, not
    placed at a step before t, finite logit. Loss `-log sigmoid(s_pos - s_neg)`, averaged
    over the sampled pairs that exist.

    Args:
        step_logits: `[B, L, n]` step scores (already-placed / padded entries may be -inf).
        target: `[B, L]` teacher-forced list (defines what is placed before each step).
        target_mask: `[B, L]` bool.
        labels: `[B, n]` float labels (higher is better).
        pair_mask: `[B, n]` bool, candidates with a label (e.g. shown items of a log).
        num_pairs: pairs sampled per step (>= 1).
        generator: RNG for the sampling.

    Returns:
        scalar loss.
    """
    if num_pairs < 1:
        raise ValueError(f"bpr_loss: num_pairs must be >= 1, got {num_pairs}")
    B, L, n = step_logits.shape
    finite = torch.isfinite(step_logits)
    eligible = (
        pair_mask.unsqueeze(1) & ~placed_before(target.clamp(0, n - 1), n, target_mask) & finite & target_mask.unsqueeze(-1)
    )
    lab = labels.unsqueeze(1).expand(B, L, n)
    lowest = torch.where(eligible, lab, torch.full_like(lab, math.inf)).amin(dim=-1, keepdim=True)
    pos_ok = eligible & (lab > lowest)  # [B, L, n]
    has_pair = pos_ok.any(dim=-1)  # [B, L]
    if not bool(has_pair.any()):
        return _zero_like_graph(step_logits)

    device = step_logits.device
    # Uniform choice among allowed entries = argmax of uniform keys with disallowed at -1.
    keys = torch.rand(B, L, num_pairs, n, generator=generator, device=device)
    pos = torch.where(pos_ok.unsqueeze(2), keys, torch.full_like(keys, -1.0)).argmax(dim=-1)  # [B, L, P]
    pos_label = lab.gather(-1, pos)  # [B, L, P]
    neg_ok = eligible.unsqueeze(2) & (lab.unsqueeze(2) < pos_label.unsqueeze(-1))  # [B, L, P, n]
    keys = torch.rand(B, L, num_pairs, n, generator=generator, device=device)
    neg = torch.where(neg_ok, keys, torch.full_like(keys, -1.0)).argmax(dim=-1)

    s = torch.where(finite, step_logits, torch.zeros_like(step_logits))
    diff = s.gather(-1, pos) - s.gather(-1, neg)
    valid = has_pair.unsqueeze(-1).expand_as(diff)
    return -F.logsigmoid(diff[valid]).mean()


def position_weights(L: int, kind: str = "uniform") -> torch.Tensor:
    """Per-position weights `[L]` summing to 1.

    `uniform`: 1/L each. `dcg`: the DCG discount `1 / log2(t + 1)` for t = 1..L, normalised.
    """
    if L < 1:
        raise ConfigError(f"position_weights: page length must be >= 1, got {L}")
    if kind == "uniform":
        w = torch.ones(L)
    elif kind == "dcg":
        w = 1.0 / torch.log2(torch.arange(2, L + 2, dtype=torch.float32))
    else:
        raise ConfigError(f"position_weights: kind {kind!r} is not one of ['uniform', 'dcg']")
    return w / w.sum()


def kd_loss(
    teacher_probs: torch.Tensor,
    student_logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    target: torch.Tensor,
    tau: float = 1.0,
    alpha: float = 0.0,
    position_weights: torch.Tensor | None = None,
    mask_mode: str = "none",
    unlikelihood: float = 0.0,
    target_mask: torch.Tensor | None = None,
    unlikelihood_items: str = "prefix",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequential knowledge distillation loss (method.md section 3).

    `L_KD = sum_t w_t tau^2 KL(q_t || p_t) + alpha sum_t w_t CE(p_t, y_t)
            + unlikelihood * sum_t w_t sum_{i in y_<t} -log(1 - p_t[i])`,
    averaged over requests, with `p_t = softmax(Z_t / tau)` over the valid candidates
    (`mask_mode="none"`) or over the valid candidates not in the teacher prefix `y_<t`
    (`mask_mode="prefix"`; the unlikelihood term is then 0 by construction). The hard
    term uses the same `p_t` (at temperature tau), as written in method.md.

    Args:
        teacher_probs: `[B, L, n]` teacher step distributions q_t along the path y (rows
            sum to 1; zero on padding and on the teacher prefix). Not differentiated.
        student_logits: `[B, L, n]` student logit matrix Z (values at padding ignored).
        candidate_mask: `[B, n]` bool.
        target: `[B, L]` the teacher path y (candidate indices).
        tau: distillation temperature (> 0).
        alpha: weight of the hard cross-entropy term on y.
        position_weights: `[L]` weights w_t, or None for uniform 1/L.
        mask_mode: "none" or "prefix" (see above).
        unlikelihood: weight of the unlikelihood term on the teacher prefix.
        target_mask: `[B, L]` bool positions that exist (default: all).
        unlikelihood_items: "prefix" (items the teacher placed before t) or "page" (every
            item of the teacher's page except y_t: an unmasked row must also not peak on an
            item that belongs to a later position, the other half of a collision).

    Returns:
        (loss scalar, parts) with parts `kl`, `ce`, `unlikelihood` (detached, each already
        position-weighted and averaged over requests, before tau^2 / alpha / coefficient).
    """
    if tau <= 0:
        raise ConfigError(f"kd_loss: tau must be > 0, got {tau}")
    if mask_mode not in ("none", "prefix"):
        raise ConfigError(f"kd_loss: mask_mode {mask_mode!r} is not one of ['none', 'prefix']")
    if unlikelihood_items not in ("prefix", "page"):
        raise ConfigError(f"kd_loss: unlikelihood_items {unlikelihood_items!r} is not one of ['prefix', 'page']")
    B, L, n = student_logits.shape
    if teacher_probs.shape != student_logits.shape or tuple(target.shape) != (B, L):
        raise ValueError(
            f"kd_loss: shapes disagree: teacher {tuple(teacher_probs.shape)}, student {tuple(student_logits.shape)}, "
            f"target {tuple(target.shape)}"
        )
    tmask = torch.ones(B, L, dtype=torch.bool, device=target.device) if target_mask is None else target_mask
    w = (torch.full((L,), 1.0 / L) if position_weights is None else position_weights).to(student_logits)
    wt = w.unsqueeze(0) * tmask.to(student_logits.dtype)  # [B, L]

    prefix = placed_before(target.clamp(0, n - 1), n, tmask)  # [B, L, n]
    allowed = candidate_mask.unsqueeze(1).expand(B, L, n)
    if mask_mode == "prefix":
        allowed = allowed & ~prefix
    # Rows of absent positions are fully allowed so the log-softmax never sees an all -inf row.
    allowed = allowed | ~tmask.unsqueeze(-1)
    z = torch.where(allowed, student_logits / tau, torch.full_like(student_logits, -math.inf))
    logp = torch.log_softmax(z, dim=-1)
    logp_safe = torch.where(allowed, logp, torch.zeros_like(logp))

    q = teacher_probs.detach().to(student_logits.dtype)
    pos_q = q > 0
    if bool((pos_q & ~allowed).any()):
        raise ValueError("kd_loss: teacher puts mass where the student distribution is masked (padding or prefix)")
    logq = torch.log(torch.where(pos_q, q, torch.ones_like(q)))
    kl_t = torch.where(pos_q, q * (logq - logp_safe), torch.zeros_like(q)).sum(dim=-1)  # [B, L]

    ce_t = -logp_safe.gather(-1, target.clamp(0, n - 1).unsqueeze(-1)).squeeze(-1)

    if unlikelihood > 0 and mask_mode == "none":
        p = logp_safe.exp().clamp(max=1.0 - 1e-6)
        penalised = prefix
        if unlikelihood_items == "page":
            on_page = torch.zeros(B, n, dtype=torch.bool, device=target.device)
            on_page.scatter_(1, target.clamp(0, n - 1), tmask)
            own = torch.nn.functional.one_hot(target.clamp(0, n - 1), n).bool()
            penalised = on_page.unsqueeze(1) & ~own
        ul = torch.where(penalised & allowed, -torch.log1p(-p), torch.zeros_like(p)).sum(dim=-1)
    else:
        ul = torch.zeros_like(kl_t)

    kl = (wt * kl_t).sum(dim=1).mean()
    ce = (wt * ce_t).sum(dim=1).mean()
    ul_mean = (wt * ul).sum(dim=1).mean()
    loss = tau * tau * kl + alpha * ce + unlikelihood * ul_mean
    return loss, {"kl": kl.detach(), "ce": ce.detach(), "unlikelihood": ul_mean.detach()}


# --------------------------------------------------------------------------- policy loss
# The RL core shared by GRPO, Dr. GRPO, GDPO and LDRO (method.md section 4): the methods
# differ only in how the reward vector becomes an advantage (`group_advantage`), in the
# position weights and in the anchor; the clipped ratio (`clipped_policy_loss`) and the KL
# estimator (`kl_to_reference`) are the same for all. Nothing here knows how pages were
# sampled or scored.


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int, keepdim: bool = True) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(dim, keepdim=keepdim) / m.sum(dim, keepdim=keepdim).clamp_min(1.0)


def _masked_std(x: torch.Tensor, mask: torch.Tensor, dim: int, mean: torch.Tensor) -> torch.Tensor:
    # Population std over the masked entries (TRL's GRPO uses the sample std; with G >= 8
    # the two differ by under 7%, and the population form is 0, not NaN, for one entry).
    return _masked_mean((x - mean) ** 2, mask, dim).sqrt()


def group_advantage(
    rewards: torch.Tensor,
    coef: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    combine: str = "before",
    scale: str = "group_std",
    stream_scale: torch.Tensor | None = None,
    batch_norm: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantages of G pages per request from their D-dimensional rewards.

    - `combine="before"`: the weighted sum `r = sum_d coef_d r_d` is centred within its
      group and divided by the group's std (`scale="group_std"`: GRPO), by nothing
      (`"none"`: Dr. GRPO) or by `stream_scale[0]` (`"stream"`: one combined reward with a
      running scale, the `ldro_no_dims` ablation).
    - `combine="after"`: each dimension is centred within its group separately and
      divided by its own group std (`"group_std"`: GDPO before its batch norm,
      `ldro_group_std`), by nothing, or by its stream scale `stream_scale[d]` (`"stream"`:
      LDRO's double decoupling), then weighted by `coef` and summed.
    - `batch_norm`: finally z-score the advantages over every valid page of the batch (GDPO).

    Pages that are not `valid`, or whose reward has a NaN/inf entry, get advantage 0 and are
    left out of every mean and std. A group with fewer than two such pages, or whose
    rewards are equal in every dimension, gets advantage 0 (never NaN).

    Args:
        rewards: `[B, G, D]` reward vectors.
        coef: `[D]` weights (LDRO: the calibrated `c_d`; others: the user's `lambda_d`).
        valid: `[B, G]` bool pages to use (default: all).
        stream_scale: `[D]` (`combine="after"`) or `[1]` (`combine="before"`) running scales
            for `scale="stream"`.
    Returns:
        (advantage `[B, G]`, diagnostics): `zero_spread_groups` (count), `masked_pages`
        (count of non-finite rewards), `dim_share` `[D]` (each dimension's share of the mean
        absolute advantage before any batch norm; sums to 1 when any advantage is non-zero).
    """
    B, G, D = rewards.shape
    if coef.shape != (D,):
        raise ValueError(f"group_advantage: coef has shape {tuple(coef.shape)}, rewards have D={D}")
    ok = torch.isfinite(rewards).all(-1)
    masked_pages = (~ok & (valid if valid is not None else torch.ones_like(ok))).sum()
    ok = ok & (valid if valid is not None else True)
    r = torch.where(ok.unsqueeze(-1), rewards, torch.zeros_like(rewards))
    okd = ok.unsqueeze(-1)
    coef = coef.to(r)
    if combine == "before":
        x = (r * coef).sum(-1, keepdim=True)  # [B, G, 1]
        parts = r * coef  # for dim_share only
    elif combine == "after":
        x, parts = r, None
    else:
        raise ConfigError(f"group_advantage: combine {combine!r} is not one of ['before', 'after']")
    mean = _masked_mean(x, okd.expand_as(x), 1)
    centred = torch.where(okd, x - mean, torch.zeros_like(x))
    if scale == "group_std":
        s = _masked_std(x, okd.expand_as(x), 1, mean)
    elif scale == "none":
        s = torch.ones_like(mean)
    elif scale == "stream":
        if stream_scale is None or stream_scale.numel() != x.shape[-1]:
            raise ValueError(f"group_advantage: scale='stream' needs stream_scale of {x.shape[-1]} entries")
        s = stream_scale.to(x).reshape(1, 1, -1).expand_as(mean)
    else:
        raise ConfigError(f"group_advantage: scale {scale!r} is not one of ['group_std', 'none', 'stream']")
    z = centred / (s + eps)
    if combine == "after":
        contrib = z * coef  # [B, G, D]
        adv = contrib.sum(-1)
    else:
        adv = z.squeeze(-1)
        assert parts is not None  # set by combine == "before"
        # The share of each dimension in the combined advantage: its part of the centred sum.
        pmean = _masked_mean(parts, okd.expand_as(parts), 1)
        contrib = torch.where(okd, parts - pmean, torch.zeros_like(parts)) / (s + eps)
    n_ok = ok.sum(1)
    # Spread per dimension, not only in the weighted sum: a group whose pages tie in every
    # dimension carries no signal whatever the weights.
    rmean = _masked_mean(r, okd.expand_as(r), 1)
    spread = (torch.where(okd, r - rmean, torch.zeros_like(r)).abs() > 0).any(-1).any(-1)  # [B]
    dead = (n_ok < 2) | ~spread
    adv = torch.where(dead.unsqueeze(1) | ~ok, torch.zeros_like(adv), adv)
    contrib = torch.where((dead.unsqueeze(1) | ~ok).unsqueeze(-1), torch.zeros_like(contrib), contrib)
    share = contrib.abs().sum((0, 1))
    share = share / share.sum().clamp_min(1e-12)
    if batch_norm:
        live = ok & ~dead.unsqueeze(1)
        if bool(live.any()):
            m = adv[live].mean()
            sd = adv[live].std(unbiased=False)
            adv = torch.where(live, (adv - m) / (sd + eps), torch.zeros_like(adv))
    zero_spread = ((n_ok >= 2) & ~spread).sum()
    return adv.detach(), {"zero_spread_groups": zero_spread, "masked_pages": masked_pages, "dim_share": share.detach()}


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantage: torch.Tensor,
    position_weights: torch.Tensor,
    page_mask: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate over per-position ratios, weighted by position.

    `L = -mean_{valid (b,g)} sum_t w_t min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)` with
    `rho_t = exp(logp_t - old_logp_t)`; uniform `w` and a page-level advantage give GRPO's
    token-level objective, DCG weights give LDRO's rank-weighted policy.

    Args:
        logp: `[B, G, L]` per-step log-probabilities of the sampled pages under the current
            policy (differentiable).
        old_logp: `[B, G, L]` the same under the policy that sampled them (no gradient).
        advantage: `[B, G]`.
        position_weights: `[L]` (summing to 1).
        page_mask: `[B, G, L]` bool positions that exist (default: all).
        valid: `[B, G]` bool pages that count (default: all).
        clip_eps: the clip range eps (> 0).
    Returns:
        (loss, diagnostics): `clipfrac` (share of counted positions whose ratio was clipped
        in the direction that stops the gradient), `approx_kl` (mean of
        `(rho - 1) - log rho` over counted positions, Schulman's k3 estimator of
        KL(old || new)), `ess` (effective sample size of the page-level importance weights
        as a share of the counted pages), `ratio_max`.
    """
    if clip_eps <= 0:
        raise ConfigError(f"clip_eps: must be > 0, got {clip_eps}")
    B, G, L = logp.shape
    pm = torch.ones_like(logp, dtype=torch.bool) if page_mask is None else page_mask
    vm = torch.ones(B, G, dtype=torch.bool, device=logp.device) if valid is None else valid
    count = pm & vm.unsqueeze(-1)
    diff = torch.where(count, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = diff.exp()
    A = advantage.detach().unsqueeze(-1).to(logp)
    unclipped = ratio * A
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * A
    surrogate = torch.minimum(unclipped, clipped)
    w = position_weights.to(logp).reshape(1, 1, L)
    per_page = (w * torch.where(count, surrogate, torch.zeros_like(surrogate))).sum(-1)  # [B, G]
    n_pages = vm.sum().clamp_min(1)
    loss = -(per_page * vm.to(logp)).sum() / n_pages
    with torch.no_grad():
        n_pos = count.sum().clamp_min(1)
        was_clipped = (clipped < unclipped) & count
        clipfrac = was_clipped.sum() / n_pos
        approx_kl = torch.where(count, (ratio - 1.0) - diff, torch.zeros_like(diff)).sum() / n_pos
        page_w = diff.sum(-1).exp()[vm]
        ess = (
            (page_w.sum() ** 2 / (page_w.pow(2).sum() * page_w.numel()).clamp_min(1e-12)) if page_w.numel() else torch.tensor(1.0)
        )
        ratio_max = ratio[count].max() if bool(count.any()) else torch.tensor(1.0)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "ess": ess, "ratio_max": ratio_max}


def kl_to_reference(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    position_weights: torch.Tensor,
    page_mask: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(policy || reference) estimated on the sampled pages with the k3 estimator
    `exp(ref - logp) - (ref - logp) - 1` per position (non-negative, unbiased; the form
    GRPO uses), position-weighted and averaged over counted pages. Differentiable in `logp`.

    Shapes as `clipped_policy_loss`; `ref_logp` gets no gradient.
    """
    B, G, L = logp.shape
    pm = torch.ones_like(logp, dtype=torch.bool) if page_mask is None else page_mask
    vm = torch.ones(B, G, dtype=torch.bool, device=logp.device) if valid is None else valid
    count = pm & vm.unsqueeze(-1)
    d = torch.where(count, ref_logp.detach() - logp, torch.zeros_like(logp))
    k3 = d.exp() - d - 1.0
    w = position_weights.to(logp).reshape(1, 1, L)
    return ((w * k3).sum(-1) * vm.to(logp)).sum() / vm.sum().clamp_min(1)
