"""MIND news impressions (behaviors.tsv + news.tsv) -> `RerankBatch`.

behaviors.tsv, no header, tab-separated: impression id, user id, time
("11/12/2019 2:14:46 PM"), click history (space-separated news ids, may be empty),
impressions ("N123-1 N456-0 ...": shown news id, then 1 clicked / 0 not).
news.tsv, no header, tab-separated: news id, category, subcategory, title, abstract, url,
title entities, abstract entities (only the first three are read).

One impression = one request. Candidates are the impressed items in shown order, and the
logged page is that whole order (`logged_page[b] = 0..n_b-1`) with its clicks as
`logged_feedback [B, L, 1]` and as `labels [B, n, 1]` ("click"); `item_ids` are the
numbers of the news ids (N123 -> 123); `request_ids` the impression ids.

Candidate features, `[B, n, Wc + Ws + 8]` (names: `mind_feature_names`):
- category and subcategory one-hot, hashed (crc32) into `category_buckets` and
  `subcategory_buckets` columns so the width never depends on the news file; all zero
  for an item news.tsv lacks, with `known` = 0;
- popularity, leave-one-out over the loaded file: impressions and clicks of the item in
  all *other* impressions (log1p), their smoothed click-through rate, and log1p of the
  number of users whose click history holds the item. The request's own clicks never
  reach its features; other impressions, later ones included, do: counts are
  transductive over the file (load train and test files separately to keep them apart);
- history overlap: item in the user's click history, share of the history's known items
  with the same category, and with the same subcategory.
Context `[B, 5]`: log1p(history length), share of history items news.tsv knows,
log1p(number of candidates), sin and cos of the hour of day.
`upstream_score` is a popularity score: the smoothed leave-one-out CTR by default.
Every malformed line raises `DataError` naming the file and the line number.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from dualrerank.config import option
from dualrerank.data import DataWarning
from dualrerank.errors import ConfigError, DataError
from dualrerank.schema import RerankBatch

__all__ = ["MindOptions", "load_mind", "mind_feature_names", "CONTEXT_NAMES"]

CONTEXT_NAMES = ("log1p_history_len", "history_known_share", "log1p_num_candidates", "hour_sin", "hour_cos")
_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
_NEWS_ID = re.compile(r"N\d+")
_IMPRESSIONS = re.compile(r"N\d+-[01](?:\s+N\d+-[01])*")
_HISTORY = re.compile(r"(?:N\d+(?:\s+N\d+)*)?")


@dataclass
class MindOptions:
    """How MIND impressions become a `RerankBatch`."""

    category_buckets: int = option(32, "hashed one-hot width of the news category")
    subcategory_buckets: int = option(32, "hashed one-hot width of the news subcategory")
    ctr_prior: float = option(20.0, "pseudo-impressions of the smoothed CTR (it shrinks towards the file's mean CTR)")
    upstream: str = option(
        "ctr",
        "upstream_score: leave-one-out smoothed 'ctr', or log1p 'clicks' or 'impressions'",
        choices=("ctr", "clicks", "impressions"),
    )
    max_candidates: int | None = option(None, "keep only the first K impressed items of each impression; None keeps all")

    def __post_init__(self) -> None:
        for name in ("category_buckets", "subcategory_buckets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mind.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.ctr_prior > 0:
            raise ConfigError(f"mind.ctr_prior: must be > 0, got {self.ctr_prior}")
        if self.upstream not in ("ctr", "clicks", "impressions"):
            raise ConfigError(f"mind.upstream: {self.upstream!r} is not one of ['ctr', 'clicks', 'impressions']")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ConfigError(f"mind.max_candidates: must be >= 1, got {self.max_candidates}")


def mind_feature_names(options: MindOptions | None = None) -> list[str]:
    """Names of the candidate feature columns, in order."""
    o = options or MindOptions()
    return (
        [f"category_hash_{i}" for i in range(o.category_buckets)]
        + [f"subcategory_hash_{i}" for i in range(o.subcategory_buckets)]
        + [
            "known",
            "log1p_impressions_loo",
            "log1p_clicks_loo",
            "ctr_loo",
            "log1p_history_users",
            "in_history",
            "history_same_category",
            "history_same_subcategory",
        ]
    )


# ---------------------------------------------------------------------------- files
def _files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        behaviors, news = path / "behaviors.tsv", path / "news.tsv"
    elif path.is_file():
        behaviors, news = path, path.with_name("news.tsv")
    else:
        raise DataError(f"{path}: no such file or folder")
    if not behaviors.is_file():
        raise DataError(f"{path}: no behaviors.tsv in this folder")
    return behaviors, (news if news.is_file() and news != behaviors else None)


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    for lineno, raw in enumerate(text.split("\n"), 1):
        raw = raw.rstrip("\r")
        if raw.strip():
            yield lineno, raw


def _bad_token(field: str, pattern: re.Pattern) -> str:
    return next((t for t in field.split() if not pattern.fullmatch(t)), field)


@dataclass
class _Behaviors:
    lines: np.ndarray  # [B] line numbers
    impression_ids: list[str]
    users: np.ndarray  # [B] int64 user codes
    hours: np.ndarray  # [B] float64 hour of day
    hist_imp: np.ndarray  # [H] impression of each history entry
    hist_item: np.ndarray  # [H] news number
    row_imp: np.ndarray  # [R] impression of each impressed item
    row_pos: np.ndarray  # [R] position in the impression
    row_item: np.ndarray  # [R] news number
    row_click: np.ndarray  # [R] 0/1


def _parse_behaviors(path: Path) -> _Behaviors:
    lines, imp_ids, users, hours, hists, imps = [], [], [], [], [], []
    for lineno, raw in _lines(path):
        where = f"{path}:{lineno}"
        f = raw.split("\t")
        if len(f) != 5:
            raise DataError(
                f"{where}: expected 5 tab-separated fields (impression id, user id, time, history, impressions), got {len(f)}"
            )
        imp_id, user, time_s, hist, imp = (x.strip() for x in f)
        if not imp_id or not user:
            raise DataError(f"{where}: empty {'impression' if not imp_id else 'user'} id")
        try:
            t = datetime.strptime(time_s, _TIME_FORMAT)
        except ValueError:
            raise DataError(f"{where}: bad time {time_s!r}, expected e.g. '11/12/2019 2:14:46 PM'") from None
        if not _HISTORY.fullmatch(hist):
            raise DataError(f"{where}: bad news id {_bad_token(hist, _NEWS_ID)!r} in the click history")
        if not imp:
            raise DataError(f"{where}: no impressed items")
        if not _IMPRESSIONS.fullmatch(imp):
            tok = _bad_token(imp, re.compile(r"N\d+-[01]"))
            why = (
                "has no -1/-0 click label (unlabelled MIND test files cannot be loaded)"
                if _NEWS_ID.fullmatch(tok)
                else "is not <news id>-<0|1>"
            )
            raise DataError(f"{where}: impressed item {tok!r} {why}")
        lines.append(lineno)
        imp_ids.append(imp_id)
        users.append(user)
        hours.append(t.hour + t.minute / 60 + t.second / 3600)
        hists.append(hist)
        imps.append(imp)
    if not lines:
        raise DataError(f"{path}: no impressions in the file")

    try:
        h_counts = np.fromiter((h.count("N") for h in hists), np.int64, len(hists))
        hist_item = np.asarray(" ".join(hists).replace("N", " ").split(), dtype=np.int64)
        i_counts = np.fromiter((s.count("-") for s in imps), np.int64, len(imps))
        pairs = np.asarray(" ".join(imps).replace("N", " ").replace("-", " ").split(), dtype=np.int64).reshape(-1, 2)
    except OverflowError:
        raise DataError(f"{path}: a news id number does not fit in 64 bits") from None
    B = len(lines)
    row_imp = np.repeat(np.arange(B), i_counts)
    starts = np.concatenate([[0], np.cumsum(i_counts)[:-1]])
    row_item = pairs[:, 0]
    key = np.lexsort((row_item, row_imp))
    dup = (row_imp[key][1:] == row_imp[key][:-1]) & (row_item[key][1:] == row_item[key][:-1])
    if dup.any():
        r = int(key[1:][dup][0])
        raise DataError(
            f"{path}:{lines[row_imp[r]]}: item N{row_item[r]} is impressed twice in impression {imp_ids[row_imp[r]]!r}"
        )
    _, user_codes = np.unique(np.asarray(users), return_inverse=True)
    return _Behaviors(
        lines=np.asarray(lines),
        impression_ids=imp_ids,
        users=user_codes,
        hours=np.asarray(hours),
        hist_imp=np.repeat(np.arange(B), h_counts),
        hist_item=hist_item,
        row_imp=row_imp,
        row_pos=np.arange(len(row_imp)) - starts[row_imp],
        row_item=row_item,
        row_click=pairs[:, 1].astype(np.float64),
    )


def _parse_news(path: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Sorted news numbers `[K]` with their category and subcategory strings."""
    info: dict[int, tuple[str, str, int]] = {}
    for lineno, raw in _lines(path):
        where = f"{path}:{lineno}"
        f = raw.split("\t")
        if len(f) < 3:
            raise DataError(f"{where}: expected tab-separated news id, category, subcategory, ...; got {len(f)} field(s)")
        nid, cat, sub = f[0].strip(), f[1].strip(), f[2].strip()
        if not _NEWS_ID.fullmatch(nid):
            raise DataError(f"{where}: bad news id {nid!r}, expected N<number>")
        if not cat:
            raise DataError(f"{where}: empty category for {nid}")
        num = int(nid[1:])
        if num in info and info[num][:2] != (cat, sub):
            raise DataError(f"{where}: {nid} was already read at line {info[num][2]} with another category")
        info.setdefault(num, (cat, sub, lineno))
    ids = np.asarray(sorted(info), dtype=np.int64)
    return ids, [info[i][0] for i in ids.tolist()], [info[i][1] for i in ids.tolist()]


