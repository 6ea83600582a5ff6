"""NAR student: one-pass logits, valid greedy/sampled pages, page log-probs, export."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualrerank.decoding import masked_greedy, sequential_log_prob
from dualrerank.errors import ConfigError, DataError
from dualrerank.models.encoder import EncoderConfig
from dualrerank.models.student import NARStudent, StudentConfig
from dualrerank.schema import RerankBatch

from random_batches import D_CTX, D_IN, make_batch


def make_student(seed: int = 0) -> NARStudent:
    enc = EncoderConfig(candidate_dim=D_IN, context_dim=D_CTX, d_model=32, n_heads=4, n_layers=1, dropout=0.0)
    with torch.random.fork_rng():  # seeded weights without touching other tests' RNG
        torch.manual_seed(seed)
        return NARStudent(StudentConfig(encoder=enc, n_layers=2, n_heads=4, max_positions=6, dropout=0.0)).eval()


STUDENT = make_student()


def assert_valid_pages(pages: torch.Tensor, mask: torch.Tensor) -> None:
    p = pages if pages.dim() == 3 else pages.unsqueeze(1)
    B, G, _ = p.shape
    assert bool(torch.gather(mask.unsqueeze(1).expand(B, G, -1), 2, p).all()), "page holds padding"
    assert bool((p.sort(dim=-1).values.diff(dim=-1) != 0).all()), "page repeats a candidate"


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 9), st.data())
def test_student_decoders_return_valid_pages(seed, B, n, data):
    k = data.draw(st.integers(1, min(n, 6)))
    batch = make_batch(seed, B, n, k)
    z = STUDENT.logits(batch, k)
    assert z.shape == (B, k, n)
    assert bool(torch.isneginf(z[~batch.candidate_mask.unsqueeze(1).expand_as(z)]).all())
    assert bool(torch.isfinite(z[batch.candidate_mask.unsqueeze(1).expand_as(z)]).all())
    greedy = STUDENT.rerank(batch, k)
    assert greedy.shape == (B, k)
    assert_valid_pages(greedy, batch.candidate_mask)
    assert torch.equal(greedy, masked_greedy(z, batch.candidate_mask))
    gen = torch.Generator().manual_seed(seed)
    group = STUDENT.sample(batch, k, group=4, temperature=1.3, generator=gen, include_greedy=True)
    assert group.shape == (B, 4, k)
    assert_valid_pages(group, batch.candidate_mask)
    assert torch.equal(group[:, 0], greedy)


def test_page_log_prob_matches_decoding_and_is_differentiable():
    student = make_student(1).train()
    batch = make_batch(2, B=3, n=7, min_valid=5)
    pages = student.sample(batch, 4, group=5, generator=torch.Generator().manual_seed(0))
    lp = student.page_log_prob(batch, pages)
    assert lp.shape == (3, 5, 4)
    z = student.logits(batch, 4)
    torch.testing.assert_close(lp, sequential_log_prob(z, batch.candidate_mask, pages))
    torch.testing.assert_close(student.page_log_prob(batch, pages[:, 0]), lp[:, 0])
    (-lp.sum()).backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert student.queries.grad.abs().sum() > 0


def test_positions_see_each_other():
    """Non-causal self-attention: changing one position's query moves every position's logits."""
    student, batch = make_student(2), make_batch(3)
    before = student.logits(batch, 4)
    with torch.no_grad():
        student.queries[3] += torch.linspace(-1.0, 1.0, student.queries.shape[1])
    after = student.logits(batch, 4)
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_padding_content_and_batch_composition_do_not_matter():
    batch = make_batch(8, B=3, n=7, min_valid=4)
    other = make_batch(8, B=3, n=7, min_valid=4)
    other.candidates[~other.candidate_mask] = -7.0
    z, z_other = STUDENT.logits(batch, 4), STUDENT.logits(other, 4)
    torch.testing.assert_close(z, z_other)
    alone = STUDENT.logits(batch.select([1]), 4)
    torch.testing.assert_close(alone, z[1:2], atol=1e-5, rtol=0)


def test_student_learns_a_target_order():
    """Sequential-likelihood training teaches one-pass logits a full order (sort by feature 0)."""
    student = make_student(3).train()
    batch = make_batch(11, B=32, n=6, min_valid=6)
    student.fit_normalizer(batch)
    target = batch.candidates[:, :, 0].argsort(dim=1, descending=True)[:, :3]
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(120):
        loss = -student.page_log_prob(batch, target).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    assert float((student.rerank(batch, 3) == target).float().mean()) > 0.9


def test_forward_and_greedy_export_to_onnx():
    import onnxruntime as ort  # a declared dependency: a missing one must fail, not skip
    student = make_student(4)

    class Greedy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student

        def forward(self, candidates, context, mask):
            z = self.student(candidates, context, mask, 3)
            return z, masked_greedy(z, mask, validate=False)

    # A freshly built wrapper is in training mode, and export restores that mode on
    # its children afterwards: keep the wrapper in eval mode.
    wrapper = Greedy().eval()
    batch = make_batch(5, B=2, n=6, min_valid=3)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's tracer warnings are expected
        torch.onnx.export(
            wrapper, (batch.candidates, batch.context, batch.candidate_mask), buf, dynamo=False,
            input_names=["candidates", "context", "mask"], output_names=["logits", "page"],
            dynamic_axes={"candidates": {0: "B", 1: "n"}, "context": {0: "B"}, "mask": {0: "B", 1: "n"}},
        )
    session = ort.InferenceSession(buf.getvalue())
    new = make_batch(6, B=3, n=9, min_valid=3)  # other B and n than at export
    z, page = session.run(None, {"candidates": new.candidates.numpy(), "context": new.context.numpy(),
                                 "mask": new.candidate_mask.numpy()})
    with torch.no_grad():
        z_ref = student.logits(new, 3)
    np.testing.assert_allclose(z, z_ref.numpy(), atol=1e-5)
    np.testing.assert_array_equal(page, student.rerank(new, 3).numpy())


def test_bad_input_and_config_are_clear_errors():
    batch = make_batch(0, B=2, n=9, min_valid=9)
    with pytest.raises(DataError, match="max_positions"):
        STUDENT.rerank(batch, 7)
    short = make_batch(0, B=2, n=5, min_valid=5)
    short.candidate_mask[1, 2:] = False
    with pytest.raises(DataError, match="3 > 2 valid candidates in request 1"):
        STUDENT.rerank(short, 3)
    with pytest.raises(DataError, match="context"):
        STUDENT.rerank(RerankBatch(torch.randn(1, 4, D_IN), torch.ones(1, 4, dtype=torch.bool), torch.randn(1, 1)), 2)
    with pytest.raises(DataError, match="repeats"):
        STUDENT.page_log_prob(batch, torch.tensor([[0, 0], [1, 1]]))
    with pytest.raises(ConfigError, match="temperature"):
        STUDENT.sample(batch, 2, group=2, temperature=-1.0)
    with pytest.raises(ConfigError, match="max_positions"):
        NARStudent(StudentConfig(encoder=EncoderConfig(candidate_dim=3), max_positions=0))


def test_position_logits_with_a_positions_tensor():
    batch = make_batch(9)
    z = STUDENT.logits(batch, 4)
    torch.testing.assert_close(
        STUDENT.position_logits(batch.candidates, batch.context, batch.candidate_mask, torch.arange(4)), z
    )
