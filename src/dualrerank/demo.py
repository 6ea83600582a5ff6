"""The demo pipeline: `dualrerank demo` (the README's first command).

Simulated world -> logged data -> AR teacher (with its list-wise evaluator) -> SKD student,
beside the NAR student without distillation and score-and-sort baselines (upstream order,
LightGBM LambdaMART) -> a short online run of LDRO against GRPO across one shift of user
preferences -> a simulated A/B test of upstream, teacher, SKD student and LDRO student ->
the student exported for serving (ONNX) -> latency of teacher vs student -> `report.md`,
`summary.json` and PNG plots.

Every stage writes into its own folder of `--out` and records its result in
`stages/<stage>.json` when it finishes; a re-run with the same `--out` (after an interrupt,
or to look again) reuses the finished stages. Sizes are in `DemoConfig`; `--fast` (the
`FAST` overrides) shrinks them so the whole demo runs in about a minute or two.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualrerank.config import dump_config, from_dict, merge_dicts, option, to_dict
from dualrerank.files import write_json

__all__ = ["DemoConfig", "FAST", "run_demo", "STAGES"]


@dataclass
class DemoConfig:
    seed: int = option(0, "seed of the world's requests, the training runs and the online stream")
    train_requests: int = option(3000, "logged requests the teacher, evaluator and students learn from", ge=1)
    valid_requests: int = option(300, "held-out requests for validation each epoch", ge=1)
    test_requests: int = option(1000, "held-out requests for the offline figures", ge=1)
    d_model: int = option(32, "hidden width of every model (teacher and student alike, so latency compares)", ge=1)
    evaluator_epochs: int = option(4, "epochs of the list-wise evaluator", ge=1)
    teacher_epochs: int = option(5, "epochs of the AR teacher", ge=1)
    distill_epochs: int = option(15, "epochs of the SKD student (and of the NAR student without KD)", ge=1)
    online_steps: int = option(120, "stream steps of each online run (LDRO and GRPO)", ge=2)
    shift_step: int = option(60, "stream step at which user preferences rotate by 45 degrees", ge=1)
    online_batch: int = option(64, "requests per online step", ge=1)
    eval_every: int = option(10, "online evaluation every this many steps", ge=1)
    ab_requests: int = option(5000, "requests of the simulated A/B test (paired: every arm sees each)", ge=1)


#: `--fast`: about a minute or two on 2 cores, for a first look.
FAST: dict[str, Any] = {
    "train_requests": 1500,
    "valid_requests": 200,
    "test_requests": 300,
    "evaluator_epochs": 3,
    "teacher_epochs": 4,
    "distill_epochs": 8,
    "online_steps": 40,
    "shift_step": 20,
    "online_batch": 32,
    "eval_every": 5,
    "ab_requests": 1000,
}


def _sizes(cfg: DemoConfig) -> dict[str, Any]:
    enc = {"d_model": cfg.d_model, "n_heads": 4 if cfg.d_model % 4 == 0 else 1, "n_layers": 2}
    return {"encoder": enc, "n_layers": 2, "n_heads": enc["n_heads"]}


def _data(cfg: DemoConfig, out: Path) -> Any:
    from dualrerank.train.splits import SplitConfig

    return SplitConfig(
        path=str(out / "world.yaml"),
        seed=cfg.seed,
        train_requests=cfg.train_requests,
        valid_requests=cfg.valid_requests,
        test_requests=cfg.test_requests,
    )


# --------------------------------------------------------------------------- stages


def _world(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    from dualrerank.sim import WorldConfig
    from dualrerank.sim.config import DriftEvent

    world = WorldConfig(drift=[DriftEvent(step=cfg.shift_step, kind="rotate_preferences", angle=45.0)])
    dump_config(world, out / "world.yaml")
    return {"world": str(out / "world.yaml"), "shift_step": cfg.shift_step}


def _teacher(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    from dualrerank.train.loop import OptimConfig
    from dualrerank.train.supervised import TrainConfig, train_model

    tcfg = TrainConfig(
        seed=cfg.seed,
        model="teacher",
        data=_data(cfg, out),
        optim=OptimConfig(epochs=cfg.teacher_epochs, lr=2e-3),
        model_config=_sizes(cfg),
        evaluator_config={"encoder": _sizes(cfg)["encoder"]},
        evaluator_optim=OptimConfig(epochs=cfg.evaluator_epochs, lr=2e-3),
    )
    return train_model(tcfg, out / "teacher", overwrite=True, progress=progress)


def _baselines(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    from dualrerank.train.loop import OptimConfig
    from dualrerank.train.supervised import TrainConfig, train_model

    rows = {}
    variants: tuple[tuple[str, dict[str, Any]], ...] = (("upstream", {}), ("lambdamart", {"model_config": {"num_threads": 1}}))
    for name, extra in variants:
        tcfg = TrainConfig(seed=cfg.seed, model=name, data=_data(cfg, out), **extra)
        rows[name] = train_model(tcfg, out / name, overwrite=True, progress=progress)
    # The NAR student without distillation: the same network trained on the logged targets.
    tcfg = TrainConfig(
        seed=cfg.seed,
        model="nar",
        data=_data(cfg, out),
        model_config=_sizes(cfg),
        optim=OptimConfig(epochs=cfg.distill_epochs, lr=2e-3, patience=cfg.distill_epochs),
    )
    tcfg = dataclasses.replace(tcfg, objective=dataclasses.replace(tcfg.objective, target="logged"))
    rows["nar_no_kd"] = train_model(tcfg, out / "nar_no_kd", overwrite=True, progress=progress)
    return rows


def _student(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    from dualrerank.train.distill import DistillConfig, distill_model
    from dualrerank.train.loop import OptimConfig

    dcfg = DistillConfig(
        seed=cfg.seed,
        data=_data(cfg, out),
        model_config=_sizes(cfg),
        optim=OptimConfig(epochs=cfg.distill_epochs, patience=cfg.distill_epochs, lr=1e-3),
    )
    return distill_model(dcfg, out / "student", out / "teacher", overwrite=True, progress=progress)


def _online(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    from dualrerank.train.online import OnlineConfig, run_online

    results = {}
    for method in ("ldro", "grpo"):
        ocfg = OnlineConfig(
            seed=cfg.seed,
            world=str(out / "world.yaml"),
            method=method,
            steps=cfg.online_steps,
            batch_size=cfg.online_batch,
            lr=1e-3,
            eval_every=cfg.eval_every,
            eval_requests=200,
            checkpoint_every=cfg.online_steps,
        )
        results[method] = run_online(ocfg, out / "online" / method, out / "student", overwrite=True, progress=progress)
    return results


def _ab(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    from dualrerank.train import abtest

    arms = {
        "upstream": "upstream",
        "teacher": str(out / "teacher"),
        "student": str(out / "student"),
        "ldro_student": str(out / "online" / "ldro" / "student"),
    }
    return abtest.run_demo_ab(
        arms, out / "ab", requests=cfg.ab_requests, world=str(out / "world.yaml"), seed=cfg.seed, progress=progress
    )


def _serve(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    from dualrerank.models.checkpoint import load_checkpoint
    from dualrerank.serve.bundle import save_serving_bundle

    student = load_checkpoint(out / "student" / "checkpoint")
    evaluator = load_checkpoint(out / "teacher" / "evaluator" / "checkpoint")
    root = save_serving_bundle(out / "serve", student, evaluator, onnx=True)
    return {"checkpoint": str(root), "onnx": str(root / "student.onnx")}


#: (name, what it does, function). Order matters: each stage reads what the ones above wrote.
STAGES: list[tuple[str, str, Callable[[DemoConfig, Path, bool], dict[str, Any]]]] = [
    ("world", "the simulated world with one preference shift", _world),
    ("teacher", "evaluator, evaluator targets and AR teacher", _teacher),
    ("student", "SKD student distilled from the teacher", _student),
    ("baselines", "upstream order, LightGBM LambdaMART, NAR student without KD", _baselines),
    ("online", "LDRO and GRPO online across the shift", _online),
    ("ab", "simulated A/B test: upstream, teacher, student, LDRO student", _ab),
    ("serve", "student exported for serving (ONNX) with its evaluator", _serve),
]


def run_demo(cfg: DemoConfig, out: Path, *, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or reuse) every stage into `out`, then write the report; returns summary.json's content."""
    from dualrerank.report import write_demo_report

    out = Path(out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    saved = out / "demo_config.yaml"
    if saved.is_file():
        from dualrerank.config import load_config
        from dualrerank.errors import ConfigError

        if to_dict(load_config(DemoConfig, saved)) != to_dict(cfg):
            raise ConfigError(
                f"--out {out} holds a demo run with other settings ({saved}); use another --out, or the "
                "same settings (and --fast) as that run"
            )
    dump_config(cfg, saved)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for i, (name, what, fn) in enumerate(STAGES, start=1):
        marker = out / "stages" / f"{name}.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            results[name], seconds[name] = record["result"], record["seconds"]
            say(f"[{i}/{len(STAGES)}] {name}: reused ({what}; {record['seconds']:.0f} s when it ran)")
            continue
        say(f"[{i}/{len(STAGES)}] {name}: {what} ...")
        t0 = time.perf_counter()
        result = fn(cfg, out, progress)
        seconds[name] = round(time.perf_counter() - t0, 1)
        results[name] = result
        write_json(marker, {"result": result, "seconds": seconds[name]}, default=str)
        say(f"[{i}/{len(STAGES)}] {name}: done in {seconds[name]:.0f} s")
    return write_demo_report(out, results, seconds, config=to_dict(cfg))


def demo_config(fast: bool, overrides: dict[str, Any] | None = None) -> DemoConfig:
    """The default (or `--fast`) config with a YAML's keys on top."""
    base = to_dict(DemoConfig())
    if fast:
        base = merge_dicts(base, FAST)
    return from_dict(DemoConfig, merge_dicts(base, overrides or {}), where="demo")
