"""What the terminal formats share: the colour of each status and how a number is shown."""
from __future__ import annotations

from nanprobe.enums import Status

STYLE = {Status.OK: "bold green", Status.UNDERFLOW: "bold yellow", Status.OVERFLOW: "bold red", Status.NAN: "bold red"}
"""rich style of each status."""


def num(x: float | None) -> str:
    """A number in four significant digits; "-" for None."""
    if x is None:
        return "-"
    if x != x:
        return "nan"
    return f"{x:.4g}"
