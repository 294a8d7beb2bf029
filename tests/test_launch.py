"""nanprobe.launch: the console entry point answers `nanprobe` and `nanprobe --help` without the CLI."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from nanprobe.launch import HELP_COLUMNS, TOP_HELP

ROOT = Path(__file__).resolve().parents[1]


def test_the_top_level_help_is_the_cli_s_own():
    # If a command or the app's help changes, this fails until TOP_HELP is updated to match. The CLI runs
    # as a user runs it (CliRunner's output stream wraps help to another width).
    for columns in (HELP_COLUMNS, HELP_COLUMNS + 40):
        out = subprocess.run([sys.executable, "-c", "from nanprobe.cli import main; main()", "--help"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "COLUMNS": str(columns)})
        assert (out.returncode, out.stdout) == (0, TOP_HELP)


def _entry(*args: str, columns: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    code = ("import sys\nfrom nanprobe.launch import main\nsys.argv = ['nanprobe', *sys.argv[1:]]\n"
            "try:\n    main()\nfinally:\n"
            "    print(sorted(m for m in ('typer', 'torch', 'nanprobe.cli') if m in sys.modules), file=sys.stderr)\n")
    env = {**os.environ, "COLUMNS": str(columns)}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env,
                         cwd=ROOT)
    *text, loaded = out.stderr.splitlines() or [""]
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout, "\n".join(text)), ast.literal_eval(loaded)


def test_help_and_no_command_answer_as_the_cli_does_without_importing_it():
    help_run, loaded = _entry("--help", columns=120)
    assert (help_run.returncode, help_run.stdout, loaded) == (0, TOP_HELP, [])
    bare, loaded = _entry(columns=120)
    assert (bare.returncode, bare.stdout, loaded) == (2, "", [])
    assert bare.stderr + "\n" == TOP_HELP


def test_a_narrow_terminal_and_every_command_go_to_the_cli():
    narrow, loaded = _entry("--help", columns=60)
    assert narrow.returncode == 0 and "nanprobe.cli" in loaded and "torch" not in loaded
    assert narrow.stdout != TOP_HELP and "compare-precisions" in narrow.stdout
    sub, loaded = _entry("init", "--help", columns=120)
    assert sub.returncode == 0 and "--critic" in sub.stdout and "nanprobe.cli" in loaded
