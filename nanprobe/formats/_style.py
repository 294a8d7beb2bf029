"""What the terminal formats share: the colour of each status and how a number is shown."""
from __future__ import annotations

from nanprobe.enums import Status

STYLE = {Status.OK: "bold green", Status.UNDERFLOW: "bold yellow", Status.OVERFLOW: "bold red", Status.NAN: "bold red",
         Status.ERROR: "bold magenta"}
"""rich style of each status."""


def num(x: float | None) -> str:
    """A number in four significant digits; "-" for None."""
    if x is None:
        return "-"
    if x != x:
        return "nan"
    return f"{x:.4g}"


def file_line(source: str | None) -> str:
    """train.py:41 for /long/path/train.py:41, where a table has no room for the path; "-" for None."""
    return "-" if not source else source.replace("\\", "/").rsplit("/", 1)[-1]
