"""Sequential Knowledge Distillation (SKD) of the AR teacher into the NAR student:
`dualrerank distill` (method.md section 3).

[paper] The AR teacher's knowledge of sequential dependencies is distilled into the NAR
student with a KL loss `L_KD`; this raises teacher-student agreement (PTAR) and removes
ranking collapse. Everything concrete below is [ours] and configurable (`DistillConfig`):

1. The teacher is frozen. Along its paths `y` (greedy pages by default; teacher samples or
   the logged lists as options) its step distributions
   `q_t = softmax_{i valid, not in y_<t}(s_t / teacher_tau)` (`teacher_tau` defaults to
   0.3, sharper than the teacher; null gives method.md's `tau`) are computed once before
   training (per minibatch for teacher samples, which are redrawn every step).
2. The student (`nar` registry model, built for the data's feature widths) is trained
   through `train.loop.fit` with `losses.kd_loss`:
   `sum_t w_t tau^2 KL(q_t || p_t) + alpha sum_t w_t CE(p_t, y_t)
    + unlikelihood sum_t w_t sum_{i in y_<t} -log(1 - p_t[i])`,
   `p_t = softmax(Z_t / tau)` over all candidates (`kd_mask: none`) or over the candidates
   outside the teacher prefix (`kd_mask: prefix`; the unlikelihood term then still acts on
   the unmasked rows, the only term that does); optionally plus `supervised_weight`
   times the student's own MLE on the logged targets. `soft: false` drops the teacher's
   distributions and keeps only the hard teacher path, trained like the plain `nar`
   model (MLE under sequential masking): the `nar_direct` ablation.
3. Validation each epoch: normalized utility (world) / NDCG (labels) as `train`, plus the
   agreement diagnostics of `agreement_figures` against the teacher's greedy pages:
   PTAR@L, PTAR@4, exact page, collapse rate, mean row JS, mean row entropy, teacher
   margin, and the stability certificate (certified prefix, certified PTAR lower bound).
4. The best student (by `select_by`: PTAR minus collapse rate by default, PTAR, or utility) is
   evaluated on the test split.

Shapes: B requests, n padded candidates, L page length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dualrerank.config import dump_config, option
from dualrerank.decoding import masked_greedy, placed_before
from dualrerank.errors import CheckpointError, ConfigError
from dualrerank.files import write_json
from dualrerank.losses import kd_loss, mle_loss, position_weights
from dualrerank.metrics import AGREEMENT_FIGURES, agreement_per_request, batch_mean
from dualrerank.models.checkpoint import load_checkpoint, load_checkpoint_of_kind, save_checkpoint
from dualrerank.schema import RerankBatch
from dualrerank.train.evaluation import evaluate, rerank_all
from dualrerank.train.loop import Extras, Objective, OptimConfig, fit
from dualrerank.train.runstate import PhaseClock, prepare_run_dir
from dualrerank.train.splits import SplitConfig, Splits, load_splits
from dualrerank.train.supervised import build_for_data, validation_score
from dualrerank.train.targets import logged_targets

if TYPE_CHECKING:
    from dualrerank.models.teacher import ARTeacher

__all__ = [
    "DistillConfig",
    "distill_model",
    "agreement_figures",
    "TeacherReference",
    "teacher_reference",
    "load_teacher",
    "teacher_paths",
    "teacher_step_probs",
    "skd_loss",
]

PATHS = ("teacher_greedy", "teacher_sample", "logged")
STUDENT = "nar"
_CHUNK = 512


@dataclass
class DistillConfig:
    seed: int = option(0, "seed of the student's initialisation, minibatch order and teacher samples")
    data: SplitConfig = option(factory=SplitConfig, help="data source and splits (must match the teacher's feature widths)")
    optim: OptimConfig = option(
        factory=lambda: OptimConfig(epochs=40, patience=40),
        help="optimiser and early stopping of the student; distill's own default is 40 epochs, no early stop ("
        "PTAR and collapse move by up to 0.2-0.4 between epochs); a partial YAML 'optim' mapping keeps it",
    )
    model_config: dict[str, Any] = option(factory=dict, help="the student's ('nar' registry model) config overrides")
    paths: str = option(
        "teacher_greedy",
        "paths the student learns along: the teacher's greedy pages, teacher samples (redrawn every minibatch) "
        "or the logged lists (logged items by realised gain; graded lists by label)",
        choices=PATHS,
    )
    sample_temperature: float = option(1.0, "teacher_sample: temperature of the teacher's sampling")
    soft: bool = option(True, "False = hard labels only on the teacher's paths (the 'nar_direct' ablation)")
    tau: float = option(1.0, "distillation temperature of q_t and p_t (the KL term is scaled by tau^2)")
    teacher_tau: float | None = option(
        0.3,
        "temperature of the teacher's q_t when it should differ from the student's tau (null = tau, method.md's "
        "exact form); below tau it sharpens the targets, imposing the unimodal concentration the method assumes",
    )
    alpha: float = option(2.0, "weight of the hard cross-entropy on the path item y_t beside the KL term")
    position_weights: str = option(
        "uniform", "weights w_t over positions: uniform or dcg (1/log2(t+1)), both summing to 1", choices=("uniform", "dcg")
    )
    kd_mask: str = option(
        "none",
        "student rows p_t in the KD loss: 'none' (over all candidates; the student must learn which items the "
        "teacher placed before t) or 'prefix' (the teacher prefix masked out, as decoding does)",
        choices=("none", "prefix"),
    )
    unlikelihood: float = option(
        4.0, "weight of -log(1 - p_t[i]) on the items of unlikelihood_items, p_t the unmasked row (any kd_mask)"
    )
    unlikelihood_items: str = option(
        "page",
        "items the unlikelihood term pushes down in row t: 'prefix' (placed by the teacher before t) or 'page' "
        "(every item of the teacher's page but y_t, so a row cannot peak on a later position's item either)",
        choices=("prefix", "page"),
    )
    supervised_weight: float = option(0.0, "weight of the student's own MLE on the logged targets (0 = off)")
    select_by: str = option(
        "ptar_minus_collapse",
        "validation score that picks the best epoch (and drives early stopping): 'utility' (normalized utility "
        "where a world exists, else NDCG@10, as `train`), 'ptar' (agreement with the teacher's greedy pages) or "
        "'ptar_minus_collapse' (PTAR minus the collapse rate: both swing from epoch to epoch, often in opposite "
        "directions, and picking by PTAR alone tends to keep a collapsed epoch)",
        choices=("utility", "ptar", "ptar_minus_collapse"),
    )


def _check_config(cfg: DistillConfig) -> None:
    if not (cfg.tau > 0 and math.isfinite(cfg.tau)):
        raise ConfigError(f"tau: must be a finite number > 0, got {cfg.tau}")
    if not (cfg.sample_temperature > 0 and math.isfinite(cfg.sample_temperature)):
        raise ConfigError(f"sample_temperature: must be a finite number > 0, got {cfg.sample_temperature}")
    if cfg.teacher_tau is not None and not (cfg.teacher_tau > 0 and math.isfinite(cfg.teacher_tau)):
        raise ConfigError(f"teacher_tau: must be a finite number > 0 (or null), got {cfg.teacher_tau}")
    for name in ("alpha", "unlikelihood", "supervised_weight"):
        value = getattr(cfg, name)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{name}: must be a finite number >= 0, got {value}")


def _q_tau(cfg: DistillConfig) -> float:
    return cfg.tau if cfg.teacher_tau is None else cfg.teacher_tau


# ---------------------------------------------------------------------------- teacher
def load_teacher(teacher_dir: Path, train: RerankBatch, L: int) -> ARTeacher:
    """The frozen AR teacher saved in `teacher_dir` (a checkpoint, or a run directory
    holding `checkpoint/`), checked against the data's feature widths and page length."""
    d = Path(teacher_dir)
    try:
        teacher = load_checkpoint_of_kind(d, ("ar",), "an autoregressive teacher (teacher, seq2slate)")
    except CheckpointError as exc:
        raise CheckpointError(f"--teacher: {exc}") from None
    enc = teacher.config.encoder
    if (enc.candidate_dim, enc.context_dim) != (train.candidate_dim, train.context_dim):
        raise ConfigError(
            f"--teacher {d}: trained on features of width {enc.candidate_dim} (context {enc.context_dim}), "
            f"the data has {train.candidate_dim} (context {train.context_dim})"
        )
    if teacher.config.max_length < L:
        raise ConfigError(f"--teacher {d}: max_length {teacher.config.max_length} < page length {L}")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_paths(
    teacher: ARTeacher | None,
    batch: RerankBatch,
    L: int,
    kind: str,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paths `[B, L]` and their left-aligned masks `[B, L]`; requests shorter than L get
    paths of `min(n_valid, L)` (logged paths: as long as the logged page)."""
    if kind == "logged":
        t = logged_targets(batch, L, reward_weighted=False)
        pad = L - t.pages.shape[1]
        return (torch.nn.functional.pad(t.pages, (0, pad)), torch.nn.functional.pad(t.mask, (0, pad), value=False))
    if teacher is None:
        raise ConfigError(f"paths: {kind!r} needs a teacher")
    if kind == "teacher_greedy":
        return rerank_all(teacher.rerank, batch, L, chunk=_CHUNK)
    if kind == "teacher_sample":
        return rerank_all(lambda b, k: teacher.sample(b, k, 1, temperature, generator)[:, 0], batch, L, chunk=_CHUNK)
    raise ConfigError(f"paths: {kind!r} is not one of {list(PATHS)}")


@torch.no_grad()
def teacher_step_probs(
    teacher: ARTeacher, batch: RerankBatch, path: torch.Tensor, path_mask: torch.Tensor, tau: float
) -> torch.Tensor:
    """`q [B, L, n]` along `path`: the teacher's `softmax(s_t / tau)` over the free valid
    candidates; 0 on padding and the prefix, all-zero rows at False `path_mask`."""
    out = []
    for s in range(0, batch.batch_size, _CHUNK):
        idx = torch.arange(s, min(s + _CHUNK, batch.batch_size))
        out.append(teacher.step_distributions(batch.select(idx), path[idx], tau, path_mask[idx]))
    return torch.cat(out) if out else torch.zeros(0, path.shape[1], batch.num_candidates)


# ---------------------------------------------------------------------------- objective
def skd_loss(
    cfg: DistillConfig,
    student_logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    path: torch.Tensor,
    path_mask: torch.Tensor,
    teacher_probs: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The distillation part of the student's loss (see the module docstring).

    Args:
        student_logits: `[B, L, n]` the student's Z (-inf at padding).
        candidate_mask: `[B, n]`; path, path_mask: `[B, L]` (left-aligned mask).
        teacher_probs: `[B, L, n]` q along `path` at `cfg.teacher_tau` (or `cfg.tau` when that is None;
            unused when `cfg.soft` is False).

    Returns:
        (loss, logs) with `kd_loss` the position-weighted `KL(q || p)` (before tau^2; 0.0
        when `soft` is False), `kd_ce`, `kd_unlikelihood`, or `hard_ce` for `soft: false`.
    """
    n = student_logits.shape[-1]
    # Rows of absent positions carry no loss; zeroing them keeps a row that is -inf
    # everywhere (possible for a short request) out of every softmax.
    student_logits = student_logits.masked_fill(~path_mask.unsqueeze(-1), 0.0)
    if not cfg.soft:
        # As the plain `nar` model trains: likelihood of the path under sequential masking.
        masked = student_logits.masked_fill(placed_before(path.clamp(0, n - 1), n, path_mask), float("-inf"))
        loss = mle_loss(masked, path, path_mask)
        return loss, {"kd_loss": 0.0, "hard_ce": float(loss.detach())}
    if teacher_probs is None:
        raise ValueError("skd_loss: soft distillation needs the teacher's step distributions")
    w = position_weights(student_logits.shape[1], cfg.position_weights)
    prefix_mode = cfg.kd_mask == "prefix"
    loss, parts = kd_loss(
        teacher_probs,
        student_logits,
        candidate_mask,
        path,
        cfg.tau,
        cfg.alpha,
        w,
        cfg.kd_mask,
        0.0 if prefix_mode else cfg.unlikelihood,
        path_mask,
        cfg.unlikelihood_items,
    )
    if prefix_mode and cfg.unlikelihood > 0:
        # The prefix-masked KD never sees the unmasked rows, where collapse lives; the
        # unlikelihood term on the teacher prefix is taken over the unmasked rows instead
        # (kd_loss with an all-zero q and alpha 0 is that term alone).
        ul, ul_parts = kd_loss(
            torch.zeros_like(teacher_probs),
            student_logits,
            candidate_mask,
            path,
            cfg.tau,
            0.0,
            w,
            "none",
            cfg.unlikelihood,
            path_mask,
            cfg.unlikelihood_items,
        )
        loss = loss + ul
        parts["unlikelihood"] = ul_parts["unlikelihood"]
    return loss, {"kd_loss": float(parts["kl"]), "kd_ce": float(parts["ce"]), "kd_unlikelihood": float(parts["unlikelihood"])}


def _student_logits(model: nn.Module, batch: RerankBatch, L: int) -> torch.Tensor:
    return model(batch.candidates, batch.context, batch.candidate_mask, L)


def distill_objective(cfg: DistillConfig, teacher: ARTeacher | None, L: int) -> Objective:
    """`fit` objective: SKD along precomputed paths (extras `path`, `path_mask`, `q`) or
    along fresh teacher samples per minibatch, plus the optional supervised term."""

    def objective(model: nn.Module, batch: RerankBatch, extras: Extras, gen: torch.Generator):
        if cfg.paths == "teacher_sample":
            path, pmask = teacher_paths(teacher, batch, L, "teacher_sample", gen, cfg.sample_temperature)
            assert teacher is not None  # teacher_paths raised without one
            q = teacher_step_probs(teacher, batch, path, pmask, _q_tau(cfg)) if cfg.soft else None
        else:
            path, pmask, q = extras["path"], extras["path_mask"], extras.get("q")
        z = _student_logits(model, batch, L)
        loss, logs = skd_loss(cfg, z, batch.candidate_mask, path, pmask, q)
        if cfg.supervised_weight > 0:
            target, tmask = extras["sup_target"], extras["sup_mask"]
            masked = z.masked_fill(placed_before(target.clamp(0, z.shape[-1] - 1), z.shape[-1], tmask), float("-inf"))
            sup = mle_loss(masked, target, tmask, extras["sup_weight"])
            loss = loss + cfg.supervised_weight * sup
            logs["supervised"] = float(sup.detach())
        return loss, logs

    return objective


def distill_extras(cfg: DistillConfig, teacher: ARTeacher | None, train: RerankBatch, L: int) -> Extras:
    """Per-request tensors computed once before training (teacher paths and q, logged targets)."""
    extras: Extras = {}
    if cfg.paths != "teacher_sample":
        path, pmask = teacher_paths(teacher, train, L, cfg.paths)
        extras.update(path=path, path_mask=pmask)
        if cfg.soft:
            if teacher is None:
                raise ConfigError("soft: distillation needs a teacher")
            extras["q"] = teacher_step_probs(teacher, train, path, pmask, _q_tau(cfg))
    if cfg.supervised_weight > 0:
        t = logged_targets(train, L, reward_weighted=True)
        pad = L - t.pages.shape[1]
        extras.update(
            sup_target=torch.nn.functional.pad(t.pages, (0, pad)),
            sup_mask=torch.nn.functional.pad(t.mask, (0, pad), value=False),
            sup_weight=t.weights,
        )
    return extras


# ---------------------------------------------------------------------------- agreement
@dataclass
class TeacherReference:
    """The teacher's greedy pages and step distributions (tau = 1) of a batch, per length
    group `min(n_valid, L)`: computed once, compared against every epoch's student."""

    groups: list[tuple[int, torch.Tensor]]
    pages: list[torch.Tensor]  # per group [b, length]
    probs: list[torch.Tensor]  # per group [b, length, n]


@torch.no_grad()
def teacher_reference(teacher: ARTeacher, batch: RerankBatch, L: int) -> TeacherReference:
    """Greedy pages and q_t of `teacher` on `batch` (see `TeacherReference`)."""
    eff = batch.num_valid.clamp(max=L)
    groups, pages, probs = [], [], []
    for length in torch.unique(eff).tolist():
        idx = (eff == length).nonzero().flatten()
        for s in range(0, len(idx), _CHUNK):
            part = idx[s : s + _CHUNK]
            sub = batch.select(part)
            page = teacher.rerank(sub, int(length))
            groups.append((int(length), part))
            pages.append(page)
            probs.append(teacher.step_distributions(sub, page))
    return TeacherReference(groups, pages, probs)


@torch.no_grad()
def reference_agreement(student: Any, ref: TeacherReference, batch: RerankBatch) -> dict[str, float | None]:
    """`agreement_figures` against a precomputed `TeacherReference` of `batch`: the
    figures of `metrics.agreement_per_request`, averaged over requests, under its names."""
    has_logits = callable(getattr(student, "logits", None))
    acc: dict[str, list[torch.Tensor]] = {}
    for (length, idx), tpage, q in zip(ref.groups, ref.pages, ref.probs, strict=True):
        sub = batch.select(idx)
        z = student.logits(sub, length) if has_logits else None
        page = masked_greedy(z, sub.candidate_mask, validate=False) if z is not None else student.rerank(sub, length)
        figures = agreement_per_request(page, tpage, student_logits=z, candidate_mask=sub.candidate_mask, teacher_probs=q)
        for name, values in figures.items():
            acc.setdefault(name, []).append(values)
    return {name: batch_mean(torch.cat(acc[name])) if name in acc else None for name in AGREEMENT_FIGURES}


def agreement_figures(student: Any, teacher: Any, batch: RerankBatch, L: int) -> dict[str, float | None]:
    """Agreement of any reranker `student` (`.rerank(batch, k)`) with `teacher`'s greedy pages.

    Keys: "ptar" (PTAR@L), "ptar@4", "exact_page", "teacher_margin" (mean top-1 minus top-2
    teacher step probability along its greedy page) and, for models with position x item
    logits (`.logits(batch, k) [B, k, n]`), "collapse_rate", "collision_share" (share of
    positions whose unmasked argmax repeats an earlier row's: graded collapse), "mean_row_js",
    "mean_row_entropy", "certified_ptar" (the stability certificate's lower bound on
    PTAR@L), "certified_ptar@4", "certified_prefix" (mean certified leading positions) and
    "certified_step_share" (share of all steps certified, leading or not); these
    are None for models without logits. Each request is decoded at `min(n_valid, L)`.
    """
    if isinstance(teacher, nn.Module):
        teacher.eval()
    return reference_agreement(student, teacher_reference(teacher, batch, L), batch)


# ---------------------------------------------------------------------------- training
def _validator(splits: Splits, teacher: ARTeacher, L: int, select_by: str) -> Callable[[nn.Module], dict[str, float]]:
    ref = teacher_reference(teacher, splits.valid.batch, L)

    def validate(model: nn.Module) -> dict[str, float]:
        out = validation_score(model, splits.valid, L)
        for k, v in reference_agreement(model, ref, splits.valid.batch).items():
            if v is not None and math.isfinite(v):
                out[k] = v
        if select_by == "ptar":
            out["score"] = out["ptar"]
        elif select_by == "ptar_minus_collapse":
            out["score"] = out["ptar"] - out.get("collapse_rate", 0.0)
        return out

    return validate


def distill_model(
    cfg: DistillConfig,
    run_dir: Path,
    teacher_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    splits: Splits | None = None,
    report_to: str = "none",
) -> dict[str, Any]:
    """Trains the student into run_dir (config.yaml, metrics.jsonl, checkpoint/, eval.json, report.md);
    returns the test figures: everything train_model returns (utility, normalized_utility, ndcg@4, ndcg@10,
    latency_ms_p50, latency_ms_p99, params, ...) plus the agreement figures, and the teacher's
    utility / normalized utility on the same test requests (`teacher_utility`, `teacher_normalized_utility`)."""
    _check_config(cfg)
    run_dir = Path(run_dir)
    # The teacher's directory and, when it is a run's checkpoint/, that run: never written.
    reads = [Path(teacher_dir)] + ([Path(teacher_dir).parent] if Path(teacher_dir).name == "checkpoint" else [])
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, reads=reads)
    clock = PhaseClock()
    with clock("data"):
        splits = splits if splits is not None else load_splits(cfg.data)
    L = splits.page_length
    teacher = load_teacher(teacher_dir, splits.train, L)
    student = build_for_data(STUDENT, cfg.model_config, splits.train, cfg.seed)
    if student.config.max_positions < L:
        raise ConfigError(f"model_config.max_positions: {student.config.max_positions} < page length {L}")
    dump_config(cfg, run_dir / "config.yaml")
    with clock("teacher_paths"):
        extras = distill_extras(cfg, teacher, splits.train, L)

    def save(model: nn.Module, directory: Path, extra: dict) -> None:
        save_checkpoint(model, directory, STUDENT, extra={**extra, "distilled_from": str(teacher_dir)})

    with clock("student"):
        fit(
            student,
            splits.train,
            extras,
            distill_objective(cfg, teacher, L),
            _validator(splits, teacher, L, cfg.select_by),
            save,
            cfg.optim,
            run_dir,
            cfg.seed,
            resume=resume,
            progress=progress,
            phase="student",
            report_to=report_to,
        )
    best = load_checkpoint(run_dir / "checkpoint")
    with clock("test"):
        figures = evaluate(best.rerank, splits.test, L)
    figures["params"] = sum(p.numel() for p in best.parameters())
    figures.update(agreement_figures(best, teacher, splits.test.batch, L))
    teacher_figures = evaluate(teacher.rerank, splits.test, L, timing=False)
    result = {
        "model": "student_skd" if cfg.soft else "nar_direct",
        "split": "test",
        "page_length": L,
        "teacher": str(teacher_dir),
        **figures,
        "teacher_utility": teacher_figures.get("utility"),
        "teacher_normalized_utility": teacher_figures.get("normalized_utility"),
        "teacher_ndcg@10": teacher_figures.get("ndcg@10"),
        **clock.figures(),
    }
    write_json(run_dir / "eval.json", result)
    from dualrerank.report import write_run_report

    write_run_report(run_dir, title=f"SKD student ({'soft' if cfg.soft else 'hard paths only'}) on {cfg.data.source}")
    return result