# ---------------------------------------------------------------------------- features
def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: float = 0.0) -> np.ndarray:
    """values[j] where sorted_keys[j] == query, else default; vectorised."""
    if len(sorted_keys) == 0:
        return np.full(len(query), default, dtype=np.float64)
    j = np.clip(np.searchsorted(sorted_keys, query), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[j] == query, values[j], default)


def _codes(strings: list[str]) -> tuple[list[str], np.ndarray]:
    vocab, codes = np.unique(np.asarray(strings, dtype=object).astype(str), return_inverse=True)
    return list(vocab), codes


def load_mind(path: str | Path, options: MindOptions | None = None) -> RerankBatch:
    """Read MIND impressions into one validated `RerankBatch`.

    Args:
        path: folder with behaviors.tsv (and news.tsv), or the behaviors.tsv file itself
            (news.tsv is then looked up beside it; without it every item is unknown).
        options: see `MindOptions`.

    Returns:
        `RerankBatch`: candidates `[B, n, Wc + Ws + 8]`, context `[B, 5]`, labels and
        logged_feedback `[B, n, 1]` "click", logged_page `[B, n]` (the shown order),
        item_ids `[B, n]`, upstream_score `[B, n]`, request_ids = impression ids.
    """
    o = options or MindOptions()
    behaviors_path, news_path = _files(Path(path))
    bh = _parse_behaviors(behaviors_path)
    news_ids, cats, subs = _parse_news(news_path) if news_path is not None else (np.zeros(0, np.int64), [], [])
    B = len(bh.lines)
    R = len(bh.row_item)

    # news attributes per news row: exact codes (for history overlap) and hash buckets
    cat_vocab, cat_code = _codes(cats) if cats else ([], np.zeros(0, np.int64))
    sub_vocab, sub_code = _codes(subs) if subs else ([], np.zeros(0, np.int64))
    cat_bucket = np.asarray([zlib.crc32(c.encode()) % o.category_buckets for c in cat_vocab], np.int64)
    sub_bucket = np.asarray([zlib.crc32(s.encode()) % o.subcategory_buckets for s in sub_vocab], np.int64)
    news_row = np.arange(len(news_ids))
    item_news = _lookup(news_ids, news_row, bh.row_item, -1).astype(np.int64)  # [R], -1 unknown
    known = item_news >= 0
    hist_news = _lookup(news_ids, news_row, bh.hist_item, -1).astype(np.int64)  # [H]
    hist_known = hist_news >= 0

    # leave-one-out popularity over the file
    click = bh.row_click
    uniq, inv = np.unique(bh.row_item, return_inverse=True)
    imps_other = np.bincount(inv, minlength=len(uniq))[inv] - 1.0
    clicks_other = np.bincount(inv, weights=click, minlength=len(uniq))[inv] - click
    mean_ctr = click.sum() / max(R, 1)
    ctr = (clicks_other + o.ctr_prior * mean_ctr) / (imps_other + o.ctr_prior)
    user_item = (
        np.unique(np.stack([bh.users[bh.hist_imp], bh.hist_item], 1), axis=0) if len(bh.hist_item) else np.zeros((0, 2), np.int64)
    )
    h_items, h_users = np.unique(user_item[:, 1], return_counts=True)
    hist_users = _lookup(h_items, h_users.astype(np.float64), bh.row_item)

    # history overlap: keys (impression, item) and (impression, category code)
    M = int(max(bh.row_item.max(initial=0), bh.hist_item.max(initial=0))) + 1
    in_hist = np.isin(bh.row_imp * M + bh.row_item, bh.hist_imp * M + bh.hist_item).astype(np.float64)
    n_known_hist = np.bincount(bh.hist_imp[hist_known], minlength=B).astype(np.float64)
    hist_len = np.bincount(bh.hist_imp, minlength=B).astype(np.float64)

    def same_share(code: np.ndarray, vocab_size: int) -> np.ndarray:
        if vocab_size == 0:
            return np.zeros(R)
        hk, hc = np.unique(bh.hist_imp[hist_known] * vocab_size + code[hist_news[hist_known]], return_counts=True)
        c = np.where(known, code[np.maximum(item_news, 0)], 0)
        cnt = np.where(known, _lookup(hk, hc.astype(np.float64), bh.row_imp * vocab_size + c), 0.0)
        return cnt / np.maximum(n_known_hist[bh.row_imp], 1.0)

    Wc, Ws = o.category_buckets, o.subcategory_buckets
    feats = np.zeros((R, Wc + Ws + 8), np.float32)
    kr = np.flatnonzero(known)
    if len(kr):
        feats[kr, cat_bucket[cat_code[item_news[kr]]]] = 1.0
        feats[kr, Wc + sub_bucket[sub_code[item_news[kr]]]] = 1.0
    feats[:, Wc + Ws :] = np.stack(
        [
            known.astype(np.float64),
            np.log1p(imps_other),
            np.log1p(clicks_other),
            ctr,
            np.log1p(hist_users),
            in_hist,
            same_share(cat_code, len(cat_vocab)),
            same_share(sub_code, len(sub_vocab)),
        ],
        1,
    )
    upstream = {"ctr": ctr, "clicks": np.log1p(clicks_other), "impressions": np.log1p(imps_other)}[o.upstream]

    keep = np.ones(R, bool) if o.max_candidates is None else bh.row_pos < o.max_candidates
    b, p = bh.row_imp[keep], bh.row_pos[keep]
    counts = np.bincount(b, minlength=B)
    n = int(counts.max())
    cand = np.zeros((B, n, feats.shape[1]), np.float32)
    cand[b, p] = feats[keep]
    mask = np.zeros((B, n), bool)
    mask[b, p] = True
    lab = np.zeros((B, n, 1), np.float32)
    lab[b, p, 0] = click[keep]
    ids = np.zeros((B, n), np.int64)
    ids[b, p] = bh.row_item[keep]
    up = np.zeros((B, n), np.float32)
    up[b, p] = upstream[keep]
    page = np.broadcast_to(np.arange(n), (B, n)).copy()

    angle = 2 * np.pi * bh.hours / 24
    context = np.stack(
        [np.log1p(hist_len), n_known_hist / np.maximum(hist_len, 1.0), np.log1p(counts), np.sin(angle), np.cos(angle)], 1
    ).astype(np.float32)

    coverage = float(known.mean())
    if coverage < 0.9:
        src = f"{news_path}" if news_path is not None else "no news.tsv"
        warnings.warn(
            f"{src}: covers {int(np.unique(bh.row_item[known]).size)} of {uniq.size} impressed items "
            f"({coverage:.1%} of impressed rows); the others have no category features (known = 0)",
            DataWarning,
            stacklevel=2,
        )
    batch = RerankBatch(
        candidates=torch.from_numpy(cand),
        candidate_mask=torch.from_numpy(mask),
        context=torch.from_numpy(context),
        labels=torch.from_numpy(lab),
        item_ids=torch.from_numpy(ids),
        logged_page=torch.from_numpy(page),
        logged_page_mask=torch.from_numpy(mask.copy()),
        logged_feedback=torch.from_numpy(lab.copy()),
        upstream_score=torch.from_numpy(up),
        request_ids=tuple(bh.impression_ids),
        label_names=("click",),
        feedback_names=("click",),
    )
    return batch.validate()
