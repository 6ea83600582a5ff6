"""Configuration of the simulated world: one dataclass per part, every field with help text.

`WorldConfig` is what `World(config, seed)` takes and what `configs/synthetic.yaml` maps
onto. The defaults are the calibrated world of docs/simulator.md; `configs/control.yaml`
switches redundancy and complementarity off.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualrerank.config import option
from dualrerank.errors import ConfigError

__all__ = [
    "CatalogueConfig",
    "RequestConfig",
    "ResponseConfig",
    "UtilityConfig",
    "LoggingConfig",
    "OracleConfig",
    "DriftEvent",
    "WorldConfig",
    "REWARD_DIMENSIONS",
    "FEEDBACK_NAMES",
    "duration_spec",
]

from dualrerank.feedback import FEEDBACK_NAMES  # noqa: E402  (one definition of the feedback columns)

REWARD_DIMENSIONS = FEEDBACK_NAMES + ("reformulate",)
DRIFT_KINDS = ("rotate_preferences", "reward", "redundancy", "stale_upstream")
DURATION_KINDS = ("packaged", "lognormal")


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


def duration_spec(spec: str) -> tuple[str, str | None]:
    """`catalogue.durations` as (kind, path): ('packaged', None), ('lognormal', None) or
    ('kuairand', PATH). The file is only read when the catalogue is built."""
    if isinstance(spec, str) and spec in DURATION_KINDS:
        return spec, None
    kind, sep, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == "kuairand" and sep and path.strip():
        return kind, path.strip()
    raise ConfigError(
        f"catalogue.durations: expected 'packaged', 'lognormal' or 'kuairand:PATH' (KuaiRand's "
        f"video_features_basic_pure.csv or its folder), got {spec!r}"
    )


def _nonnegative(obj: object, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        _check(getattr(obj, name) >= 0, f"{where}.{name}", f"must be >= 0, got {getattr(obj, name)}")


@dataclass
class CatalogueConfig:
    """The items the world retrieves candidates from."""

    num_items: int = option(6000, "number of items in the catalogue")
    num_categories: int = option(12, "number of item categories (observable, one-hot)")
    topic_dim: int = option(12, "dimension of the latent topic vectors of items and users")
    topic_spread: float = option(
        0.6, "spread of an item's topic around its category's centre (0 = all items of a category alike)"
    )
    category_skew: float = option(0.5, "Zipf exponent of category popularity (0 = all categories equally common)")
    quality_std: float = option(0.6, "std of the hidden item quality added to the engagement logit")
    durations: str = option(
        "packaged",
        "where item durations come from: 'packaged' (quantiles of KuaiRand's video_duration shipped with the "
        "package), 'kuairand:PATH' (KuaiRand's video_features_basic_pure.csv, or its folder, resampled), or "
        "'lognormal' (median 81.17 s, std of ln 1.03)",
    )

    def __post_init__(self) -> None:
        w = "catalogue"
        _check(self.num_items >= 1, f"{w}.num_items", f"must be >= 1, got {self.num_items}")
        _check(self.num_categories >= 1, f"{w}.num_categories", f"must be >= 1, got {self.num_categories}")
        _check(self.topic_dim >= 2, f"{w}.topic_dim", f"must be >= 2, got {self.topic_dim}")
        _nonnegative(self, w, ("topic_spread", "category_skew", "quality_std"))
        if self.durations == "auto":
            # 'auto' used to read the shared data folder when present, so a checkout and an
            # installed package built different worlds; old configs now get the packaged table.
            self.durations = "packaged"
        duration_spec(self.durations)


@dataclass
class RequestConfig:
    """How requests (a user/query and its retrieved candidates) are drawn and observed."""

    num_candidates: int = option(50, "candidates per request (n)")
    user_spread: float = option(0.5, "spread of a user's taste around one preferred category's centre")
    relevance_scale: float = option(1.5, "weight of the user-topic match <u, z> in the true relevance")
    match_noise: float = option(0.5, "std of the hidden user-item match term of the true relevance")
    retrieval_noise: float = option(0.7, "scale of the Gumbel noise of retrieval (higher = candidates less focused on the user)")
    patience_std: float = option(0.5, "std of the user's hidden patience (offset of the examination logit)")
    upstream_noise: float = option(0.6, "std of the noise of the upstream score around the true relevance")
    topic_noise: float = option(0.35, "std of the noise of the observable item topic embedding")
    quality_noise: float = option(0.4, "std of the noise of the observable item quality estimate")
    context_noise: float = option(0.35, "std of the noise of the observable user vector and patience in the context")
    num_projections: int = option(4, "number of extra observable item features: noisy random projections of (topic, quality)")
    projection_noise: float = option(0.5, "std of the noise of those projections")

    def __post_init__(self) -> None:
        w = "requests"
        _check(self.num_candidates >= 1, f"{w}.num_candidates", f"must be >= 1, got {self.num_candidates}")
        _nonnegative(
            self,
            w,
            (
                "user_spread",
                "relevance_scale",
                "match_noise",
                "retrieval_noise",
                "patience_std",
                "upstream_noise",
                "topic_noise",
                "quality_noise",
                "context_noise",
                "num_projections",
                "projection_noise",
            ),
        )


@dataclass
class ResponseConfig:
    """The user-response model (docs/simulator.md, 'User response to a page')."""

    engagement_bias: float = option(-0.5, "constant of the engagement (click) logit")
    redundancy: float = option(0.6, "strength of satiation: weight of the similarity to the items above in the engagement logit")
    redundancy_decay: float = option(0.5, "per-position decay of an item's satiation effect on the items below it (1 = no decay)")
    category_overlap: float = option(1.0, "similarity of two items of the same category")
    topic_overlap: float = option(0.5, "similarity per unit of positive topic cosine, squared")
    complementarity: float = option(1.2, "engagement-logit bonus of a complementary category transition from the previous item")
    complement_density: float = option(0.12, "share of ordered category pairs (a -> b) that are complementary")
    position_bias: float = option(0.25, "engagement-logit penalty per unit of ln(position)")
    viewport: int = option(4, "positions visible on the first screen (two-column feed: 4)")
    continue_bias: float = option(2.0, "logit of going on to the next position (before dissatisfaction)")
    viewport_bonus: float = option(2.0, "extra continue logit inside the viewport (no scrolling needed)")
    dissatisfaction: float = option(0.35, "continue-logit penalty per unit of accumulated dissatisfaction sum(1 - click prob)")
    watch_engagement: float = option(0.8, "weight of the engagement logit in the watch-fraction logit")
    watch_bias: float = option(0.2, "constant of the watch-fraction logit")
    watch_duration: float = option(0.4, "watch-fraction-logit penalty per unit of ln(duration / median duration)")
    long_view_threshold: float = option(0.6, "watch fraction at or above which a click is a long view")
    reformulate_bias: float = option(0.0, "logit of query reformulation with nothing clicked in the viewport")
    reformulate_viewport: float = option(1.5, "reformulation-logit decrease per expected click in the viewport")

    def __post_init__(self) -> None:
        w = "response"
        _nonnegative(
            self,
            w,
            (
                "redundancy",
                "category_overlap",
                "topic_overlap",
                "complementarity",
                "position_bias",
                "dissatisfaction",
                "watch_duration",
                "reformulate_viewport",
            ),
        )
        _check(0 <= self.redundancy_decay <= 1, f"{w}.redundancy_decay", f"must be in [0, 1], got {self.redundancy_decay}")
        _check(0 <= self.complement_density <= 1, f"{w}.complement_density", f"must be in [0, 1], got {self.complement_density}")
        _check(self.viewport >= 1, f"{w}.viewport", f"must be >= 1, got {self.viewport}")
        _check(0 < self.long_view_threshold < 1, f"{w}.long_view_threshold", f"must be in (0, 1), got {self.long_view_threshold}")


@dataclass
class UtilityConfig:
    """Page utility = w_click E[clicks] + w_lv E[long views] + w_wt E[watch s] - w_ref P(reformulate)."""

    weight_click: float = option(1.0, "utility per expected click")
    weight_long_view: float = option(1.0, "utility per expected long view")
    weight_watch_time: float = option(0.003, "utility per expected second watched")
    weight_reformulate: float = option(1.0, "utility lost per unit of reformulation probability")
    scale_click: float = option(1.0, "unit of reported click feedback (reported = true x scale; utility is unit-free)")
    scale_long_view: float = option(1.0, "unit of reported long-view feedback")
    scale_watch_time: float = option(1.0, "unit of reported watch time (1 = seconds, 1000 = milliseconds)")

    def __post_init__(self) -> None:
        for name in ("scale_click", "scale_long_view", "scale_watch_time"):
            _check(getattr(self, name) > 0, f"utility.{name}", f"must be > 0, got {getattr(self, name)}")

    def weights(self) -> dict[str, float]:
        return {d: float(getattr(self, f"weight_{d}")) for d in REWARD_DIMENSIONS}

    def scales(self) -> dict[str, float]:
        return {d: float(getattr(self, f"scale_{d}")) for d in FEEDBACK_NAMES}


@dataclass
class LoggingConfig:
    """The logging policy that produced the offline logs."""

    temperature: float = option(0.5, "temperature of the Plackett-Luce softmax over upstream scores")
    uniform_share: float = option(0.3, "share of requests served a uniformly shuffled page (exploration traffic)")

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "logging.temperature", f"must be > 0, got {self.temperature}")
        _check(0 <= self.uniform_share <= 1, "logging.uniform_share", f"must be in [0, 1], got {self.uniform_share}")


@dataclass
class OracleConfig:
    """Evaluation instruments: the oracle page and the random reference of normalized utility."""

    beam_width: int = option(16, "beam width of the oracle's beam search over the exact utility")
    random_pages: int = option(32, "random pages per request whose mean exact utility is U(random)")
    chunk_size: int = option(256, "requests per chunk of the oracle search (memory bound; progress bar steps)")

    def __post_init__(self) -> None:
        for name in ("beam_width", "random_pages", "chunk_size"):
            _check(getattr(self, name) >= 1, f"oracle.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass
class DriftEvent:
    """One change of the world at a stream step (the world at step s has every event with step <= s)."""

    step: int = option(0, "stream step at which the event takes effect")
    kind: str = option("rotate_preferences", "what changes", choices=DRIFT_KINDS)
    angle: float = option(45.0, "rotate_preferences: rotation of user preferences in degrees, in a random plane")
    dimension: str = option("watch_time", "reward: the reward dimension that changes", choices=REWARD_DIMENSIONS)
    weight: float | None = option(None, "reward: new utility weight of that dimension (None = unchanged)")
    scale: float | None = option(None, "reward: new unit of that dimension's reported feedback (None = unchanged)")
    factor: float = option(2.0, "redundancy: multiplier of the redundancy strength")

    def __post_init__(self) -> None:
        _check(self.step >= 0, "drift.step", f"must be >= 0, got {self.step}")
        _check(self.kind in DRIFT_KINDS, "drift.kind", f"{self.kind!r} is not one of {list(DRIFT_KINDS)}")
        _check(
            self.dimension in REWARD_DIMENSIONS, "drift.dimension", f"{self.dimension!r} is not one of {list(REWARD_DIMENSIONS)}"
        )
        if self.kind == "reward":
            _check(self.weight is not None or self.scale is not None, "drift", "a 'reward' event needs a weight or a scale")
            _check(self.scale is None or self.scale > 0, "drift.scale", f"must be > 0, got {self.scale}")
            _check(self.scale is None or self.dimension != "reformulate", "drift.scale", "reformulate has no reported unit")
        _check(self.factor >= 0, "drift.factor", f"must be >= 0, got {self.factor}")


@dataclass
class WorldConfig:
    """The whole simulated world; `World(config, seed)` builds it."""

    seed: int = option(0, "seed of the world (catalogue, category structure, drift planes) when World() gets none")
    page_length: int = option(10, "default page length L of logs and of `dualrerank simulate`")
    catalogue: CatalogueConfig = option(help="the item catalogue", factory=CatalogueConfig)
    requests: RequestConfig = option(help="requests and what a model can observe", factory=RequestConfig)
    response: ResponseConfig = option(help="the user-response model", factory=ResponseConfig)
    utility: UtilityConfig = option(help="utility weights and feedback units", factory=UtilityConfig)
    logging: LoggingConfig = option(help="the logging policy", factory=LoggingConfig)
    oracle: OracleConfig = option(help="oracle search and random reference", factory=OracleConfig)
    drift: list[DriftEvent] = option(help="schedule of drift events (empty = a stationary world)", factory=list)

    def __post_init__(self) -> None:
        _check(self.page_length >= 1, "page_length", f"must be >= 1, got {self.page_length}")
        _check(
            self.page_length <= self.requests.num_candidates,
            "page_length",
            f"{self.page_length} > requests.num_candidates {self.requests.num_candidates}",
        )
        _check(
            self.requests.num_candidates <= self.catalogue.num_items,
            "requests.num_candidates",
            f"{self.requests.num_candidates} > catalogue.num_items {self.catalogue.num_items}",
        )
