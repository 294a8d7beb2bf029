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


def kernels_note(runs) -> str:
    """", fp16/bf16 kernels emulated" when a low precision ran on emulated kernels (the CPU's default)."""
    low = [r for r in runs if r.precision.is_low]
    if not low:
        return ""
    kinds = sorted({r.kernels.value for r in low})
    return f", {'/'.join(r.precision.value for r in low)} kernels {'+'.join(kinds)}"


def file_line(source: str | None) -> str:
    """train.py:41 for /long/path/train.py:41, where a table has no room for the path; "-" for None."""
    return "-" if not source else source.replace("\\", "/").rsplit("/", 1)[-1]
