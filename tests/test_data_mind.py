"""MIND reader: impressions -> requests, features, leave-one-out popularity, malformed lines."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dualrerank.data import DataWarning, load_dataset
from dualrerank.data.mind import MindOptions, load_mind, mind_feature_names
from dualrerank.errors import ConfigError, DataError


BEHAVIORS = (
    "1\tU1\t11/11/2019 9:05:00 AM\tN1 N2\tN3-1 N4-0 N1-0\n"
    "2\tU2\t11/12/2019 3:30:00 PM\t\tN3-0 N5-1\n"
    "3\tU1\t11/13/2019 12:00:00 AM\tN1 N2\tN4-1 N3-1\n"
)
NEWS = (
    "N1\tsports\tfootball\tA title\tAn abstract\thttps://x\t[]\t[]\n"
    "N2\tnews\tpolitics\tT\tA\tu\t[]\t[]\n"
    "N3\tsports\tbasketball\tT\tA\tu\t[]\t[]\n"
    "N4\tnews\tpolitics\tT\tA\tu\t[]\t[]\n"
)


def make(tmp_path: Path, behaviors: str = BEHAVIORS, news: str | None = NEWS) -> Path:
    (tmp_path / "behaviors.tsv").write_text(behaviors)
    if news is not None:
        (tmp_path / "news.tsv").write_text(news)
    return tmp_path


def quiet_load(path, options=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_mind(path, options)


def col(name: str, options: MindOptions | None = None) -> int:
    return mind_feature_names(options).index(name)


def test_requests_labels_pages(tmp_path):
    b = quiet_load(make(tmp_path))
    assert b.request_ids == ("1", "2", "3")
    assert b.candidate_mask.tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    assert b.item_ids[b.candidate_mask].tolist() == [3, 4, 1, 3, 5, 4, 3]
    assert b.labels[..., 0][b.candidate_mask].tolist() == [1, 0, 0, 0, 1, 1, 1]
    assert b.label_names == ("click",) and b.feedback_names == ("click",)
    assert b.logged_page.tolist()[0] == [0, 1, 2] and b.logged_page_mask.tolist() == b.candidate_mask.tolist()
    torch.testing.assert_close(b.logged_feedback, b.labels)
    assert b.candidate_dim == len(mind_feature_names()) == 32 + 32 + 8


def test_leave_one_out_popularity(tmp_path):
    o = MindOptions(ctr_prior=2.0)
    b = quiet_load(make(tmp_path), o)
    x = b.candidates
    imps = torch.expm1(x[..., col("log1p_impressions_loo")])
    clicks = torch.expm1(x[..., col("log1p_clicks_loo")])
    m = b.candidate_mask
    # N3 is shown in all three impressions (clicked in 1 and 3), N4 in 1 and 3 (clicked in 3)
    torch.testing.assert_close(imps[m], torch.tensor([2.0, 1, 0, 2, 0, 1, 2]))
    torch.testing.assert_close(clicks[m], torch.tensor([1.0, 1, 0, 2, 0, 0, 1]))
    mean = 4 / 7
    ctr = (clicks + 2.0 * mean) / (imps + 2.0)
    torch.testing.assert_close(x[..., col("ctr_loo")][m], ctr[m])
    torch.testing.assert_close(b.upstream_score[m], ctr[m])
    # one distinct user (U1, twice) has N1 in the history
    assert torch.expm1(x[0, 2, col("log1p_history_users")]).item() == pytest.approx(1.0)
    up = quiet_load(tmp_path, MindOptions(upstream="clicks")).upstream_score
    torch.testing.assert_close(up[m], torch.log1p(clicks[m]))


def test_category_and_history_features(tmp_path):
    b = quiet_load(make(tmp_path))
    x = b.candidates
    known = x[..., col("known")]
    assert known[b.candidate_mask].tolist() == [1, 1, 1, 1, 0, 1, 1]
    cat = x[..., :32]
    assert (cat[b.candidate_mask].sum(-1) == known[b.candidate_mask]).all()  # one-hot or nothing
    assert torch.equal(cat[0, 0], cat[0, 2])  # N3 and N1 are both sports
    assert (x[1, 1, :64] == 0).all()  # N5 is not in news.tsv
    assert x[..., col("in_history")][0].tolist() == [0, 0, 1]  # N1 in U1's history
    # history of impression 1: N1 (sports/football), N2 (news/politics)
    assert x[0, :, col("history_same_category")].tolist() == [0.5, 0.5, 0.5]
    assert x[0, :, col("history_same_subcategory")].tolist() == [0.0, 0.5, 0.5]
    assert x[1, :2, col("history_same_category")].tolist() == [0.0, 0.0]
    hour = 9 + 5 / 60
    expected = [np.log1p(2), 1.0, np.log1p(3), np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)]
    torch.testing.assert_close(b.context[0], torch.tensor(expected, dtype=torch.float32))
    assert b.context[1, :2].tolist() == [0.0, 0.0]


def test_no_news_file_and_file_path(tmp_path):
    make(tmp_path, news=None)
    with pytest.warns(DataWarning, match="no news.tsv"):
        b = load_mind(tmp_path / "behaviors.tsv")
    assert (b.candidates[..., :65] == 0).all()


def test_max_candidates_cuts_the_shown_list(tmp_path):
    b = quiet_load(make(tmp_path), MindOptions(max_candidates=2))
    assert b.num_candidates == 2 and b.item_ids[0].tolist() == [3, 4]
    assert b.logged_page.shape == (3, 2)


def test_registry_and_options(tmp_path):
    make(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        b = load_dataset("mind", tmp_path, category_buckets=4, subcategory_buckets=3)
    assert b.candidate_dim == 4 + 3 + 8
    with pytest.raises(ConfigError, match="category_buckets"):
        MindOptions(category_buckets=0)
    with pytest.raises(ConfigError, match="unknown key"):
        load_dataset("mind", tmp_path, buckets=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no behaviors.tsv"):
        load_mind(empty)
    with pytest.raises(DataError, match="no such file or folder"):
        load_mind(tmp_path / "nowhere")


GOOD = "9\tU9\t11/11/2019 1:00:00 PM\tN1\tN1-0 N2-1\n"
BAD_BEHAVIORS = [
    ("7\tU7\t11/11/2019 1:00:00 PM\tN1", "expected 5 tab-separated fields"),
    ("7\tU7\t2019-11-11 13:00\tN1\tN1-0", "bad time '2019-11-11 13:00'"),
    ("7\t\t11/11/2019 1:00:00 PM\tN1\tN1-0", "empty user id"),
    ("7\tU7\t11/11/2019 1:00:00 PM\tN1 X2\tN1-0", "bad news id 'X2' in the click history"),
    ("7\tU7\t11/11/2019 1:00:00 PM\tN1\tN1-2", "impressed item 'N1-2' is not <news id>-<0|1>"),
    ("7\tU7\t11/11/2019 1:00:00 PM\tN1\tN1-0 N3", "'N3' has no -1/-0 click label"),
    ("7\tU7\t11/11/2019 1:00:00 PM\tN1\t", "no impressed items"),
    ("7\tU7\t11/11/2019 1:00:00 PM\tN1\tN3-1 N4-0 N3-0", "item N3 is impressed twice"),
]


@pytest.mark.parametrize("line, message", BAD_BEHAVIORS)
def test_malformed_behaviors_line(tmp_path, line, message):
    make(tmp_path, behaviors=GOOD + "\n" + line + "\n" + GOOD.replace("9\t", "10\t", 1))
    with pytest.raises(DataError) as info:
        quiet_load(tmp_path)
    assert f"{tmp_path / 'behaviors.tsv'}:3:" in str(info.value) and message in str(info.value)


BAD_NEWS = [
    ("X1\tsports\tfootball", "bad news id 'X1'"),
    ("N7\tsports", "got 2 field(s)"),
    ("N7\t\tfootball", "empty category"),
    ("N1\tnews\tfootball", "N1 was already read at line 1 with another category"),
]


@pytest.mark.parametrize("line, message", BAD_NEWS)
def test_malformed_news_line(tmp_path, line, message):
    make(tmp_path, behaviors=GOOD, news="N1\tsports\tfootball\tT\n\n" + line + "\n")
    with pytest.raises(DataError) as info:
        quiet_load(tmp_path)
    assert f"{tmp_path / 'news.tsv'}:3:" in str(info.value) and message in str(info.value)


def test_repeated_identical_news_row_is_fine(tmp_path):
    make(tmp_path, behaviors=GOOD, news="N1\tsports\tfootball\tT\nN1\tsports\tfootball\tT2\n")
    assert quiet_load(tmp_path).candidates[0, 0, col("known")] == 1


def test_mind_subset_loads(require_data):
    MIND = require_data("mind_small_subset/behaviors.tsv").parent
    with pytest.warns(DataWarning, match="covers 284 of 7457 impressed items"):
        b = load_mind(MIND)
    assert b.batch_size == 5000 and int(b.num_valid.sum()) == 189359
    assert int(b.labels.sum()) == 7542
    assert (int(b.num_valid.min()), int(b.num_valid.median()), int(b.num_valid.max())) == (2, 24, 283)
    clicked = (b.labels[..., 0] * b.candidate_mask).sum(1)
    assert int(clicked.min()) >= 1
