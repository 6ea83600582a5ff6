"""Supervised training of any registered model: `dualrerank train`.

One function, `train_model`, takes a `TrainConfig` and a run directory and:
1. loads the splits (`train.splits`), builds the model from the registry with the data's
   feature widths and fits its feature normaliser on the training requests;
2. for list generators (AR teacher, Seq2Slate, the NAR student without a teacher) builds
   the target pages: 'logged' (`train.targets`) or 'evaluator' (beam search over a
   list-wise evaluator, trained first in `RUN/evaluator/` unless one is given);
3. trains with `train.loop.fit` (validation each epoch: normalized utility where a world
   scores pages, else NDCG@10, else the model's own validation loss), keeping the best;
4. evaluates the best model on the test split and writes `eval.json` and `report.md`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dualrerank.config import dump_config, option
from dualrerank.decoding import placed_before
from dualrerank.files import write_json
from dualrerank.models.checkpoint import load_checkpoint, save_checkpoint
from dualrerank.models.registry import config_from_dict, get_spec, set_data_dims
from dualrerank.schema import RerankBatch
from dualrerank.train.evaluation import EvalSplit, evaluate
from dualrerank.train.loop import Objective, OptimConfig, fit, phase_finished
from dualrerank.train.objectives import (
    GeneratorObjectiveConfig,
    generator_extras,
    generator_objective,
    own_loss_objective,
)
from dualrerank.train.runstate import PhaseClock, load_snapshot, prepare_run_dir, save_snapshot
from dualrerank.train.splits import SplitConfig, Splits, load_splits
from dualrerank.train.targets import Targets, logged_targets


@dataclass
class TrainConfig:
    seed: int = option(0, "seed of model initialisation and minibatch order")
    model: str = option(
        "teacher", "registered model name (teacher, seq2slate, nar, evaluator, dnn, prm, lambdamart, catboost, upstream)"
    )
    data: SplitConfig = option(factory=SplitConfig, help="data source and splits")
    optim: OptimConfig = option(factory=OptimConfig, help="optimiser and early stopping")
    objective: GeneratorObjectiveConfig = option(factory=GeneratorObjectiveConfig, help="list-generator objective and targets")
    model_config: dict[str, Any] = option(factory=dict, help="the model's own config (keys of its config dataclass)")
    evaluator_config: dict[str, Any] = option(factory=dict, help="config of the evaluator trained for 'evaluator' targets")
    evaluator_optim: OptimConfig = option(factory=lambda: OptimConfig(epochs=8), help="optimiser of that evaluator")


def _model_config(name: str, overrides: dict[str, Any], batch: RerankBatch) -> Any:
    cfg = config_from_dict(name, overrides)
    return set_data_dims(cfg, batch.candidate_dim, batch.context_dim)


def build_for_data(name: str, overrides: dict[str, Any], train: RerankBatch, seed: int) -> Any:
    """Model `name` sized for `train`'s features, with its normaliser fitted on `train`.
    A model whose config has its own `seed` (the tree rankers) gets the run's seed unless
    `overrides` sets one."""
    torch.manual_seed(seed)  # layer init draws from the default generator; seed it per run
    spec = get_spec(name)
    cfg = _model_config(name, overrides, train)
    if "seed" not in overrides and any(f.name == "seed" for f in dataclasses.fields(cfg)):
        cfg = dataclasses.replace(cfg, seed=seed)
    model = spec.model_class(cfg)
    if hasattr(model, "fit_normalizer"):
        model.fit_normalizer(train)
    return model


def validation_score(model: Any, split: EvalSplit, L: int) -> dict[str, float]:
    """Figures on the validation split; `score` (maximised) is normalized utility where a
    world exists, else NDCG@10, else minus the model's validation loss."""
    if get_spec_kind(model) == "evaluator":
        with torch.no_grad():
            loss = float(model.loss(split.batch))
        return {"score": -loss, "loss": loss}
    figures = evaluate(model.rerank, split, L, timing=False)
    out = {k: v for k, v in figures.items() if v is not None}
    out["score"] = out.get("normalized_utility", out.get("ndcg@10", float("nan")))
    return out


def get_spec_kind(model: Any) -> str:
    from dualrerank.models.evaluator import ListEvaluator

    return "evaluator" if isinstance(model, ListEvaluator) else "other"


