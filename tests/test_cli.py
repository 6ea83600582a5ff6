"""The CLI entry point: every subcommand's --help works and names its options, every command
the docs show exists with the options they show, and user errors exit 2 without traceback."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dualrerank.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action is not None else {}


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command path (('train',), ('data', 'inspect'), ...) and its parser, groups included."""
    out = {}
    for name, sub in _subparsers(parser).items():
        out[path + (name,)] = sub
        out.update(_commands(sub, path + (name,)))
    return out


COMMANDS = _commands(build_parser())
LEAVES = {path: p for path, p in COMMANDS.items() if not _subparsers(p)}


def test_there_are_commands_and_top_help_lists_them(capsys):
    assert len(LEAVES) >= 8 and ("train",) in LEAVES and ("experiment", "offline") in LEAVES
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in _subparsers(build_parser()):
        assert re.search(rf"^\s+{re.escape(name)}\b", out, re.M), f"'dualrerank --help' does not list {name}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_exits_0_and_names_every_option(path, capsys):
    parser = COMMANDS[path]
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dualrerank {' '.join(path)}")
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        assert action.help and action.help.strip(), f"{' '.join(path)} {action.option_strings[0]} has no help text"
        for option in action.option_strings:
            assert option in out, f"'{' '.join(path)} --help' does not show {option}"
    for name in _subparsers(parser):
        assert name in out, f"'{' '.join(path)} --help' does not list {name}"


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_every_command_takes_config_and_seed(path):
    opts = {s for a in LEAVES[path]._actions for s in a.option_strings}
    assert {"--config", "--seed"} <= opts, f"{' '.join(path)} lacks --config/--seed"


def _documented_command_lines() -> list[tuple[str, str]]:
    """(where, command line) for every `dualrerank ...` line the README's command table and
    the code blocks of README.md and docs/*.md show."""
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for row in re.findall(r"^\|\s*`(dualrerank [^`]+)`", text, re.M):
            lines.append((doc.name, row))
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in block.splitlines():
                m = re.match(r"\s*(?:\S*/)?(dualrerank\s.*)", line)
                if m:
                    lines.append((doc.name, m.group(1).split("#")[0]))
    return lines


def test_documented_commands_and_their_options_exist():
    lines = _documented_command_lines()
    assert len(lines) > 10, "no documented command lines found: has the README's table changed shape?"
    for where, line in lines:
        words = line.split()[1:]
        parser, path = build_parser(), ()
        while _subparsers(parser):
            assert words and words[0] in _subparsers(parser), f"{where}: '{line}': no command {' '.join(path + tuple(words[:1]))}"
            path += (words[0],)
            parser, words = _subparsers(parser)[words[0]], words[1:]
        known = {s for a in parser._actions for s in a.option_strings}
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(words)):
            assert option in known, f"{where}: '{line}': {' '.join(path)} has no option {option}"


def test_each_source_module_of_a_command_is_registered():
    modules = sorted(p.stem for p in (ROOT / "src" / "dualrerank" / "commands").glob("*.py") if not p.stem.startswith("_"))
    registered = {path[0] for path in COMMANDS}
    assert set(modules) == registered


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
