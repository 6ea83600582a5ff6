"""Run files that cannot execute code, run directories that cannot be silently corrupted,
config values checked at load, resume from any phase, and one line for every user mistake
(issue 8: each test here failed before the fix)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dualrerank.api import DualReranker
from dualrerank.cli import main
from dualrerank.config import load_config
from dualrerank.errors import CheckpointError, ConfigError, TrainingError
from dualrerank.models.checkpoint import load_checkpoint, save_checkpoint
from dualrerank.train.runstate import clean_stale, load_snapshot, prepare_run_dir
from dualrerank.train.supervised import TrainConfig

TINY = {
    "data": {"train_requests": 160, "valid_requests": 40, "test_requests": 40, "page_length": 4},
    "optim": {"epochs": 2, "batch_size": 80},
    "evaluator_optim": {"epochs": 2, "batch_size": 80},
    "objective": {"target": "logged"},
    "model_config": {"encoder": {"d_model": 16, "n_heads": 2, "n_layers": 1}, "n_layers": 1, "n_heads": 2},
    "evaluator_config": {"encoder": {"d_model": 16, "n_heads": 2, "n_layers": 1}},
}


def _config(tmp_path: Path, name: str = "cfg.yaml", **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        node = cfg
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err  # notes may precede the one error line
    return errors[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished 2-epoch teacher run (tests copy it before changing it)."""
    base = tmp_path_factory.mktemp("trained")
    out = base / "run"
    assert main(["train", "--model", "teacher", "--config", str(_config(base)), "--out", str(out), "--quiet"]) == 0
    return out


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


