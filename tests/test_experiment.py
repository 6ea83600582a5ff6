"""The offline experiment end to end on a tiny synthetic split: summary.json schema,
report.md, plots, --reuse, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dualrerank.cli import main
from dualrerank.config import from_dict
from dualrerank.errors import ConfigError
from dualrerank.train.experiment import (
    FIGURES,
    ExperimentConfig,
    planned_rows,
    summarize_rows,
    train_config,
    tree_comparison,
)

TINY_ENCODER = {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0}
TINY = {
    "data": {"train_requests": 96, "valid_requests": 32, "test_requests": 32, "page_length": 4},
    "seeds": [0],
    "optim": {"epochs": 1, "batch_size": 48},
    "encoder": TINY_ENCODER,
    "decoder": {"n_layers": 1, "n_heads": 2},
    "objective": {"bpr_pairs": 2, "evaluator_beam": 2},
    "overrides": {
        "dnn": {"model_config": {"hidden": [8]}},
        "lambdamart": {"model_config": {"n_estimators": 5, "num_threads": 1}},
        "catboost": {"model_config": {"n_estimators": 5, "depth": 2, "num_threads": 1}},
        "evaluator_beam": {"model_config": {"n_layers": 1, "beam_width": 2}},
    },
    "latency_requests": 3,
}
MODELS = ["upstream", "dnn", "lambdamart", "catboost", "teacher", "nar_no_kd", "student_skd"]


def _config(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "runs").rglob("eval.json")}


def test_tiny_experiment_writes_summary_report_plots_and_reuses(tmp_path, capsys):
    models = MODELS
    out = tmp_path / "exp"
    argv = ["experiment", "offline", "--config", str(_config(tmp_path)), "--out", str(out), "--quiet",
            "--models", *models, "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "teacher seed 0: training" in captured.err
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rows"] == summary["rows"]
    # teacher needs the evaluator for its targets: the dependency is run and reported too.
    expected = ["evaluator_beam", "teacher"] + [m for m in models if m != "teacher"]
    assert [r["model"] for r in summary["rows"]] == expected
    for row in summary["rows"]:
        for key in FIGURES:
            assert key in row and f"{key}_std" in row, (row["model"], key)
            assert row[f"{key}_std"] is None  # one seed: no spread
        assert row["seeds"] == 1
        assert isinstance(row["normalized_utility"], float)
        assert row["ndcg@10"] is None  # the synthetic world has no graded labels
        assert isinstance(row["latency_ms_p50"], float)
    by = {r["model"]: r for r in summary["rows"]}
    assert by["upstream"]["ptar"] is None and by["upstream"]["collapse_rate"] is None
    # The student's agreement is measured against its own seed's teacher on the test split:
    # recompute it from the two saved checkpoints.
    from dualrerank.config import from_dict
    from dualrerank.models.checkpoint import load_checkpoint
    from dualrerank.train.distill import agreement_figures
    from dualrerank.train.experiment import ExperimentConfig
    from dualrerank.train.splits import load_splits

    exp_cfg = from_dict(ExperimentConfig, summary["config"])
    test = load_splits(exp_cfg.data).test.batch
    student = load_checkpoint(out / "runs" / "student_skd" / "seed0" / "checkpoint")
    teacher = load_checkpoint(out / "runs" / "teacher" / "seed0" / "checkpoint")
    again = agreement_figures(student, teacher, test, exp_cfg.data.page_length)
    assert by["student_skd"]["ptar"] == pytest.approx(again["ptar"])
    assert by["student_skd"]["exact_page"] == pytest.approx(again["exact_page"])
    assert 0.0 <= by["nar_no_kd"]["ptar"] <= 1.0
    assert 0.0 <= by["nar_no_kd"]["collapse_rate"] <= 1.0  # NAR rows expose logits
    assert by["evaluator_beam"]["collapse_rate"] is None  # no position x item logits
    assert by["upstream"]["params"] is not None and by["lambdamart"]["params"] is None
    assert by["catboost"]["params"] is None and isinstance(by["catboost"]["normalized_utility"], float)
    # The report names the better tree row; the student is measured against that one.
    best = summary["best_tree"]
    assert best["key"] == "normalized_utility" and best["row"] in ("lambdamart", "catboost")
    assert best["mean"] == max(by["lambdamart"]["normalized_utility"], by["catboost"]["normalized_utility"])
    assert best["student_skd"] == by["student_skd"]["normalized_utility"]
    # Each tree run took the run's seed and early-stopped on the validation split.
    for row in ("lambdamart", "catboost"):
        run = out / "runs" / row / "seed0"
        assert yaml.safe_load((run / "config.yaml").read_text())["model_config"]["seed"] == 0
        fit = json.loads((run / "checkpoint" / "config.json").read_text())["extra"]["fit"]
        assert "valid_ndcg@10" in fit and fit["best_iteration"] <= 5
    assert summary["commands"][0].startswith("dualrerank experiment offline --config ")
    assert summary["config"]["seeds"] == [0]
    assert (out / "runs" / "teacher" / "seed0" / "checkpoint").is_dir()
    report = (out / "report.md").read_text()
    assert "| model" in report and "dualrerank experiment offline" in report
    assert (out / "bars_normalized_utility.png").is_file()
    assert 0.0 <= by["student_skd"]["certified_ptar"] <= by["student_skd"]["ptar"] + 1e-9
    assert summary["latency"]["ratio"] > 0 and summary["latency"]["page_length"] == 4
    for name in ("curves_ptar.png", "curves_collapse.png", "curves_kd_loss.png"):
        assert (out / name).is_file(), name
    assert "ratio" in report and "curves_ptar.png" in report
    assert f"Best tree row by normalized_utility: {best['row']}" in report
    assert f"student_skd vs the best tree row ({best['row']})" in report

    before = _mtimes(out)
    assert len(before) == len(expected)
    assert main(argv[:-1] + ["--reuse"]) == 0
    err = capsys.readouterr().err
    assert "training into" not in err and err.count("reusing") == len(expected)
    assert _mtimes(out) == before
    again = json.loads((out / "summary.json").read_text())
    for a, b in zip(again["rows"], summary["rows"]):
        for key in ("normalized_utility", "ptar", "collapse_rate"):
            assert a[key] == pytest.approx(b[key]) if b[key] is not None else a[key] is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"models": ["teacher", "nope"]}, "unknown row"),
        ({"overrides": {"teacher": {"model_config": {"no_such_key": 1}}}}, "no_such_key"),
        ({"data": {"source": "letor", "path": "/no/such/folder"}}, "/no/such/folder"),
        ({"distill": {"seed": 3}}, "distill.seed"),
        ({"overrides": {"catboost": {"model_config": {"seed": 3}}}}, "overrides.catboost.model_config.seed"),
        ({"overrides": {"catboost": {"model_config": {"loss": "RMSE"}}}}, "YetiRank"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, changes, message):
    out = tmp_path / "exp"
    assert main(["experiment", "offline", "--config", str(_config(tmp_path, **changes)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (out / "runs").exists()


def test_unknown_model_on_the_command_line(tmp_path, capsys):
    assert main(["experiment", "offline", "--out", str(tmp_path / "x"), "--models", "teachr"]) == 2
    assert "teachr" in capsys.readouterr().err


def test_dependencies_are_planned_first():
    cfg = ExperimentConfig(models=["student_skd", "upstream", "seq2slate"])
    assert planned_rows(cfg) == ["evaluator_beam", "teacher", "upstream", "seq2slate", "student_skd"]
    logged = ExperimentConfig(models=["nar_no_kd", "dnn"])
    assert planned_rows(logged) == ["evaluator_beam", "teacher", "dnn", "nar_no_kd"]
    scorers = ExperimentConfig(models=["dnn", "upstream"])
    assert planned_rows(scorers) == ["upstream", "dnn"]
    with pytest.raises(ConfigError, match="target"):
        from_dict(ExperimentConfig, {"overrides": {"teacher": {"objective": {"target": "logged"}}}})


def test_tree_rows_take_the_run_seed():
    cfg = ExperimentConfig(models=["lambdamart", "catboost", "dnn"])
    for row in ("lambdamart", "catboost"):
        assert [train_config(cfg, row, seed).model_config["seed"] for seed in (0, 7)] == [0, 7]
    assert "seed" not in train_config(cfg, "dnn", 7).model_config  # torch models are seeded by the run itself


def test_tree_comparison_picks_the_better_tree_row():
    def row(model, ndcg, std, util=0.1):
        return {"model": model, "ndcg@10": ndcg, "ndcg@10_std": std, "normalized_utility": util}

    rows = [row("lambdamart", 0.501, 0.0), row("catboost", 0.505, 0.004), row("student_skd", 0.502, 0.002)]
    best = tree_comparison(rows)
    assert (best["key"], best["row"], best["mean"], best["others"]) == ("ndcg@10", "catboost", 0.505, {"lambdamart": 0.501})
    assert best["margin"] == 0.004 and best["student_within_one_std_or_above"] is True
    rows[2] = row("student_skd", 0.500, 0.002)
    assert tree_comparison(rows)["student_within_one_std_or_above"] is False
    # Without real labels the figure is normalized utility; one tree row alone is the best.
    synthetic = [row("lambdamart", None, None, util=0.45), row("student_skd", None, None, util=0.48)]
    best = tree_comparison(synthetic)
    assert (best["key"], best["row"], best["margin"], best["student_within_one_std_or_above"]) == (
        "normalized_utility", "lambdamart", 0.0, True)
    assert tree_comparison([row("student_skd", 0.5, None)]) is None
    assert "student_skd" not in tree_comparison(rows[:2])


def test_summary_mean_std_and_nulls():
    rows = summarize_rows({
        "a": [{"normalized_utility": 0.5, "ptar": None}, {"normalized_utility": 0.7, "ptar": None}],
        "b": [{"normalized_utility": float("nan"), "utility": 1.0}],
    })
    a, b = rows
    assert a["normalized_utility"] == pytest.approx(0.6)
    assert a["normalized_utility_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert a["ptar"] is None and a["ptar_std"] is None and a["seeds"] == 2
    assert b["normalized_utility"] is None and b["utility"] == 1.0 and b["utility_std"] is None


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["synthetic", "mq2008", "mslr", "mind"])
def test_shipped_configs_load_and_plan_every_row(name):
    from dualrerank.config import load_config
    from dualrerank.train.experiment import ROWS, check_experiment

    cfg = load_config(ExperimentConfig, REPO / "configs" / f"offline_{name}.yaml")
    assert sorted(check_experiment(cfg)) == sorted(ROWS)


def test_tree_benchmark_tabulates_rows_over_folds(tmp_path, capsys):
    """benchmarks/tree_baselines.py: one experiment per fold (the synthetic source ignores
    `data.fold`, so both folds are the same run and the std over folds is 0)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tree_baselines", REPO / "benchmarks" / "tree_baselines.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "trees"
    argv = ["--config", str(_config(tmp_path)), "--out", str(out), "--folds", "1", "2", "--metric", "normalized_utility",
            "--catboost-loss", "QueryRMSE"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "tree_baselines.json").read_text())
    by = {r["model"]: r for r in result["rows"]}
    assert list(by) == ["upstream", "lambdamart", "catboost", "catboost[QueryRMSE]"]
    for row in by.values():
        assert len(row["per_fold"]) == 2 and row["per_fold"][0] == pytest.approx(row["per_fold"][1])
        assert row["normalized_utility"] == pytest.approx(row["per_fold"][0]) and row["normalized_utility_std"] == pytest.approx(0.0)
    fit = json.loads((out / "fold1-QueryRMSE" / "runs" / "catboost" / "seed0" / "checkpoint" / "config.json").read_text())
    assert fit["config"]["loss"] == "QueryRMSE"
    assert "| catboost[QueryRMSE] |" in printed and "mean ± std over folds" in printed
