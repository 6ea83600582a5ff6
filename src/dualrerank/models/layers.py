"""Attention building blocks shared by every model: multi-head attention with explicit
boolean masks and an optional key/value cache, and a pre-LayerNorm transformer block.

Masks are boolean with True = "may attend"; no magic padding value ever enters the
features. Written on `F.scaled_dot_product_attention` so that the same code runs in
training, incremental decoding and ONNX export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention; keys/values can be projected once and reused (`project_kv`)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, m, _ = x.shape
        return x.view(B, m, self.n_heads, self.d_head).transpose(1, 2)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`source [B, n, d]` -> keys, values `[B, h, n, d_head]`."""
        k, v = self.kv_proj(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attend from queries `x [B, m, d]` to projected `kv` (`[B, h, n, d_head]` each).

        `allowed` is a bool mask `[B, m, n]` or `[B, 1, n]` (True = may attend), or None.
        Every query row must allow at least one key.
        """
        q = self._heads(self.q_proj(x))
        mask = None if allowed is None else allowed.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        B, _, m, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, m, self.n_heads * self.d_head))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int = 4, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ln_cross = nn.LayerNorm(d_model) if cross else None
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout) if cross else None
        self.ln_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Linear(ffn_mult * d_model, d_model), nn.Dropout(dropout)
        )

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys/values of `memory` (blocks built with `cross=True`)."""
        assert self.cross_attn is not None, "project_memory needs a cross-attention block"
        return self.cross_attn.project_kv(memory)

    def forward(
        self,
        x: torch.Tensor,
        self_allowed: torch.Tensor | None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_allowed: torch.Tensor | None = None,
        self_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One block over `x [B, m, d]`.

        `self_cache` holds the keys/values of earlier positions (incremental decoding):
        the new positions' keys/values are appended and the updated cache is returned, so
        a decoder step costs O(t) instead of recomputing the whole prefix.
        """
        h = self.ln_self(x)
        k, v = self.self_attn.project_kv(h)
        if self_cache is not None:
            k, v = torch.cat([self_cache[0], k], dim=2), torch.cat([self_cache[1], v], dim=2)
        x = x + self.self_attn(h, (k, v), self_allowed)
        if self.cross_attn is not None:
            if memory_kv is None:
                raise ValueError("a cross-attention block needs memory_kv")
            assert self.ln_cross is not None  # built together with cross_attn
            x = x + self.cross_attn(self.ln_cross(x), memory_kv, memory_allowed)
        x = x + self.ffn(self.ln_ffn(x))
        return x, (k, v)
