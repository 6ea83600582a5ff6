"""Held-out data that no seed can leak: train and test requests never overlap, whatever the
training run's data seed and whatever data seed an evaluation asks for (issue 14)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dualrerank.train.splits import SplitConfig, hash_split, load_splits

SEEDS = (0, 1, 2)


def _request_keys(batch) -> set[str]:
    """One key per request: its id where the source has one, else a hash of its features."""
    if batch.request_ids is not None:
        return set(batch.request_ids)
    keys = set()
    for b in range(batch.batch_size):
        h = hashlib.sha1(batch.candidates[b][batch.candidate_mask[b]].numpy().tobytes())
        h.update(batch.context[b].numpy().tobytes())
        keys.add(h.hexdigest())
    return keys


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=300, unique=True), st.randoms())
def test_hash_split_is_a_partition_that_ignores_order(ids, rnd):
    train, valid, test = hash_split(tuple(ids), 0.1, 0.2)
    parts = [set(ids[i] for i in idx.tolist()) for idx in (train, valid, test)]
    assert sum(map(len, parts)) == len(ids) and set().union(*parts) == set(ids)
    shuffled = list(ids)
    rnd.shuffle(shuffled)
    again = hash_split(tuple(shuffled), 0.1, 0.2)
    assert [set(shuffled[i] for i in idx.tolist()) for idx in again] == parts


def test_hash_split_shares_are_close_to_the_requested_ones():
    ids = tuple(f"imp{i}" for i in range(20_000))
    train, valid, test = hash_split(ids, 0.1, 0.2)
    assert abs(valid.numel() / len(ids) - 0.1) < 0.01 and abs(test.numel() / len(ids) - 0.2) < 0.01


def test_synthetic_train_and_test_never_share_a_request():
    tiny = dict(train_requests=120, valid_requests=30, test_requests=30, page_length=4)
    loaded = {s: load_splits(SplitConfig(seed=s, **tiny)) for s in SEEDS}
    for a, b in itertools.product(SEEDS, SEEDS):
        train = _request_keys(loaded[a].train)
        assert not train & _request_keys(loaded[b].test.batch), (a, b)
        assert not train & _request_keys(loaded[b].valid.batch), (a, b)


@pytest.mark.parametrize("source, sub", [("mind", "mind_small_subset"), ("letor", "letor/MQ2008")])
def test_real_sources_train_and_test_never_overlap_for_any_seed(source, sub, require_data):
    path = require_data(sub)
    loaded = {s: load_splits(SplitConfig(source=source, path=str(path), seed=s)) for s in SEEDS}
    tests = {s: _request_keys(loaded[s].test.batch) for s in SEEDS}
    for a, b in itertools.product(SEEDS, SEEDS):
        assert not _request_keys(loaded[a].train) & tests[b], (a, b)
    # The held-out requests are the same whatever the data seed.
    assert tests[0] == tests[1] == tests[2]
    assert torch.equal(loaded[0].test.batch.candidates, loaded[2].test.batch.candidates)


def test_synthetic_logs_folder_honours_train_requests(tmp_path):
    from dualrerank.data.synthetic import save_logs, simulate_logs
    from dualrerank.errors import DataError
    from dualrerank.sim import World

    save_logs(simulate_logs(World(), 40, 5, 4), tmp_path / "logs")
    tiny = dict(source="synthetic", path=str(tmp_path / "logs"), valid_requests=10, test_requests=10, page_length=4)
    assert load_splits(SplitConfig(train_requests=25, **tiny)).train.batch_size == 25
    assert load_splits(SplitConfig(**tiny)).train.batch_size == 40  # null: the whole folder
    with pytest.raises(DataError, match=r"holds 40 logged requests but data\.train_requests=41"):
        load_splits(SplitConfig(train_requests=41, **tiny))
    with pytest.raises(DataError, match="have 4 positions but page_length=10"):
        load_splits(SplitConfig(train_requests=25, **{**tiny, "page_length": 10}))
