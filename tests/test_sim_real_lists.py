"""Real graded lists in the simulated world: the same user model on LETOR-style requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualrerank.data.svmlight import load_svmlight
from dualrerank.errors import DataError
from dualrerank.schema import Request, collate
from dualrerank.sim import RealListConfig, World, WorldConfig, real_list_state

L = 4


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(), 0)


def _graded_batch(num: int = 40, seed: int = 0):
    """Variable-length lists (6..15 docs) whose features carry the grade plus noise."""
    rng = np.random.default_rng(seed)
    reqs = []
    for q in range(num):
        n = int(rng.integers(6, 16))
        grade = rng.integers(0, 3, size=n).astype(np.float32)
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += grade
        reqs.append(Request(candidates=x, context=np.zeros(2, np.float32), labels=grade[:, None], request_id=f"q{q}"))
    return collate(reqs, label_names=("relevance",))


def test_graded_lists_run_through_the_user_model(world):
    batch = _graded_batch()
    state = real_list_state(batch, world, seed=1)
    assert state.topic.shape == (40, batch.num_candidates, world.config.catalogue.topic_dim)
    assert torch.equal(state.candidate_mask, batch.candidate_mask)
    # relevance follows the grade
    grade = batch.labels[..., 0][batch.candidate_mask]
    assert torch.allclose(state.match[batch.candidate_mask], -1.0 + 3.0 * grade / 2.0)
    ref = world.reference(state, L)
    pages = {
        "pointwise": world.pointwise_oracle_pages(state, L),
        "upstream": world.upstream_pages(state, L),
        "random": world.random_pages(state, L, 2),
    }
    for p in list(pages.values()) + [ref.oracle_pages]:
        assert bool(batch.candidate_mask.gather(1, p).all()), "a page shows a padded document"
    u_oracle = world.expected_utility(state, ref.oracle_pages)
    for name, p in pages.items():
        assert bool((u_oracle >= world.expected_utility(state, p) - 1e-5).all()), name
    # Normalized utility is measured against each list's own references: uniformly random
    # pages of the list's real documents are worth about 0 (-0.016 here), and greedy search
    # over the exact utility gets most of the attainable gain, but less than the beam oracle
    # (0.90 here). A reference off its list, or an oracle no better than greedy, fails.
    nu_random = world.normalized_utility(state, world.random_pages(state, L, 5, groups=16), ref)
    assert abs(float(nu_random.nanmean())) < 0.1
    nu_greedy = world.normalized_utility(state, world.greedy_pages(state, L), ref)
    assert 0.7 < float(nu_greedy.nanmean()) < 0.98
    fb = world.sample_feedback(state, pages["pointwise"], 3)
    assert fb.click.shape == (40, L) and fb.reformulate.shape == (40,)
    # graded relevance matters: sorting by grade beats a random page
    assert float(world.expected_utility(state, pages["pointwise"]).mean()) > float(world.expected_utility(state, pages["random"]).mean())


def test_real_list_state_is_batch_independent_except_durations(world):
    batch = _graded_batch()
    full = real_list_state(batch, world, seed=1)
    part = real_list_state(batch.select(slice(0, 10)), world, seed=1)
    assert torch.allclose(full.topic[:10, : part.num_candidates], part.topic, atol=1e-5)
    assert torch.equal(full.category[:10, : part.num_candidates], part.category)


def test_real_lists_need_graded_labels(world):
    batch = _graded_batch()
    from dataclasses import replace

    with pytest.raises(DataError, match="labels"):
        real_list_state(replace(batch, labels=None), world)
    with pytest.raises(DataError, match="label_column"):
        real_list_state(batch, world, config=RealListConfig(label_column=3))
    state = real_list_state(batch, world)
    with pytest.raises(DataError, match="page_length"):
        world.oracle_pages(state, 7)  # some lists have only 6 documents


def test_mq2008_in_the_simulated_world(world, require_data):
    batch = load_svmlight(require_data("letor/MQ2008/S1.txt"))
    keep = batch.candidate_mask.sum(1) >= L
    batch = batch.select(keep)
    state = real_list_state(batch, world, seed=0)
    ref = world.reference(state, L)
    u = {
        "oracle": ref.oracle,
        "pointwise": world.expected_utility(state, world.pointwise_oracle_pages(state, L)),
        "random": ref.random,
    }
    assert float(u["oracle"].mean()) >= float(u["pointwise"].mean()) > float(u["random"].mean())
