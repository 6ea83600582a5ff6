"""Columnar request logs: one Parquet row per request, read in row-group batches.

    log = ParquetRequests("logs/")                                   # a file, or a folder of *.parquet
    batch = log.load()                                               # one RerankBatch (small logs)
    for batch in log.batches(256, shuffle=True, seed=epoch):         # bounded memory (training)
        ...
    save_parquet(batch, "requests.parquet")                          # any RerankBatch -> this format

Columns (docs/data.md, "Columnar request logs"); the lists of a row are unpadded, so a
request holds exactly its n_b candidates and its L_b logged positions:

| column | Arrow type | RerankBatch field |
|---|---|---|
| `request_id` | string (or integer) | `request_ids` |
| `context` | list<float> of c | `context [B, c]` |
| `candidates` | list<list<float> of d> of n_b | `candidates [B, n, d]`, `candidate_mask` |
| `item_ids` | list<int> of n_b, optional | `item_ids [B, n]` |
| `upstream_score` | list<float> of n_b, optional | `upstream_score [B, n]` |
| `label_<name>` | list<float> of n_b, one per label | `labels[..., j]`, `label_names[j] = name` |
| `logged_page` | list<int> of L_b, optional | `logged_page [B, L]`, `logged_page_mask` |
| `feedback_<name>` | list<float> of L_b, one per signal | `logged_feedback[..., j]`, `feedback_names` |
| `propensity` | float, optional | `propensity [B]` |

Why these choices: one column per label and per feedback signal carries the names in the
schema itself (no side metadata a writer could forget, and adding a signal is adding a
column); other columns (a user id, a timestamp) are ignored, so raw logs load as they
are. The reader never loads a whole file: it reads one row group at a time
(`ParquetFile.iter_batches`), converts each chunk with NumPy over the Arrow buffers
(offsets -> padded tensors, no per-element Python), and checks it where the row group is
still known, so a malformed request is named by file, row group and request id.

This module imports only the schema, errors and files: the hash split of request ids
lives in `train/splits.py`, which reads through `ParquetRequests.load`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dualrerank.errors import ConfigError, DataError
from dualrerank.files import atomic_write
from dualrerank.schema import RerankBatch

__all__ = ["FEEDBACK_PREFIX", "LABEL_PREFIX", "REQUIRED_COLUMNS", "ParquetRequests", "RowGroup", "load_parquet", "save_parquet"]

REQUIRED_COLUMNS = ("request_id", "context", "candidates")
LABEL_PREFIX = "label_"
FEEDBACK_PREFIX = "feedback_"
#: Requests per row group written by `save_parquet`: a row group is the unit read at once
#: and the unit shuffled, so it stays small enough to fit in memory many times over, and
#: a file gets enough of them for row-group shuffling to mix.
DEFAULT_ROW_GROUP_SIZE = 4096

# The kind of values each known column holds: "float"/"int" lists, or a list of float lists.
_LIST_KINDS = {
    "context": "float",
    "candidates": "float_lists",
    "item_ids": "int",
    "upstream_score": "float",
    "logged_page": "int",
}
_OPTIONAL_LISTS = ("item_ids", "upstream_score", "logged_page")


@dataclass(frozen=True)
class RowGroup:
    """One row group of one file: the unit read at once and the unit shuffled."""

    file: Path
    index: int
    num_rows: int


@dataclass(frozen=True)
class _Layout:
    """Which columns a log has, checked equal across its files."""

    label_names: tuple[str, ...]
    feedback_names: tuple[str, ...]
    optional: tuple[str, ...]  # present among item_ids, upstream_score, logged_page, propensity

    @property
    def columns(self) -> list[str]:
        return [
            *REQUIRED_COLUMNS,
            *self.optional,
            *(LABEL_PREFIX + n for n in self.label_names),
            *(FEEDBACK_PREFIX + n for n in self.feedback_names),
        ]


# ---------------------------------------------------------------------------- reading
class ParquetRequests:
    """A request log in one Parquet file or a folder of them (`*.parquet`, searched
    recursively, hidden and `_`-prefixed names skipped, sorted by path).

    Opening reads the footers only: the files, their row groups and their schemas, checked
    for the required columns and their types, and for the same columns in every file.
    Nothing is held open between reads.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = _parquet_files(self.path)
        self._metadata: dict[Path, pq.FileMetaData] = {}
        layout: _Layout | None = None
        groups: list[RowGroup] = []
        for f in self.files:
            try:
                meta = pq.read_metadata(f)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{f}: not a readable Parquet file ({_first_line(exc)})") from None
            self._metadata[f] = meta
            here = _layout_of(f, meta.schema.to_arrow_schema())
            if layout is not None and here != layout:
                raise DataError(
                    f"{f}: columns {here.columns} differ from {self.files[0]}'s {layout.columns}; "
                    "every file of a log needs the same columns"
                )
            layout = here
            groups += [RowGroup(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        assert layout is not None  # _parquet_files never returns an empty list
        self.layout = layout
        self.row_groups = [g for g in groups if g.num_rows > 0]

    @property
    def num_requests(self) -> int:
        """Rows in all files (from the footers, nothing read)."""
        return sum(g.num_rows for g in self.row_groups)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.layout.label_names

    @property
    def feedback_names(self) -> tuple[str, ...]:
        return self.layout.feedback_names

    def load(self, num_requests: int | None = None) -> RerankBatch:
        """The first `num_requests` requests (None: all) as one validated `RerankBatch`, in
        file and row order. For logs that fit in memory; `batches` for the others."""
        if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1):
            raise ConfigError(f"num_requests: must be a positive integer, got {num_requests!r}")
        total = self.num_requests
        if total == 0:
            raise DataError(f"{self.path}: the log holds no request")
        if num_requests is not None and num_requests > total:
            raise DataError(f"{self.path}: holds {total:,} requests but num_requests={num_requests:,}")
        want = total if num_requests is None else num_requests
        parts, have = [], 0
        for part in self._read(self.row_groups, chunk_rows=max(want, 1)):
            parts.append(part)
            have += part.batch_size
            if have >= want:
                break
        batch = _concat(parts)
        batch = batch.select(slice(0, want)).trim() if have > want else batch
        _warn_repeated_ids(batch.request_ids or (), self.path)
        return batch

    def batches(
        self,
        batch_size: int = 256,
        *,
        shuffle: bool = False,
        seed: int = 0,
        buffer_size: int = 4096,
        drop_last: bool = False,
    ) -> Iterator[RerankBatch]:
        """Validated batches of `batch_size` requests (the last may be smaller unless
        `drop_last`), reading one chunk of at most `batch_size` rows at a time.

        Without `shuffle`: file and row order. With it: row groups in an order drawn from
        `seed`, and requests mixed in a buffer of at most `buffer_size` requests (plus one
        chunk): when it is full, it is permuted, the first part is emitted and the second
        half stays to mix with the next row groups. Memory is bounded by `buffer_size`
        whatever the size of the log; the same `seed` gives the same batches (pass
        `seed + epoch` for a new order each epoch).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        if shuffle and buffer_size < batch_size:
            raise ConfigError(f"buffer_size: {buffer_size} < batch_size {batch_size}; the buffer must hold a batch")
        rng = np.random.default_rng(seed)
        groups = [self.row_groups[i] for i in rng.permutation(len(self.row_groups))] if shuffle else self.row_groups
        buffer: list[RerankBatch] = []
        buffered = 0
        for part in self._read(groups, chunk_rows=batch_size):
            buffer.append(part)
            buffered += part.batch_size
            if not shuffle and buffered >= batch_size:
                merged = _concat(buffer)
                full = buffered - buffered % batch_size
                yield from (merged.select(slice(s, s + batch_size)).trim() for s in range(0, full, batch_size))
                buffer = [merged.select(slice(full, buffered)).trim()] if full < buffered else []
                buffered -= full
            elif shuffle and buffered >= buffer_size:
                merged = _concat(buffer)
                order = torch.from_numpy(rng.permutation(buffered))
                # Emit down to half the buffer: the kept half, already permuted, mixes with
                # the next row groups, so neighbours in a batch rarely share a row group.
                emit = max(1, (buffered - buffer_size // 2) // batch_size) * batch_size
                yield from (merged.select(order[s : s + batch_size]).trim() for s in range(0, emit, batch_size))
                buffer = [merged.select(order[emit:]).trim()] if emit < buffered else []
                buffered -= emit
        if buffered == 0:
            return
        merged = _concat(buffer)
        order = torch.from_numpy(rng.permutation(buffered)) if shuffle else torch.arange(buffered)
        stop = buffered - buffered % batch_size if drop_last else buffered
        yield from (merged.select(order[s : s + batch_size]).trim() for s in range(0, stop, batch_size))

    def _read(self, groups: Iterable[RowGroup], chunk_rows: int) -> Iterator[RerankBatch]:
        """Row groups in the given order, as validated batches of at most `chunk_rows` rows."""
        widths: dict[str, int] = {}  # first width seen in this pass; later chunks must match
        for g in groups:
            where = f"{g.file}: row group {g.index}"
            try:
                with pq.ParquetFile(g.file, metadata=self._metadata[g.file]) as pf:
                    first_row = 0
                    for rb in pf.iter_batches(batch_size=chunk_rows, row_groups=[g.index], columns=self.layout.columns):
                        yield _to_batch(rb, self.layout, where, widths, first_row)
                        first_row += rb.num_rows
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{where}: unreadable ({_first_line(exc)})") from None


def load_parquet(path: str | Path, num_requests: int | None = None) -> RerankBatch:
    """The `parquet` data source: a request log (file or folder) as one `RerankBatch`."""
    return ParquetRequests(path).load(num_requests)


def _warn_repeated_ids(ids: tuple[str, ...], path: Path) -> None:
    """Repeated request ids are legal (the hash split keeps them together, so they cannot
    leak across splits) but usually mean a file written twice into one folder."""
    values, counts = np.unique(np.asarray(ids, dtype=str), return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    if repeated.size:
        from dualrerank.data import DataWarning

        warnings.warn(
            f"{path}: {repeated.size:,} request ids occur more than once (e.g. {str(values[repeated[0]])!r}, "
            f"{counts[repeated[0]]} times); splits keep each id's rows together",
            DataWarning,
            stacklevel=3,
        )


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(
        p
        for p in path.rglob("*.parquet")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(
            f"{path}: a folder with no .parquet files (a request log is one .parquet file or a folder "
            "of them, e.g. written by `dualrerank data convert`)"
        )
    return files


def _layout_of(f: Path, schema: pa.Schema) -> _Layout:
    """Check a file's columns and types from its schema (before any data is read)."""
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{f}: missing column {missing[0]!r} (a request log needs {list(REQUIRED_COLUMNS)}; the file has {names})"
        )
    labels = tuple(n[len(LABEL_PREFIX) :] for n in names if n.startswith(LABEL_PREFIX))
    feedback = tuple(n[len(FEEDBACK_PREFIX) :] for n in names if n.startswith(FEEDBACK_PREFIX))
    optional = tuple(c for c in (*_OPTIONAL_LISTS, "propensity") if c in names)
    if feedback and "logged_page" not in optional:
        raise DataError(
            f"{f}: feedback column {FEEDBACK_PREFIX + feedback[0]!r} without a 'logged_page' column "
            "(feedback is per logged position)"
        )
    for name in names:
        kind = _LIST_KINDS.get(name, "float" if name.startswith((LABEL_PREFIX, FEEDBACK_PREFIX)) else None)
        t = schema.field(name).type
        if name == "request_id":
            ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            expected = "string or integer"
        elif name == "propensity":
            ok, expected = _is_number(t), "a float"
        elif kind == "float_lists":
            ok = _is_list(t) and _is_list(t.value_type) and _is_number(t.value_type.value_type)
            expected = "a list of lists of floats"
        elif kind is not None:
            ok = _is_list(t) and (pa.types.is_integer(t.value_type) if kind == "int" else _is_number(t.value_type))
            expected = f"a list of {'integers' if kind == 'int' else 'floats'}"
        else:
            continue  # not ours: other columns of a raw log are never read
        if not ok:
            raise DataError(f"{f}: column {name!r} has type {t}; expected {expected}")
    return _Layout(labels, feedback, optional)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Chunk:
    """One Arrow record batch being converted: names its requests in messages."""

    def __init__(self, rb: pa.RecordBatch, where: str, first_row: int):
        self.rb, self.where = rb, where
        ids = rb.column("request_id")
        if ids.null_count:
            # No id to name the request by: its row within the row group instead.
            raise DataError(f"{where}, row {first_row + _first_true(ids.is_null())}: request_id: null")
        self.ids: list[str] = ids.cast(pa.string()).to_pylist()

    def fail(self, row: int, column: str, problem: str) -> DataError:
        return DataError(f"{self.where}, request {self.ids[row]!r}: {column}: {problem}")

    def lists(self, column: str) -> tuple[np.ndarray, pa.Array]:
        """`(lengths [B], flattened values)` of a list column, refusing null lists."""
        arr = self.rb.column(column)
        if arr.null_count:
            raise self.fail(_first_true(arr.is_null()), column, "null list")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        return lengths, arr.flatten()

    def values(self, column: str, flat: pa.Array, lengths: np.ndarray, dtype: pa.DataType) -> np.ndarray:
        """NumPy values of a flattened list column, refusing nulls and values that do not cast."""
        if flat.null_count:
            raise self.fail(_row_of(_first_true(flat.is_null()), lengths), column, "null value")
        try:
            return pc.cast(flat, dtype).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid as exc:
            raise DataError(f"{self.where}: {column}: values do not convert to {dtype} ({_first_line(exc)})") from None

    def check_lengths(self, column: str, lengths: np.ndarray, expected: np.ndarray, what: str) -> None:
        bad = np.flatnonzero(lengths != expected)
        if bad.size:
            b = int(bad[0])
            raise self.fail(b, column, f"{lengths[b]} values for {expected[b]} {what} (ragged lists)")


