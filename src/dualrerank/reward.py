"""The reward system: named rules that turn a group of pages into a reward vector.

[paper] Dual-Rerank scores each sampled page with a reward system made of an evaluator
model, prior rules and posterior rules, and gives the policy a *vector* ("hybrid") reward.
[ours] Concretely:

- a **rule** is a plain callable `rule(batch, pages, feedback) -> [B, G]`: one reward
  dimension for each of the G pages of each of the B requests;
- `RewardSystem({"name": rule, ...})` calls its rules in order and stacks them into a
  `RewardVector` (`values [B, G, D]` + `names`); the trade-off between dimensions is not
  its business (it holds no weights): the learner weighs them.
- **posterior rules** read what users did: the realised feedback of a page that was shown,
  and, for a page that was not, a prediction (the learned evaluator), so every page of a
  group has every dimension (`posterior`); on logged data, the logged labels along the
  page (`logged_labels`).
- **evaluator rules** read the learned list-wise evaluator's prediction (`evaluator`).
- **prior rules** encode what a team wants whatever users do: no duplicate item on a page
  (`duplicate_items`), distinct categories in the first viewport (`viewport_diversity`),
  at most `cap` items of one category (`category_cap`).

The reward system never sees the world's hidden state: only the batch (what a production
system observes), the pages and the feedback to pages that were shown.

Adding a rule takes a few lines (docs/online.md):

    def freshness(batch, pages, feedback):          # [B, G]: mean upstream score on the page
        s = batch.upstream_score.gather(1, pages.flatten(1)).view(pages.shape)
        return s.mean(-1)
    system = RewardSystem({**default_rules, "freshness": freshness})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dualrerank.errors import ConfigError, DataError
from dualrerank.schema import RerankBatch

__all__ = [
    "PageFeedback",
    "RewardVector",
    "Rule",
    "RewardSystem",
    "posterior",
    "evaluator_rule",
    "logged_labels",
    "duplicate_items",
    "viewport_diversity",
    "category_cap",
]


@dataclass
class PageFeedback:
    """What users did on the pages of a group.

    Attributes:
        per_position: name -> `[B, G, L]` feedback per position (click, long view, watch
            time...), in the units the source reports; any value where `shown` is False.
        per_page: name -> `[B, G]` feedback per page (reformulation...).
        shown: `[B, G]` bool, True for pages users saw (one per request under
            `exposure: one`, all under `exposure: all`).
    """

    per_position: dict[str, torch.Tensor]
    shown: torch.Tensor
    per_page: dict[str, torch.Tensor] = field(default_factory=dict)

    def page_total(self, name: str) -> torch.Tensor:
        """`[B, G]`: the per-position feedback summed over the page, or the per-page value."""
        if name in self.per_position:
            return self.per_position[name].sum(-1)
        if name in self.per_page:
            return self.per_page[name]
        have = sorted(self.per_position) + sorted(self.per_page)
        raise DataError(f"feedback: no dimension {name!r}; the source reports {have}")


class Rule(Protocol):
    def __call__(self, batch: RerankBatch, pages: torch.Tensor, feedback: PageFeedback | None) -> torch.Tensor: ...


class _Evaluator(Protocol):
    """What `evaluator_rule` uses of the list-wise evaluator (an nn.Module; this module never imports models)."""

    training: bool

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def predict(self, batch: RerankBatch, pages: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RewardVector:
    """`values [B, G, D]` with the name of each of the D dimensions."""

    values: torch.Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.values.dim() != 3 or self.values.shape[-1] != len(self.names):
            raise ValueError(f"RewardVector: values {tuple(self.values.shape)} do not fit names {self.names}")

    def column(self, name: str) -> torch.Tensor:
        return self.values[..., self.names.index(name)]


class RewardSystem:
    """Named rules in order; `system(batch, pages, feedback)` -> `RewardVector`."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        if not rules:
            raise ConfigError("reward: a reward system needs at least one rule")
        for name, rule in rules.items():
            if not callable(rule):
                raise ConfigError(f"reward: rule {name!r} is not callable")
        self.rules = dict(rules)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.rules)

    def __call__(self, batch: RerankBatch, pages: torch.Tensor, feedback: PageFeedback | None = None) -> RewardVector:
        if pages.dim() != 3:
            raise DataError(f"reward: pages must be [B, G, L], got {tuple(pages.shape)}")
        B, G, _ = pages.shape
        cols = []
        for name, rule in self.rules.items():
            value = rule(batch, pages, feedback)
            if tuple(value.shape) != (B, G):
                raise DataError(f"reward: rule {name!r} returned shape {tuple(value.shape)}, expected {(B, G)}")
            cols.append(value.float())
        return RewardVector(torch.stack(cols, dim=-1), self.names)