def step_logits_fn(kind: str) -> Callable[[nn.Module, RerankBatch, torch.Tensor, torch.Tensor], torch.Tensor]:
    def ar(model: nn.Module, batch: RerankBatch, target: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
        return cast(Any, model).step_logits(batch, target, tmask)  # nn.Module does not declare it; the teacher defines it

    def nar(model: nn.Module, batch: RerankBatch, target: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
        z = model(batch.candidates, batch.context, batch.candidate_mask, target.shape[1])
        return z.masked_fill(placed_before(target, z.shape[-1], tmask), float("-inf"))

    return {"ar": ar, "nar": nar}[kind]


def evaluator_targets(evaluator: Any, batch: RerankBatch, L: int, width: int, chunk: int = 512, progress: bool = True) -> Targets:
    """Beam-search pages over `evaluator` for every request (requests shorter than L get
    their full list), as generator targets."""
    from tqdm import tqdm

    from dualrerank.train.evaluation import rerank_all

    evaluator.eval()
    bar = tqdm(total=batch.batch_size, desc="evaluator targets", unit="req", disable=not progress, leave=False)

    def beam(sub: RerankBatch, length: int) -> torch.Tensor:
        pages = evaluator.beam_pages(sub, length, width)
        bar.update(sub.batch_size)
        return pages

    pages, mask = rerank_all(beam, batch, L, chunk=chunk)
    bar.close()
    return Targets(pages, mask, torch.ones(batch.batch_size))


def _save(name: str) -> Callable[[Any, Path, dict], None]:
    def save(model: Any, directory: Path, extra: dict) -> None:
        save_checkpoint(model, directory, name, extra=extra)

    return save


def _train_evaluator(
    cfg: TrainConfig, splits: Splits, run_dir: Path, progress: bool, resume: bool, report_to: str = "none"
) -> Any:
    """The evaluator phase of a run with 'evaluator' targets, in `RUN/evaluator/`; a resume
    continues it where it stopped, or skips it when it had finished."""
    ev_dir = run_dir / "evaluator"
    if resume and phase_finished(ev_dir) and (ev_dir / "checkpoint").is_dir():
        return load_checkpoint(ev_dir / "checkpoint")
    model = build_for_data("evaluator", cfg.evaluator_config, splits.train, cfg.seed)
    ev_cfg = dataclasses.replace(cfg, model="evaluator", model_config=cfg.evaluator_config)
    dump_config(ev_cfg, ev_dir / "config.yaml")
    fit(
        model,
        splits.train,
        {},
        own_loss_objective,
        lambda m: validation_score(m, splits.valid, splits.page_length),
        _save("evaluator"),
        cfg.evaluator_optim,
        ev_dir,
        cfg.seed,
        resume=resume,
        progress=progress,
        phase="evaluator",
        report_to=report_to,
    )
    return load_checkpoint(ev_dir / "checkpoint")


def _cached_targets(path: Path, resume: bool, build: Callable[[], Targets]) -> Targets:
    """Targets built once per run: a resume reuses the ones a killed run had finished."""
    if resume and path.is_file():
        saved = load_snapshot(path)
        return Targets(saved["pages"], saved["mask"], saved["weights"])
    targets = build()
    save_snapshot(path, {"pages": targets.pages, "mask": targets.mask, "weights": targets.weights})
    return targets


def train_model(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    evaluator_dir: Path | None = None,
    progress: bool = True,
    splits: Splits | None = None,
    report_to: str = "none",
) -> dict[str, Any]:
    """Train `cfg.model` into `run_dir` (see the module docstring); returns the test figures.

    A directory that already holds a run is refused unless `resume` (continue it from the
    phase that was running: evaluator, evaluator targets, model) or `overwrite` (start over).
    """
    spec = get_spec(cfg.model)
    run_dir = Path(run_dir)
    reads = [Path(evaluator_dir)] if evaluator_dir is not None else []
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, reads=reads)
    dump_config(cfg, run_dir / "config.yaml")
    clock = PhaseClock()
    with clock("data"):
        splits = splits if splits is not None else load_splits(cfg.data)
    L = splits.page_length
    model = build_for_data(cfg.model, cfg.model_config, splits.train, cfg.seed)
    objective_cfg = dataclasses.replace(cfg.objective, **dict(spec.objective_defaults))

    if spec.kind == "tree":
        with clock(cfg.model):
            info = model.fit(splits.train, splits.valid.batch, progress=progress)
        save_checkpoint(model, run_dir / "checkpoint", cfg.model, extra={"fit": info})
    elif spec.kind == "scorer" and not any(p.requires_grad for p in model.parameters()):
        save_checkpoint(model, run_dir / "checkpoint", cfg.model, extra={})
    else:
        extras: dict[str, torch.Tensor] = {}
        objective: Objective = own_loss_objective
        if spec.kind in ("ar", "nar"):
            if objective_cfg.target == "evaluator":
                with clock("evaluator"):
                    evaluator = (
                        load_checkpoint(evaluator_dir)
                        if evaluator_dir is not None
                        else _train_evaluator(cfg, splits, run_dir, progress, resume, report_to)
                    )
                with clock("evaluator_targets"):
                    targets = _cached_targets(
                        run_dir / "targets.pt",
                        resume,
                        lambda: evaluator_targets(evaluator, splits.train, L, objective_cfg.evaluator_beam, progress=progress),
                    )
            else:
                targets = logged_targets(splits.train, L, objective_cfg.reward_weighted)
            extras = generator_extras(splits.train, targets)
            objective = generator_objective(objective_cfg, step_logits_fn(spec.kind))
        with clock(cfg.model):
            fit(
                model,
                splits.train,
                extras,
                objective,
                lambda m: validation_score(m, splits.valid, L),
                _save(cfg.model),
                cfg.optim,
                run_dir,
                cfg.seed,
                resume=resume,
                progress=progress,
                phase=cfg.model,
                report_to=report_to,
            )
    best = load_checkpoint(run_dir / "checkpoint")
    if isinstance(best, nn.Module):
        best.eval()
    with clock("test"):
        figures = evaluate(best.rerank, splits.test, L)
    figures["params"] = sum(p.numel() for p in best.parameters()) if isinstance(best, nn.Module) else None
    result = {"model": cfg.model, "split": "test", "page_length": L, **figures, **clock.figures()}
    write_json(run_dir / "eval.json", result)
    from dualrerank.report import write_run_report

    if (run_dir / "metrics.jsonl").is_file():
        write_run_report(run_dir, title=f"{cfg.model} on {cfg.data.source}")
    return result


__all__ = ["TrainConfig", "train_model", "build_for_data", "evaluator_targets", "validation_score"]
