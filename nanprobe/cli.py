"""The command line: parse, call the core, render. No torch import until a command runs."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from nanprobe.errors import Interrupted, NanprobeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Find the first op that underflows or overflows when a GAN critic goes NaN, and the fix.",
)


class FailOnChoice(str, Enum):
    nan = "nan"
    overflow = "overflow"
    underflow = "underflow"


class ModeChoice(str, Enum):
    amp = "amp"
    half = "half"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _fail(message: str) -> None:
    typer.echo(f"nanprobe: error: {message}", err=True)
    raise typer.Exit(2)


def _dtypes(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        _fail("--dtype: give one or more of fp32, fp16, bf16, separated by commas")
    return names


@app.callback()
def _root() -> None:
    """nanprobe: diagnose NaNs in GAN critics trained under mixed precision."""


@app.command()
def diagnose(
    config: Path = typer.Argument(..., help="YAML config (see the README's config reference)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON report to PATH ('-' for stdout)."),
    fail_on: FailOnChoice = typer.Option(FailOnChoice.overflow, "--fail-on",
                                         help="Exit 1 at this status or worse (overflow also counts nan)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", "--precision", help="Precisions to replay, e.g. fp16,bf16."),
    mode: Optional[ModeChoice] = typer.Option(None, "--mode", help="amp (autocast) or half (model cast)."),
    device: Optional[DeviceChoice] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Critic steps replayed per precision."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no terminal report (exit code only)."),
    verify_fix: bool = typer.Option(False, "--verify-fix",
                                    help="Replay each failing run with each suggested fix applied; mark it verified."),
    verify_top: Optional[int] = typer.Option(None, "--verify-top", min=1,
                                             help="With --verify-fix: fixes replayed per failing run (default 3)."),
) -> None:
    """Replay critic and penalty steps in fp32, fp16 and bf16; name the first op that underflows or overflows."""
    from nanprobe import render

    overrides = {"dtypes": _dtypes(dtype), "mode": mode.value if mode else None,
                 "device": device.value if device else None, "steps": steps}
    to_stdout = json_out == "-"
    try:
        with render.progress(enabled=not quiet) as on_progress:
            from nanprobe.api import diagnose as run_diagnose

            report = run_diagnose(config, progress=on_progress, verify_fix=verify_fix, verify_top=verify_top,
                                  fail_on=fail_on.value, **overrides)
    except NanprobeError as exc:
        _fail(str(exc))
    except Interrupted as exc:
        if exc.report is None:
            typer.echo("nanprobe: interrupted before the fp32 replay finished; nothing to report", err=True)
            raise typer.Exit(130)
        typer.echo("nanprobe: interrupted; reporting what was found so far", err=True)
        report = exc.report
    except KeyboardInterrupt:
        typer.echo("nanprobe: interrupted", err=True)
        raise typer.Exit(130)
    if json_out is not None:
        text = report.to_json()
        if to_stdout:
            typer.echo(text)
        else:
            try:
                Path(json_out).write_text(text + "\n", encoding="utf-8")
            except OSError as exc:
                _fail(f"--json: cannot write {json_out}: {exc.strerror or exc}")
    if not quiet and not to_stdout:
        render.report(report)
    from nanprobe.enums import FailOn

    if report.interrupted:
        raise typer.Exit(130)
    raise typer.Exit(1 if any(FailOn(fail_on.value).fails(r.status) for r in report.runs) else 0)


@app.command("check-data")
def check_data(
    config: Path = typer.Argument(..., help="YAML config whose data.path (data.source: file) is scanned."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON result to PATH ('-' for stdout)."),
    chunk_mb: float = typer.Option(64.0, "--chunk-mb", min=0.001, help="Megabytes read per chunk (bounds memory)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no terminal report (exit code only)."),
) -> None:
    """Scan the whole data file for NaN/Inf samples, constant images and values outside data.range."""
    from nanprobe import render_checks
    from nanprobe.datacheck import check_data as run_check

    to_stdout = json_out == "-"
    try:
        with render_checks.scan_progress(enabled=not quiet) as on_chunk:
            rep = run_check(config, progress=on_chunk, chunk_mb=chunk_mb)
    except NanprobeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("nanprobe: interrupted", err=True)
        raise typer.Exit(130)
    if json_out is not None:
        if to_stdout:
            typer.echo(rep.to_json())
        else:
            try:
                Path(json_out).write_text(rep.to_json() + "\n", encoding="utf-8")
            except OSError as exc:
                _fail(f"--json: cannot write {json_out}: {exc.strerror or exc}")
    if not quiet and not to_stdout:
        render_checks.data_report(rep)
    raise typer.Exit(0 if rep.ok else 1)


def main() -> None:
    app(prog_name="nanprobe")


if __name__ == "__main__":
    main()
