"""The simulated online A/B test: `dualrerank ab` (docs/evaluation.md, "dualrerank ab").

Fresh traffic from the simulated world is served by two or more arms (any trained reranker
given as a run directory or checkpoint, or `upstream`, the upstream ranker's order); the
world returns realised feedback for the pages each arm served; every arm's CTR, long-view
rate, reformulation rate, watch time and exact normalized utility are compared with the
control's, with 95% intervals, and each arm's serving latency is timed at batch size 1.

    OUT/config.yaml   the resolved `ABConfig` (arms included): re-running with it reproduces the test
    OUT/summary.json  every figure per arm, the lifts with their intervals, the power line
    OUT/report.md     the paper-shaped table (metric rows, arm columns), the power line, the
                      paper's third-party figures kept apart
    OUT/lifts.png     relative lift of each arm against the control, with its interval

The stream [ours]: request i is served at stream step `i // requests_per_step`, by the world
with the drift events of steps <= that step in force (a world YAML's schedule). The
requests of step s are drawn with their own seed (seed, s) and the feedback of arm a at
step s with (seed, a's name, s), so the traffic depends neither on `chunk_size` nor on
which other arms run, and two arms never share a feedback draw. Work is vectorised over
chunks of whole steps that never straddle a drift event; the only loop over single
requests is the batch-1 latency measurement.

Designs [ours]: `paired` shows every request to every arm (the same user and candidates,
independent feedback draws), so differences are taken request by request; `split` assigns
each request to one arm uniformly at random (a real A/B test's traffic split).

Intervals [ours]: every metric is a ratio of sums over requests, sum(num) / sum(den)
(`ctr` = clicks / items shown, `normalized_utility` = sum(U - U_random) / sum(U_oracle -
U_random), per-request metrics have den = 1). The lift of an arm is R_arm / R_control - 1;
`delta` (default) linearises it in the four means (num and den of both arms) and takes
their covariance from the per-request pairs, jointly in the paired design (the same
requests), block-diagonal in the split design (independent groups); `bootstrap` resamples
requests (pairs of requests in the paired design) with `scipy.stats.bootstrap`.

The world's oracle and exact utility are instruments of this evaluation only, as
everywhere in the project: no arm sees them.
"""

from __future__ import annotations

import inspect
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from dualrerank.config import dump_config, option, to_dict
from dualrerank.errors import CheckpointError, ConfigError, DualRerankError
from dualrerank.schema import RerankBatch
from dualrerank.sim import World, WorldConfig
from dualrerank.sim.catalogue import seeded
from dualrerank.sim.response import sample as sample_feedback
from dualrerank.sim.state import WorldState

__all__ = [
    "ABConfig",
    "Arm",
    "UPSTREAM",
    "METRICS",
    "LATENCY_METRICS",
    "PAPER_CTR_LIFT",
    "THIRD_PARTY",
    "parse_arm",
    "load_arms",
    "compare",
    "power_line",
    "run_ab",
    "run_demo_ab",
]

#: The special arm: candidates sorted by the upstream ranker's score (no checkpoint).
UPSTREAM = "upstream"

#: [paper, third-party] Dual-Rerank's online CTR lift over its AR baseline (method.md
#: section 6: the one figure every extraction agrees on), the effect the power line sizes for.
PAPER_CTR_LIFT = 0.00714

#: method.md section 6, verbatim in substance: what third parties say the paper reports.
#: Quoted in the report as third-party figures, never as ours and never as verified.
THIRD_PARTY: dict[str, Any] = {
    "source": "Dual-Rerank (arXiv 2604.07420), online A/B test on 5% of Kuaishou search traffic, Dual-Rerank against "
    "the AR baseline, as two third-party extractions quote it (../shared/docs/method.md section 6); "
    "not verified, not measured here",
    "agreed": {"ctr_lift_pct": 0.714, "latency_ms": 12.1},
    "extraction_1": {
        "from": "an AI summary",
        "ctr_lift_pct": 0.714,
        "long_view_lift_pct": 0.373,
        "reformulation_lift_pct": -0.709,
        "latency_ms_baseline": 21.5,
        "latency_ms": 12.1,
        "latency_lift_pct": -43.7,
    },
    "extraction_2": {
        "from": "another extraction ('5% of traffic for a month')",
        "ctr_lift_pct": 0.714,
        "long_view_lift_pct": 1.107,
        "reformulation_lift_pct": -1.309,
        "latency_ms": 12.1,
    },
}

#: Traffic metrics, in table order: each a ratio of sums over the requests an arm served.
METRICS: tuple[str, ...] = (
    "ctr",
    "ctr_per_page",
    "long_view_rate",
    "reformulation_rate",
    "watch_time_per_request",
    "normalized_utility",
    "utility",
)
LATENCY_METRICS: tuple[str, ...] = ("latency_ms_p50", "latency_ms_p99")

