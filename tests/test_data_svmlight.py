"""SVMlight/LETOR reader: parsing, grouping, padding, options, malformed lines, folds."""

from __future__ import annotations

import gzip
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dualrerank.data import DataWarning, load_dataset
from dualrerank.data.svmlight import (
    SvmlightOptions,
    letor_fold_partitions,
    load_letor_folds,
    load_svmlight,
    svmlight_files,
)
from dualrerank.errors import ConfigError, DataError


SMALL = """\
# a comment line, then a blank line

2 qid:7 1:0.5 3:1.5 # a comment without a docid
0 qid:7 2:2.0
1 qid:7 1:1.0 2:1.0 3:0.5
0 qid:9 3:4.0
1 qid:9 1:-1 2:3e-1 3:2
"""


def write(tmp_path: Path, text: str, name: str = "f.txt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def raw(**kw) -> SvmlightOptions:
    return SvmlightOptions(standardize="none", **kw)


def test_parse_group_pad_and_labels(tmp_path):
    with pytest.warns(DataWarning, match="no known upstream"):
        b = load_svmlight(write(tmp_path, SMALL), raw())
    assert b.request_ids == ("7", "9")
    assert tuple(b.candidates.shape) == (2, 3, 3)
    assert b.candidate_mask.tolist() == [[True, True, True], [True, True, False]]
    expected = torch.tensor([[[0.5, 0, 1.5], [0, 2, 0], [1, 1, 0.5]], [[0, 0, 4], [-1, 0.3, 2], [0, 0, 0]]])
    torch.testing.assert_close(b.candidates, expected)
    assert b.labels[..., 0].tolist() == [[2, 0, 1], [0, 1, 0]]
    assert b.label_names == ("relevance",)
    # unknown width 3: upstream is file order, item ids are positions (no line has a docid)
    assert b.upstream_score[0].tolist() == [0, -1, -2]
    assert b.item_ids[1, :2].tolist() == [0, 1]
    torch.testing.assert_close(b.context[1], torch.tensor([np.log1p(2), -0.5, 0.5], dtype=torch.float32))


def test_upstream_feature_and_context(tmp_path):
    b = load_svmlight(write(tmp_path, SMALL), raw(upstream_feature=3))
    assert b.upstream_score[0].tolist() == [1.5, 0.0, 0.5]
    assert b.upstream_score[1, :2].tolist() == [4.0, 2.0]
    torch.testing.assert_close(b.context[0], torch.tensor([np.log1p(3), 2 / 3, float(np.std([1.5, 0, 0.5]))], dtype=torch.float32))
    with pytest.raises(ConfigError, match="outside the 3 features"):
        load_svmlight(write(tmp_path, SMALL), raw(upstream_feature=4))


def test_auto_upstream_presets(tmp_path):
    lines = [f"{lab} qid:1 " + " ".join(f"{j}:{(j * (i + 1)) % 7}" for j in range(1, 47)) for i, lab in enumerate([0, 1])]
    b = load_svmlight(write(tmp_path, "\n".join(lines)), raw())
    assert b.upstream_score[0].tolist() == [(21 * 1) % 7, (21 * 2) % 7]
    mslr = [f"0 qid:1 110:{v} 136:0" for v in (3.5, 1.25)]
    b = load_svmlight(write(tmp_path, "\n".join(mslr), "m.txt"), raw())
    assert b.upstream_score[0].tolist() == [3.5, 1.25]


def test_query_standardisation(tmp_path):
    b = load_svmlight(write(tmp_path, SMALL), SvmlightOptions(upstream_feature=1))
    m = b.candidate_mask.unsqueeze(-1)
    x = b.candidates * m
    n = b.candidate_mask.sum(1, keepdim=True)
    mean = x.sum(1) / n
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-6, rtol=0)
    var = (x**2).sum(1) / n
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-5, rtol=0)
    assert (b.candidates[1, 2] == 0).all()  # padding stays 0
    # upstream score stays raw
    assert b.upstream_score[0].tolist() == [0.5, 0.0, 1.0]


