"""The offline experiment: `dualrerank experiment offline`.

Trains (or, with `reuse`, reads back) every model of the comparison on one data source for
several training seeds, evaluates each on the test split, and writes:

    OUT/runs/<row>/seed<k>/     one ordinary run directory per row and seed
                                (config.yaml, metrics.jsonl, checkpoint/, eval.json, report.md)
    OUT/summary.json            one row per model: mean and `<key>_std` over seeds, `seeds`
    OUT/report.md               the table (mean ± std), the command, notes, plots
    OUT/curves_*.png            PTAR, collapse rate and KD loss over distillation epochs
                                (mean over seeds), plus the bar and curve plots of
                                `report.write_experiment_report`

Rows (`ROWS`), all trained on the same splits (loaded once) with the same seed per run:

    upstream        the upstream ranker's order (no training)
    dnn, prm        score-and-sort baselines with their own supervised losses
    lambdamart      LightGBM LambdaMART
    catboost        CatBoost ranker (YetiRank by default)
    evaluator_beam  beam search over the learned list-wise evaluator; the same evaluator
                    builds the 'evaluator' targets of teacher and seq2slate (one per seed)
    teacher         AR teacher, MLE + BPR on evaluator targets
    teacher_logged  AR teacher on logged targets
    seq2slate       AR pointer network, MLE only, on evaluator targets
    nar_no_kd       NAR student trained on the logs alone (no teacher)
    nar_direct      NAR student, hard labels on the teacher's greedy pages (`soft: false`)
    student_skd     NAR student distilled from the teacher (SKD, `train.distill`)

Agreement figures (PTAR@L, @4, exact page; collapse rate, mean row JS and the certified
PTAR where a model exposes position x item logits) compare every list generator with the
teacher of the same seed on the test split (`train.distill.agreement_figures`).

The tree rows (`TREE_ROWS`) early-stop on the validation split and take the run's seed as
their own random seed. A team weighs a reranker against the best tree ranker it could use
instead, so the report names the better tree row (`tree_comparison`) and measures the
distilled student against that one.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from dualrerank.config import from_dict, merge_dicts, option, to_dict
from dualrerank.errors import ConfigError
from dualrerank.files import write_json, write_text
from dualrerank.models.checkpoint import load_checkpoint
from dualrerank.models.registry import config_from_dict, default_config
from dualrerank.train.loop import OptimConfig
from dualrerank.train.objectives import GeneratorObjectiveConfig
from dualrerank.train.splits import SplitConfig, Splits, load_splits

if TYPE_CHECKING:  # imported lazily at run time: distill and supervised pull in every model
    from dualrerank.train.distill import DistillConfig
    from dualrerank.train.supervised import TrainConfig

__all__ = [
    "ROWS",
    "GENERATOR_ROWS",
    "TREE_ROWS",
    "RowOverride",
    "ExperimentConfig",
    "check_experiment",
    "run_offline_experiment",
    "summarize_rows",
    "tree_comparison",
]


@dataclass(frozen=True)
class _Row:
    registry: str  # registry model name
    kind: str  # "train" (train_model) or "distill" (distill_model)
    target: str | None = None  # list generators trained by train_model: objective.target
    soft: bool | None = None  # distilled rows: DistillConfig.soft


_ROWS: dict[str, _Row] = {
    "upstream": _Row("upstream", "train"),
    "dnn": _Row("dnn", "train"),
    "prm": _Row("prm", "train"),
    "lambdamart": _Row("lambdamart", "train"),
    "catboost": _Row("catboost", "train"),
    "seq2slate": _Row("seq2slate", "train", target="evaluator"),
    "teacher": _Row("teacher", "train", target="evaluator"),
    "teacher_logged": _Row("teacher", "train", target="logged"),
    "nar_no_kd": _Row("nar", "train", target="logged"),
    "nar_direct": _Row("nar", "distill", soft=False),
    "student_skd": _Row("nar", "distill", soft=True),
    "evaluator_beam": _Row("evaluator", "train"),
}

#: Row names in table order.
ROWS: tuple[str, ...] = tuple(_ROWS)
#: Gradient-boosted tree rows; the report compares the student with the best of them.
TREE_ROWS: tuple[str, ...] = ("lambdamart", "catboost")
#: Rows that generate pages position by position (agreement with the teacher is reported).
GENERATOR_ROWS: frozenset[str] = frozenset(
    {"seq2slate", "teacher", "teacher_logged", "nar_no_kd", "nar_direct", "student_skd", "evaluator_beam"}
)
#: Figures of a summary row (mean, plus `<key>_std`), in table order.
FIGURES: tuple[str, ...] = (
    "normalized_utility",
    "utility",
    "ndcg@4",
    "ndcg@10",
    "ptar",
    "ptar@4",
    "exact_page",
    "collapse_rate",
    "certified_ptar",
    "latency_ms_p50",
    "params",
    "mean_row_js",
    "certified_prefix",
)
_COUNTS = ("params",)
_AGREEMENT_KEYS = (
    "ptar",
    "ptar@4",
    "exact_page",
    "collapse_rate",
    "certified_ptar",
    "mean_row_js",
    "certified_prefix",
    "certified_ptar@4",
    "mean_row_entropy",
    "teacher_margin",
)
#: Keys of the distilled runs' metrics.jsonl drawn over epochs, with the PNG each goes to.
CURVE_PLOTS: dict[str, str] = {
    "valid_ptar": "curves_ptar.png",
    "valid_collapse_rate": "curves_collapse.png",
    "train_kd_loss": "curves_kd_loss.png",
}
_CURVE_ROWS = ("student_skd", "nar_direct")


@dataclass
class RowOverride:
    """Changes to one row's settings (`ExperimentConfig.overrides[row]`)."""

    model_config: dict[str, Any] = option(
        factory=dict, help="the row's model config (keys of its registry model's config), over the shared encoder/decoder"
    )
    optim: dict[str, Any] = option(factory=dict, help="keys of the shared `optim` to change for this row")
    objective: dict[str, Any] = option(
        factory=dict,
        help="keys of `objective` to change for this row (list generators trained on targets; not 'target', which the row fixes)",
    )
    distill: dict[str, Any] = option(
        factory=dict, help="keys of `distill` to change for this row (nar_direct, student_skd; not 'soft', which the row fixes)"
    )


