"""`RerankBatch`: the one currency between data sources, models, the world and metrics.

A batch holds B requests padded to the same candidate count n. Padding is never encoded
by a magic value: `candidate_mask[b, i]` says whether candidate i of request b exists, and
`logged_page_mask[b, t]` whether logged position t exists. A *page* is a `LongTensor
[B, L]` of candidate indices (`[B, G, L]` for a group of G pages per request).

Validation happens once, at the boundary (`RerankBatch.validate`), and raises `DataError`
with one line naming the field and the request. This module depends on nothing else in
the package but `errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import cast

import numpy as np
import torch

from dualrerank.errors import DataError

__all__ = ["DataError", "Request", "RerankBatch", "collate"]


@dataclass
class Request:
    """One request before padding (numpy or list inputs are fine).

    Attributes:
        candidates: `[n, d]` float features of the n candidates (upstream score included).
        context: `[c]` float user/query context features.
        labels: optional `[n, m]` (or `[n]`) per-candidate labels, e.g. graded relevance,
            or realised click / long view for logged items (0 for unshown ones).
        item_ids: optional n integer item ids, unique within the request.
        logged_page: optional `[L]` candidate indices of the page that was shown.
        logged_feedback: optional `[L, f]` per-position feedback for `logged_page`.
        propensity: optional probability of `logged_page` under the logging policy.
        upstream_score: optional `[n]` score of the upstream ranker per candidate (also
            usually one of the features; kept apart so that upstream-sort needs no guess).
        request_id: optional name used in error messages and outputs.
    """

    candidates: np.ndarray | Sequence[Sequence[float]]
    context: np.ndarray | Sequence[float]
    labels: np.ndarray | Sequence | None = None
    item_ids: Sequence[int] | np.ndarray | None = None
    logged_page: Sequence[int] | np.ndarray | None = None
    logged_feedback: np.ndarray | Sequence | None = None
    propensity: float | None = None
    upstream_score: np.ndarray | Sequence[float] | None = None
    request_id: str | None = None


@dataclass
class RerankBatch:
    """Padded batch of B requests with explicit masks.

    Attributes:
        candidates: `[B, n, d]` float32 candidate features.
        candidate_mask: `[B, n]` bool, True where a candidate exists.
        context: `[B, c]` float32 context features.
        labels: `[B, n, m]` float32 per-candidate labels, or None.
        item_ids: `[B, n]` int64 item ids (values at padding are meaningless), or None.
        logged_page: `[B, L]` int64 candidate indices of the shown page, or None.
        logged_page_mask: `[B, L]` bool, True where the logged page has a position.
        logged_feedback: `[B, L, f]` float32 per-position feedback, or None.
        propensity: `[B]` float32 probability of the logged page, or None.
        upstream_score: `[B, n]` float32 upstream ranker score per candidate, or None.
        request_ids: B request names (for messages and outputs), or None.
        label_names: names of the m label columns.
        feedback_names: names of the f feedback columns.
    """

    candidates: torch.Tensor
    candidate_mask: torch.Tensor
    context: torch.Tensor
    labels: torch.Tensor | None = None
    item_ids: torch.Tensor | None = None
    logged_page: torch.Tensor | None = None
    logged_page_mask: torch.Tensor | None = None
    logged_feedback: torch.Tensor | None = None
    propensity: torch.Tensor | None = None
    upstream_score: torch.Tensor | None = None
    request_ids: tuple[str, ...] | None = None
    label_names: tuple[str, ...] = ()
    feedback_names: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch_size(self) -> int:
        return int(self.candidates.shape[0])

    @property
    def num_candidates(self) -> int:
        """Padded candidate count n."""
        return int(self.candidates.shape[1])

    @property
    def candidate_dim(self) -> int:
        return int(self.candidates.shape[-1])

    @property
    def context_dim(self) -> int:
        return int(self.context.shape[-1])

    @property
    def num_valid(self) -> torch.Tensor:
        """`[B]` int64 number of real candidates per request."""
        return self.candidate_mask.sum(dim=1)

    def request_name(self, b: int) -> str:
        if self.request_ids is not None and b < len(self.request_ids):
            return f"request {b} ({self.request_ids[b]!r})"
        return f"request {b}"

    # ------------------------------------------------------------------ transforms
    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device: torch.device | str) -> RerankBatch:
        return replace(self, **{k: getattr(self, k).to(device) for k in self._tensor_fields()})

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> RerankBatch:
        """Sub-batch of the requests at `index` (a slice, index list or bool mask)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
        out = {k: getattr(self, k)[index] for k in self._tensor_fields()}
        if self.request_ids is not None:
            idx = range(self.batch_size)[index] if isinstance(index, slice) else index.tolist()
            out["request_ids"] = tuple(self.request_ids[i] for i in idx)
        return replace(self, **out)

    def trim(self) -> RerankBatch:
        """Drop padding columns no request uses (after `select`, lists may be shorter than n)."""
        n_used = int(self.candidate_mask.any(dim=0).nonzero().max()) + 1 if bool(self.candidate_mask.any()) else 1
        if n_used == self.num_candidates:
            return self
        out = {
            k: getattr(self, k)[:, :n_used]
            for k in ("candidates", "candidate_mask", "labels", "item_ids", "upstream_score")
            if getattr(self, k) is not None
        }
        return replace(self, **out)

    def split(self, batch_size: int) -> list[RerankBatch]:
        """Consecutive sub-batches of at most `batch_size` requests."""
        return [self.select(slice(s, s + batch_size)) for s in range(0, self.batch_size, batch_size)]

    # ------------------------------------------------------------------ validation
    def validate(
        self,
        k: int | None = None,
        candidate_dim: int | None = None,
        context_dim: int | None = None,
    ) -> RerankBatch:
        """Check shapes, dtypes, values and masks; raise `DataError` on the first problem.

        Args:
            k: page length that will be requested; must not exceed any request's number
                of valid candidates.
            candidate_dim: expected feature width d (e.g. a model's), if known.
            context_dim: expected context width c, if known.

        Returns:
            self, so that `batch = batch.validate()` reads naturally.
        """
        _check_rank("candidates", self.candidates, 3, "[B, n, d]")
        B, n, d = self.candidates.shape
        _check_rank("candidate_mask", self.candidate_mask, 2, "[B, n]")
        if self.candidate_mask.dtype != torch.bool:
            raise DataError(f"candidate_mask: must be bool, got {self.candidate_mask.dtype}")
        if tuple(self.candidate_mask.shape) != (B, n):
            raise DataError(f"candidate_mask: shape {tuple(self.candidate_mask.shape)} != candidates' [B, n] = {(B, n)}")
        _check_rank("context", self.context, 2, "[B, c]")
        if self.context.shape[0] != B:
            raise DataError(f"context: has {self.context.shape[0]} rows for {B} requests")
        if not torch.is_floating_point(self.candidates) or not torch.is_floating_point(self.context):
            raise DataError("candidates/context: features must be floating point")
        if candidate_dim is not None and d != candidate_dim:
            raise DataError(f"candidates: feature width {d} != expected {candidate_dim}")
        if context_dim is not None and self.context.shape[1] != context_dim:
            raise DataError(f"context: width {self.context.shape[1]} != expected {context_dim}")
        if self.request_ids is not None and len(self.request_ids) != B:
            raise DataError(f"request_ids: {len(self.request_ids)} names for {B} requests")

        valid = self.candidate_mask
        bad = ~torch.isfinite(self.candidates).all(dim=2) & valid
        self._raise_first(bad.any(dim=1), "candidates", lambda b: f"NaN/inf in features of candidate {int(bad[b].nonzero()[0])}")
        bad_ctx = ~torch.isfinite(self.context).all(dim=1)
        self._raise_first(bad_ctx, "context", lambda b: "NaN/inf in context features")
        counts = valid.sum(dim=1)
        self._raise_first(counts == 0, "candidate_mask", lambda b: "no valid candidate")
        if k is not None:
            if k < 1:
                raise DataError(f"k: page length must be >= 1, got {k}")
            self._raise_first(counts < k, "k", lambda b: f"page length k={k} > {int(counts[b])} valid candidates")

        if self.item_ids is not None:
            if tuple(self.item_ids.shape) != (B, n):
                raise DataError(f"item_ids: shape {tuple(self.item_ids.shape)} != [B, n] = {(B, n)}")
            ids = self.item_ids.to(torch.int64)
            dup_value = _first_duplicate(ids, valid)
            self._raise_first(dup_value[1], "item_ids", lambda b: f"duplicate item id {int(dup_value[0][b])}")

        if self.labels is not None:
            if self.labels.dim() != 3 or tuple(self.labels.shape[:2]) != (B, n):
                raise DataError(f"labels: shape {tuple(self.labels.shape)} does not match candidates [B, n, m] with B={B}, n={n}")
            if self.label_names and len(self.label_names) != self.labels.shape[2]:
                raise DataError(f"labels: {self.labels.shape[2]} columns but {len(self.label_names)} label_names")
            bad_lab = ~torch.isfinite(self.labels).all(dim=2) & valid
            self._raise_first(
                bad_lab.any(dim=1), "labels", lambda b: f"NaN/inf label for candidate {int(bad_lab[b].nonzero()[0])}"
            )

        if self.upstream_score is not None:
            if tuple(self.upstream_score.shape) != (B, n):
                raise DataError(f"upstream_score: shape {tuple(self.upstream_score.shape)} != [B, n] = {(B, n)}")
            bad_up = ~torch.isfinite(self.upstream_score) & valid
            self._raise_first(bad_up.any(dim=1), "upstream_score", lambda b: "NaN/inf score")

        if self.logged_page is not None:
            self._validate_logged_page(B, n)
        elif self.logged_feedback is not None:
            raise DataError("logged_feedback: given without logged_page")
        propensity = self.propensity
        if propensity is not None:
            if tuple(propensity.shape) != (B,):
                raise DataError(f"propensity: shape {tuple(propensity.shape)} != [B] = {(B,)}")
            bad_p = ~((propensity > 0) & (propensity <= 1))
            self._raise_first(bad_p, "propensity", lambda b: f"must be in (0, 1], got {float(propensity[b])}")
        return self

    def _validate_logged_page(self, B: int, n: int) -> None:
        page = self.logged_page
        assert page is not None  # validate() calls this only with a logged page
        _check_rank("logged_page", page, 2, "[B, L]")
        if page.shape[0] != B:
            raise DataError(f"logged_page: has {page.shape[0]} rows for {B} requests")
        if page.dtype not in (torch.int64, torch.int32):
            raise DataError(f"logged_page: must be integer candidate indices, got {page.dtype}")
        pmask = self.logged_page_mask if self.logged_page_mask is not None else torch.ones_like(page, dtype=torch.bool)
        if tuple(pmask.shape) != tuple(page.shape) or pmask.dtype != torch.bool:
            raise DataError("logged_page_mask: must be a bool tensor shaped like logged_page")
        out_of_range = ((page < 0) | (page >= n)) & pmask
        self._raise_first(out_of_range.any(dim=1), "logged_page", lambda b: "candidate index out of range")
        safe = page.clamp(0, n - 1).to(torch.int64)
        points_to_padding = ~torch.gather(self.candidate_mask, 1, safe) & pmask
        self._raise_first(points_to_padding.any(dim=1), "logged_page", lambda b: "points at a padded (non-existent) candidate")
        self._raise_first(_first_duplicate(safe, pmask)[1], "logged_page", lambda b: "repeats a candidate")
        if self.logged_feedback is not None:
            fb = self.logged_feedback
            if fb.dim() != 3 or tuple(fb.shape[:2]) != tuple(page.shape):
                raise DataError(
                    f"logged_feedback: shape {tuple(fb.shape)} does not match logged_page [B, L, f] = {tuple(page.shape)}"
                )
            bad_fb = ~torch.isfinite(fb).all(dim=2) & pmask
            self._raise_first(bad_fb.any(dim=1), "logged_feedback", lambda b: "NaN/inf feedback")

    def _raise_first(self, bad: torch.Tensor, name: str, describe) -> None:
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise DataError(f"{name}: {describe(b)} in {self.request_name(b)}")