def _first_true(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _row_of(flat_index: int, lengths: np.ndarray) -> int:
    """The request a position of a flattened list column belongs to."""
    return int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))


def _pad(values: np.ndarray, lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`values [sum(lengths), ...]` -> padded `[B, width, ...]` and its mask `[B, width]`."""
    B = len(lengths)
    rows = np.repeat(np.arange(B), lengths)
    pos = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = np.zeros((B, width, *values.shape[1:]), values.dtype)
    out[rows, pos] = values
    mask = np.zeros((B, width), bool)
    mask[rows, pos] = True
    return out, mask


def _to_batch(rb: pa.RecordBatch, layout: _Layout, where: str, widths: dict[str, int], first_row: int) -> RerankBatch:
    """One record batch (rows `first_row...` of a row group) -> a validated `RerankBatch`;
    structural problems (nulls, widths, ragged lists) are named here by request id, value
    problems (NaN/inf, repeated item ids, pages, propensities) by `validate`."""
    ch = _Chunk(rb, where, first_row)
    B = rb.num_rows

    def fixed_width(column: str, lengths: np.ndarray, what: str, row_of: Callable[[int], int] = int) -> int:
        # The first width read in this pass is the log's; every request read after it must match.
        if lengths.size == 0:
            return widths.get(column, 0)
        width = widths.setdefault(column, int(lengths[0]))
        bad = np.flatnonzero(lengths != width)
        if bad.size:
            i = int(bad[0])
            raise ch.fail(row_of(i), column, f"{what} {lengths[i]} where earlier requests have {width} (wrong width)")
        return width

    ctx_len, ctx_flat = ch.lists("context")
    c = fixed_width("context", ctx_len, "width")
    context = ch.values("context", ctx_flat, ctx_len, pa.float32()).reshape(B, c)

    cand_n, cand_rows = ch.lists("candidates")
    if cand_rows.null_count:
        raise ch.fail(_row_of(_first_true(cand_rows.is_null()), cand_n), "candidates", "null feature list")
    feat_len = pc.list_value_length(cand_rows).to_numpy(zero_copy_only=False).astype(np.int64)
    d = fixed_width("candidates", feat_len, "a feature list of width", lambda i: _row_of(i, cand_n))
    cand_values = _feature_values(ch, cand_rows.flatten(), cand_n, d)
    n = int(cand_n.max()) if B else 0
    X, mask = _pad(cand_values.reshape(feat_len.size, d), cand_n, n)
    out: dict = {
        "candidates": torch.from_numpy(X),
        "candidate_mask": torch.from_numpy(mask),
        "context": torch.from_numpy(context.copy()),
    }  # Arrow buffers are read-only

    def per_candidate(column: str, dtype: pa.DataType) -> np.ndarray:
        lengths, flat = ch.lists(column)
        ch.check_lengths(column, lengths, cand_n, "candidates")
        return _pad(ch.values(column, flat, lengths, dtype), cand_n, n)[0]

    if "item_ids" in layout.optional:
        out["item_ids"] = torch.from_numpy(per_candidate("item_ids", pa.int64()))
    if "upstream_score" in layout.optional:
        out["upstream_score"] = torch.from_numpy(per_candidate("upstream_score", pa.float32()))
    if layout.label_names:
        out["labels"] = torch.from_numpy(
            np.stack([per_candidate(LABEL_PREFIX + m, pa.float32()) for m in layout.label_names], axis=2)
        )
    if "logged_page" in layout.optional:
        page_len, page_flat = ch.lists("logged_page")
        L = int(page_len.max()) if B else 0
        page, pmask = _pad(ch.values("logged_page", page_flat, page_len, pa.int64()), page_len, L)
        out["logged_page"], out["logged_page_mask"] = torch.from_numpy(page), torch.from_numpy(pmask)
        if layout.feedback_names:
            cols = []
            for name in layout.feedback_names:
                lengths, flat = ch.lists(FEEDBACK_PREFIX + name)
                ch.check_lengths(FEEDBACK_PREFIX + name, lengths, page_len, "logged positions")
                cols.append(_pad(ch.values(FEEDBACK_PREFIX + name, flat, lengths, pa.float32()), page_len, L)[0])
            out["logged_feedback"] = torch.from_numpy(np.stack(cols, axis=2))
    if "propensity" in layout.optional:
        prop = rb.column("propensity")
        if prop.null_count:
            raise ch.fail(_first_true(prop.is_null()), "propensity", "null")
        out["propensity"] = torch.from_numpy(pc.cast(prop, pa.float32()).to_numpy(zero_copy_only=False).copy())
    batch = RerankBatch(**out, request_ids=tuple(ch.ids), label_names=layout.label_names, feedback_names=layout.feedback_names)
    try:
        return batch.validate()
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def _feature_values(ch: _Chunk, flat: pa.Array, cand_n: np.ndarray, d: int) -> np.ndarray:
    """Candidate features as float32 `[sum(n_b) * d]`; a null is named by its request."""
    if flat.null_count:
        raise ch.fail(_row_of(_first_true(flat.is_null()) // max(d, 1), cand_n), "candidates", "null feature value")
    return pc.cast(flat, pa.float32()).to_numpy(zero_copy_only=False)


def _concat(parts: list[RerankBatch]) -> RerankBatch:
    """Requests of several batches as one, padded to the largest n and L."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    n = max(p.num_candidates for p in parts)
    L = max(p.logged_page.shape[1] if p.logged_page is not None else 0 for p in parts)

    def cat(name: str, width: int | None) -> torch.Tensor | None:
        if getattr(first, name) is None:
            return None
        tensors = [getattr(p, name) for p in parts]
        if width is None:
            return torch.cat(tensors)
        out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), width, *tensors[0].shape[2:]))
        s = 0
        for t in tensors:
            out[s : s + t.shape[0], : t.shape[1]] = t
            s += t.shape[0]
        return out

    widths: dict[str, int | None] = {
        "candidates": n,
        "candidate_mask": n,
        "labels": n,
        "item_ids": n,
        "upstream_score": n,
        "logged_page": L,
        "logged_page_mask": L,
        "logged_feedback": L,
        "context": None,
        "propensity": None,
    }
    tensors: dict[str, Any] = {k: cat(k, w) for k, w in widths.items()}
    return replace(first, **tensors, request_ids=tuple(i for p in parts for i in p.request_ids or ()))


