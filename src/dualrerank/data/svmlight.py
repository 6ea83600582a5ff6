"""SVMlight / LETOR ranking files -> `RerankBatch` (LETOR 4.0, MSLR-WEB, Yahoo LTR, Istella).

One document per line, the documents of a query on consecutive lines:

    <label> qid:<query id> <fid>:<value> <fid>:<value> ... [# comment, e.g. docid = GX01-2]

A query becomes one request: its documents are the candidates (in file order), the label
is graded relevance (`labels [B, n, 1]`, label_names ("relevance",)), absent feature ids
are 0, ids map to dense columns `fid - 1` (or `fid` with `zero_based`).

Choices (all in `SvmlightOptions`, documented in docs/data.md):
- `upstream_score` is one raw feature column: BM25 of the body (fid 21) for 46-feature
  LETOR 4.0 files, BM25 of the whole document (fid 110) for 136-feature MSLR-WEB files,
  file order (`-position`) for other widths unless `upstream_feature` names a column.
- `context [B, 3]` = (log(1 + number of documents), mean, std of the raw upstream score).
- features are z-scored within each query by default: it needs no statistics from other
  queries, so train/validation/test splits cannot leak into each other.
- `item_ids`: a 62-bit hash of the `docid = ...` comment when every line has one (stable
  across files and runs), else the position in the query's block.
- A qid must occupy one block of consecutive lines in a file; a qid that comes back later
  in the same file is a `DataError`. Across the files of a folder, a query repeated
  identically is kept once and a conflicting repeat is a `DataError`.
- Features are stored densely: a feature id beyond `max_features` (4096; or beyond
  `num_features` when set) is refused while parsing, before any `[lines x width]` array
  exists, with the size it would have needed.
- In a dense file (at least 90% of lines list the same, largest number of features) a
  shorter line is an error: a file cut at a token boundary would otherwise load its last
  line with zeros. `allow_short_lines` accepts such lines. Likewise, with `item_ids:
  auto`, lines without a docid among lines with one are an error, not a silent switch of
  the whole set to positions.
Every malformed line raises `DataError` naming the file and the line number.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dualrerank.config import option
from dualrerank.data import DataWarning
from dualrerank.errors import ConfigError, DataError
from dualrerank.schema import RerankBatch

__all__ = [
    "SvmlightOptions",
    "UPSTREAM_PRESETS",
    "letor_fold_partitions",
    "load_letor_folds",
    "load_svmlight",
    "svmlight_files",
]

# Feature width -> (1-based feature id of the upstream score, what it is). Widths identify
# the public feature sets; Yahoo LTR (700) and Istella (220) are anonymised: no preset.
UPSTREAM_PRESETS: dict[int, tuple[int, str]] = {
    46: (21, "LETOR 4.0 (MQ2007/MQ2008) feature 21, BM25 of body"),
    136: (110, "MSLR-WEB feature 110, BM25 of whole document"),
}
CONTEXT_NAMES = ("log1p_num_docs", "upstream_mean", "upstream_std")

_BODY = re.compile(r"(\S+)\s+qid:(\S+)((?:\s+[^\s:]+:[^\s:]+)*)\s*")
_PAIR = re.compile(r"[^\s:]+:[^\s:]+")
_DOCID = re.compile(r"docid\s*=\s*(\S+)")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# A file where at most this share of lines list fewer features than the others is dense
# with a few lines cut short; sparse files (Yahoo LTR) vary far more from line to line.
SHORT_LINE_SHARE = 0.1
_FORMAT = "expected '<label> qid:<id> <fid>:<value> ... [# comment]'"


@dataclass
class SvmlightOptions:
    """How SVMlight ranking files become a `RerankBatch`."""

    upstream_feature: int | str = option(
        "auto",
        "feature id copied to upstream_score; 'auto': 21 (BM25 body) for 46-feature LETOR 4.0, "
        "110 (BM25 whole document) for 136-feature MSLR-WEB, else file order; 'file_order': -position",
    )
    num_features: int | None = option(None, "dense feature width d (default: the largest feature id)")
    zero_based: bool = option(False, "feature ids start at 0 (column = fid) instead of 1 (column = fid - 1)")
    standardize: str = option(
        "query", "'query': z-score each feature within its query; 'none': raw values", choices=("query", "none")
    )
    item_ids: str = option(
        "auto",
        "'docid': hash of the '# docid = X' comment; 'position': index in the "
        "query's block; 'auto': docid when every line has one",
        choices=("auto", "docid", "position"),
    )
    max_candidates: int | None = option(
        None, "keep at most this many documents per query, the top ones by upstream score (a first-stage cut); None keeps all"
    )
    max_features: int = option(
        4096,
        "largest dense feature width read from the files (features are stored densely, "
        "lines x width x 4 bytes); a larger feature id is an error naming its line. "
        "num_features, when set, is the bound instead",
    )
    allow_short_lines: bool = option(
        False,
        "accept lines listing fewer features than the file's other lines (absent "
        "= 0); by default, in a file where at least 90% of lines list the same, largest "
        "number of features, a shorter line is an error (a line cut short)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.upstream_feature, str):
            if self.upstream_feature not in ("auto", "file_order"):
                raise ConfigError(
                    f"letor.upstream_feature: {self.upstream_feature!r} is not a feature id, 'auto' or 'file_order'"
                )
        elif isinstance(self.upstream_feature, bool) or not isinstance(self.upstream_feature, int) or self.upstream_feature < 0:
            raise ConfigError(
                f"letor.upstream_feature: expected a feature id >= 0, 'auto' or 'file_order', got {self.upstream_feature!r}"
            )
        if self.num_features is not None and self.num_features < 1:
            raise ConfigError(f"letor.num_features: must be >= 1, got {self.num_features}")
        if self.standardize not in ("query", "none"):
            raise ConfigError(f"letor.standardize: {self.standardize!r} is not one of ['query', 'none']")
        if self.item_ids not in ("auto", "docid", "position"):
            raise ConfigError(f"letor.item_ids: {self.item_ids!r} is not one of ['auto', 'docid', 'position']")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ConfigError(f"letor.max_candidates: must be >= 1, got {self.max_candidates}")
        if self.max_features < 1:
            raise ConfigError(f"letor.max_features: must be >= 1, got {self.max_features}")

    def width_bound(self) -> tuple[int, str]:
        """(the most dense columns a file may need, the option that sets it)."""
        if self.num_features is not None:
            return self.num_features, "num_features"
        return self.max_features, "max_features"


@dataclass
class _FileRows:
    """One parsed file: N document lines, P (fid, value) pairs."""

    path: Path
    labels: np.ndarray  # [N] float64
    qids: np.ndarray  # [N] str
    docids: list[str | None]  # N
    lines: np.ndarray  # [N] int64, 1-based line numbers
    pair_row: np.ndarray  # [P] int64, row of each pair
    fids: np.ndarray  # [P] int64
    values: np.ndarray  # [P] float64


# ---------------------------------------------------------------------------- parsing
def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _too_wide(where: str, fid: int, options: SvmlightOptions, n_lines: int) -> DataError:
    """A feature id beyond the dense width the options allow, said before anything is allocated."""
    bound, name = options.width_bound()
    if name == "num_features":
        return DataError(f"{where}: feature id {fid} beyond num_features={bound}")
    width = fid + (1 if options.zero_based else 0)
    gib = n_lines * width * 4 / 2**30
    return DataError(
        f"{where}: feature id {fid} needs a dense width of {width:,} > letor.max_features={bound:,} "
        f"({n_lines:,} lines x {width:,} features x 4 bytes = {gib:.3g} GiB for this file alone); "
        "raise letor.max_features if the file really has that many features"
    )


def _diagnose(path: Path, lineno: int, body: str, options: SvmlightOptions, n_lines: int) -> DataError | None:
    """The precise complaint about one line, or None when the line is well formed."""
    where = f"{path}:{lineno}"
    zero_based = options.zero_based
    tokens = body.split()
    try:
        label = float(tokens[0])
    except ValueError:
        return DataError(f"{where}: bad label {tokens[0]!r}, {_FORMAT}")
    if not math.isfinite(label):
        return DataError(f"{where}: non-finite label {tokens[0]!r}")
    if len(tokens) < 2 or not tokens[1].startswith("qid:"):
        return DataError(f"{where}: missing 'qid:<id>' after the label, {_FORMAT}")
    if tokens[1] == "qid:":
        return DataError(f"{where}: empty query id in 'qid:'")
    for tok in tokens[2:]:
        if not _PAIR.fullmatch(tok):
            return DataError(f"{where}: bad feature pair {tok!r}, expected <fid>:<value>")
        fid_s, val_s = tok.split(":")
        try:
            fid = int(fid_s)
        except ValueError:
            return DataError(f"{where}: bad feature id in {tok!r}, expected an integer")
        if fid < (0 if zero_based else 1):
            return DataError(
                f"{where}: feature id {fid} < {0 if zero_based else 1} in {tok!r}"
                + ("" if zero_based else " (set zero_based for 0-based files)")
            )
        if fid - (0 if zero_based else 1) >= options.width_bound()[0]:
            return _too_wide(where, fid, options, n_lines)
        try:
            value = float(val_s)
        except ValueError:
            return DataError(f"{where}: bad feature value in {tok!r}, expected a number")
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            return DataError(f"{where}: non-finite (or beyond float32) feature value in {tok!r}")
    if _BODY.fullmatch(body) is None:
        return DataError(f"{where}: malformed line, {_FORMAT}")
    return None


def _parse_file(path: Path, options: SvmlightOptions) -> _FileRows:
    """Parse one file. The per-line work is one regex match; numbers convert in bulk."""
    zero_based = options.zero_based
    text = _read_text(path)
    labels_s: list[str] = []
    qids: list[str] = []
    docids: list[str | None] = []
    lines: list[int] = []
    pair_strs: list[str] = []
    bodies: list[str] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        body, _, comment = raw.partition("#")
        body = body.strip()
        if not body:
            continue
        m = _BODY.fullmatch(body)
        if m is None:
            raise _diagnose(path, lineno, body, options, 1) or DataError(f"{path}:{lineno}: malformed line, {_FORMAT}")
        label_s, qid, pairs = m.groups()
        labels_s.append(label_s)
        qids.append(qid)
        pair_strs.append(pairs)
        bodies.append(body)
        lines.append(lineno)
        d = _DOCID.search(comment) if comment else None
        docids.append(d.group(1) if d else None)
    if not lines:
        raise DataError(f"{path}: no document lines, {_FORMAT}")
    line_arr = np.asarray(lines, dtype=np.int64)

    def fail_first(bad_rows: np.ndarray) -> DataError:
        r = int(bad_rows[0])
        return _diagnose(path, lines[r], bodies[r], options, len(lines)) or DataError(f"{path}:{lines[r]}: malformed line")

    try:
        labels = np.asarray(labels_s, dtype=np.float64)
    except ValueError:
        raise _first_failing(path, lines, bodies, options) from None
    bad = ~np.isfinite(labels)
    if bad.any():
        raise fail_first(np.flatnonzero(bad))

    counts = np.fromiter((p.count(":") for p in pair_strs), dtype=np.int64, count=len(pair_strs))
    tokens = " ".join(pair_strs).replace(":", " ").split()
    try:
        fids = np.asarray(tokens[0::2], dtype=np.int64) if tokens else np.zeros(0, np.int64)
        values = np.asarray(tokens[1::2], dtype=np.float64) if tokens else np.zeros(0, np.float64)
    except (ValueError, OverflowError):
        raise _first_failing(path, lines, bodies, options) from None
    pair_row = np.repeat(np.arange(len(lines), dtype=np.int64), counts)
    shift = 0 if zero_based else 1
    # The width bound is checked here, before any [lines x width] array exists.
    bad = (fids < shift) | (fids - shift >= options.width_bound()[0]) | ~(np.abs(values) <= _FLOAT32_MAX)
    if bad.any():
        raise fail_first(pair_row[bad])
    if not options.allow_short_lines:
        _check_short_lines(path, counts, line_arr)
    return _FileRows(path, labels, np.asarray(qids), docids, line_arr, pair_row, fids, values)


def _check_short_lines(path: Path, counts: np.ndarray, lines: np.ndarray) -> None:
    """Refuse a line listing fewer features than a dense file's other lines.

    A file cut at a token boundary ends in a well-formed line without its trailing
    features (and docid comment); read as sparse, it would load with zeros in their place.
    """
    full = int(counts.max())
    short = counts < full
    if short.any() and short.mean() <= SHORT_LINE_SHARE:
        r = int(np.flatnonzero(short)[0])
        raise DataError(
            f"{path}:{int(lines[r])}: {int(counts[r])} features where {int((~short).sum()):,} of the file's "
            f"{len(counts):,} lines have {full}: the line looks cut short; set letor.allow_short_lines: true "
            "if the file leaves out features (absent = 0)"
        )


def _first_failing(path: Path, lines: list[int], bodies: list[str], options: SvmlightOptions) -> DataError:
    """Slow path after a bulk conversion failed: find the first line at fault."""
    for lineno, body in zip(lines, bodies, strict=True):
        err = _diagnose(path, lineno, body, options, len(lines))
        if err is not None:
            return err
    return DataError(f"{path}: malformed numbers, {_FORMAT}")


# ---------------------------------------------------------------------------- files
def svmlight_files(path: str | Path) -> list[Path]:
    """Files a path stands for: itself, or a folder's S1..Sk.txt partitions (LETOR layout),
    else the folder's *.txt / *.svm / *.svmlight / *.libsvm / *.gz files (readme and
    licence files excluded), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    parts = [p for p in path.glob("S*.txt") if re.fullmatch(r"S\d+\.txt", p.name)]
    if parts:
        return sorted(parts, key=lambda p: int(p.stem[1:]))
    files = [
        p
        for p in sorted(path.iterdir())
        if p.is_file()
        and p.suffix in (".txt", ".svm", ".svmlight", ".libsvm", ".gz")
        and not re.search(r"readme|licen[cs]e", p.name, re.IGNORECASE)
    ]
    if not files:
        raise DataError(f"{path}: no SVMlight files in this folder (expected S1.txt.. or *.txt)")
    return files


