"""Tests for dualrerank.metrics: reference values, ir-measures, brute force and properties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualrerank.errors import DataError
from dualrerank.metrics import (
    AGREEMENT_FIGURES,
    agreement_per_request,
    auc,
    auc_figures,
    batch_mean,
    collapse_rate,
    collision_share,
    distillation_diagnostics,
    grouped_auc,
    mean_row_entropy,
    mean_row_js,
    ndcg_at_k,
    normalized_utility,
    normalized_utility_mean,
    per_request_auc,
    prefix_masked_probs,
    ptar,
    scores_to_page,
    stability_certificate,
    unmasked_argmax,
)

# Derandomized: the same examples on every run, so a failure reproduces.
PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mask(g: torch.Generator, B: int, n: int, min_valid: int = 1) -> torch.Tensor:
    """`[B, n]` mask with a random number >= min_valid of valid candidates, at random places."""
    counts = torch.randint(min_valid, n + 1, (B,), generator=g)
    order = torch.rand(B, n, generator=g).argsort(dim=1)
    ranks = order.argsort(dim=1)
    return ranks < counts.unsqueeze(1)


def greedy_decode(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked greedy decoding, one step per position (test reference, independent of decoding.py)."""
    B, L, n = logits.shape
    free = mask.clone()
    page = torch.empty(B, L, dtype=torch.int64)
    for t in range(L):
        choice = logits[:, t].masked_fill(~free, -math.inf).argmax(dim=1)
        page[:, t] = choice
        free[torch.arange(B), choice] = False
    return page


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)


