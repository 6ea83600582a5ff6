"""RerankBatch validation and collate: every bad-input case names the field and the request."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dualrerank.errors import DataError
from dualrerank.schema import Request, RerankBatch, collate


def _requests(n_list=(3, 5), d=4, c=2) -> list[Request]:
    rng = np.random.default_rng(0)
    return [
        Request(
            candidates=rng.normal(size=(n, d)),
            context=rng.normal(size=c),
            labels=rng.integers(0, 3, size=n),
            item_ids=list(range(10 * b, 10 * b + n)),
            logged_page=[n - 1, 0],
            logged_feedback=[[1.0, 0.0], [0.0, 0.0]],
            propensity=0.5,
            upstream_score=rng.normal(size=n),
            request_id=f"q{b}",
        )
        for b, n in enumerate(n_list)
    ]


def test_collate_pads_with_masks_not_values():
    batch = collate(_requests((3, 5)), label_names=("relevance",), feedback_names=("click", "long_view"))
    assert batch.candidates.shape == (2, 5, 4)
    assert batch.candidate_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.labels.shape == (2, 5, 1)
    assert batch.logged_page.tolist() == [[2, 0], [4, 0]]
    assert batch.logged_feedback.shape == (2, 2, 2)
    assert batch.num_valid.tolist() == [3, 5]
    assert batch.request_ids == ("q0", "q1")


def test_select_and_split_keep_fields_aligned():
    batch = collate(_requests((3, 5, 4)))
    sub = batch.select([2, 0])
    assert sub.request_ids == ("q2", "q0")
    assert torch.equal(sub.candidates[1], batch.candidates[0])
    assert [b.batch_size for b in batch.split(2)] == [2, 1]
    assert batch.select(torch.tensor([False, True, False])).request_ids == ("q1",)


def _valid_batch() -> RerankBatch:
    return collate(_requests((3, 5)), label_names=("relevance",))


def _expect(batch: RerankBatch, field: str, request: str, **kw) -> str:
    with pytest.raises(DataError) as info:
        batch.validate(**kw)
    msg = str(info.value)
    assert msg.startswith(field), msg
    assert request in msg, msg
    assert "\n" not in msg
    return msg


def test_wrong_rank():
    b = _valid_batch()
    b.candidates = b.candidates[0]
    with pytest.raises(DataError, match="candidates: expected rank 3"):
        b.validate()


def test_wrong_width_against_model():
    with pytest.raises(DataError, match="feature width 4 != expected 7"):
        _valid_batch().validate(candidate_dim=7)
    with pytest.raises(DataError, match="context: width 2 != expected 3"):
        _valid_batch().validate(context_dim=3)


def test_collate_rejects_inconsistent_width():
    reqs = _requests((3, 5))
    reqs[1].candidates = np.ones((5, 6))
    with pytest.raises(DataError, match=r"feature width 6 != 4 .*'q1'"):
        collate(reqs)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_inf_in_features(value):
    b = _valid_batch()
    b.candidates[1, 3, 2] = value
    assert "candidate 3" in _expect(b, "candidates", "'q1'")


def test_nan_in_padding_is_ignored():
    b = _valid_batch()
    b.candidates[0, 4, 0] = math.nan  # request 0 has 3 real candidates: index 4 is padding
    b.validate()


def test_nan_in_context():
    b = _valid_batch()
    b.context[0, 1] = math.nan
    _expect(b, "context", "'q0'")


def test_request_without_valid_candidate():
    b = _valid_batch()
    b.candidate_mask[1] = False
    _expect(b, "candidate_mask", "'q1'")


def test_collate_rejects_empty_request():
    reqs = _requests((3, 5))
    reqs[0].candidates = np.zeros((0, 4))
    with pytest.raises(DataError, match="no candidate in request 0"):
        collate(reqs)


def test_k_larger_than_valid_candidates():
    msg = _expect(_valid_batch(), "k", "'q0'", k=4)
    assert "3 valid candidates" in msg
    _valid_batch().validate(k=3)


def test_duplicate_item_ids():
    b = _valid_batch()
    b.item_ids[1, 4] = b.item_ids[1, 1]
    assert "duplicate item id 11" in _expect(b, "item_ids", "'q1'")


def test_duplicate_ids_in_padding_are_ignored():
    b = _valid_batch()
    b.item_ids[0, 3:] = b.item_ids[0, 0]
    b.validate()


def test_labels_that_do_not_match_candidates():
    b = _valid_batch()
    b.labels = b.labels[:, :4]
    with pytest.raises(DataError, match="labels: shape"):
        b.validate()
    reqs = _requests((3, 5))
    reqs[1].labels = [0, 1]
    with pytest.raises(DataError, match=r"labels: .*2,.* 5 candidates in request 1 \('q1'\)"):
        collate(reqs)


def test_nan_label():
    b = _valid_batch()
    b.labels[0, 1, 0] = math.nan
    _expect(b, "labels", "'q0'")


def test_logged_page_checks():
    b = _valid_batch()
    b.logged_page[0, 0] = 4  # padding of request 0
    _expect(b, "logged_page", "'q0'")
    b = _valid_batch()
    b.logged_page[1, 1] = b.logged_page[1, 0]
    assert "repeats" in _expect(b, "logged_page", "'q1'")
    b = _valid_batch()
    b.logged_page[1, 1] = 9
    assert "out of range" in _expect(b, "logged_page", "'q1'")


def test_propensity_range():
    b = _valid_batch()
    b.propensity[1] = 0.0
    _expect(b, "propensity", "'q1'")


def test_missing_optional_field_in_one_request():
    reqs = _requests((3, 5))
    reqs[1].labels = None
    with pytest.raises(DataError, match="labels: missing in request 1"):
        collate(reqs)


def test_non_numeric_features():
    reqs = _requests((3,))
    reqs[0].candidates = [["a", "b"]]
    with pytest.raises(DataError, match="candidates: not a numeric array"):
        collate(reqs)


def test_empty_request_list():
    with pytest.raises(DataError, match="empty"):
        collate([])


def test_single_candidate_lists_validate():
    batch = collate([Request(candidates=[[1.0, 2.0]], context=[0.0], item_ids=[7], logged_page=[0])] * 2)
    assert batch.num_valid.tolist() == [1, 1]


def test_trim_drops_unused_padding():
    batch = collate(_requests((3, 5)))
    sub = batch.select([0]).trim()
    assert sub.candidates.shape[1] == 3
    assert sub.labels.shape[1] == 3
