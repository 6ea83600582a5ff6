"""Argument helpers shared by the subcommands: --config, --seed, --out, --json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar, cast

from dualrerank.config import describe_config, load_config

T = TypeVar("T")


def add_config_args(
    parser: argparse.ArgumentParser, config_cls: type | None = None, seed: int | None = 0, seed_help: str | None = None
) -> None:
    """Add --config and --seed (the run's seed; `seed=None` for a command without one);
    with `config_cls`, list its keys in the parser's epilog."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE.yaml",
        help="YAML file mapped onto the command's config (unknown keys are an error)",
    )
    if seed is not None:
        parser.add_argument(
            "--seed", type=int, default=None, help=seed_help or f"the run's random seed (default: config's, else {seed})"
        )
    if config_cls is not None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "config keys (YAML):\n" + "\n".join("  " + line for line in describe_config(config_cls))


def load_from_args(config_cls: type[T], args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> T:
    """Config from --config, then CLI overrides (only those the user actually gave)."""
    over = dict(overrides or {})
    if getattr(args, "seed", None) is not None and "seed" in {f for f in cast(Any, config_cls).__dataclass_fields__}:
        over["seed"] = args.seed
    return load_config(config_cls, args.config, over)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--out, --resume, --overwrite and --quiet of a command that writes a run directory."""
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory (refused if it holds a run, unless --resume or --overwrite)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from the phase and epoch where it stopped"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument(
        "--report-to",
        default="none",
        choices=("none", "tensorboard"),
        help="also log every metric to TensorBoard event files in OUT/tensorboard (needs: pip install 'dualrerank[tensorboard]')",
    )


def load_run_config(config_cls: type[T], args: argparse.Namespace, overrides: dict[str, Any]) -> T:
    """The run's config: with `--resume`, the one saved in `--out` (only `optim.epochs`, or an
    online run's `steps`, may change); otherwise from --config and the CLI overrides."""
    if not getattr(args, "resume", False):
        return load_from_args(config_cls, args, overrides)
    from dualrerank.errors import ConfigError

    saved = args.out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found; start the run without --resume")
    return load_config(config_cls, saved, {k: v for k, v in overrides.items() if k in ("optim.epochs", "steps")})


def run_config_of(path: Path) -> Path | None:
    """The `config.yaml` of the run that `path` (a run directory, or a run's `checkpoint/`)
    belongs to, if there is one."""
    path = Path(path)
    for candidate in (path / "config.yaml", path.parent / "config.yaml" if path.name == "checkpoint" else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def run_data_section(path: Path) -> tuple[dict[str, Any], Path] | None:
    """The `data:` mapping of the run `path` belongs to (any command's run: train, distill,
    an experiment row), with the file it came from; None without one."""
    import yaml

    from dualrerank.errors import ConfigError

    cfg_file = run_config_of(path)
    if cfg_file is None:
        return None
    try:
        loaded = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise ConfigError(f"{cfg_file}: not a readable run config (YAML)") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("data"), dict):
        return None
    return loaded["data"], cfg_file


def user_config_has(args: argparse.Namespace, key: str) -> bool:
    """Whether the user's --config file sets top-level `key`."""
    import yaml

    if getattr(args, "config", None) is None or not Path(args.config).is_file():
        return False
    try:
        loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False  # load_config reports it properly
    return isinstance(loaded, dict) and key in loaded


def note(command: str, message: str) -> None:
    """A one-line note on stderr (what the command chose for the user, and why)."""
    print(f"dualrerank {command}: {message}", file=sys.stderr)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