# ---------------------------------------------------------------------------- NDCG
def test_ndcg_hand_computed() -> None:
    rel = torch.tensor([[2.0, 0.0, 1.0, 3.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    page = torch.tensor([[2, 3, 0]])
    dcg = 1 / math.log2(2) + 7 / math.log2(3) + 3 / math.log2(4)
    idcg = 7 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(rel, page, mask, 3).item() == pytest.approx(dcg / idcg, abs=1e-12)
    # k beyond the page: the page is penalised against the longer ideal.
    idcg4 = idcg + 0 / math.log2(5)
    assert ndcg_at_k(rel, page, mask, 4).item() == pytest.approx(dcg / idcg4, abs=1e-12)
    assert ndcg_at_k(rel, page[:, :1], mask, 3).item() == pytest.approx(1 / idcg, abs=1e-12)


def test_ndcg_padding_and_page_mask_ignored() -> None:
    rel = torch.tensor([[1.0, 9.0, 2.0, 0.0]])
    mask = torch.tensor([[True, False, True, True]])
    page = torch.tensor([[2, 0, 1]])
    pmask = torch.tensor([[True, True, False]])
    got = ndcg_at_k(rel, page, mask, 3, page_mask=pmask).item()
    assert got == pytest.approx(1.0)  # the ideal of the valid labels (2, 1, 0) is reached


def test_ndcg_zero_idcg_rules() -> None:
    rel = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    page = torch.tensor([[0, 1], [1, 0]])
    assert ndcg_at_k(rel, page, mask, 2)[0].item() == 0.0
    assert ndcg_at_k(rel, page, mask, 2, zero_idcg="one")[0].item() == 1.0
    values = ndcg_at_k(rel, page, mask, 2, zero_idcg="nan")
    assert math.isnan(values[0].item())
    assert batch_mean(values) == pytest.approx(values[1].item())


def test_ndcg_tie_rules() -> None:
    rel = torch.tensor([[0.0, 1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    flat = torch.zeros(1, 3)
    page, _ = scores_to_page(flat, mask)
    assert page.tolist() == [[0, 1, 2]]
    page, _ = scores_to_page(flat, mask, ties="pessimistic", relevance=rel)
    assert page.tolist() == [[0, 1, 2]]
    page, _ = scores_to_page(flat, mask, ties="optimistic", relevance=rel)
    assert page.tolist() == [[2, 1, 0]]
    assert ndcg_at_k(rel, flat, mask, 3, ties="optimistic").item() == pytest.approx(1.0)
    # Padding never enters the page, even with a higher score, and the page mask shows
    # where valid candidates run out.
    page, pmask = scores_to_page(torch.tensor([[5.0, float("nan"), 1.0]]), torch.tensor([[True, False, True]]))
    assert page[0, :2].tolist() == [0, 2] and pmask.tolist() == [[True, True, False]]


def _ir_measures_ndcg(rel: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, k: int, linear_transform: bool):
    import ir_measures  # in the test extras: a missing one must fail, not skip
    qrels, run = [], []
    for b in range(rel.shape[0]):
        for i in range(rel.shape[1]):
            if not mask[b, i]:
                continue
            label = int(rel[b, i])
            doc = f"d{999 - i:03d}"  # reverse-lexicographic doc ids = candidate index ascending
            qrels.append(ir_measures.Qrel(f"q{b}", doc, 2**label - 1 if linear_transform else label))
            if not math.isnan(float(scores[b, i])):
                run.append(ir_measures.ScoredDoc(f"q{b}", doc, float(scores[b, i])))
    if linear_transform:
        measure = ir_measures.nDCG @ k
    else:
        measure = ir_measures.nDCG(cutoff=k, gains={g: 2**g - 1 for g in range(5)})
    values = {m.query_id: m.value for m in ir_measures.iter_calc([measure], qrels, run)}
    return torch.tensor([values[f"q{b}"] for b in range(rel.shape[0])], dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_matches_ir_measures(seed: int) -> None:
    g = gen(seed)
    B, n = 120, 25
    mask = random_mask(g, B, n)
    rel = torch.randint(0, 5, (B, n), generator=g).float()
    rel[torch.rand(B, generator=g) < 0.15] = 0.0  # some requests with no relevant item
    scores = torch.rand(B, n, generator=g, dtype=torch.float64)  # ties have probability 0
    for k in (1, 3, 5, 10, 30):
        ours = ndcg_at_k(rel, scores, mask, k)
        # trec_eval's gain is the label itself: exponential gain via a gain map, or via
        # labels rewritten to 2^rel - 1; both must agree with ours.
        torch.testing.assert_close(ours, _ir_measures_ndcg(rel, scores, mask, k, False), atol=1e-9, rtol=0)
        torch.testing.assert_close(ours, _ir_measures_ndcg(rel, scores, mask, k, True), atol=1e-9, rtol=0)


def test_ndcg_short_page_matches_ir_measures() -> None:
    """A page of L < n items is a run that retrieved only those items."""
    g = gen(7)
    B, n, L = 80, 15, 6
    mask = random_mask(g, B, n, min_valid=L)
    rel = torch.randint(0, 5, (B, n), generator=g).float()
    scores = torch.rand(B, n, generator=g, dtype=torch.float64)
    page, _ = scores_to_page(scores, mask, L)
    run_scores = torch.full((B, n), float("nan"), dtype=torch.float64)
    run_scores.scatter_(1, page, scores.gather(1, page))
    for k in (3, 6, 10):
        ours = ndcg_at_k(rel, page, mask, k)
        torch.testing.assert_close(ours, _ir_measures_ndcg(rel, run_scores, mask, k, False), atol=1e-9, rtol=0)


def test_ndcg_ties_match_ir_measures_doc_order() -> None:
    """ir-measures breaks ties by doc id descending; with ids in reverse order that is our index rule."""
    g = gen(3)
    B, n = 60, 12
    mask = random_mask(g, B, n)
    rel = torch.randint(0, 5, (B, n), generator=g).float()
    scores = torch.randint(0, 3, (B, n), generator=g).double()  # many ties
    for k in (1, 4, 12):
        torch.testing.assert_close(ndcg_at_k(rel, scores, mask, k), _ir_measures_ndcg(rel, scores, mask, k, False), atol=1e-9, rtol=0)


@PROPS
@given(seed=seeds, B=st.integers(1, 6), n=st.integers(1, 12), k=st.integers(1, 14))
def test_ndcg_properties(seed: int, B: int, n: int, k: int) -> None:
    g = gen(seed)
    mask = random_mask(g, B, n)
    rel = torch.randint(0, 5, (B, n), generator=g).float()
    scores = torch.randint(0, 4, (B, n), generator=g).float()
    values = {t: ndcg_at_k(rel, scores, mask, k, ties=t, zero_idcg="one") for t in ("pessimistic", "index", "optimistic")}
    for v in values.values():
        assert bool(((v >= -1e-12) & (v <= 1 + 1e-12)).all())
    assert bool((values["pessimistic"] <= values["index"] + 1e-12).all())
    assert bool((values["index"] <= values["optimistic"] + 1e-12).all())
    # The ideal page (sort by label) scores 1.
    torch.testing.assert_close(ndcg_at_k(rel, rel, mask, k, zero_idcg="one"), torch.ones(B, dtype=torch.float64))
    # Strictly increasing transforms of the scores keep the ranking, ties included.
    torch.testing.assert_close(ndcg_at_k(rel, torch.exp(scores) * 3 - 1, mask, k), ndcg_at_k(rel, scores, mask, k))
    # With the pessimistic rule, NDCG does not depend on the order candidates come in.
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(
        ndcg_at_k(rel[:, perm], scores[:, perm], mask[:, perm], k, ties="pessimistic"),
        ndcg_at_k(rel, scores, mask, k, ties="pessimistic"),
    )
    # A page and the scores that sort into it give the same value.
    page, pmask = scores_to_page(scores, mask, k)
    torch.testing.assert_close(ndcg_at_k(rel, page, mask, k, page_mask=pmask), ndcg_at_k(rel, scores, mask, k))


def test_ndcg_errors() -> None:
    rel = torch.tensor([[1.0, 0.0, 2.0]])
    mask = torch.tensor([[True, True, False]])
    cases = [
        (lambda: ndcg_at_k(rel, torch.tensor([[0, 2]]), mask, 2), "padded"),
        (lambda: ndcg_at_k(rel, torch.tensor([[0, 0]]), mask, 2), "repeats"),
        (lambda: ndcg_at_k(rel, torch.tensor([[0, 5]]), mask, 2), "outside"),
        (lambda: ndcg_at_k(-rel, torch.tensor([[0, 1]]), mask, 2), "negative"),
        (lambda: ndcg_at_k(rel, torch.tensor([[0, 1]]), mask, 0), "k: must"),
        (lambda: ndcg_at_k(rel, torch.tensor([[True, False]]), mask, 2), "bool"),
        (lambda: ndcg_at_k(rel, torch.tensor([[0.1, float("nan"), 0.3]]), mask, 2), "NaN"),
        (lambda: ndcg_at_k(rel, torch.tensor([[0, 1]]), mask, 2, zero_idcg="skip"), "zero_idcg"),
        (lambda: ndcg_at_k(rel, torch.rand(1, 3), mask, 2, ties="random"), "ties"),
        (lambda: ndcg_at_k(rel, torch.tensor([[0, 1]]), mask.int(), 2), "candidate_mask"),
    ]
    for call, word in cases:
        with pytest.raises(DataError, match=word) as info:
            call()
        assert "\n" not in str(info.value)
    # A NaN score at padding is fine.
    assert ndcg_at_k(rel, torch.tensor([[0.1, 0.5, float("nan")]]), mask, 2).item() == pytest.approx(1 / math.log2(3))


# ---------------------------------------------------------------------------- utility
def test_normalized_utility_values_and_degenerate_rule() -> None:
    u_rand = torch.tensor([1.0, 2.0, 5.0])
    u_or = torch.tensor([3.0, 4.0, 5.0])
    torch.testing.assert_close(normalized_utility(u_or, u_rand, u_or)[:2], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(normalized_utility(u_rand, u_rand, u_or)[:2], torch.zeros(2, dtype=torch.float64))
    v = normalized_utility(torch.tensor([2.0, 1.0, 5.0]), u_rand, u_or)
    assert v[:2].tolist() == [0.5, -0.5] and math.isnan(v[2].item())
    assert normalized_utility(torch.tensor([2.0, 1.0, 5.0]), u_rand, u_or, degenerate="zero")[2].item() == 0.0
    assert normalized_utility_mean(torch.tensor([2.0, 1.0, 5.0]), u_rand, u_or, how="mean_of_ratios") == pytest.approx(0.0)
    # Ratio of sums: (1 - 1 + 0) / (2 + 2 + 0).
    assert normalized_utility_mean(torch.tensor([2.0, 1.0, 5.0]), u_rand, u_or) == pytest.approx(0.0)
    assert math.isnan(normalized_utility_mean(u_rand, u_rand, u_rand))
    with pytest.raises(DataError, match="u_oracle"):
        normalized_utility(u_rand, u_rand, torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(DataError, match="how"):
        normalized_utility_mean(u_rand, u_rand, u_or, how="median")


@PROPS
@given(seed=seeds, B=st.integers(1, 20), scale=st.floats(1e-3, 1e3), shift=st.floats(-100, 100))
def test_normalized_utility_affine_invariance(seed: int, B: int, scale: float, shift: float) -> None:
    g = gen(seed)
    r = torch.rand(B, generator=g, dtype=torch.float64)
    o = r + 0.1 + torch.rand(B, generator=g, dtype=torch.float64)
    u = r + (o - r) * (torch.rand(B, generator=g, dtype=torch.float64) * 1.4 - 0.2)
    base = normalized_utility(u, r, o)
    # The shift is in units of the scale: the degeneracy guard is relative to |U|, so a shift
    # far larger than the gap legitimately turns a request degenerate.
    shift = shift * scale
    moved = normalized_utility(u * scale + shift, r * scale + shift, o * scale + shift)
    torch.testing.assert_close(moved, base, atol=1e-7, rtol=1e-7)
    ratio = normalized_utility_mean(u, r, o)
    means = ((u.mean() - r.mean()) / (o.mean() - r.mean())).item()
    assert ratio == pytest.approx(means, abs=1e-9)


# ---------------------------------------------------------------------------- AUC
def brute_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@PROPS
@given(seed=seeds, B=st.integers(1, 8), n=st.integers(1, 15))
def test_auc_matches_pairwise_count(seed: int, B: int, n: int) -> None:
    g = gen(seed)
    mask = random_mask(g, B, n)
    scores = torch.randint(-2, 3, (B, n), generator=g).float()  # many ties
    scores[torch.rand(B, n, generator=g) < 0.1] = math.inf
    labels = torch.randint(0, 2, (B, n), generator=g)
    garbage = torch.where(mask, scores, torch.tensor(float("nan")))
    got = per_request_auc(garbage, labels, mask)
    for b in range(B):
        keep = mask[b]
        want = brute_auc(scores[b][keep].tolist(), labels[b][keep].tolist())
        if math.isnan(want):
            assert math.isnan(got[b].item())
        else:
            assert got[b].item() == pytest.approx(want, abs=1e-12)
            assert auc(scores[b][keep], labels[b][keep].bool()) == pytest.approx(want, abs=1e-12)
            assert per_request_auc(-scores[b : b + 1], labels[b : b + 1], mask[b : b + 1]).item() == pytest.approx(1 - want, abs=1e-12)
    defined = [(v, int(mask[b].sum())) for b, v in enumerate(got.tolist()) if not math.isnan(v)]
    uniform = sum(v for v, _ in defined) / len(defined) if defined else math.nan
    weighted = sum(v * w for v, w in defined) / sum(w for _, w in defined) if defined else math.nan
    assert grouped_auc(garbage, labels, mask, weights="uniform") == pytest.approx(uniform, abs=1e-12, nan_ok=True)
    # GAUC weighs a request by its impressions (valid items), not once each.
    assert grouped_auc(garbage, labels, mask) == pytest.approx(weighted, abs=1e-12, nan_ok=True)
    # The pooled AUC is the AUC of every valid pair at once, across requests.
    pooled = brute_auc(scores[mask].tolist(), labels[mask].tolist())
    figures = auc_figures(garbage, labels, mask)
    assert figures["auc"] == pytest.approx(pooled, abs=1e-12, nan_ok=True)
    assert figures["gauc"] == pytest.approx(weighted, abs=1e-12, nan_ok=True)


def test_gauc_weighs_requests_by_impressions_and_differs_from_pooled_auc() -> None:
    # Request 0: 6 items ranked perfectly (AUC 1); request 1: 2 items ranked backwards (AUC 0).
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1], [0.0, 1, 0, 0, 0, 0]])
    labels = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 6, [True, True] + [False] * 4])
    assert grouped_auc(scores, labels, mask) == pytest.approx(6 / 8)
    assert grouped_auc(scores, labels, mask, weights="uniform") == pytest.approx(0.5)
    # Pooled: positives {6, 5, 0} vs negatives {4, 3, 2, 1, 1}: 5 + 5 + 0 wins of 15 pairs.
    assert auc_figures(scores, labels, mask)["auc"] == pytest.approx(10 / 15)
    with pytest.raises(DataError, match="weights"):
        grouped_auc(scores, labels, mask, weights="clicks")  # type: ignore[arg-type]


def test_auc_edge_cases() -> None:
    assert auc(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0, 1, 0])) == 1.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    with pytest.raises(DataError, match="labels"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([2, 0]))
    with pytest.raises(DataError, match="NaN"):
        auc(torch.tensor([float("nan"), 0.2]), torch.tensor([1, 0]))
    with pytest.raises(DataError, match="labels"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0, 1]))


