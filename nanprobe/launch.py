"""The console entry point. `nanprobe` and `nanprobe --help` print the top-level help without importing
the CLI: typer and the app it builds are about half of the start-up (the rest is Python's own), and
a user's first command should answer at once. Everything else goes to nanprobe.cli.

TOP_HELP is the CLI's own rendering at click's widest (a terminal of HELP_COLUMNS or more);
tests/test_launch.py compares the two, so a changed command or docstring fails there until this is
updated. A narrower terminal gets the CLI's rendering, wrapped to it.
"""
from __future__ import annotations

import shutil
import sys

HELP_COLUMNS = 80
"""click wraps help to min(terminal columns, 80) - 2: from this width on, the text is the same."""

TOP_HELP = """\
Usage: nanprobe [OPTIONS] COMMAND [ARGS]...

  Find the first op that underflows or overflows when a GAN critic goes NaN,
  and the fix.

Options:
  --help  Show this message and exit.

Commands:
  diagnose            Replay critic and penalty steps in fp32, fp16 and...
  compare-precisions  Replay the same steps in fp32, fp16 and bf16 and...
  check-data          Scan the whole data file for NaN/Inf samples,...
  init                Find the critic and generator in MODELS (a dry...
"""


def main() -> None:
    args = sys.argv[1:]
    if args in ([], ["--help"]) and shutil.get_terminal_size().columns >= HELP_COLUMNS:
        # As the CLI answers: --help on stdout with exit 0; no command is a usage error, help on stderr, exit 2.
        (sys.stdout if args else sys.stderr).write(TOP_HELP)
        raise SystemExit(0 if args else 2)
    from nanprobe.cli import main as cli_main

    cli_main()
