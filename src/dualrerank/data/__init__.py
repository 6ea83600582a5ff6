"""Data sources -> `RerankBatch`: a small registry over one module per source.

    load_dataset("letor", "/data/MQ2008")            # any SVMlight ranking file or folder
    load_dataset("mind", "/data/MINDsmall_train")    # MIND impressions
    load_dataset("synthetic", seed=0, num_requests=500)
    load_dataset("parquet", "/data/requests.parquet")  # columnar request logs (data/columnar.py)

The synthetic and parquet sources are imported lazily (they pull in the simulator and
PyArrow). Notes a loader wants a user to see (a possibly truncated last query, poor item
coverage) are issued as `DataWarning`s; `dualrerank data inspect` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualrerank.config import from_dict, option
from dualrerank.errors import ConfigError

__all__ = [
    "DataWarning",
    "DataConfig",
    "SOURCES",
    "load_dataset",
    "load_from_config",
    "load_letor_folds",
    "load_mind",
    "load_svmlight",
    "MindOptions",
    "SvmlightOptions",
]


class DataWarning(UserWarning):
    """Something about loaded data a user should know but that is not an error."""


# Defined above these imports because the loader modules import DataWarning from here.
from dualrerank.data.mind import MindOptions, load_mind  # noqa: E402
from dualrerank.data.svmlight import SvmlightOptions, load_letor_folds, load_svmlight  # noqa: E402


def _load_letor(path: str | Path | None = None, **kw: Any):
    return load_svmlight(_required(path, "letor"), _options(SvmlightOptions, kw, "letor"))


def _load_mind(path: str | Path | None = None, **kw: Any):
    return load_mind(_required(path, "mind"), _options(MindOptions, kw, "mind"))


def _load_synthetic(path: str | Path | None = None, seed: int = 0, num_requests: int | None = None, **kw: Any):
    if kw:
        raise ConfigError(f"synthetic: unknown option(s) {sorted(kw)}; known: ['num_requests', 'seed']")
    from dualrerank.data.synthetic import load_synthetic

    return load_synthetic(path=path, seed=seed, num_requests=num_requests)


def _load_parquet(path: str | Path | None = None, num_requests: int | None = None, **kw: Any):
    if kw:
        raise ConfigError(f"parquet: unknown option(s) {sorted(kw)}; known: ['num_requests']")
    from dualrerank.data.columnar import load_parquet

    return load_parquet(_required(path, "parquet"), num_requests)


SOURCES: dict[str, Callable[..., Any]] = {
    "letor": _load_letor,
    "mind": _load_mind,
    "parquet": _load_parquet,
    "synthetic": _load_synthetic,
}


def load_dataset(source: str, path: str | Path | None = None, **kw: Any):
    """Load a whole data source as one validated `RerankBatch`.

    Args:
        source: "letor" (any SVMlight/LETOR ranking file or folder: MQ2008, MSLR, Yahoo,
            Istella), "mind" (MIND behaviors.tsv + news.tsv), "parquet" (a columnar request
            log: one .parquet file or a folder of them) or "synthetic".
        path: file or folder; required for "letor", "mind" and "parquet".
        **kw: the source's options (`SvmlightOptions` / `MindOptions` fields, `seed` and
            `num_requests` for "synthetic", `num_requests` for "parquet"); unknown names
            raise `ConfigError`.
    """
    try:
        loader = SOURCES[source]
    except KeyError:
        raise ConfigError(f"source: unknown data source {source!r}; choose one of {sorted(SOURCES)}") from None
    return loader(path, **kw)


def _required(path: str | Path | None, source: str) -> Path:
    if path is None or str(path) == "":
        raise ConfigError(f"path: source {source!r} needs a path (file or folder)")
    return Path(path)


def _options(cls: type, kw: dict[str, Any], source: str):
    # from_dict rejects unknown names, wrong types and values outside `choices`.
    return from_dict(cls, kw, where=source)


@dataclass
class DataConfig:
    """Which data to load and how (the `data:` part of a YAML config)."""

    source: str = option("synthetic", "data source", choices=tuple(SOURCES))
    path: str | None = option(
        None,
        "file or folder to read (required for letor, mind and parquet; synthetic: a "
        "world YAML or a `simulate --out` folder, default the default world)",
    )
    seed: int = option(0, "seed for the synthetic source")
    num_requests: int | None = option(
        None,
        "synthetic: requests to generate (default 1000), or the first N logged requests of a `simulate --out` "
        "folder (default all; more than it holds is an error); parquet: the first N requests of the log",
    )
    letor: SvmlightOptions = option(help="options of the SVMlight/LETOR reader", factory=SvmlightOptions)
    mind: MindOptions = option(help="options of the MIND reader", factory=MindOptions)


def load_from_config(cfg: DataConfig):
    """`load_dataset` driven by a `DataConfig`."""
    if cfg.source == "letor":
        return load_svmlight(_required(cfg.path, "letor"), cfg.letor)
    if cfg.source == "mind":
        return load_mind(_required(cfg.path, "mind"), cfg.mind)
    if cfg.source == "parquet":  # no seed: a log is read as it is
        return _load_parquet(cfg.path, cfg.num_requests)
    return load_dataset(cfg.source, cfg.path, seed=cfg.seed, num_requests=cfg.num_requests)
