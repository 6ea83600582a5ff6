"""Score-and-sort baselines: upstream sort, a pointwise DNN, PRM, and two gradient-boosted
tree rankers (LightGBM LambdaMART, CatBoost).

- `UpstreamSort`: the upstream ranker's order (no parameters) [ours].
- `PointwiseDNN`: an MLP on `[item features, context, item * W context]` [ours]; one score
  per candidate, independent of the other candidates.
- `PRM`: Personalized Re-ranking Model (Pei et al., RecSys 2019): a transformer over the
  list in the upstream order with position embeddings of the upstream rank, then a score
  per item [paper]. Here the input layer is the shared `CandidateEncoder` (its context
  fusion plays the role of PRM's personalised vector) [ours], followed by the upstream-
  rank embedding and `n_layers` bidirectional blocks [paper]; ranks beyond
  `max_positions` share the last embedding [ours].
- `LambdaMART`: LightGBM's LambdaMART (objective `lambdarank`, trained with `lightgbm.train`,
  the engine behind `LGBMRanker`, which would also need scikit-learn) on candidate
  features plus the broadcast context; one query group per request [Burges 2010, via
  LightGBM].
- `CatBoostRank`: CatBoost's `CatBoostRanker` on the same rows and groups, loss YetiRank
  by default [Gulin et al. 2011; Lyzhin et al., ICML 2023, via CatBoost], or QueryRMSE,
  LambdaMart, PairLogitPairwise. A team choosing a reranker compares it with the best tree
  ranker it could use instead, which is not always LightGBM (docs/experiments.md).

Both tree rankers early-stop on NDCG@`eval_at` of the validation split (exponential gain,
as `metrics.ndcg_at_k`), keep the best iteration, take their random seed from the config,
and save one model file in their library's own format into the checkpoint directory.

Supervised target shared by all trainable baselines (`supervised_gains`) [ours]: on
graded lists the graded label (`feedback.graded_column`); on logs the realised gain of
each *shown* item (`feedback.shown_gain`: [click > 0] + [long_view > 0], so 0..2 and the
same in any unit of the feedback columns), with unshown items excluded (unshown is not
negative). The nn.Module baselines train with
`losses.listwise_softmax_ce` on that gain; LambdaMART uses it as its integer relevance,
CatBoost as its (real-valued) target.

Every model: `scores(batch) -> [B, n]` (padding = -inf) and `rerank(batch, k) -> [B, k]`
by a stable sort (`decoding.sort_pages`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import catboost
import lightgbm as lgb
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dualrerank.config import option
from dualrerank.decoding import sort_pages
from dualrerank.errors import CheckpointError, ConfigError, DataError
from dualrerank.feedback import graded_column, has_page_gain, shown_gain
from dualrerank.losses import listwise_softmax_ce
from dualrerank.models.encoder import CandidateEncoder, EncoderConfig
from dualrerank.models.evaluator import eval_mode, upstream_order
from dualrerank.models.layers import Block
from dualrerank.schema import RerankBatch

__all__ = [
    "supervised_gains",
    "UpstreamConfig",
    "UpstreamSort",
    "DNNConfig",
    "PointwiseDNN",
    "PRMConfig",
    "PRM",
    "LambdaMARTConfig",
    "LambdaMART",
    "CATBOOST_LOSSES",
    "CatBoostConfig",
    "CatBoostRank",
]


def supervised_gains(batch: RerankBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate training gain and the candidates it is defined for.

    Logs (a logged page with click and/or long-view feedback): the realised gain of each
    shown item (`feedback.shown_gain`), mask = shown items. Graded lists: the graded label
    (`feedback.graded_column`), mask = valid candidates.

    Returns:
        gains `[B, n]` float (>= 0) and mask `[B, n]` bool.
    """
    if has_page_gain(batch):
        gains, mask = shown_gain(batch)  # checked there: feedback finite and >= 0
    else:
        gains, mask = graded_column(batch), batch.candidate_mask
    # NaN passes a `< 0` test; LightGBM would read it as a missing label, CatBoost stops.
    bad = (~torch.isfinite(gains) & mask).any(dim=1)
    if bool(bad.any()):
        raise DataError(f"labels: NaN/inf gain in {batch.request_name(int(bad.nonzero()[0]))}; gains must be finite")
    bad = ((gains < 0) & mask).any(dim=1)
    if bool(bad.any()):
        raise DataError(f"labels: negative gain in {batch.request_name(int(bad.nonzero()[0]))}; gains must be >= 0")
    return torch.where(mask, gains, torch.zeros_like(gains)), mask