def _width(parsed: Sequence[_FileRows], options: SvmlightOptions) -> int:
    """Dense width: num_features, else the largest feature id (parsing kept both within bounds)."""
    shift = 0 if options.zero_based else 1
    if options.num_features is not None:
        return options.num_features
    d = max((int(f.fids.max()) - shift + 1 for f in parsed if len(f.fids)), default=0)
    if d == 0:
        raise DataError(f"{parsed[0].path}: no feature values in the file(s)")
    return d


def _upstream_column(options: SvmlightOptions, d: int) -> int | None:
    """Dense column of the upstream score, or None for file order."""
    shift = 0 if options.zero_based else 1
    fid = options.upstream_feature
    if fid == "file_order":
        return None
    if fid == "auto":
        if d not in UPSTREAM_PRESETS:
            warnings.warn(
                f"no known upstream (BM25) feature for width {d}: upstream_score is the file order; "
                "set letor.upstream_feature to a feature id to use one",
                DataWarning,
                stacklevel=3,
            )
            return None
        return UPSTREAM_PRESETS[d][0] - shift
    col = int(fid) - shift
    if not 0 <= col < d:
        raise ConfigError(f"letor.upstream_feature: feature id {fid} is outside the {d} features")
    return col


# ---------------------------------------------------------------------------- assembly
def _assemble(parsed: Sequence[_FileRows], options: SvmlightOptions, d: int) -> RerankBatch:
    """Group rows into queries and pad them into one validated batch."""
    shift = 0 if options.zero_based else 1
    offsets = np.cumsum([0] + [len(f.labels) for f in parsed])
    N = int(offsets[-1])
    labels = np.concatenate([f.labels for f in parsed]).astype(np.float32)
    qids = np.concatenate([f.qids.astype(object) for f in parsed])
    lines = np.concatenate([f.lines for f in parsed])
    file_of = np.repeat(np.arange(len(parsed)), np.diff(offsets))
    docids = [d_ for f in parsed for d_ in f.docids]
    rows = np.concatenate([f.pair_row + offsets[i] for i, f in enumerate(parsed)])
    cols = np.concatenate([f.fids for f in parsed]) - shift
    vals = np.concatenate([f.values for f in parsed])

    key = rows * d + cols
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(dup):
        r = int(rows[order][dup[0]])
        raise DataError(
            f"{parsed[file_of[r]].path}:{int(lines[r])}: feature id {int(cols[order][dup[0]] + shift)} appears twice on the line"
        )
    X = np.zeros((N, d), np.float32)
    X[rows, cols] = vals

    starts, ends, keep_block = _query_blocks(parsed, qids, file_of, lines, labels, X, docids)
    block_of = np.repeat(np.arange(len(starts)), ends - starts)
    pos = np.arange(N) - starts[block_of]

    col = _upstream_column(options, d)
    upstream = -pos.astype(np.float32) if col is None else X[:, col].copy()

    keep = keep_block[block_of]
    if options.max_candidates is not None:
        # rank within the query by upstream score, file order breaking ties
        order = np.lexsort((pos, -upstream, block_of))
        rank = np.empty(N, np.int64)
        rank[order] = np.arange(N) - starts[block_of[order]]
        keep &= rank < options.max_candidates

    _note_possible_truncation(parsed, qids, starts, ends, file_of)

    idx = np.flatnonzero(keep)
    kept_blocks = np.flatnonzero(keep_block)
    b = np.searchsorted(kept_blocks, block_of[idx])
    B = len(kept_blocks)
    counts = np.bincount(b, minlength=B)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    p = np.arange(len(idx)) - first[b]
    n = int(counts.max())

    cand = np.zeros((B, n, d), np.float32)
    cand[b, p] = X[idx]
    mask = np.zeros((B, n), bool)
    mask[b, p] = True
    lab = np.zeros((B, n, 1), np.float32)
    lab[b, p, 0] = labels[idx]
    up = np.zeros((B, n), np.float32)
    up[b, p] = upstream[idx]

    if options.standardize == "query":
        cand = _standardize(cand, mask, counts)
    cnt = counts.astype(np.float64)
    up_mean = up.sum(1, dtype=np.float64) / cnt
    up_std = np.sqrt(np.maximum((np.where(mask, up - up_mean[:, None], 0.0) ** 2).sum(1) / cnt, 0.0))
    context = np.stack([np.log1p(cnt), up_mean, up_std], axis=1).astype(np.float32)

    item_ids = np.zeros((B, n), np.int64)
    item_ids[b, p] = _item_ids(options, docids, idx, pos, b, parsed, file_of, lines)

    batch = RerankBatch(
        candidates=torch.from_numpy(cand),
        candidate_mask=torch.from_numpy(mask),
        context=torch.from_numpy(context),
        labels=torch.from_numpy(lab),
        item_ids=torch.from_numpy(item_ids),
        upstream_score=torch.from_numpy(up),
        request_ids=tuple(str(qids[starts[j]]) for j in kept_blocks),
        label_names=("relevance",),
    )
    return batch.validate()