# ---------------------------------------------------------------------------- PTAR
def test_ptar_values() -> None:
    s = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    t = torch.tensor([[0, 1, 9, 3, 4, 7], [5, 4, 3, 2, 1, 0]])
    out = ptar(s, t, k=4)
    assert out["ptar"].tolist() == [4 / 6, 1.0]
    assert out["ptar@4"].tolist() == [3 / 4, 1.0]
    assert out["exact_page"].tolist() == [0.0, 1.0]
    assert out["ptar_mean"] == pytest.approx((4 / 6 + 1) / 2)
    pm = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    out = ptar(s, t, pm, k=2)
    assert out["ptar"][0].item() == 1.0 and out["exact_page"][0].item() == 1.0
    assert math.isnan(out["ptar"][1].item()) and out["ptar_mean"] == 1.0
    with pytest.raises(DataError, match="teacher_pages"):
        ptar(s, t[:, :3])
    with pytest.raises(DataError, match="integer"):
        ptar(s.float(), t)


@PROPS
@given(seed=seeds, B=st.integers(1, 6), L=st.integers(1, 8), k=st.integers(1, 10))
def test_ptar_properties(seed: int, B: int, L: int, k: int) -> None:
    g = gen(seed)
    s = torch.randint(0, 4, (B, L), generator=g)
    t = torch.randint(0, 4, (B, L), generator=g)
    a, b = ptar(s, t, k=k), ptar(t, s, k=k)
    for key in ("ptar", f"ptar@{k}", "exact_page"):
        torch.testing.assert_close(a[key], b[key])
        assert bool(((a[key] >= 0) & (a[key] <= 1)).all())
    assert bool((a["exact_page"] <= a["ptar"]).all())
    assert bool(((a["ptar"] == 1) == (a["exact_page"] == 1)).all())
    # Against a per-position count written out by hand (not against the pages themselves).
    for i in range(B):
        same = [x == y for x, y in zip(s[i].tolist(), t[i].tolist())]
        assert a["ptar"][i].item() == pytest.approx(sum(same) / L)
        assert a[f"ptar@{k}"][i].item() == pytest.approx(sum(same[:k]) / min(k, L))
        assert a["exact_page"][i].item() == float(all(same))


