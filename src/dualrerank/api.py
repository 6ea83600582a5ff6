"""The public API: `DualReranker`, a thin handle on a trained reranker.

    from dualrerank import DualReranker
    model = DualReranker.load("runs/student")            # a run dir or its checkpoint/
    pages = model.rerank(batch, k=10)                    # [B, k] candidate indices
    groups = model.sample(batch, k=10, group=8, seed=0)  # [B, 8, k] Gumbel-Max pages

Any registered model can sit behind it (the NAR student is the one meant for serving);
`sample` needs a list generator (student or teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualrerank.errors import ConfigError
from dualrerank.models.checkpoint import resolve_checkpoint
from dualrerank.schema import RerankBatch


class DualReranker:
    """A trained reranker with validated inputs.

    Args:
        model: a model from the registry (e.g. `NARStudent`), or any object with
            `rerank(batch, k)`.
        name: the registry name, used by `save`.
    """

    def __init__(self, model: Any, name: str | None = None) -> None:
        self.model = model
        self.name = name
        if isinstance(model, torch.nn.Module):
            model.eval()

    @classmethod
    def load(cls, path: str | Path) -> DualReranker:
        from dualrerank.models.checkpoint import load_checkpoint, read_checkpoint_info

        directory = resolve_checkpoint(path)
        return cls(load_checkpoint(directory), read_checkpoint_info(directory)["model"])

    def save(self, path: str | Path) -> Path:
        from dualrerank.models.checkpoint import save_checkpoint

        if self.name is None:
            raise ConfigError("save: this reranker has no registry name; pass name= when constructing it")
        return save_checkpoint(self.model, path, self.name)

    def _check(self, batch: RerankBatch, k: int) -> None:
        if not isinstance(batch, RerankBatch):
            hint = (
                "collate(requests) turns a list of Request into one"
                if isinstance(batch, (list, tuple))
                else "build Request(candidates=..., context=...) objects and collate() them"
            )
            raise ConfigError(
                f"rerank/sample: expected a RerankBatch, got {type(batch).__name__}; {hint} "
                "(from dualrerank.schema import Request, collate)"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"rerank/sample: k must be a positive integer, got {k!r}")
        batch.validate(k=k)

    def rerank(self, batch: RerankBatch, k: int) -> torch.Tensor:
        """The model's deterministic page `[B, k]` (greedy / score-and-sort)."""
        self._check(batch, k)
        with torch.inference_mode():
            return self.model.rerank(batch, k)

    def sample(self, batch: RerankBatch, k: int, group: int, temperature: float = 1.0, seed: int | None = None) -> torch.Tensor:
        """`group` pages per request `[B, group, k]`, drawn from the model's page distribution."""
        if not hasattr(self.model, "sample"):
            raise ConfigError(f"sample: a {type(self.model).__name__} is not a list generator (use the student or teacher)")
        self._check(batch, k)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.inference_mode():
            return self.model.sample(batch, k, group, temperature=temperature, generator=gen)