def test_constant_feature_becomes_zero(tmp_path):
    b = load_svmlight(write(tmp_path, "1 qid:1 1:5 2:1\n0 qid:1 1:5 2:2\n"), SvmlightOptions(upstream_feature=2))
    assert b.candidates[0, :, 0].tolist() == [0.0, 0.0]


def test_docid_item_ids(tmp_path):
    text = "1 qid:1 1:1 # docid = GX1 inc = 1\n0 qid:1 1:2 #docid = GX2\n0 qid:2 1:3 # docid = GX1\n"
    b = load_svmlight(write(tmp_path, text), raw(upstream_feature=1))
    ids = b.item_ids
    assert ids[0, 0] != ids[0, 1]
    assert ids[0, 0] == ids[1, 0]  # same docid, same id in every query
    assert (ids[b.candidate_mask] >= 0).all()
    assert load_svmlight(write(tmp_path, text), raw(upstream_feature=1, item_ids="position")).item_ids[0].tolist() == [0, 1]
    with pytest.raises(DataError, match=r"f\.txt:2: docid 'GX1' appears twice"):
        load_svmlight(write(tmp_path, "1 qid:1 1:1 # docid = GX1\n0 qid:1 1:2 # docid = GX1\n"), raw(upstream_feature=1))
    with pytest.raises(DataError, match=r"f\.txt:2: no '# docid"):
        load_svmlight(write(tmp_path, "1 qid:1 1:1 # docid = A\n0 qid:1 1:2\n"), raw(upstream_feature=1, item_ids="docid"))


def test_num_features_and_zero_based(tmp_path):
    p = write(tmp_path, "1 qid:1 1:1 2:2\n0 qid:1 2:5\n")
    b = load_svmlight(p, raw(upstream_feature=2, num_features=4))
    assert b.candidate_dim == 4 and (b.candidates[..., 2:] == 0).all()
    with pytest.raises(DataError, match=r"f\.txt:1: feature id 2 beyond num_features=1"):
        load_svmlight(p, raw(upstream_feature=1, num_features=1))
    z = load_svmlight(write(tmp_path, "1 qid:1 0:7 1:1\n0 qid:1 1:2\n", "z.txt"), raw(upstream_feature=0, zero_based=True))
    assert z.candidates[0, 0].tolist() == [7.0, 1.0] and z.upstream_score[0, 0] == 7.0


def test_max_candidates_keeps_top_by_upstream_in_file_order(tmp_path):
    text = "0 qid:1 1:0.1\n2 qid:1 1:0.9\n1 qid:1 1:0.5\n0 qid:1 1:0.9\n0 qid:2 1:1\n"
    b = load_svmlight(write(tmp_path, text), raw(upstream_feature=1, max_candidates=2))
    assert b.num_candidates == 2
    assert b.upstream_score[0].tolist() == pytest.approx([0.9, 0.9])  # ties: file order; kept in file order
    assert b.labels[0, :, 0].tolist() == [2, 0]
    assert b.candidate_mask[1].tolist() == [True, False]


def test_gzip_and_crlf(tmp_path):
    p = tmp_path / "f.txt.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("1 qid:1 1:1\r\n0 qid:1 1:2\r\n")
    b = load_svmlight(p, raw(upstream_feature=1))
    assert b.upstream_score[0].tolist() == [1.0, 2.0]


MALFORMED = [
    ("x qid:1 1:1", "bad label 'x'"),
    ("nan qid:1 1:1", "non-finite label"),
    ("1 1:1 2:2", "missing 'qid:<id>'"),
    ("1 qid: 1:1", "empty query id"),
    ("1 qid:1 1:1 abc", "bad feature pair 'abc'"),
    ("1 qid:1 1:1:1", "bad feature pair '1:1:1'"),
    ("1 qid:1 a:1", "bad feature id in 'a:1'"),
    ("1 qid:1 1.5:1", "bad feature id in '1.5:1'"),
    ("1 qid:1 0:1", "feature id 0 < 1"),
    ("1 qid:1 -3:1", "feature id -3 < 1"),
    ("1 qid:1 2:x", "bad feature value in '2:x'"),
    ("1 qid:1 100001:1", "feature id 100001 needs a dense width of 100,001 > letor.max_features=4,096"),
    ("1 qid:1 99999999999999999999999:1", "> letor.max_features=4,096"),
    ("1 qid:1 2:nan", "non-finite"),
    ("1 qid:1 2:-inf", "non-finite"),
    ("1 qid:1 2:1e40", "beyond float32"),
    ("1 qid:1 2:1 2:3", "feature id 2 appears twice"),
]


