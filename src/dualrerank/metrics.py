"""Evaluation metrics and distillation diagnostics: pure functions on tensors.

Everything here is vectorised over the B requests of a batch (loops only over positions
t <= L), takes explicit boolean masks instead of padding values, validates its inputs and
raises `DataError` with one line naming the field and the first bad request. Results are
float64 tensors so that means over many requests do not drift; `batch_mean` turns a
per-request tensor into one number, leaving out NaN (undefined) requests.

Conventions (the full list, with formulas, is in docs/metrics.md):
  * a page is a `LongTensor [B, L]` of candidate indices, `page_mask [B, L]` says which
    positions exist; positions are 1-based in formulas (t = 1..L);
  * NDCG: gain `2^rel - 1`, discount `1 / log2(t + 1)`; when the ideal DCG is 0 the
    request scores 0 by default (trec_eval, sklearn), 1 (LightGBM) or NaN (excluded);
  * score-and-sort ties: candidate index ascending (what `torch.argmax` decoding serves),
    or pessimistic / optimistic by relevance;
  * entropies and divergences are in nats.

The names under which training, evaluation and the experiment log figures are one list,
`LOGGED_KEYS` (with `describe_key`), shared by the code, the reports and docs/metrics.md;
`agreement_per_request` is the one place the student-vs-teacher figures are computed.

This module knows nothing about models, decoding or the simulator.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal, cast

import torch

from dualrerank.errors import DataError

__all__ = [
    "ZeroIdcgRule",
    "TieRule",
    "batch_mean",
    "gain",
    "dcg_discounts",
    "scores_to_page",
    "ndcg_at_k",
    "normalized_utility",
    "normalized_utility_mean",
    "auc",
    "per_request_auc",
    "grouped_auc",
    "auc_figures",
    "ptar",
    "unmasked_argmax",
    "collapse_rate",
    "collision_share",
    "row_distributions",
    "mean_row_js",
    "mean_row_entropy",
    "prefix_masked_probs",
    "Certificate",
    "stability_certificate",
    "agreement_per_request",
    "distillation_diagnostics",
    "AGREEMENT_FIGURES",
    "FIGURES",
    "RUN_FIELDS",
    "SUMMARY_FIELDS",
    "EPOCH_KEYS",
    "DERIVED_KEYS",
    "LOGGED_KEYS",
    "describe_key",
]

# ---------------------------------------------------------------------------- logged names
# The one list of the names training, evaluation, distillation and the experiment write
# (metrics.jsonl, eval.json, `evaluate --json`, summary.json): the code computes these
# keys, the report explains its columns with these meanings, and docs/metrics.md shows
# these tables (tests/test_metric_names.py checks all three, and that every name here is
# produced by a real run).

#: Figures of a model on a split: eval.json, `evaluate --json`, summary.json rows and
#: per_seed; figures computed every epoch also appear as `valid_<figure>` in metrics.jsonl.
FIGURES: dict[str, str] = {
    "utility": (
        "mean exact expected utility of the served pages under the world's user model, in world units (splits with a world)"
    ),
    "normalized_utility": (
        "utility on a scale where a random page is 0 and the beam-search oracle 1, ratio of sums over the requests; below 0 is "
        "worse than random"
    ),
    "ndcg@4": (
        "NDCG@4 of the served pages against graded labels (LETOR/MSLR), or clicks where no world scores pages (MIND): gain "
        "2^rel - 1, log2 discount"
    ),
    "ndcg@10": "the same at cut-off 10",
    "auc": (
        "pooled ROC AUC of the model's item click scores over every shown (request, item) pair against its logged click "
        "(score-and-sort models and the evaluator, on splits with logged clicks)"
    ),
    "gauc": (
        "per-request AUC of the same scores, averaged with impression weights over the requests with both a clicked and an "
        "unclicked item"
    ),
    "ptar": (
        "PTAR@L: share of positions where the model's greedy page equals the teacher's greedy page (list generators, against "
        "the teacher of the same seed)"
    ),
    "ptar@4": "PTAR over the first 4 positions (the first viewport of the two-column feed)",
    "exact_page": "share of requests whose whole greedy page equals the teacher's",
    "teacher_margin": (
        "mean over the teacher's greedy steps of its top-1 minus top-2 step probability at temperature 1 (how concentrated the "
        "teacher is)"
    ),
    "collapse_rate": (
        "share of requests where two of the model's unmasked row argmaxes pick the same candidate (models with position x item "
        "logits)"
    ),
    "collision_share": "share of positions whose unmasked row argmax repeats an earlier row's (graded collapse, at most (L-1)/L)",
    "mean_row_js": (
        "mean Jensen-Shannon divergence between the model's position rows, nats in [0, ln 2] (near 0: the rows are alike)"
    ),
    "mean_row_entropy": "mean entropy of the model's position rows, nats in [0, ln n]",
    "certified_prefix": (
        "mean number of leading positions at which the stability certificate proves the student picks the teacher's item"
    ),
    "certified_ptar": "the certificate's lower bound on PTAR@L, certified_prefix / L (observed ptar is never below it)",
    "certified_ptar@4": "the certificate's lower bound on PTAR@4",
    "certified_step_share": "mean over requests of the share of steps certified, leading or not",
    "latency_ms_p50": "median milliseconds to rerank one request at batch size 1 (requests with at least L candidates)",
    "latency_ms_p99": "99th percentile of the same",
    "params": "number of model parameters (null for tree models)",
}

#: Keys of a metrics.jsonl line (one per epoch); `train_*` are means over the epoch's
#: training requests, before the term's weight.
EPOCH_KEYS: dict[str, str] = {
    "epoch": "1-based epoch number (a resumed run continues the count)",
    "seconds": "wall-clock seconds of the epoch (metrics.jsonl) or of the row's whole run (summary.json per_seed)",
    "best": "whether this epoch's valid_score is the best so far (its model is the saved checkpoint)",
    "train_loss": "the full training loss",
    "train_mle": "list generators: teacher-forced likelihood loss of the target pages",
    "train_bpr": "AR teacher: the pairwise BPR term",
    "train_kd_loss": "distill: position-weighted KL(q_t ‖ p_t) before tau^2 (0 with soft: false)",
    "train_kd_ce": "distill: position-weighted cross-entropy of the student's rows on the teacher's path items",
    "train_kd_unlikelihood": "distill: the unlikelihood term on the student's unmasked rows",
    "train_hard_ce": "distill with soft: false: likelihood loss of the teacher's paths under sequential masking",
    "train_supervised": "distill with supervised_weight > 0: the student's likelihood loss of the logged targets",
    "valid_score": (
        "what picks the best epoch and drives early stopping: normalized utility (else NDCG@10) in train, select_by in distill"
    ),
    "valid_loss": "evaluator: its click and long-view BCE on the validation requests (valid_score is minus this)",
}

#: Keys of eval.json and `evaluate --json` besides the figures.
RUN_FIELDS: dict[str, str] = {
    "model": (
        "what was evaluated: the registry model name (train), student_skd or nar_direct (distill), the row name (summary.json)"
    ),
    "split": "the held-out split evaluated: test, or valid with evaluate --split valid",
    "page_length": "page length L the pages were decoded and scored at",
    "teacher": "distill: the teacher checkpoint or run directory the student learnt from",
    "teacher_utility": "distill: the teacher's utility on the same test requests",
    "teacher_normalized_utility": "distill: the teacher's normalized utility on the same test requests",
    "teacher_ndcg@10": "distill: the teacher's NDCG@10 on the same test requests",
    "checkpoint": "evaluate: the checkpoint given",
    "source": "evaluate: the data source",
    "requests": "number of requests evaluated (evaluate) or timed (summary.json latency)",
    "data_seed": "evaluate: the data seed of the split evaluated (the run's, unless --data-seed)",
    "phase_seconds": "wall-clock seconds of each phase of the run (data, evaluator, targets, model, test), this process only",
    "train_seconds": "wall-clock seconds of the run's phases except the test evaluation",
}

#: Keys of an experiment's summary.json (its `config` is the ExperimentConfig, whose keys
#: `--help` documents).
SUMMARY_FIELDS: dict[str, str] = {
    "title": "the report's title",
    "commands": "the command line(s) that produced the experiment",
    "notes": "comparisons derived from the rows (student vs teacher utility, collapse, latency)",
    "rows": "one row per model: every figure as the mean over seeds, its `_std`, the model and seeds",
    "plots": "PNG files written next to summary.json",
    "non_finite": "figures that were NaN or infinite, stored as null",
    "config": "the full experiment config",
    "rows_run": "the rows run, dependencies included, in run order",
    "latency": "student_skd vs teacher latency at batch size 1, timed alternately (keys latency.*)",
    "per_seed": "per row, one record per seed: the run's eval.json figures, seed, seconds, trained",
    "seeds": "number of training seeds a summary row averages",
    "seed": "the training seed of a per_seed record",
    "trained": "whether the per_seed record was trained now (false: read back with --reuse)",
    "latency.batch_size": "requests per timed call (1)",
    "latency.page_length": "page length L timed",
    "latency.candidates_median": "median number of candidates of the timed requests",
    "latency.requests": "requests timed per round",
    "latency.threads": "torch intra-op threads while timing",
    "latency.teacher_ms_p50": "the teacher's median milliseconds per request, mean over seeds",
    "latency.student_ms_p50": "the student's median milliseconds per request, mean over seeds",
    "latency.ratio": "student over teacher latency, mean over seeds (below 1: the student is faster)",
    "latency.per_seed": "the same per training seed: seed, teacher_ms_p50, student_ms_p50, ratio",
    "best_tree": "the best tree row (lambdamart, catboost) and student_skd measured against it (keys best_tree.*)",
    "best_tree.key": "the figure compared: ndcg@10 where the data has real labels, else normalized_utility",
    "best_tree.row": "the tree row with the highest mean of that figure",
    "best_tree.mean": "its mean over seeds",
    "best_tree.std": "its standard deviation over seeds (null with one seed)",
    "best_tree.others": "the other tree rows' means, by row",
    "best_tree.student_skd": "student_skd's mean of the same figure",
    "best_tree.student_skd_std": "its standard deviation over seeds",
    "best_tree.margin": "the larger of the two standard deviations (0 with one seed)",
    "best_tree.student_within_one_std_or_above": "whether student_skd >= the best tree row's mean minus the margin",
}

#: Keys built from a figure's name.
DERIVED_KEYS: dict[str, str] = {
    "valid_<figure>": "the figure on the validation requests after every epoch (metrics.jsonl)",
    "<figure>_std": "sample standard deviation of the figure over training seeds (summary.json rows; null with one seed)",
}

#: Keys of an online run's metrics.jsonl (`dualrerank online`, one line per stream step);
#: `<name>` is a reward dimension (click, long_view, watch_time, reformulate, a rule's
#: name), `<stage>` a stage of the step. `eval/*` appear every `eval_every` steps.
ONLINE_KEYS: dict[str, str] = {
    "step": "0-based stream step",
    "segment": "drift segment the step lies in (number of drift events in force)",
    "rewards/<name>/mean": "mean reward of that dimension over the step's pages with a finite value (raw units)",
    "advantage/share/<name>": "that dimension's share of the mean absolute advantage (before any batch norm)",
    "advantage/abs_mean": "mean absolute advantage over the step's pages",
    "groups/zero_spread_share": "share of requests whose group of pages tie in every reward dimension (zero advantage)",
    "groups/masked_pages": "pages left out because a reward was NaN or infinite",
    "groups/duplicate_page_share": "share of sampled pages that equal another page of their group",
    "policy/loss": "the student's loss in the last of the K epochs (clipped surrogate plus anchor)",
    "policy/clipfrac": "share of counted positions whose ratio was clipped (last epoch)",
    "policy/approx_kl": "mean (rho - 1) - log rho over counted positions: KL(sampling policy || current), last epoch",
    "policy/ess": "effective sample size of the page importance weights, as a share of the pages (last epoch)",
    "policy/ratio_max": "largest per-position ratio rho (exactly 1 in the first epoch of a step)",
    "policy/kl_ref": "grpo, dr_grpo, gdpo: KL to the starting student on the sampled pages",
    "policy/entropy": "mean entropy of the student's rows over the valid candidates when serving",
    "kd/loss": "ldro presets: the KD anchor's position-weighted KL(q_t || p_t) to the teacher",
    "teacher/loss": "the teacher's supervised loss on the step's shown pages",
    "evaluator/loss": "the evaluator's click/long-view BCE on the step's shown pages",
    "scale/jumps": "stream-scale presets: dimensions re-estimated at once so far (a scale jump, e.g. a unit change)",
    "perf/requests_per_second": "requests of the step over the step's wall-clock seconds (evaluation excluded)",
    "perf/seconds/<stage>": "seconds of that stage: serve, feedback, reward, advantage, policy, teacher_evaluator, log",
    "eval/normalized_utility": "the student's greedy pages on the current segment's fixed evaluation set (ratio of sums)",
    "eval/teacher_normalized_utility": "the teacher's greedy pages on the same set",
    "eval/ptar": "PTAR of the student's greedy pages to the teacher's on that set",
    "eval/collapse_rate": "the student's collapse rate on that set",
    "final_normalized_utility": "online experiment: mean of a run's last evaluations (mean over seeds)",
    "auc_normalized_utility": "online experiment: mean of all a run's evaluations (area under the curve over its length)",
    "steps_to_90pct": (
        "online experiment: first evaluated step at which the curve covered 90% of its way from its first evaluation to its "
        "final level"
    ),
    "recovery_steps": (
        "online experiment: per shift, steps until the curve is back to 90% of its level before the shift (null: some seed never)"
    ),
}

#: Keys of `dualrerank ab`'s summary.json (docs/evaluation.md) beyond the listed names it
#: shares (title, commands, requests, page_length, model, the utility and latency figures,
#: plots, non_finite, config): top-level keys, the keys of each `arms.<arm>` record, of
#: each `lifts.<arm>.<metric>` comparison, and `power.*`.
AB_KEYS: dict[str, str] = {
    "design": (
        "paired (every arm serves every request, independent feedback draws) or split (each request to one arm, uniformly at "
        "random)"
    ),
    "traffic_seed": (
        "seed of the traffic: the requests of each step, each arm's feedback draws, the split assignment, the bootstrap"
    ),
    "world": "the world YAML the traffic came from (null: the default world)",
    "world_seed": "seed of the world (its catalogue); the arms must have been trained on the same world",
    "requests_per_step": "requests per stream step: request i is served by the world at step i // requests_per_step",
    "steps": "stream steps the test's requests span",
    "drift_events": "drift events of the world's schedule in force at some step of the test",
    "control": "the arm every other arm is compared with",
    "interval_method": "how the intervals were computed: delta (delta method) or bootstrap (scipy.stats.bootstrap, percentile)",
    "confidence": "confidence level of the intervals (1 - confidence is the power line's alpha)",
    "arms": "per arm name: its arm_path, model, serving_path, requests served and its figures",
    "lifts": "per arm other than the control, per metric: arm_value, control_value, difference, lift, their intervals, p_value",
    "third_party": (
        "the paper's online A/B figures as two third-party extractions quote them (method.md section 6); never measured here"
    ),
    "wall_seconds": "wall-clock seconds of the whole test (traffic, latency, report)",
    "arm_path": "the run directory or checkpoint the arm was loaded from, or upstream (sort by the upstream score)",
    "serving_path": (
        "what the latency times: onnx (a NAR student exported and run by dualrerank.serve) or torch (the PyTorch model)"
    ),
    "ctr": "clicks over items shown (the L items of each page served), over the requests the arm served",
    "ctr_per_page": "clicks per request",
    "long_view_rate": "long views over items shown",
    "reformulation_rate": "share of requests after which the user reformulated the query",
    "watch_time_per_request": "seconds watched per request (reported watch time over the reported unit in force)",
    "latency_requests": "requests timed at batch size 1 on the arm's serving path",
    "serving_parity": "share of the timed requests whose serving-path page equals the page the arm served in the test",
    "arm_value": "the arm's value of the metric (a ratio of sums over the requests it served)",
    "control_value": "the control's value of the metric",
    "difference": "arm_value - control_value",
    "difference_ci": "interval of the difference at the test's confidence (null where undefined; latency has none)",
    "lift": "relative lift arm_value / control_value - 1",
    "lift_ci": "interval of the lift at the test's confidence (null where undefined; latency has none)",
    "p_value": "two-sided p-value of no difference (normal approximation; null for latency)",
    "power": "the power line: requests needed to detect the target CTR lift (keys power.*)",
    "power.target_lift": "relative CTR lift the test is sized for (default: the paper's +0.714%, a third-party figure)",
    "power.power": "power asked for (0.8)",
    "power.alpha": "two-sided significance level (1 - confidence)",
    "power.control_ctr": "the control's measured CTR",
    "power.control_std": "standard deviation of the control's per-request linearised CTR (clicks_i - CTR shown_i) / mean(shown)",
    "power.requests_per_arm_split": "requests per arm a split test needs, from the control's variance (both arms assumed alike)",
    "power.requests_paired": (
        "per arm: requests a paired test needs, from the variance of its per-request linearised CTR differences to the control "
        "(null in a split test)"
    ),
    "power.requests_per_arm": "requests per arm this test had (the control's)",
    "power.detectable_lift_split": "smallest relative CTR lift this test's requests per arm detect at that power in a split test",
    "power.line": "the power line as one sentence (report.md quotes it)",
}

#: Keys of `dualrerank ope`'s summary.json (docs/evaluation.md) beyond the listed names it
#: shares (title, commands, config, non_finite): top-level keys, `data.*`, `reward_weights.*`
#: and the keys of each `estimators.<name>` record (`<name>`: ips, snips, pi, dm, dr, pi_dr,
#: cascade_dr, cascade_sndr).
OPE_KEYS: dict[str, str] = {
    "policy": "the run directory or checkpoint of the reranker evaluated",
    "policy_model": "its registry model name",
    "evaluator": "the ListEvaluator checkpoint behind dm and the DR estimators (null: none, they are not run)",
    "data": "the logs evaluated on (keys data.*)",
    "data.source": "data source of the logs: synthetic, letor or mind",
    "data.path": "the world YAML, logs folder or data path (null: the default world)",
    "data.world_seed": "seed of the simulated world the logs come from (null for other sources)",
    "data.logs_seed": "seed the logs of a generated world were drawn with (run seed + 3,000,003; null for a logs folder)",
    "data.requests": "logged requests evaluated on",
    "data.page_length": "positions of each logged page, and of the policy's page (L)",
    "reward_weights": "the page reward's weight per feedback event (keys reward_weights.*)",
    "reward_weights.click": "reward per click event",
    "reward_weights.long_view": "reward per long-view event",
    "logged_reward": "mean realised page reward of the logged pages: the logging policy's value on these requests",
    "truth": (
        "exact mean page reward of the policy's pages on these requests under the simulated world's user model (null without a "
        "world)"
    ),
    "estimators": "one record per estimator (keys estimators.<name>.*)",
    "estimators.<name>": (
        "the record of estimator <name>: ips, snips, pi, dm, dr, pi_dr, cascade_dr or cascade_sndr (docs/evaluation.md)"
    ),
    "estimators.<name>.status": (
        "ok; no support (no logged page, prefix or item equals the policy's: the value is 0 or dm's, not an estimate); not run"
    ),
    "estimators.<name>.reason": "why the estimator has no support or did not run (null when ok)",
    "estimators.<name>.estimate": "the estimated mean page reward of the policy",
    "estimators.<name>.se": "standard error of the estimate (influence terms; self-normalised forms by the delta method)",
    "estimators.<name>.ci_low": "lower end of the confidence interval (normal, or bootstrap percentile)",
    "estimators.<name>.ci_high": "upper end of the confidence interval",
    "estimators.<name>.error": "estimate - truth (simulated world only)",
    "estimators.<name>.covered": "whether the interval holds the truth (simulated world only)",
    "estimators.<name>.ess": (
        "Kish effective sample size (sum w)^2 / sum w^2 of the estimator's weights; per-position weights: the smallest over "
        "positions"
    ),
    "estimators.<name>.ess_share": "ess over the number of logged requests",
    "estimators.<name>.ess_by_position": (
        "per-position weights: the effective sample size at each position (null for whole-page weights)"
    ),
    "estimators.<name>.weight_max": "largest importance weight",
    "estimators.<name>.nonzero_share": "share of logged requests with a non-zero weight (at some position)",
    "support_notes": "what the estimates rest on: logged pages and prefixes equal to the policy's, estimators not run and why",
    "elapsed_seconds": "wall-clock seconds of the evaluation (logs, policy pages, evaluator, marginals, estimates)",
}

#: Every literal logged name and its meaning.
LOGGED_KEYS: dict[str, str] = {**FIGURES, **EPOCH_KEYS, **RUN_FIELDS, **SUMMARY_FIELDS}

#: The student-vs-teacher agreement figures (`agreement_per_request`), in table order.
AGREEMENT_FIGURES: tuple[str, ...] = (
    "ptar",
    "ptar@4",
    "exact_page",
    "teacher_margin",
    "collapse_rate",
    "collision_share",
    "mean_row_js",
    "mean_row_entropy",
    "certified_prefix",
    "certified_ptar",
    "certified_ptar@4",
    "certified_step_share",
)


def describe_key(key: str) -> str | None:
    """The documented meaning of a logged key (a literal name, `valid_<figure>` or
    `<figure>_std`); None for a key nobody documented."""
    if key in LOGGED_KEYS:
        return LOGGED_KEYS[key]
    if key.startswith("valid_") and key[len("valid_") :] in FIGURES:
        return f"{FIGURES[key[len('valid_') :]]}; on the validation requests, every epoch"
    if key.endswith("_std") and key[: -len("_std")] in FIGURES:
        return f"standard deviation over seeds of: {FIGURES[key[: -len('_std')]]}"
    if key in ONLINE_KEYS:
        return ONLINE_KEYS[key]
    if key in AB_KEYS:
        return AB_KEYS[key]
    if key in OPE_KEYS:
        return OPE_KEYS[key]
    ope = key.split(".")
    if len(ope) in (2, 3) and ope[0] == "estimators" and ".".join(["estimators", "<name>", *ope[2:]]) in OPE_KEYS:
        return OPE_KEYS[".".join(["estimators", "<name>", *ope[2:]])]
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean":
        return ONLINE_KEYS["rewards/<name>/mean"]
    if len(parts) == 3 and parts[:2] == ["advantage", "share"]:
        return ONLINE_KEYS["advantage/share/<name>"]
    if len(parts) == 3 and parts[:2] == ["perf", "seconds"]:
        return ONLINE_KEYS["perf/seconds/<stage>"]
    return None


ZeroIdcgRule = Literal["zero", "one", "nan"]
TieRule = Literal["index", "pessimistic", "optimistic"]

LN2 = math.log(2.0)
_F = torch.float64


# ---------------------------------------------------------------------------- validation
def _tensor(name: str, x: object, rank: int, shape: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name}: expected a tensor {shape}, got {type(x).__name__}")
    if x.dim() != rank:
        raise DataError(f"{name}: expected rank {rank} {shape}, got shape {tuple(x.shape)}")
    return x


def _mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The mask itself, or all-True when None; must be bool and shaped `shape`."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise DataError(f"{name}: must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise DataError(f"{name}: shape {tuple(mask.shape)} != expected {tuple(shape)}")
    return mask


def _same_shape(name: str, x: torch.Tensor, shape: tuple[int, ...], ref: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise DataError(f"{name}: shape {tuple(x.shape)} != {ref} {tuple(shape)}")


def _raise_first(bad: torch.Tensor, name: str, what: str) -> None:
    """Raise for the first request b with `bad[b]` (bad: `[B]` bool)."""
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise DataError(f"{name}: {what} in request {b}")


def _check_page(name: str, page: torch.Tensor, page_mask: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Check a page against the candidates; returns it clamped into [0, n) for gathers.

    page, page_mask: `[B, L]`; candidate_mask: `[B, n]`. Masked-out positions may hold
    anything. Existing positions must point at distinct, existing candidates.
    """
    if page.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise DataError(f"{name}: must hold integer candidate indices, got {page.dtype}")
    n = candidate_mask.shape[1]
    page = page.to(torch.int64)
    _raise_first((((page < 0) | (page >= n)) & page_mask).any(dim=1), name, f"candidate index outside [0, {n})")
    safe = page.clamp(0, max(n - 1, 0))
    _raise_first((~candidate_mask.gather(1, safe) & page_mask).any(dim=1), name, "points at a padded candidate")
    L = page.shape[1]
    same = (safe.unsqueeze(2) == safe.unsqueeze(1)) & page_mask.unsqueeze(2) & page_mask.unsqueeze(1)
    same &= ~torch.eye(L, dtype=torch.bool, device=page.device)
    _raise_first(same.any(dim=(1, 2)), name, "repeats a candidate")
    return safe


