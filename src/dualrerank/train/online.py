"""Joint online training of the NAR student and the AR teacher on a shifting stream:
`dualrerank online` (method.md sections 4 and 5).

[paper] The student serves with Gumbel-Max exploration, the environment returns feedback, a
reward system scores each page of the group with a vector reward, and `L_LDRO` updates the
student; the teacher keeps learning from the same stream and SKD ties the student to it.
LDRO has double decoupling and a rank-weighted policy; GRPO and its multi-reward variants
are the baselines. Everything concrete below is [ours] and configurable (`OnlineConfig`):

One step (`online_step`), top to bottom:
1. **serve**: B requests of the stream at step t; the student (evaluation mode: no dropout,
   so importance ratios are exactly 1 before the first update) gives `Z`, and G pages per
   request are drawn by vectorised Gumbel-Max (page 0 greedy if `include_greedy`), with
   their per-position log-probabilities under the sampling policy.
2. **feedback**: `exposure: one` shows one page per request (`show`: the greedy member, or
   the first sample) and the world returns feedback for it only; `exposure: all` returns
   feedback for every page (a simulation shortcut).
3. **reward**: the reward system scores every page (`reward.py`): realised feedback where
   shown, a prediction elsewhere (the evaluator's clicks and long views; watch time as
   predicted long views times the stream's watch time per long view; reformulation is a
   reward dimension under `exposure: all` only), plus prior rules.
4. **advantage**: the method's preset (`METHODS`): group centring per dimension or of the
   weighted sum, scaled by the group std, by nothing, or by the stream scale
   (`RewardScale`: an EMA per dimension, the weights calibrated once by the warm-up scale).
5. **policy update**: K epochs of the clipped per-position ratio loss with the method's
   position weights, plus its anchor (`kd`: `beta * L_KD` to the teacher along the
   teacher's greedy pages; `kl_ref`: `beta * KL` to the frozen starting student).
6. **teacher and evaluator**: the shown pages with their feedback become logged requests;
   the teacher takes a supervised step on them (logged targets: the shown page reordered by
   realised gain, reward-weighted) and the evaluator a step of its click/long-view loss.
7. **log**: one JSON line per step under namespaced keys (docs/metrics.md), with the
   fixed evaluation set of the current drift segment every `eval_every` steps.

Randomness is derived from (seed, step) for every step, so a resumed run is the
uninterrupted one (tested).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from tqdm import tqdm

from dualrerank.config import dump_config, option
from dualrerank.decoding import gumbel_max_pages, masked_greedy, sequential_log_prob
from dualrerank.errors import ConfigError, TrainingError
from dualrerank.feedback import FEEDBACK_NAMES
from dualrerank.losses import clipped_policy_loss, group_advantage, kl_to_reference, position_weights
from dualrerank.metrics import collapse_rate, mean_row_entropy, ptar
from dualrerank.models.checkpoint import load_checkpoint_of_kind, save_checkpoint
from dualrerank.reward import PageFeedback, RewardSystem, duplicate_items, posterior
from dualrerank.schema import RerankBatch
from dualrerank.sim import World, WorldConfig
from dualrerank.sim.catalogue import seeded
from dualrerank.train.distill import DistillConfig, skd_loss, teacher_step_probs
from dualrerank.train.objectives import GeneratorObjectiveConfig, generator_extras, generator_objective
from dualrerank.train.runstate import MetricsLog, load_snapshot, optimizer_step, prepare_run_dir, save_snapshot
from dualrerank.train.supervised import step_logits_fn
from dualrerank.train.targets import logged_targets

if TYPE_CHECKING:
    from dualrerank.models.evaluator import ListEvaluator
    from dualrerank.models.student import NARStudent
    from dualrerank.models.teacher import ARTeacher

__all__ = ["OnlineConfig", "MethodPreset", "METHODS", "RewardScale", "OnlineState", "online_step", "run_online", "bootstrap"]


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodPreset:
    """How one method turns the reward vector into a policy update (everything else is shared)."""

    combine: str  # "before": weighted sum, then normalise; "after": normalise each dimension, then weigh
    scale: str  # "group_std", "none" or "stream"
    batch_norm: bool  # z-score the advantages over the batch (GDPO)
    weights: str  # position weights: "uniform" or "dcg"
    anchor: str  # "kd" (to the teacher), "kl_ref" (to the starting student) or "none"
    calibrate: bool  # LDRO: c_d = lambda_d * s_d_ref (the user's weights stay in raw units)
    cite: str


METHODS: dict[str, MethodPreset] = {
    "grpo": MethodPreset("before", "group_std", False, "uniform", "kl_ref", False, "Shao et al. 2024; TRL's default"),
    "dr_grpo": MethodPreset("before", "none", False, "uniform", "kl_ref", False, "Liu et al. 2025"),
    "gdpo": MethodPreset("after", "group_std", True, "uniform", "kl_ref", False, "TRL normalize_then_sum, arXiv 2601.05242"),
    "ldro": MethodPreset("after", "stream", False, "dcg", "kd", True, "Dual-Rerank [paper]; form [ours], method.md section 4"),
    "ldro_group_std": MethodPreset("after", "group_std", False, "dcg", "kd", True, "ablation: group std instead of stream scale"),
    "ldro_no_dims": MethodPreset("before", "stream", False, "dcg", "kd", False, "ablation: one combined reward"),
    "ldro_uniform": MethodPreset("after", "stream", False, "uniform", "kd", True, "ablation: no rank weights"),
    "ldro_no_kd": MethodPreset("after", "stream", False, "dcg", "none", True, "ablation: no KD anchor"),
}


# --------------------------------------------------------------------------- config


@dataclass
class RewardWeights:
    """The team's trade-off between reward dimensions, in raw units (method.md section 4)."""

    click: float = option(1.0, "weight per click")
    long_view: float = option(1.0, "weight per long view")
    watch_time: float = option(0.003, "weight per reported watch-time unit (exposure: all only)")
    reformulate: float = option(-1.0, "weight per reformulation (exposure: all only; negative: it is bad)")
    duplicate_items: float = option(0.0, "weight of the prior rule 'duplicate item on a page' (it is <= 0)")


