"""`dualrerank demo` end to end on a tiny config: every stage runs, the report names every
part, a re-run reuses the finished stages, and bad input is one line."""

from __future__ import annotations

import json

import pytest

from dualrerank.cli import main

TINY = """\
train_requests: 160
valid_requests: 40
test_requests: 40
d_model: 16
evaluator_epochs: 1
teacher_epochs: 1
distill_epochs: 1
online_steps: 4
shift_step: 2
online_batch: 8
eval_every: 2
ab_requests: 60
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    out = root / "out"
    assert main(["demo", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    return cfg, out


def test_demo_writes_report_summary_plots_and_a_servable_student(demo):
    _, out = demo
    summary = json.loads((out / "summary.json").read_text())
    models = [r["model"] for r in summary["rows"]]
    for name in ("upstream", "lambdamart", "nar_no_kd", "teacher", "student_skd", "ldro_student (online)", "grpo_student (online)"):
        assert name in models
    assert set(summary["stage_seconds"]) == {"world", "teacher", "student", "baselines", "online", "ab", "serve"}
    for png in ("normalized_utility.png", "distillation.png", "online.png"):
        assert (out / png).is_file(), png
    report = (out / "report.md").read_text()
    assert "dualrerank serve --checkpoint" in report and "Simulated A/B test" in report
    from dualrerank.models.checkpoint import load_checkpoint

    load_checkpoint(out / "serve")
    assert (out / "serve" / "student.onnx").is_file()


def test_demo_rerun_reuses_every_stage(demo, capsys):
    cfg, out = demo
    before = (out / "teacher" / "eval.json").stat().st_mtime
    capsys.readouterr()
    assert main(["demo", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count(": reused") == 7
    assert (out / "teacher" / "eval.json").stat().st_mtime == before


def test_demo_refuses_other_settings_in_the_same_out(demo, capsys):
    cfg, out = demo
    assert main(["demo", "--config", str(cfg), "--out", str(out), "--seed", "3", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err