# --------------------------------------------------------------------------- posterior


def posterior(name: str, predict: Callable[[RerankBatch, torch.Tensor], torch.Tensor] | None = None) -> Rule:
    """The realised page total of feedback `name` where the page was shown; elsewhere
    `predict(batch, pages) -> [B, G]` (the evaluator's prediction), or NaN without one
    (the learner then leaves those pages out)."""

    def rule(batch: RerankBatch, pages: torch.Tensor, feedback: PageFeedback | None) -> torch.Tensor:
        if feedback is None:
            raise DataError(f"reward: posterior rule {name!r} needs the feedback of the shown pages")
        seen = feedback.page_total(name).float()
        if bool(feedback.shown.all()):
            return seen
        guess = predict(batch, pages).float() if predict is not None else torch.full_like(seen, float("nan"))
        return torch.where(feedback.shown, seen, guess)

    return rule


def evaluator_rule(evaluator: _Evaluator, head: int) -> Callable[[RerankBatch, torch.Tensor], torch.Tensor]:
    """The evaluator's predicted page total of head `head` (0 click, 1 long view) as a
    `[B, G]` prediction; no gradient, evaluation mode."""

    def predict(batch: RerankBatch, pages: torch.Tensor) -> torch.Tensor:
        was = evaluator.training
        evaluator.eval()
        try:
            with torch.no_grad():
                return evaluator.predict(batch, pages)[..., head].sum(-1)
        finally:
            evaluator.train(was)

    return predict


def logged_labels(column: int) -> Rule:
    """Offline posterior rule: the logged label `column` summed along each page (labels
    exist for every candidate of graded lists, and for shown items of logs)."""

    def rule(batch: RerankBatch, pages: torch.Tensor, feedback: PageFeedback | None) -> torch.Tensor:
        if batch.labels is None:
            raise DataError("reward: logged_labels needs labels in the batch")
        lab = batch.labels[..., column].float()  # [B, n]
        B, G, L = pages.shape
        return lab.gather(1, pages.reshape(B, G * L)).reshape(B, G, L).sum(-1)

    return rule


# --------------------------------------------------------------------------- prior


def _ids_along(batch: RerankBatch, pages: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    B, G, L = pages.shape
    return ids.gather(1, pages.reshape(B, G * L)).reshape(B, G, L)


def duplicate_items(batch: RerankBatch, pages: torch.Tensor, feedback: PageFeedback | None = None) -> torch.Tensor:
    """Minus the number of positions whose item id already appeared higher on the page
    (candidates are distinct, but two candidates may carry the same item)."""
    if batch.item_ids is None:
        return torch.zeros(pages.shape[:2])
    ids = _ids_along(batch, pages, batch.item_ids.long())  # [B, G, L]
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # [B, G, L, L]
    earlier = torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool).tril(-1)
    return -(same & earlier).any(-1).sum(-1).float()


def _categories(batch: RerankBatch) -> torch.Tensor:
    cats = getattr(batch, "categories", None)
    if cats is None:
        raise DataError("reward: category rules need batch.categories [B, n]")
    return cats.long()


def viewport_diversity(k: int = 4) -> Rule:
    """Distinct categories among the first `k` positions (the two-column feed's first
    viewport shows 4 [paper])."""

    def rule(batch: RerankBatch, pages: torch.Tensor, feedback: PageFeedback | None = None) -> torch.Tensor:
        cats = _ids_along(batch, pages[..., :k], _categories(batch))
        same = cats.unsqueeze(-1) == cats.unsqueeze(-2)
        earlier = torch.ones(cats.shape[-1], cats.shape[-1], dtype=torch.bool).tril(-1)
        return (~(same & earlier).any(-1)).sum(-1).float()

    return rule


def category_cap(cap: int) -> Rule:
    """Minus the number of items beyond `cap` of any one category on the page."""
    if cap < 1:
        raise ConfigError(f"category_cap: cap must be >= 1, got {cap}")

    def rule(batch: RerankBatch, pages: torch.Tensor, feedback: PageFeedback | None = None) -> torch.Tensor:
        cats = _ids_along(batch, pages, _categories(batch))
        count = (cats.unsqueeze(-1) == cats.unsqueeze(-2)).sum(-1)  # [B, G, L]: same-category items on the page
        # Each category with c > cap items contributes c - cap; each of its c positions adds (c - cap) / c.
        excess = (count - cap).clamp_min(0).float() / count.float()
        return -excess.sum(-1)

    return rule