def _query_blocks(parsed, qids, file_of, lines, labels, X, docids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of consecutive lines sharing a qid (never spanning two files): `[Q]` starts,
    ends, and whether to keep each block (False for an identical repeat from another file)."""
    N = len(qids)
    new_block = np.ones(N, bool)
    new_block[1:] = (qids[1:] != qids[:-1]) | (file_of[1:] != file_of[:-1])
    starts = np.flatnonzero(new_block)
    ends = np.append(starts[1:], N)
    keep_block = np.ones(len(starts), bool)
    seen: dict[str, int] = {}
    for j, s in enumerate(starts):
        q = qids[s]
        if q not in seen:
            seen[q] = j
            continue
        s0, e0 = starts[seen[q]], ends[seen[q]]
        f0, f1 = parsed[file_of[s0]].path, parsed[file_of[s]].path
        if file_of[s0] == file_of[s]:
            raise DataError(
                f"{f1}:{int(lines[s])}: qid {q!r} appears again after its block at lines "
                f"{int(lines[s0])}-{int(lines[e0 - 1])}; the lines of a query must be consecutive"
            )
        same = (
            e0 - s0 == ends[j] - s
            and np.array_equal(labels[s0:e0], labels[s : ends[j]])
            and np.array_equal(X[s0:e0], X[s : ends[j]])
            and docids[s0:e0] == docids[s : ends[j]]
        )
        if not same:
            raise DataError(
                f"{f1}:{int(lines[s])}: qid {q!r} was already read from {f0} line {int(lines[s0])} with different documents"
            )
        keep_block[j] = False
    return starts, ends, keep_block


def _standardize(cand: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Z-score every feature within its query, `[B, n, d]`; constant features become 0."""
    m = mask[:, :, None]
    cnt = counts.astype(np.float64)[:, None]
    mean = cand.sum(1, dtype=np.float64) / cnt
    centred = np.where(m, cand - mean[:, None, :], 0.0)
    std = np.sqrt((centred**2).sum(1) / cnt)
    # a feature that is constant within the query carries no ranking signal there
    scale = np.where(std > 1e-12, std, 1.0)
    return (centred / scale[:, None, :]).astype(np.float32)


def _hash_id(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") & ((1 << 62) - 1)


def _item_ids(options, docids, idx, pos, b, parsed, file_of, lines) -> np.ndarray:
    """`[M]` item ids of the kept rows `idx`: hashed docids or block positions."""
    mode = options.item_ids
    kept_docids = [docids[i] for i in idx]
    if mode == "auto":
        missing = [r for r, x in enumerate(docids) if x is None]
        if missing and len(missing) < len(docids):
            # Some lines name their document and some do not: a line cut before its comment
            # would otherwise turn every id of the set into a position.
            r = missing[0]
            raise DataError(
                f"{parsed[file_of[r]].path}:{int(lines[r])}: no '# docid = ...' comment while "
                f"{len(docids) - len(missing):,} of the {len(docids):,} lines have one (a line cut short?); "
                "set letor.item_ids: position to number documents by position"
            )
        mode = "position" if missing else "docid"
    if mode == "position":
        return pos[idx]
    missing = [k for k, x in enumerate(kept_docids) if x is None]
    if missing:
        r = int(idx[missing[0]])
        raise DataError(f"{parsed[file_of[r]].path}:{int(lines[r])}: no '# docid = ...' comment (letor.item_ids='docid')")
    ids = np.fromiter((_hash_id(x) for x in kept_docids), dtype=np.int64, count=len(kept_docids))
    key_order = np.lexsort((ids, b))
    same = (ids[key_order][1:] == ids[key_order][:-1]) & (b[key_order][1:] == b[key_order][:-1])
    if same.any():
        k = int(key_order[1:][same][0])
        r = int(idx[k])
        raise DataError(
            f"{parsed[file_of[r]].path}:{int(lines[r])}: docid {kept_docids[k]!r} appears twice in its "
            "query (set letor.item_ids='position' to number documents instead)"
        )
    return ids


def _note_possible_truncation(parsed, qids, starts, ends, file_of) -> None:
    # Excerpts cut at a round line count (e.g. the 5,000-line MSLR samples) may end inside
    # a query; the last query is kept, and the user is told.
    for i, f in enumerate(parsed):
        n_lines = len(f.labels)
        if n_lines % 1000 == 0:
            last = int(np.flatnonzero(file_of[starts] == i)[-1])
            warnings.warn(
                f"{f.path}: has exactly {n_lines} document lines, so it may be an excerpt; its last query "
                f"(qid {qids[starts[last]]}, {int(ends[last] - starts[last])} documents) is kept but may be cut short",
                DataWarning,
                stacklevel=4,
            )


# ---------------------------------------------------------------------------- public
def load_svmlight(path: str | Path | Sequence[str | Path], options: SvmlightOptions | None = None) -> RerankBatch:
    """Read SVMlight ranking file(s) into one validated `RerankBatch`.

    Args:
        path: a file, a list of files, or a folder (its S1..Sk.txt partitions if any, else
            its *.txt/*.svmlight files), all read as one set of queries.
        options: see `SvmlightOptions`.

    Returns:
        `RerankBatch` with candidates `[B, n, d]`, candidate_mask `[B, n]`, context `[B, 3]`
        (log1p #docs, mean and std of the upstream score), labels `[B, n, 1]` "relevance",
        item_ids `[B, n]`, upstream_score `[B, n]`, request_ids = qids.
    """
    options = options or SvmlightOptions()
    if isinstance(path, (str, Path)):
        paths = svmlight_files(path)
    else:
        paths = [Path(p) for p in path]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: no such file")
    parsed = [_parse_file(p, options) for p in paths]
    return _assemble(parsed, options, _width(parsed, options))


def letor_fold_partitions(fold: int, num_partitions: int = 5) -> dict[str, list[str]]:
    """Partition names of LETOR 4.0 fold `fold` (1-based), as in its readme: fold k trains on
    S_k, S_k+1, S_k+2, validates on S_k+3 and tests on S_k+4 (indices modulo 5)."""
    if not 1 <= fold <= num_partitions:
        raise ConfigError(f"fold: must be in 1..{num_partitions}, got {fold}")
    names = [f"S{(fold - 1 + i) % num_partitions + 1}" for i in range(num_partitions)]
    return {"train": names[: num_partitions - 2], "vali": [names[-2]], "test": [names[-1]]}


def load_letor_folds(root: str | Path, fold: int, options: SvmlightOptions | None = None) -> dict[str, RerankBatch]:
    """Train/validation/test batches of one fold, sharing one feature width.

    `root` holds the partitions S1.txt..S5.txt (LETOR 4.0), folders Fold1..Fold5 with
    train.txt, vali.txt, test.txt (MSLR-WEB, LETOR 4.0 folds), or one file named
    `*train*.txt` and one `*test*.txt` (an excerpt such as the MSLR sample; `fold` is then
    ignored). Without a `*vali*.txt` beside them, the last `HELD_OUT_SHARE` of the train
    file's queries become the validation split.
    """
    options = options or SvmlightOptions()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    pair = _train_test_pair(root)
    if all((root / f"S{i}.txt").is_file() for i in range(1, 6)):
        split_files = {k: [root / f"{s}.txt" for s in v] for k, v in letor_fold_partitions(fold).items()}
    elif pair is not None and not (root / f"Fold{fold}").is_dir():
        split_files = {k: [p] for k, p in pair.items()}
    else:
        letor_fold_partitions(fold)
        split_files = {k: [root / f"Fold{fold}" / f"{k}.txt"] for k in ("train", "vali", "test")}
        missing = [str(p) for ps in split_files.values() for p in ps if not p.is_file()]
        if missing:
            raise DataError(f"{root}: neither S1.txt..S5.txt nor Fold{fold}/{{train,vali,test}}.txt (missing {missing[0]})")
    cache: dict[Path, _FileRows] = {}
    for ps in split_files.values():
        for p in ps:
            if p not in cache:
                cache[p] = _parse_file(p, options)
    d = _width(list(cache.values()), options)
    out = {k: _assemble([cache[p] for p in ps], options, d) for k, ps in split_files.items()}
    if "vali" not in out:
        train = out["train"]
        n_valid = int(round(HELD_OUT_SHARE * train.batch_size))
        if n_valid < 1 or n_valid >= train.batch_size:
            raise DataError(f"{split_files['train'][0]}: {train.batch_size} queries are too few to hold out a validation split")
        cut = train.batch_size - n_valid
        out["train"] = train.select(torch.arange(cut)).trim()
        out["vali"] = train.select(torch.arange(cut, train.batch_size)).trim()
    return {k: out[k] for k in ("train", "vali", "test")}


HELD_OUT_SHARE = 0.2


def _train_test_pair(root: Path) -> dict[str, Path] | None:
    """`{"train", "test"[, "vali"]}` files of a folder holding one of each, else None."""
    found = {}
    for key in ("train", "vali", "test"):
        matches = sorted(root.glob(f"*{key}*.txt"))
        if len(matches) > 1:
            return None
        if matches:
            found[key] = matches[0]
    return found if {"train", "test"} <= set(found) else None