def _mask_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, scores, torch.full_like(scores, -math.inf))


def _check_dims(batch: RerankBatch, candidate_dim: int, context_dim: int, who: str) -> None:
    if batch.candidate_dim != candidate_dim:
        raise DataError(f"candidates: feature width {batch.candidate_dim} != the {who}'s {candidate_dim}")
    if batch.context_dim != context_dim:
        raise DataError(f"context: width {batch.context_dim} != the {who}'s {context_dim}")


class _ScoreAndSort:
    """`rerank` for models that define `scores(batch) -> [B, n]`."""

    if TYPE_CHECKING:  # defined by every subclass

        def scores(self, batch: RerankBatch) -> torch.Tensor: ...

    def rerank(self, batch: RerankBatch, k: int) -> torch.Tensor:
        """`[B, k]` top-k candidates by score (ties: lower index first)."""
        if isinstance(self, nn.Module):
            with eval_mode(self):
                s = self.scores(batch)
        else:
            s = self.scores(batch)
        return sort_pages(s, batch.candidate_mask, k)


class _ListwiseTrained(_ScoreAndSort):
    """Score-and-sort models trained by listwise softmax cross-entropy (DNN, PRM)."""

    def forward(self, batch: RerankBatch) -> torch.Tensor:
        return self.scores(batch)

    def loss(self, batch: RerankBatch) -> torch.Tensor:
        """Listwise softmax cross-entropy on `supervised_gains` (shown items only for logs)."""
        gains, mask = supervised_gains(batch)
        return listwise_softmax_ce(self.scores(batch), gains, mask)


# ---------------------------------------------------------------------- upstream sort
@dataclass
class UpstreamConfig:
    fallback_feature: int = option(-1, "candidate feature column to sort by when a batch has no upstream_score (-1: none, error)")


class UpstreamSort(_ScoreAndSort, nn.Module):
    """Sort by `batch.upstream_score` (descending); no parameters."""

    def __init__(self, config: UpstreamConfig | None = None) -> None:
        super().__init__()
        self.config = config or UpstreamConfig()

    def scores(self, batch: RerankBatch) -> torch.Tensor:
        """`[B, n]` upstream scores, -inf at padding."""
        if batch.upstream_score is not None:
            s = batch.upstream_score.float()
        elif 0 <= self.config.fallback_feature < batch.candidate_dim:
            s = batch.candidates[..., self.config.fallback_feature].float()
        else:
            raise DataError("upstream_score: missing, and no valid fallback_feature configured for upstream sort")
        return _mask_scores(s, batch.candidate_mask)

    def forward(self, batch: RerankBatch) -> torch.Tensor:
        return self.scores(batch)


# ---------------------------------------------------------------------- pointwise DNN
@dataclass
class DNNConfig:
    candidate_dim: int = option(0, "candidate feature width d (set from the data)")
    context_dim: int = option(0, "context feature width c (set from the data)")
    hidden: tuple[int, ...] = option((128, 64), "hidden layer widths of the MLP")
    dropout: float = option(0.1, "dropout after each hidden layer", ge=0, lt=1)


