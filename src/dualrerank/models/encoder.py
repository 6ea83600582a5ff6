"""Shared candidate encoder: feature fusion of the request context with each candidate,
then a bidirectional, padding-masked transformer over the candidate set.

Follows the shared encoder of Dual-Rerank (arXiv 2604.07420, Figure 2) [paper]; the
fusion MLP, the pre-LN blocks and the stored feature normaliser are [ours].

The normaliser (per-feature mean/std fitted on training data and saved as buffers) lives
in the model, so an exported or served model applies exactly the scaling it was trained
with and raw features (e.g. MSLR's unnormalised counts) need no outside preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dualrerank.config import option
from dualrerank.models.layers import Block


@dataclass
class EncoderConfig:
    candidate_dim: int = option(0, "candidate feature width d (set from the data)")
    context_dim: int = option(0, "context feature width c (set from the data)")
    d_model: int = option(64, "hidden width of every transformer layer", ge=1)
    n_heads: int = option(4, "attention heads", ge=1)
    n_layers: int = option(2, "encoder transformer blocks", ge=1)
    ffn_mult: int = option(4, "feed-forward width as a multiple of d_model", ge=1)
    dropout: float = option(0.1, "dropout in attention and feed-forward layers", ge=0, lt=1)


class CandidateEncoder(nn.Module):
    """`(candidates [B,n,d], context [B,c], mask [B,n]) -> T [B,n,d_model]`."""

    # buffers (register_buffer), declared for the type checker
    cand_mean: torch.Tensor
    cand_std: torch.Tensor
    ctx_mean: torch.Tensor
    ctx_std: torch.Tensor

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if config.candidate_dim < 1:
            raise ValueError("EncoderConfig.candidate_dim must be set (>= 1)")
        self.config = config
        d, c, h = config.candidate_dim, config.context_dim, config.d_model
        self.register_buffer("cand_mean", torch.zeros(d))
        self.register_buffer("cand_std", torch.ones(d))
        self.register_buffer("ctx_mean", torch.zeros(max(c, 1)))
        self.register_buffer("ctx_std", torch.ones(max(c, 1)))
        self.item_proj = nn.Linear(d, h)
        self.ctx_proj = nn.Linear(max(c, 1), h)
        # Fusion sees the item, the context and their product, so context-dependent
        # relevance (user x item) is expressible before any attention layer.
        self.fuse = nn.Sequential(nn.Linear(3 * h, h), nn.GELU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(Block(h, config.n_heads, config.ffn_mult, config.dropout) for _ in range(config.n_layers))
        self.ln_out = nn.LayerNorm(h)

    @torch.no_grad()
    def fit_normalizer(self, candidates: torch.Tensor, mask: torch.Tensor, context: torch.Tensor) -> None:
        """Set feature mean/std from training data (valid candidates only)."""
        x = candidates[mask]
        self.cand_mean.copy_(x.mean(0))
        self.cand_std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
        if context.shape[-1] > 0:
            self.ctx_mean.copy_(context.mean(0))
            self.ctx_std.copy_(context.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, candidates: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (candidates - self.cand_mean) / self.cand_std
        # Padding rows carry arbitrary values; zero them so they cannot leak through LayerNorm statistics.
        x = x * mask.unsqueeze(-1).to(x.dtype)
        if context.shape[-1] == 0:
            context = torch.zeros(context.shape[0], 1, dtype=x.dtype, device=x.device)
        ctx = (context - self.ctx_mean) / self.ctx_std
        hi = self.item_proj(x)
        hc = self.ctx_proj(ctx).unsqueeze(1).expand_as(hi)
        h = self.fuse(torch.cat([hi, hc, hi * hc], dim=-1))
        allowed = mask.unsqueeze(1)  # [B, 1, n]: every query may look at every real candidate
        for block in self.blocks:
            h, _ = block(h, allowed)
        return self.ln_out(h)


def check_decoder_config(
    encoder: EncoderConfig, n_layers: int, n_heads: int, ffn_mult: int, length_name: str, length: int, dropout: float
) -> None:
    """One-line `ConfigError` for a generator whose decoder sits on `encoder` (teacher, student)."""
    from dualrerank.errors import ConfigError

    if encoder.candidate_dim < 1:
        raise ConfigError("encoder.candidate_dim: must be set to the data's feature width (>= 1)")
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads), ("ffn_mult", ffn_mult), (length_name, length)):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if encoder.d_model % n_heads or encoder.d_model % encoder.n_heads:
        raise ConfigError(f"encoder.d_model={encoder.d_model} must be divisible by the attention heads")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout: must be in [0, 1), got {dropout}")
