"""Train / validation / test splits of every data source, with the world needed to score
pages where there is one.

- synthetic: the default simulated world (or a world YAML, or a `dualrerank simulate
  --out` folder): training logs from the logging policy; validation and test are fresh
  requests of the same world (their hidden state scores any page exactly).
- letor: LETOR/MSLR folds (`S1..S5` partitions or `Fold k/{train,vali,test}.txt`); the
  lists are placed in the simulated user model (`sim.real_lists`) for utility, and NDCG
  uses the real graded labels.
- mind: impressions split into train / valid / test by a fixed hash of the impression id
  (not by any seed, so no seed can move a test impression into training); NDCG and AUC on
  real clicks.
- parquet: a columnar request log (`data/columnar.py`), split likewise by a fixed hash of
  the request id; figures from its labels and logged feedback.

The data seed (`SplitConfig.seed`) is separate from a run's seed, so that several training
seeds are compared on the same held-out requests. It draws the simulated world and its
requests (synthetic) and the simulated feedback placed on real lists (letor); it never
reassigns a real request between splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dualrerank.config import option
from dualrerank.data.mind import MindOptions
from dualrerank.data.svmlight import SvmlightOptions
from dualrerank.errors import ConfigError
from dualrerank.schema import RerankBatch
from dualrerank.train.evaluation import EvalSplit

GENERATED_TRAIN_REQUESTS = 8000
#: The data sources a run can train and evaluate on: the one list every command's --data uses.
SPLIT_SOURCES = ("synthetic", "letor", "mind", "parquet")


@dataclass
class SplitConfig:
    source: str = option("synthetic", "data source", choices=SPLIT_SOURCES)
    path: str | None = option(
        None,
        "synthetic: a world YAML or a 'simulate --out' folder (default world if unset); "
        "letor: a folder with S1..S5.txt or 'Fold k' folders; mind: a folder with behaviors.tsv; "
        "parquet: a request log (.parquet file or folder of them)",
    )
    seed: int = option(0, "seed of the data (world, requests, logs, random splits), kept apart from the run's seed")
    train_requests: int | None = option(
        None,
        "synthetic: logged requests to train on (null: 8000 generated, or every request of a 'simulate --out' "
        "folder; a folder holding fewer than asked is refused)",
    )
    valid_requests: int = option(1000, "synthetic: held-out requests for validation each epoch")
    test_requests: int = option(2000, "synthetic: held-out requests for the final test")
    page_length: int = option(10, "page length L produced and evaluated")
    fold: int = option(1, "letor: fold number (1..5)")
    valid_share: float = option(0.1, "mind, parquet: share of impressions (requests) for validation")
    test_share: float = option(0.2, "mind, parquet: share of impressions (requests) for the test")
    letor: SvmlightOptions = option(factory=SvmlightOptions, help="letor: options of the SVMlight/LETOR reader")
    mind: MindOptions = option(factory=MindOptions, help="mind: options of the MIND reader")

    def __post_init__(self) -> None:
        for name in ("train_requests", "valid_requests", "test_requests", "page_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be >= 1, got {getattr(self, name)}")
        if not (0 < self.valid_share < 1 and 0 < self.test_share < 1 and self.valid_share + self.test_share < 1):
            raise ConfigError("data.valid_share / data.test_share: must be in (0, 1) and sum to less than 1")


@dataclass
class Splits:
    train: RerankBatch
    valid: EvalSplit
    test: EvalSplit
    page_length: int
    world: object | None = None


def _synthetic(cfg: SplitConfig) -> Splits:
    from dualrerank.data.synthetic import load_logs, load_world, load_world_config, simulate_logs
    from dualrerank.sim import World, WorldConfig

    path = Path(cfg.path) if cfg.path else None
    if path is not None and path.is_dir():
        world = load_world(path)
        train = load_logs(path, cfg.train_requests, page_length=cfg.page_length, option="data.train_requests")
    else:
        world_cfg = load_world_config(path) if path is not None else WorldConfig()
        world = World(world_cfg, seed=cfg.seed)
        n_train = GENERATED_TRAIN_REQUESTS if cfg.train_requests is None else cfg.train_requests
        train = simulate_logs(world, n_train, cfg.seed, cfg.page_length).batch
    # Held-out requests carry logs too (the evaluator and LambdaMART validate on feedback);
    # their hidden state scores any page exactly. Seeds differ from the training logs'.
    valid = simulate_logs(world, cfg.valid_requests, cfg.seed + 1_000_003, cfg.page_length)
    test = simulate_logs(world, cfg.test_requests, cfg.seed + 2_000_003, cfg.page_length)
    return Splits(
        train=train,
        valid=EvalSplit(valid.batch, world, valid.state, name="valid"),
        test=EvalSplit(test.batch, world, test.state, name="test"),
        page_length=cfg.page_length,
        world=world,
    )


def _letor(cfg: SplitConfig) -> Splits:
    from dualrerank.data import load_letor_folds
    from dualrerank.sim import World
    from dualrerank.sim.real_lists import real_list_state

    if not cfg.path:
        raise ConfigError("data.path: the letor source needs a folder (e.g. ../shared/data/letor/MQ2008)")
    folds = load_letor_folds(cfg.path, cfg.fold, cfg.letor)
    world = World(seed=cfg.seed)

    def split(batch: RerankBatch, name: str) -> EvalSplit:
        return EvalSplit(batch, world, real_list_state(batch, world, seed=cfg.seed), name=name)

    return Splits(folds["train"], split(folds["vali"], "valid"), split(folds["test"], "test"), cfg.page_length, world)


def hash_split(ids: tuple[str, ...], valid_share: float, test_share: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of (train, valid, test) by a fixed hash of each request id: a request's split
    depends on its id alone, so it never changes with a seed, the file's order or its size."""
    # blake2b of the id -> a uniform number in [0, 1); 8 bytes are plenty for the shares.
    u = torch.tensor(
        [
            int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8, person=b"dr-split").digest(), "big") / 2**64
            for i in ids
        ],
        dtype=torch.float64,
    )
    test = u < test_share
    valid = (u >= test_share) & (u < test_share + valid_share)
    train = ~(test | valid)
    return train.nonzero().squeeze(1), valid.nonzero().squeeze(1), test.nonzero().squeeze(1)