@dataclass
class WeightChange:
    step: int = option(0, "stream step from which these weights apply", ge=0)
    weights: RewardWeights = option(factory=RewardWeights, help="the new weights")


@dataclass
class OnlineConfig:
    seed: int = option(0, "seed of the stream, the sampling noise and the updates (every step derives its own)")
    world: str | None = option(None, "world YAML (with its drift schedule); default: the default world, no drift")
    world_seed: int = option(0, "seed of the world (catalogue); the teacher and student must come from this world")
    method: str = option("ldro", "method preset", choices=tuple(METHODS))
    steps: int = option(200, "stream steps", ge=1)
    batch_size: int = option(64, "requests per step (B)", ge=1)
    group: int = option(8, "pages per request (G)", ge=2)
    temperature: float = option(1.0, "Gumbel-Max sampling temperature", gt=0)
    include_greedy: bool = option(True, "page 0 of every group is the student's greedy page")
    exposure: str = option(
        "one", "'one': users see one page per request (see show); 'all': every page gets feedback", choices=("one", "all")
    )
    show: str = option(
        "sample",
        "exposure one: the page users see: 'greedy' (page 0, the student's greedy page) or 'sample' (a "
        "Gumbel-Max sample: real feedback off the greedy path, so the evaluator learns where the policy explores)",
        choices=("greedy", "sample"),
    )
    page_length: int = option(10, "page length L", ge=1)
    lr: float = option(1e-4, "student learning rate (AdamW)", gt=0)
    epochs: int = option(2, "K clipped epochs per step", ge=1)
    clip_eps: float = option(0.2, "PPO clip range", gt=0, lt=1)
    beta: float = option(0.05, "weight of the anchor (KD to the teacher, or KL to the starting student)", ge=0)
    grad_clip: float = option(1.0, "clip the student's gradient norm to this (0 = off)", ge=0)
    weights: RewardWeights = option(factory=RewardWeights, help="reward weights lambda_d at step 0")
    weight_schedule: list[WeightChange] = option(factory=list, help="later reward weights (the team's decisions)")
    scale_momentum: float = option(0.9, "EMA momentum of each dimension's stream scale", ge=0, lt=1)
    scale_warmup: int = option(10, "steps whose mean scale calibrates the weights (c_d = lambda_d s_d_ref)", ge=1)
    scale_jump: float = option(
        10.0,
        "[ours] a dimension whose batch scale moves by more than this factor from its EMA is re-estimated at "
        "once (a unit change), instead of being smoothed over tens of steps",
        gt=1,
    )
    teacher_lr: float = option(1e-4, "teacher learning rate on the served pages (0 = frozen teacher)", ge=0)
    evaluator_lr: float = option(1e-4, "evaluator learning rate on the exposures (0 = frozen)", ge=0)
    lr_warmup_steps: int = option(
        0,
        "[ours] linear warm-up of every online learning rate over the first steps (0 = off): a fresh AdamW's first "
        "steps move each weight by about lr whatever its gradient, which knocks the distilled student off its "
        "teacher (measured: the KD term rises from 0.6 to 5-12 after step 0 at lr 1e-3)",
        ge=0,
    )
    eval_every: int = option(10, "evaluate every this many steps (and at the last)", ge=1)
    eval_requests: int = option(200, "requests of the fixed evaluation set of each drift segment", ge=1)
    checkpoint_every: int = option(50, "snapshot every this many steps (resume point)", ge=1)
    kd: DistillConfig = option(
        factory=DistillConfig,
        help="the KD anchor's loss settings (tau, alpha, unlikelihood, ...; its data/optim keys are unused here)",
    )