def _first_duplicate(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `values [B, m]`, whether two masked-in entries are equal, and one such value.

    O(m log m) per row (sort, compare neighbours) rather than O(m^2): lists of hundreds of
    candidates are common (MIND, MSLR).
    """
    if values.shape[1] < 2:
        return torch.zeros(values.shape[0], dtype=values.dtype), torch.zeros(values.shape[0], dtype=torch.bool)
    order = torch.sort(values, dim=1, stable=True).indices
    # Second, stable pass moves masked-out entries to the end without disturbing value order.
    order = torch.gather(order, 1, torch.sort((~torch.gather(mask, 1, order)).to(torch.int8), dim=1, stable=True).indices)
    v, m = torch.gather(values, 1, order), torch.gather(mask, 1, order)
    same = (v[:, 1:] == v[:, :-1]) & m[:, 1:] & m[:, :-1]
    first = same.to(torch.int8).argmax(dim=1, keepdim=True)
    return torch.gather(v[:, 1:], 1, first).squeeze(1), same.any(dim=1)


def _check_rank(name: str, t: object, rank: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{name}: expected a tensor {shape}, got {type(t).__name__}")
    if t.dim() != rank:
        raise DataError(f"{name}: expected rank {rank} {shape}, got shape {tuple(t.shape)}")


def _as_array(name: str, value: object, rank: int, req: str, dtype=np.float32) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: not a numeric array in {req} ({exc})") from None
    if arr.ndim != rank:
        raise DataError(f"{name}: expected rank {rank}, got shape {arr.shape} in {req}")
    return arr


def collate(
    requests: Sequence[Request],
    label_names: Sequence[str] = (),
    feedback_names: Sequence[str] = (),
    validate: bool = True,
) -> RerankBatch:
    """Pad variable-length requests into one `RerankBatch`.

    Candidates are padded to the longest request (mask False), logged pages to the longest
    page. All requests must agree on the feature widths and on which optional fields they
    carry. Raises `DataError` naming the offending request.
    """
    if len(requests) == 0:
        raise DataError("requests: empty list, nothing to collate")
    names = [r.request_id if r.request_id is not None else str(b) for b, r in enumerate(requests)]

    def req(b: int) -> str:
        return f"request {b} ({names[b]!r})"

    cands = [_as_array("candidates", r.candidates, 2, req(b)) for b, r in enumerate(requests)]
    ctxs = [_as_array("context", r.context, 1, req(b)) for b, r in enumerate(requests)]
    d, c = cands[0].shape[1], ctxs[0].shape[0]
    for b in range(len(requests)):
        if cands[b].shape[1] != d:
            raise DataError(f"candidates: feature width {cands[b].shape[1]} != {d} of request 0 in {req(b)}")
        if cands[b].shape[0] == 0:
            raise DataError(f"candidates: no candidate in {req(b)}")
        if ctxs[b].shape[0] != c:
            raise DataError(f"context: width {ctxs[b].shape[0]} != {c} of request 0 in {req(b)}")
    B, n = len(requests), max(x.shape[0] for x in cands)
    X = np.zeros((B, n, d), np.float32)
    M = np.zeros((B, n), bool)
    for b, x in enumerate(cands):
        X[b, : len(x)] = x
        M[b, : len(x)] = True
    out: dict = dict(candidates=torch.from_numpy(X), candidate_mask=torch.from_numpy(M), context=torch.from_numpy(np.stack(ctxs)))

    def present(attr: str) -> bool:
        has = [getattr(r, attr) is not None for r in requests]
        if any(has) and not all(has):
            b = has.index(False)
            raise DataError(f"{attr}: missing in {req(b)} while other requests have it")
        return all(has)

    if present("labels"):
        labs = []
        for b, r in enumerate(requests):
            lab = np.asarray(r.labels, np.float32)
            lab = lab[:, None] if lab.ndim == 1 else lab
            if lab.ndim != 2 or lab.shape[0] != cands[b].shape[0]:
                raise DataError(f"labels: shape {lab.shape} does not match {cands[b].shape[0]} candidates in {req(b)}")
            labs.append(lab)
        m = labs[0].shape[1]
        Y = np.zeros((B, n, m), np.float32)
        for b, lab in enumerate(labs):
            if lab.shape[1] != m:
                raise DataError(f"labels: {lab.shape[1]} columns != {m} of request 0 in {req(b)}")
            Y[b, : len(lab)] = lab
        out["labels"] = torch.from_numpy(Y)
    if present("item_ids"):
        ids_arr = np.zeros((B, n), np.int64)
        for b, r in enumerate(requests):
            ids = _as_array("item_ids", r.item_ids, 1, req(b), np.int64)
            if len(ids) != cands[b].shape[0]:
                raise DataError(f"item_ids: {len(ids)} ids for {cands[b].shape[0]} candidates in {req(b)}")
            ids_arr[b, : len(ids)] = ids
        out["item_ids"] = torch.from_numpy(ids_arr)
    if present("logged_page"):
        pages = [_as_array("logged_page", r.logged_page, 1, req(b), np.int64) for b, r in enumerate(requests)]
        L = max(len(p) for p in pages)
        P = np.zeros((B, L), np.int64)
        PM = np.zeros((B, L), bool)
        for b, p in enumerate(pages):
            P[b, : len(p)] = p
            PM[b, : len(p)] = True
        out["logged_page"], out["logged_page_mask"] = torch.from_numpy(P), torch.from_numpy(PM)
        if present("logged_feedback"):
            fbs = [_as_array("logged_feedback", r.logged_feedback, 2, req(b)) for b, r in enumerate(requests)]
            f = fbs[0].shape[1]
            F = np.zeros((B, L, f), np.float32)
            for b, fb in enumerate(fbs):
                if fb.shape != (len(pages[b]), f):
                    raise DataError(f"logged_feedback: shape {fb.shape} != ({len(pages[b])}, {f}) in {req(b)}")
                F[b, : len(fb)] = fb
            out["logged_feedback"] = torch.from_numpy(F)
    if present("upstream_score"):
        U = np.zeros((B, n), np.float32)
        for b, r in enumerate(requests):
            u = _as_array("upstream_score", r.upstream_score, 1, req(b))
            if len(u) != cands[b].shape[0]:
                raise DataError(f"upstream_score: {len(u)} scores for {cands[b].shape[0]} candidates in {req(b)}")
            U[b, : len(u)] = u
        out["upstream_score"] = torch.from_numpy(U)
    if present("propensity"):
        # present() checked that no request's propensity is None
        out["propensity"] = torch.tensor([float(cast(float, r.propensity)) for r in requests], dtype=torch.float32)
    batch = RerankBatch(
        **out,
        request_ids=tuple(names),
        label_names=tuple(label_names),
        feedback_names=tuple(feedback_names),
    )
    return batch.validate() if validate else batch