@pytest.mark.parametrize("line, message", MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    p = write(tmp_path, "# header\n0 qid:1 1:1 2:1\n\n" + line + "\n0 qid:1 1:2\n", "bad.txt")
    with pytest.raises(DataError) as info:
        load_svmlight(p, raw(upstream_feature=1))
    text = str(info.value)
    assert f"{p}:4:" in text and message in text and "\n" not in text


def _dense_lines(num: int, width: int, docids: bool) -> list[str]:
    comment = lambda i: f" #docid = GX{i:03d} inc = 1" if docids else ""  # noqa: E731
    return [f"{i % 3} qid:{i // 4} " + " ".join(f"{j}:{(i * j) % 7 / 7:.3f}" for j in range(1, width + 1)) + comment(i)
            for i in range(num)]


@pytest.mark.parametrize("docids", [True, False])  # LETOR 4.0 has docid comments, MSLR has none
def test_line_cut_short_names_its_line(tmp_path, docids):
    lines = _dense_lines(12, 46, docids)
    lines[-1] = lines[-1].split(" 21:")[0]  # the file ends at a token boundary: 20 features, no comment
    p = write(tmp_path, "\n".join(lines) + "\n", "cut.txt")
    with pytest.raises(DataError) as info:
        load_svmlight(p)
    text = str(info.value)
    assert f"{p}:12: 20 features where 11 of the file's 12 lines have 46" in text and "allow_short_lines" in text
    assert "\n" not in text
    # a file that really leaves features out says so; the cut line then reads as zeros
    b = load_svmlight(p, SvmlightOptions(allow_short_lines=True, item_ids="position"))
    assert b.candidates.shape[-1] == 46 and int(b.num_valid.sum()) == 12


def test_line_cut_before_its_docid_names_its_line(tmp_path):
    lines = _dense_lines(12, 46, docids=True)
    lines[6] = lines[6].split(" #")[0]  # every feature, but the comment is gone
    p = write(tmp_path, "\n".join(lines) + "\n", "cut.txt")
    with pytest.raises(DataError, match=rf"cut\.txt:7: no '# docid = \.\.\.' comment while 11 of the 12 lines have one"):
        load_svmlight(p)
    b = load_svmlight(p, SvmlightOptions(item_ids="position"))
    assert b.item_ids[1].tolist() == [0, 1, 2, 3]


def test_sparse_files_keep_loading(tmp_path):
    # Yahoo-style sparse lines (absent features are 0) vary in length far more than cut lines
    lines = [f"{i % 2} qid:{i // 5} " + " ".join(f"{j}:1" for j in range(1, 30) if (i + j) % (2 + i % 4)) for i in range(40)]
    b = load_svmlight(write(tmp_path, "\n".join(lines) + "\n"), raw(upstream_feature=1))
    assert b.batch_size == 8 and b.candidate_dim == 29


def test_huge_feature_id_is_refused_before_allocating(tmp_path):
    lines = _dense_lines(300, 46, docids=False)
    lines[150] += " 99999:1"
    p = write(tmp_path, "\n".join(lines) + "\n", "wide.txt")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_svmlight(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert text.startswith(f"{p}:151: feature id 99999 needs a dense width of 99,999 > letor.max_features=4,096")
    assert "300 lines x 99,999 features x 4 bytes = 0.112 GiB" in text and "\n" not in text
    # the dense [300, 99999] float32 array alone would be 114 MiB; parsing needs a few MiB
    assert peak < 20 * 2**20, peak
    narrow = write(tmp_path, "1 qid:1 1:1 9:1\n0 qid:1 1:2 9:3\n", "narrow.txt")
    assert load_svmlight(narrow, raw(upstream_feature=1, max_features=9)).candidate_dim == 9
    with pytest.raises(DataError, match=r"narrow\.txt:1: feature id 9 needs a dense width of 9 > letor.max_features=8"):
        load_svmlight(narrow, raw(upstream_feature=1, max_features=8))
    # num_features is the width, and the bound, when given
    assert load_svmlight(narrow, raw(upstream_feature=1, num_features=5000)).candidate_dim == 5000
    with pytest.raises(ConfigError, match="letor.max_features: must be >= 1"):
        SvmlightOptions(max_features=0)


def test_qid_must_be_one_block(tmp_path):
    p = write(tmp_path, "0 qid:1 1:1\n0 qid:2 1:1\n1 qid:1 1:2\n")
    with pytest.raises(DataError, match=r"f\.txt:3: qid '1' appears again after its block at lines 1-1"):
        load_svmlight(p, raw(upstream_feature=1))


def test_empty_file_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="no document lines"):
        load_svmlight(write(tmp_path, "# nothing\n\n"), raw())
    with pytest.raises(DataError, match="no such file or folder"):
        load_svmlight(tmp_path / "absent.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no SVMlight files"):
        load_svmlight(empty)


def test_folder_reads_partitions_once_each(tmp_path):
    write(tmp_path, "1 qid:1 1:1\n0 qid:1 1:2\n", "S1.txt")
    write(tmp_path, "1 qid:2 1:3\n", "S2.txt")
    write(tmp_path, "1 qid:1 1:1\n0 qid:1 1:2\n", "S10.txt")  # identical repeat of qid 1
    write(tmp_path, "not svmlight", "readme_upstream.txt")
    assert [p.name for p in svmlight_files(tmp_path)] == ["S1.txt", "S2.txt", "S10.txt"]
    b = load_svmlight(tmp_path, raw(upstream_feature=1))
    assert b.request_ids == ("1", "2") and int(b.num_valid.sum()) == 3
    write(tmp_path, "1 qid:2 1:4\n", "S10.txt")  # conflicting repeat of qid 2
    with pytest.raises(DataError, match=r"S10\.txt:1: qid '2' was already read from .*S2\.txt line 1"):
        load_svmlight(tmp_path, raw(upstream_feature=1))


def test_registry_routes_and_rejects_options(tmp_path):
    p = write(tmp_path, "1 qid:1 1:1\n0 qid:1 1:2\n")
    b = load_dataset("letor", p, upstream_feature=1, standardize="none")
    assert b.upstream_score[0].tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match="unknown key"):
        load_dataset("letor", p, upstream=1)
    with pytest.raises(ConfigError, match="is not one of"):
        load_dataset("letor", p, standardize="global")
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("letor")
    with pytest.raises(ConfigError, match="unknown data source"):
        load_dataset("yahoo", p)
    with pytest.raises(ConfigError, match="max_candidates"):
        SvmlightOptions(max_candidates=0)


