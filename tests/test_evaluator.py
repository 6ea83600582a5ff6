"""Tests for the list-wise evaluator: shapes and masks, exact one-call beam steps, learning
a dependency on the item above that a pointwise model cannot express, decoding quality."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from dualrerank.decoding import beam_search
from dualrerank.errors import ConfigError, DataError
from dualrerank.losses import pointwise_bce
from dualrerank.models.encoder import EncoderConfig
from dualrerank.models.evaluator import EvaluatorConfig, ListEvaluator
from dualrerank.schema import RerankBatch

N_CATS = 3


def make_config(d: int = N_CATS + 1, c: int = 2, **kw) -> EvaluatorConfig:
    enc = EncoderConfig(candidate_dim=d, context_dim=c, d_model=32, n_heads=2, n_layers=1, dropout=0.0)
    return EvaluatorConfig(encoder=enc, **{"n_layers": 1, "max_positions": 8, **kw})


def random_batch(B: int, n: int, d: int = N_CATS + 1, c: int = 2, seed: int = 0, ragged: bool = True) -> RerankBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, n, dtype=torch.bool)
    if ragged:
        counts = torch.randint(n - 2, n + 1, (B,), generator=g)
        mask = torch.arange(n).unsqueeze(0) < counts.unsqueeze(1)
    return RerankBatch(
        candidates=torch.randn(B, n, d, generator=g),
        candidate_mask=mask,
        context=torch.randn(B, c, generator=g),
        upstream_score=torch.randn(B, n, generator=g),
    ).validate()


def toy_logs(B: int, seed: int, n: int = 8, L: int = 5) -> tuple[RerankBatch, torch.Tensor]:
    """Random pages; click prob = sigmoid(1.5 q - 3 [same category as the item above])."""
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(0, N_CATS, (B, n), generator=g)
    q = torch.randn(B, n, generator=g)
    X = torch.cat([nn.functional.one_hot(cat, N_CATS).float(), q.unsqueeze(-1)], dim=-1)
    page = torch.argsort(torch.rand(B, n, generator=g), dim=1)[:, :L]
    pc, pq = cat.gather(1, page), q.gather(1, page)
    same = torch.zeros(B, L)
    same[:, 1:] = (pc[:, 1:] == pc[:, :-1]).float()
    p_click = torch.sigmoid(1.5 * pq - 3.0 * same)
    click = (torch.rand(B, L, generator=g) < p_click).float()
    long_view = click * (torch.rand(B, L, generator=g) < torch.sigmoid(pq)).float()
    batch = RerankBatch(
        candidates=X,
        candidate_mask=torch.ones(B, n, dtype=torch.bool),
        context=torch.randn(B, 2, generator=g),
        logged_page=page,
        logged_page_mask=torch.ones(B, L, dtype=torch.bool),
        logged_feedback=torch.stack([click, long_view, 10 * click], dim=-1),
        feedback_names=("click", "long_view", "watch_time"),
    ).validate()
    return batch, p_click


@pytest.fixture(scope="module")
def trained():
    """An evaluator trained on toy logs (200 Adam steps, a few seconds)."""
    train, _ = toy_logs(2000, seed=0)
    torch.manual_seed(0)
    ev = ListEvaluator(make_config())
    ev.fit_normalizer(train)
    opt = torch.optim.Adam(ev.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = train.select(torch.randint(0, train.batch_size, (128,), generator=g))
        loss = ev.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ev.eval(), train


def test_forward_shapes_groups_and_padding():
    torch.manual_seed(0)
    ev = ListEvaluator(make_config()).eval()
    batch = random_batch(3, 7)
    pages = torch.tensor([[0, 1, 2], [2, 1, 0], [4, 3, 1]])
    out = ev(batch, pages)
    assert out.shape == (3, 3, 2)
    grouped = torch.stack([pages, pages.flip(1)], dim=1)
    out_g = ev(batch, grouped)
    assert out_g.shape == (3, 2, 3, 2)
    assert torch.allclose(out_g[:, 0], out, atol=1e-5)
    probs = ev.predict(batch, pages)
    assert bool(((probs > 0) & (probs < 1)).all())
    # Causality: the first position does not depend on what comes after it.
    other = pages.clone()
    other[:, 1:] = pages[:, 1:].flip(1)
    assert torch.allclose(ev(batch, other)[:, 0], out[:, 0], atol=1e-5)
    assert not torch.allclose(ev(batch, other)[:, 1], out[:, 1], atol=1e-5)


def test_page_mask_hides_absent_positions():
    torch.manual_seed(0)
    ev = ListEvaluator(make_config()).eval()
    batch = random_batch(2, 6, ragged=False)
    pages = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    pm = torch.tensor([[True, True, False, False], [True, True, True, True]])
    short = ev(batch, pages[:, :2])
    masked = ev(batch, pages, pm)
    assert torch.allclose(masked[0, :2], short[0], atol=1e-5)
    v = ev.page_value(batch, pages, page_mask=pm)
    assert v[0].item() == pytest.approx(ev.page_value(batch, pages[:, :2])[0].item(), abs=1e-5)


def test_step_scores_equal_full_forward_of_extended_prefix():
    torch.manual_seed(1)
    ev = ListEvaluator(make_config(n_layers=2)).eval()
    B, n = 3, 6
    batch = random_batch(B, n)
    page = ev.beam_pages(batch, 3, width=2)
    step = ev._step_fn(batch, 1, None)
    w = torch.tensor(ev.config.value_weights)
    state = None
    with torch.no_grad():
        for t in range(3):
            scores, state = step(page[:, :t], state)
            # Group i of request b: the prefix followed by candidate i (masked where i is not allowed).
            ext = torch.cat([page[:, :t].unsqueeze(1).expand(B, n, t), torch.arange(n).view(1, n, 1).expand(B, n, 1)], dim=2)
            ok = batch.candidate_mask & ~(page[:, :t].unsqueeze(2) == torch.arange(n)).any(dim=1)
            pm = torch.ones(B, n, t + 1, dtype=torch.bool)
            pm[..., t] = ok
            want = ev.predict(batch, ext, pm)[..., t, :] @ w  # [B, n]
            assert torch.allclose(want[ok], scores[ok], atol=1e-5)
    # The beam's total score is the page value of the page it returns.
    pages, total = beam_search(ev._step_fn(batch, 3, None), B, n, batch.candidate_mask, 4, 3)
    assert torch.allclose(total, ev.page_value(batch, pages).detach(), atol=1e-5)


def test_loss_masks_absent_logged_positions():
    batch, _ = toy_logs(4, seed=3)
    pm = batch.logged_page_mask.clone()
    pm[:, 3:] = False
    fb = batch.logged_feedback.clone()
    fb[:, 3:] = 7.0  # garbage at absent positions: must be ignored, not rejected
    torch.manual_seed(0)
    ev = ListEvaluator(make_config())
    cut = replace(batch, logged_page_mask=pm, logged_feedback=fb)
    short = replace(batch, logged_page=batch.logged_page[:, :3], logged_page_mask=pm[:, :3], logged_feedback=fb[:, :3])
    assert ev.loss(cut).item() == pytest.approx(ev.loss(short).item(), abs=1e-6)


def test_loss_on_graded_labels_and_errors():
    torch.manual_seed(0)
    ev = ListEvaluator(make_config())
    batch = random_batch(3, 6)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2]] * 3, dtype=torch.float32).unsqueeze(-1)
    graded = replace(batch, labels=labels, label_names=("relevance",))
    pages, pmask, targets = ev.training_targets(graded)
    keys = batch.upstream_score.masked_fill(~batch.candidate_mask, float("-inf"))
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    assert torch.equal(pages, order[:, :6])
    lab = labels[..., 0].gather(1, pages)
    assert torch.equal(targets[..., 0], (lab > 0).float()) and torch.equal(targets[..., 1], (lab >= 2).float())
    assert torch.equal(pmask.sum(1), batch.num_valid)
    loss = ev.loss(graded, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(DataError, match="labels: missing"):
        ev.loss(batch)
    logs, _ = toy_logs(2, seed=1)
    with pytest.raises(DataError, match="'click'"):
        ev.loss(replace(logs, feedback_names=("clicks", "long_view", "watch_time")))
    with pytest.raises(DataError, match="feature width"):
        ev(random_batch(2, 6, d=7), torch.tensor([[0], [1]]))
    with pytest.raises(DataError, match="max_positions"):
        ev.beam_pages(random_batch(2, 12, ragged=False), 9)
    with pytest.raises(DataError, match="repeats"):
        ev(batch, torch.tensor([[0, 0], [0, 1], [0, 1]]))
    with pytest.raises(ConfigError, match="value_weights"):
        ListEvaluator(make_config(value_weights=(1.0,)))


def test_learns_dependency_on_item_above_better_than_pointwise(trained):
    ev, train = trained
    test, p_true = toy_logs(500, seed=1)
    with torch.no_grad():
        p_eval = ev.predict(test, test.logged_page)[..., 0]
    mse_eval = float(((p_eval - p_true) ** 2).mean())

    # Pointwise reference: item features + position one-hot, no access to the item above.
    torch.manual_seed(0)
    pw = nn.Sequential(nn.Linear(N_CATS + 1 + 5, 32), nn.GELU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(pw.parameters(), lr=5e-3)

    def feats(b: RerankBatch) -> torch.Tensor:
        x = b.candidates.gather(1, b.logged_page.unsqueeze(-1).expand(-1, -1, N_CATS + 1))
        return torch.cat([x, torch.eye(5).expand(x.shape[0], 5, 5)], dim=-1)

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        b = train.select(torch.randint(0, train.batch_size, (128,), generator=g))
        loss = pointwise_bce(pw(feats(b)).squeeze(-1), b.logged_feedback[..., 0], torch.ones(128, 5, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p_pw = torch.sigmoid(pw(feats(test)).squeeze(-1))
    mse_pw = float(((p_pw - p_true) ** 2).mean())
    print(f"toy click-probability MSE: evaluator {mse_eval:.4f}, pointwise {mse_pw:.4f}")
    assert mse_eval < 0.5 * mse_pw, (mse_eval, mse_pw)


def test_beam_pages_valid_and_at_least_greedy_on_average(trained):
    ev, _ = trained
    test, _ = toy_logs(300, seed=2)
    beam = ev.beam_pages(test, 5, width=4)
    greedy = ev.greedy_pages(test, 5)
    for pages in (beam, greedy):
        assert pages.shape == (300, 5)
        assert bool((pages.sort(1).values[:, 1:] != pages.sort(1).values[:, :-1]).all())
    v_beam, v_greedy = ev.page_value(test, beam), ev.page_value(test, greedy)
    v_logged = ev.page_value(test, test.logged_page)
    print(f"page value: beam {v_beam.mean():.4f}, greedy {v_greedy.mean():.4f}, logged {v_logged.mean():.4f}")
    assert v_beam.mean() >= v_greedy.mean() - 1e-6
    assert v_greedy.mean() > v_logged.mean()
    # The learned rule says: avoid repeating the category of the item above.
    cats = test.candidates[..., :N_CATS].argmax(-1).gather(1, beam)
    repeat_rate = (cats[:, 1:] == cats[:, :-1]).float().mean().item()
    logged_cats = test.candidates[..., :N_CATS].argmax(-1).gather(1, test.logged_page)
    assert repeat_rate < 0.5 * (logged_cats[:, 1:] == logged_cats[:, :-1]).float().mean().item()


def test_beam_respects_padding_and_is_deterministic_in_train_mode():
    torch.manual_seed(0)
    cfg = make_config()
    cfg.encoder.dropout = 0.3
    ev = ListEvaluator(cfg)  # left in train mode on purpose
    batch = random_batch(16, 6)
    a = ev.rerank(batch, 4)
    b = ev.rerank(batch, 4)
    assert torch.equal(a, b) and ev.training
    assert bool(batch.candidate_mask.gather(1, a).all())
    assert torch.equal(ev.greedy_pages(batch, 4), ev.beam_pages(batch, 4, width=1))


# ---------------------------------------------------------------------------- AUC in evaluate
def _hand_auc(scores: torch.Tensor, clicks: torch.Tensor) -> tuple[float, float]:
    """(pooled AUC, impression-weighted GAUC) of `[B, L]` scores, every position shown."""
    from dualrerank.metrics import per_request_auc

    def pooled(s: torch.Tensor, y: torch.Tensor) -> float:
        pos, neg = s[y > 0], s[y == 0]
        wins = (pos.unsqueeze(1) > neg.unsqueeze(0)).double() + 0.5 * (pos.unsqueeze(1) == neg.unsqueeze(0)).double()
        return float(wins.mean())

    per = [pooled(s, y) for s, y in zip(scores, clicks) if 0 < int((y > 0).sum()) < len(y)]
    assert torch.allclose(per_request_auc(scores, clicks > 0)[~per_request_auc(scores, clicks > 0).isnan()],
                          torch.tensor(per, dtype=torch.float64))
    return pooled(scores.flatten(), clicks.flatten()), sum(per) / len(per)  # equal impressions: plain mean


def test_evaluate_logs_the_evaluators_auc_on_logged_clicks(trained):
    from dualrerank.train.evaluation import EvalSplit, evaluate

    trained, _ = trained
    batch, p_click = toy_logs(400, seed=7)
    figures = evaluate(trained.rerank, EvalSplit(batch), 5, timing=False)
    clicks = batch.logged_feedback[..., 0]
    with torch.no_grad():
        predicted = trained.predict(batch, batch.logged_page)[..., 0].double()
    want_auc, want_gauc = _hand_auc(predicted, clicks)
    assert figures["auc"] == pytest.approx(want_auc, abs=1e-9)
    assert figures["gauc"] == pytest.approx(want_gauc, abs=1e-9)
    # It learnt the clicks: close to the AUC of the true click probabilities.
    true_auc, _ = _hand_auc(p_click.double(), clicks)
    assert figures["auc"] > true_auc - 0.05 and figures["auc"] > 0.65, (figures["auc"], true_auc)


def test_evaluate_logs_score_model_auc_along_the_logged_page_and_none_without_clicks():
    from dualrerank.models.baselines import UpstreamSort
    from dualrerank.train.evaluation import EvalSplit, evaluate

    # Two requests; the logged page shows candidates in an order unlike their index, so
    # scores must be read along the page. Upstream scores rank request 0's clicks first
    # (AUC 1) and request 1's last (AUC 0).
    page = torch.tensor([[3, 0, 2, 1], [1, 2, 0, 3]])
    click = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    upstream = torch.tensor([[0.9, 0.1, 0.2, 1.0], [0.5, 0.6, 0.7, 0.0]])
    batch = RerankBatch(
        candidates=torch.randn(2, 4, 3), candidate_mask=torch.ones(2, 4, dtype=torch.bool), context=torch.zeros(2, 1),
        logged_page=page, logged_page_mask=torch.ones(2, 4, dtype=torch.bool),
        logged_feedback=(1000 * click).unsqueeze(-1), feedback_names=("click",),  # clicks in other units
        upstream_score=upstream,
    ).validate()
    model = UpstreamSort()
    figures = evaluate(model.rerank, EvalSplit(batch), 4, timing=False)
    assert figures["gauc"] == pytest.approx(0.5)  # (4 * 1 + 4 * 0) / 8
    # Pooled: clicked {1.0, 0.9, 0.0} vs the rest {0.2, 0.1, 0.5, 0.6, 0.7}: 5 + 5 + 0 of 15.
    assert figures["auc"] == pytest.approx(10 / 15)
    # A list generator has no item scores; a rerank function not bound to a model neither.
    assert evaluate(lambda b, k: model.rerank(b, k), EvalSplit(batch), 4, timing=False)["auc"] is None
    # Without a click column there is nothing to measure against.
    graded = RerankBatch(
        candidates=batch.candidates, candidate_mask=batch.candidate_mask, context=batch.context,
        labels=torch.rand(2, 4, 1), label_names=("relevance",), upstream_score=upstream,
    ).validate()
    assert evaluate(model.rerank, EvalSplit(graded), 4, timing=False)["gauc"] is None
