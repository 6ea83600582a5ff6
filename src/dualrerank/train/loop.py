"""A small, model-agnostic training loop: minibatches, validation each epoch, early
stopping, an atomic best checkpoint, `metrics.jsonl`, and resumption.

The loop knows nothing about which model it trains: it receives a loss function
`objective(model, batch, extras, generator) -> (loss, logs)`, where `extras` holds the
minibatch's rows of per-request tensors computed before training (e.g. target pages), and
a validation function `validate(model) -> dict` whose `score` entry is maximised.

Run directory layout:
    config.yaml         the full config of the run
    metrics.jsonl       one JSON line per epoch (train loss, validation figures, time)
    checkpoint/         best model so far (safetensors + JSON), written atomically
    last.pt             model + optimizer + RNG + loop state of the last finished epoch
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dualrerank.config import option
from dualrerank.errors import CheckpointError, TrainingError
from dualrerank.models.checkpoint import check_state_fits
from dualrerank.schema import RerankBatch
from dualrerank.train.runstate import MetricsLog, load_snapshot, optimizer_step, save_snapshot

Extras = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, RerankBatch, Extras, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
Validate = Callable[[nn.Module], dict[str, float]]
SaveBest = Callable[[nn.Module, Path, dict[str, Any]], None]


@dataclass
class OptimConfig:
    epochs: int = option(20, "maximum passes over the training requests", ge=1)
    batch_size: int = option(128, "requests per gradient step", ge=1)
    lr: float = option(1e-3, "AdamW learning rate", gt=0)
    weight_decay: float = option(1e-4, "AdamW weight decay", ge=0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", ge=0)
    patience: int = option(3, "stop after this many epochs without a better validation score", ge=1)
    lr_schedule: str = option(
        "constant",
        "learning rate over training: constant, or cosine decay from lr to 0 over `epochs`",
        choices=("constant", "cosine"),
    )


def _snapshot(
    last: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    schedule: Any,
    gen: torch.Generator,
    state: dict[str, Any],
    log: MetricsLog,
) -> None:
    # The loop state goes as JSON text (best_score may be -inf, which JSON-in-a-string keeps)
    # and the metrics log's length with it: resuming truncates the log to this length.
    save_snapshot(
        last,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": schedule.state_dict(),
            "generator": gen.get_state(),
            "loop": json.dumps(state),
            "metrics_bytes": log.size(),
        },
    )


def phase_finished(run_dir: Path) -> bool:
    """Whether the `fit` in `run_dir` ran to its end (so a resume can skip it)."""
    last = Path(run_dir) / "last.pt"
    return last.is_file() and bool(json.loads(load_snapshot(last).get("loop", "{}")).get("finished", False))


def fit(
    model: nn.Module,
    train: RerankBatch,
    extras: Extras,
    objective: Objective,
    validate: Validate,
    save_best: SaveBest,
    optim: OptimConfig,
    run_dir: Path,
    seed: int,
    resume: bool = False,
    progress: bool = True,
    phase: str = "train",
    report_to: str = "none",
) -> dict[str, Any]:
    """Train `model` in place (`phase` names it in progress lines).

    Returns {"best_score", "best_epoch", "epochs_run", "stopped_early"}.

    With `resume=True`, `run_dir/last.pt` (when present: a phase killed before its first
    epoch ended starts afresh) restores the model, optimizer, schedule, RNG and loop state,
    `metrics.jsonl` is cut back to the lines that snapshot saw, and training continues with
    the next epoch. A non-finite training loss stops the run with a `TrainingError`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(train.batch_size / optim.batch_size))
    total_steps = max(1, optim.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        (lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        if optim.lr_schedule == "cosine"
        else (lambda step: 1.0),
    )
    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0, "finished": False}
    last = run_dir / "last.pt"
    log = MetricsLog(run_dir / "metrics.jsonl", report_to)
    if resume and last.is_file():
        saved = load_snapshot(last)
        try:
            check_state_fits(model, saved["model"], f"cannot resume from {last}")
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            gen.set_state(saved["generator"])
            state = {**state, **json.loads(saved["loop"])}
            state["finished"] = False  # the loop below decides again (optim.epochs may have grown)
            log.truncate(int(saved["metrics_bytes"]))
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"cannot resume from {last}: it does not match this run's model or optimizer ({first}); was config.yaml edited?"
            ) from None
    elif not resume:
        log.truncate(0)
    stopped_early = False
    B = train.batch_size
    while state["epoch"] < optim.epochs:
        if state["bad_epochs"] >= optim.patience:
            stopped_early = True
            break
        epoch = state["epoch"] + 1
        # Dropout draws from torch's default generator; reseeding it per epoch makes a
        # resumed run continue exactly as an uninterrupted one would.
        torch.manual_seed(seed * 100_003 + epoch)
        model.train()
        order = torch.randperm(B, generator=gen)
        starts = range(0, B, optim.batch_size)
        bar = tqdm(starts, desc=f"{phase} epoch {epoch}/{optim.epochs}", disable=not progress, leave=False, unit="step")
        total, count, t0 = 0.0, 0, time.perf_counter()
        extra: dict[str, float] = {}
        for step, s in enumerate(bar):
            idx = order[s : s + optim.batch_size]
            mb = train.select(idx)
            loss, logs = objective(model, mb, {k: v[idx] for k, v in extras.items()}, gen)
            if not bool(torch.isfinite(loss.detach())):
                raise TrainingError(
                    f"training diverged: loss is {float(loss.detach())} at epoch {epoch}, step {step + 1} "
                    f"(lr {optim.lr:g}); lower optim.lr or check the features for huge values "
                    f"(the last finished epoch is kept in {run_dir})"
                )
            optimizer_step(model, opt, loss, optim.grad_clip)
            schedule.step()
            total += float(loss.detach()) * mb.batch_size
            count += mb.batch_size
            for key, value in logs.items():
                extra[key] = extra.get(key, 0.0) + float(value) * mb.batch_size
            bar.set_postfix(loss=f"{total / count:.4f}")
        model.eval()
        with torch.no_grad():
            val = validate(model)
        record = {
            "epoch": epoch,
            "train_loss": total / max(count, 1),
            **{f"train_{k}": v / max(count, 1) for k, v in extra.items()},
        }
        record.update({f"valid_{k}": v for k, v in val.items()})
        record["seconds"] = round(time.perf_counter() - t0, 3)
        improved = val["score"] > state["best_score"]
        if improved:
            state.update(best_score=val["score"], best_epoch=epoch, bad_epochs=0)
            save_best(model, run_dir / "checkpoint", {"epoch": epoch, "valid": val})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        record["best"] = improved
        log.append(record)
        if progress:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in val.items())
            tqdm.write(
                f"{phase} epoch {epoch}: train_loss={record['train_loss']:.4f} {shown}{' *' if improved else ''}", file=sys.stderr
            )
        _snapshot(last, model, opt, schedule, gen, state, log)
    if not state["finished"]:
        # A run that ends (epochs done or early stop) says so, so that a resume of a run
        # with several phases knows this phase is complete.
        state["finished"] = True
        _snapshot(last, model, opt, schedule, gen, state, log)
    return {
        "best_score": state["best_score"],
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "stopped_early": stopped_early or state["bad_epochs"] >= optim.patience,
    }