def test_fold_partitions_follow_the_readme_rotation():
    table = {
        1: (["S1", "S2", "S3"], ["S4"], ["S5"]),
        2: (["S2", "S3", "S4"], ["S5"], ["S1"]),
        3: (["S3", "S4", "S5"], ["S1"], ["S2"]),
        4: (["S4", "S5", "S1"], ["S2"], ["S3"]),
        5: (["S5", "S1", "S2"], ["S3"], ["S4"]),
    }
    for k, (tr, va, te) in table.items():
        assert letor_fold_partitions(k) == {"train": tr, "vali": va, "test": te}
    with pytest.raises(ConfigError, match="fold"):
        letor_fold_partitions(6)


def test_fold_layouts(tmp_path):
    for i in range(1, 6):
        width = 3 if i == 5 else 1  # one partition is wider: all splits must share its width
        write(tmp_path, f"1 qid:{i} {width}:{i}\n0 qid:{i} 1:0.5\n", f"S{i}.txt")
    f = load_letor_folds(tmp_path, 2, raw(upstream_feature=1))
    assert [f[k].request_ids for k in ("train", "vali", "test")] == [("2", "3", "4"), ("5",), ("1",)]
    assert {v.candidate_dim for v in f.values()} == {3}
    other = tmp_path / "mslr"
    for k in ("train", "vali", "test"):
        (other / "Fold1").mkdir(parents=True, exist_ok=True)
        write(other / "Fold1", f"1 qid:{k} 1:1\n0 qid:{k} 1:2\n", f"{k}.txt")
    g = load_letor_folds(other, 1, raw(upstream_feature=1))
    assert g["vali"].request_ids == ("vali",)
    with pytest.raises(DataError, match="neither S1.txt"):
        load_letor_folds(other, 3)