@dataclass
class ExperimentConfig:
    """`dualrerank experiment offline`: which rows, on which data, with which settings."""

    data: SplitConfig = option(factory=SplitConfig, help="data source and splits, loaded once and shared by every run")
    seeds: list[int] = option(factory=lambda: [0, 1, 2], help="training seeds; each row is trained once per seed")
    models: list[str] = option(
        factory=lambda: list(ROWS),
        help=f"rows to run, from {list(ROWS)}; rows others depend on (teacher, evaluator_beam) are added",
    )
    optim: OptimConfig = option(factory=OptimConfig, help="optimiser and early stopping shared by every trained row")
    objective: GeneratorObjectiveConfig = option(
        factory=GeneratorObjectiveConfig,
        help="list-generator objective shared by teacher, teacher_logged, seq2slate, nar_no_kd (each row fixes its target)",
    )
    encoder: dict[str, Any] = option(
        factory=dict,
        help="encoder settings (EncoderConfig keys) shared by every model with a transformer encoder, so that "
        "teacher and student have the same width and depth",
    )
    decoder: dict[str, Any] = option(
        factory=dict,
        help="decoder settings (n_layers, n_heads, ffn_mult, dropout) shared by the AR rows (teacher, "
        "teacher_logged, seq2slate) and the NAR rows (nar_no_kd, nar_direct, student_skd)",
    )
    overrides: dict[str, RowOverride] = option(
        factory=dict, help="per-row changes, keyed by row name: model_config, optim, objective, distill"
    )
    distill: dict[str, Any] = option(
        factory=dict,
        help="DistillConfig keys (not data or seed) for nar_direct and student_skd; optim and model_config "
        "default to the shared ones",
    )
    latency_requests: int = option(50, "requests timed at batch size 1 in the student-vs-teacher latency line")

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in _ROWS]
        if unknown:
            raise ConfigError(f"models: unknown row(s) {unknown}; known: {list(ROWS)}")
        bad = sorted(set(self.overrides) - set(_ROWS))
        if bad:
            raise ConfigError(f"overrides: unknown row(s) {bad}; known: {list(ROWS)}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: repeated seed in {self.seeds}")
        for key in ("data", "seed"):
            if key in self.distill:
                raise ConfigError(f"distill.{key}: set by the experiment (use data / seeds)")
        for name, over in self.overrides.items():
            if "target" in over.objective:
                raise ConfigError(f"overrides.{name}.objective.target: fixed by the row; pick the row instead")
            if "soft" in over.distill:
                raise ConfigError(f"overrides.{name}.distill.soft: fixed by the row (nar_direct: false, student_skd: true)")
            if "seed" in over.model_config:
                raise ConfigError(f"overrides.{name}.model_config.seed: set to each run's seed (use seeds)")
        if self.latency_requests < 1:
            raise ConfigError(f"latency_requests: must be >= 1, got {self.latency_requests}")


