"""The online experiment: every method on the same streams, several seeds
(`dualrerank experiment online`, docs/online.md).

Each stream is the base world plus a drift schedule (what users do) and a reward-weight
schedule (what the team asks for); every (method, stream, seed) is one `run_online` from
the same distillation run. Figures per method and stream, mean and std over seeds, from
the evaluation points (`eval/normalized_utility` every `eval_every` steps):

- `final_normalized_utility`: mean of the last `final_window` evaluations;
- `auc_normalized_utility`: mean over all evaluations (the area under the curve divided by
  its length, so streams of any length compare);
- `steps_to_90pct`: first evaluated step at which the curve has covered 90% of its way from
  its first evaluation to its final level (null when it never does or does not rise);
- `recovery_steps`: per shift, steps after the shift until the curve is back to 90% of its
  level just before the shift (mean of the last two evaluations before it; null: never;
  the first evaluation after the shift counts as recovered when the shift cost less than
  10%).

[ours] Streams named in issue 10: `0` no shift; `A` watch time reported in ms instead of s
(weights unchanged), later a preference rotation; `B` the team raises one dimension's
weight x10 (the world's utility weight and the reward weight together), later redundancy
doubles; `C` the upstream score goes stale while user preferences rotate. Their configs
live in `configs/online_experiment.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualrerank.config import dump_config, load_config, option, to_dict
from dualrerank.errors import ConfigError
from dualrerank.sim import WorldConfig
from dualrerank.sim.config import DriftEvent
from dualrerank.train.online import METHODS, OnlineConfig, WeightChange, run_online
from dualrerank.train.runstate import MetricsLog

__all__ = ["StreamConfig", "OnlineExperimentConfig", "run_online_experiment", "curve_figures"]


@dataclass
class StreamConfig:
    drift: list[DriftEvent] = option(factory=list, help="world drift events of this stream (added to the base world's)")
    weight_schedule: list[WeightChange] = option(factory=list, help="reward-weight changes of this stream")
    exposure: str | None = option(None, "override the exposure mode for this stream (one/all)", choices=(None, "one", "all"))


@dataclass
class OnlineExperimentConfig:
    methods: list[str] = option(factory=lambda: ["grpo", "dr_grpo", "gdpo", "ldro"], help="method presets to compare")
    seeds: list[int] = option(factory=lambda: [0, 1, 2], help="run seeds (the stream and sampling seeds)")
    streams: dict[str, StreamConfig] = option(factory=lambda: {"0": StreamConfig()}, help="streams by name")
    online: OnlineConfig = option(factory=OnlineConfig, help="the online settings shared by every run")
    lr: dict[str, float] = option(factory=dict, help="per-method learning rate (else online.lr)")
    final_window: int = option(3, "evaluations averaged into the final level", ge=1)


def _events(base: WorldConfig, stream: StreamConfig) -> list[float]:
    return sorted(
        {float(e.step) for e in list(base.drift) + list(stream.drift)}
        | {float(c.step) for c in stream.weight_schedule if c.step > 0}
    )


def curve_figures(steps: list[int], values: list[float], shifts: list[float], window: int) -> dict[str, Any]:
    """The figures of one evaluation curve (see the module docstring)."""
    pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(v)]
    if not pts:
        return {"final_normalized_utility": None, "auc_normalized_utility": None, "steps_to_90pct": None, "recovery_steps": []}
    ys = [p[1] for p in pts]
    final = statistics.fmean(ys[-window:])
    start = ys[0]
    to90 = None
    if final > start:
        goal = start + 0.9 * (final - start)
        to90 = next((x for x, y in pts if y >= goal), None)
    recovery: list[float | None] = []
    for shift in shifts:
        # An evaluation at x = step index + 1 saw the world of that step: x <= shift is the
        # world before the shift (the shift applies from step index `shift`).
        before = [y for x, y in pts if x <= shift][-2:]
        after = [(x, y) for x, y in pts if x > shift]
        if not before or not after:
            recovery.append(None)
            continue
        level = statistics.fmean(before)
        goal = level - 0.1 * abs(level)
        back = next((x for x, y in after if y >= goal), None)
        recovery.append(None if back is None else float(back - shift))
    return {
        "final_normalized_utility": final,
        "auc_normalized_utility": statistics.fmean(ys),
        "steps_to_90pct": to90,
        "recovery_steps": recovery,
    }


def _mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def run_online_experiment(
    cfg: OnlineExperimentConfig,
    out: Path,
    from_dir: Path,
    *,
    reuse: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run every (method, stream, seed) into `out/runs/<stream>/<method>/seed<k>/` and write
    `summary.json`, `report.md`, curves CSV and PNGs into `out`. With `reuse`, a run whose
    directory already holds its student checkpoint is read back, not run again."""
    from dualrerank.report import write_online_report

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; known: {sorted(METHODS)}")
    from dualrerank.train.online import _parts_from

    _parts_from(Path(from_dir))  # a bad --from is one line before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    base = load_config(WorldConfig, cfg.online.world) if cfg.online.world else WorldConfig()
    methods: dict[str, dict[str, Any]] = {m: {} for m in cfg.methods}
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    marks: dict[str, list[float]] = {}
    references: dict[str, dict[str, float]] = {}
    timing: dict[str, float] = {}
    for stream_name, stream in cfg.streams.items():
        world = dataclasses.replace(base, drift=list(base.drift) + list(stream.drift))
        world_path = out / "worlds" / f"{stream_name}.yaml"
        dump_config(world, world_path)
        marks[stream_name] = _events(base, stream)
        curves[stream_name] = {}
        for method in cfg.methods:
            per_seed, series = [], []
            for seed in cfg.seeds:
                run_dir = out / "runs" / stream_name / method / f"seed{seed}"
                ocfg = dataclasses.replace(
                    cfg.online,
                    method=method,
                    seed=seed,
                    world=str(world_path),
                    lr=cfg.lr.get(method, cfg.online.lr),
                    weight_schedule=list(cfg.online.weight_schedule) + list(stream.weight_schedule),
                    exposure=stream.exposure or cfg.online.exposure,
                )
                t0 = time.perf_counter()
                if not (reuse and (run_dir / "student" / "config.json").is_file()):
                    run_online(ocfg, run_dir, from_dir, overwrite=True, progress=progress)
                timing[f"{stream_name}/{method}/seed{seed}"] = round(time.perf_counter() - t0, 1)
                recs = [r for r in MetricsLog(run_dir / "metrics.jsonl").records() if "eval/normalized_utility" in r]
                steps = [int(r["step"]) + 1 for r in recs]
                nu = [r["eval/normalized_utility"] for r in recs]
                per_seed.append(curve_figures(steps, nu, marks[stream_name], cfg.final_window))
                series.append(dict(zip(steps, nu, strict=True)))
                if stream_name not in references and recs:
                    references[stream_name] = {
                        "teacher_at_start": recs[0]["eval/teacher_normalized_utility"],
                        "student_at_start": recs[0]["eval/normalized_utility"],
                    }
                if recs:
                    references[stream_name].setdefault(f"teacher_final/{method}", recs[-1]["eval/teacher_normalized_utility"])
            fig: dict[str, Any] = {}
            for key in ("final_normalized_utility", "auc_normalized_utility", "steps_to_90pct"):
                fig[key], fig[key + "_std"] = _mean_std([p[key] for p in per_seed])
            n_shifts = len(marks[stream_name])
            # A shift after which any seed never recovered counts as never (null).
            fig["recovery_steps"] = [
                None
                if any(p["recovery_steps"][i] is None for p in per_seed)
                else _mean_std([p["recovery_steps"][i] for p in per_seed])[0]
                for i in range(n_shifts)
            ]
            fig["seeds"] = len(cfg.seeds)
            methods[method][stream_name] = fig
            all_steps = sorted(set().union(*[set(s) for s in series])) if series else []
            curves[stream_name][method] = [
                {
                    "step": s,
                    "normalized_utility": _mean_std([d.get(s) for d in series])[0],
                    "normalized_utility_std": _mean_std([d.get(s) for d in series])[1],
                }
                for s in all_steps
            ]
    summary = {
        "methods": methods,
        "references": references,
        "streams": {k: to_dict(v) for k, v in cfg.streams.items()},
        "seconds": timing,
    }
    title = "Online experiment: " + ", ".join(cfg.methods)
    notes = [f"{len(cfg.seeds)} seed(s) per method and stream; the student, teacher and evaluator start from {from_dir}."]
    return write_online_report(out, summary, curves, marks, title=title, commands=[command] if command else [], notes=notes)
