"""GitHub Actions workflow commands (`::error file=...,line=...,title=...::message`) for a Report."""
from __future__ import annotations

import os
from pathlib import Path

from nanprobe.enums import FailOn, Status
from nanprobe.model.report import Finding, ReplayError, Report
from nanprobe.model.verdict import message


def escape_data(text: str) -> str:
    """A command's message: GitHub reads %, CR and LF as escapes (toolkit's escapeData)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A command's property value: also ':' and ',', which separate properties (toolkit's escapeProperty)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(level: str, text: str, **properties) -> str:
    """One workflow command line; properties with a None value are left out."""
    props = ",".join(f"{k}={escape_property(str(v))}" for k, v in properties.items() if v is not None)
    return f"::{level}{' ' + props if props else ''}::{escape_data(text)}"


def _relative(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return None


def location(finding: Finding | ReplayError | None, config: str | None, root: Path) -> tuple[str | None, int | None]:
    """(file relative to root, line) of the finding's source; the config file when the source is not
    a file under root (nanprobe's own loss, the data, a model from an installed package)."""
    base = Path(config).parent if config else Path.cwd()
    if finding is not None and finding.source and ":" in finding.source:
        name, _, line = finding.source.rpartition(":")
        path = Path(name) if Path(name).is_absolute() else base / name
        rel = _relative(path, root) if path.is_file() else None
        if rel is not None and line.isdigit():
            return rel, int(line)
    return (_relative(Path(config), root) if config else None), None


def annotations(report: Report, fail_on: FailOn | str = FailOn.OVERFLOW, root: Path | None = None) -> list[str]:  # type: ignore[no-redef]  # public name, next to __future__'s
    """An ::error for each run at or above fail_on, a ::warning for a finding below it, at its source line.

    root is the folder paths are made relative to: $GITHUB_WORKSPACE when set, else the working directory.
    """
    root = root or Path(os.environ.get("GITHUB_WORKSPACE") or Path.cwd())
    threshold = FailOn(fail_on)
    lines = []
    for run in report.runs:
        if run.status is Status.OK:
            continue
        finding = run.error or run.first_issue or run.first_nonfinite
        file, line = location(finding, report.config, root)
        level = "error" if threshold.fails(run.status) else "warning"
        title = f"nanprobe {run.precision.value} ({run.mode.value}): {run.status.value}"
        lines.append(command(level, message(run), file=file, line=line, title=title))
    return lines


def error(text: str, config: str | None, root: Path | None = None) -> str:
    """An ::error for a config or user-code error, on the config file."""
    root = root or Path(os.environ.get("GITHUB_WORKSPACE") or Path.cwd())
    return command("error", text, file=_relative(Path(config), root) if config else None, title="nanprobe: error")
