"""Tests for the model registry and checkpoints: round trips, atomicity, clear errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dualrerank.errors import CheckpointError, ConfigError
from dualrerank.models import registry
from dualrerank.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, read_checkpoint_info, save_checkpoint
from dualrerank.models.registry import MODELS, build_model, default_config, set_data_dims
from dualrerank.schema import RerankBatch

D, C = 4, 3
SMALL_ENCODER = {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0}


def small_batch(B: int = 6, n: int = 8, seed: int = 0) -> RerankBatch:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, D, generator=g)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, 6:] = False
    rel = (X[..., 0] > 0).float() + (X[..., 0] > 1).float()
    return RerankBatch(
        candidates=X, candidate_mask=mask, context=torch.randn(B, C, generator=g),
        labels=rel.unsqueeze(-1), label_names=("relevance",), upstream_score=torch.randn(B, n, generator=g),
    ).validate()


def small_model(name: str, seed: int = 0):
    cfg = set_data_dims(default_config(name), D, C)
    if hasattr(cfg, "encoder"):
        cfg = replace(cfg, encoder=replace(cfg.encoder, **SMALL_ENCODER))
    if name == "lambdamart":
        cfg = replace(cfg, n_estimators=5, min_child_samples=2)
    if name == "catboost":
        cfg = replace(cfg, n_estimators=5)
    torch.manual_seed(seed)
    model = build_model(name, cfg)
    batch = small_batch()
    if name in ("lambdamart", "catboost"):
        model.fit(batch)
    elif hasattr(model, "fit_normalizer"):
        model.fit_normalizer(batch)
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model


def outputs(model, batch: RerankBatch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = [model.rerank(batch, 4)]
        if hasattr(model, "scores"):
            out.append(model.scores(batch))
        if hasattr(model, "page_value"):
            out.append(model.page_value(batch, out[0]))
    return out


# ---------------------------------------------------------------------- registry
def test_registry_entries_build_and_have_kinds():
    assert {"teacher", "seq2slate", "student", "nar", "evaluator", "dnn", "prm", "lambdamart", "upstream"} <= set(MODELS)
    for name, spec in MODELS.items():
        assert spec.kind in {"ar", "nar", "evaluator", "scorer", "tree"}
        model = build_model(name, set_data_dims(default_config(name), D, C))
        assert isinstance(model, spec.model_class) and model.config is not None
    assert MODELS["seq2slate"].model_class is MODELS["teacher"].model_class
    assert MODELS["seq2slate"].objective_defaults == {"bpr_weight": 0.0}


def test_registry_errors_and_dict_configs():
    with pytest.raises(ConfigError, match="unknown name 'bert'"):
        build_model("bert")
    with pytest.raises(ConfigError, match="expected a DNNConfig"):
        build_model("dnn", default_config("prm"))
    with pytest.raises(ConfigError, match="unknown key"):
        build_model("dnn", {"candidate_dim": D, "widths": [3]})
    model = build_model("dnn", {"candidate_dim": D, "context_dim": C, "hidden": [8]})
    assert model.config.hidden == (8,)
    cfg = set_data_dims(default_config("evaluator"), 7, 2)
    assert (cfg.encoder.candidate_dim, cfg.encoder.context_dim) == (7, 2)
    assert default_config("evaluator").encoder.candidate_dim == 0  # set_data_dims copies
    assert registry.config_from_dict("lambdamart", {"num_leaves": 5}).num_leaves == 5


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["teacher", "student", "evaluator", "dnn", "prm", "upstream", "lambdamart", "catboost"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str):
    model = small_model(name)
    batch = small_batch(seed=1)
    before = outputs(model, batch)
    path = save_checkpoint(model, tmp_path / "ckpt", name, {"epoch": 3, "score": torch.tensor(0.5)})
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for a, b in zip(before, outputs(loaded, batch)):
        assert torch.equal(a, b)
    info = read_checkpoint_info(path)
    assert info["model"] == name and info["extra"] == {"epoch": 3, "score": 0.5}
    if isinstance(model, torch.nn.Module):
        assert not loaded.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp leftovers


def test_overwrite_is_atomic_and_failed_save_leaves_old_checkpoint(tmp_path: Path):
    target = tmp_path / "ckpt"
    first = small_model("dnn", seed=0)
    save_checkpoint(first, target, "dnn", {"v": 1})
    second = small_model("dnn", seed=1)
    save_checkpoint(second, target, "dnn", {"v": 2})
    assert read_checkpoint_info(target)["extra"] == {"v": 2}
    batch = small_batch()
    assert torch.equal(load_checkpoint(target).scores(batch), second.scores(batch))
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(first, target, "dnn", {"v": object()})
    assert read_checkpoint_info(target)["extra"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(ConfigError, match="registry entry 'prm'"):
        save_checkpoint(first, tmp_path / "other", "prm")
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------- corrupt checkpoints
@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_checkpoint(small_model("prm"), tmp_path / "ckpt", "prm")


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def _rehash(path: Path, fname: str) -> None:
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["files"][fname] = hashlib.sha256((path / fname).read_bytes()).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_missing_directory_and_files(tmp_path: Path, saved: Path):
    _one_line_error(tmp_path / "nope", "directory not found")
    (saved / WEIGHTS_FILE).unlink()
    _one_line_error(saved, f"{WEIGHTS_FILE} missing")
    (saved / CONFIG_FILE).unlink()
    _one_line_error(saved, f"{CONFIG_FILE} missing")


def test_corrupt_json(saved: Path):
    (saved / CONFIG_FILE).write_text('{"format_version": 1, "model": ')
    _one_line_error(saved, "not valid JSON")
    (saved / CONFIG_FILE).write_text("[1, 2]")
    _one_line_error(saved, "JSON object")


def test_truncated_and_corrupt_weights(saved: Path):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    _one_line_error(saved, "checksum mismatch")
    _rehash(saved, WEIGHTS_FILE)  # a consistent but broken file must still be refused
    _one_line_error(saved, "unreadable")
    (saved / WEIGHTS_FILE).write_bytes(b"\x00" * 7)
    _rehash(saved, WEIGHTS_FILE)
    _one_line_error(saved, "unreadable")


def test_unknown_model_bad_config_shape_mismatch_and_version(saved: Path):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    _edit_meta(saved, model="gpt")
    _one_line_error(saved, "unknown name 'gpt'")
    _edit_meta(saved, model="prm", config={**meta["config"], "layers": 3})
    _one_line_error(saved, "unknown key")
    wider = {**meta["config"], "encoder": {**meta["config"]["encoder"], "d_model": 32}}
    _edit_meta(saved, config=wider)
    _one_line_error(saved, "shape")
    deeper = {**meta["config"], "n_layers": meta["config"]["n_layers"] + 1}
    _edit_meta(saved, config=deeper)
    _one_line_error(saved, "missing")
    bad = {**meta["config"], "encoder": {**meta["config"]["encoder"], "candidate_dim": 0}}
    _edit_meta(saved, config=bad)
    _one_line_error(saved, "does not build")
    _edit_meta(saved, config=meta["config"], format_version=99)
    _one_line_error(saved, "format_version 99")
    _edit_meta(saved, format_version=1)
    assert isinstance(load_checkpoint(saved), MODELS["prm"].model_class)


def test_corrupt_lightgbm_file(tmp_path: Path):
    path = save_checkpoint(small_model("lambdamart"), tmp_path / "lm", "lambdamart")
    (path / "lightgbm.txt").write_text("tree\nnot a model\n")
    _one_line_error(path, "checksum mismatch")
    _rehash(path, "lightgbm.txt")
    _one_line_error(path, "lightgbm.txt")
    (path / "lightgbm.txt").unlink()
    _one_line_error(path, "lightgbm.txt missing")
