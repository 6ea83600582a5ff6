"""`dualrerank simulate` and the synthetic logs it writes (data/synthetic.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualrerank.cli import main
from dualrerank.data.synthetic import (
    generate_logs,
    load_logged_reformulate,
    load_logged_state,
    load_logs,
    load_synthetic,
    load_world,
)
from dualrerank.errors import DataError
from dualrerank.sim import WorldConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _simulate(out: Path, *extra: str) -> int:
    return main(["simulate", "--requests", "60", "--seed", "7", "--out", str(out), "--page-length", "6", *extra])


def test_simulate_writes_logs_and_summary(tmp_path, capsys):
    assert _simulate(tmp_path / "run", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("utility", "normalized_utility", "calibration", "logs", "requests", "page_length", "seed"):
        assert key in summary
    for policy in ("oracle", "greedy", "pointwise_oracle", "upstream", "logging", "random"):
        assert policy in summary["utility"] and policy in summary["normalized_utility"]
    for check in ("oracle_beats_upstream_by_10pct", "upstream_beats_random", "pointwise_oracle_at_most_0_7"):
        assert isinstance(summary["calibration"][check], bool)
    assert summary["requests"] == 60 and summary["page_length"] == 6
    # Every policy's normalized utility is the same affine map of its mean utility (one
    # random/oracle reference for all, ratio of sums over the same requests): the points
    # (U, NU) lie on one line through the random and upstream policies' points.
    u, nu = summary["utility"], summary["normalized_utility"]
    slope = (u["upstream"] - u["random"]) / (nu["upstream"] - nu["random"])
    for policy in u:
        assert u[policy] == pytest.approx(u["random"] + slope * (nu[policy] - nu["random"]), rel=1e-4), policy
    # The beam oracle is the best policy, and a uniformly random page is worth about 0.
    assert max(u, key=u.get) == "oracle" and max(nu, key=nu.get) == "oracle"
    assert abs(nu["random"]) < 0.1

    batch = load_logs(tmp_path / "run")
    assert batch.batch_size == 60 and batch.logged_page.shape == (60, 6)
    assert batch.feedback_names == ("click", "long_view", "watch_time") == batch.label_names
    # labels hold the realised feedback of shown candidates and 0 elsewhere
    shown = torch.zeros(60, batch.num_candidates, dtype=torch.bool).scatter(1, batch.logged_page, True)
    assert torch.equal(batch.labels.gather(1, batch.logged_page.unsqueeze(2).expand(-1, -1, 3)), batch.logged_feedback)
    assert bool((batch.labels[~shown] == 0).all())
    assert load_logged_reformulate(tmp_path / "run").shape == (60,)
    # the saved world and hidden state reproduce the summary's logging utility exactly
    world, state = load_world(tmp_path / "run"), load_logged_state(tmp_path / "run")
    u = world.expected_utility(state, batch.logged_page).double().mean()
    assert float(u) == pytest.approx(summary["utility"]["logging"], abs=1e-5)


def test_simulate_is_byte_identical_for_the_same_seed(tmp_path, capsys):
    assert _simulate(tmp_path / "a") == 0
    assert _simulate(tmp_path / "b") == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "summary.json" in files and "logs.safetensors" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert main(["simulate", "--requests", "60", "--seed", "8", "--out", str(tmp_path / "c"), "--page-length", "6"]) == 0
    assert (tmp_path / "c" / "logs.safetensors").read_bytes() != (tmp_path / "a" / "logs.safetensors").read_bytes()


def test_simulate_with_control_config_writes_nothing_without_out(tmp_path, capsys, monkeypatch):
    # Run from an empty working directory: a default output folder would land here.
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--requests", "40", "--config", str(CONFIGS / "control.yaml"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["normalized_utility"]["pointwise_oracle"] > 0.9
    assert not list(tmp_path.rglob("*")), "simulate wrote files without --out"
    # The same command with a relative --out writes there, so the check above can see a write.
    assert main(["simulate", "--requests", "40", "--config", str(CONFIGS / "control.yaml"), "--out", "run"]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--requests", "0"], "--requests"),
        (["--requests", "-5"], "--requests"),
        (["--page-length", "0"], "page_length"),
        (["--page-length", "51"], "page_length"),
    ],
)
def test_simulate_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    assert main(["simulate", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x").exists()


def test_simulate_unknown_config_key_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("response:\n  redundnacy: 1.0\n")
    assert main(["simulate", "--config", str(bad), "--requests", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "redundnacy" in err[0]


def test_generate_and_load_synthetic():
    a = generate_logs(WorldConfig(), 30, seed=3, L=5)
    b = generate_logs(None, 30, seed=3, L=5)
    assert torch.equal(a.candidates, b.candidates) and torch.equal(a.logged_feedback, b.logged_feedback)
    assert a.propensity.shape == (30,) and a.labels.shape == (30, 50, 3)
    c = load_synthetic(None, seed=4, num_requests=30)
    assert c.logged_page.shape == (30, 10) and not torch.equal(c.candidates, a.candidates)
    d = load_synthetic(str(CONFIGS / "control.yaml"), seed=3, num_requests=30)
    assert torch.equal(d.candidates[..., 1:], generate_logs(CONFIGS / "control.yaml", 30, 3).candidates[..., 1:])


def test_load_synthetic_reads_a_logs_folder_and_rejects_junk(tmp_path):
    assert _simulate(tmp_path / "run") == 0
    batch = load_synthetic(str(tmp_path / "run"), num_requests=25)
    assert batch.batch_size == 25
    with pytest.raises(DataError, match="meta.json"):
        load_logs(tmp_path)
    (tmp_path / "run" / "logs.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="corrupt"):
        load_logs(tmp_path / "run")
    with pytest.raises(Exception, match="neither"):
        load_synthetic(str(tmp_path / "nothing.yaml"))


def test_simulate_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["simulate", "--requests", "5", "--out", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"
