"""Decoders: pure functions on tensors that turn scores into pages.

A page is a `LongTensor [B, L]` of candidate indices (`[B, G, L]` for a group of G pages
per request): L distinct candidates, none of them padding. Every decoder here keeps that
promise for any `candidate_mask` with at least L valid candidates per request, and raises
`DataError` (naming the request) when a request has fewer.

- `masked_greedy`: sequential masked argmax over a precomputed position x candidate
  matrix (the NAR student's greedy decode; no further network calls) [ours, method.md 2].
- `gumbel_max_pages`: vectorised Gumbel-Max sampling of G pages at once, an exact sample of
  `P_S(pi) = prod_t softmax_{i not in pi_<t}(Z_t / temp)[pi_t]` [paper: "vectorized
  Gumbel-Max sampling"; the construction is ours, method.md 4].
- `sequential_log_prob`: per-step log-probabilities of given pages under sequential masking.
- `sort_pages`: score-and-sort (stable: ties go to the lower index).
- `beam_search`: generic beam search over additive step scores (teacher log-probs,
  evaluator gains).

Masked entries are never trusted to be -inf by the caller: selection uses
`masked_argmax`, which ranks every allowed candidate (even one scored -inf or NaN) above
every disallowed one, so a page can never pick padding or repeat an item.
Loops run over positions or beam steps only, never over requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dualrerank.errors import ConfigError, DataError

__all__ = [
    "masked_argmax",
    "gumbel_noise",
    "check_page_length",
    "check_pages",
    "placed_before",
    "masked_greedy",
    "gumbel_max_pages",
    "sequential_log_prob",
    "sort_pages",
    "beam_search",
]

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


# ---------------------------------------------------------------------------- helpers
def _selection_keys(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Scores made safe for argmax: allowed entries finite, disallowed ones -inf."""
    lowest = torch.finfo(scores.dtype).min
    finite = torch.nan_to_num(scores, nan=lowest, posinf=torch.finfo(scores.dtype).max, neginf=lowest)
    return torch.where(allowed, finite, torch.full_like(finite, float("-inf")))


def masked_argmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Index of the best allowed entry along the last dim; ties go to the lowest index.

    Args:
        scores: `[..., n]` float scores (may hold -inf/NaN; they rank lowest among allowed).
        allowed: `[..., n]` bool (broadcastable); every row needs one True entry.
    Returns:
        `[...]` int64 indices.
    """
    return _selection_keys(scores, allowed).argmax(dim=-1)


def gumbel_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise `-log(-log U)` of `shape`, drawn from `generator`."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    # U = 0 would give -inf noise, i.e. a key that can never win; clamping keeps every draw finite.
    u = u.clamp_min(torch.finfo(dtype).tiny)
    return -torch.log(-torch.log(u))


def check_page_length(candidate_mask: torch.Tensor, length: int) -> None:
    """Raise `DataError` unless `1 <= length <= ` every request's number of valid candidates."""
    if length < 1:
        raise DataError(f"k: page length must be >= 1, got {length}")
    counts = candidate_mask.sum(dim=-1)
    short = (counts < length).reshape(counts.shape[0], -1).any(dim=1)
    if bool(short.any()):
        b = int(short.nonzero()[0])
        raise DataError(f"k: page length k={length} > {int(counts[b].min())} valid candidates in request {b}")


def check_pages(pages: torch.Tensor, candidate_mask: torch.Tensor, page_mask: torch.Tensor | None = None) -> None:
    """Raise `DataError` unless every page is a list of distinct, valid candidate indices.

    Args:
        pages: `[B, L]` or `[B, G, L]` int64 candidate indices.
        candidate_mask: `[B, n]` bool.
        page_mask: optional `[B, L]` / `[B, G, L]` bool, False at positions to ignore.
    """
    if pages.dtype not in (torch.int64, torch.int32):
        raise DataError(f"pages: must be integer candidate indices, got {pages.dtype}")
    if pages.dim() not in (2, 3) or pages.shape[0] != candidate_mask.shape[0]:
        raise DataError(f"pages: expected [B, L] or [B, G, L] with B={candidate_mask.shape[0]}, got {tuple(pages.shape)}")
    n = candidate_mask.shape[1]
    p = pages if pages.dim() == 3 else pages.unsqueeze(1)
    pm = torch.ones_like(p, dtype=torch.bool) if page_mask is None else page_mask.reshape(p.shape)
    bad_range = ((p < 0) | (p >= n)) & pm
    safe = p.clamp(0, n - 1).long()
    padding = ~torch.gather(candidate_mask.unsqueeze(1).expand(-1, p.shape[1], -1), 2, safe) & pm
    L = p.shape[2]
    same = (safe.unsqueeze(3) == safe.unsqueeze(2)) & pm.unsqueeze(3) & pm.unsqueeze(2)
    same &= ~torch.eye(L, dtype=torch.bool, device=p.device)
    for bad, what in (
        (bad_range.any(dim=2), "candidate index out of range"),
        (padding.any(dim=2), "points at a padded candidate"),
        (same.any(dim=(2, 3)), "repeats a candidate"),
    ):
        if bool(bad.any()):
            b = int(bad.any(dim=1).nonzero()[0])
            raise DataError(f"pages: {what} in request {b}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: must be > 0, got {value}")


