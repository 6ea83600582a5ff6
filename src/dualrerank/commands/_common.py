"""Argument helpers shared by the subcommands: --config, --seed, --out, --json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

from dualrerank.config import describe_config, load_config

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser, config_cls: type | None = None, seed: int = 0) -> None:
    """Add --config and --seed; with `config_cls`, list its keys in the parser's epilog."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                        help="YAML file mapped onto the command's config (unknown keys are an error)")
    parser.add_argument("--seed", type=int, default=None, help=f"random seed (default: config's, else {seed})")
    if config_cls is not None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "config keys (YAML):\n" + "\n".join("  " + line for line in describe_config(config_cls))


def load_from_args(config_cls: type[T], args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> T:
    """Config from --config, then CLI overrides (only those the user actually gave)."""
    over = dict(overrides or {})
    if getattr(args, "seed", None) is not None and "seed" in {f for f in config_cls.__dataclass_fields__}:
        over["seed"] = args.seed
    return load_config(config_cls, args.config, over)


def load_run_config(config_cls: type[T], args: argparse.Namespace, overrides: dict[str, Any]) -> T:
    """The run's config: with `--resume`, the one saved in `--out` (only `optim.epochs` may
    change); otherwise from --config and the CLI overrides."""
    if not getattr(args, "resume", False):
        return load_from_args(config_cls, args, overrides)
    from dualrerank.errors import ConfigError

    saved = args.out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found; start the run without --resume")
    return load_config(config_cls, saved, {k: v for k, v in overrides.items() if k == "optim.epochs"})


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
