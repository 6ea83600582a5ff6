"""AR teacher: a pointer-network decoder over the shared-style candidate encoder.

Follows the AR teacher of Dual-Rerank (Zhang et al., arXiv 2604.07420, Figure 2):
- [paper] a bidirectional encoder gives item representations `T_1..T_n`; the items already
  placed go through causal self-attention, then cross-attention to `T`, then an FFN; a
  pointer head scores the remaining candidates; decoding takes L sequential steps.
- [ours] decoder input at step t: `T_{pi_{t-1}}` (a learned BOS vector at t = 0) plus a
  learned position embedding (`max_length` of them); pre-LN `layers.Block(cross=True)`.
- [ours] pointer scores `s_{t,i} = <W_q h_t, W_k T_i> / sqrt(d)`, with padding and items
  placed before t set to -inf (safe for softmax: every step of a page has a candidate
  left; only positions switched off by a `page_mask` can have none).
- [ours] decoding is incremental: `T`, every block's cross-attention keys/values and the
  pointer keys `W_k T` are computed once per request; each step runs only the new position
  through the decoder, reusing the self-attention KV cache (`Block`'s `self_cache`).
  `incremental=False` recomputes the whole prefix at every step (a reference used by the
  tests, and for latency comparisons).

Shapes: B requests, n padded candidates, L page length, G pages per request, d = d_model.
Call `.eval()` before decoding: dropout would make decoding random.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from dualrerank.config import option
from dualrerank.decoding import (
    beam_search,
    check_page_length,
    check_pages,
    gumbel_noise,
    masked_argmax,
    placed_before,
    sequential_log_prob,
)
from dualrerank.errors import ConfigError, DataError
from dualrerank.models.encoder import CandidateEncoder, EncoderConfig, check_decoder_config
from dualrerank.models.layers import Block
from dualrerank.schema import RerankBatch

__all__ = ["TeacherConfig", "ARTeacher"]

STRATEGIES = ("greedy", "sample", "beam")
_NEG_INF = float("-inf")


@dataclass
class TeacherConfig:
    encoder: EncoderConfig = option(factory=EncoderConfig, help="candidate encoder (feature fusion + bidirectional transformer)")
    n_layers: int = option(2, "decoder blocks: causal self-attention, cross-attention to T, FFN", ge=1)
    n_heads: int = option(4, "attention heads in the decoder (must divide encoder.d_model)", ge=1)
    ffn_mult: int = option(4, "decoder feed-forward width as a multiple of d_model", ge=1)
    dropout: float = option(0.1, "dropout in the decoder's attention and feed-forward layers", ge=0, lt=1)
    max_length: int = option(20, "longest page the decoder can produce (size of its position table)", ge=1)


@dataclass
class _Memory:
    """What the decoder reads, computed once per request (leading dim B, or B*G/B*W)."""

    items: torch.Tensor  # [B, n, d] encoder outputs T
    mask: torch.Tensor  # [B, n] bool candidate mask
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block, [B, h, n, d_head] each
    keys: torch.Tensor  # [B, d, n] pointer keys (W_k T)^T, transposed once for the per-step matmul

    def repeat(self, r: int) -> _Memory:
        """Row b becomes rows b*r .. b*r + r - 1 (group / beam members)."""
        if r == 1:
            return self
        rep = lambda x: x.repeat_interleave(r, dim=0)  # noqa: E731
        return _Memory(rep(self.items), rep(self.mask), [(rep(k), rep(v)) for k, v in self.cross_kv], rep(self.keys))


def _check_config(config: TeacherConfig) -> None:
    check_decoder_config(
        config.encoder, config.n_layers, config.n_heads, config.ffn_mult, "max_length", config.max_length, config.dropout
    )


class ARTeacher(nn.Module):
    """Autoregressive pointer decoder: `P_T(pi) = prod_t softmax_{i not in pi_<t}(s_t)[pi_t]`."""

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        d = config.encoder.d_model
        self.encoder = CandidateEncoder(config.encoder)
        self.bos = nn.Parameter(0.02 * torch.randn(d))
        self.pos = nn.Embedding(config.max_length, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.ffn_mult, config.dropout, cross=True) for _ in range(config.n_layers)
        )
        self.ln_out = nn.LayerNorm(d)
        self.w_q = nn.Linear(d, d, bias=False)
        self.w_k = nn.Linear(d, d, bias=False)
        self.scale = d**-0.5

    # ------------------------------------------------------------------ encoder side
    def fit_normalizer(self, batch: RerankBatch) -> None:
        """Store the feature mean/std of `batch` (training data) in the encoder."""
        self.encoder.fit_normalizer(batch.candidates, batch.candidate_mask, batch.context)

    def encode(self, batch: RerankBatch) -> torch.Tensor:
        """`T [B, n, d]`: candidate representations."""
        self._check_batch(batch)
        return self.encoder(batch.candidates, batch.context, batch.candidate_mask)

    def _memory(self, batch: RerankBatch) -> _Memory:
        items = self.encode(batch)
        cross_kv = [cast(Block, block).project_memory(items) for block in self.blocks]
        return _Memory(items, batch.candidate_mask, cross_kv, self.w_k(items).transpose(1, 2))

    def _check_batch(self, batch: RerankBatch, k: int | None = None) -> None:
        enc = self.config.encoder
        if batch.candidate_dim != enc.candidate_dim:
            raise DataError(f"candidates: feature width {batch.candidate_dim} != the model's {enc.candidate_dim}")
        if batch.context_dim != enc.context_dim:
            raise DataError(f"context: width {batch.context_dim} != the model's {enc.context_dim}")
        if k is not None:
            if k > self.config.max_length:
                raise DataError(f"k: page length {k} > the teacher's max_length {self.config.max_length}")
            check_page_length(batch.candidate_mask, k)

    # ------------------------------------------------------------------ decoder side
    def _embed(self, mem: _Memory, items: torch.Tensor, with_bos: bool, offset: int) -> torch.Tensor:
        """Decoder inputs `[B, m, d]`: (BOS +) `T[items]` plus positions offset.. ."""
        d = mem.items.shape[-1]
        x = mem.items.gather(1, items.unsqueeze(-1).expand(-1, -1, d))
        if with_bos:
            x = torch.cat([self.bos.expand(x.shape[0], 1, d), x], dim=1)
        return x + self.pos.weight[offset : offset + x.shape[1]]

    def _pointer(self, h: torch.Tensor, mem: _Memory) -> torch.Tensor:
        """Unmasked pointer scores `[B, m, n]` from decoder states `h [B, m, d]`."""
        return torch.matmul(self.w_q(self.ln_out(h)), mem.keys) * self.scale

    def _full_scores(self, mem: _Memory, prefix: torch.Tensor) -> torch.Tensor:
        """One parallel causal pass: `prefix [B, t]` -> unmasked scores `[B, t+1, n]`."""
        x = self._embed(mem, prefix, with_bos=True, offset=0)
        m = x.shape[1]
        causal = torch.ones(m, m, dtype=torch.bool, device=x.device).tril().unsqueeze(0)
        allowed = mem.mask.unsqueeze(1)
        for block, kv in zip(self.blocks, mem.cross_kv, strict=True):
            x, _ = block(x, causal, kv, allowed)
        return self._pointer(x, mem)

    def _step_scores(self, mem: _Memory, prefix: torch.Tensor, cache: list | None, incremental: bool):
        """Unmasked scores `[B, n]` for the position after `prefix [B, t]`, and the new cache."""
        if not incremental:
            return self._full_scores(mem, prefix)[:, -1], None
        t = prefix.shape[1]
        x = self._embed(mem, prefix[:, t - 1 :] if t else prefix, with_bos=t == 0, offset=t)
        allowed = mem.mask.unsqueeze(1)
        new_cache = []
        for i, (block, kv) in enumerate(zip(self.blocks, mem.cross_kv, strict=True)):
            # One query attends to every cached position, so no self-attention mask is needed.
            x, layer_cache = block(x, None, kv, allowed, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self._pointer(x, mem)[:, 0], new_cache

    # ------------------------------------------------------------------ teacher forcing
    def step_logits(self, batch: RerankBatch, pages: torch.Tensor, page_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced pointer scores along `pages`, one parallel pass with a causal mask.

        Args:
            pages: `[B, L]` int64 candidate indices.
            page_mask: optional `[B, L]` bool prefix mask for variable-length pages (logged
                pages); items at False positions count as not placed.
        Returns:
            `[B, L, n]` scores; -inf at padding and at items placed before t. Only at a
            False `page_mask` position can a row be entirely -inf.
        """
        return self._masked_step_scores(batch, pages, page_mask)[0]

    forward = step_logits

    def _masked_step_scores(self, batch: RerankBatch, pages: torch.Tensor, page_mask: torch.Tensor | None):
        self._check_batch(batch)
        self._check_pages(batch, pages, page_mask)
        if page_mask is not None:
            pages = torch.where(page_mask, pages, torch.zeros_like(pages))  # filler at ignored slots
        mem = self._memory(batch)
        scores = self._full_scores(mem, pages[:, :-1])
        allowed = batch.candidate_mask.unsqueeze(1) & ~placed_before(pages, scores.shape[-1], page_mask)
        return scores.masked_fill(~allowed, _NEG_INF), scores, allowed

    def _check_pages(self, batch: RerankBatch, pages: torch.Tensor, page_mask: torch.Tensor | None) -> None:
        if pages.dim() != 2:
            raise DataError(f"pages: expected [B, L], got shape {tuple(pages.shape)}")
        if pages.shape[1] > self.config.max_length:
            raise DataError(f"pages: length {pages.shape[1]} > the teacher's max_length {self.config.max_length}")
        if page_mask is not None:
            if tuple(page_mask.shape) != tuple(pages.shape) or page_mask.dtype != torch.bool:
                raise DataError("page_mask: must be a bool tensor shaped like pages")
            # Positions after a hole would read the hole's item through causal attention.
            holes = page_mask[:, 1:] & ~page_mask[:, :-1]
            if bool(holes.any()):
                raise DataError(f"page_mask: not a prefix (True then False) in request {int(holes.any(1).nonzero()[0])}")
        else:
            check_page_length(batch.candidate_mask, pages.shape[1])
        check_pages(pages, batch.candidate_mask, page_mask)

    def log_prob(self, batch: RerankBatch, pages: torch.Tensor, page_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-step log-probabilities `[B, L]` of `pages` (0 at False `page_mask` positions);
        the page log-likelihood is their sum. Differentiable (teacher-forced MLE)."""
        _, scores, _ = self._masked_step_scores(batch, pages, page_mask)
        return sequential_log_prob(scores, batch.candidate_mask, pages, page_mask, validate=False)

    def step_distributions(
        self, batch: RerankBatch, pages: torch.Tensor, tau: float = 1.0, page_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`q [B, L, n]`: `softmax_{i valid, not in pages_<t}(s_t / tau)` along `pages` (the SKD
        targets); exactly 0 on padding and placed items, all-zero rows at False `page_mask`."""
        if not tau > 0:
            raise ConfigError(f"tau: must be > 0, got {tau}")
        masked, _, allowed = self._masked_step_scores(batch, pages, page_mask)
        row_ok = allowed.any(-1, keepdim=True)
        if page_mask is not None:
            row_ok = row_ok & page_mask.unsqueeze(-1)
        safe = torch.where(row_ok, masked / tau, torch.zeros_like(masked))
        return safe.softmax(dim=-1) * row_ok

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def rollout(
        self,
        batch: RerankBatch,
        k: int,
        group: int = 1,
        greedy: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        incremental: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode G pages per request step by step; greedy, or sampled from `softmax(s_t / temp)`.

        Sampling uses Gumbel-Max per step (noise `[B*G, n]` drawn per step from `generator`),
        which draws from the same distribution as ancestral sampling and consumes the
        generator identically whether `incremental` or not.

        Returns:
            pages `[B, G, k]` and the masked pointer scores along them `[B, G, k, n]`
            (before temperature; -inf at padding and already-placed items).
        """
        if group < 1:
            raise ConfigError(f"group: must be >= 1, got {group}")
        if not greedy and not temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {temperature}")
        self._check_batch(batch, k)
        B, n = batch.batch_size, batch.num_candidates
        mem = self._memory(batch).repeat(group)
        avail = mem.mask
        arange = torch.arange(n, device=avail.device)
        prefix = torch.zeros(B * group, 0, dtype=torch.long, device=avail.device)
        cache, rows = None, []
        for _ in range(k):
            scores, cache = self._step_scores(mem, prefix, cache, incremental)
            scores = scores.masked_fill(~avail, _NEG_INF)
            keys = scores
            if not greedy:
                keys = scores / temperature + gumbel_noise(scores.shape, generator, scores.device, scores.dtype)
            idx = masked_argmax(keys, avail)
            rows.append(scores)
            prefix = torch.cat([prefix, idx.unsqueeze(1)], dim=1)
            avail = avail & (arange != idx.unsqueeze(1))
        return prefix.reshape(B, group, k), torch.stack(rows, dim=1).reshape(B, group, k, n)

    @torch.no_grad()
    def beam(self, batch: RerankBatch, k: int, width: int = 4, incremental: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search on the page log-likelihood: best page `[B, k]` and its log-probability `[B]`."""
        if width < 1:
            raise ConfigError(f"beam_width: must be >= 1, got {width}")
        self._check_batch(batch, k)
        B, n = batch.batch_size, batch.num_candidates
        mem = self._memory(batch).repeat(width)

        def step_fn(prefix: torch.Tensor, cache):
            scores, cache = self._step_scores(mem, prefix, cache, incremental)
            placed = torch.zeros_like(mem.mask).scatter(1, prefix, True)
            masked = scores.masked_fill(~(mem.mask & ~placed), _NEG_INF)
            # Dead beams may have nothing left (row all -inf -> NaN); beam_search never reads them.
            return masked.log_softmax(dim=-1), cache

        return beam_search(step_fn, B, n, batch.candidate_mask, k, width)

    def decode(
        self,
        batch: RerankBatch,
        k: int,
        strategy: str = "greedy",
        beam_width: int = 4,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        incremental: bool = True,
    ) -> torch.Tensor:
        """One page `[B, k]` per request: "greedy", "sample" (at `temperature`) or "beam"
        (the best of `beam_width` beams). `incremental=False`: full recomputation per step."""
        if strategy == "beam":
            return self.beam(batch, k, beam_width, incremental)[0]
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {strategy!r} is not one of {list(STRATEGIES)}")
        return self.rollout(batch, k, 1, strategy == "greedy", temperature, generator, incremental)[0][:, 0]

    def sample(
        self,
        batch: RerankBatch,
        k: int,
        group: int = 1,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        incremental: bool = True,
    ) -> torch.Tensor:
        """`[B, G, k]` pages sampled from the teacher's `P_T` at `temperature`."""
        return self.rollout(batch, k, group, False, temperature, generator, incremental)[0]

    def rerank(self, batch: RerankBatch, k: int) -> torch.Tensor:
        """The teacher's default page: incremental greedy decoding, `[B, k]`."""
        return self.decode(batch, k, "greedy")
