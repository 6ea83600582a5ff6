"""Tests for dualrerank.feedback: one realised gain, the same in any unit of a feedback column."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dualrerank.errors import DataError
from dualrerank.feedback import (
    FEEDBACK_NAMES,
    GAIN_NAMES,
    NATURAL_UNITS,
    gather_along,
    graded_column,
    graded_feedback,
    has_page_gain,
    occurred,
    page_feedback,
    page_gain,
    realised_gain,
    shown_gain,
)
from dualrerank.models.baselines import supervised_gains
from dualrerank.models.encoder import EncoderConfig
from dualrerank.models.evaluator import EvaluatorConfig, ListEvaluator
from dualrerank.schema import RerankBatch
from dualrerank.train.objectives import pair_labels
from dualrerank.train.targets import logged_targets

NAMES = ("click", "long_view", "watch_time")


def logged_batch(B: int = 6, n: int = 8, L: int = 5, seed: int = 0) -> RerankBatch:
    """Logs in natural units (0/1 click and long view, seconds watched), feedback both per
    position and as labels scattered onto the candidates (as the simulated logs), with
    ragged pages: absent positions hold garbage that must never be read."""
    g = torch.Generator().manual_seed(seed)
    page = torch.stack([torch.randperm(n, generator=g)[:L] for _ in range(B)])
    pmask = torch.arange(L).unsqueeze(0) < torch.randint(2, L + 1, (B, 1), generator=g)
    click = (torch.rand(B, L, generator=g) < 0.5).float()
    long_view = click * (torch.rand(B, L, generator=g) < 0.5).float()
    watch = click * 100 * torch.rand(B, L, generator=g)
    fb = torch.stack([click, long_view, watch], dim=-1) * pmask.unsqueeze(-1)
    labels = torch.zeros(B, n, 3)
    for r, t in pmask.nonzero().tolist():
        labels[r, page[r, t]] = fb[r, t]
    fb = torch.where(pmask.unsqueeze(-1), fb, torch.full_like(fb, -7.0))  # garbage at absent positions
    return RerankBatch(
        candidates=torch.randn(B, n, 3, generator=g), candidate_mask=torch.ones(B, n, dtype=torch.bool),
        context=torch.randn(B, 2, generator=g), labels=labels, label_names=NAMES,
        logged_page=page, logged_page_mask=pmask, logged_feedback=fb, feedback_names=NAMES,
        upstream_score=torch.randn(B, n, generator=g),
    ).validate()


def rescaled(batch: RerankBatch, scales: dict[str, float]) -> RerankBatch:
    """The same logs with feedback columns reported in other units (column x scale)."""
    s = torch.tensor([scales.get(x, 1.0) for x in NAMES])
    fb = torch.where(batch.logged_page_mask.unsqueeze(-1), batch.logged_feedback * s, batch.logged_feedback)
    return replace(batch, logged_feedback=fb, labels=batch.labels * s)


def evaluator_for(batch: RerankBatch) -> ListEvaluator:
    enc = EncoderConfig(candidate_dim=batch.candidate_dim, context_dim=batch.context_dim, d_model=8, n_heads=2, n_layers=1)
    return ListEvaluator(EvaluatorConfig(encoder=enc, n_layers=1, max_positions=8))


def everything(batch: RerankBatch) -> dict[str, torch.Tensor]:
    """What every learner reads from logged feedback."""
    t = logged_targets(batch, 4)
    labels, labelled = pair_labels(batch)
    gains, shown = supervised_gains(batch)
    pages, pmask, targets = evaluator_for(batch).training_targets(batch)
    return {
        "targets.pages": t.pages, "targets.mask": t.mask, "targets.weights": t.weights,
        "pair.labels": labels, "pair.mask": labelled, "baseline.gains": gains, "baseline.mask": shown,
        "evaluator.pages": pages, "evaluator.mask": pmask, "evaluator.targets": targets,
    }


# ---------------------------------------------------------------------- the unit change
@pytest.mark.parametrize(
    "scales",
    [
        {"click": 1000.0, "watch_time": 1000.0},  # clicks reported x1000, watch time in ms
        {"long_view": 1000.0},
        {"click": 1e-3, "long_view": 7.5, "watch_time": 1e-3},
    ],
)
def test_every_learner_reads_the_same_gain_in_any_unit(scales):
    batch = logged_batch()
    before, after = everything(batch), everything(rescaled(batch, scales))
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


def test_natural_units_give_click_plus_long_view():
    batch = logged_batch(seed=1)
    fb, pm = batch.logged_feedback, batch.logged_page_mask
    want = torch.where(pm, fb[..., 0] + fb[..., 1], torch.zeros_like(fb[..., 0]))
    gain, mask = page_gain(batch)
    assert torch.equal(mask, pm) and torch.equal(gain, want)
    assert torch.equal(everything(batch)["pair.labels"], batch.labels[..., 0] + batch.labels[..., 1])
    pages, pmask, targets = evaluator_for(batch).training_targets(batch)
    assert torch.equal(targets[pmask], fb[..., :2][pm])


def test_simulated_stream_in_other_units_trains_the_same_targets():
    from dualrerank.data.synthetic import generate_logs
    from dualrerank.sim.config import WorldConfig

    base = WorldConfig()
    other = replace(base, utility=replace(base.utility, scale_click=1000.0, scale_watch_time=1000.0))
    a, b = generate_logs(base, 40, seed=5), generate_logs(other, 40, seed=5)
    assert torch.equal(b.logged_feedback[..., 0], 1000 * a.logged_feedback[..., 0])  # the unit did change
    before, after = everything(a), everything(b)
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


def test_click_only_logs_mind_style_in_other_units():
    page = torch.arange(4).expand(2, 4)
    click = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    batch = RerankBatch(
        candidates=torch.randn(2, 4, 3), candidate_mask=torch.ones(2, 4, dtype=torch.bool), context=torch.zeros(2, 1),
        labels=click.unsqueeze(-1), label_names=("click",), logged_page=page,
        logged_page_mask=torch.ones(2, 4, dtype=torch.bool), logged_feedback=click.unsqueeze(-1), feedback_names=("click",),
    ).validate()
    gains, shown = supervised_gains(batch)
    assert torch.equal(gains, click) and bool(shown.all())
    big = replace(batch, labels=1000 * batch.labels, logged_feedback=1000 * batch.logged_feedback)
    for x, y in zip(supervised_gains(big), (gains, shown)):
        assert torch.equal(x, y)
    assert torch.equal(logged_targets(big, 4).pages, logged_targets(batch, 4).pages)
    assert torch.equal(pair_labels(big)[0], click)


# ---------------------------------------------------------------------- the gain by hand
def test_realised_gain_by_hand():
    #                       click  long_view  watch_time
    values = torch.tensor([[0.0, 0.0, 0.0],      # nothing
                           [1.0, 0.0, 12.0],     # click
                           [1.0, 1.0, 95.0],     # long view
                           [1000.0, 0.0, 5e3],   # click, in other units
                           [1000.0, 1e3, 9e4],   # long view, in other units
                           [0.0, 1.0, 0.0],      # long view without a click: one level, as a click
                           [0.4, 0.0, 0.0],      # a fractional value happened
                           [0.0, 0.0, 300.0]])   # watch time alone is no gain
    assert realised_gain(values, NAMES).tolist() == [0, 1, 2, 1, 2, 1, 1, 0]
    # Column order and extra columns do not matter; a missing gain column adds nothing.
    assert realised_gain(values[:, [2, 1, 0]], ("watch_time", "long_view", "click")).tolist() == [0, 1, 2, 1, 2, 1, 1, 0]
    assert realised_gain(values[:, :1], ("click",)).tolist() == [0, 1, 1, 1, 1, 0, 1, 0]
    with pytest.raises(DataError, match="no 'click' or 'long_view' column"):
        realised_gain(values[:, 2:], ("watch_time",))
    assert GAIN_NAMES == ("click", "long_view") and set(NATURAL_UNITS) == set(FEEDBACK_NAMES)


def test_bad_feedback_at_shown_positions_is_an_error_and_ignored_elsewhere():
    values = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[0.0, math.nan], [1.0, 1.0]]])
    with pytest.raises(DataError, match=r"'click' is -1 at a shown position in request 0"):
        occurred(values, ("click", "long_view"))
    valid = torch.tensor([[True, False], [True, True]])
    with pytest.raises(DataError, match=r"'long_view' is nan .* in request 1"):
        realised_gain(values, ("click", "long_view"), valid)
    valid[1, 0] = False
    assert realised_gain(values, ("click", "long_view"), valid)[valid].tolist() == [1, 2]
    batch = logged_batch()
    bad = batch.logged_feedback.clone()
    bad[3, 0, 1] = -2.0
    with pytest.raises(DataError, match=r"logged_feedback: 'long_view' is -2 .* in request 3"):
        logged_targets(replace(batch, logged_feedback=bad), 4)
    with pytest.raises(DataError, match="logged_feedback: 'long_view' is -2"):
        evaluator_for(batch).loss(replace(batch, logged_feedback=bad))


# ---------------------------------------------------------------------- along the page
def test_page_feedback_from_feedback_or_labels_and_shown_gain():
    batch = logged_batch(seed=2)
    pm = batch.logged_page_mask
    a, ma = page_feedback(batch, ("long_view", "click"))
    b, mb = page_feedback(replace(batch, logged_feedback=None), ("long_view", "click"))
    assert torch.equal(ma, mb) and torch.equal(a[pm], b[pm])
    assert torch.equal(page_gain(batch)[0], page_gain(replace(batch, logged_feedback=None))[0])
    gains, shown = shown_gain(batch)
    assert torch.equal(shown.sum(1), pm.sum(1))
    for r in range(batch.batch_size):
        for t in range(int(pm[r].sum())):
            i = int(batch.logged_page[r, t])
            assert shown[r, i] and gains[r, i] == page_gain(batch)[0][r, t]
    with pytest.raises(DataError, match="no column named 'clicks'"):
        page_feedback(batch, ("clicks",))
    with pytest.raises(DataError, match="logged_page: missing"):
        page_gain(replace(batch, logged_page=None, logged_page_mask=None))
    assert has_page_gain(batch) and not has_page_gain(replace(batch, logged_page=None, logged_page_mask=None))


def test_an_absent_position_repeating_a_shown_index_does_not_unshow_it():
    fb = torch.tensor([[[1.0, 1.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    batch = RerankBatch(
        candidates=torch.zeros(1, 4, 2), candidate_mask=torch.ones(1, 4, dtype=torch.bool), context=torch.zeros(1, 1),
        labels=torch.zeros(1, 4, 3).index_copy(1, torch.tensor([0, 2]), fb[:, :2]), label_names=NAMES,
        logged_page=torch.tensor([[0, 2, 0]]), logged_page_mask=torch.tensor([[True, True, False]]),
        logged_feedback=fb, feedback_names=NAMES,
    )
    for gains, shown in (shown_gain(batch), pair_labels(batch), supervised_gains(batch)):
        assert shown.tolist() == [[True, False, True, False]] and gains.tolist() == [[2.0, 0.0, 0.0, 0.0]]


def test_gather_along_pages_and_groups():
    values = torch.arange(12.0).view(1, 4, 3)
    assert gather_along(values, torch.tensor([[2, 0]])).tolist() == [[[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]]
    assert gather_along(values, torch.tensor([[[3], [1]]])).shape == (1, 2, 1, 3)


# ---------------------------------------------------------------------- graded lists
def test_graded_column_and_feedback():
    rel = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    assert graded_feedback(rel, 2.0).tolist() == [[[0, 0], [1, 0], [1, 1], [1, 1]]]
    one = RerankBatch(candidates=torch.zeros(1, 4, 2), candidate_mask=torch.ones(1, 4, dtype=torch.bool),
                      context=torch.zeros(1, 1), labels=rel.unsqueeze(-1), label_names=("relevance",))
    assert torch.equal(graded_column(one), rel)
    two = replace(one, labels=torch.stack([rel + 9, rel], -1), label_names=("other", "relevance"))
    assert torch.equal(graded_column(two), rel)
    with pytest.raises(DataError, match="none named 'relevance'"):
        graded_column(replace(two, label_names=("a", "b")))
    assert not has_page_gain(one)


def test_feedback_names_agree_with_the_world():
    from dualrerank.sim.config import FEEDBACK_NAMES as WORLD_NAMES

    assert FEEDBACK_NAMES == WORLD_NAMES == NAMES
