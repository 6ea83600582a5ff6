"""List-wise evaluator: per-position click and long-view probabilities of a whole page.

The "evaluator" of the generator-evaluator paradigm (GRN-style reranking; Dual-Rerank's
reward system contains "an evaluator model" [paper, arXiv 2604.07420, Figure 2]). Every
architectural detail below is [ours]:

- its own `CandidateEncoder` gives `T [B, n, d]` (context fused into every candidate,
  bidirectional attention over the candidate set);
- the page's items `T[pi_t]` plus a learned position embedding go through a *causal*
  decoder (pre-LN `layers.Block(cross=True)`): position t attends to the items at
  positions <= t (self-attention) and to the whole candidate set (cross-attention), so
  the prediction at t can express position effects, redundancy with the items above and
  complementarity with the previous item;
- a linear head gives two logits per position: click and long view.

Because of the causal structure, the value of appending candidate i at position t depends
only on the prefix, so one decoder call scores *all* n candidates as queries at position t
(each attends to the prefix's cached keys/values and to itself): beam search and greedy
decoding over the evaluator cost one call per step, not n (`beam_pages`).

`page_value = sum_t w . sigmoid(logits_t)` (w = (w_click, w_long_view)) is a *learned
proxy* of page utility: it is what the evaluator predicts from logs, not the world's
utility, and is only as good as the logs it was trained on.

Training targets (`loss`): on logs, whether each logged position was clicked / long
viewed (`feedback.page_events`: value > 0, so the same in any unit of the feedback
columns; absent positions masked); on graded lists (LETOR/MSLR) a documented conversion
(`feedback.graded_feedback`), click = label > 0 and long view = label >=
`graded_long_view_min`, on the valid candidates in upstream order (or a random order when
a generator is given), truncated to `max_positions`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from dualrerank.config import option
from dualrerank.decoding import beam_search, check_page_length, check_pages
from dualrerank.errors import ConfigError, DataError
from dualrerank.feedback import graded_column, graded_feedback, page_events
from dualrerank.losses import pointwise_bce
from dualrerank.models.encoder import CandidateEncoder, EncoderConfig
from dualrerank.models.layers import Block
from dualrerank.schema import RerankBatch

__all__ = ["EvaluatorConfig", "ListEvaluator", "upstream_order", "eval_mode"]


@dataclass
class EvaluatorConfig:
    encoder: EncoderConfig = option(factory=EncoderConfig, help="candidate encoder (feature fusion + bidirectional transformer)")
    n_layers: int = option(2, "causal decoder blocks over the page")
    max_positions: int = option(50, "longest page the evaluator scores (size of its position table)")
    value_weights: tuple[float, ...] = option((1.0, 1.0), "page_value weights (w_click, w_long_view)")
    beam_width: int = option(4, "beam width of rerank() (beam search over predicted gains)")
    click_name: str = option("click", "feedback/label column holding clicks")
    long_view_name: str = option("long_view", "feedback/label column holding long views")
    graded_long_view_min: float = option(2.0, "graded lists: a label >= this counts as a long view (> 0 as a click)")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """No dropout and no autograd inside; the module's train/eval mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def upstream_order(batch: RerankBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """`[B, n]` candidate indices: valid ones first, by upstream score (descending, stable).

    Without `upstream_score`, the candidates' own index order; with a `generator`, a
    uniformly random order instead.
    """
    mask = batch.candidate_mask
    if generator is not None:
        keys = torch.rand(mask.shape, generator=generator, device=generator.device).to(mask.device)
    elif batch.upstream_score is not None:
        keys = batch.upstream_score.float()
    else:
        keys = -torch.arange(mask.shape[1], dtype=torch.float32, device=mask.device).expand(mask.shape)
    keys = torch.where(mask, keys, torch.full_like(keys, float("-inf")))
    return torch.sort(keys, dim=1, descending=True, stable=True).indices


def _check_config(config: EvaluatorConfig) -> None:
    enc = config.encoder
    if enc.candidate_dim < 1:
        raise ConfigError("encoder.candidate_dim: must be set to the data's feature width (>= 1)")
    for name, value in (
        ("n_layers", config.n_layers),
        ("max_positions", config.max_positions),
        ("beam_width", config.beam_width),
    ):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if len(config.value_weights) != 2:
        raise ConfigError(f"value_weights: expected two numbers (w_click, w_long_view), got {list(config.value_weights)}")
    if enc.d_model % enc.n_heads:
        raise ConfigError(f"encoder.d_model={enc.d_model} must be divisible by encoder.n_heads={enc.n_heads}")


class ListEvaluator(nn.Module):
    """`(batch, pages [B, (G), L]) -> logits [B, (G), L, 2]` (click, long view) per position."""

    def __init__(self, config: EvaluatorConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        enc = config.encoder
        d = enc.d_model
        self.encoder = CandidateEncoder(enc)
        self.pos = nn.Embedding(config.max_positions, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.bos = nn.Parameter(0.02 * torch.randn(d))
        self.pair = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d, enc.n_heads, enc.ffn_mult, enc.dropout, cross=True) for _ in range(config.n_layers))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    # ------------------------------------------------------------------ shared parts
    def fit_normalizer(self, batch: RerankBatch) -> None:
        """Store the feature mean/std of `batch` (training data) in the encoder."""
        self.encoder.fit_normalizer(batch.candidates, batch.candidate_mask, batch.context)

    def _encode(self, batch: RerankBatch, repeat: int):
        """T `[B*r, n, d]`, per-block cross keys/values and memory mask `[B*r, 1, n]`."""
        enc = self.config.encoder
        if batch.candidate_dim != enc.candidate_dim:
            raise DataError(f"candidates: feature width {batch.candidate_dim} != the evaluator's {enc.candidate_dim}")
        if batch.context_dim != enc.context_dim:
            raise DataError(f"context: width {batch.context_dim} != the evaluator's {enc.context_dim}")
        T = self.encoder(batch.candidates, batch.context, batch.candidate_mask)
        # Keys/values are projected once per request, then shared by its G pages / W beams.
        memory = [tuple(x.repeat_interleave(repeat, 0) for x in cast(Block, b).project_memory(T)) for b in self.blocks]
        mem_allowed = batch.candidate_mask.repeat_interleave(repeat, 0).unsqueeze(1)
        return T.repeat_interleave(repeat, 0), memory, mem_allowed

    def _inputs(self, items: torch.Tensor, prev: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Decoder inputs `[B', m, d]` from item reps `items [B', m, d]`, the reps of the items
        just above them `prev` and position embeddings `pos` (both broadcastable).

        The explicit (item, item above) pair term [ours] makes redundancy/complementarity
        with the previous item learnable without first learning to attend to it."""
        prev = prev.expand_as(items)
        return items + self.pair(torch.cat([items, prev, items * prev], dim=-1)) + pos

    def _decode(self, x, allowed, memory, mem_allowed, caches=None):
        """Run the causal blocks; returns logits `[B', m, 2]` and per-block (k, v)."""
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, allowed, memory[i], mem_allowed, None if caches is None else caches[i])
            kvs.append(kv)
        return self.head(self.ln_out(x)), kvs

    def _weights(self, weights: tuple[float, float] | None) -> torch.Tensor:
        w = self.config.value_weights if weights is None else weights
        if len(w) != 2:
            raise ConfigError(f"value_weights: expected (w_click, w_long_view), got {w!r}")
        return torch.tensor([float(w[0]), float(w[1])], dtype=self.head.weight.dtype, device=self.head.weight.device)

    # ------------------------------------------------------------------ whole pages
    def forward(self, batch: RerankBatch, pages: torch.Tensor, page_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Click and long-view logits of every position of every page.

        Args:
            batch: B requests.
            pages: `[B, L]` or `[B, G, L]` candidate indices.
            page_mask: optional bool like `pages`; False positions are ignored (they are
                neither attended to nor meaningful in the output).
        Returns:
            `[B, L, 2]` or `[B, G, L, 2]` logits (last dim: click, long view).
        """
        check_pages(pages, batch.candidate_mask, page_mask)
        grouped = pages.dim() == 3
        p = (pages if grouped else pages.unsqueeze(1)).long()
        B, G, L = p.shape
        if L > self.config.max_positions:
            raise DataError(f"pages: length {L} > the evaluator's max_positions {self.config.max_positions}")
        T, memory, mem_allowed = self._encode(batch, G)  # rows b*G + g
        d = T.shape[-1]
        items = T.gather(1, p.reshape(B * G, L, 1).expand(-1, -1, d))
        prev = torch.cat([self.bos.expand(B * G, 1, d), items[:, :-1]], dim=1)
        x = self._inputs(items, prev, self.pos.weight[:L])
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril().unsqueeze(0)  # [1, L, L] causal
        if page_mask is not None:
            allowed = (allowed & page_mask.reshape(B * G, 1, L)) | eye
        logits, _ = self._decode(x, allowed, memory, mem_allowed)
        logits = logits.reshape(B, G, L, 2)
        return logits if grouped else logits.squeeze(1)

    def predict(self, batch: RerankBatch, pages: torch.Tensor, page_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities `[B, (G), L, 2]` of click and long view per position."""
        return torch.sigmoid(self(batch, pages, page_mask))

    def page_value(
        self,
        batch: RerankBatch,
        pages: torch.Tensor,
        weights: tuple[float, float] | None = None,
        page_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted page value `[B, (G)] = sum_t w . probs_t` (a learned proxy of utility)."""
        v = self.predict(batch, pages, page_mask) @ self._weights(weights)
        if page_mask is not None:
            v = torch.where(page_mask, v, torch.zeros_like(v))
        return v.sum(dim=-1)

    # ------------------------------------------------------------------ training
    def training_targets(
        self, batch: RerankBatch, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pages `[B, L]`, page mask `[B, L]`, targets `[B, L, 2]`) for `loss` (see module doc)."""
        L_max = self.config.max_positions
        if batch.logged_page is not None:
            happened, pmask = page_events(batch, (self.config.click_name, self.config.long_view_name))
            # Causal model: dropping positions beyond max_positions leaves the rest unbiased.
            return batch.logged_page[:, :L_max].long(), pmask[:, :L_max], happened[:, :L_max]
        rel = graded_column(batch)
        order = upstream_order(batch, generator)[:, :L_max]
        pmask = torch.arange(order.shape[1], device=order.device).unsqueeze(0) < batch.num_valid.unsqueeze(1)
        return order, pmask, graded_feedback(rel.gather(1, order), self.config.graded_long_view_min)

    def loss(self, batch: RerankBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean BCE of click and long-view logits over the existing positions of the targets."""
        pages, pmask, targets = self.training_targets(batch, generator)
        logits = self(batch, pages, pmask)
        return pointwise_bce(logits, targets, pmask.unsqueeze(-1).expand_as(logits))

    # ------------------------------------------------------------------ decoding
    def _step_fn(self, batch: RerankBatch, width: int, weights: tuple[float, float] | None):
        """A `beam_search` step function scoring all n candidates at position t in one call.

        State: per block, the prefix's self-attention cache `[B*W, h, t, d_head]` and the
        keys/values the n candidate queries produced at the previous step; the chosen
        candidate's entries are appended to the cache (exactly what a full forward of the
        prefix computes at that position, thanks to causality).
        """
        T, memory, mem_allowed = self._encode(batch, width)
        w = self._weights(weights)
        n = T.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=T.device)

        def step(prefix: torch.Tensor, state):
            t = prefix.shape[1]
            caches = None
            if t > 0:
                last = prefix[:, -1].view(-1, 1, 1, 1)
                caches = []
                for i, (ck, cv) in enumerate(state["cand"]):
                    idx = last.expand(-1, ck.shape[1], 1, ck.shape[3])
                    k_new, v_new = ck.gather(2, idx), cv.gather(2, idx)
                    if state["cache"]:
                        k_new = torch.cat([state["cache"][i][0], k_new], dim=2)
                        v_new = torch.cat([state["cache"][i][1], v_new], dim=2)
                    caches.append((k_new, v_new))
            if t == 0:
                prev = self.bos.view(1, 1, -1)
            else:
                prev = T.gather(1, prefix[:, -1].view(-1, 1, 1).expand(-1, 1, T.shape[-1]))
            x = self._inputs(T, prev, self.pos.weight[t])
            # Candidate i (a query at position t) sees the whole prefix and itself only.
            allowed = torch.cat([torch.ones(n, t, dtype=torch.bool, device=T.device), eye], dim=1).unsqueeze(0)
            logits, kvs = self._decode(x, allowed, memory, mem_allowed, caches)
            cand = [(k[:, :, t:], v[:, :, t:]) for k, v in kvs]
            return torch.sigmoid(logits) @ w, {"cache": caches or [], "cand": cand}

        return step

    def beam_pages(
        self, batch: RerankBatch, k: int, width: int | None = None, weights: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """`[B, k]` page maximising the predicted page value by beam search (width W)."""
        W = self.config.beam_width if width is None else width
        if k > self.config.max_positions:
            raise DataError(f"k: page length {k} > the evaluator's max_positions {self.config.max_positions}")
        check_page_length(batch.candidate_mask, k)
        with eval_mode(self):  # decoding must be deterministic: no dropout
            pages, _ = beam_search(
                self._step_fn(batch, W, weights), batch.batch_size, batch.num_candidates, batch.candidate_mask, k, W
            )
        return pages

    def greedy_pages(self, batch: RerankBatch, k: int, weights: tuple[float, float] | None = None) -> torch.Tensor:
        """`[B, k]`: at each position the candidate with the highest predicted gain (beam width 1)."""
        return self.beam_pages(batch, k, width=1, weights=weights)

    def rerank(self, batch: RerankBatch, k: int) -> torch.Tensor:
        """Default page: beam search of width `config.beam_width` over predicted gains."""
        return self.beam_pages(batch, k)