#: Files an A/B test writes into --out (besides config.yaml and report.md, which
#: `runstate.RUN_FILES` already lists); `--overwrite` removes them first.
AB_FILES = ("summary.json", "lifts.png")

_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


# --------------------------------------------------------------------------- config


@dataclass
class ABConfig:
    arms: list[str] = option(
        help="arms, each NAME=PATH (a run directory or a checkpoint of any trained reranker) or 'upstream' (sort by "
        "the upstream score; also NAME=upstream); at least two; the CLI's --arm replaces this list",
        factory=list,
    )
    control: str | None = option(None, "the control arm's name (default: the first arm)")
    design: str = option(
        "paired",
        "'paired': every arm serves every request (independent feedback draws); 'split': "
        "each request goes to one arm drawn uniformly at random",
        choices=("paired", "split"),
    )
    requests: int = option(10000, "requests of fresh traffic", ge=1)
    seed: int = option(0, "seed of the traffic: requests, feedback draws, the split assignment and the bootstrap")
    world: str | None = option(None, "world YAML (with its drift schedule); default: the default world, no drift")
    world_seed: int = option(
        0, "seed of the world (catalogue); the arms must have been trained on this world (their run's data.seed)"
    )
    page_length: int = option(10, "page length L every arm serves", ge=1)
    requests_per_step: int = option(
        64,
        "requests per stream step: request i is served by the world at step "
        "i // requests_per_step (drift events of steps <= it in force)",
        ge=1,
    )
    chunk_size: int = option(2048, "requests per vectorised chunk (whole steps; memory bound); results do not depend on it", ge=1)
    latency_requests: int = option(200, "requests timed at batch size 1 per arm on its serving path (0: no timing)", ge=0)
    latency_warmup: int = option(10, "untimed batch-1 calls per arm before timing", ge=0)
    threads: int = option(1, "torch and ONNX Runtime intra-op threads while timing", ge=1)
    interval: str = option(
        "delta",
        "interval method: 'delta' (delta method on the per-request numerator/denominator "
        "pairs) or 'bootstrap' (scipy.stats.bootstrap, percentile, over requests)",
        choices=("delta", "bootstrap"),
    )
    confidence: float = option(0.95, "confidence level of the intervals; 1 - confidence is the power line's alpha", gt=0, lt=1)
    bootstrap_resamples: int = option(2000, "interval bootstrap: resamples", ge=100)
    power: float = option(0.8, "power the power line asks for", gt=0, lt=1)
    target_lift: float = option(
        PAPER_CTR_LIFT,
        "relative CTR lift the power line sizes the test for (default: the paper's +0.714%, a third-party figure)",
        gt=0,
    )


# --------------------------------------------------------------------------- arms


@dataclass
class Arm:
    """One arm: `rerank(batch, k)` serves the traffic (vectorised, PyTorch); `serve(batch1)`
    is its serving path at batch size 1 (the ONNX student for NAR students)."""

    name: str
    source: str
    model: str
    rerank: Callable[[RerankBatch, int], torch.Tensor]
    serve: Callable[[RerankBatch, int], torch.Tensor]
    serving_path: str
    path: Path | None = None
    notes: list[str] = field(default_factory=list)


