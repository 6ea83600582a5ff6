"""Columnar request logs (data/columnar.py): round trips from every source, bounded and
shuffled reading, one-line errors for malformed files, the CLI, and a training run."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import dualrerank.data.columnar as columnar
from dualrerank.cli import main
from dualrerank.data import DataWarning, load_dataset
from dualrerank.data.columnar import ParquetRequests, load_parquet, save_parquet
from dualrerank.data.synthetic import load_synthetic
from dualrerank.errors import DataError
from dualrerank.schema import RerankBatch
from dualrerank.train.splits import SplitConfig, hash_split, load_splits

ROOT = Path(__file__).resolve().parents[1]
TENSORS = ("candidates", "candidate_mask", "context", "labels", "item_ids", "upstream_score", "logged_page",
           "logged_page_mask", "logged_feedback", "propensity")
SVM = ("2 qid:a 1:1 2:3 # docid = d1\n0 qid:a 1:2 # docid = d2\n1 qid:a 2:1 # docid = d3\n"
       "0 qid:b 1:1 # docid = d1\n3 qid:b 1:5 # docid = d4\n")
BEHAVIORS = (
    "1\tU1\t11/11/2019 9:05:00 AM\tN1 N2\tN3-1 N4-0 N1-0\n"
    "2\tU2\t11/12/2019 3:30:00 PM\t\tN3-0 N5-1\n"
    "3\tU1\t11/13/2019 12:00:00 AM\tN1 N2\tN4-1 N3-1\n"
)
NEWS = ("N1\tsports\tfootball\tT\tA\tu\t[]\t[]\nN3\tsports\tbasketball\tT\tA\tu\t[]\t[]\n"
        "N4\tnews\tpolitics\tT\tA\tu\t[]\t[]\n")


def assert_same(a: RerankBatch, b: RerankBatch) -> None:
    """Equal fields, shapes and dtypes, and equal values wherever a mask says they exist
    (values under a False mask mean nothing and are not stored: MIND pads pages with 0..n-1)."""
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name in ("candidates", "labels", "item_ids", "upstream_score"):
            x, y = x[a.candidate_mask], y[a.candidate_mask]
        elif name in ("logged_page", "logged_feedback"):
            x, y = x[a.logged_page_mask], y[a.logged_page_mask]
        assert torch.equal(x, y), name
    assert (a.label_names, a.feedback_names) == (b.label_names, b.feedback_names)


def quiet(load):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load()


@pytest.fixture(scope="module")
def synthetic() -> RerankBatch:
    return load_synthetic(None, seed=3, num_requests=100)


@pytest.fixture
def log100(tmp_path, synthetic) -> Path:
    """100 synthetic requests in 7 row groups of at most 16."""
    return save_parquet(synthetic, tmp_path / "log.parquet", row_group_size=16)


# ---------------------------------------------------------------------------- round trips
def test_synthetic_round_trip_names_rows_and_keeps_row_groups(log100, synthetic):
    back = load_parquet(log100)
    assert_same(back, synthetic)
    assert synthetic.request_ids is None and back.request_ids == tuple(str(b) for b in range(100))
    meta = pq.read_metadata(log100)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [16] * 6 + [4]
    assert load_parquet(log100, num_requests=20).request_ids == tuple(str(b) for b in range(20))


def test_letor_round_trip(tmp_path):
    (tmp_path / "train.txt").write_text(SVM)
    batch = quiet(lambda: load_dataset("letor", tmp_path / "train.txt"))
    back = load_parquet(save_parquet(batch, tmp_path / "letor.parquet"))
    assert_same(back, batch)
    assert back.request_ids == batch.request_ids == ("a", "b")


def test_mind_round_trip(tmp_path):
    (tmp_path / "behaviors.tsv").write_text(BEHAVIORS)
    (tmp_path / "news.tsv").write_text(NEWS)
    batch = quiet(lambda: load_dataset("mind", tmp_path))
    back = load_parquet(save_parquet(batch, tmp_path / "out" / "mind.parquet"))
    assert_same(back, batch)
    assert back.request_ids == ("1", "2", "3")


def test_the_documented_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "data.md").read_text()
    section = text[text.index("## Columnar request logs"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/data.md", "exec"), scope)
    batch = scope["batch"]
    assert tuple(batch.candidates.shape) == (2, 3, 3) and tuple(batch.labels.shape) == (2, 3, 1)
    assert batch.candidate_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.logged_page.tolist() == [[0, 1], [1, 0]] and batch.feedback_names == ("click",)
    assert batch.propensity.dtype == torch.float32 and batch.item_ids.dtype == torch.int64


def test_folder_of_files_and_fixed_size_lists(tmp_path, synthetic):
    named = replace(synthetic, request_ids=tuple(f"r{b}" for b in range(100)))
    save_parquet(named.select(slice(0, 40)), tmp_path / "log" / "a.parquet", row_group_size=32)
    part = save_parquet(named.select(slice(40, 100)), tmp_path / "log" / "b" / "c.parquet", row_group_size=32)
    (tmp_path / "log" / "_SUCCESS").write_text("")
    log = ParquetRequests(tmp_path / "log")
    assert [g.num_rows for g in log.row_groups] == [32, 8, 32, 28] and log.num_requests == 100
    torch.testing.assert_close(log.load().candidates, synthetic.candidates)
    # A writer that stores fixed widths as fixed_size_list (and float64) reads the same.
    table = pq.read_table(part)
    d = synthetic.candidate_dim
    fixed = table.set_column(table.schema.get_field_index("candidates"), "candidates",
                             table["candidates"].cast(pa.list_(pa.list_(pa.float64(), d))))
    pq.write_table(fixed, tmp_path / "fixed.parquet")
    torch.testing.assert_close(load_parquet(tmp_path / "fixed.parquet").candidates, synthetic.candidates[40:])


# ---------------------------------------------------------------------------- reading in batches
def test_batches_are_bounded_and_cover_the_log_once(log100, monkeypatch):
    chunks, merged = [], []
    to_batch, concat = columnar._to_batch, columnar._concat
    monkeypatch.setattr(columnar, "_to_batch", lambda rb, *a: chunks.append(rb.num_rows) or to_batch(rb, *a))
    monkeypatch.setattr(columnar, "_concat",
                        lambda parts: merged.append(sum(p.batch_size for p in parts)) or concat(parts))
    log = ParquetRequests(log100)
    assert len(log.row_groups) == 7

    plain = list(log.batches(12))
    assert [b.batch_size for b in plain] == [12] * 8 + [4]
    assert [i for b in plain for i in b.request_ids] == [str(b) for b in range(100)]
    assert max(chunks) <= 12  # never more than one batch's rows read at once
    assert [b.batch_size for b in log.batches(12, drop_last=True)] == [12] * 8

    chunks.clear(), merged.clear()
    mixed = list(log.batches(8, shuffle=True, seed=0, buffer_size=32))
    assert sorted(int(i) for b in mixed for i in b.request_ids) == list(range(100))
    assert all(b.batch_size == 8 for b in mixed[:-1]) and 1 <= mixed[-1].batch_size <= 8
    assert max(chunks) <= 8 and max(merged) <= 32 + 8  # the buffer plus one chunk
    for b in mixed:
        b.validate()


def test_shuffle_is_determined_by_the_seed(log100):
    log = ParquetRequests(log100)

    def order(seed: int) -> list[str]:
        return [i for b in log.batches(10, shuffle=True, seed=seed, buffer_size=40) for i in b.request_ids]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != [str(b) for b in range(100)] and sorted(order(2)) == sorted(order(1))
    # Requests of one row group are spread over batches, not served together.
    first = [int(i) // 16 for i in next(iter(log.batches(10, shuffle=True, seed=1, buffer_size=40))).request_ids]
    assert len(set(first)) > 1


def test_parquet_splits_hash_the_request_id(log100):
    splits = load_splits(SplitConfig(source="parquet", path=str(log100), page_length=4))
    ids = tuple(str(b) for b in range(100))
    expected = [{ids[i] for i in idx.tolist()} for idx in hash_split(ids, 0.1, 0.2)]
    got = [set(b.request_ids) for b in (splits.train, splits.valid.batch, splits.test.batch)]
    assert got == expected and splits.valid.world is None


# ---------------------------------------------------------------------------- malformed logs
def _rows(n: int = 4, **changes) -> dict:
    """A valid 4-request log as Python lists; `changes` replace {column: {row: value}}."""
    cols = {
        "request_id": [f"q{b}" for b in range(n)],
        "context": [[0.1 * b, 1.0] for b in range(n)],
        "candidates": [[[1.0, 2.0, float(b)], [0.0, 1.0, 0.5], [3.0, 0.0, 1.0]] for b in range(n)],
        "item_ids": [[1, 2, 3] for _ in range(n)],
        "label_click": [[1.0, 0.0, 0.0] for _ in range(n)],
        "logged_page": [[0, 2] for _ in range(n)],
        "feedback_click": [[1.0, 0.0] for _ in range(n)],
    }
    for column, rows in changes.items():
        for b, value in rows.items():
            cols[column][b] = value
    return cols


def _write(tmp_path: Path, cols: dict, drop: str | None = None) -> Path:
    table = pa.table({k: v for k, v in cols.items() if k != drop})
    pq.write_table(table, tmp_path / "bad.parquet", row_group_size=2)
    return tmp_path / "bad.parquet"


@pytest.mark.parametrize("changes, drop, message", [
    ({}, "candidates", "bad.parquet: missing column 'candidates'"),
    ({}, "logged_page", "feedback column 'feedback_click' without a 'logged_page' column"),
    ({"context": {3: [0.3, 1.0, 2.0]}}, None,
     "row group 1, request 'q3': context: width 3 where earlier requests have 2 (wrong width)"),
    ({"candidates": {2: [[1.0, 2.0, 3.0], [0.0, 1.0]]}}, None,
     "row group 1, request 'q2': candidates: a feature list of width 2 where earlier requests have 3"),
    ({"label_click": {1: [1.0, 0.0]}}, None,
     "row group 0, request 'q1': label_click: 2 values for 3 candidates (ragged lists)"),
    ({"feedback_click": {2: [1.0]}}, None,
     "row group 1, request 'q2': feedback_click: 1 values for 2 logged positions"),
    ({"candidates": {3: [[1.0, float("nan"), 0.0], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]}}, None,
     "row group 1: candidates: NaN/inf in features of candidate 0 in request 1 ('q3')"),
    ({"candidates": {1: None}}, None, "row group 0, request 'q1': candidates: null list"),
    ({"request_id": {3: None}}, None, "row group 1, row 1: request_id: null"),
    ({"item_ids": {2: [4, 4, 5]}}, None, "row group 1: item_ids: duplicate item id 4 in request 0 ('q2')"),
    ({"logged_page": {0: [0, 5]}}, None, "row group 0: logged_page: candidate index out of range in request 0 ('q0')"),
])
def test_malformed_logs_name_the_row_group_and_request(tmp_path, changes, drop, message):
    path = _write(tmp_path, _rows(**changes), drop)
    with pytest.raises(DataError) as err:
        load_parquet(path)
    text = str(err.value)
    assert message in text and len(text.splitlines()) == 1, text


def test_malformed_paths_and_types(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="a folder with no .parquet files"):
        load_parquet(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file or folder"):
        load_parquet(tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_parquet(tmp_path / "empty" / "notes.txt")
    cols = _rows()
    cols["context"] = ["a", "b", "c", "d"]
    with pytest.raises(DataError, match="column 'context' has type string; expected a list of floats"):
        load_parquet(_write(tmp_path, cols))
    # Files of one folder must agree on their columns.
    (tmp_path / "two").mkdir()
    pq.write_table(pa.table(_rows()), tmp_path / "two" / "a.parquet")
    pq.write_table(pa.table({k: v for k, v in _rows().items() if k != "item_ids"}), tmp_path / "two" / "b.parquet")
    with pytest.raises(DataError, match="b.parquet: columns .* differ from"):
        ParquetRequests(tmp_path / "two")


def test_repeated_request_ids_warn(tmp_path):
    path = _write(tmp_path, _rows(request_id={2: "q0"}))
    with pytest.warns(DataWarning, match="1 request ids occur more than once"):
        load_parquet(path)


# ---------------------------------------------------------------------------- CLI
def test_cli_convert_inspect_and_errors(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(SVM)
    out = tmp_path / "letor.parquet"
    assert main(["data", "convert", "--source", "letor", "--path", str(tmp_path / "train.txt"), "--out", str(out),
                 "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert (written["requests"], written["row_groups"], written["label_names"]) == (2, 1, ["relevance"])
    assert any("no known upstream" in n for n in written["notes"])
    assert main(["data", "inspect", "--source", "parquet", "--path", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["num_lists"], stats["num_documents"], stats["feature_width"]) == (2, 5, 2)

    bad = _write(tmp_path, _rows(label_click={1: [1.0]}))
    for argv in (["data", "inspect", "--source", "parquet", "--path", str(bad)],
                 ["data", "inspect", "--source", "parquet"],
                 ["data", "convert", "--source", "parquet", "--path", str(bad), "--out", str(tmp_path / "o.parquet")],
                 ["data", "convert", "--source", "synthetic", "--out", str(tmp_path)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o.parquet").exists()


def test_train_on_a_parquet_log(tmp_path, capsys):
    log = tmp_path / "log.parquet"
    assert main(["data", "convert", "--source", "synthetic", "--num-requests", "150", "--out", str(log),
                 "--row-group-size", "64"]) == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"page_length": 4},
        "optim": {"epochs": 1, "batch_size": 64},
        "objective": {"target": "logged"},
        "model_config": {"hidden": [8]},
    }))
    run = tmp_path / "run"
    assert main(["train", "--model", "dnn", "--data", "parquet", "--path", str(log), "--config", str(cfg),
                 "--out", str(run), "--json", "--quiet"]) == 0
    figures = json.loads((run / "eval.json").read_text())
    assert figures["ndcg@4"] is not None and np.isfinite(figures["ndcg@4"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["source"] == "parquet"