# ---------------------------------------------------------------------------- collapse, JS, entropy
def test_collapse_detects_identical_rows_and_ignores_padding() -> None:
    mask = torch.tensor([[True, True, True, False]])
    logits = torch.tensor([[[3.0, 1.0, 0.0, 9.0], [0.0, 2.0, 1.0, 9.0], [0.0, 1.0, 5.0, 9.0]]])
    assert unmasked_argmax(logits, mask).tolist() == [[0, 1, 2]]
    assert collapse_rate(logits, mask).item() == 0.0
    same = logits[:, :1].expand(1, 3, 4)
    assert collapse_rate(same, mask).item() == 1.0
    assert collision_share(same, mask).item() == pytest.approx(2 / 3)
    # Only the existing positions count.
    pm = torch.tensor([[True, False, False]])
    assert collapse_rate(same, mask, pm).item() == 0.0
    # A row whose valid logits are all -inf still points at a valid candidate.
    odd = torch.tensor([[[-math.inf, -math.inf, 0.0], [0.0, 0.0, 0.0]]])
    assert unmasked_argmax(odd, torch.tensor([[False, True, True]])).tolist() == [[2, 1]]
    assert unmasked_argmax(torch.full((1, 1, 3), -math.inf), torch.tensor([[False, True, True]])).tolist() == [[1]]
    with pytest.raises(DataError, match="NaN"):
        collapse_rate(torch.tensor([[[float("nan"), 0.0]]]), torch.ones(1, 2, dtype=torch.bool))