class PointwiseDNN(_ListwiseTrained, nn.Module):
    """`scores = MLP([x, c, x * W c])` per candidate, with stored feature normalisation."""

    # buffers (register_buffer), declared for the type checker
    cand_mean: torch.Tensor
    cand_std: torch.Tensor
    ctx_mean: torch.Tensor
    ctx_std: torch.Tensor

    def __init__(self, config: DNNConfig) -> None:
        super().__init__()
        if config.candidate_dim < 1:
            raise ConfigError("candidate_dim: must be set to the data's feature width (>= 1)")
        if any(h < 1 for h in config.hidden) or not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"hidden/dropout: widths must be >= 1 and dropout in [0, 1), got {config.hidden}, {config.dropout}")
        self.config = config
        d, c = config.candidate_dim, max(config.context_dim, 1)
        self.register_buffer("cand_mean", torch.zeros(d))
        self.register_buffer("cand_std", torch.ones(d))
        self.register_buffer("ctx_mean", torch.zeros(c))
        self.register_buffer("ctx_std", torch.ones(c))
        self.ctx_proj = nn.Linear(c, d)
        layers: list[nn.Module] = []
        width = 2 * d + c
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(config.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    @torch.no_grad()
    def fit_normalizer(self, batch: RerankBatch) -> None:
        """Store the feature mean/std of `batch` (training data, valid candidates only)."""
        x = batch.candidates[batch.candidate_mask]
        self.cand_mean.copy_(x.mean(0))
        self.cand_std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
        if batch.context_dim > 0:
            self.ctx_mean.copy_(batch.context.mean(0))
            self.ctx_std.copy_(batch.context.std(0, unbiased=False).clamp_min(1e-6))

    def scores(self, batch: RerankBatch) -> torch.Tensor:
        """`[B, n]` scores, -inf at padding."""
        _check_dims(batch, self.config.candidate_dim, self.config.context_dim, "DNN")
        x = (batch.candidates - self.cand_mean) / self.cand_std
        x = x * batch.candidate_mask.unsqueeze(-1).to(x.dtype)
        ctx = batch.context if batch.context_dim > 0 else x.new_zeros(batch.batch_size, 1)
        ctx = (ctx - self.ctx_mean) / self.ctx_std
        cx = ctx.unsqueeze(1).expand(-1, x.shape[1], -1)
        s = self.mlp(torch.cat([x, cx, x * self.ctx_proj(ctx).unsqueeze(1)], dim=-1)).squeeze(-1)
        return _mask_scores(s, batch.candidate_mask)


# ---------------------------------------------------------------------- PRM
@dataclass
class PRMConfig:
    encoder: EncoderConfig = option(factory=EncoderConfig, help="candidate encoder (feature fusion + bidirectional transformer)")
    n_layers: int = option(2, "PRM transformer blocks after the upstream-rank embedding")
    max_positions: int = option(100, "upstream ranks with their own embedding (deeper ranks share the last)")


class PRM(_ListwiseTrained, nn.Module):
    """Transformer over the list in upstream order (Pei et al. 2019), score-and-sort."""

    def __init__(self, config: PRMConfig) -> None:
        super().__init__()
        enc = config.encoder
        if enc.candidate_dim < 1:
            raise ConfigError("encoder.candidate_dim: must be set to the data's feature width (>= 1)")
        if config.n_layers < 1 or config.max_positions < 1:
            raise ConfigError(f"n_layers/max_positions: must be >= 1, got {config.n_layers}, {config.max_positions}")
        self.config = config
        d = enc.d_model
        self.encoder = CandidateEncoder(enc)
        self.rank_emb = nn.Embedding(config.max_positions, d)
        nn.init.normal_(self.rank_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, enc.n_heads, enc.ffn_mult, enc.dropout) for _ in range(config.n_layers))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def fit_normalizer(self, batch: RerankBatch) -> None:
        """Store the feature mean/std of `batch` (training data) in the encoder."""
        self.encoder.fit_normalizer(batch.candidates, batch.candidate_mask, batch.context)

    def scores(self, batch: RerankBatch) -> torch.Tensor:
        """`[B, n]` scores, -inf at padding."""
        enc = self.config.encoder
        _check_dims(batch, enc.candidate_dim, enc.context_dim, "PRM")
        mask = batch.candidate_mask
        order = upstream_order(batch)  # [B, n]: candidate at each upstream rank
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        h = self.encoder(batch.candidates, batch.context, mask)
        h = h + self.rank_emb(rank.clamp(max=self.config.max_positions - 1))
        allowed = mask.unsqueeze(1)
        for block in self.blocks:
            h, _ = block(h, allowed)
        return _mask_scores(self.head(self.ln_out(h)).squeeze(-1), mask)