# --------------------------------------------------------------------------- security


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_malicious_pickle_and_runs_nothing(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    with open(run / "last.pt", "wb") as fh:
        pickle.dump({"model": exploit}, fh)
    rc = main(["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"])
    err = _one_line_error(capsys, rc)
    assert "refused" in err and "last.pt" in err
    assert not marker.exists()
    # The same file through torch.save's zip format is refused too.
    torch.save({"model": exploit}, run / "last.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_snapshot(run / "last.pt")
    assert not marker.exists()


def test_resume_from_random_bytes_is_one_line(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    (run / "last.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    err = _one_line_error(capsys, main(["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"]))
    assert "last.pt" in err


@pytest.mark.parametrize("files", [None, {}])
def test_checkpoint_without_manifest_is_refused(trained_run, tmp_path, files):
    ckpt = _copy(trained_run / "checkpoint", tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    if files is None:
        del meta["files"]
    else:
        meta["files"] = files
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_checkpoint_manifest_is_confined_to_its_directory(trained_run, tmp_path, name):
    ckpt = _copy(trained_run / "checkpoint", tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["files"][name] = meta["files"]["model.safetensors"]
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a file name inside"):
        load_checkpoint(ckpt)


def test_checkpoint_manifest_must_list_the_weights(trained_run, tmp_path):
    ckpt = _copy(trained_run / "checkpoint", tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    (ckpt / "other.bin").write_bytes(b"x")
    import hashlib

    meta["files"] = {"other.bin": hashlib.sha256(b"x").hexdigest()}
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not list model.safetensors"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------- run directories


def test_rerun_into_a_run_directory_is_refused_and_overwrite_starts_over(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    cfg = _config(tmp_path)
    err = _one_line_error(capsys, main(["train", "--model", "teacher", "--config", str(cfg), "--out", str(run), "--quiet"]))
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before
    cfg1 = _config(tmp_path, "one.yaml", **{"optim.epochs": 1})
    assert main(["train", "--model", "teacher", "--config", str(cfg1), "--out", str(run), "--overwrite", "--quiet"]) == 0
    assert _epochs(run) == [1]
    assert "## " in (run / "report.md").read_text()


def test_distill_into_the_teachers_run_is_refused(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "teacher")
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    for extra in ([], ["--overwrite"]):
        rc = main(["distill", "--teacher", str(run), "--out", str(run), "--quiet", *extra])
        assert "reads from" in _one_line_error(capsys, rc)
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == weights


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    rc = main(["train", "--model", "upstream", "--out", str(target), "--quiet"])
    assert "existing file" in _one_line_error(capsys, rc)


def test_resume_and_overwrite_together_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="contradict"):
        prepare_run_dir(tmp_path / "r", resume=True, overwrite=True)


def test_stale_temp_files_are_cleaned_and_an_interrupted_replace_is_undone(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path / "run")
    (run / ".last.pt.abc123.tmp").write_bytes(b"partial")
    (run / ".checkpoint.tmp-1a2b").mkdir()
    aside = run / ".checkpoint.old-deadbeef"
    os.replace(run / "checkpoint", aside)  # killed between the two renames of save_checkpoint
    touched = clean_stale(run)
    assert (run / "checkpoint" / "config.json").is_file()
    assert not aside.exists() and not (run / ".checkpoint.tmp-1a2b").exists()
    assert not (run / ".last.pt.abc123.tmp").exists()
    assert len(touched) == 3
    load_checkpoint(run / "checkpoint")


def test_written_files_respect_the_umask(tmp_path, trained_run):
    old = os.umask(0o022)
    try:
        model = load_checkpoint(trained_run / "checkpoint")
        target = save_checkpoint(model, tmp_path / "ckpt", "teacher")
    finally:
        os.umask(old)
    assert (target.stat().st_mode & 0o777) == 0o755
    assert (target / "config.json").stat().st_mode & 0o777 == 0o644
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (trained_run / "eval.json").stat().st_mode & 0o044  # group/other may read


# --------------------------------------------------------------------------- resume


def test_metrics_line_of_an_epoch_without_snapshot_is_not_kept_twice(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path / "run")
    # Killed after epoch 3's metrics line was appended but before its last.pt was written:
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 3, "train_loss": 1.0}) + "\n")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"]) == 0
    assert _epochs(run) == [1, 2, 3]


def test_resume_after_edited_config_names_the_mismatch(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model_config"]["encoder"]["d_model"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    err = _one_line_error(capsys, main(["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"]))
    assert "shape" in err and "expects" in err


def test_resume_continues_a_run_killed_after_its_evaluator(tmp_path, monkeypatch):
    import dualrerank.train.supervised as sup

    cfg = load_config(TrainConfig, _config(tmp_path, **{"objective.target": "evaluator", "optim.epochs": 1}))
    run = tmp_path / "run"
    real = sup.evaluator_targets

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sup, "evaluator_targets", killed)
    with pytest.raises(KeyboardInterrupt):
        sup.train_model(cfg, run, progress=False)
    ev_lines = (run / "evaluator" / "metrics.jsonl").read_text()
    assert len(ev_lines.splitlines()) == 2
    monkeypatch.setattr(sup, "evaluator_targets", real)
    result = sup.train_model(cfg, run, resume=True, progress=False)
    assert (run / "evaluator" / "metrics.jsonl").read_text() == ev_lines  # not trained again
    assert _epochs(run) == [1]
    assert set(result["phase_seconds"]) >= {"evaluator", "evaluator_targets", "teacher"}


def test_resume_continues_an_evaluator_killed_mid_training(tmp_path, monkeypatch):
    import dualrerank.train.supervised as sup

    cfg = load_config(TrainConfig, _config(tmp_path, **{"objective.target": "evaluator", "optim.epochs": 1}))
    run = tmp_path / "run"
    real = sup.validation_score
    calls = {"n": 0}

    def dies_on_second_validation(model, split, L):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(model, split, L)

    monkeypatch.setattr(sup, "validation_score", dies_on_second_validation)
    with pytest.raises(KeyboardInterrupt):
        sup.train_model(cfg, run, progress=False)
    assert _epochs(run / "evaluator") == [1]
    monkeypatch.setattr(sup, "validation_score", real)
    sup.train_model(cfg, run, resume=True, progress=False)
    assert _epochs(run / "evaluator") == [1, 2]
    assert _epochs(run) == [1]


# --------------------------------------------------------------------------- config domains


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("optim.lr", 0.0, "optim.lr"),
        ("optim.lr", -1e-3, "optim.lr"),
        ("optim.lr", float("inf"), "optim.lr"),
        ("optim.lr", float("nan"), "optim.lr"),
        ("optim.batch_size", 0, "optim.batch_size"),
        ("optim.epochs", 0, "optim.epochs"),
        ("optim.patience", 0, "optim.patience"),
        ("evaluator_optim.lr", float("inf"), "evaluator_optim.lr"),
    ],
)
def test_config_values_outside_their_domain_are_refused_at_load(tmp_path, capsys, key, value, field):
    cfg = _config(tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TrainConfig, cfg)
    err = _one_line_error(capsys, main(["train", "--model", "teacher", "--config", str(cfg), "--out",
                                        str(tmp_path / "run"), "--quiet"]))
    assert field in err and "checkpoint" not in err


@pytest.mark.parametrize("model", ["teacher", "nar"])
@pytest.mark.parametrize("value", [1.0, -0.1])
def test_dropout_outside_unit_interval_is_refused(tmp_path, capsys, model, value):
    cfg = _config(tmp_path, **{"model_config.dropout": value})
    rc = main(["train", "--model", model, "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    assert "dropout" in _one_line_error(capsys, rc)


def test_help_shows_the_domain():
    from dualrerank.config import describe_config

    lines = describe_config(TrainConfig)
    assert any(line.startswith("optim.lr (0.001) [> 0]") for line in lines)


def test_non_finite_loss_stops_at_the_first_step(tmp_path):
    from dualrerank.train.loop import OptimConfig, fit
    from dualrerank.train.splits import SplitConfig, load_splits
    from dualrerank.train.supervised import build_for_data

    splits = load_splits(SplitConfig(**TINY["data"]))
    model = build_for_data("dnn", {}, splits.train, seed=0)
    steps = {"n": 0}

    def objective(m, batch, extras, gen):
        steps["n"] += 1
        return (m.scores(batch) * float("inf")).sum(), {}

    with pytest.raises(TrainingError, match=r"epoch 1, step 1 .*optim\.lr"):
        fit(model, splits.train, {}, objective, lambda m: {"score": 0.0}, lambda *a: None,
            OptimConfig(epochs=2, batch_size=80), tmp_path / "run", seed=0, progress=False)
    assert steps["n"] == 1


# --------------------------------------------------------------------------- one-line errors


def test_config_file_with_invalid_utf8_or_a_directory_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"optim:\n  lr: \xff\xfe\n")
    rc = main(["train", "--config", str(bad), "--out", str(tmp_path / "r1"), "--quiet"])
    assert "UTF-8" in _one_line_error(capsys, rc)
    rc = main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "r2"), "--quiet"])
    assert "is a directory" in _one_line_error(capsys, rc)