@PROPS
@given(seed=seeds, B=st.integers(1, 5), L=st.integers(1, 6), n=st.integers(1, 6))
def test_collapse_matches_brute_force(seed: int, B: int, L: int, n: int) -> None:
    g = gen(seed)
    mask = random_mask(g, B, n)
    logits = torch.randint(0, 3, (B, L, n), generator=g).float()
    got = collapse_rate(logits, mask)
    share = collision_share(logits, mask)
    for b in range(B):
        valid = [i for i in range(n) if mask[b, i]]
        picks = [max(valid, key=lambda i: (logits[b, t, i].item(), -i)) for t in range(L)]
        assert got[b].item() == float(len(set(picks)) < L)
        assert share[b].item() == pytest.approx((L - len(set(picks))) / L)


def test_js_and_entropy_reference_values() -> None:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import entropy

    g = gen(11)
    B, L, n = 4, 5, 7
    mask = random_mask(g, B, n, min_valid=2)
    logits = torch.randn(B, L, n, generator=g) * 2
    js = mean_row_js(logits, mask)
    ent = mean_row_entropy(logits, mask)
    for b in range(B):
        rows = [torch.softmax(logits[b, t][mask[b]].double(), 0).numpy() for t in range(L)]
        pairs = [jensenshannon(rows[s], rows[t]) ** 2 for s, t in itertools.combinations(range(L), 2)]
        assert js[b].item() == pytest.approx(float(np.mean(pairs)), abs=1e-10)
        assert ent[b].item() == pytest.approx(float(np.mean([entropy(r) for r in rows])), abs=1e-10)
    # Disjoint one-hot rows reach ln 2; identical rows give 0; uniform rows give ln n_valid.
    onehot = torch.eye(3).unsqueeze(0)
    assert mean_row_js(onehot, torch.ones(1, 3, dtype=torch.bool), from_logits=False).item() == pytest.approx(math.log(2))
    assert mean_row_js(torch.zeros(1, 3, 4), torch.ones(1, 4, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-12)
    uniform = mean_row_entropy(torch.zeros(2, 3, 5), torch.tensor([[True] * 5, [True, True, False, False, False]]))
    torch.testing.assert_close(uniform, torch.tensor([math.log(5), math.log(2)], dtype=torch.float64))
    norm = mean_row_entropy(torch.zeros(2, 3, 5), torch.tensor([[True] * 5, [True] + [False] * 4]), normalized=True)
    assert norm.tolist() == pytest.approx([1.0, 0.0])
    assert math.isnan(mean_row_js(torch.zeros(1, 1, 3), torch.ones(1, 3, dtype=torch.bool)).item())
    with pytest.raises(DataError, match="negative"):
        mean_row_js(-torch.ones(1, 2, 3), torch.ones(1, 3, dtype=torch.bool), from_logits=False)


@PROPS
@given(seed=seeds, B=st.integers(1, 4), L=st.integers(2, 6), n=st.integers(1, 8), temp=st.floats(0.05, 20))
def test_js_entropy_ranges(seed: int, B: int, L: int, n: int, temp: float) -> None:
    g = gen(seed)
    mask = random_mask(g, B, n)
    logits = torch.randn(B, L, n, generator=g) / temp
    js = mean_row_js(logits, mask)
    ent = mean_row_entropy(logits, mask)
    assert bool(((js >= 0) & (js <= math.log(2) + 1e-12)).all())
    assert bool(((ent >= 0) & (ent <= torch.log(mask.sum(1).double()) + 1e-9)).all())
    # Reversing the positions permutes the pairs: the mean is unchanged.
    torch.testing.assert_close(mean_row_js(logits.flip(1), mask), js)


# ---------------------------------------------------------------------------- certificate
def test_certificate_condition_on_two_point_examples() -> None:
    d = 0.2
    q = torch.tensor([[[0.5 + d / 2, 0.5 - d / 2]]], dtype=torch.float64)
    tie = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)
    cert = stability_certificate(q, tie)
    assert not bool(cert.certified.any())
    assert cert.delta.item() == pytest.approx(d)
    near = torch.tensor([[[0.5 + d / 2 - 0.01, 0.5 - d / 2 + 0.01]]], dtype=torch.float64)
    cert = stability_certificate(q, near)
    assert bool(cert.certified.all()) and cert.ptar_lower.item() == 1.0
    # A step whose teacher distribution misses the path is not certified.
    cert = stability_certificate(q, near, path=torch.tensor([[1]]))
    assert not bool(cert.certified.any())
    # Zero student mass where the teacher has mass: infinite KL.
    cert = stability_certificate(q, torch.tensor([[[1.0, 0.0]]], dtype=torch.float64))
    assert math.isinf(cert.eta.item()) and not bool(cert.certified.any())