# ---------------------------------------------------------------------- tree rankers
class _TreeRanker(_ScoreAndSort, ABC):
    """What the gradient-boosted rankers share (they are not nn.Modules): the feature rows,
    the training rows and their checks, scores, and the progress bar of `fit`.

    Subclasses set `name` (registry name), `model_file` (the one file `save` writes into
    the checkpoint directory) and define `_train`, `_predict`, `_fitted`, `save`, `load`."""

    name: str
    model_file: str
    config: LambdaMARTConfig | CatBoostConfig  # set by the subclass's __init__

    def _features(self, batch: RerankBatch, rows: torch.Tensor) -> np.ndarray:
        """`[rows.sum(), d + c]` features of the selected candidates, request by request."""
        _check_dims(batch, self.config.candidate_dim, self.config.context_dim, self.name)
        ctx = batch.context.unsqueeze(1).expand(-1, batch.num_candidates, -1)
        return torch.cat([batch.candidates, ctx], dim=-1)[rows].double().cpu().numpy()

    def _dataset(self, batch: RerankBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features, gains (float64) and group sizes of the labelled candidates; the rows of a
        group are contiguous (boolean indexing keeps request order)."""
        gains, mask = supervised_gains(batch)
        sizes = mask.sum(dim=1)
        groups = sizes[sizes > 0].cpu().numpy()
        if groups.size == 0:
            raise DataError("labels: no request has a labelled (shown) candidate to train on")
        return self._features(batch, mask), gains[mask].double().cpu().numpy(), groups

    def _train_rows(self, batch: RerankBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X, y, groups = self._dataset(batch)
        # Every ranking loss learns from pairs inside a request: with no request holding two
        # different gains there is nothing to learn (CatBoost stops with a C++ trace).
        starts = np.concatenate([[0], np.cumsum(groups)[:-1]])
        if not bool((np.maximum.reduceat(y, starts) > np.minimum.reduceat(y, starts)).any()):
            raise DataError(f"labels: no request has two candidates with different gains; {self.name} has no pair to learn from")
        return X, y, groups

    def fit(self, train: RerankBatch, valid: RerankBatch | None = None, *, progress: bool = False) -> dict:
        """Train on `train`; with `valid`, early-stop on its NDCG@eval_at (exponential gain,
        as `metrics.ndcg_at_k`) and keep the best iteration. Returns `{"num_trees",
        "best_iteration", "valid_ndcg@k"}` (the last with `valid` only)."""
        X, y, g = self._train_rows(train)
        val = self._dataset(valid) if valid is not None else None
        with tqdm(
            total=self.config.n_estimators, desc=f"{self.name} trees", unit="tree", disable=not progress, leave=False
        ) as bar:
            return self._train(X, y, g, val, bar)

    @abstractmethod
    def _train(self, X: np.ndarray, y: np.ndarray, g: np.ndarray, val: tuple | None, bar: tqdm) -> dict:
        """Fit on rows `X`, gains `y`, group sizes `g` (early-stop on `val` = (X, y, g))."""

    @abstractmethod
    def _predict(self, X: np.ndarray) -> np.ndarray:
        """One score per row of `X`."""

    @abstractmethod
    def _fitted(self) -> bool:
        """Whether a trained or loaded model is held."""

    def scores(self, batch: RerankBatch) -> torch.Tensor:
        """`[B, n]` scores, -inf at padding."""
        if not self._fitted():
            raise ConfigError(f"{self.name}: model is not fitted; call fit() or load a checkpoint")
        mask = batch.candidate_mask
        pred = self._predict(self._features(batch, mask))
        out = torch.full(mask.shape, -math.inf, dtype=torch.float32, device=mask.device)
        out[mask] = torch.from_numpy(np.asarray(pred, dtype=np.float32)).to(mask.device)
        return out

    def _model_path(self, directory: str | Path) -> Path:
        path = Path(directory) / self.model_file
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: {self.model_file} missing")
        return path

    def _check_width(self, n_features: int, directory: str | Path) -> None:
        expected = self.config.candidate_dim + self.config.context_dim
        if n_features != expected:
            raise CheckpointError(f"checkpoint {directory}: model has {n_features} features, config says {expected}")


# ---------------------------------------------------------------------- LambdaMART
@dataclass
class LambdaMARTConfig:
    candidate_dim: int = option(0, "candidate feature width d (set from the data)")
    context_dim: int = option(0, "context feature width c (set from the data)")
    n_estimators: int = option(300, "boosting rounds (upper bound when early stopping)")
    num_leaves: int = option(31, "leaves per tree")
    learning_rate: float = option(0.05, "shrinkage")
    min_child_samples: int = option(20, "minimum rows per leaf")
    early_stopping_rounds: int = option(30, "stop when validation NDCG has not improved for this many rounds (0: off)")
    eval_at: int = option(10, "NDCG cutoff used for early stopping")
    bagging_fraction: float = option(1.0, "share of rows drawn (by `seed`) for each tree; 1: all rows, no randomness")
    feature_fraction: float = option(1.0, "share of features drawn (by `seed`) for each tree; 1: all features")
    seed: int = option(0, "LightGBM random seed (the experiment sets it to the run's seed)")
    num_threads: int = option(2, "LightGBM threads")


MODEL_FILE = "lightgbm.txt"


class LambdaMART(_TreeRanker):
    """LightGBM LambdaMART ranker (not an nn.Module): `fit`, `scores`, `rerank`, `save`/`load`."""

    name = "lambdamart"
    model_file = MODEL_FILE
    config: LambdaMARTConfig

    def __init__(self, config: LambdaMARTConfig) -> None:
        if config.n_estimators < 1 or config.num_leaves < 2 or config.learning_rate <= 0 or config.eval_at < 1:
            raise ConfigError("lambdamart: need n_estimators >= 1, num_leaves >= 2, learning_rate > 0, eval_at >= 1")
        if not (0 < config.bagging_fraction <= 1 and 0 < config.feature_fraction <= 1) or config.num_threads < 1:
            raise ConfigError("lambdamart: need bagging_fraction and feature_fraction in (0, 1], num_threads >= 1")
        self.config = config
        self.booster: lgb.Booster | None = None

    def _dataset(self, batch: RerankBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X, y, groups = super()._dataset(batch)
        # lambdarank's default label_gain table is 2^i - 1 for i in 0..30.
        if bool((y != np.round(y)).any()) or bool((y > 30).any()):
            raise DataError(
                "labels: LambdaMART needs integer gains in 0..30 (graded relevance, or the realised gain 0..2 of logs)"
            )
        return X, y.astype(np.int32), groups

    def _train(self, X: np.ndarray, y: np.ndarray, g: np.ndarray, val: tuple | None, bar: tqdm) -> dict:
        cfg = self.config
        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [cfg.eval_at],
            "num_leaves": cfg.num_leaves,
            "learning_rate": cfg.learning_rate,
            "min_child_samples": cfg.min_child_samples,
            "bagging_fraction": cfg.bagging_fraction,
            "bagging_freq": 1 if cfg.bagging_fraction < 1 else 0,  # LightGBM bags only with a frequency
            "feature_fraction": cfg.feature_fraction,
            "seed": cfg.seed,
            "num_threads": cfg.num_threads,
            "deterministic": True,
            "force_row_wise": True,
            "verbose": -1,
        }
        train_set = lgb.Dataset(X, y, group=g, params={"verbose": -1})
        valid_sets: list[lgb.Dataset] = []
        record: dict[str, Any] = {}
        callbacks = [lambda env: bar.update(1)]
        if val is not None:
            valid_sets = [lgb.Dataset(val[0], val[1], group=val[2], reference=train_set, params={"verbose": -1})]
            callbacks.append(lgb.record_evaluation(record))
            if cfg.early_stopping_rounds > 0:
                callbacks.append(lgb.early_stopping(cfg.early_stopping_rounds, verbose=False))
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=cfg.n_estimators,
            valid_sets=valid_sets,
            valid_names=["valid"] * len(valid_sets),
            callbacks=callbacks,
        )
        self.booster = booster
        best = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
        summary: dict = {"num_trees": booster.num_trees(), "best_iteration": best}
        if val is not None:
            summary[f"valid_ndcg@{cfg.eval_at}"] = float(record["valid"][f"ndcg@{cfg.eval_at}"][best - 1])
        return summary

    def _fitted(self) -> bool:
        return self.booster is not None

    def _predict(self, X: np.ndarray) -> np.ndarray:
        assert self.booster is not None  # callers check _fitted()
        return cast(np.ndarray, self.booster.predict(X, num_threads=self.config.num_threads))

    def save(self, directory: str | Path) -> None:
        """Write LightGBM's model text file (best iteration) into `directory`."""
        if self.booster is None:
            raise ConfigError("lambdamart: model is not fitted; nothing to save")
        self.booster.save_model(str(Path(directory) / MODEL_FILE))

    def load(self, directory: str | Path) -> LambdaMART:
        """Read the model text file written by `save`; raises `CheckpointError` if unusable."""
        path = self._model_path(directory)
        try:
            booster = lgb.Booster(model_file=str(path))
        except lgb.basic.LightGBMError as exc:
            raise CheckpointError(f"checkpoint {directory}: {MODEL_FILE} is corrupt ({str(exc).splitlines()[0]})") from None
        self._check_width(booster.num_feature(), directory)
        self.booster = booster
        return self


# ---------------------------------------------------------------------- CatBoost
CATBOOST_LOSSES = ("YetiRank", "QueryRMSE", "LambdaMart", "PairLogitPairwise")


@dataclass
class CatBoostConfig:
    candidate_dim: int = option(0, "candidate feature width d (set from the data)")
    context_dim: int = option(0, "context feature width c (set from the data)")
    loss: str = option("YetiRank", "CatBoost ranking loss", choices=CATBOOST_LOSSES)
    n_estimators: int = option(1000, "boosting rounds (upper bound when early stopping)")
    depth: int = option(6, "depth of each (symmetric) tree")
    learning_rate: float = option(0.05, "shrinkage")
    l2_leaf_reg: float = option(3.0, "L2 regularisation of leaf values")
    early_stopping_rounds: int = option(50, "stop when validation NDCG has not improved for this many rounds (0: off)")
    eval_at: int = option(10, "NDCG cutoff used for early stopping")
    seed: int = option(0, "CatBoost random seed (the experiment sets it to the run's seed)")
    num_threads: int = option(2, "CatBoost threads (thread_count)")


CATBOOST_FILE = "catboost.cbm"


class _CatBoostProgress:
    """CatBoost callback: one tick of the bar per tree (CatBoost calls `after_iteration`)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def after_iteration(self, info: Any) -> bool:
        self.bar.update(1)
        return True  # keep training


class CatBoostRank(_TreeRanker):
    """CatBoost ranker (`catboost.CatBoostRanker`, not an nn.Module): `fit`, `scores`,
    `rerank`, `save`/`load`."""

    name = "catboost"
    model_file = CATBOOST_FILE
    config: CatBoostConfig

    def __init__(self, config: CatBoostConfig) -> None:
        if config.loss not in CATBOOST_LOSSES:
            raise ConfigError(f"catboost: loss must be one of {list(CATBOOST_LOSSES)}, got {config.loss!r}")
        if config.n_estimators < 1 or not 1 <= config.depth <= 16 or config.learning_rate <= 0 or config.eval_at < 1:
            raise ConfigError("catboost: need n_estimators >= 1, depth in 1..16, learning_rate > 0, eval_at >= 1")
        if config.l2_leaf_reg < 0 or config.early_stopping_rounds < 0 or config.num_threads < 1:
            raise ConfigError("catboost: need l2_leaf_reg >= 0, early_stopping_rounds >= 0, num_threads >= 1")
        self.config = config
        self.model: catboost.CatBoostRanker | None = None

    @staticmethod
    def _pool(X: np.ndarray, y: np.ndarray, g: np.ndarray) -> catboost.Pool:
        return catboost.Pool(X, y, group_id=np.repeat(np.arange(g.size), g))

    def _train(self, X: np.ndarray, y: np.ndarray, g: np.ndarray, val: tuple | None, bar: tqdm) -> dict:
        cfg = self.config
        metric = f"NDCG:top={cfg.eval_at};type=Exp"  # the gain of metrics.ndcg_at_k
        model = catboost.CatBoostRanker(
            loss_function=cfg.loss,
            iterations=cfg.n_estimators,
            depth=cfg.depth,
            learning_rate=cfg.learning_rate,
            l2_leaf_reg=cfg.l2_leaf_reg,
            random_seed=cfg.seed,
            thread_count=cfg.num_threads,
            eval_metric=metric,
            logging_level="Silent",
            allow_writing_files=False,  # else CatBoost writes catboost_info/ into the working directory
        )
        try:
            model.fit(
                self._pool(X, y, g),
                eval_set=self._pool(*val) if val is not None else None,
                early_stopping_rounds=cfg.early_stopping_rounds if val is not None and cfg.early_stopping_rounds > 0 else None,
                use_best_model=val is not None,
                callbacks=[_CatBoostProgress(bar)],
            )
        except catboost.CatBoostError as exc:
            raise DataError(f"catboost: training failed ({str(exc).splitlines()[0]})") from None
        self.model = model
        best = model.get_best_iteration()
        best = best + 1 if best is not None else model.tree_count_
        summary: dict = {"num_trees": model.tree_count_, "best_iteration": best}
        if val is not None:
            summary[f"valid_ndcg@{cfg.eval_at}"] = float(model.get_evals_result()["validation"][metric][best - 1])
        return summary

    def _fitted(self) -> bool:
        return self.model is not None

    def _predict(self, X: np.ndarray) -> np.ndarray:
        assert self.model is not None  # callers check _fitted()
        return self.model.predict(X, thread_count=self.config.num_threads)

    def save(self, directory: str | Path) -> None:
        """Write CatBoost's binary model (`catboost.cbm`, best iteration) into `directory`."""
        if self.model is None:
            raise ConfigError("catboost: model is not fitted; nothing to save")
        self.model.save_model(str(Path(directory) / CATBOOST_FILE), format="cbm")

    def load(self, directory: str | Path) -> CatBoostRank:
        """Read the model written by `save`; raises `CheckpointError` if unusable."""
        path = self._model_path(directory)
        model = catboost.CatBoostRanker()
        try:
            model.load_model(str(path), format="cbm")
        except catboost.CatBoostError as exc:
            raise CheckpointError(f"checkpoint {directory}: {CATBOOST_FILE} is corrupt ({str(exc).splitlines()[0]})") from None
        self._check_width(len(model.feature_names_), directory)
        self.model = model
        return self
