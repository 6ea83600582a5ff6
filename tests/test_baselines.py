"""Tests for the score-and-sort baselines and their shared supervised target."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dualrerank.config import from_dict
from dualrerank.errors import CheckpointError, ConfigError, DataError
from dualrerank.metrics import ndcg_at_k
from dualrerank.models.baselines import (
    CATBOOST_LOSSES,
    PRM,
    CatBoostConfig,
    CatBoostRank,
    DNNConfig,
    LambdaMART,
    LambdaMARTConfig,
    PointwiseDNN,
    PRMConfig,
    UpstreamConfig,
    UpstreamSort,
    supervised_gains,
)
from dualrerank.models.encoder import EncoderConfig
from dualrerank.schema import RerankBatch

D, C = 4, 2


def graded_batch(B: int, n: int, seed: int, ragged: bool = True) -> RerankBatch:
    """Relevance 0..2 determined by feature 0 (plus noise features); upstream score is noisy."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, D, generator=g)
    mask = torch.ones(B, n, dtype=torch.bool)
    if ragged:
        counts = torch.randint(n // 2, n + 1, (B,), generator=g)
        mask = torch.arange(n).unsqueeze(0) < counts.unsqueeze(1)
    rel = (X[..., 0] > 0.0).float() + (X[..., 0] > 1.0).float()
    return RerankBatch(
        candidates=X,
        candidate_mask=mask,
        context=torch.randn(B, C, generator=g),
        labels=rel.unsqueeze(-1),
        label_names=("relevance",),
        upstream_score=X[..., 0] + torch.randn(B, n, generator=g),
    ).validate()


def log_batch(B: int = 3, n: int = 6, L: int = 3, seed: int = 0) -> RerankBatch:
    g = torch.Generator().manual_seed(seed)
    page = torch.stack([torch.randperm(n, generator=g)[:L] for _ in range(B)])
    fb = torch.randint(0, 2, (B, L, 3), generator=g).float()
    fb[..., 1] *= fb[..., 0]  # long view implies click
    labels = torch.zeros(B, n, 3).scatter(1, page.unsqueeze(-1).expand(-1, -1, 3), fb)
    names = ("click", "long_view", "watch_time")
    return RerankBatch(
        candidates=torch.randn(B, n, D, generator=g),
        candidate_mask=torch.ones(B, n, dtype=torch.bool),
        context=torch.randn(B, C, generator=g),
        labels=labels,
        label_names=names,
        logged_page=page,
        logged_page_mask=torch.ones(B, L, dtype=torch.bool),
        logged_feedback=fb,
        feedback_names=names,
        upstream_score=torch.randn(B, n, generator=g),
    ).validate()


def is_valid_page(pages: torch.Tensor, mask: torch.Tensor) -> bool:
    s = pages.sort(dim=1).values
    return bool(mask.gather(1, pages).all()) and bool((s[:, 1:] != s[:, :-1]).all())


def train(model, batch: RerankBatch, steps: int, lr: float = 1e-2) -> None:
    model.fit_normalizer(batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = model.loss(batch.select(torch.randint(0, batch.batch_size, (64,), generator=g)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# ---------------------------------------------------------------------- supervised target
def test_supervised_gains_logs_use_shown_items_only():
    batch = log_batch()
    gains, mask = supervised_gains(batch)
    assert torch.equal(mask.sum(1), torch.full((3,), 3))
    fb = batch.logged_feedback
    for b in range(3):
        for t in range(3):
            i = int(batch.logged_page[b, t])
            assert mask[b, i] and gains[b, i] == fb[b, t, 0] + fb[b, t, 1]
    assert (gains[~mask] == 0).all()
    # The same from labels alone (no logged_feedback).
    g2, m2 = supervised_gains(replace(batch, logged_feedback=None))
    assert torch.equal(g2, gains) and torch.equal(m2, mask)


def test_supervised_gains_graded_and_errors():
    batch = graded_batch(4, 5, seed=0)
    gains, mask = supervised_gains(batch)
    assert torch.equal(mask, batch.candidate_mask)
    assert torch.equal(gains[mask], batch.labels[..., 0][mask])
    with pytest.raises(DataError, match="negative gain"):
        supervised_gains(replace(batch, labels=-batch.labels - 1))
    nan = batch.labels.clone()
    nan[2, 1, 0] = math.nan
    with pytest.raises(DataError, match="NaN/inf gain in request 2"):
        supervised_gains(replace(batch, labels=nan))
    with pytest.raises(DataError, match="labels: missing"):
        supervised_gains(replace(batch, labels=None))


# ---------------------------------------------------------------------- upstream sort
def test_upstream_sort():
    batch = graded_batch(5, 7, seed=1)
    model = UpstreamSort()
    s = model.scores(batch)
    assert torch.isinf(s[~batch.candidate_mask]).all() and (s[~batch.candidate_mask] < 0).all()
    pages = model.rerank(batch, 3)
    up = batch.upstream_score.masked_fill(~batch.candidate_mask, -math.inf)
    assert torch.equal(pages, up.topk(3, dim=1).indices)
    assert list(model.parameters()) == []
    no_up = replace(batch, upstream_score=None)
    with pytest.raises(DataError, match="upstream_score"):
        model.rerank(no_up, 3)
    fallback = UpstreamSort(UpstreamConfig(fallback_feature=0)).rerank(no_up, 3)
    assert torch.equal(fallback, batch.candidates[..., 0].masked_fill(~batch.candidate_mask, -math.inf).topk(3, 1).indices)


# ---------------------------------------------------------------------- DNN
def test_dnn_scores_and_learns_graded_relevance():
    torch.manual_seed(0)
    model = PointwiseDNN(DNNConfig(candidate_dim=D, context_dim=C, hidden=(32,), dropout=0.0))
    trn, tst = graded_batch(400, 10, seed=2), graded_batch(200, 10, seed=3)
    s = model.scores(tst)
    assert s.shape == (200, 10) and torch.isinf(s[~tst.candidate_mask]).all()
    rel = tst.labels[..., 0]
    before = ndcg_at_k(rel, model.rerank(tst, 5), tst.candidate_mask, 5).mean().item()
    train(model, trn, steps=150)
    pages = model.rerank(tst, 5)
    assert is_valid_page(pages, tst.candidate_mask)
    after = ndcg_at_k(rel, pages, tst.candidate_mask, 5).mean().item()
    assert after > 0.95 and after > before + 0.1


def test_dnn_log_loss_ignores_unshown_candidates():
    torch.manual_seed(0)
    model = PointwiseDNN(DNNConfig(candidate_dim=D, context_dim=C, hidden=(16,), dropout=0.0)).eval()
    batch = log_batch()
    gains, shown = supervised_gains(batch)
    X = batch.candidates.clone()
    X[~shown] = 100.0  # unshown items are not negatives: their features must not matter
    assert model.loss(batch).item() == pytest.approx(model.loss(replace(batch, candidates=X)).item(), abs=1e-6)


def test_dnn_rejects_wrong_widths_and_bad_config():
    model = PointwiseDNN(DNNConfig(candidate_dim=D, context_dim=C))
    with pytest.raises(DataError, match="feature width"):
        model.scores(replace(graded_batch(2, 4, seed=0), candidates=torch.zeros(2, 4, D + 1)))
    with pytest.raises(ConfigError, match="candidate_dim"):
        PointwiseDNN(DNNConfig())


# ---------------------------------------------------------------------- PRM
def prm_config() -> PRMConfig:
    enc = EncoderConfig(candidate_dim=D, context_dim=C, d_model=32, n_heads=2, n_layers=1, dropout=0.0)
    return PRMConfig(encoder=enc, n_layers=1, max_positions=8)


def test_prm_is_permutation_equivariant_and_uses_upstream_rank():
    torch.manual_seed(0)
    model = PRM(prm_config()).eval()
    batch = graded_batch(4, 10, seed=4, ragged=False)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    permuted = replace(
        batch,
        candidates=batch.candidates[:, perm],
        labels=batch.labels[:, perm],
        upstream_score=batch.upstream_score[:, perm],
    )
    with torch.no_grad():
        s, sp = model.scores(batch), model.scores(permuted)
        assert torch.allclose(sp, s[:, perm], atol=1e-5)
        flipped = model.scores(replace(batch, upstream_score=-batch.upstream_score))
    assert not torch.allclose(flipped, s, atol=1e-4)


def test_prm_learns_and_pads():
    torch.manual_seed(0)
    model = PRM(prm_config())
    trn, tst = graded_batch(400, 10, seed=5), graded_batch(200, 10, seed=6)
    train(model, trn, steps=120, lr=3e-3)
    with torch.no_grad():
        s = model.scores(tst)
    assert torch.isinf(s[~tst.candidate_mask]).all()
    pages = model.rerank(tst, 5)
    assert is_valid_page(pages, tst.candidate_mask)
    assert ndcg_at_k(tst.labels[..., 0], pages, tst.candidate_mask, 5).mean().item() > 0.9
    log_loss = model.loss(log_batch())
    log_loss.backward()
    assert torch.isfinite(log_loss)


# ---------------------------------------------------------------------- LambdaMART
def lm_config(**kw) -> LambdaMARTConfig:
    base = dict(candidate_dim=D, context_dim=C, n_estimators=60, num_leaves=7, learning_rate=0.1,
                min_child_samples=5, early_stopping_rounds=10, eval_at=5, num_threads=1)
    return LambdaMARTConfig(**{**base, **kw})


def test_lambdamart_fits_and_ranks_toy_set():
    trn, val, tst = graded_batch(300, 10, seed=7), graded_batch(100, 10, seed=8), graded_batch(200, 10, seed=9)
    model = LambdaMART(lm_config())
    summary = model.fit(trn, val)
    assert 1 <= summary["best_iteration"] <= 60 and summary["valid_ndcg@5"] > 0.9
    s = model.scores(tst)
    assert s.dtype == torch.float32 and torch.isinf(s[~tst.candidate_mask]).all()
    pages = model.rerank(tst, 5)
    assert is_valid_page(pages, tst.candidate_mask)
    ndcg = ndcg_at_k(tst.labels[..., 0], pages, tst.candidate_mask, 5).mean().item()
    up = ndcg_at_k(tst.labels[..., 0], UpstreamSort().rerank(tst, 5), tst.candidate_mask, 5).mean().item()
    assert ndcg > 0.95 and ndcg > up
    # Deterministic given the seed.
    again = LambdaMART(lm_config())
    again.fit(trn, val)
    assert torch.equal(again.scores(tst), s)


def test_lambdamart_on_logs_trains_on_shown_items_and_errors():
    model = LambdaMART(lm_config(min_child_samples=1, n_estimators=5))
    X, y, groups = model._dataset(log_batch(B=4, n=6, L=3))
    assert X.shape == (12, D + C) and list(groups) == [3, 3, 3, 3] and set(y.tolist()) <= {0, 1, 2}
    with pytest.raises(ConfigError, match="not fitted"):
        model.scores(log_batch())
    frac = graded_batch(5, 6, seed=0)
    with pytest.raises(DataError, match="integer gains"):
        model.fit(replace(frac, labels=frac.labels + 0.5))
    with pytest.raises(DataError, match="feature width"):
        model.fit(replace(frac, candidates=torch.zeros(5, 6, D + 2)))
    with pytest.raises(ConfigError, match="num_leaves"):
        LambdaMART(lm_config(num_leaves=1))


def noisy_batch(B: int, n: int, seed: int) -> RerankBatch:
    """`graded_batch` whose relevance is feature 0 plus noise: no tree fits it in a few
    rounds, so early stopping and the random seed both matter."""
    batch = graded_batch(B, n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = batch.candidates[..., 0] + torch.randn(B, n, generator=g)
    rel = (x > 0.0).float() + (x > 1.0).float()
    return replace(batch, labels=rel.unsqueeze(-1))


def test_lambdamart_seed_reaches_lightgbm():
    trn, val, tst = noisy_batch(300, 10, seed=1), noisy_batch(100, 10, seed=2), noisy_batch(50, 10, seed=3)

    def scores(**kw) -> torch.Tensor:
        model = LambdaMART(lm_config(n_estimators=20, early_stopping_rounds=0, bagging_fraction=0.5, feature_fraction=0.5, **kw))
        model.fit(trn, val)
        return model.scores(tst)

    assert torch.equal(scores(seed=3), scores(seed=3))
    assert not torch.equal(scores(seed=3), scores(seed=4))
    with pytest.raises(ConfigError, match="bagging_fraction"):
        LambdaMART(lm_config(bagging_fraction=0.0))


# ---------------------------------------------------------------------- CatBoost
def cb_config(**kw) -> CatBoostConfig:
    base = dict(candidate_dim=D, context_dim=C, n_estimators=40, depth=3, learning_rate=0.2,
                early_stopping_rounds=10, eval_at=5, num_threads=1)
    return CatBoostConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", CATBOOST_LOSSES)
def test_catboost_fits_and_ranks_toy_set(loss: str):
    trn, val, tst = graded_batch(300, 10, seed=7), graded_batch(100, 10, seed=8), graded_batch(200, 10, seed=9)
    model = CatBoostRank(cb_config(loss=loss))
    summary = model.fit(trn, val)
    assert 1 <= summary["best_iteration"] == summary["num_trees"] <= 40 and summary["valid_ndcg@5"] > 0.9
    s = model.scores(tst)
    assert s.dtype == torch.float32 and torch.isinf(s[~tst.candidate_mask]).all()
    pages = model.rerank(tst, 5)
    assert is_valid_page(pages, tst.candidate_mask)
    ndcg = ndcg_at_k(tst.labels[..., 0], pages, tst.candidate_mask, 5).mean().item()
    up = ndcg_at_k(tst.labels[..., 0], UpstreamSort().rerank(tst, 5), tst.candidate_mask, 5).mean().item()
    assert ndcg > 0.9 and ndcg > up


def test_catboost_early_stops_on_validation_and_is_seeded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # CatBoost must not leave catboost_info/ in the working directory
    trn, val, tst = noisy_batch(300, 10, seed=1), noisy_batch(100, 10, seed=2), noisy_batch(50, 10, seed=3)

    def fit(**kw) -> tuple[CatBoostRank, dict]:
        model = CatBoostRank(cb_config(n_estimators=200, learning_rate=0.3, **kw))
        return model, model.fit(trn, val)

    a, info = fit(seed=5)
    assert info["num_trees"] == info["best_iteration"] < 200  # stopped early, kept the best tree count
    b, _ = fit(seed=5)
    c, _ = fit(seed=6)
    assert torch.equal(a.scores(tst), b.scores(tst))
    assert not torch.equal(a.scores(tst), c.scores(tst))
    assert list(tmp_path.iterdir()) == []
    without_valid = CatBoostRank(cb_config(n_estimators=12)).fit(trn)
    assert without_valid == {"num_trees": 12, "best_iteration": 12}


def test_catboost_checkpoint_round_trip_and_corruption(tmp_path):
    from dualrerank.models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint

    trn, tst = noisy_batch(200, 8, seed=4), noisy_batch(30, 8, seed=5)
    model = CatBoostRank(cb_config(n_estimators=15, loss="LambdaMart", seed=2))
    model.fit(trn)
    path = save_checkpoint(model, tmp_path / "cb", "catboost", extra={"fit": {"num_trees": 15}})
    files = read_checkpoint_info(path)["files"]
    # Every file the model wrote is in the checksummed manifest, and nothing else is there.
    assert set(files) == {"catboost.cbm"} and {p.name for p in path.iterdir()} == {"catboost.cbm", "config.json"}
    loaded = load_checkpoint(path)
    assert isinstance(loaded, CatBoostRank) and loaded.config == model.config
    assert torch.equal(loaded.scores(tst), model.scores(tst))
    assert torch.equal(loaded.rerank(tst, 4), model.rerank(tst, 4))

    (path / "catboost.cbm").write_bytes(b"not a catboost model")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    meta = json.loads((path / "config.json").read_text())
    meta["files"]["catboost.cbm"] = hashlib.sha256(b"not a catboost model").hexdigest()
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="catboost.cbm is corrupt") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not fitted"):
        CatBoostRank(cb_config()).save(tmp_path)


def test_catboost_bad_labels_and_config_are_one_line_errors():
    batch = noisy_batch(20, 6, seed=0)
    model = CatBoostRank(cb_config(n_estimators=5))
    nan = batch.labels.clone()
    nan[3, 0, 0] = math.nan
    for labels, message in [
        (nan, "NaN/inf gain in request 3"),
        (-batch.labels - 1, "negative gain"),
        (torch.ones_like(batch.labels), "no request has two candidates with different gains"),
    ]:
        with pytest.raises(DataError, match=message) as err:
            model.fit(replace(batch, labels=labels))
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="NaN/inf gain"):  # the validation split is checked too
        model.fit(batch, replace(batch, labels=nan))
    with pytest.raises(DataError, match="feature width"):
        model.fit(replace(batch, candidates=torch.zeros(20, 6, D + 2)))
    with pytest.raises(ConfigError, match="not fitted"):
        model.scores(batch)
    with pytest.raises(ConfigError, match="loss must be one of"):
        CatBoostRank(cb_config(loss="RMSE"))
    with pytest.raises(ConfigError, match="depth"):
        CatBoostRank(cb_config(depth=0))
    with pytest.raises(ConfigError, match="YetiRank"):  # a YAML/CLI config lists the choices
        from_dict(CatBoostConfig, {"loss": "Yeti"})


def test_tree_fit_shows_one_tick_per_tree(capsys, monkeypatch):
    import dualrerank.models.baselines as baselines

    closed: list[tuple[str, int, int]] = []

    class Recording(baselines.tqdm):
        def close(self) -> None:
            if not self.disable:
                closed.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(baselines, "tqdm", Recording)
    batch = noisy_batch(40, 6, seed=0)
    CatBoostRank(cb_config(n_estimators=7)).fit(batch, progress=True)
    LambdaMART(lm_config(n_estimators=6, min_child_samples=2)).fit(batch, progress=True)
    assert closed == [("catboost trees", 7, 7), ("lambdamart trees", 6, 6)]
    assert "catboost trees" in capsys.readouterr().err
    CatBoostRank(cb_config(n_estimators=3)).fit(batch)
    assert capsys.readouterr().err == ""  # quiet by default (no bar, no CatBoost log)


@pytest.mark.parametrize("name", ["catboost", "lambdamart"])
def test_run_seed_reaches_tree_models_unless_the_config_sets_one(name):
    from dualrerank.train.splits import SplitConfig, load_splits
    from dualrerank.train.supervised import build_for_data

    train = load_splits(SplitConfig(train_requests=20, valid_requests=5, test_requests=5, page_length=4)).train
    assert build_for_data(name, {}, train, seed=3).config.seed == 3
    assert build_for_data(name, {"seed": 5}, train, seed=3).config.seed == 5