# --------------------------------------------------------------------------- configs


def _override(cfg: ExperimentConfig, row: str) -> RowOverride:
    return cfg.overrides.get(row, RowOverride())


_DECODER_REGISTRY = ("teacher", "seq2slate", "nar")


def _model_config(cfg: ExperimentConfig, registry: str, *layers: Mapping[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {}
    if registry in _DECODER_REGISTRY:
        base.update(cfg.decoder)
    if cfg.encoder and "encoder" in {f for f in default_config(registry).__dataclass_fields__}:
        base["encoder"] = dict(cfg.encoder)
    for layer in layers:
        base = merge_dicts(base, layer)
    config_from_dict(registry, base)  # unknown keys fail here, before anything trains
    return base


def _optim(cfg: ExperimentConfig, *layers: Mapping[str, Any]) -> OptimConfig:
    merged = to_dict(cfg.optim)
    for layer in layers:
        merged = merge_dicts(merged, layer)
    return from_dict(OptimConfig, merged, where="optim")


def train_config(cfg: ExperimentConfig, row: str, seed: int) -> TrainConfig:
    """The `TrainConfig` of a row trained by `train_model`."""
    from dualrerank.train.supervised import TrainConfig

    spec, over = _ROWS[row], _override(cfg, row)
    objective = merge_dicts(to_dict(cfg.objective), over.objective)
    if spec.target is not None:
        objective["target"] = spec.target
    model_config = _model_config(cfg, spec.registry, over.model_config)
    if "seed" in default_config(spec.registry).__dataclass_fields__:
        # A model with its own random seed (the tree rankers) must get the run's, or every
        # seed of the row trains the same model and its std over seeds is 0 by accident.
        model_config["seed"] = seed
    return TrainConfig(
        seed=seed,
        model=spec.registry,
        data=cfg.data,
        optim=_optim(cfg, over.optim),
        objective=from_dict(GeneratorObjectiveConfig, objective, where=f"overrides.{row}.objective"),
        model_config=model_config,
    )


def distill_config(cfg: ExperimentConfig, row: str, seed: int) -> DistillConfig:
    """The `DistillConfig` of a distilled row (nar_direct, student_skd)."""
    from dualrerank.train.distill import DistillConfig

    over = _override(cfg, row)
    fields = merge_dicts(dict(cfg.distill), over.distill)
    fields["optim"] = to_dict(_optim(cfg, cfg.distill.get("optim", {}), over.distill.get("optim", {}), over.optim))
    fields["model_config"] = _model_config(
        cfg, "nar", cfg.distill.get("model_config", {}), over.distill.get("model_config", {}), over.model_config
    )
    fields.update(seed=seed, data=to_dict(cfg.data), soft=bool(_ROWS[row].soft))
    return from_dict(DistillConfig, fields, where=f"distill ({row})")


def _needs(cfg: ExperimentConfig, row: str) -> list[str]:
    """Rows that must have run (same seed) before `row`."""
    needs = []
    if row in GENERATOR_ROWS and row != "teacher":
        needs.append("teacher")
    if _ROWS[row].target == "evaluator":
        needs.append("evaluator_beam")
    return needs


def planned_rows(cfg: ExperimentConfig) -> list[str]:
    """The requested rows plus their dependencies, in run order (evaluator, teacher first)."""
    wanted: set[str] = set()
    todo = list(cfg.models)
    while todo:
        row = todo.pop()
        if row not in wanted:
            wanted.add(row)
            todo.extend(_needs(cfg, row))
    first = [r for r in ("evaluator_beam", "teacher") if r in wanted]
    return first + [r for r in ROWS if r in wanted and r not in first]


def check_experiment(cfg: ExperimentConfig) -> list[str]:
    """Build every run's config once (ConfigError on a bad key before anything trains);
    returns the planned rows."""
    rows = planned_rows(cfg)
    for row in rows:
        if _ROWS[row].kind == "distill":
            distill_config(cfg, row, cfg.seeds[0])
        else:
            train_config(cfg, row, cfg.seeds[0])
    return rows


# --------------------------------------------------------------------------- running


def run_dir_of(out: Path, row: str, seed: int) -> Path:
    return out / "runs" / row / f"seed{seed}"


def _read_eval(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "eval.json").read_text())


def _train_row(cfg: ExperimentConfig, row: str, seed: int, out: Path, splits: Splits, progress: bool) -> dict[str, Any]:
    run_dir = run_dir_of(out, row, seed)
    if _ROWS[row].kind == "distill":
        from dualrerank.train.distill import distill_model

        return distill_model(
            distill_config(cfg, row, seed),
            run_dir,
            run_dir_of(out, "teacher", seed),
            overwrite=True,
            progress=progress,
            splits=splits,
        )
    from dualrerank.train.supervised import train_model

    tcfg = train_config(cfg, row, seed)
    evaluator_dir = None
    if _ROWS[row].target == "evaluator":
        evaluator_dir = run_dir_of(out, "evaluator_beam", seed) / "checkpoint"
    # A row is (re)trained only when it has no eval.json: whatever a killed attempt left goes.
    return train_model(tcfg, run_dir, overwrite=True, evaluator_dir=evaluator_dir, progress=progress, splits=splits)


def _load(run_dir: Path) -> Any:
    model = load_checkpoint(run_dir / "checkpoint")
    if isinstance(model, nn.Module):
        model.eval()
    return model


def _agreement(model: Any, teacher: Any, splits: Splits) -> dict[str, Any]:
    from dualrerank.train.distill import agreement_figures

    with torch.inference_mode():
        figures = agreement_figures(model, teacher, splits.test.batch, splits.page_length)
    return {k: figures.get(k) for k in _AGREEMENT_KEYS}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_seed_rows(
    cfg: ExperimentConfig,
    rows: Sequence[str],
    seed: int,
    out: Path,
    splits: Splits,
    *,
    reuse: bool,
    progress: bool,
    counter: Callable[[], str],
) -> dict[str, dict[str, Any]]:
    """Train (or reuse) each row for one seed; returns row -> test figures incl. agreement."""
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        run_dir = run_dir_of(out, row, seed)
        t0 = time.perf_counter()
        if reuse and (run_dir / "eval.json").is_file():
            _log(f"{counter()} {row} seed {seed}: reusing {run_dir}")
            figures = _read_eval(run_dir)
            trained = False
        else:
            _log(f"{counter()} {row} seed {seed}: training into {run_dir}")
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a fresh run: fit() would append to an old metrics.jsonl
            figures = dict(_train_row(cfg, row, seed, out, splits, progress))
            trained = True
        figures = {k: v for k, v in figures.items() if k not in _AGREEMENT_KEYS}
        figures["seconds"] = round(time.perf_counter() - t0, 1)
        figures["trained"] = trained
        results[row] = figures
    # Agreement once every row of the seed exists (the evaluator runs before the teacher).
    generators = [row for row in rows if row in GENERATOR_ROWS]
    if generators:
        teacher = _load(run_dir_of(out, "teacher", seed))
        for row in generators:
            model = teacher if row == "teacher" else _load(run_dir_of(out, row, seed))
            results[row].update(_agreement(model, teacher, splits))
    return results


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None]
    if not finite:
        return None, None
    mean = sum(finite) / len(finite)
    std = statistics.stdev(finite) if len(finite) > 1 else None
    return mean, std