def parse_arm(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `upstream` -> (name, source); one-line `ConfigError` otherwise."""
    if not isinstance(spec, str):
        raise ConfigError(f"--arm: expected NAME=PATH or 'upstream', got {spec!r}")
    if spec == UPSTREAM:
        return UPSTREAM, UPSTREAM
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--arm {spec!r}: expected NAME=PATH (a run directory or checkpoint) or 'upstream'")
    if not _ARM_NAME.match(name):
        raise ConfigError(
            f"--arm {spec!r}: arm name {name!r} must be 1-40 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name, path


def _trained_world(checkpoint: Path) -> tuple[str | None, int] | None:
    """(world YAML or None, world seed) a checkpoint was trained on, where its run's
    config.yaml says: a train/distill run's `data.path`/`data.seed` (RUN/checkpoint), an
    online run's `world`/`world_seed` (RUN/student, RUN/teacher); None when unknown."""
    import yaml

    if checkpoint.name == "checkpoint":
        candidates = [checkpoint.parent / "config.yaml"]
    else:  # a bare checkpoint: its own config, else the online run it sits in
        candidates = [checkpoint / "config.yaml", checkpoint.parent / "config.yaml"]
    for cfg_file in candidates:
        if not cfg_file.is_file():
            continue
        try:
            loaded = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            return None
        if not isinstance(loaded, dict):
            return None
        data = loaded.get("data")
        if checkpoint.name == "checkpoint" and isinstance(data, dict):
            return (data.get("path"), data.get("seed", 0)) if data.get("source", "synthetic") == "synthetic" else None
        if "world_seed" in loaded:
            return cast(tuple[str | None, int], (loaded.get("world"), loaded.get("world_seed")))
    return None


def _same_world(a: str | None, b: str | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and Path(a).resolve() == Path(b).resolve())


def _load_arm(name: str, source: str, cfg: ABConfig) -> Arm:
    from dualrerank.models.checkpoint import load_checkpoint, read_checkpoint_info, resolve_checkpoint
    from dualrerank.models.registry import build_model, get_spec

    if source == UPSTREAM:
        model = build_model("upstream")
        return Arm(name, UPSTREAM, "upstream", model.rerank, model.rerank, "torch")
    path = Path(source)
    if path.is_dir() and not ((path / "checkpoint" / "config.json").is_file() or (path / "config.json").is_file()):
        raise CheckpointError(
            f"--arm {name}={source}: not a run directory or checkpoint (neither checkpoint/config.json nor config.json in it)"
        )
    try:
        directory = resolve_checkpoint(path)
        registry_name = read_checkpoint_info(directory)["model"]
        kind = get_spec(registry_name).kind
        model = load_checkpoint(directory)
    except DualRerankError as exc:
        raise type(exc)(f"--arm {name}={source}: {exc}") from None
    arm = Arm(name, source, registry_name, model.rerank, model.rerank, "torch", path=path)
    if kind == "nar" and cfg.latency_requests > 0:
        # The student's production path: the exported ONNX graph behind dualrerank.serve
        # (in-memory export when the checkpoint carries no student.onnx).
        from dualrerank.serve.bundle import load_serving_model

        try:
            serving = load_serving_model(directory, backend="onnx", threads=cfg.threads, warmup=True)
        except DualRerankError as exc:
            raise type(exc)(f"--arm {name}={source}: {exc}") from None
        arm.serve = lambda batch, k: torch.from_numpy(serving.rerank(batch, k).pages)
        arm.serving_path = "onnx"
    trained = _trained_world(directory)
    if trained is not None:
        world_path, world_seed = trained
        if world_seed != cfg.world_seed or not _same_world(world_path, cfg.world):
            arm.notes.append(
                f"arm {name} was trained on world {world_path or 'default'} (seed {world_seed}); this test "
                f"serves world {cfg.world or 'default'} (seed {cfg.world_seed})"
            )
    return arm


def load_arms(cfg: ABConfig) -> list[Arm]:
    """Parse and load every arm of `cfg` (names unique, at least two); one-line errors."""
    specs = [parse_arm(s) for s in cfg.arms]
    if len(specs) < 2:
        raise ConfigError(f"--arm: an A/B test needs at least two arms, got {len(specs)}")
    names = [n for n, _ in specs]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ConfigError(f"--arm: arm name {dup!r} is given twice; names must be unique")
    if cfg.control is not None and cfg.control not in names:
        raise ConfigError(f"--control {cfg.control!r} names no arm; arms: {names}")
    return [_load_arm(n, s, cfg) for n, s in specs]


# --------------------------------------------------------------------------- traffic


def _world(cfg: ABConfig) -> World:
    if cfg.world is not None:
        from dualrerank.data.synthetic import load_world_config

        if not Path(cfg.world).is_file():
            raise ConfigError(f"--world: file not found: {cfg.world}")
        world_cfg = load_world_config(cfg.world)
    else:
        world_cfg = WorldConfig()
    if cfg.page_length > world_cfg.requests.num_candidates:
        raise ConfigError(
            f"page_length: {cfg.page_length} > the world's {world_cfg.requests.num_candidates} candidates per request"
        )
    return World(world_cfg, seed=cfg.world_seed)


def _chunks(cfg: ABConfig, world: World) -> list[tuple[int, int]]:
    """(first step, stop step) of each chunk: whole steps, at most `chunk_size` requests
    (one step at least), never across a drift event."""
    steps = math.ceil(cfg.requests / cfg.requests_per_step)
    per_chunk = max(1, cfg.chunk_size // cfg.requests_per_step)
    cuts = sorted({e.step for e in world.config.drift if 0 < e.step < steps}) + [steps]
    out, start = [], 0
    for boundary in cuts:
        while start < boundary:
            stop = min(start + per_chunk, boundary)
            out.append((start, stop))
            start = stop
    return out


def _cat_batches(batches: Sequence[RerankBatch]) -> RerankBatch:
    first = batches[0]
    if len(batches) == 1:
        return first
    cat: dict[str, Any] = {k: torch.cat([getattr(b, k) for b in batches]) for k in first._tensor_fields()}
    return replace(first, **cat)


def _draw(world: World, cfg: ABConfig, first: int, stop: int) -> tuple[WorldState, RerankBatch]:
    """The requests of steps [first, stop), each step from its own seed."""
    parts = []
    for s in range(first, stop):
        count = min(cfg.requests, (s + 1) * cfg.requests_per_step) - s * cfg.requests_per_step
        parts.append(world.sample_requests(count, seeded(cfg.seed, f"ab/requests/{s}")))
    return WorldState.cat([p[0] for p in parts]), _cat_batches([p[1] for p in parts])


_FIELDS = ("clicks", "long_views", "watch_seconds", "reformulate", "shown", "utility")


@dataclass
class Traffic:
    """Per-request outcomes `[N]` (float64) of every arm, NaN where the arm did not serve
    the request (split design); `random` and `oracle` are the world's reference utilities."""

    served: dict[str, np.ndarray]
    values: dict[str, dict[str, np.ndarray]]
    random: np.ndarray
    oracle: np.ndarray
    steps: int
    drift_events: int
    latency_pool: RerankBatch | None


def _assignment(cfg: ABConfig, arms: Sequence[Arm]) -> torch.Tensor | None:
    """Split design: the arm index of every request, uniform; None for paired."""
    if cfg.design != "split":
        return None
    return torch.randint(len(arms), (cfg.requests,), generator=seeded(cfg.seed, "ab/assign"))


def check_split(cfg: ABConfig, arms: Sequence[Arm]) -> None:
    """A split test needs every arm to get at least two requests (a variance)."""
    assign = _assignment(cfg, arms)
    if assign is None:
        return
    counts = torch.bincount(assign, minlength=len(arms))
    for arm, c in zip(arms, counts.tolist(), strict=True):
        if c < 2:
            raise ConfigError(
                f"--requests {cfg.requests}: the split design gave arm {arm.name} {c} request(s); "
                "give more requests (at least two per arm)"
            )


def simulate(arms: Sequence[Arm], world: World, cfg: ABConfig, progress: bool = True) -> Traffic:
    """Serve the stream to the arms and collect every arm's per-request outcomes."""
    N, L, rps = cfg.requests, cfg.page_length, cfg.requests_per_step
    nan = np.full(N, np.nan)
    values = {a.name: {f: nan.copy() for f in _FIELDS} for a in arms}
    served = {a.name: np.zeros(N, dtype=bool) for a in arms}
    random, oracle = nan.copy(), nan.copy()
    assign = _assignment(cfg, arms)
    want = cfg.latency_requests
    pool: list[RerankBatch] = []
    pooled = 0
    chunks = _chunks(cfg, world)
    bar = tqdm(total=N, desc="ab requests", unit="req", disable=not progress)
    for first, stop in chunks:
        world_t = world.at_step(first)
        state, batch = _draw(world_t, cfg, first, stop)
        lo = first * rps
        rows = torch.arange(lo, lo + batch.batch_size)
        step_of = rows // rps
        if pooled < want:
            take = min(want - pooled, batch.batch_size)
            pool.append(batch.select(slice(0, take)))
            pooled += take
        ref = world_t.reference(state, L)
        random[rows.numpy()] = ref.random.double().numpy()
        oracle[rows.numpy()] = ref.oracle.double().numpy()
        for a, arm in enumerate(arms):
            local = torch.arange(batch.batch_size) if assign is None else (assign[rows] == a).nonzero().flatten()
            if local.numel() == 0:
                continue
            sub_state, sub_batch = state.select(local), batch.select(local)
            with torch.inference_mode():
                pages = arm.rerank(sub_batch, L).long()
            exp = world_t.expectation(sub_state, pages)
            # Feedback step by step, each step from its own generator: the draws do not
            # depend on the chunking, nor on which other arms run.
            click, long_view, watch, reform = (
                torch.zeros(local.numel(), L),
                torch.zeros(local.numel(), L),
                torch.zeros(local.numel(), L),
                torch.zeros(local.numel()),
            )
            sub_steps = step_of[local]
            for s in torch.unique(sub_steps).tolist():
                at = (sub_steps == s).nonzero().flatten()
                fb = sample_feedback(
                    world_t.params, _select_expectation(exp, at), seeded(cfg.seed, f"ab/feedback/{arm.name}/{s}")
                )
                click[at], long_view[at], watch[at], reform[at] = fb.click, fb.long_view, fb.watch_time, fb.reformulate
            idx = rows[local].numpy()
            out = values[arm.name]
            # Events are counted where the reported value is > 0 (unit-free, as feedback.py
            # defines them); watch time is converted back to seconds with the reported unit
            # in force, so a unit change in the drift schedule does not move the metric.
            out["clicks"][idx] = (click > 0).sum(1).double().numpy()
            out["long_views"][idx] = (long_view > 0).sum(1).double().numpy()
            out["watch_seconds"][idx] = (watch.sum(1).double() / world_t.params.scales["watch_time"]).numpy()
            out["reformulate"][idx] = reform.double().numpy()
            out["shown"][idx] = float(L)
            out["utility"][idx] = exp.utility.double().numpy()
            served[arm.name][idx] = True
        bar.update(batch.batch_size)
    bar.close()
    steps = chunks[-1][1] if chunks else 0
    drift = sum(1 for e in world.config.drift if e.step < steps)
    return Traffic(served, values, random, oracle, steps, drift, _cat_batches(pool) if pool else None)


def _select_expectation(exp: Any, index: torch.Tensor) -> Any:
    """The expectation of the pages at `index` (rows of every tensor field)."""
    return replace(exp, **{f.name: getattr(exp, f.name)[index] for f in fields(exp)})


# --------------------------------------------------------------------------- latency


def measure_latency(arms: Sequence[Arm], pool: RerankBatch | None, cfg: ABConfig) -> dict[str, dict[str, Any]]:
    """Per arm: p50/p99 milliseconds per request at batch size 1 on its serving path, over
    the first `latency_requests` requests of the traffic (after `latency_warmup` untimed
    ones), arms timed in rotation request by request so that load from other processes
    hits all alike; `serving_parity`: share of timed requests whose serving-path page
    equals the page the arm served in the test (the batched PyTorch path)."""
    empty = {"latency_ms_p50": None, "latency_ms_p99": None, "latency_requests": 0, "serving_parity": None}
    if pool is None or cfg.latency_requests == 0:
        return {a.name: dict(empty) for a in arms}
    L = cfg.page_length
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.inference_mode():
            batched = {a.name: a.rerank(pool, L).long() for a in arms}
            times: dict[str, list[float]] = {a.name: [] for a in arms}
            agree: dict[str, list[bool]] = {a.name: [] for a in arms}
            for w in range(cfg.latency_warmup):  # allocations, lazy initialisation, caches
                one = pool.select([w % pool.batch_size])
                for arm in arms:
                    arm.serve(one, L)
            A = len(arms)
            for j in range(pool.batch_size):
                one = pool.select([j])
                for r in range(A):
                    arm = arms[(j + r) % A]
                    t0 = time.perf_counter()
                    page = arm.serve(one, L)
                    times[arm.name].append((time.perf_counter() - t0) * 1000.0)
                    agree[arm.name].append(bool(torch.equal(page.long().reshape(-1), batched[arm.name][j])))
    finally:
        torch.set_num_threads(threads)
    out = {}
    for a in arms:
        t = np.asarray(times[a.name])
        out[a.name] = {
            "latency_ms_p50": float(np.percentile(t, 50)) if t.size else None,
            "latency_ms_p99": float(np.percentile(t, 99)) if t.size else None,
            "latency_requests": int(t.size),
            "serving_parity": float(np.mean(agree[a.name])) if agree[a.name] else None,
        }
    return out


# --------------------------------------------------------------------------- statistics


def ratio_parts(traffic: Traffic, arm: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) per request the arm served: the metric is sum(num) / sum(den)."""
    v, keep = traffic.values[arm], traffic.served[arm]
    one = np.ones(int(keep.sum()))
    parts = {
        "ctr": lambda: (v["clicks"][keep], v["shown"][keep]),
        "ctr_per_page": lambda: (v["clicks"][keep], one),
        "long_view_rate": lambda: (v["long_views"][keep], v["shown"][keep]),
        "reformulation_rate": lambda: (v["reformulate"][keep], one),
        "watch_time_per_request": lambda: (v["watch_seconds"][keep], one),
        "normalized_utility": lambda: (v["utility"][keep] - traffic.random[keep], traffic.oracle[keep] - traffic.random[keep]),
        "utility": lambda: (v["utility"][keep], one),
    }
    return parts[metric]()


def _ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    d = float(den.sum())
    return float(num.sum()) / d if num.size and d != 0 else None


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def _two_sided_p(estimate: float, se: float) -> float | None:
    from scipy.stats import norm

    if not math.isfinite(se):
        return None
    if se == 0:
        return 1.0 if estimate == 0 else 0.0
    return float(2 * norm.sf(abs(estimate) / se))


def _delta(t: tuple[np.ndarray, np.ndarray], c: tuple[np.ndarray, np.ndarray], paired: bool) -> tuple[float, float]:
    """Delta-method variances of the difference R_t - R_c and of the lift R_t / R_c - 1,
    R = mean(num) / mean(den), from the covariance of the per-request (num, den) pairs:
    joint over (t, c) when paired (the same requests), block-diagonal when not."""
    from scipy.linalg import block_diag

    if paired:
        X = np.column_stack([t[0], t[1], c[0], c[1]])
        n = X.shape[0]
        means = X.mean(0)
        S = np.cov(X, rowvar=False, ddof=1) / n if n > 1 else np.full((4, 4), np.nan)
    else:
        Xt, Xc = np.column_stack(t), np.column_stack(c)
        means = np.concatenate([Xt.mean(0), Xc.mean(0)])
        covs = [np.cov(X, rowvar=False, ddof=1) / X.shape[0] if X.shape[0] > 1 else np.full((2, 2), np.nan) for X in (Xt, Xc)]
        S = block_diag(*covs)
    a, b, cc, d = means
    g_diff = np.array([1 / b, -a / b**2, -1 / d, cc / d**2])
    g_lift = np.array([d / (b * cc), -a * d / (b**2 * cc), -a * d / (b * cc**2), a / (b * cc)])
    # g'Sg >= 0 for a covariance S; rounding can leave -1e-20 where the arms agree exactly.
    return max(float(g_diff @ S @ g_diff), 0.0), max(float(g_lift @ S @ g_lift), 0.0)


def _bootstrap(
    t: tuple[np.ndarray, np.ndarray], c: tuple[np.ndarray, np.ndarray], paired: bool, confidence: float, resamples: int, seed: int
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Percentile bootstrap intervals of (difference, lift) and the difference's standard
    error, resampling requests (the paired design resamples them jointly for both arms)."""
    from scipy import stats

    def both(mt: np.ndarray, mc: np.ndarray) -> np.ndarray:
        rt, rc = mt[0] / mt[1], mc[0] / mc[1]
        return np.stack([rt - rc, rt / rc - 1])

    data: tuple[np.ndarray, ...]
    statistic: Callable[..., np.ndarray]
    if paired:
        data = (np.stack([t[0], t[1], c[0], c[1]]),)

        def paired_statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
            m = x.mean(axis=axis)
            return both(m[:2], m[2:])

        statistic = paired_statistic
    else:
        data = (np.stack(t), np.stack(c))

        def split_statistic(xt: np.ndarray, xc: np.ndarray, axis: int = -1) -> np.ndarray:
            return both(xt.mean(axis=axis), xc.mean(axis=axis))

        statistic = split_statistic

    gen = np.random.default_rng(seed)
    # scipy >= 1.15 names the generator `rng`; older versions `random_state`.
    key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    n = max(x.shape[-1] for x in data)
    res = stats.bootstrap(
        data,
        statistic,
        vectorized=True,
        axis=-1,
        method="percentile",
        confidence_level=confidence,
        n_resamples=resamples,
        batch=max(1, min(resamples, 4_000_000 // max(1, 4 * n))),
        **{key: gen},
    )
    lo, hi = res.confidence_interval
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1])), float(res.standard_error[0])


def compare(
    t: tuple[np.ndarray, np.ndarray],
    c: tuple[np.ndarray, np.ndarray],
    *,
    paired: bool,
    confidence: float,
    method: str = "delta",
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """An arm's ratio metric against the control's: values, difference and relative lift
    with `confidence` intervals, and the two-sided p-value of no difference. `t`, `c`:
    per-request (numerator, denominator) arrays (aligned request by request if `paired`).
    Undefined parts (a zero denominator, fewer than two requests, a lift against a control
    value <= 0) are None."""
    rt, rc = _ratio(*t), _ratio(*c)
    out: dict[str, Any] = {
        "arm_value": rt,
        "control_value": rc,
        "difference": None,
        "difference_ci": None,
        "lift": None,
        "lift_ci": None,
        "p_value": None,
    }
    if rt is None or rc is None:
        return out
    diff = rt - rc
    # A relative lift needs a positive control (a normalized utility below random has none);
    # the difference keeps its interval either way.
    lift = rt / rc - 1 if rc > 0 else None
    out.update(difference=diff, lift=lift)
    if min(t[0].size, c[0].size) < 2:
        return out
    d_ci: tuple[float, float] | None = None
    l_ci: tuple[float, float] | None = None
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "bootstrap":
            if lift is None:  # the resampled lifts would all divide by zero
                return out
            d_ci, l_ci, se = _bootstrap(t, c, paired, confidence, resamples, seed)
        else:
            var_d, var_l = _delta(t, c, paired)
            z = _z(confidence)
            se = math.sqrt(var_d)  # NaN where there is no variance estimate
            d_ci = (diff - z * se, diff + z * se)
            if lift is not None:
                l_ci = (lift - z * math.sqrt(var_l), lift + z * math.sqrt(var_l))
    if d_ci is not None and all(math.isfinite(x) for x in d_ci):
        out["difference_ci"] = list(d_ci)
    if l_ci is not None and all(math.isfinite(x) for x in l_ci):
        out["lift_ci"] = list(l_ci)
    out["p_value"] = _two_sided_p(diff, se)
    return out


def _linearised_ctr(traffic: Traffic, arm: str) -> tuple[np.ndarray, float]:
    """Per-request linearisation of the arm's CTR (clicks_i - CTR * shown_i) / mean(shown),
    whose mean variance is the ratio's (delta method), and the CTR."""
    num, den = ratio_parts(traffic, arm, "ctr")
    ctr = _ratio(num, den) or 0.0
    return (num - ctr * den) / den.mean(), ctr


def power_line(traffic: Traffic, arms: Sequence[Arm], control: str, cfg: ABConfig) -> dict[str, Any]:
    """Requests per arm needed to detect a relative CTR lift of `cfg.target_lift` with power
    `cfg.power`, two-sided at alpha = 1 - confidence (normal approximation):
    n = (z_{1-alpha/2} + z_power)^2 * V / (target_lift * CTR_control)^2, with V = 2 * the
    control's per-request linearised CTR variance (split design: two independent groups)
    or the variance of the per-request linearised differences (paired design, per arm)."""
    from scipy.stats import norm

    alpha = round(1 - cfg.confidence, 12)  # 1 - 0.95 is 0.050000000000000044 in floating point
    k = float(norm.ppf(1 - alpha / 2) + norm.ppf(cfg.power))
    lin_c, ctr_c = _linearised_ctr(traffic, control)
    var_c = float(np.var(lin_c, ddof=1)) if lin_c.size > 1 else float("nan")
    delta = cfg.target_lift * ctr_c
    n_arm = int(traffic.served[control].sum())

    def needed(variance: float) -> int | None:
        return int(math.ceil(k * k * variance / delta**2)) if delta > 0 and math.isfinite(variance) else None

    def detectable(variance: float, n: int) -> float | None:
        return k * math.sqrt(variance / n) / ctr_c if ctr_c > 0 and n > 0 and math.isfinite(variance) else None

    split_n = needed(2 * var_c)
    paired: dict[str, int | None] | None = None
    if cfg.design == "paired":
        paired = {}
        for arm in arms:
            if arm.name == control:
                continue
            lin_t, _ = _linearised_ctr(traffic, arm.name)
            diff = lin_t - lin_c
            paired[arm.name] = needed(float(np.var(diff, ddof=1)) if diff.size > 1 else float("nan"))
    detect = detectable(2 * var_c, n_arm)
    pct = f"{cfg.target_lift * 100:+.3f}%" + (
        " (the paper's online figure, third-party)" if cfg.target_lift == PAPER_CTR_LIFT else ""
    )
    line = (
        f"To detect a CTR lift of {pct} at {cfg.power:.0%} power, two-sided alpha {alpha:.2g}, from the control's "
        f"CTR {ctr_c:.4f} and its per-request variance: {split_n:,} requests per arm in a split test"
        if split_n is not None
        else f"No power line for a CTR lift of {pct}: the control's CTR is 0 or it served fewer than two requests"
    )
    if paired:
        line += "; paired, from the variance of the per-request differences: " + ", ".join(
            f"{a} {n:,}" if n is not None else f"{a} n/a" for a, n in paired.items()
        )
    if detect is not None:
        line += f". This test's {n_arm:,} requests per arm detect a lift of {detect:.2%} in a split test."
    return {
        "target_lift": cfg.target_lift,
        "power": cfg.power,
        "alpha": alpha,
        "control_ctr": ctr_c,
        "control_std": math.sqrt(var_c) if math.isfinite(var_c) else None,
        "requests_per_arm_split": split_n,
        "requests_paired": paired,
        "requests_per_arm": n_arm,
        "detectable_lift_split": detect,
        "line": line,
    }


# --------------------------------------------------------------------------- the test


def _probe(arms: Sequence[Arm], world: World, cfg: ABConfig) -> None:
    """Serve two requests (a seed of their own) with every arm, so that an arm that cannot
    serve this world (other feature widths, too short a page) fails before anything is written."""
    _, batch = world.sample_requests(2, seeded(cfg.seed, "ab/probe"))
    for arm in arms:
        try:
            with torch.inference_mode():
                arm.rerank(batch, cfg.page_length)
                if arm.serving_path != "torch":
                    arm.serve(batch.select([0]), cfg.page_length)
        except (DualRerankError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--arm {arm.name}={arm.source}: cannot serve this world's requests ({first})") from None


def prepare(cfg: ABConfig, out: Path, overwrite: bool) -> tuple[list[Arm], World]:
    """Everything that can fail on the user's input, checked before --out is touched: the
    arms, the world, a probe of every arm on it, the split, and --out itself."""
    from dualrerank.train.runstate import prepare_run_dir

    world = _world(cfg)
    arms = load_arms(cfg)
    _probe(arms, world, cfg)
    check_split(cfg, arms)
    out = Path(out)
    held = [f for f in (*AB_FILES, "report.md") if (out / f).exists()]
    if held and not overwrite:
        raise ConfigError(
            f"--out {out} already holds results ({', '.join(held)}); pass --overwrite to replace them, "
            "or choose another directory"
        )
    prepare_run_dir(out, overwrite=overwrite, reads=[a.path for a in arms if a.path is not None])
    if overwrite:
        for name in AB_FILES:
            (out / name).unlink(missing_ok=True)
    return arms, world


def run_ab(
    cfg: ABConfig, out: Path, *, overwrite: bool = False, progress: bool = True, commands: Sequence[str] | None = None
) -> dict[str, Any]:
    """Run the A/B test of `cfg` into `out` (see the module docstring); returns the summary
    as written to summary.json. Every input is checked before anything is written."""
    from dualrerank.report import write_ab_report

    start = time.perf_counter()
    out = Path(out)
    arms, world = prepare(cfg, out, overwrite)
    control = cfg.control or arms[0].name
    for arm in arms:
        for note in arm.notes:
            print(f"dualrerank ab: note: {note}", file=sys.stderr)
    traffic = simulate(arms, world, cfg, progress=progress)
    latency = measure_latency(arms, traffic.latency_pool, cfg)

    paired = cfg.design == "paired"
    per_arm: dict[str, Any] = {}
    for arm in arms:
        figures = {m: _ratio(*ratio_parts(traffic, arm.name, m)) for m in METRICS}
        per_arm[arm.name] = {
            "arm_path": arm.source,
            "model": arm.model,
            "serving_path": arm.serving_path,
            "requests": int(traffic.served[arm.name].sum()),
            **figures,
            **latency[arm.name],
        }
    lifts: dict[str, Any] = {}
    for i, arm in enumerate(arms):
        if arm.name == control:
            continue
        rows: dict[str, Any] = {}
        for m in METRICS:
            rows[m] = compare(
                ratio_parts(traffic, arm.name, m),
                ratio_parts(traffic, control, m),
                paired=paired,
                confidence=cfg.confidence,
                method=cfg.interval,
                resamples=cfg.bootstrap_resamples,
                seed=cfg.seed * 1000 + i,
            )
        for m in LATENCY_METRICS:
            # Timing noise on a shared machine is not independent from call to call, so an
            # i.i.d. interval would be falsely precise: the ratio is reported without one.
            vt, vc = per_arm[arm.name][m], per_arm[control][m]
            rows[m] = {
                "arm_value": vt,
                "control_value": vc,
                "difference": None if vt is None or vc is None else vt - vc,
                "difference_ci": None,
                "lift": vt / vc - 1 if vt is not None and vc else None,
                "lift_ci": None,
                "p_value": None,
            }
        lifts[arm.name] = rows
    summary: dict[str, Any] = {
        "title": f"Simulated A/B test: {', '.join(a.name for a in arms)} (control {control})",
        "commands": list(commands or []),
        "design": cfg.design,
        "requests": cfg.requests,
        "traffic_seed": cfg.seed,
        "world": cfg.world,
        "world_seed": cfg.world_seed,
        "page_length": cfg.page_length,
        "requests_per_step": cfg.requests_per_step,
        "steps": traffic.steps,
        "drift_events": traffic.drift_events,
        "control": control,
        "interval_method": cfg.interval,
        "confidence": cfg.confidence,
        "arms": per_arm,
        "lifts": lifts,
        "power": power_line(traffic, arms, control, cfg),
        "third_party": THIRD_PARTY,
        "config": to_dict(cfg),
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    notes = [n for a in arms for n in a.notes]
    dump_config(cfg, out / "config.yaml")
    return write_ab_report(out, summary, notes=notes)


def run_demo_ab(
    arms: dict[str, str],
    out: Path,
    *,
    requests: int,
    world: str | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """`run_ab` for a pipeline that owns `out` (the demo): arms as {name: path or
    'upstream'}, the first the control, --out replaced. Returns the summary plus `table_md`
    (the report's results table, for embedding in another report)."""
    from dualrerank.report import ab_results_table

    specs = [UPSTREAM if (n == UPSTREAM and p == UPSTREAM) else f"{n}={p}" for n, p in arms.items()]
    cfg = ABConfig(arms=specs, requests=requests, world=world, seed=seed, **overrides)
    command = (
        "dualrerank ab "
        + " ".join(f"--arm {shlex.quote(s)}" for s in specs)
        + f" --requests {requests} --seed {seed}"
        + (f" --world {shlex.quote(world)}" if world else "")
        + f" --out {shlex.quote(str(out))} --overwrite"
    )
    summary = run_ab(cfg, out, overwrite=True, progress=progress, commands=[command])
    return {**summary, "table_md": ab_results_table(summary)}