# ---------------------------------------------------------------------------- writing
def save_parquet(batch: RerankBatch, path: str | Path, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> Path:
    """Write `batch` as a request log (one row per request, `row_group_size` rows per row
    group), atomically. Requests without `request_ids` are named by their row ("0", "1",
    ...): the format needs an id, since splits hash it. Candidates under a False mask are
    dropped and `logged_page` renumbered to match; sources give prefix masks, for which
    nothing changes and `load_parquet` returns `batch` again."""
    if row_group_size < 1:
        raise ConfigError(f"row_group_size: must be >= 1, got {row_group_size}")
    batch = batch.validate()
    ids = batch.request_ids if batch.request_ids is not None else tuple(str(b) for b in range(batch.batch_size))
    # int32 offsets address 2^31 values per array; a row group of larger features uses int64.
    large = int(batch.candidate_mask.sum()) * batch.candidate_dim >= 2**31 - 1
    schema = _schema(batch, large)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for s in range(0, batch.batch_size, row_group_size):
                part = batch.select(slice(s, s + row_group_size))
                writer.write_table(_to_table(part, ids[s : s + row_group_size], schema, large), row_group_size=row_group_size)

    return atomic_write(path, write)


def _schema(batch: RerankBatch, large: bool) -> pa.Schema:
    lst = pa.large_list if large else pa.list_
    fields = [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("context", pa.list_(pa.float32())),
        pa.field("candidates", lst(lst(pa.float32()))),
    ]
    if batch.item_ids is not None:
        fields.append(pa.field("item_ids", lst(pa.int64())))
    if batch.upstream_score is not None:
        fields.append(pa.field("upstream_score", lst(pa.float32())))
    if batch.logged_page is not None:
        fields.append(pa.field("logged_page", pa.list_(pa.int64())))
    if batch.propensity is not None:
        fields.append(pa.field("propensity", pa.float32()))
    if batch.labels is not None:
        fields += [pa.field(LABEL_PREFIX + m, lst(pa.float32())) for m in _names(batch.label_names, batch.labels, "label")]
    if batch.logged_feedback is not None:
        fields += [
            pa.field(FEEDBACK_PREFIX + m, pa.list_(pa.float32()))
            for m in _names(batch.feedback_names, batch.logged_feedback, "feedback")
        ]
    return pa.schema(fields)


def _names(names: tuple[str, ...], values: torch.Tensor, what: str) -> tuple[str, ...]:
    """Column names: the batch's, or `<what>0..` when it has none (they are the columns' only name)."""
    if names:
        if len(set(names)) != len(names):
            raise DataError(f"{what}_names: {list(names)} repeat a name; each becomes a column")
        return names
    return tuple(f"{what}{j}" for j in range(values.shape[-1]))


def _offsets(lengths: np.ndarray, large: bool) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64 if large else np.int32))


