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
from typing import Literal

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
    eligible = pair_mask.unsqueeze(1) & ~placed_before(target.clamp(0, n - 1), n, target_mask) & finite & target_mask.unsqueeze(-1)
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


def position_weights(L: int, kind: Literal["uniform", "dcg"] = "uniform") -> torch.Tensor:
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
    mask_mode: Literal["none", "prefix"] = "none",
    unlikelihood: float = 0.0,
    target_mask: torch.Tensor | None = None,
    unlikelihood_items: Literal["prefix", "page"] = "prefix",
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
            f"kd_loss: shapes disagree: teacher {tuple(teacher_probs.shape)}, student {tuple(student_logits.shape)}, target {tuple(target.shape)}"
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
