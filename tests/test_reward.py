"""The reward system (reward.py): rules by hand on small pages, the posterior's mix of
realised feedback and prediction, and a user-written rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualrerank.errors import ConfigError, DataError
from dualrerank.reward import (
    PageFeedback,
    RewardSystem,
    category_cap,
    duplicate_items,
    logged_labels,
    posterior,
    viewport_diversity,
)
from dualrerank.schema import RerankBatch


def _batch(n: int = 6, item_ids=None, categories=None) -> RerankBatch:
    b = RerankBatch(candidates=torch.zeros(1, n, 2), candidate_mask=torch.ones(1, n, dtype=torch.bool),
                    context=torch.zeros(1, 1), upstream_score=torch.arange(n, dtype=torch.float32).unsqueeze(0),
                    labels=torch.tensor([[[0.0], [1.0], [2.0], [0.0], [1.0], [3.0]]])[:, :n],
                    item_ids=None if item_ids is None else torch.tensor([item_ids]))
    if categories is not None:
        object.__setattr__(b, "categories", torch.tensor([categories]))
    return b


PAGES = torch.tensor([[[0, 1, 2, 3], [5, 4, 3, 2], [1, 0, 5, 4]]])  # [B=1, G=3, L=4]


def test_posterior_uses_the_realised_feedback_where_shown_and_the_prediction_elsewhere():
    clicks = torch.tensor([[[1.0, 0, 1, 0], [9, 9, 9, 9], [9, 9, 9, 9]]])  # only page 0 was shown
    fb = PageFeedback({"click": clicks}, shown=torch.tensor([[True, False, False]]))
    rule = posterior("click", lambda batch, pages: torch.full(pages.shape[:2], 0.5))
    assert torch.equal(rule(_batch(), PAGES, fb), torch.tensor([[2.0, 0.5, 0.5]]))
    # Without a predictor, unseen pages are NaN (the learner masks them out).
    assert torch.isnan(posterior("click")(_batch(), PAGES, fb)[0, 1:]).all()


def test_logged_labels_sum_along_the_page():
    assert torch.equal(logged_labels(0)(_batch(), PAGES, None), torch.tensor([[3.0, 6.0, 5.0]]))


def test_duplicate_items_counts_repeated_item_ids():
    b = _batch(item_ids=[7, 7, 8, 9, 9, 9])
    # page 0: 7,7,8,9 -> 1 dup ; page 1: 9,9,9,8 -> 2 ; page 2: 7,7,9,9 -> 2
    assert torch.equal(duplicate_items(b, PAGES), torch.tensor([[-1.0, -2.0, -2.0]]))


def test_viewport_diversity_and_category_cap_by_hand():
    b = _batch(categories=[0, 0, 1, 2, 2, 2])
    # viewport k=2: page0 cats 0,0 -> 1 ; page1 2,2 -> 1 ; page2 0,0 -> 1; k=4: 0,0,1,2 ->3 ; 2,2,2,1 -> 2 ; 0,0,2,2 -> 2
    assert torch.equal(viewport_diversity(4)(b, PAGES), torch.tensor([[3.0, 2.0, 2.0]]))
    # cap 1: page0 has two of cat 0 -> 1 excess ; page1 three of cat 2 -> 2 ; page2 two and two -> 2
    assert torch.allclose(category_cap(1)(b, PAGES), torch.tensor([[-1.0, -2.0, -2.0]]))
    with pytest.raises(DataError, match="categories"):
        viewport_diversity(4)(_batch(), PAGES)


def test_a_user_rule_in_a_few_lines_and_shape_errors():
    def freshness(batch, pages, feedback):
        s = batch.upstream_score.gather(1, pages.flatten(1)).view(pages.shape)
        return s.mean(-1)

    system = RewardSystem({"labels": logged_labels(0), "freshness": freshness})
    rv = system(_batch(), PAGES)
    assert rv.names == ("labels", "freshness") and rv.values.shape == (1, 3, 2)
    assert torch.allclose(rv.column("freshness"), torch.tensor([[1.5, 3.5, 2.5]]))
    with pytest.raises(DataError, match="returned shape"):
        RewardSystem({"bad": lambda b, p, f: torch.zeros(3)})(_batch(), PAGES)
    with pytest.raises(ConfigError):
        RewardSystem({})


def test_reward_module_never_imports_the_simulator():
    import ast
    from pathlib import Path

    import dualrerank.reward as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in names if m and (m.startswith("dualrerank.sim") or m.startswith("dualrerank.models"))]
