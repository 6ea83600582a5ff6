"""NAR student: L learned position queries decoded against the candidates in one pass.

Follows the NAR student of Dual-Rerank (Zhang et al., arXiv 2604.07420, Figure 2):
- [paper] its own encoder gives `T_1..T_n`; L learned position embeddings go through
  non-causal self-attention, cross-attention to `T` and an FFN; one pass yields a
  distribution over the candidates for every position (a logit matrix `Z`, L x n).
- [ours] matching scores `Z[b, t, i] = <W_q h_t, W_k T_i> / sqrt(d)`, -inf at padded
  candidates (safe for softmax: every request has a valid candidate, so no row is empty).
- [ours] page probability under sequential masking
  `P_S(pi) = prod_t softmax_{i not in pi_<t}(Z_t)[pi_t]`; greedy decoding is a loop of
  masked argmaxes over the precomputed `Z` (`decoding.masked_greedy`), sampling is
  vectorised Gumbel-Max over G pages at once (`decoding.gumbel_max_pages`) [paper: LDRO's
  "vectorized Gumbel-Max sampling"].

`forward(candidates, context, candidate_mask, length)` (and `position_logits`, which takes
the positions as a tensor so that an exported graph keeps L dynamic) is tensor-in,
tensor-out with no data-dependent Python control flow, so it exports to ONNX as is; the
greedy loop is a separate function on tensors (exportable too, or runnable in numpy).

Shapes: B requests, n padded candidates, L page length, G pages per request, d = d_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from dualrerank.config import option
from dualrerank.decoding import check_page_length, gumbel_max_pages, masked_greedy, sequential_log_prob
from dualrerank.errors import DataError
from dualrerank.models.encoder import CandidateEncoder, EncoderConfig, check_decoder_config
from dualrerank.models.layers import Block
from dualrerank.schema import RerankBatch

__all__ = ["StudentConfig", "NARStudent"]


@dataclass
class StudentConfig:
    encoder: EncoderConfig = option(factory=EncoderConfig, help="candidate encoder (feature fusion + bidirectional transformer)")
    n_layers: int = option(2, "decoder blocks: self-attention among positions, cross-attention to T, FFN", ge=1)
    n_heads: int = option(4, "attention heads in the decoder (must divide encoder.d_model)", ge=1)
    ffn_mult: int = option(4, "decoder feed-forward width as a multiple of d_model", ge=1)
    dropout: float = option(0.1, "dropout in the decoder's attention and feed-forward layers", ge=0, lt=1)
    max_positions: int = option(20, "longest page the student can produce (number of position queries)", ge=1)


def _check_config(config: StudentConfig) -> None:
    check_decoder_config(
        config.encoder, config.n_layers, config.n_heads, config.ffn_mult, "max_positions", config.max_positions, config.dropout
    )


class NARStudent(nn.Module):
    """Non-autoregressive generator: all L positions' candidate logits in one pass."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        d = config.encoder.d_model
        self.encoder = CandidateEncoder(config.encoder)
        self.queries = nn.Parameter(0.02 * torch.randn(config.max_positions, d))
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.ffn_mult, config.dropout, cross=True) for _ in range(config.n_layers)
        )
        self.ln_out = nn.LayerNorm(d)
        self.w_q = nn.Linear(d, d, bias=False)
        self.w_k = nn.Linear(d, d, bias=False)
        self.scale = d**-0.5

    def fit_normalizer(self, batch: RerankBatch) -> None:
        """Store the feature mean/std of `batch` (training data) in the encoder."""
        self.encoder.fit_normalizer(batch.candidates, batch.candidate_mask, batch.context)

    def forward(self, candidates: torch.Tensor, context: torch.Tensor, candidate_mask: torch.Tensor, length: int) -> torch.Tensor:
        """`Z [B, length, n]` from `candidates [B, n, d_in]`, `context [B, c]`, `mask [B, n]`.

        -inf at padded candidates. `length` is a Python int (static under export).
        """
        positions = torch.arange(length, device=candidates.device)
        return self.position_logits(candidates, context, candidate_mask, positions)

    def position_logits(
        self, candidates: torch.Tensor, context: torch.Tensor, candidate_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """`Z [B, L, n]` for the position queries `positions [L]` (int64, normally
        `arange(L)`); a tensor page length keeps L dynamic in an exported graph."""
        items = self.encoder(candidates, context, candidate_mask)
        x = self.queries.index_select(0, positions).unsqueeze(0).expand(items.shape[0], -1, -1)
        allowed = candidate_mask.unsqueeze(1)
        for block in self.blocks:
            # Positions see each other freely (non-causal): every position is real.
            x, _ = block(x, None, cast(Block, block).project_memory(items), allowed)
        z = torch.matmul(self.w_q(self.ln_out(x)), self.w_k(items).transpose(1, 2)) * self.scale
        return z.masked_fill(~allowed, float("-inf"))

    def _check_batch(self, batch: RerankBatch, k: int) -> None:
        enc = self.config.encoder
        if batch.candidate_dim != enc.candidate_dim:
            raise DataError(f"candidates: feature width {batch.candidate_dim} != the model's {enc.candidate_dim}")
        if batch.context_dim != enc.context_dim:
            raise DataError(f"context: width {batch.context_dim} != the model's {enc.context_dim}")
        if k > self.config.max_positions:
            raise DataError(f"k: page length {k} > the student's max_positions {self.config.max_positions}")
        check_page_length(batch.candidate_mask, k)

    def logits(self, batch: RerankBatch, k: int) -> torch.Tensor:
        """`Z [B, k, n]` (checked input); -inf at padded candidates."""
        self._check_batch(batch, k)
        return self(batch.candidates, batch.context, batch.candidate_mask, k)

    @torch.no_grad()
    def rerank(self, batch: RerankBatch, k: int) -> torch.Tensor:
        """Greedy page `[B, k]`: one network pass, then k masked argmaxes over `Z`."""
        return masked_greedy(self.logits(batch, k), batch.candidate_mask, validate=False)

    @torch.no_grad()
    def sample(
        self,
        batch: RerankBatch,
        k: int,
        group: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        include_greedy: bool = False,
    ) -> torch.Tensor:
        """`[B, G, k]` pages drawn exactly from `P_S` at `temperature` (page 0 greedy if asked)."""
        return gumbel_max_pages(self.logits(batch, k), batch.candidate_mask, group, temperature, generator, include_greedy)

    def page_log_prob(self, batch: RerankBatch, pages: torch.Tensor, page_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-step `log P_S` of `pages [B, L]` or `[B, G, L]` -> same shape; differentiable
        (the RL and KD losses' input). False `page_mask` positions give 0."""
        if pages.dim() not in (2, 3):
            raise DataError(f"pages: expected [B, L] or [B, G, L], got shape {tuple(pages.shape)}")
        L = pages.shape[-1]
        self._check_batch(batch, 1)
        if L > self.config.max_positions:
            raise DataError(f"pages: length {L} > the student's max_positions {self.config.max_positions}")
        z = self(batch.candidates, batch.context, batch.candidate_mask, L)
        return sequential_log_prob(z, batch.candidate_mask, pages, page_mask)
