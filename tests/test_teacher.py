"""AR teacher: valid pages, incremental == full recomputation, beam vs greedy, likelihoods."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualrerank.errors import ConfigError, DataError
from dualrerank.models.encoder import EncoderConfig
from dualrerank.models.teacher import ARTeacher, TeacherConfig
from dualrerank.schema import RerankBatch

from random_batches import D_CTX, D_IN, make_batch


def make_teacher(seed: int = 0, **kw) -> ARTeacher:
    enc = EncoderConfig(candidate_dim=D_IN, context_dim=D_CTX, d_model=32, n_heads=4, n_layers=1, dropout=0.0)
    cfg = TeacherConfig(encoder=enc, n_layers=2, n_heads=4, max_length=6, dropout=0.0, **kw)
    with torch.random.fork_rng():  # seeded weights without touching other tests' RNG
        torch.manual_seed(seed)
        return ARTeacher(cfg).eval()


TEACHER = make_teacher()


def assert_valid_pages(pages: torch.Tensor, mask: torch.Tensor) -> None:
    p = pages if pages.dim() == 3 else pages.unsqueeze(1)
    B, G, _ = p.shape
    assert bool(torch.gather(mask.unsqueeze(1).expand(B, G, -1), 2, p).all()), "page holds padding"
    assert bool((p.sort(dim=-1).values.diff(dim=-1) != 0).all()), "page repeats a candidate"


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 8), st.data())
def test_every_teacher_decoder_returns_valid_pages(seed, B, n, data):
    k = data.draw(st.integers(1, min(n, 6)))
    batch = make_batch(seed, B, n, k)
    gen = torch.Generator().manual_seed(seed)
    for pages in (
        TEACHER.rerank(batch, k),
        TEACHER.decode(batch, k, "sample", generator=gen, temperature=2.0),
        TEACHER.decode(batch, k, "beam", beam_width=5),
        TEACHER.sample(batch, k, group=3, generator=gen),
    ):
        assert pages.shape[-1] == k and pages.shape[0] == B
        assert_valid_pages(pages, batch.candidate_mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_incremental_decoding_equals_full_recomputation(seed):
    teacher, batch = make_teacher(seed), make_batch(seed + 10, B=4, n=8, min_valid=5)
    k = 5
    for greedy in (True, False):
        runs = []
        for incremental in (True, False):
            gen = torch.Generator().manual_seed(99)
            runs.append(teacher.rollout(batch, k, group=3, greedy=greedy, temperature=1.5, generator=gen, incremental=incremental))
        (p_inc, z_inc), (p_full, z_full) = runs
        assert torch.equal(p_inc, p_full)
        torch.testing.assert_close(z_inc, z_full, atol=1e-5, rtol=0)
        # The decoder's step logits are the teacher-forced ones along its own page.
        forced = teacher.step_logits(batch, p_inc[:, 0])
        torch.testing.assert_close(z_inc[:, 0], forced, atol=1e-5, rtol=0)
    for width in (1, 3):
        inc, inc_score = teacher.beam(batch, k, width, incremental=True)
        full, full_score = teacher.beam(batch, k, width, incremental=False)
        assert torch.equal(inc, full)
        torch.testing.assert_close(inc_score, full_score, atol=1e-5, rtol=0)


def test_sampling_is_seeded():
    batch = make_batch(5)
    a = TEACHER.sample(batch, 3, group=4, generator=torch.Generator().manual_seed(1))
    b = TEACHER.sample(batch, 3, group=4, generator=torch.Generator().manual_seed(1))
    c = TEACHER.sample(batch, 3, group=4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("seed", range(4))
def test_beam_page_is_at_least_as_likely_as_greedy(seed):
    teacher, batch = make_teacher(seed), make_batch(seed + 100, B=6, n=8, min_valid=5)
    k = 5
    greedy = teacher.rerank(batch, k)
    beam, beam_score = teacher.beam(batch, k, width=4)
    with torch.no_grad():
        ll_greedy = teacher.log_prob(batch, greedy).sum(-1)
        ll_beam = teacher.log_prob(batch, beam).sum(-1)
    torch.testing.assert_close(ll_beam, beam_score, atol=1e-5, rtol=0)
    assert bool((ll_beam >= ll_greedy - 1e-5).all())


def test_log_prob_is_a_distribution_over_pages():
    batch = make_batch(3, B=2, n=5, min_valid=4)
    for b in range(2):
        one = batch.select([b])
        valid = one.candidate_mask[0].nonzero().flatten().tolist()
        pages = torch.tensor(list(itertools.permutations(valid, 3)))
        many = one.select([0] * len(pages))
        with torch.no_grad():
            total = TEACHER.log_prob(many, pages).sum(-1).exp().sum()
        assert float(total) == pytest.approx(1.0, abs=1e-4)


def test_step_logits_mask_and_step_distributions():
    batch = make_batch(4, B=3, n=7, min_valid=4)
    pages = TEACHER.rerank(batch, 4)
    s = TEACHER.step_logits(batch, pages)
    assert s.shape == (3, 4, 7)
    assert bool(torch.isneginf(s[~batch.candidate_mask.unsqueeze(1).expand_as(s)]).all())
    for t in range(1, 4):
        assert bool(torch.isneginf(s[:, t].gather(1, pages[:, :t])).all())
    q = TEACHER.step_distributions(batch, pages, tau=0.5)
    torch.testing.assert_close(q.sum(-1), torch.ones(3, 4))
    assert bool((q[torch.isneginf(s)] == 0).all())
    torch.testing.assert_close(q, (s / 0.5).softmax(-1))
    # Greedy picks the mode of every step distribution.
    assert torch.equal(q.argmax(-1), pages)


def test_page_mask_handles_short_logged_pages_without_nan():
    batch = make_batch(6, B=2, n=5, min_valid=2)
    batch.candidate_mask[0] = torch.tensor([True, True, False, False, False])
    batch.candidate_mask[1] = True
    pages = torch.tensor([[1, 0, -1, -1], [2, 4, 0, 1]])  # -1: filler at ignored slots
    page_mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    teacher = make_teacher(1).train()
    lp = teacher.log_prob(batch, pages, page_mask)
    assert bool((lp[0, 2:] == 0).all()) and lp[1, 3] == 0 and bool(torch.isfinite(lp).all())
    (-lp.sum()).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in teacher.parameters() if p.grad is not None)
    q = teacher.step_distributions(batch, pages, page_mask=page_mask)
    assert bool((q[0, 2:] == 0).all()) and bool((q[1, 3] == 0).all())
    assert float(q[0, 1].sum().detach()) == pytest.approx(1.0)
    with pytest.raises(DataError, match="prefix"):
        teacher.log_prob(batch, pages, torch.tensor([[True, False, True, False], [True] * 4]))


def test_padding_content_does_not_change_decoding():
    batch = make_batch(8, B=3, n=7, min_valid=4)
    other = make_batch(8, B=3, n=7, min_valid=4)
    other.candidates[~other.candidate_mask] = -7.0
    assert torch.equal(TEACHER.rerank(batch, 4), TEACHER.rerank(other, 4))
    torch.testing.assert_close(TEACHER.log_prob(batch, TEACHER.rerank(batch, 4)), TEACHER.log_prob(other, TEACHER.rerank(batch, 4)))


def test_teacher_learns_a_target_order():
    """Teacher-forced MLE drives greedy decoding to the target (sort by feature 0)."""
    teacher = make_teacher(3).train()
    batch = make_batch(11, B=32, n=6, min_valid=6)
    teacher.fit_normalizer(batch)
    target = batch.candidates[:, :, 0].argsort(dim=1, descending=True)[:, :3]
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(120):
        loss = -teacher.log_prob(batch, target).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    assert float((teacher.rerank(batch, 3) == target).float().mean()) > 0.9


def test_bad_input_and_config_are_clear_errors():
    batch = make_batch(0, B=2, n=5, min_valid=3)
    with pytest.raises(DataError, match="max_length"):
        TEACHER.rerank(make_batch(0, B=1, n=9, min_valid=9), 7)
    short = make_batch(0, B=2, n=5, min_valid=5)
    short.candidate_mask[1, 2:] = False
    with pytest.raises(DataError, match="3 > 2 valid candidates in request 1"):
        TEACHER.rerank(short, 3)
    with pytest.raises(DataError, match="feature width"):
        TEACHER.rerank(RerankBatch(torch.randn(1, 4, D_IN + 1), torch.ones(1, 4, dtype=torch.bool), torch.randn(1, D_CTX)), 2)
    with pytest.raises(ConfigError, match="strategy"):
        TEACHER.decode(batch, 2, "topk")
    with pytest.raises(ConfigError, match="temperature"):
        TEACHER.decode(batch, 2, "sample", temperature=0.0)
    with pytest.raises(ConfigError, match="beam_width"):
        TEACHER.decode(batch, 2, "beam", beam_width=0)
    first_valid = batch.candidate_mask.long().argmax(dim=1, keepdim=True)
    with pytest.raises(DataError, match="repeats"):
        TEACHER.log_prob(batch, first_valid.repeat(1, 2))
    with pytest.raises(ConfigError, match="candidate_dim"):
        ARTeacher(TeacherConfig())
