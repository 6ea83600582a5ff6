"""Feedback: column names and units, realised gain, feedback along pages (one definition).

Every part that learns from what users did (list-generator targets, BPR pair labels,
baseline targets, evaluator targets) reads feedback through this module, so that they
agree, in particular when a source changes the unit of a column (watch time reported in
milliseconds instead of seconds, a click column reported x1000): an online stream does
exactly that (the simulated world's `utility.scale_*` and its drift segments).

**Columns.** `FEEDBACK_NAMES = (click, long_view, watch_time)`, the simulated world's
order; natural units in `NATURAL_UNITS` (one per click, one per long view, seconds).
A source may report any column in another unit; nothing here assumes the natural one.

**Realised gain** of a shown item [ours; method.md "long view > click > nothing"]: the
number of engagement levels it reached,

    gain = [click > 0] + [long_view > 0]        in {0, 1, 2}

built from binarised indicators, hence unit-free by construction: rescaling a column by
any positive factor leaves every gain unchanged. On data in natural units (0/1 clicks
and long views) it is exactly `click + long_view`, the gain the offline code used before.
Decided [ours]:
- watch time does not enter the gain (it is a reward dimension, in reported units, whose
  scale the online learner tracks); a long view without a click counts one level, as a
  click does; a missing gain column contributes nothing, but at least one must exist;
- a value > 0 means the event happened whatever its size (feedback is realised, not an
  expectation: 0.4 counts as 1, as 1000 does);
- a negative or non-finite value at a shown position is a `DataError` (no unit makes it
  feedback); values at absent positions (`logged_page_mask` False) are never read.

**Feedback along a page.** `page_feedback` reads columns by name from `logged_feedback`
(by `feedback_names`) or, without it, from `labels` (by `label_names`) gathered along
`logged_page`; `gather_along` is the gather itself, for `[B, L]` and `[B, G, L]` pages.

**Graded lists** (LETOR/MSLR/Yahoo/Istella): the graded label is the gain
(`graded_column`: the only label column, or the one named `relevance`); a model with
click and long-view heads reads it through `graded_feedback` (click = label > 0, long
view = label >= a threshold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dualrerank.errors import DataError
from dualrerank.schema import RerankBatch

__all__ = [
    "CLICK",
    "LONG_VIEW",
    "WATCH_TIME",
    "RELEVANCE",
    "FEEDBACK_NAMES",
    "NATURAL_UNITS",
    "GAIN_NAMES",
    "MAX_GAIN",
    "gather_along",
    "page_feedback",
    "occurred",
    "gain_columns",
    "realised_gain",
    "has_page_gain",
    "page_events",
    "page_gain",
    "shown_gain",
    "graded_column",
    "graded_feedback",
]

CLICK = "click"
LONG_VIEW = "long_view"
WATCH_TIME = "watch_time"
RELEVANCE = "relevance"

#: Per-position feedback columns, in the simulated world's order.
FEEDBACK_NAMES: tuple[str, ...] = (CLICK, LONG_VIEW, WATCH_TIME)
#: The natural unit of each column; a source may report another (a positive multiple).
NATURAL_UNITS: dict[str, str] = {CLICK: "1 per click", LONG_VIEW: "1 per long view", WATCH_TIME: "seconds watched"}
#: The columns whose occurrence raises the realised gain by one level each.
GAIN_NAMES: tuple[str, ...] = (CLICK, LONG_VIEW)
MAX_GAIN = len(GAIN_NAMES)

Where = Callable[[int], str]


# --------------------------------------------------------------------------- along pages


def gather_along(values: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Per-candidate columns `values [B, n, k]` along `pages [B, L]` or `[B, G, L]`:
    `[B, (G), L, k]`. Indices are clamped into range (absent positions hold any index)."""
    B, n, k = values.shape
    idx = pages.long().clamp(0, n - 1).reshape(B, -1, 1).expand(-1, -1, k)
    return values.gather(1, idx).reshape(*pages.shape, k)


def _source(batch: RerankBatch) -> tuple[str, str, tuple[str, ...]] | None:
    """(field, names field, names) that realised feedback is read from, or None."""
    if batch.logged_feedback is not None:
        return "logged_feedback", "feedback_names", tuple(batch.feedback_names)
    if batch.labels is not None:
        return "labels", "label_names", tuple(batch.label_names)
    return None


def _columns(names: Sequence[str], have: Sequence[str], field: str, names_field: str) -> list[int]:
    missing = [x for x in names if x not in have]
    if missing:
        raise DataError(f"{field}: no column named {missing[0]!r} ({names_field}={list(have)})")
    return [list(have).index(x) for x in names]