def summarize_rows(per_seed: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One summary row per model: `FIGURES` as mean with `<key>_std` (sample std over
    seeds; null with one seed) and `seeds`; a figure null in every seed stays null."""
    rows = []
    for model, runs in per_seed.items():
        row: dict[str, Any] = {"model": model}
        for key in FIGURES:
            values = [r.get(key) for r in runs]
            values = [v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None for v in values]
            mean, std = _mean_std(values)
            if key in _COUNTS and mean is not None and float(mean).is_integer():
                mean = int(mean)  # the table prints counts with thousands separators
            row[key] = mean
            row[f"{key}_std"] = std
        row["seeds"] = len(runs)
        rows.append(row)
    return rows


def _mean_curves(out: Path, row: str, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per-epoch mean over seeds of the `CURVE_PLOTS` keys in the row's metrics.jsonl
    (an epoch re-run after a resume counts once: its last record)."""
    from dualrerank.report import read_metrics

    by_epoch: dict[int, dict[str, list[float]]] = {}
    for seed in seeds:
        path = run_dir_of(out, row, seed) / "metrics.jsonl"
        if not path.is_file():
            continue
        last = {int(r["epoch"]): r for r in read_metrics(path) if isinstance(r.get("epoch"), int)}
        for epoch, record in last.items():
            slot = by_epoch.setdefault(epoch, {})
            for key in CURVE_PLOTS:
                v = record.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    slot.setdefault(key, []).append(float(v))
    return [{"epoch": e, **{k: sum(v) / len(v) for k, v in by_epoch[e].items()}} for e in sorted(by_epoch)]


def measure_latency(out: Path, splits: Splits, seeds: Sequence[int], requests: int, rounds: int = 3) -> dict[str, Any] | None:
    """Student (student_skd) vs teacher latency at batch size 1, timed in alternation
    (teacher, student, teacher, ...) so that load from other processes hits both alike;
    per seed the median over rounds of each p50. None without both checkpoints."""
    from dualrerank.train.evaluation import latency_ms

    batch, L = splits.test.batch, splits.page_length
    per_seed = []
    for seed in seeds:
        t_dir, s_dir = run_dir_of(out, "teacher", seed), run_dir_of(out, "student_skd", seed)
        if not ((t_dir / "checkpoint").is_dir() and (s_dir / "checkpoint").is_dir()):
            continue
        teacher, student = _load(t_dir), _load(s_dir)
        t_ms, s_ms = [], []
        for _ in range(rounds):
            t_ms.append(latency_ms(teacher.rerank, batch, L, requests=requests)["latency_ms_p50"])
            s_ms.append(latency_ms(student.rerank, batch, L, requests=requests)["latency_ms_p50"])
        t, s = statistics.median(t_ms), statistics.median(s_ms)
        per_seed.append({"seed": seed, "teacher_ms_p50": t, "student_ms_p50": s, "ratio": s / t if t > 0 else None})
    if not per_seed:
        return None
    timed = batch.num_valid[batch.num_valid >= L]
    ratios = [p["ratio"] for p in per_seed if p["ratio"] is not None]
    return {
        "batch_size": 1,
        "page_length": L,
        "candidates_median": int(timed.median()) if timed.numel() else None,
        "requests": requests,
        "threads": torch.get_num_threads(),
        "teacher_ms_p50": statistics.mean(cast(float, p["teacher_ms_p50"]) for p in per_seed),  # always timed
        "student_ms_p50": statistics.mean(cast(float, p["student_ms_p50"]) for p in per_seed),
        "ratio": statistics.mean(ratios) if ratios else None,
        "per_seed": per_seed,
    }


def tree_comparison(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The best of the tree rows present and the distilled student measured against it.

    The figure is NDCG@10 where the data has real labels (LETOR/MSLR grades, MIND clicks),
    else normalized utility (the simulated world). "Within one std or above" means
    `student_skd >= best - margin`, the margin being the larger of the two rows' std over
    seeds (0 with one seed). None without a tree row that has the figure."""
    by = {r["model"]: r for r in rows}
    trees = [by[t] for t in TREE_ROWS if t in by]
    key = next((k for k in ("ndcg@10", "normalized_utility") if any(r.get(k) is not None for r in trees)), None)
    if key is None:
        return None
    scored = [r for r in trees if r.get(key) is not None]
    best = max(scored, key=lambda r: r[key])  # a tie keeps TREE_ROWS order
    out: dict[str, Any] = {
        "key": key,
        "row": best["model"],
        "mean": best[key],
        "std": best.get(f"{key}_std"),
        "others": {r["model"]: r[key] for r in scored if r is not best},
    }
    student = by.get("student_skd", {})
    if student.get(key) is not None:
        margin = max((v for v in (out["std"], student.get(f"{key}_std")) if v is not None), default=0.0)
        out.update(
            student_skd=student[key],
            student_skd_std=student.get(f"{key}_std"),
            margin=margin,
            student_within_one_std_or_above=bool(student[key] >= best[key] - margin),
        )
    return out


def _tree_notes(tree: Mapping[str, Any] | None) -> list[str]:
    if tree is None:
        return []
    key = tree["key"]
    spread = f" ± {tree['std']:.4f}" if tree["std"] is not None else ""
    others = ", ".join(f"{row} {v:.4f}" for row, v in tree["others"].items())
    notes = [f"Best tree row by {key}: {tree['row']} {tree['mean']:.4f}{spread}" + (f" ({others})." if others else ".")]
    if "student_skd" in tree:
        notes.append(
            f"student_skd vs the best tree row ({tree['row']}) on {key}: {tree['student_skd']:.4f} vs "
            f"{tree['mean']:.4f}, margin {tree['margin']:.4f} (the larger std over seeds); within one std or above: "
            + ("yes." if tree["student_within_one_std_or_above"] else "no.")
        )
    return notes


def _notes(rows: Sequence[Mapping[str, Any]], latency: Mapping[str, Any] | None) -> list[str]:
    """Derived comparisons quoted under the table (computed from the rows, never typed in)."""
    by = {r["model"]: r for r in rows}
    notes = []
    if latency is not None:
        notes.append(
            f"Latency at batch size 1 (L = {latency['page_length']}, median n = {latency['candidates_median']}, "
            f"{latency['requests']} requests, {latency['threads']} thread(s), timed alternately): student_skd "
            f"{latency['student_ms_p50']:.3f} ms vs teacher {latency['teacher_ms_p50']:.3f} ms p50, ratio "
            + (f"{latency['ratio']:.3f}." if latency["ratio"] is not None else "n/a.")
        )
    for key in ("normalized_utility", "ndcg@10"):
        t, s, n = (by.get(m, {}).get(key) for m in ("teacher", "student_skd", "nar_no_kd"))
        if t and s is not None:
            notes.append(f"student_skd reaches {s / t:.1%} of the teacher's {key} ({s:.4f} vs {t:.4f}).")
        if s is not None and n is not None:
            notes.append(f"student_skd - nar_no_kd {key}: {s - n:+.4f}.")
    cs, cn = by.get("student_skd", {}).get("collapse_rate"), by.get("nar_no_kd", {}).get("collapse_rate")
    if cs is not None and cn is not None:
        notes.append(f"Collapse rate: student_skd {cs:.3f} vs nar_no_kd {cn:.3f}.")
    return notes + _tree_notes(tree_comparison(rows))


def default_command(out: Path, config_path: str | Path | None) -> str:
    parts = ["dualrerank", "experiment", "offline"]
    if config_path is not None:
        parts += ["--config", str(config_path)]
    return shlex.join(parts + ["--out", str(out)])


def run_offline_experiment(
    cfg: ExperimentConfig,
    out: Path,
    *,
    reuse: bool = False,
    progress: bool = True,
    command: str | None = None,
    splits: Splits | None = None,
) -> dict[str, Any]:
    """Run the experiment into `out` (see the module docstring); returns the summary as
    written to `out/summary.json`."""
    from dualrerank.report import plot_curves, write_experiment_report

    out = Path(out)
    rows = check_experiment(cfg)
    splits = splits if splits is not None else load_splits(cfg.data)
    total, done = len(rows) * len(cfg.seeds), [0]

    def counter() -> str:
        done[0] += 1
        return f"[{done[0]}/{total}]"

    per_seed: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    for seed in cfg.seeds:
        results = run_seed_rows(cfg, rows, seed, out, splits, reuse=reuse, progress=progress, counter=counter)
        for row, figures in results.items():
            per_seed[row].append({"seed": seed, **figures})

    summary_rows = summarize_rows(per_seed)
    latency = measure_latency(out, splits, cfg.seeds, cfg.latency_requests) if "student_skd" in rows else None
    curves = {row: _mean_curves(out, row, cfg.seeds) for row in _CURVE_ROWS if row in rows}
    curves = {row: recs for row, recs in curves.items() if recs}
    commands = [command or default_command(out, None)]
    title = f"Offline experiment: {cfg.data.source}" + (f" ({cfg.data.path})" if cfg.data.path else "")
    summary = write_experiment_report(
        out,
        summary_rows,
        curves,
        title=title,
        commands=commands,
        notes=_notes(summary_rows, latency),
    )
    plots = list(summary["plots"])
    for key, name in CURVE_PLOTS.items():
        png = plot_curves(curves, [key], out / name, title=f"{key} (mean over {len(cfg.seeds)} seed(s))")
        if png is not None:
            plots.append(png.name)
    summary.update(
        plots=plots,
        config=to_dict(cfg),
        rows_run=rows,
        latency=latency,
        best_tree=tree_comparison(summary_rows),
        per_seed={row: runs for row, runs in per_seed.items()},
    )
    _write_summary(out / "summary.json", summary)
    _append_plots(out / "report.md", [p for p in plots if p in CURVE_PLOTS.values()])
    return summary


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as None (summary.json is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    write_json(path, _finite(summary), allow_nan=False)


def _append_plots(report: Path, names: Sequence[str]) -> None:
    if not names:
        return
    text = report.read_text().rstrip("\n")
    if "## Plots" not in text:
        text += "\n\n## Plots"
    text += "\n\n" + "\n\n".join(f"[![{n}]({n})]({n})" for n in names) + "\n"
    write_text(report, text)
