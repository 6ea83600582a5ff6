"""Tests for dualrerank.losses: hand-computed cases, masks, finite gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualrerank.errors import ConfigError
from dualrerank.losses import bpr_loss, kd_loss, listwise_softmax_ce, mle_loss, pointwise_bce, position_weights

NEG = float("-inf")


def _finite_grad(x: torch.Tensor) -> bool:
    return x.grad is not None and bool(torch.isfinite(x.grad).all())


# ---------------------------------------------------------------------- listwise softmax CE
def test_listwise_softmax_ce_hand_computed():
    scores = torch.tensor([[1.0, 2.0, 0.0, 5.0]], requires_grad=True)
    gains = torch.tensor([[1.0, 3.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])  # last: padding, its gain is ignored
    loss = listwise_softmax_ce(scores, gains, mask)
    logp = torch.log_softmax(torch.tensor([1.0, 2.0, 0.0]), 0)
    expected = -(0.25 * logp[0] + 0.75 * logp[1])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert _finite_grad(scores) and scores.grad[0, 3] == 0


def test_listwise_softmax_ce_skips_requests_without_gain_and_is_minimised_by_target():
    mask = torch.ones(2, 3, dtype=torch.bool)
    gains = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 1.0]])
    good = torch.log(torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.25, 0.25]]))
    bad = torch.zeros(2, 3)
    assert listwise_softmax_ce(good, gains, mask) < listwise_softmax_ce(bad, gains, mask)
    # The all-zero request does not count: the loss equals the second request's alone.
    alone = listwise_softmax_ce(good[1:], gains[1:], mask[1:])
    assert listwise_softmax_ce(good, gains, mask).item() == pytest.approx(alone.item())


def test_listwise_softmax_ce_no_gain_gives_attached_zero():
    scores = torch.tensor([[1.0, NEG]], requires_grad=True)
    loss = listwise_softmax_ce(scores, torch.zeros(1, 2), torch.tensor([[True, False]]))
    assert loss.item() == 0.0
    loss.backward()
    assert _finite_grad(scores)


def test_listwise_softmax_ce_rejects_negative_gains():
    with pytest.raises(ValueError, match="non-negative"):
        listwise_softmax_ce(torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool))


# ---------------------------------------------------------------------- pointwise BCE
def test_pointwise_bce_masks_entries():
    logits = torch.tensor([[0.0, 2.0, 100.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss = pointwise_bce(logits, targets, mask)
    expected = (math.log(2.0) + (2.0 + math.log1p(math.exp(-2.0)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert logits.grad[0, 2] == 0


# ---------------------------------------------------------------------- MLE
def test_mle_loss_hand_computed_with_relative_weights():
    logits = torch.tensor([[[1.0, 0.0, NEG], [NEG, 2.0, 0.0]], [[0.0, 0.0, 0.0], [NEG, NEG, NEG]]], requires_grad=True)
    target = torch.tensor([[0, 2], [1, 0]])
    tmask = torch.tensor([[True, True], [True, False]])  # the fully -inf row is an absent position
    w = torch.tensor([2.0, 1.0])
    loss = mle_loss(logits, target, tmask, w)
    nll = [-math.log(math.e / (math.e + 1)), -math.log(1 / (math.e**2 + 1)), math.log(3)]
    expected = (2 * nll[0] + 2 * nll[1] + 1 * nll[2]) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert mle_loss(logits, target, tmask, 10 * w).item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert _finite_grad(logits)


def test_mle_loss_lower_for_likelier_target():
    logits = torch.tensor([[[3.0, 0.0, 0.0]]])
    m = torch.ones(1, 1, dtype=torch.bool)
    assert mle_loss(logits, torch.tensor([[0]]), m) < mle_loss(logits, torch.tensor([[1]]), m)


# ---------------------------------------------------------------------- BPR
def test_bpr_loss_single_possible_pair_hand_computed():
    # Step 0: labelled candidates 0 (label 2) and 1 (label 0): the only pair is (0, 1).
    # Step 1: candidate 0 is placed, so no pair is left; candidate 2 is unlabelled.
    logits = torch.tensor([[[0.5, 1.5, 9.0], [NEG, 0.0, 0.0]]], requires_grad=True)
    target = torch.tensor([[0, 1]])
    tmask = torch.ones(1, 2, dtype=torch.bool)
    labels = torch.tensor([[2.0, 0.0, 5.0]])
    pair_mask = torch.tensor([[True, True, False]])
    loss = bpr_loss(logits, target, tmask, labels, pair_mask, num_pairs=3, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(-1.0)).item(), abs=1e-6)
    loss.backward()
    assert _finite_grad(logits)
    assert logits.grad[0, 0, 2] == 0 and logits.grad[0, 1].abs().sum() == 0


def test_bpr_loss_pairs_respect_labels_prefix_and_mask():
    g = torch.Generator().manual_seed(1)
    B, L, n = 64, 3, 6
    labels = torch.randint(0, 3, (B, n), generator=g).float()
    pair_mask = torch.rand(B, n, generator=g) < 0.7
    target = torch.stack([torch.randperm(n, generator=g)[:L] for _ in range(B)])
    tmask = torch.ones(B, L, dtype=torch.bool)
    logits = torch.zeros(B, L, n, requires_grad=True)
    loss = bpr_loss(logits, target, tmask, labels, pair_mask, num_pairs=4, generator=g)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)  # all scores equal
    touched = logits.grad != 0
    # Gradient only on labelled candidates not placed before the step.
    placed = torch.zeros(B, L, n, dtype=torch.bool)
    for t in range(1, L):
        placed[:, t] = placed[:, t - 1] | F.one_hot(target[:, t - 1], n).bool()
    assert not (touched & ~pair_mask.unsqueeze(1)).any()
    assert not (touched & placed).any()
    # Positives get negative gradient (pushed up), negatives positive: a positive never has the lowest label.
    pushed_up = logits.grad < 0
    lowest = torch.where(pair_mask.unsqueeze(1) & ~placed, labels.unsqueeze(1), torch.full((B, L, n), 9.0)).amin(-1, keepdim=True)
    assert not (pushed_up & (labels.unsqueeze(1) == lowest)).any()


def test_bpr_loss_is_deterministic_given_generator_and_zero_without_pairs():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[0, 1]] * 4)
    tm = torch.ones(4, 2, dtype=torch.bool)
    labels = torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0]] * 4)
    pm = torch.ones(4, 5, dtype=torch.bool)
    assert bpr_loss(x, target, tm, labels, pm, 2, g1).item() == bpr_loss(x, target, tm, labels, pm, 2, g2).item()
    flat = torch.ones(4, 5)
    assert bpr_loss(x, target, tm, flat, pm, 2, g1).item() == 0.0


# ---------------------------------------------------------------------- position weights
def test_position_weights():
    u = position_weights(4, "uniform")
    assert torch.allclose(u, torch.full((4,), 0.25))
    d = position_weights(3, "dcg")
    raw = torch.tensor([1.0, 1 / math.log2(3), 0.5])
    assert torch.allclose(d, raw / raw.sum())
    assert d.sum().item() == pytest.approx(1.0) and bool((d[:-1] > d[1:]).all())
    with pytest.raises(ConfigError, match="kind"):
        position_weights(3, "linear")


# ---------------------------------------------------------------------- KD
def _teacher_q(scores: torch.Tensor, target: torch.Tensor, cmask: torch.Tensor, tau: float) -> torch.Tensor:
    B, L, n = scores.shape
    q = []
    placed = torch.zeros(B, n, dtype=torch.bool)
    for t in range(L):
        allowed = cmask & ~placed
        q.append(torch.softmax(scores[:, t].masked_fill(~allowed, NEG) / tau, -1))
        placed = placed | F.one_hot(target[:, t], n).bool()
    return torch.stack(q, 1)


def test_kd_loss_zero_kl_when_student_matches_teacher_in_prefix_mode():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 6, generator=g)
    cmask = torch.ones(3, 6, dtype=torch.bool)
    cmask[1, 5] = False
    target = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1], [5, 0, 1, 2]])
    q = _teacher_q(s, target, cmask, 2.0)
    loss, parts = kd_loss(q, s.clone(), cmask, target, tau=2.0, alpha=0.0, mask_mode="prefix")
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    # Unmasked student rows put mass on the prefix, so the KL is positive there.
    _, parts_none = kd_loss(q, s.clone(), cmask, target, tau=2.0, mask_mode="none")
    assert parts_none["kl"].item() > 1e-3


def test_kd_loss_hand_computed_terms():
    # One request, two positions, three candidates, tau = 1, uniform weights 1/2.
    q = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]])
    z = torch.zeros(1, 2, 3, requires_grad=True)
    cmask = torch.ones(1, 3, dtype=torch.bool)
    target = torch.tensor([[0, 1]])
    loss, parts = kd_loss(q, z, cmask, target, tau=1.0, alpha=0.5, unlikelihood=0.25)
    kl0 = 0.5 * math.log(0.5 / (1 / 3)) * 2
    kl1 = math.log(3.0)
    ce = math.log(3.0)  # -log(1/3) at both positions
    ul = -math.log(1 - 1 / 3)  # position 1: the teacher placed candidate 0 before it
    assert parts["kl"].item() == pytest.approx((kl0 + kl1) / 2, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert parts["unlikelihood"].item() == pytest.approx(ul / 2, abs=1e-6)
    assert loss.item() == pytest.approx((kl0 + kl1) / 2 + 0.5 * ce + 0.25 * ul / 2, abs=1e-6)
    loss.backward()
    assert _finite_grad(z)


def test_kd_loss_tau_scaling_weights_and_padding():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, generator=g)
    cmask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    target = torch.tensor([[4, 0, 1], [2, 1, 0]])
    q = _teacher_q(s, target, cmask, 1.0)
    z = torch.randn(2, 3, 5, generator=g)
    z[1, :, 3:] = float("nan")  # values at padding must be ignored
    z.requires_grad_(True)
    w = position_weights(3, "dcg")
    loss, parts = kd_loss(q, z, cmask, target, tau=3.0, alpha=0.0, position_weights=w)
    assert loss.item() == pytest.approx(9.0 * parts["kl"].item(), rel=1e-5)
    loss.backward()
    assert _finite_grad(z) and z.grad[1, :, 3:].abs().sum() == 0


def test_kd_loss_rejects_teacher_mass_on_masked_student_entries():
    q = torch.tensor([[[0.5, 0.5]]])
    with pytest.raises(ValueError, match="teacher puts mass"):
        kd_loss(q, torch.zeros(1, 1, 2), torch.tensor([[True, False]]), torch.tensor([[0]]))
    with pytest.raises(ConfigError, match="mask_mode"):
        kd_loss(q, torch.zeros(1, 1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0]]), mask_mode="all")


def test_kd_loss_target_mask_drops_positions():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    z = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    cm = torch.ones(1, 2, dtype=torch.bool)
    full, _ = kd_loss(q, z, cm, torch.tensor([[0, 1]]))
    first, _ = kd_loss(q, z, cm, torch.tensor([[0, 1]]), target_mask=torch.tensor([[True, False]]))
    assert first.item() == pytest.approx(0.5 * math.log(2.0), abs=1e-6)
    assert full.item() > first.item()


def test_kd_loss_page_unlikelihood_covers_later_page_items():
    # Page y = (0, 1) of 3 candidates. Row 0 puts its mass on item 1, which the teacher
    # places later: 'prefix' unlikelihood ignores it (nothing precedes row 0), 'page' does not.
    z = torch.tensor([[[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    q = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    y = torch.tensor([[0, 1]])
    p = torch.softmax(z.detach(), -1)
    _, prefix = kd_loss(q, z, mask, y, unlikelihood=1.0, unlikelihood_items="prefix")
    _, page = kd_loss(q, z, mask, y, unlikelihood=1.0, unlikelihood_items="page")
    # prefix: only row 1 on item 0; page: row 0 on item 1 and row 1 on item 0 (w_t = 1/2).
    assert prefix["unlikelihood"].item() == pytest.approx(0.5 * -math.log(1 - p[0, 1, 0].item()), rel=1e-5)
    expected = 0.5 * (-math.log(1 - p[0, 0, 1].item()) - math.log(1 - p[0, 1, 0].item()))
    assert page["unlikelihood"].item() == pytest.approx(expected, rel=1e-5)
    loss, _ = kd_loss(q, z, mask, y, unlikelihood=1.0, unlikelihood_items="page")
    loss.backward()
    assert z.grad[0, 0, 1] > 0  # descending pushes row 0 away from the later item
    with pytest.raises(ConfigError, match="unlikelihood_items"):
        kd_loss(q, z, mask, y, unlikelihood=1.0, unlikelihood_items="all")
