"""Serving runtime: compute the student's logit matrix with ONNX Runtime or PyTorch,
decode pages.

Loading and writing a serving checkpoint (student, optional `evaluator/`, optional
`student.onnx`) is `serve.bundle`'s job: it may export the student, and this module never
imports the exporter (`bundle.py -> export.py -> runtime.py`, docs/design.md).

Decoding [ours]: group 1 is the student's greedy page (L masked argmaxes over the logit
matrix, in NumPy). Group G > 1 draws G pages with vectorised Gumbel-Max
(`decoding.gumbel_max_pages`, the greedy page kept as one member unless configured
otherwise) and returns the one with the highest evaluator page value when the checkpoint
has an evaluator, else the one with the highest student page log-probability. The noise
of a request is seeded by (server seed, request_id), so a request is reproducible.

Finite numbers only: `ServingModel.rerank` refuses non-finite inputs (`DataError`) and
raises `NonFiniteOutput` (a `DataError`) when the logits at real candidates, the page's
scores or the evaluator's page value are NaN/inf. Finite inputs near float32's maximum
(e.g. 3e38) overflow inside the network; a page decoded from such logits would be the
input order with made-up scores, so no page is returned at all.

This module imports the student, the evaluator and the decoders only: no training code,
no simulator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from dualrerank.decoding import gumbel_max_pages, sequential_log_prob
from dualrerank.errors import CheckpointError, ConfigError, DataError
from dualrerank.schema import RerankBatch

if TYPE_CHECKING:
    from dualrerank.models.evaluator import ListEvaluator

__all__ = [
    "EVALUATOR_DIR",
    "ONNX_FILE",
    "NonFiniteOutput",
    "RerankResult",
    "TorchBackend",
    "OnnxBackend",
    "ServingModel",
    "greedy_pages",
    "request_seed",
    "load_student",
]

# The serving checkpoint's layout (see `serve.bundle`).
EVALUATOR_DIR = "evaluator"
ONNX_FILE = "student.onnx"


def greedy_pages(logits: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequential masked argmax over a logit matrix, in NumPy.

    Same selection rule as `decoding.masked_greedy` (ties to the lowest index; an allowed
    candidate, even one scored -inf or NaN, always beats a disallowed one).

    Args:
        logits: `[B, L, n]` float.
        mask: `[B, n]` bool; every row needs at least L True entries.
    Returns:
        pages `[B, L]` int64 and step probabilities `[B, L]` float32: at step t the
        softmax over the candidates still available of the chosen candidate's logit.
    """
    B, L, _ = logits.shape
    info = np.finfo(logits.dtype)
    z = np.nan_to_num(logits, nan=info.min, posinf=info.max, neginf=info.min)
    avail = mask.astype(bool, copy=True)
    rows = np.arange(B)
    pages = np.empty((B, L), np.int64)
    probs = np.empty((B, L), np.float32)
    with np.errstate(over="ignore", under="ignore"):
        for t in range(L):
            keys = np.where(avail, z[:, t], -np.inf)
            idx = keys.argmax(axis=1)
            pages[:, t] = idx
            probs[:, t] = 1.0 / np.exp(keys - keys[rows, idx][:, None]).sum(axis=1)
            avail[rows, idx] = False
    return pages, probs