def _mind(cfg: SplitConfig) -> Splits:
    from dualrerank.data.mind import load_mind

    if not cfg.path:
        raise ConfigError("data.path: the mind source needs a folder with behaviors.tsv")
    batch = load_mind(Path(cfg.path), cfg.mind)
    ids = batch.request_ids or tuple(str(i) for i in range(batch.batch_size))
    train, valid, test = hash_split(ids, cfg.valid_share, cfg.test_share)
    for name, idx in (("train", train), ("valid", valid), ("test", test)):
        if idx.numel() == 0:
            raise ConfigError(
                f"data: the {name} split of {cfg.path} is empty ({batch.batch_size} impressions); "
                "use more impressions or larger shares"
            )
    return Splits(
        train=batch.select(train).trim(),
        valid=EvalSplit(batch.select(valid).trim(), name="valid"),
        test=EvalSplit(batch.select(test).trim(), name="test"),
        page_length=cfg.page_length,
    )


def _parquet(cfg: SplitConfig) -> Splits:
    from dualrerank.data.columnar import load_parquet

    if not cfg.path:
        raise ConfigError("data.path: the parquet source needs a request log (a .parquet file or a folder of them)")
    batch = load_parquet(Path(cfg.path))
    # Every row has a request id (the format requires one), so the split is the id's alone.
    assert batch.request_ids is not None  # load_parquet refuses rows without an id
    train, valid, test = hash_split(batch.request_ids, cfg.valid_share, cfg.test_share)
    for name, idx in (("train", train), ("valid", valid), ("test", test)):
        if idx.numel() == 0:
            raise ConfigError(
                f"data: the {name} split of {cfg.path} is empty ({batch.batch_size} requests); use more requests or larger shares"
            )
    return Splits(
        train=batch.select(train).trim(),
        valid=EvalSplit(batch.select(valid).trim(), name="valid"),
        test=EvalSplit(batch.select(test).trim(), name="test"),
        page_length=cfg.page_length,
    )


_SOURCES = {"synthetic": _synthetic, "letor": _letor, "mind": _mind, "parquet": _parquet}
assert tuple(_SOURCES) == SPLIT_SOURCES


def load_splits(cfg: SplitConfig) -> Splits:
    """The three splits of `cfg.source` (see the module docstring)."""
    return _SOURCES[cfg.source](cfg)
