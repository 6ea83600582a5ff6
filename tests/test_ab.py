"""`dualrerank ab`: the simulated A/B test (train/abtest.py, commands/ab.py, report.write_ab_report).

Tiny untrained models on a small world (12 candidates, pages of 4): the same seed gives the
same summary, paired and split designs run, an arm against itself (A/A) has intervals
covering 0, upstream sort beats an untrained model, the intervals are calibrated, bad input
is one line with exit status 2 and nothing written, and every key written is documented.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dualrerank.cli import main
from dualrerank.metrics import describe_key
from dualrerank.models.checkpoint import save_checkpoint
from dualrerank.sim import World
from dualrerank.train.abtest import METRICS, ABConfig, _chunks, compare, load_arms, simulate
from dualrerank.train.splits import SplitConfig, load_splits
from dualrerank.train.supervised import build_for_data

SMALL = {"encoder": {"d_model": 16, "n_heads": 2, "n_layers": 1}, "n_layers": 1, "n_heads": 2}
WORLD = {
    "page_length": 4,
    "catalogue": {"num_items": 400, "num_categories": 4, "topic_dim": 4},
    "requests": {"num_candidates": 12, "num_projections": 2},
    "oracle": {"beam_width": 4, "random_pages": 8},
}
SETTINGS = {"page_length": 4, "requests_per_step": 16, "latency_requests": 4, "latency_warmup": 1}
# Keys whose values are quotations or a whole config, not logged names.
OPAQUE = {"third_party", "config"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A small world YAML, the A/B settings, and untrained tiny teacher and student checkpoints of it."""
    root = tmp_path_factory.mktemp("ab")
    world = root / "world.yaml"
    world.write_text(yaml.safe_dump(WORLD))
    settings = root / "ab.yaml"
    settings.write_text(yaml.safe_dump(SETTINGS))
    train = load_splits(SplitConfig(path=str(world), train_requests=32, valid_requests=4, test_requests=4, page_length=4)).train
    save_checkpoint(build_for_data("teacher", SMALL, train, seed=1), root / "teacher" / "checkpoint", "teacher")
    save_checkpoint(build_for_data("nar", SMALL, train, seed=3), root / "student" / "checkpoint", "nar")
    return {"root": root, "world": world, "config": settings, "teacher": root / "teacher", "student": root / "student"}


