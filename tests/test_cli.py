"""The CLI entry point: help lists every subcommand; user errors exit 2 without traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dualrerank.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("data", "simulate"):
        assert name in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage" in capsys.readouterr().out


def test_every_subcommand_has_help_config_and_seed():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name, p in sub.choices.items():
        opts = {s for a in p._actions for s in a.option_strings}
        if p._subparsers is not None:  # a command group such as `data inspect`
            continue
        assert {"--config", "--seed"} <= opts, f"{name} lacks --config/--seed"


def test_user_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_key: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dualrerank.cli", "simulate", "--requests", "5", "--out", str(tmp_path / "o"), "--config", str(bad)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "unknown key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
