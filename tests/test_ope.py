"""Off-policy evaluation (train/ope.py, `dualrerank ope`): every estimator against values
worked out by hand, the rebuilt logging policy against the world's own propensities and an
enumeration of its marginals, estimators of the logging policy itself on a tiny simulated log,
the command end to end on a tiny world (unbiased estimators near the exact truth, every key
documented), and one-line refusals of bad inputs."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats

from dualrerank.cli import main
from dualrerank.config import from_dict
from dualrerank.data.synthetic import simulate_logs
from dualrerank.errors import ConfigError
from dualrerank.metrics import OPE_KEYS, describe_key
from dualrerank.models.checkpoint import save_checkpoint
from dualrerank.sim import World, WorldConfig
from dualrerank.sim.policies import logging_pages
from dualrerank.train.ope import (
    ESTIMATORS,
    LoggingPolicy,
    OpeConfig,
    OpeInputs,
    deterministic_inputs,
    direct,
    doubly_robust,
    estimate_all,
    interval,
    ips,
    position_ips,
    self_normalised_dr,
    snips,
    weight_stats,
)
from dualrerank.train.supervised import build_for_data

F = torch.float64
Z95 = float(stats.norm.ppf(0.975))
# A world small enough that logged pages often equal the upstream sort's (6 candidates, pages
# of 2): whole-page estimators have support, and a run takes about a second.
TINY_WORLD = {"page_length": 2, "requests": {"num_candidates": 6}, "catalogue": {"num_items": 300}}


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F)


# ---------------------------------------------------------------------------- hand-worked values
def test_ips_and_its_normal_interval():
    # terms w R = (4, 0, 0): mean 4/3; sd of the terms = 4/sqrt(3), so se = 4/3.
    terms = ips(t([2.0, 0.0, 3.0]), t([2.0, 0.0, 0.0]))
    assert terms.value() == pytest.approx(4 / 3)
    se, lo, hi = interval(terms, 0.95)
    assert se == pytest.approx(4 / 3)
    assert (lo, hi) == pytest.approx((4 / 3 - Z95 * 4 / 3, 4 / 3 + Z95 * 4 / 3))


def test_snips_and_its_delta_method_interval():
    # sum w R = 2*2 = 4, sum w = 3 -> 4/3. Influence terms r + (w R - r w) / mean(w):
    # (4/3 + 4 - 8/3, 4/3 - 4/3, 4/3) = (8/3, 0, 4/3), sd 4/3, se 4 / (3 sqrt 3).
    terms = snips(t([2.0, 0.0, 3.0]), t([2.0, 1.0, 0.0]))
    assert terms.value() == pytest.approx(4 / 3)
    assert terms.influence().tolist() == pytest.approx([8 / 3, 0.0, 4 / 3])
    assert interval(terms, 0.95)[0] == pytest.approx(4 / (3 * math.sqrt(3)))


def test_position_ips_direct_and_doubly_robust():
    reward = t([[1.0, 0.0], [0.0, 2.0]])
    # pi: (2*1 + 0) and (0 + 4*2) -> mean 5
    assert position_ips(reward, t([[2.0, 0.0], [0.0, 4.0]])).value() == pytest.approx(5.0)
    assert direct(t([1.0, 3.0])).value() == pytest.approx(2.0)
    predicted = t([[0.25, 0.5], [0.5, 0.5]])
    # whole-page weight (2, 0): 1 + 2 * ((1 - .25) + (0 - .5)) = 1.5 and 3 -> 2.25
    assert doubly_robust(t([1.0, 3.0]), reward, predicted, t([[2.0], [0.0]])).value() == pytest.approx(2.25)
    # per-position weights: 1 + 2*.75 + 0 = 2.5 and 3 + 0 + 4*1.5 = 9 -> 5.75
    assert doubly_robust(t([1.0, 3.0]), reward, predicted, t([[2.0, 0.0], [0.0, 4.0]])).value() == pytest.approx(5.75)


def test_self_normalised_dr_per_position():
    # position 1: sum w e = 2*(1 - .5) + 1*(0 - .5) = .5 over sum w = 3 -> 1/6; position 2 has no
    # weight, so it keeps the direct method's value: 2 + 1/6.
    terms = self_normalised_dr(t([1.0, 3.0]), t([[1.0, 0.0], [0.0, 2.0]]), t([[0.5, 0.5], [0.5, 0.5]]),
                               t([[2.0, 0.0], [1.0, 0.0]]))
    assert terms.value() == pytest.approx(2 + 1 / 6)
    assert terms.influence().mean().item() == pytest.approx(2 + 1 / 6)


def test_weight_stats():
    s = weight_stats(t([2.0, 0.0, 2.0]))  # (4)^2 / 8 = 2
    assert (s["ess"], s["ess_share"], s["weight_max"], s["nonzero_share"]) == pytest.approx((2.0, 2 / 3, 2.0, 2 / 3))
    s = weight_stats(t([[1.0, 4.0], [1.0, 0.0]]))  # per position: 4/2 = 2 and 16/16 = 1
    assert s["ess_by_position"] == pytest.approx([2.0, 1.0]) and s["ess"] == pytest.approx(1.0)


def test_deterministic_weights_by_hand():
    target = torch.tensor([[0, 1, 2]] * 3)
    logged = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2]])
    marginals = t([[0.5, 0.25, 0.2]] * 3)
    prefix = t([[0.5, 0.1, 0.05]] * 3)
    x = deterministic_inputs(target, logged, torch.tensor([0.05, 0.02, 0.01]), torch.zeros(3, 3, dtype=F),
                             marginals=marginals, prefix_prob=prefix)
    assert x.page_weight.tolist() == pytest.approx([20.0, 0.0, 0.0])
    assert torch.allclose(x.position_weight, t([[2, 4, 5], [2, 0, 0], [0, 0, 5]]))
    assert torch.allclose(x.prefix_weight, t([[2, 10, 20], [2, 0, 0], [0, 0, 0]]))


def test_statuses_without_support_or_inputs():
    x = OpeInputs(reward=t([[1.0, 0.0], [0.0, 1.0]]), page_weight=t([0.0, 0.0]))
    out = estimate_all(x, list(ESTIMATORS))
    assert out["ips"]["status"] == "no support" and out["ips"]["estimate"] == 0.0
    assert out["snips"]["status"] == "not run" and "estimate" not in out["snips"]
    assert out["pi"]["status"] == "not run" and "marginals" in out["pi"]["reason"]
    assert out["dm"]["status"] == "not run" and "evaluator" in out["dm"]["reason"]


def test_bootstrap_interval_agrees_with_the_normal_one():
    g = torch.Generator().manual_seed(0)
    reward = torch.rand(4000, generator=g, dtype=F) * 2
    w = (torch.rand(4000, generator=g, dtype=F) < 0.3).to(F) * 3
    for terms in (ips(reward, w), snips(reward, w)):
        _, lo_n, hi_n = interval(terms, 0.95)
        _, lo_b, hi_b = interval(terms, 0.95, "bootstrap", resamples=400, seed=1)
        assert lo_b < terms.value() < hi_b
        assert (hi_b - lo_b) == pytest.approx(hi_n - lo_n, rel=0.15)
        assert (lo_b + hi_b) / 2 == pytest.approx(terms.value(), abs=0.1 * (hi_n - lo_n))


def test_config_refuses_unknown_estimators():
    with pytest.raises(ConfigError, match="estimators"):
        from_dict(OpeConfig, {"estimators": ["ips", "magic"]})


# ---------------------------------------------------------------------------- the logging policy
def test_prefix_probabilities_by_hand():
    logits = t([[0.0, math.log(2.0), math.log(3.0)]])
    policy = LoggingPolicy(logits, torch.ones(1, 3, dtype=torch.bool), 0.5)
    got = policy.prefix_log_prob(torch.tensor([[2, 0]])).exp()
    # Plackett-Luce: 3/6, then 1/(1+2); uniform: 1/3, then 1/2.
    assert got[0].tolist() == pytest.approx([0.5 * 1 / 3 + 0.5 * 3 / 6, 0.5 * 1 / 6 + 0.5 * (3 / 6) * (1 / 3)])


def test_rebuilt_policy_reproduces_the_worlds_propensities():
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(64, 9, generator=g)
    mask = torch.ones(64, 9, dtype=torch.bool)
    mask[:8, 7:] = False  # some requests with padding
    pages, propensity = logging_pages(upstream, mask, 4, 0.5, 0.3, g)
    policy = LoggingPolicy((upstream.double() / 0.5).masked_fill(~mask, float("-inf")), mask, 0.3)
    assert torch.allclose(policy.page_prob(pages), propensity.double(), rtol=1e-5)


def test_position_marginals_match_enumeration():
    logits = t([[1.0, 0.0, -0.5, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    policy = LoggingPolicy(logits, mask, 0.3)
    exact = torch.zeros(4, 2, dtype=F)  # item, position
    for page in itertools.permutations(range(4), 2):
        p = float(policy.page_prob(torch.tensor([page])))
        for pos, item in enumerate(page):
            exact[item, pos] += p
    items = torch.arange(4).view(1, 4, 1).expand(1, 4, 2)  # every item at both positions
    got = policy.position_marginals(items, 4000, torch.Generator().manual_seed(0))[0]
    assert got.sum(0).tolist() == pytest.approx([1.0, 1.0])  # each position's marginals sum to one
    assert torch.allclose(got, exact, atol=0.01)


# ---------------------------------------------------------------------------- on simulated logs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ope")
    (root / "world.yaml").write_text(yaml.safe_dump(TINY_WORLD))
    world = World(from_dict(WorldConfig, TINY_WORLD), seed=0)
    logs = simulate_logs(world, 3000, seed=11)
    policy = root / "upstream"
    save_checkpoint(build_for_data("upstream", {}, logs.batch, 0), policy / "checkpoint", "upstream")
    evaluator = build_for_data("evaluator", {"encoder": {"d_model": 8, "n_heads": 2, "n_layers": 1}, "n_layers": 1},
                               logs.batch, 0)
    save_checkpoint(evaluator, policy / "evaluator" / "checkpoint", "evaluator")
    return {"root": root, "world": world, "logs": logs, "policy": policy}


def test_logging_policy_as_its_own_target_recovers_its_realised_mean(tiny):
    logs, world = tiny["logs"], tiny["world"]
    b = logs.batch
    page = b.logged_page.long()
    reward = ((b.logged_feedback[..., 0] > 0).to(F) + (b.logged_feedback[..., 1] > 0).to(F))
    policy = LoggingPolicy.of_world(world, b)
    # The target is the logging policy: its probabilities over those the logs recorded.
    own = policy.prefix_log_prob(page).exp()
    marg = [policy.position_marginals(page.unsqueeze(1), 400, torch.Generator().manual_seed(s))[:, 0] for s in (1, 2)]
    predicted = torch.full_like(reward, 0.3)
    x = OpeInputs(reward=reward, page_weight=own[:, -1] / b.propensity.to(F), position_weight=marg[0] / marg[1],
                  prefix_weight=own / own, value=predicted.sum(1), predicted=predicted)
    realised = float(reward.sum(1).mean())
    exact = float((lambda e: (e.click + e.long_view).sum(-1).mean())(world.expectation(logs.state, page)))
    out = estimate_all(x, list(ESTIMATORS))
    for name in ("ips", "snips", "dr", "cascade_dr", "cascade_sndr"):  # weights 1: the realised mean itself
        assert out[name]["estimate"] == pytest.approx(realised, rel=1e-5), name
    # pi's weights are a ratio of two Monte-Carlo marginals: close to 1, not exactly.
    assert out["pi"]["estimate"] == pytest.approx(realised, rel=0.02)
    assert out["dm"]["estimate"] == pytest.approx(0.6)  # the constant prediction, no correction
    assert abs(out["ips"]["estimate"] - exact) < 4 * out["ips"]["se"]  # and the truth is near


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _keys(record: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in record.items():
        name = prefix + key
        keys.append(name)
        if isinstance(value, dict) and name != "config":
            keys += _keys(value, name + ".")
    return keys


def test_ope_command_end_to_end(tiny):
    root = tiny["root"]
    out = root / "out"
    argv = ["ope", "--policy", str(tiny["policy"]), "--data", "synthetic", "--path", str(root / "world.yaml"),
            "--requests", "4000", "--out", str(out), "--seed", "5", "--quiet", "--json"]
    code, stdout, _ = _cli(argv)
    assert code == 0
    summary = json.loads(stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert (out / "report.md").is_file() and yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5
    undocumented = [k for k in _keys(summary) if describe_key(k) is None]
    assert not undocumented, f"summary.json keys not in metrics.OPE_KEYS / docs/metrics.md: {undocumented}"
    written = {".".join(["estimators", "<name>", *k.split(".")[2:]]) if k.startswith("estimators.") else k
               for k in _keys(summary)}
    assert set(OPE_KEYS) <= written, f"documented but not written: {set(OPE_KEYS) - written}"
    truth = summary["truth"]
    est = summary["estimators"]
    assert summary["data"]["requests"] == 4000 and est["ips"]["nonzero_share"] > 0.05
    # Unbiased here (propensities exact; the cascade assumption holds in the world), whatever
    # the untrained evaluator predicts: within 4 standard errors of the exact truth.
    for name in ("ips", "snips", "dr", "cascade_dr"):
        assert est[name]["status"] == "ok", name
        assert abs(est[name]["estimate"] - truth) < 4 * est[name]["se"], (name, est[name], truth)
        assert est[name]["error"] == pytest.approx(est[name]["estimate"] - truth)
    assert len(est["cascade_dr"]["ess_by_position"]) == 2 and est["ips"]["ess_by_position"] is None
    # The same --out again is refused (one line), and replaced with --overwrite.
    code, _, err = _cli(argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert _cli(argv + ["--overwrite"])[0] == 0


def test_bad_policy_is_one_line(tiny, tmp_path):
    code, _, err = _cli(["ope", "--policy", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--policy" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(["ope", "--policy", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--policy" in err


def test_logs_without_propensities_are_one_line(tiny, tmp_path):
    letor = tmp_path / "letor.txt"
    letor.write_text("".join(f"{r} qid:{q} 1:{0.1 * i} 2:{0.3 * r} # docid = d{q}-{i}\n"
                             for q in (1, 2) for i, r in enumerate((2, 0, 1))))
    mind = tmp_path / "mind"
    mind.mkdir()
    (mind / "news.tsv").write_text("N1\tsports\tsoccer\tT\tA\tu\t[]\t[]\nN2\tnews\tworld\tT\tA\tu\t[]\t[]\n")
    (mind / "behaviors.tsv").write_text("1\tU1\t11/11/2019 1:05:00 PM\tN1\tN1-1 N2-0\n"
                                        "2\tU2\t11/12/2019 2:05:00 PM\tN2\tN2-1 N1-0\n")
    for source, path in (("letor", letor), ("mind", mind)):
        code, _, err = _cli(["ope", "--policy", str(tiny["policy"]), "--data", source, "--path", str(path),
                             "--out", str(tmp_path / f"out_{source}"), "--quiet"])
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "propensity" in err and source in err
        assert not (tmp_path / f"out_{source}").exists()  # refused before anything is written


def test_logs_without_a_page_mask_count_every_position():
    import dataclasses

    from dualrerank.sim import World
    from dualrerank.train.ope import _check_logs

    batch = simulate_logs(World(), 20, seed=3, page_length=4).batch
    assert _check_logs(dataclasses.replace(batch, logged_page_mask=None), "synthetic") == 4
