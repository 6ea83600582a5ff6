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
from typing import Any, cast

import torch
from torch import nn

from dualrerank.config import option
from dualrerank.feedback import gain_columns, graded_column, realised_gain
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
    """`([B, n] labels, [B, n] bool labelled)` for BPR pairs: on logs, the realised gain
    (`feedback.realised_gain`: long view > click > nothing, unit-free) of the label columns
    of shown items, unshown items carrying no label (method.md); on graded lists the graded
    label (`feedback.graded_column`) of every valid candidate.

    Read from `labels` (per candidate), which logged sources fill along the shown page."""
    if batch.labels is None:
        return torch.zeros(batch.candidate_mask.shape), torch.zeros_like(batch.candidate_mask)
    if gain_columns(batch.label_names):
        shown = torch.zeros_like(batch.candidate_mask)
        if batch.logged_page is not None:
            pm = (
                batch.logged_page_mask
                if batch.logged_page_mask is not None
                else torch.ones_like(batch.logged_page, dtype=torch.bool)
            )
            shown = _shown(batch.logged_page, pm, batch.num_candidates)
        shown = shown & batch.candidate_mask
        gain = realised_gain(batch.labels, batch.label_names, shown, field="labels", where=batch.request_name)
        return torch.where(shown, gain, torch.zeros_like(gain)), shown
    return graded_column(batch), batch.candidate_mask


def _shown(page: torch.Tensor, page_mask: torch.Tensor, n: int) -> torch.Tensor:
    # scatter_add: an absent position may repeat a shown item's index; it must not unshow it.
    shown = torch.zeros(page.shape[0], n, dtype=torch.long, device=page.device)
    return shown.scatter_add(1, page.long().clamp(0, n - 1), page_mask.long()) > 0


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
    loss = cast(Any, model).loss(batch)  # nn.Module does not declare `loss`; these models define it
    return loss, {}
