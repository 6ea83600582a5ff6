"""The simulated world: determinism, shapes, valid pages, exactness of the expected utility."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dualrerank.config import from_dict
from dualrerank.errors import ConfigError, DataError
from dualrerank.schema import RerankBatch
from dualrerank.sim import Feedback, World, WorldConfig, WorldState

L = 10


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(), seed=0)


@pytest.fixture(scope="module")
def sample(world):
    return world.sample_requests(96, 1)


def _assert_valid_pages(pages: torch.Tensor, mask: torch.Tensor, L: int) -> None:
    assert pages.dtype == torch.int64 and pages.shape[-1] == L
    flat = pages.reshape(pages.shape[0], -1)
    assert bool(mask.gather(1, flat).all()), "a page shows a padded candidate"
    s = pages.sort(dim=-1).values
    assert bool((s[..., 1:] != s[..., :-1]).all()), "a page repeats a candidate"


def test_same_seed_same_world_and_requests():
    a, b = World(WorldConfig(), 3), World(WorldConfig(), 3)
    sa, ba = a.sample_requests(20, 5)
    sb, bb = b.sample_requests(20, 5)
    for name in ("candidates", "context", "item_ids", "upstream_score"):
        assert torch.equal(getattr(ba, name), getattr(bb, name)), name
    assert torch.equal(sa.topic, sb.topic) and torch.equal(sa.match, sb.match)
    pages = a.random_pages(sa, L, 1)
    assert torch.equal(a.expected_utility(sa, pages), b.expected_utility(sb, pages))
    fa, fb = a.sample_feedback(sa, pages, 9), b.sample_feedback(sb, pages, 9)
    assert torch.equal(fa.stacked(), fb.stacked()) and torch.equal(fa.reformulate, fb.reformulate)
    assert torch.equal(a.oracle_pages(sa, L), b.oracle_pages(sb, L))
    # another request seed: other requests of the same world
    sc, _ = a.sample_requests(20, 6)
    assert not torch.equal(sa.item_ids, sc.item_ids)
    # another world seed: another catalogue
    assert not torch.equal(World(WorldConfig(), 4).catalogue.topic, a.catalogue.topic)


def test_batch_is_observable_and_validated(world, sample):
    state, batch = sample
    assert isinstance(batch, RerankBatch) and isinstance(state, WorldState)
    B, n = 96, world.config.requests.num_candidates
    assert batch.candidates.shape == (B, n, len(world.candidate_feature_names))
    assert batch.context.shape == (B, len(world.context_feature_names))
    assert batch.labels is None and batch.logged_page is None
    assert torch.equal(batch.upstream_score, batch.candidates[..., 0])
    batch.validate(k=L)
    # categories are observable as one-hot; the topic embedding is noisy, not the latent
    C, k = world.config.catalogue.num_categories, world.config.catalogue.topic_dim
    onehot = batch.candidates[..., 1 + k : 1 + k + C]
    assert torch.equal(onehot.argmax(-1), state.category)
    assert not torch.allclose(batch.candidates[..., 1 : 1 + k], state.topic, atol=0.05)
    # candidates are shuffled: index order says nothing about relevance
    assert abs(float(torch.corrcoef(torch.stack([batch.upstream_score.flatten(), torch.arange(n).repeat(B).float()]))[0, 1])) < 0.05


def test_item_ids_unique_and_from_catalogue(world, sample):
    state, batch = sample
    ids = batch.item_ids
    assert bool((ids >= 0).all()) and bool((ids < world.catalogue.num_items).all())
    s = ids.sort(dim=1).values
    assert bool((s[:, 1:] != s[:, :-1]).all())
    assert torch.equal(state.category, world.catalogue.category[ids])


def test_policies_give_valid_pages(world, sample):
    state, batch = sample
    mask = state.candidate_mask
    pages, propensity = world.logging_pages(state, L, 2)
    for p in (
        world.oracle_pages(state, L),
        world.greedy_pages(state, L),
        world.pointwise_oracle_pages(state, L),
        world.upstream_pages(state, L),
        world.upstream_pages(batch, L),
        world.random_pages(state, L, 3),
        pages,
    ):
        _assert_valid_pages(p, mask, L)
    _assert_valid_pages(world.random_pages(state, L, 3, groups=5), mask, L)
    assert propensity.shape == (96,) and bool(((propensity > 0) & (propensity <= 1)).all())
    assert torch.equal(world.upstream_pages(state, L), world.upstream_pages(batch, L))
    up = state.upstream_score.gather(1, world.upstream_pages(state, L))
    assert bool((up[:, 1:] <= up[:, :-1]).all())


def test_expected_utility_shapes_and_groups(world, sample):
    state, _ = sample
    pages = world.random_pages(state, L, 4, groups=3)
    u_group = world.expected_utility(state, pages)
    assert u_group.shape == (96, 3)
    for g in range(3):
        assert torch.allclose(u_group[:, g], world.expected_utility(state, pages[:, g]), atol=1e-5)
    e = world.expectation(state, pages[:, 0])
    assert e.click.shape == (96, L) and e.reformulate.shape == (96,)
    assert bool((e.examine[:, 0] == 1).all()) and bool((e.examine[:, 1:] <= e.examine[:, :-1] + 1e-7).all())
    assert bool((e.long_view <= e.click + 1e-7).all())


def test_expected_utility_is_the_mean_of_sampled_utility(world, sample):
    state, _ = sample
    state = state.select(slice(0, 32))
    pages = world.random_pages(state, L, 5)
    exp = world.expectation(state, pages)
    G = 3000
    fb = world.sample_feedback(state, pages.unsqueeze(1).expand(-1, G, -1), torch.Generator().manual_seed(6))
    assert isinstance(fb, Feedback) and fb.click.shape == (32, G, L) and fb.reformulate.shape == (32, G)
    realised = world.realised_utility(fb)
    z = (realised.mean(1) - exp.utility) / (realised.std(1) / G**0.5)
    # 32 z-scores of a correct model are ~N(0, 1); a biased model fails by many sigmas
    assert float((z**2).mean()) < 2.0 and float(z.abs().max()) < 4.5
    for name in ("click", "long_view", "watch_time"):
        mc, ex = getattr(fb, name).mean(1), getattr(exp, name)
        assert torch.allclose(mc, ex, atol=0.05 * max(1.0, float(ex.max()))), name
    assert torch.allclose(fb.reformulate.mean(1), exp.reformulate, atol=0.05)
    # feedback is coherent: long views and watch time only on clicks; watch <= duration
    assert bool((fb.long_view <= fb.click).all())
    assert bool(((fb.watch_time > 0) <= (fb.click > 0)).all())
    assert bool((fb.watch_time <= state.duration.gather(1, pages).unsqueeze(1) + 1e-3).all())


def test_oracle_beats_baselines_and_normalized_utility_is_per_request(world, sample):
    state, _ = sample
    ref = world.reference(state, L)
    pages = {
        "oracle": ref.oracle_pages,
        "greedy": world.greedy_pages(state, L),
        "upstream": world.upstream_pages(state, L),
        "random": world.random_pages(state, L, 7),
    }
    u = {name: world.expected_utility(state, p) for name, p in pages.items()}
    nu = {name: world.normalized_utility(state, p, ref) for name, p in pages.items()}
    # the oracle is the best of beam search and greedy, request by request
    assert bool((u["oracle"] >= u["greedy"] - 1e-5).all())
    assert float(u["oracle"].mean()) > float(u["upstream"].mean()) > float(u["random"].mean())
    random_pages = world.random_pages(state, L, 8, groups=8)
    random_nu = world.normalized_utility(state, random_pages, ref)
    assert random_nu.shape == (96, 8)
    assert abs(float(random_nu.mean())) < 0.05
    # Beam search finds better pages than greedy search over the same exact utility: greedy
    # gets most but not all of each request's attainable gain (mean 0.925 here).
    assert 0.85 < float(nu["greedy"].mean()) < 0.99
    # Within a request, every page's normalized utility is one affine map of its utility
    # (that request's random and oracle references), grouped pages included: the points
    # (U, NU) of one request lie on one line. Checked against the line through the upstream
    # and greedy points, cross-multiplied so that no division can blow up. A reference taken
    # from another request (a grouped page matched to the wrong row) leaves the line.
    order = ("upstream", "greedy", "oracle", "random")
    U = torch.cat([torch.stack([u[k] for k in order], 1), world.expected_utility(state, random_pages)], 1)
    NU = torch.cat([torch.stack([nu[k] for k in order], 1), random_nu], 1)
    lhs = (NU - NU[:, :1]) * (U[:, 1:2] - U[:, :1])
    rhs = (NU[:, 1:2] - NU[:, :1]) * (U - U[:, :1])
    assert torch.allclose(lhs, rhs, atol=1e-4)


def test_beam_utility_matches_exact_evaluation(world, sample):
    from dualrerank.sim.policies import beam_search
    from dualrerank.sim.response import item_view

    state, _ = sample
    pages, utility = beam_search(world.params, item_view(world.params, state), L, 4)
    assert torch.allclose(utility, world.expected_utility(state, pages), atol=1e-4)
    assert bool((utility[:, 1:] <= utility[:, :-1]).all())


def test_logging_propensities_are_the_policy_probabilities():
    cfg = from_dict(WorldConfig, {"page_length": 2, "requests": {"num_candidates": 4}, "catalogue": {"num_items": 50}})
    world = World(cfg, 0)
    state, _ = world.sample_requests(1, 0)
    many = state.select(torch.zeros(6000, dtype=torch.long))
    pages, prop = world.logging_pages(many, 2, 1)
    seen = {}
    for page, p in zip(pages.tolist(), prop.tolist()):
        seen[tuple(page)] = p
    assert len(seen) == 12  # all 4 * 3 ordered pages occur
    assert sum(seen.values()) == pytest.approx(1.0, abs=1e-5)  # exact probabilities of the mixture
    for page, p in seen.items():
        freq = sum(1 for q in pages.tolist() if tuple(q) == page) / len(pages)
        assert freq == pytest.approx(p, abs=4 * (p * (1 - p) / len(pages)) ** 0.5 + 1e-3)


def test_bad_input_is_a_clear_error(world, sample):
    state, _ = sample
    with pytest.raises(DataError, match="page_length"):
        world.oracle_pages(state, 51)
    with pytest.raises(DataError, match="page_length"):
        world.random_pages(state, 0, 1)
    with pytest.raises(DataError, match="repeats"):
        world.expected_utility(state, torch.zeros(96, 3, dtype=torch.long))
    with pytest.raises(DataError, match="out of range"):
        world.expected_utility(state, torch.full((96, 2), 50))
    with pytest.raises(DataError, match="rows"):
        world.expected_utility(state, torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(DataError, match="num_requests"):
        world.sample_requests(0, 1)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(WorldConfig, {"response": {"redundnacy": 1.0}})
    with pytest.raises(ConfigError, match="redundancy_decay"):
        from_dict(WorldConfig, {"response": {"redundancy_decay": 2.0}})
    with pytest.raises(ConfigError, match="page_length"):
        from_dict(WorldConfig, {"page_length": 60})
    with pytest.raises(ConfigError, match="durations"):
        World(replace(WorldConfig(), catalogue=replace(WorldConfig().catalogue, durations="/no/such.csv")))


def test_lognormal_durations_have_the_kuairand_median():
    from dualrerank.sim.catalogue import MEDIAN_DURATION_S

    cfg = from_dict(WorldConfig, {"catalogue": {"durations": "lognormal"}})
    d = World(cfg, 0).catalogue.duration
    assert float(d.median()) == pytest.approx(MEDIAN_DURATION_S, rel=0.08)


# ---------------------------------------------------------------------------- durations
REPO = Path(__file__).resolve().parents[1]


def _kuairand_csv(folder: Path, milliseconds: list[float]) -> Path:
    """A KuaiRand-shaped video table (only the column the world reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "video_features_basic_pure.csv"
    path.write_text("video_id,video_duration\n" + "".join(f"{i},{ms}\n" for i, ms in enumerate(milliseconds)) + "99,\n")
    return path


def test_default_world_does_not_depend_on_the_data_folder(monkeypatch, tmp_path, shared_data):
    # A data folder whose KuaiRand table would give every item 5 s: were it read, the
    # default world would change with the machine it runs on.
    fake = tmp_path / "fake"
    _kuairand_csv(fake / "kuairand_pure_features", [5000.0] * 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    # The real shared folder too, where this machine has its KuaiRand table.
    roots = [empty, fake] + ([shared_data] if (shared_data / "kuairand_pure_features").is_dir() else [])
    worlds = []
    for root in roots:
        monkeypatch.setenv("DUALRERANK_DATA", str(root))
        worlds.append(World(WorldConfig(), 0))
    monkeypatch.delenv("DUALRERANK_DATA")
    worlds.append(World(WorldConfig(), 0))
    first = worlds[0]
    assert first.catalogue.duration_source == "packaged:kuairand_duration_quantiles.json"
    _, batch = first.sample_requests(8, 1)
    for other in worlds[1:]:
        assert other.catalogue.duration_source == first.catalogue.duration_source
        assert torch.equal(other.catalogue.duration, first.catalogue.duration)
        assert torch.equal(other.sample_requests(8, 1)[1].candidates, batch.candidates)


def test_packaged_durations_follow_the_kuairand_quantiles():
    from dualrerank.sim.catalogue import MEDIAN_DURATION_S, packaged_duration_table, quantile_durations

    q = packaged_duration_table()
    meta = json.loads((REPO / "src" / "dualrerank" / "sim" / "kuairand_duration_quantiles.json").read_text())
    assert "CC BY-SA 4.0" in meta["attribution"]["license"] and meta["attribution"]["url"] == "https://kuairand.com"
    assert meta["count"] == 7344 and len(q) == meta["levels"] == 257
    assert float(np.median(q)) == pytest.approx(MEDIAN_DURATION_S, abs=0.01)
    d = quantile_durations(q, 200_000, torch.Generator().manual_seed(0)).double().numpy()
    assert q[0] <= d.min() and d.max() <= q[-1]
    levels = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    # 200,000 draws put each empirical quantile within ~0.5% (in level) of its target
    np.testing.assert_allclose(np.mean(d[:, None] <= np.interp(levels, np.linspace(0, 1, 257), q), axis=0), levels, atol=0.006)
    assert float(np.log(d).std()) == pytest.approx(1.03, abs=0.02)
    # the same generator state gives the same durations
    again = quantile_durations(q, 200_000, torch.Generator().manual_seed(0)).double().numpy()
    assert np.array_equal(d, again)


def test_packaged_table_is_what_the_script_builds_from_kuairand(require_data):
    folder = require_data("kuairand_pure_features/video_features_basic_pure.csv").parent
    spec = importlib.util.spec_from_file_location("kuairand_duration_table", REPO / "benchmarks" / "kuairand_duration_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from dualrerank.sim.catalogue import packaged_duration_table

    table = script.build_table(folder)
    assert np.array_equal(np.asarray(table["quantiles"]), packaged_duration_table())
    meta = json.loads((REPO / "src" / "dualrerank" / "sim" / "kuairand_duration_quantiles.json").read_text())
    assert table == meta  # metadata too, including the source's checksum


def test_duration_sources_are_explicit_options(tmp_path):
    csv = _kuairand_csv(tmp_path / "kr", [5000.0, 10000.0, -1.0])
    for spec in (f"kuairand:{csv}", f"kuairand:{csv.parent}"):
        world = World(from_dict(WorldConfig, {"catalogue": {"durations": spec, "num_items": 300}}), 0)
        assert world.catalogue.duration_source == "kuairand:video_features_basic_pure.csv"
        assert set(world.catalogue.duration.tolist()) == {5.0, 10.0}  # the negative one is dropped
    # 'auto' (which once read the shared data folder) is the packaged table now
    assert from_dict(WorldConfig, {"catalogue": {"durations": "auto"}}).catalogue.durations == "packaged"
    for bad in ("kuairand:", "kuairand", "/some/file.csv", "uniform"):
        with pytest.raises(ConfigError, match=r"catalogue\.durations: expected 'packaged', 'lognormal' or 'kuairand:PATH'"):
            from_dict(WorldConfig, {"catalogue": {"durations": bad}})
    with pytest.raises(ConfigError, match="catalogue.durations: file not found"):
        World(from_dict(WorldConfig, {"catalogue": {"durations": f"kuairand:{tmp_path / 'absent.csv'}"}}))