def page_feedback(batch: RerankBatch, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Realised feedback columns `names` along the logged page, in the source's units.

    Read from `logged_feedback` (by `feedback_names`), else gathered from `labels` (by
    `label_names`) along `logged_page`.

    Returns:
        values `[B, L, len(names)]` float and the logged page mask `[B, L]` bool.
    """
    if batch.logged_page is None:
        raise DataError("logged_page: missing; realised feedback needs the page that was shown")
    page = batch.logged_page.long()
    pmask = batch.logged_page_mask if batch.logged_page_mask is not None else torch.ones_like(page, dtype=torch.bool)
    src = _source(batch)
    if src is None:
        raise DataError("logged_feedback: missing, and no labels to read the realised feedback from")
    field, names_field, have = src
    cols = _columns(names, have, field, names_field)
    source = batch.logged_feedback if field == "logged_feedback" else batch.labels
    assert source is not None  # _source names a field that is present
    if field == "logged_feedback":
        return source[..., cols].float(), pmask
    return gather_along(source[..., cols].float(), page), pmask


# --------------------------------------------------------------------------- realised gain


def occurred(
    values: torch.Tensor,
    names: Sequence[str],
    valid: torch.Tensor | None = None,
    *,
    field: str = "feedback",
    where: Where | None = None,
) -> torch.Tensor:
    """Whether each event happened: `values > 0` as float 0/1, in any unit.

    Args:
        values: `[..., k]` feedback in the source's units, columns `names`.
        valid: optional bool `[...]` (e.g. `[B, L]` page mask): only these positions are
            checked; elsewhere the result is meaningless (mask it).
        field, where: for the error message (`where(b)` names request b of the first dim).
    Raises:
        DataError: a negative or non-finite value at a valid position.
    """
    if values.shape[-1] != len(names):
        raise ValueError(f"occurred: {values.shape[-1]} columns but names {list(names)}")
    bad = ~torch.isfinite(values) | (values < 0)
    if valid is not None:
        bad = bad & valid.unsqueeze(-1)
    if bool(bad.any()):
        at = bad.nonzero()[0].tolist()
        b, j = at[0], at[-1]
        req = where(b) if where is not None and values.dim() > 1 else f"request {b}"
        raise DataError(
            f"{field}: {names[j]!r} is {float(values[tuple(at)]):g} at a shown position in {req}; "
            "feedback must be finite and >= 0 (in any unit; > 0 means it happened)"
        )
    return (values > 0).float()


def gain_columns(names: Sequence[str]) -> tuple[str, ...]:
    """The gain columns (`GAIN_NAMES`) among `names`, in `GAIN_NAMES` order."""
    return tuple(x for x in GAIN_NAMES if x in names)


def realised_gain(
    values: torch.Tensor,
    names: Sequence[str],
    valid: torch.Tensor | None = None,
    *,
    field: str = "feedback",
    where: Where | None = None,
) -> torch.Tensor:
    """Realised gain `[...]` in {0, 1, 2} of items with feedback `values [..., k]` (columns
    `names`): `[click > 0] + [long_view > 0]`, unit-free (module doc). Other columns are
    ignored; at least one gain column must be among `names`. `valid`, `field`, `where`:
    as `occurred`."""
    cols = gain_columns(names)
    if not cols:
        raise DataError(
            f"{field}: no {' or '.join(map(repr, GAIN_NAMES))} column (columns {list(names)}); realised gain needs one"
        )
    idx = [list(names).index(x) for x in cols]
    return occurred(values[..., idx], cols, valid, field=field, where=where).sum(-1)


def has_page_gain(batch: RerankBatch) -> bool:
    """True where the batch logs a page and realised feedback with a gain column for it."""
    src = _source(batch)
    return batch.logged_page is not None and src is not None and bool(gain_columns(src[2]))


def page_events(batch: RerankBatch, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(happened [B, L, len(names)] float 0/1, page mask [B, L])`: `occurred` of the
    feedback columns `names` along the logged page (`page_feedback`)."""
    values, pmask = page_feedback(batch, names)
    field = "logged_feedback" if batch.logged_feedback is not None else "labels"
    return occurred(values, names, pmask, field=field, where=batch.request_name), pmask


def page_gain(batch: RerankBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gain [B, L] float in {0, 1, 2}, page mask [B, L])`: the realised gain of each
    logged position (0 at absent ones)."""
    src = _source(batch)
    cols = gain_columns(src[2]) if src is not None else ()
    if batch.logged_page is not None and src is not None and not cols:
        raise DataError(
            f"{src[0]}: no {' or '.join(map(repr, GAIN_NAMES))} column ({src[1]}={list(src[2])}); realised gain needs one"
        )
    happened, pmask = page_events(batch, cols)
    gain = happened.sum(-1)
    return torch.where(pmask, gain, torch.zeros_like(gain)), pmask


def shown_gain(batch: RerankBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gain [B, n], shown [B, n] bool)`: `page_gain` moved onto the candidates; shown =
    valid candidates at a present position of the logged page (0 gain elsewhere)."""
    gain, pmask = page_gain(batch)
    B, n = batch.candidate_mask.shape
    assert batch.logged_page is not None  # page_gain raised without one
    page = batch.logged_page.long().clamp(0, n - 1)
    gains = torch.zeros(B, n, dtype=gain.dtype, device=page.device).scatter_add(1, page, gain)
    shown = torch.zeros(B, n, dtype=torch.long, device=page.device).scatter_add(1, page, pmask.long()) > 0
    shown = shown & batch.candidate_mask
    return torch.where(shown, gains, torch.zeros_like(gains)), shown


# --------------------------------------------------------------------------- graded lists


def graded_column(batch: RerankBatch) -> torch.Tensor:
    """`[B, n]` graded relevance: the only label column, or the one named "relevance"."""
    if batch.labels is None:
        raise DataError("labels: missing; graded training needs per-candidate labels")
    m = batch.labels.shape[-1]
    if m == 1:
        return batch.labels[..., 0].float()
    if RELEVANCE in batch.label_names:
        return batch.labels[..., batch.label_names.index(RELEVANCE)].float()
    raise DataError(f"labels: {m} columns {list(batch.label_names)} and none named {RELEVANCE!r}")


def graded_feedback(relevance: torch.Tensor, long_view_min: float) -> torch.Tensor:
    """`[..., 2]` float 0/1 (click, long view) read from graded labels `relevance [...]`:
    click = label > 0, long view = label >= `long_view_min` [ours]."""
    return torch.stack([(relevance > 0).float(), (relevance >= long_view_min).float()], dim=-1)