def test_certificate_margin_absorbs_rounding_at_near_ties() -> None:
    """Pinsker is nearly tight for a two-point q against a tied p: rounding alone flips it.

    Without a margin, the float64 KL of these near-ties comes out a hair below delta^2/2
    and steps whose student argmax is the runner-up get certified.
    """
    d = torch.tensor([m * 10.0**-e for e in range(3, 9) for m in range(1, 100)], dtype=torch.float64)
    q = torch.stack([0.5 + d / 2, 0.5 - d / 2], dim=-1).view(-1, 1, 2)
    p = torch.tensor([0.5 - 1e-12, 0.5 + 1e-12], dtype=torch.float64).expand_as(q)
    assert bool(stability_certificate(q, p, margin=0.0).certified.any())  # the hazard is real
    assert not bool(stability_certificate(q, p).certified.any())


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    seed=seeds,
    B=st.integers(1, 6),
    L=st.integers(1, 5),
    n=st.integers(1, 8),
    noise=st.sampled_from([0.0, 1e-6, 1e-3, 0.05, 0.3, 1.0, 3.0]),
    sharp=st.sampled_from([0.5, 3.0, 10.0]),
    quantize=st.booleans(),
)
def test_certified_steps_have_the_teachers_argmax(seed, B, L, n, noise, sharp, quantize) -> None:
    g = gen(seed)
    mask = random_mask(g, B, n)
    allowed = mask.unsqueeze(1) & (torch.rand(B, L, n, generator=g) < 0.8)
    allowed |= mask.unsqueeze(1) & (torch.arange(n) == mask.int().argmax(1, keepdim=True)).unsqueeze(1)
    q_logits = torch.randn(B, L, n, generator=g, dtype=torch.float64) * sharp
    if quantize:  # exact ties in teacher and student
        q_logits = q_logits.round()
    p_logits = q_logits + noise * torch.randn(B, L, n, generator=g, dtype=torch.float64)
    if quantize:
        p_logits = p_logits.round()
    q = masked_softmax(q_logits, allowed)
    p = masked_softmax(p_logits, allowed)
    cert = stability_certificate(q, p)
    arg_q = q.argmax(dim=2)
    arg_p = p.argmax(dim=2)
    assert bool((arg_q == arg_p)[cert.certified].all())
    # The student's gap over every other candidate exceeds the margin.
    top2 = p.topk(min(2, n), dim=2).values
    gap = top2[..., 0] - (top2[..., 1] if n > 1 else 0.0)
    assert bool((gap[cert.certified] > 1e-6).all())
    assert bool((cert.prefix <= cert.certified.sum(1)).all())
    assert bool(((cert.ptar_lower >= 0) & (cert.ptar_lower <= 1)).all())


