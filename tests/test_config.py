"""Config dataclasses from YAML: unknown keys and wrong types are errors, never ignored."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dualrerank.config import describe_config, dump_config, from_dict, load_config, option
from dualrerank.errors import ConfigError


@dataclass
class Inner:
    width: int = option(8, "hidden width")
    rate: float = option(0.1, "a rate")


@dataclass
class Outer:
    seed: int = option(0, "random seed")
    mode: str = option("a", "mode", choices=("a", "b"))
    inner: Inner = option(factory=Inner, help="nested block")
    tags: tuple[str, ...] = option((), "free tags")
    limit: int | None = option(None, "optional limit")


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(Outer)
    assert cfg == Outer()
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ninner:\n  width: 16\ntags: [x, y]\nlimit: 5\n")
    cfg = load_config(Outer, path)
    assert (cfg.seed, cfg.inner.width, cfg.inner.rate, cfg.tags, cfg.limit) == (3, 16, 0.1, ("x", "y"), 5)
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(Outer, tmp_path / "out.yaml") == cfg


def test_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    assert load_config(Outer, path, {"seed": 9, "inner.width": 4}).inner.width == 4
    assert load_config(Outer, path, {"seed": 9}).seed == 9


@pytest.mark.parametrize(
    "text, match",
    [
        ("sede: 1\n", r"unknown key\(s\) \['sede'\]"),
        ("inner:\n  widht: 2\n", r"inner: unknown key"),
        ("seed: one\n", r"seed: expected an integer"),
        ("mode: c\n", r"mode: 'c' is not one of"),
        ("inner: 3\n", r"inner: expected a mapping"),
        ("- a\n- b\n", r"mapping at the top level"),
        ("seed: [1\n", r"not valid YAML"),
    ],
)
def test_bad_configs(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_describe_lists_nested_help():
    lines = describe_config(Outer)
    assert any(line.startswith("inner.width (8): hidden width") for line in lines)


@dataclass
class Pair:
    weights: tuple[float, float] = option((1.0, 2.0), "two weights")


def test_fixed_length_tuple(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("weights: [3, 4.5]\n")
    assert load_config(Pair, path).weights == (3.0, 4.5)
    path.write_text("weights: [3]\n")
    with pytest.raises(ConfigError, match="expected 2 items"):
        load_config(Pair, path)


def test_partial_section_keeps_the_fields_own_defaults():
    from dualrerank.train.supervised import TrainConfig

    cfg = from_dict(TrainConfig, {"evaluator_optim": {"lr": 0.01}})
    assert cfg.evaluator_optim.epochs == 8 and cfg.evaluator_optim.lr == 0.01  # factory OptimConfig(epochs=8)
    assert from_dict(TrainConfig, {}).evaluator_optim.epochs == 8
    lines = describe_config(TrainConfig)
    assert any(line.startswith("evaluator_optim.epochs (8)") for line in lines)
    assert any(line.startswith("optim.epochs (20)") for line in lines)