# --------------------------------------------------------------------------- reward scale


class RewardScale:
    """Per-dimension stream scale of group-centred rewards (LDRO's second decoupling).

    `observe(batch_scale)` updates an EMA per dimension; the first `warmup` observations
    also average into `ref`, frozen afterwards, which calibrates the weights
    (`c_d = lambda_d * ref_d`). [ours] A batch scale more than `jump` times above or below
    the EMA replaces it at once: a change of units is a jump, not a trend.
    """

    def __init__(self, dims: int, momentum: float, warmup: int, jump: float) -> None:
        self.momentum, self.warmup, self.jump = momentum, warmup, jump
        self.ema = torch.full((dims,), float("nan"))
        self.ref_sum = torch.zeros(dims)
        self.seen = 0
        self.jumps = 0

    @property
    def ref(self) -> torch.Tensor:
        return self.ref_sum / max(1, min(self.seen, self.warmup))

    def observe(self, batch_scale: torch.Tensor) -> None:
        s = batch_scale.detach().float()
        fresh = torch.isnan(self.ema)
        ratio = s / self.ema.clamp_min(1e-12)
        jumped = ~fresh & (s > 0) & ((ratio > self.jump) | (ratio < 1.0 / self.jump))
        self.jumps += int(jumped.sum())
        blended = self.momentum * self.ema + (1 - self.momentum) * s
        self.ema = torch.where(fresh | jumped, s, blended)
        if self.seen < self.warmup:
            self.ref_sum += s
        self.seen += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {"ema": self.ema, "ref_sum": self.ref_sum, "seen": torch.tensor(self.seen), "jumps": torch.tensor(self.jumps)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.ema, self.ref_sum = state["ema"].float(), state["ref_sum"].float()
        self.seen, self.jumps = int(state["seen"]), int(state["jumps"])


def _centred_scale(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[D]` root-mean-square of the group-centred rewards over valid, finite pages."""
    ok = valid.unsqueeze(-1) & torch.isfinite(values)
    v = torch.where(ok, values, torch.zeros_like(values))
    cnt = ok.sum(1, keepdim=True).clamp_min(1)
    centred = torch.where(ok, v - v.sum(1, keepdim=True) / cnt, torch.zeros_like(v))
    return (centred.pow(2).sum((0, 1)) / ok.sum((0, 1)).clamp_min(1)).sqrt()


# --------------------------------------------------------------------------- the run's parts


@dataclass
class OnlineState:
    """Everything a step changes, and what a snapshot saves."""

    student: NARStudent
    teacher: ARTeacher
    evaluator: ListEvaluator
    reference: NARStudent
    student_opt: torch.optim.Optimizer
    teacher_opt: torch.optim.Optimizer | None
    evaluator_opt: torch.optim.Optimizer | None
    scale: RewardScale
    watch_ratio: RewardScale
    step: int = 0
    eval_sets: dict[int, Any] = field(default_factory=dict)


def _weights_at(cfg: OnlineConfig, step: int) -> RewardWeights:
    w = cfg.weights
    for change in sorted(cfg.weight_schedule, key=lambda c: c.step):
        if change.step <= step:
            w = change.weights
    return w


def reward_system(cfg: OnlineConfig, evaluator: ListEvaluator, watch_per_long_view: RewardScale | None = None) -> RewardSystem:
    """The default rules: posterior click and long view (the evaluator's prediction where
    not shown) and watch time; under `exposure: all` also reformulation; the duplicate-item
    prior when its weight is non-zero.

    [ours] The evaluator has click and long-view heads only, so under `exposure: one` the
    watch time of a page that was not shown is predicted as its predicted long views times
    the stream's watch time per long view (`watch_per_long_view`: a running ratio over the
    shown pages, re-estimated at once when it jumps, e.g. after a unit change)."""
    predict = _once(evaluator)  # one evaluator pass serves every rule that predicts
    long_views = lambda batch, pages: predict(batch, pages)[..., 1].sum(-1)  # noqa: E731
    rules: dict[str, Any] = {
        "click": posterior("click", lambda batch, pages: predict(batch, pages)[..., 0].sum(-1)),
        "long_view": posterior("long_view", long_views),
    }
    if cfg.exposure == "all":
        rules["watch_time"] = posterior("watch_time")
        rules["reformulate"] = posterior("reformulate")
    else:

        def watch(batch: RerankBatch, pages: torch.Tensor) -> torch.Tensor:
            ratio = watch_per_long_view.ema[0] if watch_per_long_view is not None else torch.tensor(float("nan"))
            return long_views(batch, pages) * (ratio if bool(torch.isfinite(ratio)) else 0.0)

        rules["watch_time"] = posterior("watch_time", watch)
    if cfg.weights.duplicate_items != 0 or any(c.weights.duplicate_items != 0 for c in cfg.weight_schedule):
        rules["duplicate_items"] = duplicate_items
    return RewardSystem(rules)


def _once(evaluator: ListEvaluator) -> Any:
    """The evaluator's per-position probabilities `[B, G, L, 2]` of a (batch, pages) pair,
    computed on the first call and reused for the same pair (three rules ask for them)."""
    memo: dict[str, Any] = {}

    def predict(batch: RerankBatch, pages: torch.Tensor) -> torch.Tensor:
        if memo.get("key") != (id(batch), id(pages)):
            was = evaluator.training
            evaluator.eval()
            with torch.no_grad():
                memo["value"] = evaluator.predict(batch, pages)
            evaluator.train(was)
            memo["key"] = (id(batch), id(pages))
        return memo["value"]

    return predict


def _segment(world: World, step: int) -> int:
    """Index of the drift segment `step` lies in (number of events in force)."""
    return sum(1 for e in world.config.drift if e.step <= step)


def _eval_set(state: OnlineState, world_t: World, cfg: OnlineConfig) -> Any:
    seg = _segment(world_t, state.step)
    if seg not in state.eval_sets:
        # One fixed set per drift segment, with its oracle under the world as it is then.
        ws, batch = world_t.sample_requests(cfg.eval_requests, seeded(cfg.seed, f"online-eval-{seg}"))
        state.eval_sets = {seg: (ws, batch, world_t.reference(ws, cfg.page_length))}
    return state.eval_sets[seg]


@torch.no_grad()
def evaluate_online(state: OnlineState, world_t: World, cfg: OnlineConfig) -> dict[str, float]:
    ws, batch, ref = _eval_set(state, world_t, cfg)
    L = cfg.page_length
    state.student.eval()
    state.teacher.eval()
    z = state.student.logits(batch, L)
    spage = masked_greedy(z, batch.candidate_mask, validate=False)
    tpage = state.teacher.rerank(batch, L)

    def nu(pages: torch.Tensor) -> float:
        u, r = world_t.expected_utility(ws, pages), ref
        return float((u - r.random).sum() / (r.oracle - r.random).sum())

    return {
        "eval/normalized_utility": nu(spage),
        "eval/teacher_normalized_utility": nu(tpage),
        "eval/ptar": float(cast(torch.Tensor, ptar(spage, tpage)["ptar"]).mean()),  # the per-request tensor
        "eval/collapse_rate": float(collapse_rate(z, batch.candidate_mask).mean()),
    }


# --------------------------------------------------------------------------- one step


class Laps:
    """Seconds per stage of a step: `lap(name)` closes the stage that ran since the last lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


def online_step(state: OnlineState, world: World, cfg: OnlineConfig) -> dict[str, float]:
    """One step of the stream (see the module docstring); returns its log record."""
    lap = Laps()
    L, G, B = cfg.page_length, cfg.group, cfg.batch_size
    preset = METHODS[cfg.method]
    gen = seeded(cfg.seed, f"online-step-{state.step}")
    # The teacher's and evaluator's dropout draw from torch's default generator: seeding it
    # per step makes a resumed run continue exactly as an uninterrupted one.
    torch.manual_seed(cfg.seed * 1_000_003 + state.step)
    world_t = world.at_step(state.step)
    lam = _weights_at(cfg, state.step)

    # 1. serve
    ws, batch = world_t.sample_requests(B, gen)
    state.student.eval()  # dropout off: ratios are exactly 1 before the first update
    with torch.no_grad():
        z_old = state.student(batch.candidates, batch.context, batch.candidate_mask, L)
        pages = gumbel_max_pages(z_old, batch.candidate_mask, G, cfg.temperature, gen, cfg.include_greedy)
        old_logp = sequential_log_prob(z_old, batch.candidate_mask, pages, validate=False)
        ref_logp = None
        if preset.anchor == "kl_ref":
            z_ref = state.reference(batch.candidates, batch.context, batch.candidate_mask, L)
            ref_logp = sequential_log_prob(z_ref, batch.candidate_mask, pages, validate=False)

    lap("serve")

    # 2. feedback (under exposure one, users see page k of every group)
    k = _shown_index(cfg)
    shown = torch.zeros(B, G, dtype=torch.bool)
    if cfg.exposure == "all":
        shown[:] = True
        fb = world_t.sample_feedback(ws, pages, gen)
        per_position = {"click": fb.click, "long_view": fb.long_view, "watch_time": fb.watch_time}
        per_page = {"reformulate": fb.reformulate}
    else:
        shown[:, k] = True
        fb = world_t.sample_feedback(ws, pages[:, k], gen)
        pad = torch.zeros(B, G, L)
        at = torch.tensor([k])
        per_position = {n: pad.clone().index_copy_(1, at, getattr(fb, n).unsqueeze(1)) for n in FEEDBACK_NAMES}
        per_page = {"reformulate": torch.zeros(B, G).index_copy_(1, at, fb.reformulate.unsqueeze(1))}
    feedback = PageFeedback(per_position, shown, per_page)
    lv = feedback.page_total("long_view")[shown].sum()
    if bool(lv > 0):
        state.watch_ratio.observe((feedback.page_total("watch_time")[shown].sum() / lv).reshape(1))

    lap("feedback")

    # 3. reward
    rv = reward_system(cfg, state.evaluator, state.watch_ratio)(batch, pages, feedback)
    lam_vec = torch.tensor([getattr(lam, n) for n in rv.names])

    lap("reward")

    # 4. advantage
    valid = torch.ones(B, G, dtype=torch.bool)
    stream = None
    coef = lam_vec
    if preset.scale == "stream":
        if preset.combine == "after":
            state.scale.observe(_centred_scale(rv.values, valid))
            stream = state.scale.ema
            if preset.calibrate:
                coef = lam_vec * state.scale.ref
        else:
            combined = (rv.values * lam_vec).sum(-1, keepdim=True)
            state.scale.observe(_centred_scale(combined, valid)[:1].expand(state.scale.ema.shape[0]))
            stream = state.scale.ema[:1]
    adv, adiag = group_advantage(
        rv.values,
        coef,
        valid,
        combine=preset.combine,
        scale=preset.scale,
        stream_scale=stream,
        batch_norm=preset.batch_norm,
    )

    lap("advantage")

    # 5. policy update: K clipped epochs (+ the anchor)
    _warm_up(state, cfg)
    w = position_weights(L, preset.weights)
    kd_inputs = None
    if preset.anchor == "kd" and cfg.beta > 0:
        with torch.no_grad():
            tpath = state.teacher.rerank(batch, L)
            tmask = torch.ones_like(tpath, dtype=torch.bool)
            q = teacher_step_probs(state.teacher, batch, tpath, tmask, cfg.kd.teacher_tau or cfg.kd.tau)
        kd_inputs = (tpath, tmask, q)
    logs: dict[str, float] = {}
    for _ in range(cfg.epochs):
        z = state.student(batch.candidates, batch.context, batch.candidate_mask, L)
        logp = sequential_log_prob(z, batch.candidate_mask, pages, validate=False)
        loss, pdiag = clipped_policy_loss(logp, old_logp, adv, w, valid=valid, clip_eps=cfg.clip_eps)
        if ref_logp is not None and cfg.beta > 0:
            kl = kl_to_reference(logp, ref_logp, w, valid=valid)
            loss = loss + cfg.beta * kl
            logs["policy/kl_ref"] = float(kl.detach())
        if kd_inputs is not None:
            kd, kd_logs = skd_loss(cfg.kd, z, batch.candidate_mask, kd_inputs[0], kd_inputs[1], kd_inputs[2])
            loss = loss + cfg.beta * kd
            logs["kd/loss"] = float(kd_logs.get("kd_loss", 0.0))
        if not bool(torch.isfinite(loss)):
            raise TrainingError(f"online step {state.step}: the student's loss is {float(loss)}; lower lr (now {cfg.lr:g})")
        optimizer_step(state.student, state.student_opt, loss, cfg.grad_clip)
        logs.update({f"policy/{k}": float(v) for k, v in pdiag.items()})
        logs["policy/loss"] = float(loss.detach())

    lap("policy")

    # 6. teacher and evaluator learn from the exposures
    logged = _exposures(batch, pages[:, k], feedback, k)
    if state.teacher_opt is not None:
        state.teacher.train()
        extras = generator_extras(logged, logged_targets(logged, L, True))
        tloss, _ = generator_objective(GeneratorObjectiveConfig(target="logged"), step_logits_fn("ar"))(
            state.teacher, logged, extras, gen
        )
        optimizer_step(state.teacher, state.teacher_opt, tloss, 1.0)
        state.teacher.eval()
        logs["teacher/loss"] = float(tloss.detach())
    if state.evaluator_opt is not None:
        state.evaluator.train()
        eloss = state.evaluator.loss(logged)
        optimizer_step(state.evaluator, state.evaluator_opt, eloss, 1.0)
        state.evaluator.eval()
        logs["evaluator/loss"] = float(eloss.detach())

    lap("teacher_evaluator")

    # 7. log
    record: dict[str, Any] = {"step": state.step, "segment": _segment(world_t, state.step)}
    for d, name in enumerate(rv.names):
        col = rv.values[..., d]
        record[f"rewards/{name}/mean"] = float(col[torch.isfinite(col)].mean()) if bool(torch.isfinite(col).any()) else None
        record[f"advantage/share/{name}"] = float(adiag["dim_share"][d]) if adiag["dim_share"].numel() == len(rv.names) else None
    record["groups/zero_spread_share"] = float(adiag["zero_spread_groups"]) / B
    record["groups/masked_pages"] = int(adiag["masked_pages"])
    same = (pages.unsqueeze(1) == pages.unsqueeze(2)).all(-1)  # [B, G, G]
    record["groups/duplicate_page_share"] = float((same.sum(-1) > 1).float().mean())
    record["policy/entropy"] = float(mean_row_entropy(z_old, batch.candidate_mask).mean())
    record["advantage/abs_mean"] = float(adv.abs().mean())
    if preset.scale == "stream":
        record["scale/jumps"] = state.scale.jumps
    record.update(logs)
    lap("log")
    record["perf/requests_per_second"] = B / max(sum(lap.seconds.values()), 1e-9)
    record.update({f"perf/seconds/{k}": round(v, 5) for k, v in lap.seconds.items()})
    if (state.step + 1) % cfg.eval_every == 0 or state.step + 1 == cfg.steps:
        record.update(evaluate_online(state, world_t, cfg))
    state.step += 1
    return record


def _warm_up(state: OnlineState, cfg: OnlineConfig) -> None:
    """Set this step's learning rates: the configured ones, scaled linearly over the first
    `lr_warmup_steps` steps. Derived from the step alone, so a resumed run matches."""
    factor = min(1.0, (state.step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    for opt, lr in ((state.student_opt, cfg.lr), (state.teacher_opt, cfg.teacher_lr), (state.evaluator_opt, cfg.evaluator_lr)):
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr * factor


def _shown_index(cfg: OnlineConfig) -> int:
    """Which page of each group users see under `exposure: one` (and which page the teacher
    and evaluator learn from under `exposure: all`): the greedy page 0, or the first sample."""
    if cfg.show == "greedy" and not cfg.include_greedy:
        raise ConfigError("show: 'greedy' needs include_greedy: true (page 0 is then the greedy page)")
    return 0 if cfg.show == "greedy" or not cfg.include_greedy else 1


def _exposures(batch: RerankBatch, shown_pages: torch.Tensor, feedback: PageFeedback, k: int) -> RerankBatch:
    """The shown pages (one per request: page k of each group) with their realised feedback,
    as logged requests (what the teacher and evaluator train on)."""
    import dataclasses

    per_pos = torch.stack([feedback.per_position[n][:, k] for n in FEEDBACK_NAMES], dim=-1)  # [B, L, 3]
    return dataclasses.replace(
        batch,
        logged_page=shown_pages,
        logged_page_mask=torch.ones_like(shown_pages, dtype=torch.bool),
        logged_feedback=per_pos,
        feedback_names=FEEDBACK_NAMES,
        propensity=None,
    )


# --------------------------------------------------------------------------- the run


def _parts_from(from_dir: Path) -> tuple[NARStudent, ARTeacher, ListEvaluator, str]:
    """Student, teacher and evaluator of a distillation run (its teacher's run holds the
    evaluator in `evaluator/`)."""
    import json

    student_dir = from_dir / "checkpoint" if (from_dir / "checkpoint").is_dir() else from_dir
    student = load_checkpoint_of_kind(student_dir, ("nar",), "an NAR student (a distill run)")
    meta = json.loads((student_dir / "config.json").read_text())
    teacher_dir = Path(meta.get("extra", {}).get("distilled_from", ""))
    if not str(teacher_dir) or not teacher_dir.exists():
        raise ConfigError(f"--from {from_dir}: the student does not name the teacher it was distilled from")
    teacher = load_checkpoint_of_kind(teacher_dir, ("ar",), "an autoregressive teacher")
    run = teacher_dir.parent if teacher_dir.name == "checkpoint" else teacher_dir
    ev_dir = run / "evaluator" / "checkpoint"
    if not ev_dir.is_dir():
        raise ConfigError(f"--from {from_dir}: no evaluator at {ev_dir} (train the teacher with evaluator targets)")
    evaluator = load_checkpoint_of_kind(ev_dir, ("evaluator",), "a list-wise evaluator")
    teacher_name = json.loads(
        ((teacher_dir / "checkpoint" if (teacher_dir / "checkpoint").is_dir() else teacher_dir) / "config.json").read_text()
    )["model"]
    return student, teacher, evaluator, teacher_name


def bootstrap(cfg: OnlineConfig, directory: Path, progress: bool = True) -> Path:
    """Train what an online run starts from when no distillation run is given: the AR
    teacher (with its evaluator, default `train` settings) and the SKD student (default
    `distill` settings) on logs of the online world, into `directory/teacher` and
    `directory/student`; finished parts are reused. Returns the student's run directory.
    With the defaults this takes about 20 minutes on 2 cores (docs/training.md)."""
    from dualrerank.train.distill import distill_model
    from dualrerank.train.splits import SplitConfig
    from dualrerank.train.supervised import TrainConfig, train_model

    directory = Path(directory)
    data = SplitConfig(path=cfg.world, seed=cfg.world_seed, page_length=cfg.page_length)
    if not (directory / "teacher" / "eval.json").is_file():
        train_model(TrainConfig(data=data), directory / "teacher", overwrite=True, progress=progress)
    if not (directory / "student" / "eval.json").is_file():
        distill_model(DistillConfig(data=data), directory / "student", directory / "teacher", overwrite=True, progress=progress)
    return directory / "student"


def _snapshot(path: Path, state: OnlineState, log: MetricsLog) -> None:
    save_snapshot(
        path,
        {
            "student": state.student.state_dict(),
            "teacher": state.teacher.state_dict(),
            "evaluator": state.evaluator.state_dict(),
            "reference": state.reference.state_dict(),
            "student_opt": state.student_opt.state_dict(),
            "teacher_opt": state.teacher_opt.state_dict() if state.teacher_opt else {},
            "evaluator_opt": state.evaluator_opt.state_dict() if state.evaluator_opt else {},
            "scale": state.scale.state(),
            "watch_ratio": state.watch_ratio.state(),
            "step": state.step,
            "metrics_bytes": log.size(),
        },
    )


def run_online(
    cfg: OnlineConfig,
    out: Path,
    from_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    report_to: str = "none",
) -> dict[str, Any]:
    """Run the online loop into `out` (config.yaml, metrics.jsonl, online.pt, student/,
    teacher/, evaluator/ checkpoints); returns the last evaluation figures."""
    from dualrerank.config import load_config

    out = Path(out)
    # Everything the run reads is checked before anything is written into `out`.
    world = World(load_config(WorldConfig, cfg.world) if cfg.world else WorldConfig(), seed=cfg.world_seed)
    student, teacher, evaluator, teacher_name = _parts_from(Path(from_dir))
    prepare_run_dir(out, resume=resume, overwrite=overwrite, reads=[from_dir])
    dump_config(cfg, out / "config.yaml")
    for m in (student, teacher, evaluator):
        m.eval()
    reference = copy.deepcopy(student).requires_grad_(False)
    D = len(reward_system(cfg, evaluator).names)
    state = OnlineState(
        student=student,
        teacher=teacher,
        evaluator=evaluator,
        reference=reference,
        student_opt=torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0),
        teacher_opt=torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr) if cfg.teacher_lr > 0 else None,
        evaluator_opt=torch.optim.AdamW(evaluator.parameters(), lr=cfg.evaluator_lr) if cfg.evaluator_lr > 0 else None,
        scale=RewardScale(D, cfg.scale_momentum, cfg.scale_warmup, cfg.scale_jump),
        watch_ratio=RewardScale(1, cfg.scale_momentum, cfg.scale_warmup, cfg.scale_jump),
    )
    log = MetricsLog(out / "metrics.jsonl", report_to)
    snap = out / "online.pt"
    if resume and snap.is_file():
        saved = load_snapshot(snap)
        for name in ("student", "teacher", "evaluator", "reference"):
            getattr(state, name).load_state_dict(saved[name])
        state.student_opt.load_state_dict(saved["student_opt"])
        if state.teacher_opt is not None:
            state.teacher_opt.load_state_dict(saved["teacher_opt"])
        if state.evaluator_opt is not None:
            state.evaluator_opt.load_state_dict(saved["evaluator_opt"])
        state.scale.load(saved["scale"])
        state.watch_ratio.load(saved["watch_ratio"])
        state.step = int(saved["step"])
        log.truncate(int(saved["metrics_bytes"]))
    elif not resume:
        log.truncate(0)
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"online {cfg.method}", unit="step", disable=not progress)
    last_eval: dict[str, Any] = {}
    while state.step < cfg.steps:
        record = online_step(state, world, cfg)
        log.append(record)
        if "eval/normalized_utility" in record:
            last_eval = {k: v for k, v in record.items() if k.startswith("eval/")}
            bar.set_postfix(nu=f"{record['eval/normalized_utility']:.3f}")
        bar.update(1)
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            _snapshot(snap, state, log)
    bar.close()
    save_checkpoint(state.student, out / "student", "nar", extra={"online_steps": state.step, "method": cfg.method})
    save_checkpoint(state.teacher, out / "teacher", teacher_name, extra={"online_steps": state.step})
    save_checkpoint(state.evaluator, out / "evaluator", "evaluator", extra={"online_steps": state.step})
    if progress:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items())
        print(f"online {cfg.method}: {state.step} steps; {shown}", file=sys.stderr)
    return {"method": cfg.method, "steps": state.step, **last_eval}