def _teacher_student_batch(seed: int, B: int, L: int, n: int, noise: torch.Tensor):
    """Teacher step scores, its greedy path and step distributions, a student near it."""
    g = gen(seed)
    mask = random_mask(g, B, n, min_valid=L)
    S = torch.randn(B, L, n, generator=g) * 3
    y = greedy_decode(S, mask)
    Z = S + noise.view(B, 1, 1) * torch.randn(B, L, n, generator=g)
    return mask, S, y, Z


@PROPS
@given(seed=seeds, B=st.integers(1, 8), L=st.integers(1, 6), extra=st.integers(0, 5), k=st.integers(1, 6))
def test_observed_ptar_is_at_least_certified(seed: int, B: int, L: int, extra: int, k: int) -> None:
    noise = torch.logspace(-4, 0.5, B)
    mask, S, y, Z = _teacher_student_batch(seed, B, L, L + extra, noise)
    q = prefix_masked_probs(S, mask, y)
    p = prefix_masked_probs(Z, mask, y)
    cert = stability_certificate(q, p, path=y)
    student = greedy_decode(Z, mask)
    observed = ptar(student, y, k=k)
    assert bool((observed["ptar"] >= cert.ptar_lower - 1e-12).all())
    assert bool((observed[f"ptar@{k}"] >= cert.ptar_lower_at(k) - 1e-12).all())
    for b in range(B):
        m = int(cert.prefix[b])
        assert student[b, :m].tolist() == y[b, :m].tolist()


