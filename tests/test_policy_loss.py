"""The policy-loss core (losses.group_advantage / clipped_policy_loss / kl_to_reference):
values worked out by hand on small tensors, and the fault cases (equal rewards, NaN
rewards, a reward spike) that must never produce NaN or an unbounded step."""

from __future__ import annotations

import math

import pytest
import torch

from dualrerank.losses import clipped_policy_loss, group_advantage, kl_to_reference, position_weights


def _r(*groups):
    return torch.tensor(groups, dtype=torch.float32)


def test_grpo_advantage_by_hand():
    # One request, 3 pages, D = 2, lambda = (1, 0.5): sums 1, 2, 3 -> mean 2, std sqrt(2/3).
    r = _r([[1.0, 0.0], [1.0, 2.0], [2.0, 2.0]])
    adv, diag = group_advantage(r, torch.tensor([1.0, 0.5]), combine="before", scale="group_std", eps=0.0)
    s = math.sqrt(2 / 3)
    assert torch.allclose(adv, torch.tensor([[-1 / s, 0.0, 1 / s]]), atol=1e-5)
    assert int(diag["zero_spread_groups"]) == 0


def test_dr_grpo_does_not_divide_by_the_group_std():
    r = _r([[1.0, 0.0], [1.0, 2.0], [2.0, 2.0]])
    adv, _ = group_advantage(r, torch.tensor([1.0, 0.5]), combine="before", scale="none")
    assert torch.allclose(adv, torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-5)


def test_ldro_centres_per_dimension_and_scales_by_the_stream():
    # dim 0: 1,1,2 -> centred -1/3,-1/3,2/3 ; dim 1: 0,2,2 -> -4/3, 2/3, 2/3
    r = _r([[1.0, 0.0], [1.0, 2.0], [2.0, 2.0]])
    coef, scale = torch.tensor([2.0, 1.0]), torch.tensor([0.5, 4.0])
    adv, diag = group_advantage(r, coef, combine="after", scale="stream", stream_scale=scale, eps=0.0)
    want = 2.0 * torch.tensor([-1 / 3, -1 / 3, 2 / 3]) / 0.5 + 1.0 * torch.tensor([-4 / 3, 2 / 3, 2 / 3]) / 4.0
    assert torch.allclose(adv, want.unsqueeze(0), atol=1e-5)
    # Shares: dim 0 contributes |4/3|+|4/3|+|8/3| = 16/3, dim 1 |1/3|+|1/6|+|1/6| = 2/3.
    assert torch.allclose(diag["dim_share"], torch.tensor([8 / 9, 1 / 9]), atol=1e-5)


def test_ldro_is_unchanged_by_a_unit_change_once_the_scale_follows():
    r = _r([[1.0, 10.0], [2.0, 30.0], [0.5, 20.0]])
    coef = torch.tensor([1.0, 0.1])
    a, _ = group_advantage(r, coef, combine="after", scale="stream", stream_scale=torch.tensor([1.0, 10.0]))
    r_ms = r * torch.tensor([1.0, 1000.0])
    b, _ = group_advantage(r_ms, coef, combine="after", scale="stream", stream_scale=torch.tensor([1.0, 10_000.0]))
    assert torch.allclose(a, b, atol=1e-5)


def test_gdpo_z_scores_each_dimension_then_the_batch():
    r = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    adv, _ = group_advantage(r, torch.tensor([1.0, 2.0, 0.5]), combine="after", scale="group_std", batch_norm=True, eps=0.0)
    assert abs(float(adv.mean())) < 1e-5 and abs(float(adv.std(unbiased=False)) - 1.0) < 1e-4
    # Invariant to a per-dimension affine change of units.
    r2 = r * torch.tensor([1.0, 1000.0, 3.0]) + torch.tensor([5.0, -2.0, 0.0])
    adv2, _ = group_advantage(r2, torch.tensor([1.0, 2.0, 0.5]), combine="after", scale="group_std", batch_norm=True, eps=0.0)
    assert torch.allclose(adv, adv2, atol=1e-4)


@pytest.mark.parametrize("combine, scale", [("before", "group_std"), ("before", "none"), ("after", "group_std"),
                                            ("after", "stream")])
def test_equal_rewards_give_zero_advantage_and_are_counted(combine, scale):
    r = torch.ones(2, 4, 2)
    r[1, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # group 1 has spread in one dimension
    adv, diag = group_advantage(r, torch.tensor([1.0, 1.0]), combine=combine, scale=scale,
                                stream_scale=torch.ones(2 if combine == "after" else 1))
    assert torch.equal(adv[0], torch.zeros(4)) and bool(adv[1].abs().sum() > 0)
    assert int(diag["zero_spread_groups"]) == 1
    assert torch.isfinite(adv).all()


def test_non_finite_rewards_are_masked_out_and_counted():
    r = _r([[1.0], [float("nan")], [3.0], [float("inf")]])
    adv, diag = group_advantage(r, torch.tensor([1.0]), combine="before", scale="none")
    assert torch.allclose(adv, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    assert int(diag["masked_pages"]) == 2


def test_clipped_loss_by_hand():
    old = torch.zeros(1, 2, 2)
    logp = torch.log(torch.tensor([[[1.5, 1.0], [0.5, 1.0]]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0]])
    w = torch.tensor([0.75, 0.25])
    loss, diag = clipped_policy_loss(logp, old, adv, w, clip_eps=0.2)
    # page 0: min(1.5, 1.2)*1 at t0 -> 1.2; t1 ratio 1 -> 1. -> 0.75*1.2+0.25*1 = 1.15
    # page 1: A=-1: min(-0.5, -0.8) = -0.8 at t0; t1: -1 -> 0.75*-0.8+0.25*-1 = -0.85
    assert torch.allclose(loss, torch.tensor(-(1.15 - 0.85) / 2), atol=1e-6)
    assert torch.allclose(diag["clipfrac"], torch.tensor(0.5))  # both t0 positions clipped
    loss.backward()
    # Clipped positions pass no gradient.
    assert float(logp.grad[0, 0, 0]) == 0.0 and float(logp.grad[0, 1, 0]) == 0.0
    assert float(logp.grad[0, 0, 1]) != 0.0


def test_ratios_are_one_and_kl_zero_when_nothing_changed():
    lp = torch.randn(3, 4, 5)
    loss, diag = clipped_policy_loss(lp.clone().requires_grad_(), lp, torch.randn(3, 4), position_weights(5, "dcg"))
    assert float(diag["approx_kl"]) == 0.0 and float(diag["clipfrac"]) == 0.0
    assert abs(float(diag["ess"]) - 1.0) < 1e-6 and float(diag["ratio_max"]) == 1.0
    assert float(kl_to_reference(lp, lp, position_weights(5))) == 0.0


def test_kl_to_reference_by_hand():
    logp = torch.log(torch.tensor([[[0.5]]]))
    ref = torch.log(torch.tensor([[[0.25]]]))
    d = math.log(0.25) - math.log(0.5)
    assert torch.allclose(kl_to_reference(logp, ref, torch.ones(1)), torch.tensor(math.exp(d) - d - 1), atol=1e-6)
