"""Supervised objectives, one per kind of model, and the per-request extras they need.

An objective is `(model, batch, extras, generator) -> (loss, logs)`; `extras` are the
minibatch rows of tensors prepared once before training by `prepare_extras` (target
pages and weights, pairwise labels). Models that define their own supervised loss
(evaluator, DNN, PRM) are trained through `model.loss(batch)`.

- list generators (AR teacher, Seq2Slate, the NAR student without a teacher):
  `L_MLE` of the target page under the model's own sequential masking, plus for the
  teacher `bpr_weight * L_BPR` (method.md section 2). Seq2Slate is the teacher with
  `bpr_weight = 0`; `nar_no_kd` is the student trained the same way on the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dualrerank.config import option
from dualrerank.losses import bpr_loss, mle_loss
from dualrerank.schema import RerankBatch
from dualrerank.train.loop import Extras, Objective
from dualrerank.train.targets import Targets


@dataclass
class GeneratorObjectiveConfig:
    target: str = option(
        "evaluator",
        "teacher target: 'evaluator' (beam search over a learned list-wise evaluator) or 'logged' "
        "(logged items by realised gain, reward-weighted; graded lists by label)",
        choices=("evaluator", "logged"),
    )
    bpr_weight: float = option(1.0, "weight of L_BPR beside L_MLE (0 = MLE only, as Seq2Slate)")
    bpr_pairs: int = option(4, "BPR pairs sampled per step")
    reward_weighted: bool = option(True, "weight each logged request by its page reward relative to the batch")
    evaluator_beam: int = option(4, "beam width of the evaluator search that builds 'evaluator' targets")


def pair_labels(batch: RerankBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`([B, n] labels, [B, n] bool labelled)` for BPR pairs: graded label, or the realised
    gain (click + long view) of shown items; unshown items carry no label (method.md)."""
    names = list(batch.label_names)
    if batch.labels is None:
        return torch.zeros(batch.candidate_mask.shape), torch.zeros_like(batch.candidate_mask)
    if "click" in names:
        gain = batch.labels[..., names.index("click")]
        if "long_view" in names:
            gain = gain + batch.labels[..., names.index("long_view")]
        shown = torch.zeros_like(batch.candidate_mask)
        if batch.logged_page is not None:
            pm = batch.logged_page_mask if batch.logged_page_mask is not None else torch.ones_like(batch.logged_page, dtype=torch.bool)
            shown = _shown(batch.logged_page, pm, batch.num_candidates)
        return gain, shown & batch.candidate_mask
    return batch.labels[..., 0], batch.candidate_mask


def _shown(page: torch.Tensor, page_mask: torch.Tensor, n: int) -> torch.Tensor:
    shown = torch.zeros(page.shape[0], n, dtype=torch.bool)
    return shown.scatter(1, page.clamp(0, n - 1), page_mask)


def generator_extras(batch: RerankBatch, targets: Targets) -> Extras:
    labels, labelled = pair_labels(batch)
    return {
        "target": targets.pages,
        "target_mask": targets.mask,
        "weight": targets.weights,
        "pair_label": labels,
        "pair_mask": labelled,
    }


def generator_objective(cfg: GeneratorObjectiveConfig, step_logits_of) -> Objective:
    """MLE (+ BPR) objective for a list generator; `step_logits_of(model, batch, target,
    target_mask)` returns the model's sequentially masked step logits `[B, L, n]`."""

    def objective(model: nn.Module, batch: RerankBatch, extras: Extras, gen: torch.Generator):
        target, tmask = extras["target"], extras["target_mask"]
        logits = step_logits_of(model, batch, target, tmask)
        mle = mle_loss(logits, target, tmask, extras["weight"])
        logs = {"mle": float(mle.detach())}
        loss = mle
        if cfg.bpr_weight > 0:
            bpr = bpr_loss(logits, target, tmask, extras["pair_label"], extras["pair_mask"], cfg.bpr_pairs, gen)
            loss = loss + cfg.bpr_weight * bpr
            logs["bpr"] = float(bpr.detach())
        return loss, logs

    return objective


def own_loss_objective(model: nn.Module, batch: RerankBatch, extras: Extras, gen: torch.Generator):
    """For models that define `loss(batch)` (evaluator, DNN, PRM)."""
    loss = model.loss(batch)
    return loss, {}
