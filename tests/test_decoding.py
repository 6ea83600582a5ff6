"""Decoders: validity of every page, exactness of Gumbel-Max, beam search vs brute force."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from dualrerank.decoding import (
    beam_search,
    check_pages,
    gumbel_max_pages,
    masked_argmax,
    masked_greedy,
    placed_before,
    sequential_log_prob,
    sort_pages,
)
from dualrerank.errors import ConfigError, DataError

FAST = settings(max_examples=40, deadline=None)


@pytest.mark.skipif(os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci", reason="another Hypothesis profile was asked for")
def test_property_tests_run_the_fixed_ci_profile():
    # conftest.py loads it: examples derive from each test's name, so a failure in CI
    # reproduces anywhere; a test's own settings change only the fields they name.
    for s in (settings.default, FAST):
        assert s.derandomize and s.database is None and s.print_blob and s.deadline is None
    assert settings.default.max_examples <= 100 and FAST.max_examples == 40


def random_mask(B: int, n: int, min_valid: int, gen: torch.Generator) -> torch.Tensor:
    """`[B, n]` bool with a random count in [min_valid, n] of valid candidates at random slots."""
    counts = torch.randint(min_valid, n + 1, (B, 1), generator=gen)
    ranks = torch.rand(B, n, generator=gen).argsort(dim=1).argsort(dim=1)
    return ranks < counts


def assert_valid_pages(pages: torch.Tensor, mask: torch.Tensor) -> None:
    """Every page: in range, no padding, no repeats."""
    p = pages if pages.dim() == 3 else pages.unsqueeze(1)
    B, G, L = p.shape
    assert p.dtype == torch.int64
    assert bool(((p >= 0) & (p < mask.shape[1])).all())
    assert bool(torch.gather(mask.unsqueeze(1).expand(B, G, -1), 2, p).all()), "page holds padding"
    assert bool((p.sort(dim=-1).values.diff(dim=-1) != 0).all()), "page repeats a candidate"


cases = st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31 - 1)).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.integers(1, t[1]), st.just(t[2]))
)


def make_case(B: int, n: int, L: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(B, n, L, gen)
    logits = torch.randn(B, L, n, generator=gen) * 3
    return gen, mask, logits


# ---------------------------------------------------------------------------- greedy
@FAST
@given(cases)
def test_masked_greedy_is_sequential_masked_argmax(case):
    B, n, L, seed = case
    _, mask, logits = make_case(B, n, L, seed)
    pages = masked_greedy(logits, mask)
    assert pages.shape == (B, L)
    assert_valid_pages(pages, mask)
    for b in range(B):
        left = set(mask[b].nonzero().flatten().tolist())
        for t in range(L):
            best = max(sorted(left), key=lambda i: float(logits[b, t, i]))
            assert int(pages[b, t]) == best
            left.remove(best)


def test_masked_greedy_never_picks_padding_even_with_bad_scores():
    mask = torch.tensor([[False, True, True, False]])
    logits = torch.tensor([[[9.0, float("-inf"), float("nan"), 9.0], [9.0, float("-inf"), float("-inf"), 9.0]]])
    pages = masked_greedy(logits, mask)
    assert sorted(pages[0].tolist()) == [1, 2]


def test_masked_argmax_ties_go_to_lowest_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0]])
    assert int(masked_argmax(scores, torch.tensor([[True, False, True, True]]))) == 2


def test_too_short_request_is_a_data_error():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with pytest.raises(DataError, match="request 1"):
        masked_greedy(torch.zeros(2, 2, 3), mask)
    with pytest.raises(DataError, match="request 1"):
        gumbel_max_pages(torch.zeros(2, 2, 3), mask, group=2)
    with pytest.raises(DataError, match="request 1"):
        sort_pages(torch.zeros(2, 3), mask, 2)


# ---------------------------------------------------------------------------- Gumbel-Max
@FAST
@given(cases, st.integers(1, 5), st.booleans())
def test_gumbel_max_pages_are_valid(case, G, include_greedy):
    B, n, L, seed = case
    gen, mask, logits = make_case(B, n, L, seed)
    pages = gumbel_max_pages(logits, mask, G, temperature=0.7, generator=gen, include_greedy=include_greedy)
    assert pages.shape == (B, G, L)
    assert_valid_pages(pages, mask)
    if include_greedy:
        assert torch.equal(pages[:, 0], masked_greedy(logits, mask))


def exact_page_probs(logits: torch.Tensor, valid: list[int], L: int, temperature: float) -> dict[tuple, float]:
    """P_S(pi) by explicit enumeration, written independently of the library code."""
    probs = {}
    for page in itertools.permutations(valid, L):
        p, left = 1.0, list(valid)
        for t, item in enumerate(page):
            z = [float(logits[t, i]) / temperature for i in left]
            m = max(z)
            p *= math.exp(float(logits[t, item]) / temperature - m) / sum(math.exp(v - m) for v in z)
            left.remove(item)
        probs[page] = p
    return probs


@pytest.mark.parametrize("L,temperature", [(2, 1.0), (3, 0.7)])
def test_gumbel_max_matches_sequential_softmax(L, temperature):
    gen = torch.Generator().manual_seed(1234)
    mask = torch.tensor([[True, True, False, True, True]])  # one padded slot inside
    logits = torch.randn(1, L, 5, generator=gen)
    logits[0, :, 2] = 50.0  # padding with a huge score must never be drawn
    draws = 40_000
    pages = gumbel_max_pages(logits, mask, group=draws, temperature=temperature, generator=gen)[0]
    probs = exact_page_probs(logits[0], [0, 1, 3, 4], L, temperature)
    assert abs(sum(probs.values()) - 1.0) < 1e-9
    index = {page: j for j, page in enumerate(probs)}
    observed = np.zeros(len(probs))
    for row in pages.tolist():
        observed[index[tuple(row)]] += 1  # KeyError would mean an invalid page
    expected = np.array(list(probs.values())) * draws
    assert expected.min() > 5, "test case too peaked for a chi-square test"
    assert chisquare(observed, expected).pvalue > 1e-3


def test_gumbel_max_is_reproducible_and_checks_arguments():
    logits, mask = torch.randn(2, 3, 6), torch.ones(2, 6, dtype=torch.bool)
    a = gumbel_max_pages(logits, mask, 4, generator=torch.Generator().manual_seed(7))
    b = gumbel_max_pages(logits, mask, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="temperature"):
        gumbel_max_pages(logits, mask, 4, temperature=0.0)
    with pytest.raises(ConfigError, match="group"):
        gumbel_max_pages(logits, mask, 0)


# ---------------------------------------------------------------------------- log-probs
@FAST
@given(cases)
def test_sequential_log_prob_matches_reference_and_normalises(case):
    B, n, L, seed = case
    gen, mask, logits = make_case(B, n, min(L, 3), seed)
    L = logits.shape[1]
    pages = gumbel_max_pages(logits, mask, 3, generator=gen)
    lp = sequential_log_prob(logits, mask, pages)
    assert lp.shape == (B, 3, L)
    for b in range(B):
        valid = mask[b].nonzero().flatten().tolist()
        probs = exact_page_probs(logits[b], valid, L, 1.0)
        for g in range(3):
            ref = math.log(probs[tuple(pages[b, g].tolist())])
            assert abs(float(lp[b, g].sum()) - ref) < 1e-4
        if len(probs) <= 120:  # all pages: probabilities sum to one
            all_pages = torch.tensor(list(probs)).unsqueeze(0)
            all_lp = sequential_log_prob(logits[b : b + 1], mask[b : b + 1], all_pages)
            assert abs(float(all_lp.sum(-1).exp().sum()) - 1.0) < 1e-4
    assert torch.equal(sequential_log_prob(logits, mask, pages[:, 0]), lp[:, 0])


def test_sequential_log_prob_page_mask_and_gradients():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    pages = torch.tensor([[1, 0, -1], [3, 1, 2]])  # request 0 has only 2 items: position 2 is filler
    page_mask = torch.tensor([[True, True, False], [True, True, True]])
    lp = sequential_log_prob(logits, mask, pages, page_mask)
    assert lp[0, 2] == 0 and bool(torch.isfinite(lp).all())
    lp.sum().backward()
    assert bool(torch.isfinite(logits.grad).all())
    assert float(lp[0, 1].detach()) == pytest.approx(0.0, abs=1e-6)  # one item left: probability 1
    with pytest.raises(DataError, match="out of range"):
        sequential_log_prob(logits, mask, pages)


def test_check_pages_names_the_problem():
    mask = torch.tensor([[True, True, True, False]])
    check_pages(torch.tensor([[2, 0, 1]]), mask)
    for pages, what in (([[0, 3]], "padded"), ([[0, 4]], "out of range"), ([[1, 1]], "repeats")):
        with pytest.raises(DataError, match=what):
            check_pages(torch.tensor(pages), mask)


def test_placed_before():
    pb = placed_before(torch.tensor([[2, 0, 1]]), 4)
    assert pb[0].tolist() == [[False] * 4, [False, False, True, False], [True, False, True, False]]


# ---------------------------------------------------------------------------- sort
@FAST
@given(cases)
def test_sort_pages_is_stable_top_k(case):
    B, n, L, seed = case
    gen, mask, _ = make_case(B, n, L, seed)
    scores = torch.randint(0, 3, (B, n), generator=gen).float()  # many ties
    scores[~mask] = 100.0  # padding's score must be ignored
    pages = sort_pages(scores, mask, L)
    assert_valid_pages(pages, mask)
    for b in range(B):
        valid = mask[b].nonzero().flatten().tolist()
        ref = sorted(valid, key=lambda i: (-float(scores[b, i]), i))[:L]
        assert pages[b].tolist() == ref


def test_sort_pages_ranks_non_finite_valid_scores_above_padding():
    scores = torch.tensor([[float("nan"), 1.0, float("-inf"), 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert sort_pages(scores, mask, 3)[0].tolist()[0] == 1
    assert sorted(sort_pages(scores, mask, 3)[0].tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------- beam
def table_step_fn(table: torch.Tensor, width: int):
    """Non-additive scores: `table[b, prev, next]` (prev = n for the first step), and a
    state that mirrors the prefix so that a wrong state reordering is caught."""
    n = table.shape[-1]

    def step_fn(prefix: torch.Tensor, state):
        if state is not None:
            assert torch.equal(state["prefix"], prefix[:, :-1]), "state not reordered with beams"
        prev = prefix[:, -1] if prefix.shape[1] else torch.full((prefix.shape[0],), n)
        rows = table.repeat_interleave(width, dim=0)[torch.arange(prefix.shape[0]), prev]
        return rows, {"prefix": prefix.clone()}

    return step_fn


def page_score(table: torch.Tensor, b: int, page: tuple) -> float:
    n = table.shape[-1]
    prev, total = n, 0.0
    for item in page:
        total += float(table[b, prev, item])
        prev = item
    return total


@FAST
@given(cases, st.integers(1, 6))
def test_beam_search_pages_are_valid_and_scored(case, width):
    B, n, L, seed = case
    gen, mask, _ = make_case(B, n, L, seed)
    table = torch.randn(B, n + 1, n, generator=gen)
    pages, scores = beam_search(table_step_fn(table, width), B, n, mask, L, width)
    assert pages.shape == (B, L) and scores.shape == (B,)
    assert_valid_pages(pages, mask)
    for b in range(B):
        assert float(scores[b]) == pytest.approx(page_score(table, b, tuple(pages[b].tolist())), abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_wide_beam_finds_the_exact_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    B, n, L = 3, 5, 3
    mask = random_mask(B, n, L, gen)
    table = torch.randn(B, n + 1, n, generator=gen)
    width = n * (n - 1)  # keeps every prefix of length L-1: exhaustive
    pages, scores = beam_search(table_step_fn(table, width), B, n, mask, L, width)
    for b in range(B):
        valid = mask[b].nonzero().flatten().tolist()
        best = max(page_score(table, b, p) for p in itertools.permutations(valid, L))
        assert float(scores[b]) == pytest.approx(best, abs=1e-5)


def test_beam_width_one_is_greedy_and_width_beyond_candidates_is_safe():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 6, generator=gen)
    mask = torch.tensor([[True, True, False, False, False, False], [True] * 6])

    def positional(prefix, state):  # additive per-position scores: beam(1) == masked greedy
        return logits[:, prefix.shape[1]].repeat_interleave(prefix.shape[0] // 2, dim=0), state

    pages, _ = beam_search(positional, 2, 6, mask, 2, 1)
    assert torch.equal(pages, masked_greedy(logits, mask))
    pages, scores = beam_search(positional, 2, 6, mask, 2, 8)  # request 0: 2 valid items, 8 beams
    assert_valid_pages(pages, mask)
    assert bool(torch.isfinite(scores).all())
    with pytest.raises(ConfigError, match="beam_width"):
        beam_search(positional, 2, 6, mask, 2, 0)
