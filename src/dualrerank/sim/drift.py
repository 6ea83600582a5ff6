"""Drift: the world's effective user-model parameters at a stream step.

A schedule of `DriftEvent`s (in `WorldConfig.drift`) changes the world at given steps:

* ``rotate_preferences``: every user's preference vector is rotated by `angle` degrees in a
  random plane of the topic space (seeded per event), so the same observable user now
  likes different topics;
* ``reward``: the utility weight of one reward dimension and/or the unit its feedback is
  reported in (e.g. watch time in ms instead of s) changes;
* ``redundancy``: the satiation strength is multiplied by `factor`.
* ``stale_upstream``: the upstream ranker stops following users: its score keeps the
  preferences in force at this step, so later rotations reach users but not the upstream
  score (a stale upstream model, [ours]).

Events apply cumulatively, in order of step (ties: order in the list). The world at step s
is the base world with every event of step <= s applied.
"""

from __future__ import annotations

import math

import torch

from dualrerank.sim.catalogue import Catalogue, seeded
from dualrerank.sim.config import DriftEvent, WorldConfig
from dualrerank.sim.response import ResponseParams

__all__ = ["active_events", "plane_rotation", "effective_params"]


def active_events(events: list[DriftEvent], step: int) -> list[tuple[int, DriftEvent]]:
    """(index in the schedule, event) of the events in force at `step`, in application order."""
    live = [(i, e) for i, e in enumerate(events) if e.step <= step]
    return sorted(live, key=lambda ie: (ie[1].step, ie[0]))


def plane_rotation(k: int, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """`[k, k]` rotation by `degrees` in a random 2-D plane of R^k (identity elsewhere)."""
    basis, _ = torch.linalg.qr(torch.randn(k, 2, generator=generator, dtype=torch.float64))
    a, b = basis[:, 0:1], basis[:, 1:2]
    th = math.radians(degrees)
    rot = torch.eye(k, dtype=torch.float64) + (math.cos(th) - 1) * (a @ a.T + b @ b.T) + math.sin(th) * (b @ a.T - a @ b.T)
    return rot.float()


def effective_params(config: WorldConfig, catalogue: Catalogue, seed: int, step: int) -> ResponseParams:
    """The user model of the world `seed` at stream `step` (drift events applied)."""
    r = config.response
    weights = config.utility.weights()
    scales = config.utility.scales()
    rotation = torch.eye(catalogue.topic.shape[1])
    upstream_rotation: torch.Tensor | None = None  # None: the upstream score follows users
    redundancy = r.redundancy
    for index, event in active_events(config.drift, step):
        if event.kind == "rotate_preferences":
            rotation = plane_rotation(rotation.shape[0], event.angle, seeded(seed, f"drift/{index}")) @ rotation
        elif event.kind == "stale_upstream":
            upstream_rotation = rotation.clone() if upstream_rotation is None else upstream_rotation
        elif event.kind == "reward":
            if event.weight is not None:
                weights[event.dimension] = float(event.weight)
            if event.scale is not None:
                scales[event.dimension] = float(event.scale)
        else:
            redundancy *= event.factor
    return ResponseParams(
        relevance_scale=config.requests.relevance_scale,
        rotation=rotation,
        engagement_bias=r.engagement_bias,
        redundancy=redundancy,
        redundancy_decay=r.redundancy_decay,
        category_overlap=r.category_overlap,
        topic_overlap=r.topic_overlap,
        complement=catalogue.complement.float() * r.complementarity,
        position_bias=r.position_bias,
        viewport=r.viewport,
        continue_bias=r.continue_bias,
        viewport_bonus=r.viewport_bonus,
        dissatisfaction=r.dissatisfaction,
        watch_engagement=r.watch_engagement,
        watch_bias=r.watch_bias,
        watch_duration=r.watch_duration,
        long_view_threshold=r.long_view_threshold,
        reformulate_bias=r.reformulate_bias,
        reformulate_viewport=r.reformulate_viewport,
        weights=weights,
        scales=scales,
        upstream_rotation=upstream_rotation,
    )