def test_train_test_file_pair_holds_out_validation_queries(tmp_path):
    write(tmp_path, "".join(f"{q % 2} qid:{q} 1:{q}\n1 qid:{q} 1:0.5\n" for q in range(10)), "msn.fold1.train.5k.txt")
    write(tmp_path, "1 qid:90 1:1\n0 qid:90 1:2\n", "msn.fold1.test.5k.txt")
    f = load_letor_folds(tmp_path, 1, raw(upstream_feature=1))
    # The last 20% of the train file's queries (in file order) validate; the rest train.
    assert f["train"].request_ids == tuple(str(q) for q in range(8))
    assert f["vali"].request_ids == ("8", "9") and f["test"].request_ids == ("90",)
    write(tmp_path, "1 qid:70 1:1\n0 qid:70 1:2\n", "msn.fold1.vali.txt")
    assert load_letor_folds(tmp_path, 1, raw(upstream_feature=1))["vali"].request_ids == ("70",)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    write(tiny, "1 qid:1 1:1\n0 qid:1 1:2\n", "a_train.txt")
    write(tiny, "1 qid:2 1:1\n0 qid:2 1:2\n", "a_test.txt")
    with pytest.raises(DataError, match="too few"):
        load_letor_folds(tiny, 1, raw(upstream_feature=1))


# ---------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def mq2008(require_data) -> Path:
    """The MQ2008 folder (its S1.txt present), or skip."""
    return require_data("letor/MQ2008/S1.txt").parent


@pytest.fixture(scope="module")
def mq2008_parts(mq2008):
    return {s: load_svmlight(mq2008 / f"{s}.txt", SvmlightOptions()) for s in ("S1", "S2", "S3", "S4", "S5")}


def test_mq2008_counts_and_choices(mq2008):
    b = load_svmlight(mq2008)
    assert b.batch_size == 784 and int(b.num_valid.sum()) == 15211
    assert b.candidate_dim == 46 and b.num_candidates == 121
    assert sorted(torch.unique(b.labels[b.candidate_mask]).tolist()) == [0, 1, 2]
    assert len(set(b.request_ids)) == 784


def test_mq2008_folds_disjoint_and_covering(mq2008, mq2008_parts):
    names = {s: set(v.request_ids) for s, v in mq2008_parts.items()}
    all_q = set().union(*names.values())
    assert len(all_q) == 784
    for k in range(1, 6):
        parts = letor_fold_partitions(k)
        split = {name: set().union(*(names[s] for s in ss)) for name, ss in parts.items()}
        assert not split["train"] & split["vali"] and not split["train"] & split["test"] and not split["vali"] & split["test"]
        assert split["train"] | split["vali"] | split["test"] == all_q
    f = load_letor_folds(mq2008, 1)
    assert set(f["test"].request_ids) == names["S5"] and set(f["vali"].request_ids) == names["S4"]


def test_mslr_sample_notes_possible_truncation(require_data):
    train = require_data("mslr_sample/msn1.fold1.train.5k.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        b = load_svmlight(train, SvmlightOptions(standardize="none"))
    assert b.batch_size == 43 and int(b.num_valid.sum()) == 5000 and b.candidate_dim == 136
    assert any("may be cut short" in str(w.message) for w in caught)
    counts = torch.unique(b.labels[b.candidate_mask], return_counts=True)[1].tolist()
    assert counts == [2792, 1458, 665, 55, 30]
    # MSLR preset: upstream = feature 110 (BM25, whole document), raw
    torch.testing.assert_close(b.upstream_score, b.candidates[..., 109] * b.candidate_mask)
