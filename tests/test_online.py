"""The joint online loop (train/online.py): every method runs and keeps finite parameters,
ratios are exactly 1 before the first update, a resumed run equals an uninterrupted one,
the stream scale re-estimates a unit change at once, and a reward spike moves no
parameter by more than the optimiser's step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualrerank.cli import main
from dualrerank.losses import clipped_policy_loss, group_advantage, position_weights
from dualrerank.models.checkpoint import load_checkpoint, save_checkpoint
from dualrerank.train.online import METHODS, OnlineConfig, RewardScale, run_online
from dualrerank.train.splits import SplitConfig, load_splits
from dualrerank.train.supervised import build_for_data

SMALL = {"encoder": {"d_model": 16, "n_heads": 2, "n_layers": 1}, "n_layers": 1, "n_heads": 2}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A distill-run layout of untrained tiny models: student/checkpoint naming the teacher,
    teacher/checkpoint and teacher/evaluator/checkpoint."""
    root = tmp_path_factory.mktemp("parts")
    train = load_splits(SplitConfig(train_requests=64, valid_requests=8, test_requests=8, page_length=4)).train
    teacher = build_for_data("teacher", SMALL, train, seed=1)
    evaluator = build_for_data("evaluator", {"encoder": SMALL["encoder"]}, train, seed=2)
    student = build_for_data("nar", SMALL, train, seed=3)
    save_checkpoint(teacher, root / "teacher" / "checkpoint", "teacher")
    save_checkpoint(evaluator, root / "teacher" / "evaluator" / "checkpoint", "evaluator")
    save_checkpoint(student, root / "student" / "checkpoint", "nar", extra={"distilled_from": str(root / "teacher")})
    return root / "student"


def _cfg(**kw) -> OnlineConfig:
    base = dict(steps=3, batch_size=8, group=4, page_length=4, eval_every=3, eval_requests=12, checkpoint_every=2)
    base.update(kw)
    return OnlineConfig(**base)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_and_keeps_parameters_finite(parts, tmp_path, method):
    result = run_online(_cfg(method=method), tmp_path / "run", parts, progress=False)
    assert result["steps"] == 3 and "eval/normalized_utility" in result
    student = load_checkpoint(tmp_path / "run" / "student")
    assert all(torch.isfinite(p).all() for p in student.parameters())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert "rewards/click/mean" in lines[0] and "policy/clipfrac" in lines[0]
    from dualrerank.metrics import describe_key

    undocumented = sorted({k for r in lines for k in r if describe_key(k) is None})
    assert not undocumented, f"online keys missing from metrics.ONLINE_KEYS / docs/metrics.md: {undocumented}"