def _check_k(k: int, name: str = "k") -> int:
    try:
        value = operator.index(k)  # accepts numpy integers, rejects floats
    except TypeError:
        value = None
    if isinstance(k, bool) or value is None or value < 1:
        raise DataError(f"{name}: must be an integer >= 1, got {k!r}")
    return value


def batch_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Mean of a per-request metric, NaN entries (undefined requests) left out.

    Args:
        values: `[B]` per-request values; NaN marks a request the metric excludes.
        weights: optional `[B]` non-negative weights (e.g. number of clicks).

    Returns:
        the (weighted) mean over the defined requests, NaN when none is defined.
    """
    v = _tensor("values", values, 1, "[B]").to(_F)
    w = torch.ones_like(v) if weights is None else _tensor("weights", weights, 1, "[B]").to(_F)
    _same_shape("weights", w, tuple(v.shape), "values'")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise DataError("weights: must be finite and >= 0")
    keep = ~torch.isnan(v)
    total = (w * keep).sum()
    if float(total) == 0.0:
        return float("nan")
    return float((torch.where(keep, v, 0.0) * w).sum() / total)


# ---------------------------------------------------------------------------- NDCG
def gain(relevance: torch.Tensor) -> torch.Tensor:
    """Exponential gain `2^rel - 1`, elementwise (any shape)."""
    return torch.exp2(relevance.to(_F)) - 1.0


def dcg_discounts(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`[length]` float64 discounts `1 / log2(t + 1)` for 1-based positions t = 1..length."""
    t = torch.arange(1, length + 1, dtype=_F, device=device)
    return 1.0 / torch.log2(t + 1.0)