def test_version_flag(capsys):
    from dualrerank import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dualrerank {__version__}"


def test_broken_pipe_is_not_a_traceback(tmp_path):
    # `dualrerank ... | head -c 1`: the reader leaves after one byte.
    proc = subprocess.run(
        f"{sys.executable} -m dualrerank.cli data inspect --source synthetic --num-requests 30 --json | head -c 1",
        shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("bad", [np.zeros((2, 5, 3)), "requests", 3])
def test_rerank_says_what_it_expects(trained_run, bad):
    model = DualReranker.load(trained_run)
    with pytest.raises(ConfigError, match="expected a RerankBatch"):
        model.rerank(bad, k=4)


def test_rerank_of_a_list_of_requests_points_to_collate(trained_run):
    from dualrerank.schema import Request

    model = DualReranker.load(trained_run)
    req = Request(candidates=np.zeros((5, 3), dtype=np.float32), context=np.zeros(2, dtype=np.float32))
    with pytest.raises(ConfigError, match="collate"):
        model.rerank([req], k=4)


# --------------------------------------------------------------------------- the first hour


def test_evaluate_reads_a_run_directory_and_uses_its_data_settings(trained_run, capsys):
    capsys.readouterr()
    for path in (trained_run, trained_run / "checkpoint"):
        assert main(["evaluate", "--checkpoint", str(path), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["requests"] == TINY["data"]["test_requests"]
        assert result["page_length"] == TINY["data"]["page_length"]


def test_evaluate_reads_a_distill_run(trained_run, tmp_path, capsys):
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"optim": {"epochs": 1, "batch_size": 80}, "model_config": TINY["model_config"]}))
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(trained_run), "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "using the teacher's data settings" in err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["train_requests"] == TINY["data"]["train_requests"]
    assert main(["evaluate", "--checkpoint", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == TINY["data"]["test_requests"]


def test_evaluate_seed_is_not_a_data_seed(trained_run, capsys):
    rc = main(["evaluate", "--checkpoint", str(trained_run), "--seed", "1"])
    assert "--data-seed" in _one_line_error(capsys, rc)


def test_loader_options_are_accepted_by_training_configs(tmp_path):
    cfg = _config(tmp_path, **{"data.letor.max_candidates": 50, "data.letor.standardize": "none",
                               "data.mind.max_candidates": 30})
    loaded = load_config(TrainConfig, cfg)
    assert loaded.data.letor.max_candidates == 50 and loaded.data.letor.standardize == "none"
    assert loaded.data.mind.max_candidates == 30


def test_report_training_time_counts_every_phase(tmp_path):
    cfg = _config(tmp_path, **{"objective.target": "evaluator", "optim.epochs": 1, "evaluator_optim.epochs": 1})
    out = tmp_path / "run"
    assert main(["train", "--model", "teacher", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    phases = json.loads((out / "eval.json").read_text())["phase_seconds"]
    assert {"data", "evaluator", "evaluator_targets", "teacher", "test"} <= set(phases)
    line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("- training time"))
    assert "evaluator targets" in line and "teacher" in line
    assert float(line.split(":")[1].split()[0]) >= phases["evaluator"] + phases["teacher"] - 0.2


def test_report_to_tensorboard_writes_event_files_with_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = _config(tmp_path, **{"optim.epochs": 2})
    assert main(["train", "--model", "teacher", "--config", str(cfg), "--out", str(out), "--quiet",
                 "--report-to", "tensorboard"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "valid_normalized_utility", "valid_score"} <= tags
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]
    logged = [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train_loss")] == pytest.approx(logged, rel=1e-6)
