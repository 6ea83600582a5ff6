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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from dualrerank.config import option
from dualrerank.errors import CheckpointError
from dualrerank.files import atomic_write
from dualrerank.schema import RerankBatch

Extras = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, RerankBatch, Extras, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
Validate = Callable[[nn.Module], dict[str, float]]
SaveBest = Callable[[nn.Module, Path, dict[str, Any]], None]


@dataclass
class OptimConfig:
    epochs: int = option(20, "maximum passes over the training requests")
    batch_size: int = option(128, "requests per gradient step")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    patience: int = option(3, "stop after this many epochs without a better validation score")
    lr_schedule: str = option(
        "constant", "learning rate over training: constant, or cosine decay from lr to 0 over `epochs`",
        choices=("constant", "cosine"),
    )


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


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
) -> dict[str, Any]:
    """Train `model` in place; returns {"best_score", "best_epoch", "epochs_run", "stopped_early"}.

    With `resume=True`, `run_dir/last.pt` restores the model, optimizer, RNG and loop state
    and training continues with the next epoch; `metrics.jsonl` keeps growing.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(train.batch_size / optim.batch_size))
    total_steps = max(1, optim.epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        (lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        if optim.lr_schedule == "cosine" else (lambda step: 1.0),
    )
    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0}
    last = run_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise CheckpointError(f"cannot resume: {last} not found (was the run started in this directory?)")
        try:
            saved = torch.load(last, weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if "schedule" in saved:
                schedule.load_state_dict(saved["schedule"])
            gen.set_state(saved["generator"])
            state = saved["loop"]
        except (RuntimeError, KeyError, EOFError, OSError) as exc:
            raise CheckpointError(f"cannot resume from {last}: {str(exc).splitlines()[0]}") from None
    metrics_path = run_dir / "metrics.jsonl"
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
        bar = tqdm(starts, desc=f"epoch {epoch}/{optim.epochs}", disable=not progress, leave=False, unit="step")
        total, count, t0 = 0.0, 0, time.perf_counter()
        extra: dict[str, float] = {}
        for s in bar:
            idx = order[s : s + optim.batch_size]
            mb = train.select(idx)
            loss, logs = objective(model, mb, {k: v[idx] for k, v in extras.items()}, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            schedule.step()
            total += float(loss.detach()) * mb.batch_size
            count += mb.batch_size
            for key, value in logs.items():
                extra[key] = extra.get(key, 0.0) + float(value) * mb.batch_size
            bar.set_postfix(loss=f"{total / count:.4f}")
        model.eval()
        with torch.no_grad():
            val = validate(model)
        record = {"epoch": epoch, "train_loss": total / max(count, 1), **{f"train_{k}": v / max(count, 1) for k, v in extra.items()}}
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
        _append_jsonl(metrics_path, record)
        if progress:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in val.items())
            tqdm.write(f"epoch {epoch}: train_loss={record['train_loss']:.4f} {shown}{' *' if improved else ''}", file=sys.stderr)
        snapshot = {"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
                    "generator": gen.get_state(), "loop": state}
        atomic_write(last, lambda tmp: torch.save(snapshot, tmp))
    return {
        "best_score": state["best_score"],
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "stopped_early": stopped_early or state["bad_epochs"] >= optim.patience,
    }
