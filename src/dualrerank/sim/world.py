"""`World`: the seeded simulated world of docs/simulator.md.

    world = World(WorldConfig(), seed=0)
    state, batch = world.sample_requests(1000, seed)     # hidden latents, observable batch
    u = world.expected_utility(state, pages)             # exact, [B] or [B, G]
    fb = world.sample_feedback(state, pages, generator)  # click / long view / watch / reformulate
    oracle = world.oracle_pages(state, L)                # evaluation instrument only
    later = world.at_step(5000)                          # the same world after drift

`state` holds what a model must never see (latent topics, quality, match, patience);
`batch` is a validated `RerankBatch` of observable features only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from dualrerank.errors import ConfigError, DataError
from dualrerank.metrics import normalized_utility as _normalized
from dualrerank.schema import RerankBatch
from dualrerank.sim import policies
from dualrerank.sim.catalogue import LOG_DURATION_STD, MEDIAN_DURATION_S, Catalogue, build_catalogue, seeded
from dualrerank.sim.config import WorldConfig
from dualrerank.sim.drift import effective_params
from dualrerank.sim.response import (
    Expectation,
    ResponseParams,
    expected,
    item_view,
    realised_utility,
    relevance,
    sample,
    standalone_utility,
)
from dualrerank.sim.state import Feedback, WorldState, check_pages

__all__ = ["World", "Reference", "as_generator"]

RETRIEVAL_CHUNK = 512  # requests scored against the whole catalogue at once (memory bound)


def as_generator(generator_or_seed: torch.Generator | int) -> torch.Generator:
    """A torch.Generator from a seed, or the generator itself."""
    if isinstance(generator_or_seed, torch.Generator):
        return generator_or_seed
    if isinstance(generator_or_seed, int) and not isinstance(generator_or_seed, bool):
        return torch.Generator().manual_seed(generator_or_seed)
    raise ConfigError(f"seed: expected an integer or a torch.Generator, got {type(generator_or_seed).__name__}")


@dataclass(frozen=True)
class Reference:
    """What normalized utility is measured against, per request.

    Attributes:
        random: `[B]` U(random): mean exact utility of `oracle.random_pages` uniformly random
            pages (the same random keys for every request, so a request's reference does
            not depend on the batch it is in).
        oracle: `[B]` exact utility of the oracle page.
        oracle_pages: `[B, L]`.
    """

    random: torch.Tensor
    oracle: torch.Tensor
    oracle_pages: torch.Tensor


class World:
    """The simulated world at one stream step.

    Args:
        config: the world's config (default `WorldConfig()`).
        seed: the world's seed (catalogue, category structure, drift planes); default
            `config.seed`. Requests are drawn with their own generator or seed.
        step: stream step whose drift events are in force.
        catalogue: an already built catalogue of this config and seed, shared instead of
            rebuilt (what `at_step` passes).
    """

    def __init__(
        self, config: WorldConfig | None = None, seed: int | None = None, *, step: int = 0, catalogue: Catalogue | None = None
    ) -> None:
        self.config = config if config is not None else WorldConfig()
        if not isinstance(self.config, WorldConfig):
            raise ConfigError(f"config: expected a WorldConfig, got {type(self.config).__name__}")
        self.seed = int(self.config.seed if seed is None else seed)
        if step < 0:
            raise ConfigError(f"step: must be >= 0, got {step}")
        self.step = int(step)
        c = self.config
        self.catalogue = catalogue if catalogue is not None else build_catalogue(c.catalogue, c.requests, c.response, self.seed)
        self.params: ResponseParams = effective_params(c, self.catalogue, self.seed, self.step)

    # ------------------------------------------------------------------ drift
    def at_step(self, step: int) -> World:
        """The same world (same catalogue and seed) with the drift events of steps <= `step`."""
        return World(self.config, self.seed, step=step, catalogue=self.catalogue)

    # ------------------------------------------------------------------ observation
    @property
    def candidate_feature_names(self) -> tuple[str, ...]:
        k, C = self.config.catalogue.topic_dim, self.config.catalogue.num_categories
        return (
            ("upstream_score",)
            + tuple(f"topic_{i}" for i in range(k))
            + tuple(f"category_{i}" for i in range(C))
            + ("quality_estimate", "log_duration")
            + tuple(f"projection_{i}" for i in range(self.config.requests.num_projections))
        )

    @property
    def context_feature_names(self) -> tuple[str, ...]:
        return tuple(f"user_{i}" for i in range(self.config.catalogue.topic_dim)) + ("patience",)

    def sample_requests(self, num: int, generator_or_seed: torch.Generator | int) -> tuple[WorldState, RerankBatch]:
        """Draw `num` requests: hidden state and the observable, validated `RerankBatch`.

        Candidates are retrieved from the catalogue by noisy relevance (Gumbel top-n) and
        then shuffled, so a candidate's index carries no information.
        """
        if not isinstance(num, int) or num < 1:
            raise DataError(f"num_requests: must be a positive integer, got {num!r}")
        g = as_generator(generator_or_seed)
        cat, rq = self.catalogue, self.config.requests
        k, n = cat.topic.shape[1], rq.num_candidates

        popularity = torch.bincount(cat.category, minlength=cat.num_categories).double() + 1.0
        liked = torch.multinomial(popularity, num, replacement=True, generator=g)
        user = cat.centres[liked] + rq.user_spread * torch.randn(num, k, generator=g) / k**0.5
        user = user / user.norm(dim=1, keepdim=True).clamp_min(1e-12)
        patience = rq.patience_std * torch.randn(num, generator=g)

        preference = user @ self.params.rotation.T
        chunks = []
        for s in range(0, num, RETRIEVAL_CHUNK):
            score = rq.relevance_scale * preference[s : s + RETRIEVAL_CHUNK] @ cat.topic.T
            noise = policies.gumbel(tuple(score.shape), g, torch.float32)
            chunks.append((score + rq.retrieval_noise * noise).topk(n, dim=1).indices)
        items = torch.cat(chunks)
        shuffle = torch.rand(num, n, generator=g).argsort(dim=1)
        items = items.gather(1, shuffle)

        match = rq.match_noise * torch.randn(num, n, generator=g)
        state = WorldState(
            user=user,
            patience=patience,
            topic=cat.topic[items],
            category=cat.category[items],
            quality=cat.quality[items],
            match=match,
            duration=cat.duration[items],
            candidate_mask=torch.ones(num, n, dtype=torch.bool),
            item_ids=items,
            upstream_score=torch.zeros(num, n),
        )
        seen = (
            self.params if self.params.upstream_rotation is None else replace(self.params, rotation=self.params.upstream_rotation)
        )
        upstream = relevance(seen, state) + rq.upstream_noise * torch.randn(num, n, generator=g)
        state = replace(state, upstream_score=upstream)

        features = torch.cat(
            [
                upstream.unsqueeze(2),
                cat.obs_topic[items],
                torch.nn.functional.one_hot(state.category, cat.num_categories).float(),
                cat.obs_quality[items].unsqueeze(2),
                ((torch.log(state.duration / MEDIAN_DURATION_S)) / LOG_DURATION_STD).unsqueeze(2),
                cat.obs_projection[items],
            ],
            dim=2,
        )
        context = torch.cat(
            [
                user + rq.context_noise * torch.randn(num, k, generator=g),
                (patience + rq.context_noise * torch.randn(num, generator=g)).unsqueeze(1),
            ],
            dim=1,
        )
        batch = RerankBatch(
            candidates=features.float(),
            candidate_mask=state.candidate_mask.clone(),
            context=context.float(),
            item_ids=items.clone(),
            upstream_score=upstream.float(),
        ).validate()
        return state, batch

    # ------------------------------------------------------------------ the user model
    @staticmethod
    def _check_length(source: WorldState | RerankBatch, L: int) -> int:
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise DataError(f"page_length: must be a positive integer, got {L!r}")
        fewest = int(source.candidate_mask.sum(1).min())
        if L > fewest:
            raise DataError(f"page_length: L={L} > {fewest} valid candidates of some request")
        return L

    def expectation(self, state: WorldState, pages: torch.Tensor) -> Expectation:
        """Exact per-position expectations of pages `[B, L]` or `[B, G, L]` (see `response`)."""
        return expected(self.params, state, check_pages(pages, state.candidate_mask))

    def expected_utility(self, state: WorldState, pages: torch.Tensor) -> torch.Tensor:
        """Exact expected utility: `[B]` for pages `[B, L]`, `[B, G]` for pages `[B, G, L]`."""
        return self.expectation(state, pages).utility

    def sample_feedback(self, state: WorldState, pages: torch.Tensor, generator: torch.Generator | int) -> Feedback:
        """Feedback drawn from the same model (reported units; see `UtilityConfig.scale_*`)."""
        return sample(self.params, self.expectation(state, pages), as_generator(generator))

    def realised_utility(self, feedback: Feedback) -> torch.Tensor:
        """`[*P]` utility of sampled feedback; its mean over draws is `expected_utility`."""
        return realised_utility(self.params, feedback)

    # ------------------------------------------------------------------ policies
    def upstream_pages(self, source: WorldState | RerankBatch, L: int) -> torch.Tensor:
        """`[B, L]` candidates sorted by the upstream score (a batch or a state)."""
        if source.upstream_score is None:
            raise DataError("upstream_score: the batch has none, so upstream sort is undefined")
        return policies.top_pages(source.upstream_score, source.candidate_mask, self._check_length(source, L))

    def random_pages(
        self, state: WorldState, L: int, generator: torch.Generator | int, groups: int | None = None
    ) -> torch.Tensor:
        """Uniformly random pages `[B, L]` (or `[B, G, L]` with `groups`)."""
        return policies.random_pages(state.candidate_mask, self._check_length(state, L), as_generator(generator), groups)

    def pointwise_oracle_pages(self, state: WorldState, L: int) -> torch.Tensor:
        """Perfect pointwise sorter: candidates by their true stand-alone expected utility
        (shown alone at position 1). An evaluation instrument: it reads the hidden state."""
        view = item_view(self.params, state)
        return policies.top_pages(standalone_utility(self.params, view), state.candidate_mask, self._check_length(state, L))

    def logging_pages(self, state: WorldState, L: int, generator: torch.Generator | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages of the logging policy `[B, L]` and their propensities `[B]` (see `policies.logging_pages`)."""
        lg = self.config.logging
        return policies.logging_pages(
            state.upstream_score,
            state.candidate_mask,
            self._check_length(state, L),
            lg.temperature,
            lg.uniform_share,
            as_generator(generator),
        )

    def _search(self, state: WorldState, L: int, width: int, progress: bool, desc: str) -> torch.Tensor:
        self._check_length(state, L)
        out = []
        parts: Iterable[WorldState] = state.split(self.config.oracle.chunk_size)
        if progress:
            parts = tqdm(parts, desc=desc, unit="chunk", leave=False)
        for part in parts:
            view = item_view(self.params, part)
            beams, utility = policies.beam_search(self.params, view, L, width)
            if width > 1:
                greedy, u_greedy = policies.beam_search(self.params, view, L, 1)
                beams, utility = torch.cat([beams, greedy], dim=1), torch.cat([utility, u_greedy], dim=1)
            best = utility.argmax(dim=1)
            out.append(beams[torch.arange(part.batch_size), best])
        return torch.cat(out)

    def oracle_pages(self, state: WorldState, L: int, *, progress: bool = False) -> torch.Tensor:
        """`[B, L]` near-optimal pages: the best of the final beams of beam search over the
        exact utility (width `oracle.beam_width`) and the greedy page. Evaluation only."""
        return self._search(state, L, self.config.oracle.beam_width, progress, "oracle beam search")

    def greedy_pages(self, state: WorldState, L: int, *, progress: bool = False) -> torch.Tensor:
        """`[B, L]` greedy pages over the exact utility (beam width 1). Evaluation only."""
        return self._search(state, L, 1, progress, "greedy search")

    # ------------------------------------------------------------------ normalized utility
    def reference(self, state: WorldState, L: int, *, progress: bool = False) -> Reference:
        """U(random) and U(oracle) per request for pages of length L, under this world."""
        L = self._check_length(state, L)
        keys = torch.rand(self.config.oracle.random_pages, state.num_candidates, generator=seeded(self.seed, "random-reference"))
        keys = keys.unsqueeze(0).masked_fill(~state.candidate_mask.unsqueeze(1), float("-inf"))
        random = self.expected_utility(state, keys.topk(L, dim=-1).indices).mean(dim=1)
        oracle_pages = self.oracle_pages(state, L, progress=progress)
        return Reference(random=random, oracle=self.expected_utility(state, oracle_pages), oracle_pages=oracle_pages)

    def normalized_utility(self, state: WorldState, pages: torch.Tensor, reference: Reference | None = None) -> torch.Tensor:
        """`(U(page) - U(random)) / (U(oracle) - U(random))` per request: `[B]` or `[B, G]`.

        NaN for degenerate requests where the oracle is no better than random (see
        `dualrerank.metrics.normalized_utility`). Pass `reference` (from `reference()`) to
        avoid recomputing the oracle for every call on the same state.
        """
        u = self.expected_utility(state, pages)
        ref = reference if reference is not None else self.reference(state, pages.shape[-1])
        if tuple(ref.random.shape) != (state.batch_size,):
            raise DataError(f"reference: computed for {ref.random.shape[0]} requests, state has {state.batch_size}")
        flat = u.reshape(state.batch_size, -1)
        G = flat.shape[1]
        out = _normalized(flat.reshape(-1), ref.random.repeat_interleave(G), ref.oracle.repeat_interleave(G))
        return out.reshape(u.shape).float()
