"""Sequential Knowledge Distillation: the objective, the stability certificate against
observed agreement, and `dualrerank distill` end to end (run directory, resume, bad teachers)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualrerank.cli import main
from dualrerank.decoding import masked_greedy, placed_before
from dualrerank.losses import mle_loss
from dualrerank.metrics import prefix_masked_probs, ptar, stability_certificate
from dualrerank.models.checkpoint import load_checkpoint, save_checkpoint
from dualrerank.models.registry import build_model, config_from_dict, set_data_dims
from dualrerank.models.student import NARStudent
from dualrerank.train.distill import (
    DistillConfig,
    agreement_figures,
    skd_loss,
    teacher_reference,
)
from dualrerank.train.splits import SplitConfig, load_splits
from dualrerank.train.supervised import build_for_data

TINY_DATA = {"train_requests": 200, "valid_requests": 48, "test_requests": 48, "page_length": 4}
TINY_MODEL = {"encoder": {"d_model": 16, "n_heads": 2, "n_layers": 1}, "n_layers": 1, "n_heads": 2}


@pytest.fixture(scope="module")
def splits():
    return load_splits(SplitConfig(**TINY_DATA))


@pytest.fixture(scope="module")
def teacher_dir(splits, tmp_path_factory):
    """An untrained (random) tiny teacher checkpoint: distillation only needs a frozen AR model."""
    teacher = build_for_data("teacher", TINY_MODEL, splits.train, seed=3)
    d = tmp_path_factory.mktemp("teacher") / "checkpoint"
    save_checkpoint(teacher.eval(), d, "teacher")
    return d


# ---------------------------------------------------------------------------- objective
def _problem(seed: int, B: int = 5, L: int = 4, n: int = 7):
    """Random q along a random path with padding and a short request (masked positions)."""
    g = torch.Generator().manual_seed(seed)
    cmask = torch.ones(B, n, dtype=torch.bool)
    cmask[0, 5:] = False  # 5 valid candidates
    cmask[1, 3:] = False  # 3 valid: its path has 3 positions
    path = torch.stack([torch.randperm(int(cmask[b].sum()), generator=g)[:L] if cmask[b].sum() >= L
                        else torch.cat([torch.randperm(int(cmask[b].sum()), generator=g), torch.zeros(L - int(cmask[b].sum()), dtype=torch.long)])
                        for b in range(B)])
    pmask = torch.arange(L).unsqueeze(0) < cmask.sum(1, keepdim=True).clamp(max=L)
    scores = torch.randn(B, L, n, generator=g) * 2
    allowed = cmask.unsqueeze(1) & ~placed_before(path, n, pmask)
    q = torch.where(allowed, scores, torch.tensor(-math.inf)).softmax(-1) * pmask.unsqueeze(-1)
    return cmask, path, pmask, q, g


@pytest.mark.parametrize("kd_mask", ["none", "prefix"])
def test_kd_term_is_zero_when_student_rows_equal_teacher_rows(kd_mask):
    cmask, path, pmask, q, _ = _problem(0)
    z = torch.log(q)  # -inf exactly where q is 0: the student's rows are the teacher's
    # Prefix-scope unlikelihood is 0 on such rows (q is 0 on the prefix); page scope is not.
    cfg = DistillConfig(tau=1.0, alpha=0.0, unlikelihood=1.0, kd_mask=kd_mask, unlikelihood_items="prefix")
    loss, logs = skd_loss(cfg, z, cmask, path, pmask, q)
    assert abs(float(loss)) < 1e-6 and abs(logs["kd_loss"]) < 1e-6
    # A different student has a positive KD term.
    loss2, logs2 = skd_loss(cfg, torch.zeros_like(z), cmask, path, pmask, q)
    assert logs2["kd_loss"] > 1e-3 and float(loss2) > 1e-3


@pytest.mark.parametrize("kd_mask", ["none", "prefix"])
@pytest.mark.parametrize("soft", [True, False])
def test_gradients_finite_and_masks_respected(kd_mask, soft):
    cmask, path, pmask, q, g = _problem(1)
    cfg = DistillConfig(tau=2.0, alpha=0.5, unlikelihood=1.0, kd_mask=kd_mask, soft=soft, position_weights="dcg")
    base = torch.randn(q.shape, generator=g).masked_fill(~cmask.unsqueeze(1), -math.inf)
    z = base.clone().requires_grad_(True)
    loss, _ = skd_loss(cfg, z, cmask, path, pmask, q)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(z.grad).all())
    # Padded candidates and absent positions of the short request get no gradient.
    assert float(z.grad[~cmask.unsqueeze(1).expand_as(z)].abs().sum()) == 0.0
    assert float(z.grad[~pmask].abs().sum()) == 0.0
    # Changing the student at absent positions does not change the loss.
    other = base.clone()
    other[~pmask] = torch.randn(int((~pmask).sum()), q.shape[-1]).masked_fill(~cmask[1].unsqueeze(0), -math.inf)
    assert torch.allclose(skd_loss(cfg, other, cmask, path, pmask, q)[0], loss.detach())
    prefix = placed_before(path, q.shape[-1], pmask) & cmask.unsqueeze(1)
    moved = base.clone()
    moved[prefix] += 5.0
    moved_loss = skd_loss(cfg, moved, cmask, path, pmask, q)[0]
    if not soft:
        # The teacher prefix is masked out of the path likelihood: logits there cannot matter.
        assert torch.allclose(moved_loss, loss.detach(), atol=1e-6)
    else:
        # The unlikelihood term sees the unmasked rows in both kd_mask modes: raising the
        # prefix items' logits costs more; without it, kd_mask prefix ignores them.
        assert float(moved_loss) > float(loss.detach()) + 1e-3
        no_ul = dataclasses.replace(cfg, unlikelihood=0.0)
        same = kd_mask == "prefix"
        a, b = skd_loss(no_ul, base, cmask, path, pmask, q)[0], skd_loss(no_ul, moved, cmask, path, pmask, q)[0]
        assert bool(torch.allclose(a, b, atol=1e-6)) == same


def test_soft_false_is_hard_path_mle_without_kd():
    cmask, path, pmask, q, g = _problem(2)
    z = torch.randn(q.shape, generator=g).masked_fill(~cmask.unsqueeze(1), -math.inf)
    cfg = DistillConfig(soft=False, alpha=3.0, unlikelihood=5.0)
    loss, logs = skd_loss(cfg, z, cmask, path, pmask, None)
    assert logs["kd_loss"] == 0.0
    expected = mle_loss(z.masked_fill(placed_before(path, z.shape[-1], pmask), -math.inf), path, pmask)
    assert torch.allclose(loss, expected)
    # The teacher's distributions play no part.
    assert torch.allclose(skd_loss(cfg, z, cmask, path, pmask, q)[0], expected)


# ---------------------------------------------------------------------------- certificate
class _NoisyCopy:
    """A NAR-like student whose rows are the teacher's step scores along its greedy page
    plus noise: close to the teacher for small noise, unrelated for large noise."""

    def __init__(self, teacher, noise: float, seed: int) -> None:
        self.teacher, self.noise, self.seed = teacher, noise, seed

    def logits(self, batch, k):
        page = self.teacher.rerank(batch, k)
        scores = self.teacher.step_logits(batch, page)
        finite = torch.isfinite(scores)
        floor = scores.masked_fill(~finite, math.inf).amin(-1, keepdim=True) - 1.0
        z = torch.where(finite, scores, floor)  # the prefix gets low but finite scores
        z = z + self.noise * torch.randn(z.shape, generator=torch.Generator().manual_seed(self.seed))
        return z.masked_fill(~batch.candidate_mask.unsqueeze(1), -math.inf)

    def rerank(self, batch, k):
        return masked_greedy(self.logits(batch, k), batch.candidate_mask)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), sharpness=st.sampled_from([1.0, 5.0, 30.0]),
       noise=st.sampled_from([0.0, 0.05, 0.5, 3.0]), real_student=st.booleans())
def test_observed_ptar_never_below_certified_bound(splits, seed, sharpness, noise, real_student):
    torch.manual_seed(seed)
    cfg = set_data_dims(config_from_dict("teacher", TINY_MODEL), splits.train.candidate_dim, splits.train.context_dim)
    teacher = build_model("teacher", cfg).eval()
    teacher.fit_normalizer(splits.train)
    with torch.no_grad():
        teacher.w_q.weight.mul_(sharpness)  # sharper teachers give certifiable steps
    if real_student:
        scfg = set_data_dims(config_from_dict("nar", TINY_MODEL), splits.train.candidate_dim, splits.train.context_dim)
        student = NARStudent(scfg).eval()
        student.fit_normalizer(splits.train)
    else:
        student = _NoisyCopy(teacher, noise, seed)
    batch = splits.valid.batch.select(torch.arange(16))
    L = splits.page_length
    # Per request: observed PTAR >= certified lower bound, PTAR@4 likewise.
    ref = teacher_reference(teacher, batch, L)
    for (length, idx), tpage, q in zip(ref.groups, ref.pages, ref.probs):
        sub = batch.select(idx)
        z = student.logits(sub, length)
        page = masked_greedy(z, sub.candidate_mask)
        cert = stability_certificate(q, prefix_masked_probs(z, sub.candidate_mask, tpage), path=tpage)
        agree = ptar(page, tpage, k=4)
        assert bool((agree["ptar"] >= cert.ptar_lower - 1e-12).all())
        assert bool((agree["ptar@4"] >= cert.ptar_lower_at(4) - 1e-12).all())
        # The certified prefix is reproduced exactly.
        for b in range(len(idx)):
            m = int(cert.prefix[b])
            assert torch.equal(page[b, :m], tpage[b, :m])
    figures = agreement_figures(student, teacher, batch, L)
    assert figures["ptar"] >= figures["certified_ptar"] - 1e-12
    if not real_student and noise == 0.0:
        # p_t = q_t exactly: every step with a strict teacher top-1 is certified (non-vacuous bound).
        assert figures["ptar"] == 1.0 and figures["certified_ptar"] > 0.5


class _SwapLastTwo:
    """A reranker without logits serving the teacher's greedy page with its last two items
    swapped: it agrees with the teacher at exactly the first L - 2 positions."""

    def __init__(self, teacher) -> None:
        self.teacher = teacher

    def rerank(self, batch, k):
        page = self.teacher.rerank(batch, k).clone()
        page[:, [-2, -1]] = page[:, [-1, -2]]
        return page


def test_agreement_figures_for_models_without_logits(splits, teacher_dir):
    teacher = load_checkpoint(teacher_dir)
    L = splits.page_length
    batch = splits.valid.batch
    assert L == 4 and bool((batch.num_valid >= L).all())  # every request is decoded at length 4
    figures = agreement_figures(_SwapLastTwo(teacher), teacher, batch, L)
    assert figures["ptar"] == pytest.approx(2 / 4) and figures["ptar@4"] == pytest.approx(2 / 4)
    assert figures["exact_page"] == 0.0
    # The teacher's margin is the teacher's, whoever is compared with it.
    ref = teacher_reference(teacher, batch, L)
    top2 = torch.cat(ref.probs).topk(2, dim=-1).values
    assert figures["teacher_margin"] == pytest.approx(float((top2[..., 0] - top2[..., 1]).double().mean()))
    for key in ("collapse_rate", "collision_share", "mean_row_js", "mean_row_entropy", "certified_ptar",
                "certified_ptar@4", "certified_prefix", "certified_step_share"):
        assert figures[key] is None, key


# ---------------------------------------------------------------------------- end to end
def _config(tmp_path: Path, **top) -> Path:
    cfg = {"data": dict(TINY_DATA), "optim": {"epochs": 1, "batch_size": 100}, "model_config": TINY_MODEL, **top}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_distill_cli_writes_run_dir_and_resumes(tmp_path, teacher_dir, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_dir), "--config", str(_config(tmp_path)), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("normalized_utility", "utility", "ptar", "ptar@4", "exact_page", "collapse_rate", "certified_ptar",
                "mean_row_js", "latency_ms_p50", "params", "teacher_normalized_utility"):
        assert result[key] is not None and math.isfinite(result[key]), key
    assert 0.0 <= result["certified_ptar"] <= result["ptar"] <= 1.0
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "report.md", "curves.png", "last.pt",
                 "checkpoint/config.json", "checkpoint/model.safetensors"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    for key in ("valid_ptar", "valid_ptar@4", "valid_exact_page", "valid_collapse_rate", "valid_certified_ptar",
                "valid_mean_row_js", "valid_normalized_utility", "train_kd_loss", "train_loss", "valid_teacher_margin"):
        assert key in records[0], key
    assert isinstance(load_checkpoint(out / "checkpoint"), NARStudent)
    assert main(["distill", "--teacher", str(teacher_dir), "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_distill_hard_paths_logs_zero_kd(tmp_path, teacher_dir, splits):
    from dualrerank.train.distill import distill_model

    cfg = DistillConfig(data=SplitConfig(**TINY_DATA), soft=False, paths="teacher_sample", model_config=TINY_MODEL)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=1, batch_size=100))
    result = distill_model(cfg, tmp_path / "direct", teacher_dir, progress=False, splits=splits)
    assert result["model"] == "nar_direct"
    record = json.loads((tmp_path / "direct" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_kd_loss"] == 0.0


def test_bad_teacher_is_one_line_exit_2(tmp_path, splits, capsys):
    cfg = str(_config(tmp_path))
    assert main(["distill", "--teacher", str(tmp_path / "nope"), "--config", cfg, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and len(err.splitlines()) == 1
    # A checkpoint of another kind of model.
    dnn = tmp_path / "dnn"
    save_checkpoint(build_for_data("dnn", {}, splits.train, 0), dnn, "dnn")
    assert main(["distill", "--teacher", str(dnn), "--config", cfg, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an autoregressive teacher" in err and len(err.splitlines()) == 1
    # A teacher trained on features of another width.
    tcfg = set_data_dims(config_from_dict("teacher", TINY_MODEL), 5, 3)
    wrong = tmp_path / "wrong"
    save_checkpoint(build_model("teacher", tcfg), wrong, "teacher")
    assert main(["distill", "--teacher", str(wrong), "--config", cfg, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "width 5" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
