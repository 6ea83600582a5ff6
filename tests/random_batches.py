"""Random padded batches shared by the model tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from dualrerank.schema import RerankBatch

D_IN, D_CTX = 5, 3


def make_batch(seed: int, B: int = 3, n: int = 7, min_valid: int = 4) -> RerankBatch:
    """Random padded batch; padded rows hold garbage features on purpose."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(min_valid, n + 1, (B, 1), generator=gen)
    mask = torch.rand(B, n, generator=gen).argsort(1).argsort(1) < counts
    cands = torch.randn(B, n, D_IN, generator=gen)
    cands[~mask] = 1e3
    return RerankBatch(cands, mask, torch.randn(B, D_CTX, generator=gen))