# ---------------------------------------------------------------------------- decoders
def masked_greedy(logits: torch.Tensor, candidate_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Sequential masked argmax over a precomputed logit matrix.

    Position t takes the best candidate that is valid and not placed at positions < t.
    Only tensor ops inside the loop over positions, so it traces to ONNX as is
    (`validate=False` drops the data-dependent length check for export).

    Args:
        logits: `[B, L, n]` position x candidate scores (`[B*, L, n]` with any leading dims
            works too as long as `candidate_mask` has the same leading dims).
        candidate_mask: `[B, n]` bool, True where a candidate exists.
    Returns:
        `[B, L]` int64 page.
    """
    L = logits.shape[-2]
    if validate:
        check_page_length(candidate_mask, L)
    # Sanitised once; a pick then knocks its column out of every row with one scatter,
    # the cheapest per-step update (this loop is the student's whole decode).
    keys = _selection_keys(logits, candidate_mask.unsqueeze(-2))
    picks = []
    for t in range(L):
        idx = keys[..., t, :].argmax(dim=-1)
        picks.append(idx)
        keys = keys.scatter(-1, idx[..., None, None].expand(*idx.shape, L, 1), float("-inf"))
    return torch.stack(picks, dim=-1)


def gumbel_max_pages(
    logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    group: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    include_greedy: bool = False,
) -> torch.Tensor:
    """G pages per request, each an exact sample of the sequentially masked softmax.

    Keys `Z / temp + Gumbel` are drawn for all G pages and L positions at once
    (`[B, G, L, n]`); then L masked argmax steps run on the whole tensor. Fresh noise per
    position makes step t's pick an exact draw from `softmax_{i not in pi_<t}(Z_t / temp)`,
    so the page is distributed as `P_S(pi)`.

    Args:
        logits: `[B, L, n]`.
        candidate_mask: `[B, n]` bool.
        group: G >= 1 pages per request.
        temperature: > 0; divides the logits.
        generator: source of the noise (seeded by the caller).
        include_greedy: page 0 of every group is the greedy page (no noise).
    Returns:
        `[B, G, L]` int64 pages.
    """
    if group < 1:
        raise ConfigError(f"group: must be >= 1, got {group}")
    _check_positive("temperature", temperature)
    B, L, n = logits.shape
    check_page_length(candidate_mask, L)
    noise = gumbel_noise((B, group, L, n), generator, logits.device, logits.dtype)
    if include_greedy:
        noise[:, 0] = 0.0
    keys = logits.unsqueeze(1) / temperature + noise
    mask = candidate_mask.unsqueeze(1).expand(B, group, n)
    return masked_greedy(keys, mask, validate=False)


def placed_before(pages: torch.Tensor, n: int, page_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which candidates are already placed before each position.

    Args:
        pages: `[..., L]` int64 candidate indices.
        n: candidate count.
        page_mask: optional bool like `pages`; False positions place nothing.
    Returns:
        `[..., L, n]` bool, True at `[..., t, i]` iff i sits at a counted position s < t.
    """
    onehot = torch.nn.functional.one_hot(pages.long(), n)
    if page_mask is not None:
        onehot = onehot * page_mask.unsqueeze(-1).long()
    return (onehot.cumsum(dim=-2) - onehot) > 0


def sequential_log_prob(
    logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    pages: torch.Tensor,
    page_mask: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per-step log-probabilities `log softmax_{i valid, not in pi_<t}(Z_t)[pi_t]`.

    Differentiable in `logits`. The page log-probability is the sum over t.

    Args:
        logits: `[B, L', n]` with `L' >= L` (rows beyond L are ignored).
        candidate_mask: `[B, n]` bool.
        pages: `[B, L]` or `[B, G, L]` int64.
        page_mask: optional bool like `pages`; False positions score 0 and do not count as
            placed (for variable-length logged pages).
    Returns:
        `[B, L]` or `[B, G, L]` float log-probabilities (0 at masked positions).
    """
    if validate:
        check_pages(pages, candidate_mask, page_mask)
    grouped = pages.dim() == 3
    p = pages if grouped else pages.unsqueeze(1)
    pm = None if page_mask is None else page_mask.reshape(p.shape)
    if pm is not None:
        p = torch.where(pm, p, torch.zeros_like(p))  # ignored slots may hold any filler (-1, n, ...)
    L, n = p.shape[-1], logits.shape[-1]
    if logits.shape[1] < L:
        raise DataError(f"pages: length {L} > {logits.shape[1]} rows of the logit matrix")
    allowed = candidate_mask[:, None, None, :] & ~placed_before(p, n, pm)
    masked = logits[:, None, :L, :].masked_fill(~allowed, float("-inf"))
    if pm is not None:
        # An ignored position may have nothing left to choose; a zero row keeps its
        # log-softmax (and hence every gradient) finite.
        masked = torch.where(allowed.any(-1, keepdim=True), masked, torch.zeros_like(masked))
    lp = masked.log_softmax(dim=-1).gather(-1, p.long().unsqueeze(-1)).squeeze(-1)
    if pm is not None:
        lp = torch.where(pm, lp, torch.zeros_like(lp))
    return lp if grouped else lp.squeeze(1)


def sort_pages(scores: torch.Tensor, candidate_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by score, stable (equal scores: lower index first); padding never chosen.

    Args:
        scores: `[B, n]`; NaN/-inf scores of valid candidates rank below every finite one
            but above padding.
        candidate_mask: `[B, n]` bool.
        k: page length.
    Returns:
        `[B, k]` int64.
    """
    check_page_length(candidate_mask, k)
    keys = _selection_keys(scores, candidate_mask)
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]


def _reorder_state(state: Any, index: torch.Tensor) -> Any:
    """Select rows `index` (dim 0) of every tensor in a nested tuple/list/dict state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, (tuple, list)):
        return type(state)(_reorder_state(s, index) for s in state)
    if isinstance(state, dict):
        return {k: _reorder_state(v, index) for k, v in state.items()}
    raise TypeError(f"beam_search state must hold tensors in tuples/lists/dicts, got {type(state).__name__}")


@torch.no_grad()
def beam_search(
    step_fn: StepFn,
    batch_size: int,
    num_candidates: int,
    candidate_mask: torch.Tensor,
    length: int,
    width: int,
    init_state: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search for the page maximising the sum of step scores.

    `step_fn(prefix [B*W, t], state) -> (step_scores [B*W, n], new_state)` gives the
    additive score of appending each candidate to each beam's prefix (row `b*W + w` is
    beam w of request b). This function masks padded and already-placed candidates itself.
    `state` (None, or tensors nested in tuples/lists/dicts with leading dim B*W, e.g. a KV
    cache) is reordered along dim 0 whenever beams are re-ranked; `init_state` is passed at
    step 0.

    Beams are tracked with an explicit `alive` flag: with fewer valid continuations than W
    (small requests, step 0) the spare beams are dead, never compete with live ones and are
    never returned, so no -inf arithmetic can produce NaN or an invalid page.

    Returns:
        pages `[B, L]` int64 (the best live beam) and its total score `[B]`.
    """
    if width < 1:
        raise ConfigError(f"beam_width: must be >= 1, got {width}")
    B, n, W = batch_size, num_candidates, width
    if tuple(candidate_mask.shape) != (B, n):
        raise DataError(f"candidate_mask: shape {tuple(candidate_mask.shape)} != [B, n] = {(B, n)}")
    check_page_length(candidate_mask, length)
    device = candidate_mask.device
    arange_n = torch.arange(n, device=device)
    prefix = torch.zeros(B * W, 0, dtype=torch.long, device=device)
    placed = torch.zeros(B, W, n, dtype=torch.bool, device=device)
    alive = torch.zeros(B, W, dtype=torch.bool, device=device)
    alive[:, 0] = True  # a single empty prefix: starting W copies would yield duplicate beams
    scores: torch.Tensor | None = None
    state = init_state
    for _ in range(length):
        step, state = step_fn(prefix, state)
        step = step.reshape(B, W, n)
        if scores is None:
            scores = torch.zeros(B, W, dtype=step.dtype, device=device)
        ok = alive.unsqueeze(-1) & candidate_mask.unsqueeze(1) & ~placed
        total = torch.where(ok, scores.unsqueeze(-1) + step, torch.full_like(step, float("-inf")))
        keys = _selection_keys(total, ok).reshape(B, W * n)
        top = keys.topk(W, dim=-1).indices  # [B, W]
        parent, cand = top // n, top % n
        alive = ok.reshape(B, W * n).gather(1, top)
        scores = total.reshape(B, W * n).gather(1, top)
        flat_parent = (parent + torch.arange(B, device=device).unsqueeze(1) * W).reshape(-1)
        placed = placed.reshape(B * W, n).index_select(0, flat_parent).reshape(B, W, n)
        placed = placed | (arange_n == cand.unsqueeze(-1))
        prefix = torch.cat([prefix.index_select(0, flat_parent), cand.reshape(-1, 1)], dim=1)
        state = _reorder_state(state, flat_parent)
    assert scores is not None
    best = masked_argmax(scores, alive)  # [B]; beam 0's lineage is always alive
    rows = best + torch.arange(B, device=device) * W
    return prefix.index_select(0, rows), scores.gather(1, best.unsqueeze(1)).squeeze(1)