def request_seed(seed: int, request_id: str) -> int:
    """A 63-bit seed from (server seed, request_id): stable across processes (no hash salt)."""
    digest = hashlib.blake2b(f"{seed}\x00{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Backend(Protocol):
    name: str

    def logits(self, candidates: np.ndarray, context: np.ndarray, mask: np.ndarray, length: int) -> np.ndarray:
        """`[B, length, n]` float32 logits (-inf at padding) from `[B,n,d]`, `[B,c]`, `[B,n]`."""
        ...


class TorchBackend:
    """The student's own forward pass in PyTorch (inference mode)."""

    name = "torch"

    def __init__(self, student: torch.nn.Module) -> None:
        self.student = student.eval()

    def logits(self, candidates: np.ndarray, context: np.ndarray, mask: np.ndarray, length: int) -> np.ndarray:
        with torch.inference_mode():
            z = self.student(torch.from_numpy(candidates), torch.from_numpy(context), torch.from_numpy(mask), length)
        return z.numpy()


class OnnxBackend:
    """An ONNX Runtime session of the exported student graph (CPU execution provider)."""

    name = "onnx"

    def __init__(self, model: bytes | str | Path, threads: int = 1, expected: dict[str, str] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One request at a time per call: intra-op threads parallelise inside the graph;
        # the server's worker pool supplies the parallelism across requests.
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = model if isinstance(model, bytes) else str(model)
        where = "in-memory export" if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise CheckpointError(f"onnx: file not found: {model}")
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"onnx: cannot load {where} ({first[:200]})") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        for key, value in (expected or {}).items():
            if self.metadata.get(key) != value:
                raise CheckpointError(
                    f"onnx: {where} does not match the checkpoint ({key} = {self.metadata.get(key)!r}, "
                    f"checkpoint has {value!r}); re-run `dualrerank export`"
                )
        names = [i.name for i in self.session.get_inputs()]
        if names != ["candidates", "context", "candidate_mask", "positions"]:
            raise CheckpointError(f"onnx: {where} has inputs {names}, not a dualrerank student graph")

    def logits(self, candidates: np.ndarray, context: np.ndarray, mask: np.ndarray, length: int) -> np.ndarray:
        feeds = {
            "candidates": candidates,
            "context": context,
            "candidate_mask": mask,
            "positions": np.arange(length, dtype=np.int64),
        }
        return self.session.run(["logits"], feeds)[0]


class NonFiniteOutput(DataError):
    """The model computed NaN/inf for a request whose inputs were finite (features so
    large that the network overflows): the request is refused, not answered."""


def _first_bad_row(bad: np.ndarray) -> int | None:
    rows = np.flatnonzero(bad)
    return int(rows[0]) if rows.size else None


def _refuse_non_finite(batch: RerankBatch, bad: np.ndarray, what: str) -> None:
    b = _first_bad_row(bad)
    if b is not None:
        raise NonFiniteOutput(f"{what} is not finite for {batch.request_name(b)}: input features too large?")


@dataclass
class RerankResult:
    """Pages and scores for B requests.

    Attributes:
        pages: `[B, k]` int64 candidate indices.
        scores: `[B, k]` float32 step probabilities of the returned page under the
            student's sequentially masked softmax.
        page_log_prob: `[B]` float32 student log-probability of the page.
        page_value: `[B]` evaluator page value when the evaluator chose the page, else None.
        selected_by: "greedy", "evaluator" or "log_prob".
    """

    pages: np.ndarray
    scores: np.ndarray
    page_log_prob: np.ndarray
    page_value: np.ndarray | None
    selected_by: str


class ServingModel:
    """Student logits backend + decoding (+ optional evaluator) behind one `rerank` call."""

    def __init__(
        self,
        backend: Backend,
        candidate_dim: int,
        context_dim: int,
        max_positions: int,
        model_version: str,
        evaluator: ListEvaluator | None = None,
        temperature: float = 1.0,
        include_greedy: bool = True,
    ) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {temperature}")
        self.backend = backend
        self.candidate_dim, self.context_dim, self.max_positions = candidate_dim, context_dim, max_positions
        self.model_version = model_version
        self.evaluator = evaluator
        self.temperature = temperature
        self.include_greedy = include_greedy

    def rerank(self, batch: RerankBatch, k: int, group: int = 1, seed: int | None = None) -> RerankResult:
        """Pages `[B, k]` for a validated batch (see the module docstring for the rule).

        `batch` must already have passed `batch.validate(k, candidate_dim, context_dim)`;
        `seed` seeds the Gumbel noise when `group > 1`. Raises `DataError` for NaN/inf
        inputs and `NonFiniteOutput` when the model's numbers for a request are not finite.
        """
        mask = batch.candidate_mask.numpy()
        X, C = batch.candidates.numpy(), batch.context.numpy()
        # Cheap next to the network, and what keeps NaN from reaching a page if a caller
        # skipped `validate` (the service never does).
        bad_input = (~np.isfinite(X).all(axis=2) & mask).any(axis=1) | ~np.isfinite(C).all(axis=1)
        b = _first_bad_row(bad_input)
        if b is not None:
            raise DataError(f"candidates/context: NaN/inf in the features of {batch.request_name(b)}")
        z = self.backend.logits(X, C, mask, k)
        # -inf at padding is by design; anything non-finite at a real candidate is overflow.
        _refuse_non_finite(batch, (~np.isfinite(z) & mask[:, None, :]).any(axis=(1, 2)), "model output")
        result = self._decode(batch, z, k, group, seed)
        bad = ~np.isfinite(result.scores).all(axis=1) | ~np.isfinite(result.page_log_prob)
        _refuse_non_finite(batch, bad, "page score")
        if result.page_value is not None:
            _refuse_non_finite(batch, ~np.isfinite(result.page_value), "evaluator page value")
        return result

    def _decode(self, batch: RerankBatch, z: np.ndarray, k: int, group: int, seed: int | None) -> RerankResult:
        """The page of each request from finite logits `z [B, k, n]` (greedy or best of a group)."""
        mask = batch.candidate_mask.numpy()
        if group <= 1:
            pages, probs = greedy_pages(z, mask)
            return RerankResult(pages, probs, np.log(probs).sum(axis=1), None, "greedy")
        zt, mt = torch.from_numpy(z), batch.candidate_mask
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        with torch.inference_mode():
            group_pages = gumbel_max_pages(zt, mt, group, self.temperature, gen, self.include_greedy)  # [B, G, k]
            step_lp = sequential_log_prob(zt, mt, group_pages, validate=False)  # [B, G, k]
            page_lp = step_lp.sum(dim=-1)
            values = None
            if self.evaluator is not None:
                values = self.evaluator.page_value(batch, group_pages)  # [B, G]
                best = values.argmax(dim=1)
            else:
                best = page_lp.argmax(dim=1)
            rows = torch.arange(group_pages.shape[0])
            return RerankResult(
                group_pages[rows, best].numpy(),
                step_lp[rows, best].exp().numpy(),
                page_lp[rows, best].numpy(),
                None if values is None else values[rows, best].numpy(),
                "evaluator" if values is not None else "log_prob",
            )

    def warmup(self) -> None:
        """One dummy inference (allocations, lazy initialisation) before real traffic."""
        n, k = max(2, min(8, self.max_positions)), 1
        X = np.zeros((1, n, self.candidate_dim), np.float32)
        C = np.zeros((1, self.context_dim), np.float32)
        mask = np.ones((1, n), bool)
        self.backend.logits(X, C, mask, k)
        if self.evaluator is not None:
            batch = RerankBatch(
                candidates=torch.from_numpy(X), candidate_mask=torch.from_numpy(mask), context=torch.from_numpy(C)
            )
            with torch.inference_mode():
                self.evaluator.page_value(batch, torch.arange(k).view(1, 1, k))


def load_student(checkpoint: str | Path) -> Any:
    """The NAR student stored in `checkpoint`; `CheckpointError` if it holds another model."""
    from dualrerank.models.checkpoint import load_checkpoint_of_kind

    return load_checkpoint_of_kind(checkpoint, ("nar",), "the NAR student that export and serving need")
