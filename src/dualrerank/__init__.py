"""dualrerank: industrial generative reranking (Dual-Rerank) on PyTorch.

Public entry points are imported lazily so that `import dualrerank` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "RerankBatch": "dualrerank.schema",
    "Request": "dualrerank.schema",
    "collate": "dualrerank.schema",
    "load_dataset": "dualrerank.data",
    "DualReranker": "dualrerank.api",
    "World": "dualrerank.sim",
    "DataError": "dualrerank.errors",
    "ConfigError": "dualrerank.errors",
    "CheckpointError": "dualrerank.errors",
    "DualRerankError": "dualrerank.errors",
}


# The design's name for the simulated world; `World` is its class name.
_ALIASES = {"Simulator": "World"}


def __getattr__(name: str) -> Any:
    if name in _ALIASES:
        return __getattr__(_ALIASES[name])
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dualrerank' has no attribute {name!r}")


__all__ = sorted(_LAZY) + sorted(_ALIASES) + ["__version__"]