def _list(lengths: np.ndarray, values: pa.Array | np.ndarray, large: bool = False) -> pa.Array:
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(_offsets(lengths, large), values if isinstance(values, pa.Array) else pa.array(values))


def _to_table(batch: RerankBatch, ids: tuple[str, ...], schema: pa.Schema, large: bool) -> pa.Table:
    """Padded tensors -> list columns: masked values flattened row-major, offsets from the
    mask's row sums (`ListArray.from_arrays`, no per-request loop)."""
    mask = batch.candidate_mask.numpy()
    n_b = mask.sum(1)
    B, d, c = batch.batch_size, batch.candidate_dim, batch.context_dim
    X = batch.candidates.numpy()[mask]  # [sum n_b, d], row-major: request by request
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(ids, pa.string()),
        "context": _list(np.full(B, c), batch.context.numpy().reshape(-1)),
        "candidates": _list(n_b, _list(np.full(len(X), d), X.reshape(-1), large), large),
    }
    if batch.item_ids is not None:
        cols["item_ids"] = _list(n_b, batch.item_ids.numpy()[mask], large)
    if batch.upstream_score is not None:
        cols["upstream_score"] = _list(n_b, batch.upstream_score.numpy()[mask], large)
    if batch.labels is not None:
        Y = batch.labels.numpy()[mask]
        for j, name in enumerate(_names(batch.label_names, batch.labels, "label")):
            cols[LABEL_PREFIX + name] = _list(n_b, np.ascontiguousarray(Y[:, j]), large)
    if batch.logged_page is not None:
        pmask = batch.logged_page_mask.numpy() if batch.logged_page_mask is not None else np.ones(batch.logged_page.shape, bool)
        # New index of each kept candidate (equal to the old one under a prefix mask).
        renumber = np.cumsum(mask, axis=1) - 1
        page = np.take_along_axis(renumber, batch.logged_page.numpy().astype(np.int64).clip(0, mask.shape[1] - 1), 1)
        cols["logged_page"] = _list(pmask.sum(1), page[pmask])
        if batch.logged_feedback is not None:
            F = batch.logged_feedback.numpy()[pmask]
            for j, name in enumerate(_names(batch.feedback_names, batch.logged_feedback, "feedback")):
                cols[FEEDBACK_PREFIX + name] = _list(pmask.sum(1), np.ascontiguousarray(F[:, j]))
    if batch.propensity is not None:
        cols["propensity"] = pa.array(batch.propensity.numpy(), pa.float32())
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
