"""Repository promises other tools rely on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```sh\n(.*?)\n(.*?)\n```", readme, flags=re.S)
    assert commands, "README must open with a sh block of two commands"
    run_command, test_command = commands.group(1), commands.group(2)
    assert "bpfree run" in run_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