def test_ratios_are_exactly_one_before_the_first_update(parts, tmp_path):
    run_online(_cfg(epochs=1, steps=1), tmp_path / "run", parts, progress=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["policy/ratio_max"] == 1.0 and first["policy/approx_kl"] == 0.0 and first["policy/clipfrac"] == 0.0


def test_resumed_run_equals_uninterrupted(parts, tmp_path):
    cfg = _cfg(steps=4, exposure="all")
    run_online(cfg, tmp_path / "whole", parts, progress=False)
    run_online(_cfg(steps=2, exposure="all"), tmp_path / "split", parts, progress=False)
    run_online(cfg, tmp_path / "split", parts, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "whole" / "student").state_dict()
    b = load_checkpoint(tmp_path / "split" / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def records(run):
        out = []
        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            r = {k: v for k, v in r.items() if not k.startswith("perf/")}
            # The shorter first leg evaluates at its own last step; the training figures must match.
            out.append({k: v for k, v in r.items() if not k.startswith("eval/")})
        return out

    assert records("whole") == records("split")


def test_online_cli_refuses_a_used_directory_and_resumes(parts, tmp_path, capsys):
    cfg = tmp_path / "o.yaml"
    cfg.write_text("steps: 2\nbatch_size: 8\ngroup: 4\npage_length: 4\neval_every: 2\neval_requests: 12\n")
    out = tmp_path / "run"
    assert main(["online", "--from", str(parts), "--config", str(cfg), "--out", str(out), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert main(["online", "--from", str(parts), "--config", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert main(["online", "--from", str(parts), "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_stream_scale_re_estimates_a_unit_change_at_once():
    scale = RewardScale(2, momentum=0.9, warmup=2, jump=10.0)
    for _ in range(5):
        scale.observe(torch.tensor([1.0, 2.0]))
    scale.observe(torch.tensor([1.0, 2000.0]))  # watch seconds -> ms
    assert torch.allclose(scale.ema, torch.tensor([1.0, 2000.0])) and scale.jumps == 1
    assert torch.allclose(scale.ref, torch.tensor([1.0, 2.0]))  # the calibration stays frozen
    scale.observe(torch.tensor([1.5, 2100.0]))  # an ordinary change is smoothed
    assert torch.allclose(scale.ema, torch.tensor([1.05, 2010.0]))


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "gdpo", "ldro"])
def test_a_reward_spike_moves_no_parameter_beyond_the_step(method):
    train = load_splits(SplitConfig(train_requests=16, valid_requests=4, test_requests=4, page_length=4)).train
    student = build_for_data("nar", SMALL, train, seed=0).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    p = METHODS[method]
    for step in range(3):
        z = student(train.candidates, train.context, train.candidate_mask, 4)
        pages = student.sample(train, 4, 4, generator=gen)
        from dualrerank.decoding import sequential_log_prob

        old = sequential_log_prob(z.detach(), train.candidate_mask, pages)
        rewards = torch.rand(16, 4, 2, generator=gen)
        if step == 1:
            rewards[0, 0, 0] = 1e6
        adv, _ = group_advantage(rewards, torch.ones(2), combine=p.combine, scale=p.scale,
                                 stream_scale=torch.ones(2 if p.combine == "after" else 1), batch_norm=p.batch_norm)
        before = [q.detach().clone() for q in student.parameters()]
        loss, _ = clipped_policy_loss(sequential_log_prob(z, train.candidate_mask, pages), old, adv,
                                      position_weights(4, p.weights))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        moved = max(float((q.detach() - b).abs().max()) for q, b in zip(student.parameters(), before))
        # Adam's per-coordinate step is bounded by lr * (1 - beta1) / sqrt(1 - beta2) after warm-up
        # bias correction; 10 x lr is a generous ceiling that a NaN or an unclipped 1e6 would break.
        assert moved <= 10 * 1e-3
        assert all(torch.isfinite(q).all() for q in student.parameters())


def test_curve_figures_by_hand():
    from dualrerank.train.online_experiment import curve_figures

    steps = [10, 20, 30, 40, 50, 60]
    nu = [0.1, 0.3, 0.5, 0.5, 0.2, 0.48]
    fig = curve_figures(steps, nu, shifts=[45.0], window=2)
    # An evaluation at x = 40 saw step index 39, before a shift at 40: it is not "after".
    assert curve_figures(steps, nu, shifts=[40.0], window=2)["recovery_steps"] == [20.0]
    assert fig["final_normalized_utility"] == pytest.approx(0.34)
    assert fig["auc_normalized_utility"] == pytest.approx(sum(nu) / 6)
    # 90% of the way from 0.1 to 0.34 is 0.316: first reached at step 30.
    assert fig["steps_to_90pct"] == 30
    # Level before the shift: mean(0.5, 0.5) = 0.5; back to >= 0.45 at step 60 -> 15 steps after it.
    assert fig["recovery_steps"] == [15.0]
    assert curve_figures(steps, [0.5, 0.4, 0.3, 0.2, 0.1, 0.0], [55.0], 1)["recovery_steps"] == [None]


def test_online_experiment_writes_summary_report_and_plots(parts, tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "methods: [grpo, ldro]\nseeds: [0]\nfinal_window: 1\n"
        "online: {steps: 4, batch_size: 8, group: 4, page_length: 4, eval_every: 2, eval_requests: 12}\n"
        "streams:\n  '0': {}\n  A:\n    drift: [{step: 2, kind: reward, dimension: watch_time, scale: 1000.0}]\n"
    )
    out = tmp_path / "exp"
    assert main(["experiment", "online", "--from", str(parts), "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"grpo", "ldro"} and set(summary["methods"]["ldro"]) == {"0", "A"}
    fig = summary["methods"]["ldro"]["A"]
    assert {"final_normalized_utility", "auc_normalized_utility", "steps_to_90pct", "recovery_steps"} <= set(fig)
    assert len(fig["recovery_steps"]) == 1
    for name in ("report.md", "curves_0.png", "curves_A.png", "curves_0.csv"):
        assert (out / name).is_file(), name
    assert "## Stream A" in (out / "report.md").read_text()


def test_online_without_from_trains_its_parts_first(tmp_path, monkeypatch):
    import dualrerank.train.online as online
    import dualrerank.train.supervised as supervised
    from dualrerank.train.splits import SplitConfig as RealSplit

    # Tiny default splits and epochs so the bootstrap runs in seconds.
    tiny = dict(train_requests=120, valid_requests=24, test_requests=24)
    monkeypatch.setattr("dualrerank.train.splits.SplitConfig",
                        lambda **kw: RealSplit(**{**tiny, **kw}))
    real_train = supervised.train_model

    def quick_train(cfg, run_dir, **kw):
        import dataclasses

        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=1),
                                  evaluator_optim=dataclasses.replace(cfg.evaluator_optim, epochs=1),
                                  model_config=SMALL, evaluator_config={"encoder": SMALL["encoder"]})
        return real_train(cfg, run_dir, **kw)

    monkeypatch.setattr(supervised, "train_model", quick_train)
    from dualrerank.train import distill as distill_mod

    real_distill = distill_mod.distill_model

    def quick_distill(cfg, run_dir, teacher_dir, **kw):
        import dataclasses

        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=1), model_config=SMALL)
        return real_distill(cfg, run_dir, teacher_dir, **kw)

    monkeypatch.setattr(distill_mod, "distill_model", quick_distill)
    student = online.bootstrap(_cfg(page_length=4), tmp_path / "boot", progress=False)
    assert (student / "checkpoint" / "config.json").is_file()
    assert (tmp_path / "boot" / "teacher" / "evaluator" / "checkpoint").is_dir()
    mtime = (student / "eval.json").stat().st_mtime
    online.bootstrap(_cfg(page_length=4), tmp_path / "boot", progress=False)  # reused, not retrained
    assert (student / "eval.json").stat().st_mtime == mtime
    run_online(_cfg(steps=2), tmp_path / "run", student, progress=False)


def test_lr_warmup_scales_every_learning_rate_by_step(parts, tmp_path):
    from dualrerank.train import online

    cfg = _cfg(lr_warmup_steps=4, lr=1e-3, teacher_lr=2e-4, evaluator_lr=3e-4)
    seen = []
    real = online._warm_up

    def spy(state, c):
        real(state, c)
        seen.append((state.step, state.student_opt.param_groups[0]["lr"], state.teacher_opt.param_groups[0]["lr"]))

    online._warm_up = spy
    try:
        run_online(cfg, tmp_path / "run", parts, progress=False)
    finally:
        online._warm_up = real
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert [round(lr, 8) for _, lr, _ in seen] == [2.5e-4, 5e-4, 7.5e-4]
    assert [round(t, 8) for _, _, t in seen] == [5e-5, 1e-4, 1.5e-4]


def test_bad_from_writes_nothing(tmp_path, capsys):
    for argv in (["online", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"), "--quiet"],
                 ["experiment", "online", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "does not exist" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