def scores_to_page(
    scores: torch.Tensor,
    candidate_mask: torch.Tensor,
    k: int | None = None,
    *,
    ties: TieRule = "index",
    relevance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-and-sort: the page of the k highest-scoring valid candidates.

    Tie rule for equal scores:
      * ``"index"`` (default): lower candidate index first, i.e. a stable sort, which is
        also what greedy decoding with `torch.argmax` serves;
      * ``"pessimistic"``: lower relevance first (the worst case over tie orders);
      * ``"optimistic"``: higher relevance first.
    Relevance-based rules fall back to candidate index among equal relevance.

    Args:
        scores: `[B, n]` float scores; values at padded candidates are ignored.
        candidate_mask: `[B, n]` bool, True where a candidate exists.
        k: page length (default n); positions beyond a request's valid count are masked.
        ties: tie rule, see above.
        relevance: `[B, n]` labels, required by the pessimistic/optimistic rules.

    Returns:
        page `[B, min(k, n)]` int64 candidate indices and page_mask `[B, min(k, n)]` bool.
    """
    scores = _tensor("scores", scores, 2, "[B, n]")
    if not torch.is_floating_point(scores):
        raise DataError(f"scores: must be floating point, got {scores.dtype}")
    B, n = scores.shape
    mask = _mask("candidate_mask", candidate_mask, (B, n), scores.device)
    _raise_first((torch.isnan(scores) & mask).any(dim=1), "scores", "NaN score")
    k = n if k is None else min(_check_k(k), n)
    # Padding may hold NaN; it is ordered last by the mask key, so any finite value works.
    keys: list[tuple[torch.Tensor, bool]] = []
    if ties in ("pessimistic", "optimistic"):
        if relevance is None:
            raise DataError(f"ties: rule {ties!r} needs relevance labels")
        relevance = _tensor("relevance", relevance, 2, "[B, n]")
        _same_shape("relevance", relevance, (B, n), "scores'")
        keys.append((torch.where(mask, relevance.to(_F), 0.0), ties == "optimistic"))
    elif ties != "index":
        raise DataError(f"ties: {ties!r} is not one of ['index', 'pessimistic', 'optimistic']")
    keys.append((torch.where(mask, scores, 0.0), True))
    keys.append((mask.to(torch.int8), True))
    # Successive stable sorts, least significant key first, give a lexicographic order
    # whose last resort is the candidate index.
    perm = torch.arange(n, device=scores.device).expand(B, n)
    for key, descending in keys:
        _, order = torch.sort(key.gather(1, perm), dim=1, stable=True, descending=descending)
        perm = perm.gather(1, order)
    page = perm[:, :k]
    page_mask = torch.arange(k, device=scores.device).unsqueeze(0) < mask.sum(dim=1, keepdim=True)
    return page, page_mask


def ndcg_at_k(
    relevance: torch.Tensor,
    ranking: torch.Tensor,
    candidate_mask: torch.Tensor,
    k: int,
    *,
    page_mask: torch.Tensor | None = None,
    ties: TieRule = "index",
    zero_idcg: ZeroIdcgRule = "zero",
) -> torch.Tensor:
    """NDCG@k of a page (or of score-and-sort) against graded relevance, per request.

    `DCG@k = sum_{t <= min(k, L)} (2^rel(pi_t) - 1) / log2(t + 1)`; the ideal DCG sorts
    all valid candidates' labels in decreasing order and cuts at k. A page shorter than
    k is therefore penalised against an ideal of length min(k, n_valid).

    Args:
        relevance: `[B, n]` graded labels >= 0 (values at padding ignored).
        ranking: either a page `[B, L]` (integer candidate indices) or scores `[B, n]`
            (floating point; sorted with the tie rule `ties`, see `scores_to_page`).
        candidate_mask: `[B, n]` bool, True where a candidate exists.
        k: cut-off >= 1.
        page_mask: `[B, L]` bool, positions of the page that exist (pages only).
        ties: tie rule for equal scores (scores only).
        zero_idcg: value for requests whose ideal DCG is 0 (no relevant candidate):
            ``"zero"`` (default, as trec_eval / ir-measures / sklearn), ``"one"`` (as
            LightGBM / XGBoost), or ``"nan"`` (undefined: `batch_mean` leaves them out).

    Returns:
        `[B]` float64 NDCG@k in [0, 1].
    """
    relevance = _tensor("relevance", relevance, 2, "[B, n]")
    B, n = relevance.shape
    mask = _mask("candidate_mask", candidate_mask, (B, n), relevance.device)
    k = _check_k(k)
    if zero_idcg not in ("zero", "one", "nan"):
        raise DataError(f"zero_idcg: {zero_idcg!r} is not one of ['zero', 'one', 'nan']")
    rel = relevance.to(_F)
    _raise_first((~torch.isfinite(rel) & mask).any(dim=1), "relevance", "NaN/inf label")
    _raise_first(((rel < 0) & mask).any(dim=1), "relevance", "negative label")
    ranking = _tensor("ranking", ranking, 2, "[B, L] page or [B, n] scores")
    if ranking.shape[0] != B:
        raise DataError(f"ranking: has {ranking.shape[0]} rows for {B} requests")
    if ranking.dtype == torch.bool:
        raise DataError("ranking: must be an integer page or floating-point scores, got bool")
    if torch.is_floating_point(ranking):
        if page_mask is not None:
            raise DataError("page_mask: only meaningful with a page, not with scores")
        _same_shape("ranking", ranking, (B, n), "relevance's")
        page, pmask = scores_to_page(ranking, mask, k, ties=ties, relevance=relevance)
    else:
        pmask = _mask("page_mask", page_mask, tuple(ranking.shape), ranking.device)
        page = _check_page("ranking", ranking, pmask, mask)

    g = torch.where(mask, gain(rel), 0.0)
    L = page.shape[1]
    cut = min(k, L)
    page_gain = torch.where(pmask, g.gather(1, page), 0.0)[:, :cut]
    dcg = (page_gain * dcg_discounts(cut, g.device)).sum(dim=1)
    m = min(k, n)
    ideal = torch.sort(g, dim=1, descending=True).values[:, :m]
    idcg = (ideal * dcg_discounts(m, g.device)).sum(dim=1)
    fill = {"zero": 0.0, "one": 1.0, "nan": float("nan")}[zero_idcg]
    return torch.where(idcg > 0, dcg / idcg.clamp_min(torch.finfo(_F).tiny), fill)


# ---------------------------------------------------------------------------- utility
def _utility_inputs(u_page: torch.Tensor, u_random: torch.Tensor, u_oracle: torch.Tensor) -> tuple[torch.Tensor, ...]:
    u = _tensor("u_page", u_page, 1, "[B]").to(_F)
    r = _tensor("u_random", u_random, 1, "[B]").to(_F)
    o = _tensor("u_oracle", u_oracle, 1, "[B]").to(_F)
    _same_shape("u_random", r, tuple(u.shape), "u_page's")
    _same_shape("u_oracle", o, tuple(u.shape), "u_page's")
    for name, x in (("u_page", u), ("u_random", r), ("u_oracle", o)):
        _raise_first(~torch.isfinite(x), name, "NaN/inf utility")
    return u, r, o


def _degenerate(gap: torch.Tensor, r: torch.Tensor, o: torch.Tensor, eps: float) -> torch.Tensor:
    # Scale-free: a gap that is a negligible fraction of the utilities themselves carries
    # no information about how good the page is, whatever the units.
    return gap <= eps * (o.abs() + r.abs())


def normalized_utility(
    u_page: torch.Tensor,
    u_random: torch.Tensor,
    u_oracle: torch.Tensor,
    *,
    eps: float = 1e-6,
    degenerate: Literal["nan", "zero"] = "nan",
) -> torch.Tensor:
    """Per-request normalized utility `(U(page) - U(random)) / (U(oracle) - U(random))`.

    0 is a random page, 1 the oracle; values can leave [0, 1] (worse than random, or a
    page beating the near-optimal beam oracle). The ratio is affine-invariant: changing
    the utility's units or adding a constant does not change it.

    A request is degenerate when `U(oracle) - U(random) <= eps * (|U(oracle)| + |U(random)|)`
    (every page is about equally good, or the oracle is no better than random): it gets
    NaN (default; `batch_mean` leaves it out) or 0 with `degenerate="zero"`.

    Args:
        u_page, u_random, u_oracle: `[B]` expected utilities of the evaluated page, of a
            random page (its expectation) and of the oracle page, in the same world.

    Returns:
        `[B]` float64.
    """
    u, r, o = _utility_inputs(u_page, u_random, u_oracle)
    if degenerate not in ("nan", "zero"):
        raise DataError(f"degenerate: {degenerate!r} is not one of ['nan', 'zero']")
    gap = o - r
    bad = _degenerate(gap, r, o, eps)
    fill = float("nan") if degenerate == "nan" else 0.0
    return torch.where(bad, fill, (u - r) / torch.where(bad, 1.0, gap))


def normalized_utility_mean(
    u_page: torch.Tensor,
    u_random: torch.Tensor,
    u_oracle: torch.Tensor,
    *,
    how: Literal["ratio_of_sums", "mean_of_ratios"] = "ratio_of_sums",
    eps: float = 1e-6,
) -> float:
    """Batch normalized utility.

    ``"ratio_of_sums"`` (default): `sum_b (U_b - R_b) / sum_b (O_b - R_b)`, i.e. the
    normalized utility of the mean utilities. Requests weigh by their attainable gain, so
    near-degenerate requests cannot blow the mean up, and it equals what a stream of
    requests earns relative to random and oracle serving. ``"mean_of_ratios"``: the mean
    of `normalized_utility` over non-degenerate requests (each request counts equally).

    Returns:
        a float; NaN when the whole batch is degenerate.
    """
    if how == "mean_of_ratios":
        return batch_mean(normalized_utility(u_page, u_random, u_oracle, eps=eps))
    if how != "ratio_of_sums":
        raise DataError(f"how: {how!r} is not one of ['ratio_of_sums', 'mean_of_ratios']")
    u, r, o = _utility_inputs(u_page, u_random, u_oracle)
    if u.numel() == 0:
        return float("nan")
    num, den = (u - r).sum(), (o - r).sum()
    if bool(_degenerate(den, r.abs().sum(), o.abs().sum(), eps)):
        return float("nan")
    return float(num / den)


# ---------------------------------------------------------------------------- AUC
def per_request_auc(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ROC AUC of each request (Mann-Whitney U / (P N), tied scores count 1/2).

    `AUC_b = P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)` over the request's valid positive x
    negative pairs, computed from mid-ranks in O(n log n).

    Args:
        scores: `[B, n]` float scores (NaN not allowed where valid; +-inf allowed).
        labels: `[B, n]` binary labels: bool, or numbers in {0, 1}.
        mask: `[B, n]` bool, True where an item exists (default: all).

    Returns:
        `[B]` float64 AUC in [0, 1]; NaN for requests with no positive or no negative.
    """
    scores = _tensor("scores", scores, 2, "[B, n]")
    B, n = scores.shape
    labels = _tensor("labels", labels, 2, "[B, n]")
    _same_shape("labels", labels, (B, n), "scores'")
    mask = _mask("mask", mask, (B, n), scores.device)
    s = scores.to(_F)
    _raise_first((torch.isnan(s) & mask).any(dim=1), "scores", "NaN score")
    lab = labels.to(_F)
    _raise_first((((lab != 0) & (lab != 1)) & mask).any(dim=1), "labels", "label not in {0, 1}")
    pos = (lab == 1) & mask
    neg = (lab == 0) & mask
    # Padding sorts last as +inf; counts are clamped to the valid count, so a valid +inf
    # score still only ties with valid +inf scores.
    filled = torch.where(mask, s, math.inf)
    sorted_s = torch.sort(filled, dim=1).values.contiguous()
    n_valid = mask.sum(dim=1, keepdim=True)
    less = torch.searchsorted(sorted_s, filled.contiguous(), right=False).clamp(max=n_valid)
    less_eq = torch.searchsorted(sorted_s, filled.contiguous(), right=True).clamp(max=n_valid)
    midrank = less.to(_F) + (less_eq - less + 1).to(_F) / 2.0
    P = pos.sum(dim=1).to(_F)
    N = neg.sum(dim=1).to(_F)
    u_stat = torch.where(pos, midrank, 0.0).sum(dim=1) - P * (P + 1) / 2
    ok = (P > 0) & (N > 0)
    return torch.where(ok, u_stat / torch.where(ok, P * N, 1.0), math.nan)


def grouped_auc(
    scores: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    weights: Literal["impressions", "uniform"] = "impressions",
) -> float:
    """Grouped AUC (GAUC): the per-request AUCs averaged over requests with both classes.

    `GAUC = sum_b w_b AUC_b / sum_b w_b` over requests with a positive and a negative.
    ``weights="impressions"`` (default, as in the DIN paper's GAUC) weighs a request by its
    number of valid items, so a request with many shown items counts more than one with
    two; ``"uniform"`` weighs every request the same.

    Args: as `per_request_auc` (`[B, n]` each). Returns a float (NaN if every request
    has a single class).
    """
    values = per_request_auc(scores, labels, mask)
    if weights == "uniform":
        return batch_mean(values)
    if weights != "impressions":
        raise DataError(f"weights: {weights!r} is not one of ['impressions', 'uniform']")
    valid = _mask("mask", mask, tuple(values.shape) + (scores.shape[1],), values.device)
    return batch_mean(values, valid.sum(dim=1).to(_F))


def auc_figures(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """The logged `auc` and `gauc` of item scores against binary labels.

    `auc` pools every valid (request, item) pair into one ROC AUC (`auc`); `gauc` is
    `grouped_auc` with impression weights. Both NaN where undefined (a single class).

    Args: as `per_request_auc` (`[B, n]` each).
    """
    scores = _tensor("scores", scores, 2, "[B, n]")
    valid = _mask("mask", mask, tuple(scores.shape), scores.device)
    labels = _tensor("labels", labels, 2, "[B, n]")
    _same_shape("labels", labels, tuple(scores.shape), "scores'")
    return {"auc": auc(scores[valid], labels[valid]), "gauc": grouped_auc(scores, labels, valid)}


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Pooled ROC AUC of `[N]` scores against `[N]` binary labels (ties count 1/2).

    Returns NaN when the labels hold a single class (AUC is undefined).
    """
    scores = _tensor("scores", scores, 1, "[N]")
    labels = _tensor("labels", labels, 1, "[N]")
    _same_shape("labels", labels, tuple(scores.shape), "scores'")
    return float(per_request_auc(scores.unsqueeze(0), labels.unsqueeze(0))[0])


# ---------------------------------------------------------------------------- PTAR
def ptar(
    student_pages: torch.Tensor,
    teacher_pages: torch.Tensor,
    page_mask: torch.Tensor | None = None,
    *,
    k: int = 4,
) -> dict[str, torch.Tensor | float]:
    """Position-wise teacher agreement rate between two pages of each request.

    Args:
        student_pages, teacher_pages: `[B, L]` candidate indices.
        page_mask: `[B, L]` bool, positions that exist (default: all).
        k: the short cut-off (default 4, the first viewport).

    Returns:
        a dict with per-request `[B]` float64 tensors
          * ``"ptar"``: share of existing positions t <= L where the pages agree,
          * ``f"ptar@{k}"``: the same over existing positions t <= k,
          * ``"exact_page"``: 1.0 when every existing position agrees, else 0.0,
        (NaN for a request with no existing position), ``"agree"`` `[B, L]` bool, and the
        batch means as floats under the same names with a ``"_mean"`` suffix.
    """
    s = _tensor("student_pages", student_pages, 2, "[B, L]")
    t = _tensor("teacher_pages", teacher_pages, 2, "[B, L]")
    _same_shape("teacher_pages", t, tuple(s.shape), "student_pages'")
    for name, x in (("student_pages", s), ("teacher_pages", t)):
        if torch.is_floating_point(x) or x.dtype == torch.bool:
            raise DataError(f"{name}: must hold integer candidate indices, got {x.dtype}")
    k = _check_k(k)
    pm = _mask("page_mask", page_mask, tuple(s.shape), s.device)
    agree = (s.to(torch.int64) == t.to(torch.int64)) & pm
    head = pm.clone()
    head[:, k:] = False

    def share(sel: torch.Tensor) -> torch.Tensor:
        count = sel.sum(dim=1).to(_F)
        return torch.where(count > 0, (agree & sel).sum(dim=1).to(_F) / count.clamp_min(1.0), math.nan)

    full = share(pm)
    exact = torch.where(torch.isnan(full), math.nan, (full == 1.0).to(_F))
    out: dict[str, torch.Tensor | float] = {"ptar": full, f"ptar@{k}": share(head), "exact_page": exact, "agree": agree}
    for name in ("ptar", f"ptar@{k}", "exact_page"):
        out[f"{name}_mean"] = batch_mean(cast(torch.Tensor, out[name]))  # these three are the [B] tensors
    return out


# ---------------------------------------------------------------------------- collapse
def _logits(name: str, x: torch.Tensor, candidate_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = _tensor(name, x, 3, "[B, L, n]")
    if not torch.is_floating_point(x):
        raise DataError(f"{name}: must be floating point, got {x.dtype}")
    B, _, n = x.shape
    mask = _mask("candidate_mask", candidate_mask, (B, n), x.device)
    bad = (torch.isnan(x) | (x == math.inf)) & mask.unsqueeze(1)
    _raise_first(bad.any(dim=(1, 2)), name, "NaN or +inf at a valid candidate")
    return x, mask


def unmasked_argmax(logits: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Per-position argmax over valid candidates, with no decoding mask.

    Only padding is excluded; candidates chosen at other positions stay eligible. Ties go
    to the lowest candidate index (`torch.argmax`).

    Args:
        logits: `[B, L, n]` row scores (the student's Z).
        candidate_mask: `[B, n]` bool.

    Returns:
        `[B, L]` int64 candidate indices.
    """
    x, mask = _logits("logits", logits, candidate_mask)
    _raise_first(mask.sum(dim=1) == 0, "candidate_mask", "no valid candidate")
    filled = torch.where(mask.unsqueeze(1), x.to(_F), -math.inf)
    # When every valid logit of a row is -inf, argmax over the filled row could land on
    # padding; such a row's argmax is its first valid candidate instead.
    all_neg_inf = torch.isneginf(filled).all(dim=2, keepdim=True)
    first_valid = mask.to(torch.int8).argmax(dim=1).view(-1, 1).expand(-1, x.shape[1])
    return torch.where(all_neg_inf.squeeze(2), first_valid, filled.argmax(dim=2))


def _collisions(logits: torch.Tensor, candidate_mask: torch.Tensor, position_mask: torch.Tensor | None):
    """`[B, L, L]` bool: positions s < t (both existing) with the same unmasked argmax."""
    a = unmasked_argmax(logits, candidate_mask)
    B, L = a.shape
    pm = _mask("position_mask", position_mask, (B, L), a.device)
    same = (a.unsqueeze(2) == a.unsqueeze(1)) & pm.unsqueeze(2) & pm.unsqueeze(1)
    earlier = torch.ones(L, L, dtype=torch.bool, device=a.device).triu(diagonal=1)
    return same & earlier, pm


def collapse_rate(
    logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ranking collapse indicator per request (its batch mean is the collapse rate).

    A request has collapsed when the unmasked per-position argmaxes of its logit rows
    (padding excluded, nothing else masked) pick the same candidate at two or more
    existing positions: only the decoding mask keeps its page valid.

    Args:
        logits: `[B, L, n]` row logits; candidate_mask `[B, n]`; position_mask `[B, L]`.

    Returns:
        `[B]` float64, 1.0 for a collapsed request, else 0.0.
    """
    pairs, _ = _collisions(logits, candidate_mask, position_mask)
    return pairs.any(dim=(1, 2)).to(_F)


def collision_share(
    logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of existing positions whose unmasked argmax repeats an earlier position's.

    0 for distinct argmaxes, `(L - 1) / L` when every row picks the same candidate; a
    graded companion of `collapse_rate`. Shapes as there; returns `[B]` float64 (NaN for
    a request with no existing position).
    """
    pairs, pm = _collisions(logits, candidate_mask, position_mask)
    repeats = pairs.any(dim=1).sum(dim=1).to(_F)
    count = pm.sum(dim=1).to(_F)
    return torch.where(count > 0, repeats / count.clamp_min(1.0), math.nan)


def row_distributions(x: torch.Tensor, candidate_mask: torch.Tensor, *, from_logits: bool = True) -> torch.Tensor:
    """Rows of `[B, L, n]` logits (softmax) or probabilities (renormalised) over valid candidates.

    Returns `[B, L, n]` float64 probabilities, exactly 0 at padding.
    """
    name = "logits" if from_logits else "probs"
    x, mask = _logits(name, x, candidate_mask)
    m = mask.unsqueeze(1)
    x = x.to(_F)
    if from_logits:
        filled = torch.where(m, x, -math.inf)
        _raise_first(torch.isneginf(filled).all(dim=2).any(dim=1), name, "a row has no finite logit at a valid candidate")
        return torch.softmax(filled, dim=2)
    _raise_first(((x < 0) & m).any(dim=(1, 2)), name, "negative probability")
    p = torch.where(m, x, 0.0)
    total = p.sum(dim=2, keepdim=True)
    _raise_first((total <= 0).any(dim=(1, 2)), name, "a row has no mass on valid candidates")
    return p / total


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dim=-1)


def mean_row_js(
    x: torch.Tensor,
    candidate_mask: torch.Tensor,
    position_mask: torch.Tensor | None = None,
    *,
    from_logits: bool = True,
) -> torch.Tensor:
    """Mean Jensen-Shannon divergence over all pairs of rows (positions), per request.

    `JS(P, Q) = H((P + Q) / 2) - (H(P) + H(Q)) / 2` in nats, in [0, ln 2]: 0 for identical
    rows (a collapsed student), ln 2 for rows with disjoint support.

    Args:
        x: `[B, L, n]` logits (or probabilities with `from_logits=False`).
        candidate_mask: `[B, n]`; position_mask: `[B, L]` positions that exist.

    Returns:
        `[B]` float64 mean over pairs s < t of existing positions; NaN with fewer than 2.
    """
    p = row_distributions(x, candidate_mask, from_logits=from_logits)
    B, L, _ = p.shape
    pm = _mask("position_mask", position_mask, (B, L), p.device)
    h = _entropy(p)
    total = torch.zeros(B, dtype=_F, device=p.device)
    count = torch.zeros(B, dtype=_F, device=p.device)
    for s in range(L - 1):
        mid = (p[:, s : s + 1] + p[:, s + 1 :]) / 2
        js = _entropy(mid) - (h[:, s : s + 1] + h[:, s + 1 :]) / 2
        pair = pm[:, s : s + 1] & pm[:, s + 1 :]
        total += torch.where(pair, js.clamp(0.0, LN2), 0.0).sum(dim=1)
        count += pair.sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1.0), math.nan)


