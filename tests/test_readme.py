"""The README quickstart is what CI runs: exactly two commands, the second is .ci/run's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^#+\s*Quickstart[^\n]*\n(.*?)(?=^#+ |\Z)", text, re.S | re.M | re.I)
    assert section, "README has no Quickstart heading"
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section.group(1), re.S)
    assert len(blocks) == 1, "Quickstart must hold exactly one code block"
    return [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    cmds = _quickstart_commands()
    assert len(cmds) == 2, cmds
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci.replace(" -p no:cacheprovider", ""), "'.ci/run' must run the README's test command"
    assert "dualrerank" in cmds[0]


def test_every_subcommand_and_doc_is_listed():
    text = (ROOT / "README.md").read_text()
    commands = sorted(p.stem for p in (ROOT / "src" / "dualrerank" / "commands").glob("*.py") if not p.stem.startswith("_"))
    missing = [c for c in commands if f"`dualrerank {c}" not in text]
    assert not missing, f"README's command table lacks {missing}"
    for doc in re.findall(r"`(docs/[\w.-]+\.md)`", text):
        assert (ROOT / doc).is_file(), f"README names {doc}, which does not exist"
    unlisted = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in text]
    assert not unlisted, f"docs not listed in the README: {unlisted}"