def _ab(parts: dict[str, Path], out: Path, *extra: str, arms: tuple[str, ...] | None = None) -> tuple[int, str]:
    arms = arms if arms is not None else ("upstream", f"teacher={parts['teacher']}", f"student={parts['student']}")
    argv = ["ab", *(x for a in arms for x in ("--arm", a)), "--world", str(parts["world"]), "--config", str(parts["config"]),
            "--out", str(out), "--quiet", *extra]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def _without_timing(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary minus what depends on the machine's speed or the command line."""
    s = json.loads(json.dumps(summary))
    for key in ("wall_seconds", "commands"):
        s.pop(key)
    for arm in s["arms"].values():
        for key in ("latency_ms_p50", "latency_ms_p99"):
            arm.pop(key)
    for per_metric in s["lifts"].values():
        for key in ("latency_ms_p50", "latency_ms_p99"):
            per_metric.pop(key)
    s["config"].pop("chunk_size")
    return s


@pytest.fixture(scope="module")
def paired(parts) -> Path:
    out = parts["root"] / "paired"
    code, err = _ab(parts, out, "--requests", "256", "--seed", "3", "--control", "teacher")
    assert code == 0, err
    return out


def test_paired_writes_every_file_and_the_paper_shaped_table(paired):
    assert sorted(p.name for p in paired.iterdir()) == ["config.yaml", "lifts.png", "report.md", "summary.json"]
    s = _summary(paired)
    assert s["design"] == "paired" and s["control"] == "teacher" and s["steps"] == 16 and s["drift_events"] == 0
    assert {a: v["requests"] for a, v in s["arms"].items()} == {"upstream": 256, "teacher": 256, "student": 256}
    assert s["arms"]["student"]["serving_path"] == "onnx" and s["arms"]["teacher"]["serving_path"] == "torch"
    # The ONNX serving path serves the same pages as the PyTorch student did in the test.
    assert s["arms"]["student"]["serving_parity"] == 1.0 and s["arms"]["student"]["latency_requests"] == 4
    for arm in ("upstream", "student"):
        for metric in METRICS:
            row = s["lifts"][arm][metric]
            lo, hi = row["difference_ci"]
            assert lo <= row["difference"] <= hi and 0 <= row["p_value"] <= 1
            if row["control_value"] > 0:
                lo, hi = row["lift_ci"]
                assert lo <= row["lift"] <= hi
                assert math.isclose(row["lift"], row["arm_value"] / row["control_value"] - 1, rel_tol=1e-9)
            else:  # the untrained teacher's normalized utility is below random: no relative lift
                assert row["lift"] is None and row["lift_ci"] is None
    report = (paired / "report.md").read_text()
    assert "| ctr " in report and "student lift [95% CI]" in report and "teacher (control)" in report
    # The paper's figures appear as third-party quotations, apart from the measured table.
    assert "third-party, not measured here" in report and "+0.373%" in report and "+1.107%" in report
    assert yaml.safe_load((paired / "config.yaml").read_text())["requests"] == 256


def test_same_seed_same_summary_whatever_the_chunking(parts, paired, tmp_path):
    code, err = _ab(parts, tmp_path / "again", "--requests", "256", "--seed", "3", "--control", "teacher")
    assert code == 0, err
    assert _without_timing(_summary(tmp_path / "again")) == _without_timing(_summary(paired))
    # Chunks of 48 requests (three steps) instead of 2048: the same requests and draws.
    chunked = tmp_path / "chunked.yaml"
    chunked.write_text(yaml.safe_dump({**SETTINGS, "chunk_size": 48}))
    code, err = _ab({**parts, "config": chunked}, tmp_path / "chunked", "--requests", "256", "--seed", "3", "--control", "teacher")
    assert code == 0, err
    assert _without_timing(_summary(tmp_path / "chunked")) == _without_timing(_summary(paired))
    code, err = _ab(parts, tmp_path / "other", "--requests", "256", "--seed", "4", "--control", "teacher")
    assert code == 0, err
    assert _summary(tmp_path / "other")["arms"]["teacher"]["ctr"] != _summary(paired)["arms"]["teacher"]["ctr"]


def test_split_design_serves_each_request_once(parts, tmp_path):
    code, err = _ab(parts, tmp_path / "split", "--requests", "300", "--design", "split")
    assert code == 0, err
    s = _summary(tmp_path / "split")
    counts = {a: v["requests"] for a, v in s["arms"].items()}
    assert sum(counts.values()) == 300 and min(counts.values()) > 60, counts
    assert s["control"] == "upstream"  # the first arm
    assert s["power"]["requests_paired"] is None and s["power"]["requests_per_arm"] == counts["upstream"]
    lo, hi = s["lifts"]["teacher"]["ctr"]["lift_ci"]
    assert lo < hi


def test_a_a_test_has_zero_lift_and_intervals_covering_zero(parts, tmp_path):
    arms = (f"a={parts['teacher']}", f"b={parts['teacher']}")
    code, err = _ab(parts, tmp_path / "aa", "--requests", "400", arms=arms)
    assert code == 0, err
    lifts = _summary(tmp_path / "aa")["lifts"]["b"]
    # The same model serves the same pages: exact utility agrees to the last digit.
    for metric in ("normalized_utility", "utility"):
        assert lifts[metric]["difference"] == 0 and max(map(abs, lifts[metric]["difference_ci"])) < 1e-12
    for metric in METRICS:
        lo, hi = lifts[metric]["difference_ci"]
        assert lo <= 0 <= hi, (metric, lo, hi)
        if lifts[metric]["lift_ci"] is not None:
            lo, hi = lifts[metric]["lift_ci"]
            assert lo <= 0 <= hi, (metric, lo, hi)
    assert abs(lifts["ctr"]["lift"]) < 0.1 and max(map(abs, lifts["utility"]["lift_ci"])) < 1e-12


def test_upstream_beats_an_untrained_model(paired):
    s = _summary(paired)
    up = s["lifts"]["upstream"]["normalized_utility"]
    assert up["arm_value"] > up["control_value"] and up["difference_ci"][0] > 0, up  # control: the untrained teacher
    ctr = s["lifts"]["upstream"]["ctr"]
    assert ctr["arm_value"] > ctr["control_value"]


def test_power_line(paired):
    from scipy.stats import norm

    power = _summary(paired)["power"]
    assert "+0.714%" in power["line"] and "third-party" in power["line"]
    k = norm.ppf(0.975) + norm.ppf(0.8)
    expected = k**2 * 2 * power["control_std"] ** 2 / (0.00714 * power["control_ctr"]) ** 2
    assert power["requests_per_arm_split"] == math.ceil(expected)
    assert set(power["requests_paired"]) == {"upstream", "student"} and all(n > 0 for n in power["requests_paired"].values())
    assert power["line"] in (paired / "report.md").read_text()


def test_every_key_written_is_documented(paired):
    s = _summary(paired)
    keys = set(s) - OPAQUE
    for record in s["arms"].values():
        keys |= set(record)
    for per_metric in s["lifts"].values():
        keys |= set(per_metric)
        for row in per_metric.values():
            keys |= set(row)
    keys |= {f"power.{k}" for k in s["power"]}
    missing = sorted(k for k in keys if describe_key(k) is None)
    assert not missing, f"ab keys missing from metrics.AB_KEYS / docs/metrics.md: {missing}"


@pytest.mark.parametrize("case", [
    "not_a_run", "missing_path", "no_equals", "empty_name", "bad_name", "duplicate", "one_arm", "world_unknown_key",
    "zero_requests", "unknown_control",
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(parts, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_world = tmp_path / "world.yaml"
    bad_world.write_text(yaml.safe_dump({**WORLD, "no_such_key": 1}))
    teacher = f"teacher={parts['teacher']}"
    arms, extra, what = {
        "not_a_run": (("upstream", f"x={empty}"), (), "not a run directory or checkpoint"),
        "missing_path": (("upstream", f"x={tmp_path / 'nope'}"), (), "does not exist"),
        "no_equals": (("upstream", str(parts["teacher"])), (), "expected NAME=PATH"),
        "empty_name": (("upstream", f"={parts['teacher']}"), (), "expected NAME=PATH"),
        "bad_name": (("upstream", f"a b={parts['teacher']}"), (), "arm name"),
        "duplicate": (("upstream", "upstream"), (), "given twice"),
        "one_arm": (("upstream",), (), "at least two arms"),
        "world_unknown_key": (("upstream", teacher), ("--world", str(bad_world)), "unknown key"),
        "zero_requests": (("upstream", teacher), ("--requests", "0"), "requests"),
        "unknown_control": (("upstream", teacher), ("--control", "nobody"), "names no arm"),
    }[case]
    out = tmp_path / "out"
    code, err = _ab(parts, out, *extra, arms=arms)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and what in lines[0], lines
    assert not out.exists()


def test_out_holding_results_needs_overwrite(parts, paired, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(paired, out)
    code, err = _ab(parts, out, "--requests", "64")
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _summary(out)["requests"] == 256  # untouched
    code, err = _ab(parts, out, "--requests", "64", "--overwrite")
    assert code == 0, err
    assert _summary(out)["requests"] == 64


def test_arm_of_another_world_is_refused_before_writing(parts, tmp_path):
    # The default world has other feature widths than the tiny models were built for.
    code, err = _ab({**parts, "world": tmp_path / "w.yaml"}, tmp_path / "out", arms=("upstream", f"t={parts['teacher']}"))
    assert code == 2  # the world file is missing
    (tmp_path / "w.yaml").write_text("page_length: 4\n")
    code, err = _ab({**parts, "world": tmp_path / "w.yaml"}, tmp_path / "out", arms=("upstream", f"t={parts['teacher']}"))
    assert code == 2 and "cannot serve this world" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- pieces


def test_intervals_are_calibrated():
    """Over 300 A/A comparisons of identical distributions, the 95% delta-method intervals
    of a ratio metric cover 0 about 95% of the time, paired and split."""
    rng = np.random.default_rng(0)
    for paired in (True, False):
        covered = 0
        for _ in range(300):
            n = 400
            shown = np.full(n, 10.0)
            p = rng.beta(2, 5, size=n)  # per-request click propensity, shared in the paired design
            q = p if paired else rng.beta(2, 5, size=n)
            t = (rng.binomial(10, p).astype(float), shown)
            c = (rng.binomial(10, q).astype(float), shown)
            lo, hi = compare(t, c, paired=paired, confidence=0.95)["lift_ci"]
            covered += lo <= 0 <= hi
        assert 0.91 <= covered / 300 <= 0.99, (paired, covered)


def test_delta_and_bootstrap_agree():
    rng = np.random.default_rng(1)
    n = 2000
    den = rng.integers(5, 11, size=n).astype(float)
    t = (rng.binomial(den.astype(int), 0.32).astype(float), den)
    c = (rng.binomial(den.astype(int), 0.30).astype(float), den)
    for paired in (True, False):
        d = compare(t, c, paired=paired, confidence=0.95)
        b = compare(t, c, paired=paired, confidence=0.95, method="bootstrap", resamples=1000, seed=0)
        assert d["lift"] == b["lift"]
        width = d["lift_ci"][1] - d["lift_ci"][0]
        assert abs(b["lift_ci"][0] - d["lift_ci"][0]) < 0.15 * width and abs(b["lift_ci"][1] - d["lift_ci"][1]) < 0.15 * width


def test_chunks_never_straddle_a_drift_event():
    from dualrerank.sim import WorldConfig
    from dualrerank.sim.config import DriftEvent

    world = World(WorldConfig(drift=[DriftEvent(step=5, kind="rotate_preferences"), DriftEvent(step=9, kind="redundancy")]))
    cfg = ABConfig(requests=700, requests_per_step=64, chunk_size=256)  # 11 steps, 4 per chunk
    assert _chunks(cfg, world) == [(0, 4), (4, 5), (5, 9), (9, 11)]


def test_watch_time_is_in_seconds_whatever_the_reported_unit(parts, tmp_path):
    """A world reporting watch time in milliseconds gives the same seconds per request."""
    seconds = []
    for scale in (1.0, 1000.0):
        path = tmp_path / f"w{scale:g}.yaml"
        path.write_text(yaml.safe_dump({**WORLD, "utility": {"scale_watch_time": scale}}))
        cfg = ABConfig(arms=["upstream", "u2=upstream"], requests=64, world=str(path), page_length=4, latency_requests=0)
        arms = load_arms(cfg)
        from dualrerank.train.abtest import _world

        traffic = simulate(arms, _world(cfg), cfg, progress=False)
        seconds.append(np.nansum(traffic.values["upstream"]["watch_seconds"]))
    assert seconds[0] > 0 and math.isclose(seconds[0], seconds[1], rel_tol=1e-5)


def test_drift_schedule_is_followed(parts, tmp_path):
    drift = tmp_path / "drift.yaml"
    drift.write_text(yaml.safe_dump({**WORLD, "drift": [{"step": 2, "kind": "rotate_preferences", "angle": 90.0}]}))
    code, err = _ab({**parts, "world": drift}, tmp_path / "out", "--requests", "64", arms=("upstream", f"t={parts['teacher']}"))
    assert code == 0, err
    s = _summary(tmp_path / "out")
    assert s["steps"] == 4 and s["drift_events"] == 1 and s["world"] == str(drift)


def test_arm_trained_on_another_world_gets_a_note(parts, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(parts["teacher"], run)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": "synthetic", "path": None, "seed": 5}}))
    cfg = ABConfig(arms=["upstream", f"t={run}"], world=str(parts["world"]), page_length=4, latency_requests=0)
    notes = [n for arm in load_arms(cfg) for n in arm.notes]
    assert len(notes) == 1 and "seed 5" in notes[0] and "seed 0" in notes[0]


def test_run_demo_ab_returns_the_table(parts, tmp_path):
    from dualrerank.train.abtest import run_demo_ab

    result = run_demo_ab({"upstream": "upstream", "t": str(parts["teacher"])}, tmp_path / "ab", requests=32,
                         world=str(parts["world"]), progress=False, page_length=4, latency_requests=0)
    assert result["control"] == "upstream" and result["table_md"].startswith("| metric")
    assert "| ctr " in result["table_md"] and (tmp_path / "ab" / "report.md").is_file()