def mean_row_entropy(
    x: torch.Tensor,
    candidate_mask: torch.Tensor,
    position_mask: torch.Tensor | None = None,
    *,
    from_logits: bool = True,
    normalized: bool = False,
) -> torch.Tensor:
    """Mean entropy (nats) of the row distributions over existing positions, per request.

    In [0, ln n_valid]; with `normalized=True` divided by `ln n_valid`, so in [0, 1]
    (a request with one valid candidate has entropy 0 either way).

    Args: as `mean_row_js`. Returns `[B]` float64 (NaN for no existing position).
    """
    p = row_distributions(x, candidate_mask, from_logits=from_logits)
    B, L, _ = p.shape
    pm = _mask("position_mask", position_mask, (B, L), p.device)
    h = _entropy(p).clamp_min(0.0)
    if normalized:
        log_n = torch.log(candidate_mask.sum(dim=1).to(_F)).unsqueeze(1)
        h = torch.where(log_n > 0, h / log_n.clamp_min(1e-300), 0.0)
    count = pm.sum(dim=1).to(_F)
    return torch.where(count > 0, torch.where(pm, h, 0.0).sum(dim=1) / count.clamp_min(1.0), math.nan)


# ---------------------------------------------------------------------------- certificate
def prefix_masked_probs(
    logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    path: torch.Tensor,
    path_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Step distributions along a path: row t is a softmax over the candidates still free.

    `P[b, t] = softmax_{i valid, i not in path[b, :t]}(logits[b, t] / temperature)`, the
    distribution decoding uses at step t once `path[b, :t]` is placed. Used for the
    teacher's `q_t` (its step scores along its own path) and the student's `p_t` (its
    rows Z_t, masked by the teacher's prefix).

    Args:
        logits: `[B, L, n]` per-step scores; candidate_mask `[B, n]`;
        path: `[B, L]` candidate indices; path_mask `[B, L]` positions that exist.
        temperature: > 0.

    Returns:
        `[B, L, n]` float64, exactly 0 at padding and at already-placed candidates.
    """
    x, mask = _logits("logits", logits, candidate_mask)
    B, L, n = x.shape
    path = _tensor("path", path, 2, "[B, L]")
    _same_shape("path", path, (B, L), "logits' [B, L]")
    pm = _mask("path_mask", path_mask, (B, L), x.device)
    safe = _check_page("path", path, pm, mask)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise DataError(f"temperature: must be a finite number > 0, got {temperature!r}")
    placed = torch.zeros(B, L, n, dtype=torch.bool, device=x.device)
    placed.scatter_(2, safe.unsqueeze(2), pm.unsqueeze(2))
    # Exclusive running union: row t sees the items placed at steps < t.
    before = (placed.to(torch.int32).cumsum(dim=1) - placed.to(torch.int32)) > 0
    allowed = mask.unsqueeze(1) & ~before
    filled = torch.where(allowed, x.to(_F) / temperature, -math.inf)
    _raise_first(torch.isneginf(filled).all(dim=2).any(dim=1), "logits", "a step has no finite logit at a free candidate")
    return torch.softmax(filled, dim=2)


@dataclass(frozen=True)
class Certificate:
    """Stability certificate of a student against a teacher path (see `stability_certificate`).

    Attributes:
        delta: `[B, L]` float64 teacher top-1 minus top-2 probability per step.
        eta: `[B, L]` float64 `KL(q_t || p_t)` in nats (inf where p misses q's support).
        certified: `[B, L]` bool, `delta_t > sqrt(2 eta_t) + margin` (False at missing steps).
        prefix: `[B]` int64 number of leading certified steps.
        length: `[B]` int64 number of existing steps L_b.
        ptar_lower: `[B]` float64 `prefix / L_b`, a lower bound on PTAR (NaN if L_b = 0).
    """

    delta: torch.Tensor
    eta: torch.Tensor
    certified: torch.Tensor
    prefix: torch.Tensor
    length: torch.Tensor
    ptar_lower: torch.Tensor

    def ptar_lower_at(self, k: int) -> torch.Tensor:
        """`[B]` lower bound on PTAR@k: `min(prefix, k) / min(L_b, k)`."""
        k = _check_k(k)
        denom = self.length.clamp(max=k).to(_F)
        return torch.where(denom > 0, self.prefix.clamp(max=k).to(_F) / denom.clamp_min(1.0), math.nan)

    def step_share(self) -> torch.Tensor:
        """`[B]` share of each request's existing steps that are certified, leading or not
        (NaN if L_b = 0)."""
        steps = self.length.to(_F)
        return torch.where(steps > 0, self.certified.sum(dim=1).to(_F) / steps.clamp_min(1.0), math.nan)

    def per_request(self, k: int = 4) -> dict[str, torch.Tensor]:
        """`[B]` figures under the names logged by training (docs/metrics.md)."""
        return {
            "certified_prefix": self.prefix.to(_F),
            "certified_ptar": self.ptar_lower,
            f"certified_ptar@{k}": self.ptar_lower_at(k),
            "certified_step_share": self.step_share(),
        }

    def summary(self, k: int = 4) -> dict[str, float]:
        """Batch means (each request counts once) of `per_request`."""
        return {name: batch_mean(values) for name, values in self.per_request(k).items()}


def stability_certificate(
    q: torch.Tensor,
    p: torch.Tensor,
    step_mask: torch.Tensor | None = None,
    *,
    path: torch.Tensor | None = None,
    margin: float = 1e-6,
) -> Certificate:
    """Certify, step by step, that the student's greedy choice equals the teacher's.

    Claim. Let q, p be distributions over the same n candidates, i the argmax of q,
    `delta = q_(1) - q_(2)` (top-1 minus top-2 of q) and `eta = KL(q || p)`. If
    `delta > sqrt(2 eta)`, then `p_i > p_j` for every j != i: the argmax of p is i, and
    it is unique.

    Proof. Take j != i with `p_j >= p_i`. Since `q_j <= q_(2)`, `q_i - q_j >= delta`, so
        2 TV(q, p) = sum_l |q_l - p_l| >= (q_i - p_i) + (p_j - q_j)
                   = (q_i - q_j) + (p_j - p_i) >= delta,
    i.e. `TV >= delta / 2`. Pinsker: `TV <= sqrt(eta / 2)`. Together
    `delta <= 2 sqrt(eta / 2) = sqrt(2 eta)`, contradicting the assumption. Moreover, for
    every j != i, `p_i - p_j >= (q_i - q_j) - |q_i - p_i| - |q_j - p_j| >= delta - 2 TV >=
    delta - sqrt(2 eta)`, so with the condition `delta > sqrt(2 eta) + margin` the
    student's own gap exceeds `margin`: the conclusion survives float rounding of p and of
    the KL sum (`margin` defaults to 1e-6; computations are in float64).
    The bound is tight in TV (moving delta/2 of mass from i to the runner-up creates a
    tie) and loose only by Pinsker.

    Along a path. Let q_t be the teacher's step distributions along its greedy path y
    (masked by y_<t) and p_t the student's distributions *as used for decoding* given the
    same prefix y_<t (e.g. `prefix_masked_probs(Z, mask, y)`). If steps 1..m are
    certified, induction on t shows the student's greedy page starts with y_1..y_m: with
    the same prefix, its step-t distribution is p_t, whose argmax is argmax q_t = y_t.
    Hence PTAR >= m / L and PTAR@k >= min(m, k) / min(L, k). If `path` is given (e.g. a
    sampled or logged path instead of the greedy one), a step is certified only where
    `argmax q_t == path_t`, which keeps the bound valid for any path. Argmaxes do not
    depend on a temperature shared by q and p, so any common temperature gives a valid
    certificate (different temperatures give different, all valid, bounds).

    Args:
        q: `[B, L, n]` teacher step probabilities (renormalised here; zeros allowed).
        p: `[B, L, n]` student step probabilities, same support convention.
        step_mask: `[B, L]` bool, existing steps; must be left-aligned (True then False).
        path: optional `[B, L]` teacher path the pages are compared against.
        margin: safety margin >= 0 on the certificate condition.

    Returns:
        a `Certificate` (per-step delta, eta, certified; per-request prefix, ptar_lower).
    """
    q = _tensor("q", q, 3, "[B, L, n]")
    p = _tensor("p", p, 3, "[B, L, n]")
    _same_shape("p", p, tuple(q.shape), "q's")
    B, L, n = q.shape
    sm = _mask("step_mask", step_mask, (B, L), q.device)
    if not (margin >= 0 and math.isfinite(margin)):
        raise DataError(f"margin: must be a finite number >= 0, got {margin!r}")
    _raise_first((sm[:, 1:] & ~sm[:, :-1]).any(dim=1), "step_mask", "not left-aligned (a step exists after a missing one)")
    rows = sm.unsqueeze(2)
    dists = []
    for name, x in (("q", q), ("p", p)):
        if not torch.is_floating_point(x):
            raise DataError(f"{name}: must be floating point probabilities, got {x.dtype}")
        x = x.to(_F)
        _raise_first(((~torch.isfinite(x) | (x < 0)) & rows).any(dim=(1, 2)), name, "negative or non-finite probability")
        total = torch.where(rows, x, 0.0).sum(dim=2, keepdim=True)
        _raise_first(((total <= 0) & rows).any(dim=(1, 2)), name, "a step has no probability mass")
        dists.append(torch.where(rows, x, 0.0) / torch.where(total > 0, total, 1.0))
    qn, pn = dists

    top = torch.topk(qn, k=min(2, n), dim=2)
    second = top.values[..., 1] if n > 1 else torch.zeros_like(top.values[..., 0])
    delta = top.values[..., 0] - second
    # Term-wise form q log(q/p) - q + p (equal in sum, since both rows sum to 1): every
    # term is >= 0, so the rounding error of eta stays absolute, ~1e-16, and moves
    # sqrt(2 eta) by < 1e-7, well inside the default margin.
    log_ratio = torch.log(qn) - torch.log(pn)
    terms = torch.where(qn > 0, qn * log_ratio, 0.0) - qn + pn
    eta = terms.sum(dim=2).clamp_min(0.0)
    certified = (delta > torch.sqrt(2.0 * eta) + margin) & sm
    if path is not None:
        path = _tensor("path", path, 2, "[B, L]")
        _same_shape("path", path, (B, L), "q's [B, L]")
        if torch.is_floating_point(path) or path.dtype == torch.bool:
            raise DataError(f"path: must hold integer candidate indices, got {path.dtype}")
        certified &= top.indices[..., 0] == path.to(torch.int64)
    prefix = certified.to(torch.int64).cumprod(dim=1).sum(dim=1)
    length = sm.sum(dim=1)
    ptar_lower = torch.where(length > 0, prefix.to(_F) / length.clamp_min(1).to(_F), math.nan)
    nan = torch.full_like(delta, math.nan)
    return Certificate(
        delta=torch.where(sm, delta, nan),
        eta=torch.where(sm, eta, nan),
        certified=certified,
        prefix=prefix,
        length=length,
        ptar_lower=ptar_lower,
    )


# ---------------------------------------------------------------------------- all at once
def agreement_per_request(
    student_page: torch.Tensor,
    teacher_page: torch.Tensor,
    page_mask: torch.Tensor | None = None,
    *,
    student_logits: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
    teacher_probs: torch.Tensor | None = None,
    k: int = 4,
    margin: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Every student-vs-teacher agreement figure, per request, under its logged name.

    The one place these figures are computed: `distillation_diagnostics` and
    `train.distill.agreement_figures` both average this dict. Which figures exist depends
    on what the caller has:

      * always: ``ptar``, ``ptar@k``, ``exact_page``;
      * with `teacher_probs` (the teacher's step distributions q_t along `teacher_page`):
        ``teacher_margin``, the mean over existing steps of q_t's top-1 minus top-2;
      * with `student_logits` (position x item rows Z, which score-and-sort models and AR
        decoders lack): ``collapse_rate``, ``collision_share``, ``mean_row_js``,
        ``mean_row_entropy``;
      * with both: the stability certificate, ``certified_prefix``, ``certified_ptar``,
        ``certified_ptar@k``, ``certified_step_share`` (student rows masked by the
        teacher prefix, temperature 1).

    Args:
        student_page, teacher_page: `[B, L]` greedy pages.
        page_mask: `[B, L]` existing positions (left-aligned when `teacher_probs` is given).
        student_logits: `[B, L, n]` the student's rows; needs `candidate_mask` `[B, n]`.
        teacher_probs: `[B, L, n]` q_t along `teacher_page`.
        k: short PTAR cut-off.
        margin: the certificate's safety margin.

    Returns:
        name -> `[B]` float64 (NaN where a request has no existing position).
    """
    agree = ptar(student_page, teacher_page, page_mask, k=k)
    out: dict[str, torch.Tensor] = {name: cast(torch.Tensor, agree[name]) for name in ("ptar", f"ptar@{k}", "exact_page")}
    B, L = student_page.shape
    pm = _mask("page_mask", page_mask, (B, L), student_page.device)
    if teacher_probs is not None:
        q = _tensor("teacher_probs", teacher_probs, 3, "[B, L, n]")
        if tuple(q.shape[:2]) != (B, L):
            raise DataError(f"teacher_probs: shape {tuple(q.shape)} does not match the pages' {(B, L)}")
        top = q.to(_F).topk(min(2, q.shape[-1]), dim=-1).values
        step_margin = top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0)
        steps = pm.sum(dim=1).to(_F)
        out["teacher_margin"] = torch.where(
            steps > 0, torch.where(pm, step_margin, 0.0).sum(dim=1) / steps.clamp_min(1.0), math.nan
        )
    if student_logits is not None:
        if candidate_mask is None:
            raise DataError("candidate_mask: needed with student_logits")
        out["collapse_rate"] = collapse_rate(student_logits, candidate_mask, page_mask)
        out["collision_share"] = collision_share(student_logits, candidate_mask, page_mask)
        out["mean_row_js"] = mean_row_js(student_logits, candidate_mask, page_mask)
        out["mean_row_entropy"] = mean_row_entropy(student_logits, candidate_mask, page_mask)
        if teacher_probs is not None:
            p = prefix_masked_probs(student_logits, candidate_mask, teacher_page, page_mask)
            cert = stability_certificate(teacher_probs, p, page_mask, path=teacher_page, margin=margin)
            out.update(cert.per_request(k))
    return out


def distillation_diagnostics(
    student_logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    student_page: torch.Tensor,
    teacher_page: torch.Tensor,
    page_mask: torch.Tensor | None = None,
    *,
    teacher_probs: torch.Tensor | None = None,
    k: int = 4,
    margin: float = 1e-6,
) -> dict[str, float]:
    """The student-vs-teacher diagnostics a training loop logs, as batch means.

    Batch means (each request counts once, NaN requests left out) of
    `agreement_per_request`, under the same names.

    Args:
        student_logits: `[B, L, n]` the student's row logits Z.
        candidate_mask: `[B, n]`.
        student_page, teacher_page: `[B, L]` greedy pages; page_mask `[B, L]`
            (left-aligned when `teacher_probs` is given).
        teacher_probs: optional `[B, L, n]` teacher step distributions q_t along
            `teacher_page`; adds ``teacher_margin`` and the stability certificate.
        k: short PTAR cut-off.

    Returns:
        floats named ``ptar``, ``ptar@k``, ``exact_page``, ``collapse_rate``,
        ``collision_share``, ``mean_row_js``, ``mean_row_entropy`` and, with
        `teacher_probs`, ``teacher_margin``, ``certified_prefix``, ``certified_ptar``,
        ``certified_ptar@k``, ``certified_step_share``.
    """
    figures = agreement_per_request(
        student_page,
        teacher_page,
        page_mask,
        student_logits=student_logits,
        candidate_mask=candidate_mask,
        teacher_probs=teacher_probs,
        k=k,
        margin=margin,
    )
    return {name: batch_mean(values) for name, values in figures.items()}