def test_certificate_is_not_vacuous() -> None:
    B, L, n = 64, 6, 10
    noise = torch.cat([torch.full((32,), 1e-3), torch.full((32,), 2.0)])
    mask, S, y, Z = _teacher_student_batch(5, B, L, n, noise)
    cert = stability_certificate(prefix_masked_probs(S, mask, y), prefix_masked_probs(Z, mask, y), path=y)
    assert cert.ptar_lower[:32].mean().item() > 0.5  # a close student is largely certified
    assert cert.ptar_lower[32:].mean().item() < cert.ptar_lower[:32].mean().item()
    summary = cert.summary(4)
    assert set(summary) == {"certified_prefix", "certified_ptar", "certified_ptar@4", "certified_step_share"}


def test_prefix_masked_probs_and_step_mask() -> None:
    logits = torch.zeros(1, 3, 4)
    mask = torch.tensor([[True, True, True, False]])
    probs = prefix_masked_probs(logits, mask, torch.tensor([[2, 0, 1]]))
    expected = torch.tensor([[[1 / 3, 1 / 3, 1 / 3, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0]]], dtype=torch.float64)
    torch.testing.assert_close(probs, expected)
    step_mask = torch.tensor([[True, True, False]])
    cert = stability_certificate(probs, probs, step_mask)
    # Step 1 is uniform (delta = 0): nothing is certified, whatever follows.
    assert cert.prefix.item() == 0 and cert.length.item() == 2 and math.isnan(cert.delta[0, 2].item())
    with pytest.raises(DataError, match="left-aligned"):
        stability_certificate(probs, probs, torch.tensor([[True, False, True]]))
    with pytest.raises(DataError, match="repeats"):
        prefix_masked_probs(logits, mask, torch.tensor([[2, 2, 1]]))
    with pytest.raises(DataError, match="no probability mass"):
        stability_certificate(torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    with pytest.raises(DataError, match="temperature"):
        prefix_masked_probs(logits, mask, torch.tensor([[2, 0, 1]]), temperature=0.0)


def test_distillation_diagnostics() -> None:
    B, L, n = 16, 4, 8
    mask, S, y, Z = _teacher_student_batch(9, B, L, n, torch.full((B,), 0.01))
    student = greedy_decode(Z, mask)
    q = prefix_masked_probs(S, mask, y)
    out = distillation_diagnostics(Z, mask, student, y, teacher_probs=q)
    # The same names as training logs them: one set, from metrics.AGREEMENT_FIGURES.
    assert set(out) == set(AGREEMENT_FIGURES)
    assert out["ptar"] >= out["certified_ptar"]
    assert all(isinstance(v, float) for v in out.values())
    per_request = agreement_per_request(student, y, student_logits=Z, candidate_mask=mask, teacher_probs=q)
    for name, values in per_request.items():
        assert out[name] == pytest.approx(batch_mean(values)), name
    top2 = q.topk(2, dim=-1).values
    assert out["teacher_margin"] == pytest.approx(float((top2[..., 0] - top2[..., 1]).mean()))
    cert = stability_certificate(q, prefix_masked_probs(Z, mask, y), path=y)
    assert out["certified_step_share"] == pytest.approx(float((cert.certified.double().sum(1) / L).mean()))


def test_agreement_without_logits_or_teacher_probs_has_only_page_figures() -> None:
    s = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    t = torch.tensor([[0, 1, 3, 2], [3, 2, 1, 0]])
    out = agreement_per_request(s, t)
    assert set(out) == {"ptar", "ptar@4", "exact_page"}
    assert out["ptar"].tolist() == [0.5, 1.0] and out["exact_page"].tolist() == [0.0, 1.0]
    with pytest.raises(DataError, match="candidate_mask"):
        agreement_per_request(s, t, student_logits=torch.zeros(2, 4, 5))
    # A short request: its absent position is not counted in the teacher margin.
    q = torch.tensor([[[0.7, 0.2, 0.1, 0.0]] * 4, [[0.5, 0.5, 0.0, 0.0]] * 4], dtype=torch.float64)
    pm = torch.tensor([[True, True, True, False], [True] * 4])
    margin = agreement_per_request(s, t, pm, teacher_probs=q)["teacher_margin"]
    torch.testing.assert_close(margin, torch.tensor([0.5, 0.0], dtype=torch.float64))
