"""The command line: parse, call the core, render. No torch import until a command runs."""
from __future__ import annotations

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


class FormatChoice(str, Enum):
    table = "table"
    json = "json"
    github = "github"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _fail(message: str) -> None:
    typer.echo(f"nanprobe: error: {message}", err=True)
    raise typer.Exit(2)


def _write_json(text: str, json_out: Optional[str]) -> None:
    """--json PATH writes the file, --json - prints to stdout, no --json does nothing."""
    if json_out is None:
        return
    if json_out == "-":
        typer.echo(text)
        return
    try:
        Path(json_out).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        _fail(f"--json: cannot write {json_out}: {exc.strerror or exc}")


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
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML config (see the README's config reference)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON report to PATH ('-' for stdout)."),
    fail_on: FailOnChoice = typer.Option(FailOnChoice.overflow, "--fail-on",
                                         help="Exit 1 at this status or worse (overflow also counts nan)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", "--precision", help="Precisions to replay, e.g. fp16,bf16."),
    mode: Optional[ModeChoice] = typer.Option(None, "--mode", help="amp (autocast) or half (model cast)."),
    device: Optional[DeviceChoice] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    # A plain string, checked by the config, so a bad value is one line naming precision.policy.
    policy: Optional[str] = typer.Option(
        None, "--policy", help="cuda (default: a CPU replay casts each op as CUDA autocast would) or native."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Critic steps replayed per precision."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no terminal report (exit code only)."),
    verify_fix: bool = typer.Option(False, "--verify-fix",
                                    help="Replay each failing run with each suggested fix applied; mark it verified."),
    verify_top: Optional[int] = typer.Option(None, "--verify-top", min=1,
                                             help="With --verify-fix: fixes replayed per failing run (default 3)."),
    output_format: FormatChoice = typer.Option(FormatChoice.table, "--format",
                                               help="stdout: table (terminal report), json, or github "
                                                    "(GitHub Actions ::error/::warning annotations)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write a JUnit XML report to PATH."),
    patch: Optional[str] = typer.Option(
        None, "--patch", metavar="PATH|-",
        help="Write the fix to your own files as a unified diff to PATH ('-' for stdout, no table); "
             "apply it with git apply or patch -p1 from the config's folder. Your files are never changed."),
) -> None:
    """Replay critic and penalty steps in fp32, fp16 and bf16; name the first op that underflows or overflows."""
    import time

    from nanprobe import render

    if json_out == "-" and output_format is not FormatChoice.table:
        _fail(f"--json -: stdout already carries --format {output_format.value}; give --json a file path")
    if patch == "-" and (json_out == "-" or output_format is not FormatChoice.table):
        _fail("--patch -: stdout already carries the " + ("JSON" if json_out == "-" else f"--format {output_format.value}")
              + " output; give --patch a file path")
    if patch is not None and patch != "-" and not Path(patch).parent.is_dir():
        _fail(f"--patch: folder {Path(patch).parent} does not exist")
    started = time.perf_counter()

    overrides = {"dtypes": _dtypes(dtype), "mode": mode.value if mode else None,
                 "device": device.value if device else None, "steps": steps,
                 "policy": policy}
    to_stdout = json_out == "-" or patch == "-"
    try:
        with render.progress(enabled=not quiet) as on_progress:
            from nanprobe.api import diagnose as run_diagnose

            report = run_diagnose(config, progress=on_progress, verify_fix=verify_fix, verify_top=verify_top,
                                  fail_on=fail_on.value, **overrides)
    except NanprobeError as exc:
        if output_format is FormatChoice.github:
            from nanprobe.github import error

            typer.echo(error(str(exc), str(config)))
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
    _write_json(report.to_json(), json_out)
    if patch is not None:
        _write_patch(report, patch)
    if junit is not None:
        from nanprobe.junit import junit_xml

        try:
            junit.write_text(junit_xml(report, fail_on.value, time.perf_counter() - started), encoding="utf-8")
        except OSError as exc:
            _fail(f"--junit: cannot write {junit}: {exc.strerror or exc}")
    if output_format is FormatChoice.json:
        typer.echo(report.to_json())
    elif output_format is FormatChoice.github:
        from nanprobe.github import annotations

        for line in annotations(report, fail_on.value):
            typer.echo(line)
    elif not quiet and not to_stdout:
        render.report(report)
    from nanprobe.enums import FailOn

    if report.interrupted:
        raise typer.Exit(130)
    raise typer.Exit(1 if any(FailOn(fail_on.value).fails(r.status) for r in report.runs) else 0)


def _write_patch(report, patch: str) -> None:
    """--patch PATH writes the diff of the user's files, --patch - prints it; a line on stderr when there is none."""
    from nanprobe.analysis.patching import chosen

    text = chosen(report.runs)
    if not text:
        typer.echo("nanprobe: --patch: no fix found is local to your own code (see the fixes' config changes "
                   "and snippets); nothing written", err=True)
        return
    if patch == "-":
        typer.echo(text, nl=False)
        return
    try:
        Path(patch).write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"--patch: cannot write {patch}: {exc.strerror or exc}")


@app.command("compare-precisions")
def compare_precisions(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML config (see the README's config reference)."),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Low precisions to compare with fp32, e.g. fp16,bf16."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Critic steps replayed per precision."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON comparison to PATH ('-' for stdout)."),
    top: int = typer.Option(10, "--top", min=1, help="Rows of the per-module table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the range view to PATH.png (needs matplotlib)."),
    fail_on: FailOnChoice = typer.Option(FailOnChoice.overflow, "--fail-on",
                                         help="Exit 1 at this status or worse (overflow also counts nan)."),
    mode: Optional[ModeChoice] = typer.Option(None, "--mode", help="amp (autocast) or half (model cast)."),
    device: Optional[DeviceChoice] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    policy: Optional[str] = typer.Option(
        None, "--policy", help="cuda (default: a CPU replay casts each op as CUDA autocast would) or native."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no terminal report (exit code only)."),
) -> None:
    """Replay the same steps in fp32, fp16 and bf16 and show, per module, where each departs from fp32."""
    names = None if dtypes is None else [v.strip() for v in dtypes.split(",") if v.strip()]
    if plot is not None:
        if plot.suffix.lower() != ".png":
            _fail(f"--plot: {plot} is not a .png path; give e.g. --plot ranges.png")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail('--plot needs matplotlib, which is not installed: pip install "nanprobe[plot]"')
    from nanprobe import render, render_compare

    low = None if names is None else [n for n in names if n != "fp32"]
    if low == []:  # fp32 is the reference, not a precision to compare
        _fail("--dtypes: give fp16, bf16 or both (fp32 is always replayed as the reference)")
    overrides = {"dtypes": low, "mode": mode.value if mode else None,
                 "device": device.value if device else None, "steps": steps, "policy": policy}
    to_stdout = json_out == "-"
    try:
        with render.progress(enabled=not quiet) as on_progress:
            from nanprobe.api import compare_precisions as run_compare

            result = run_compare(config, progress=on_progress, **overrides)
    except NanprobeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("nanprobe: interrupted", err=True)
        raise typer.Exit(130)
    _write_json(result.to_json(), json_out)
    if plot is not None:
        from nanprobe.plot import plot_ranges

        try:
            plot_ranges(result, plot)
        except OSError as exc:
            _fail(f"--plot: cannot write {plot}: {exc.strerror or exc}")
    if not quiet and not to_stdout:
        render_compare.comparison(result, top=top)
    from nanprobe.enums import FailOn

    raise typer.Exit(1 if any(FailOn(fail_on.value).fails(s.status) for s in result.summaries) else 0)


@app.command("check-data")
def check_data(
    config: Path = typer.Argument(..., metavar="CONFIG", help="YAML config whose data.path (data.source: file) is scanned."),
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
    _write_json(rep.to_json(), json_out)
    if not quiet and not to_stdout:
        render_checks.data_report(rep)
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
def init(
    models: Path = typer.Argument(..., metavar="MODELS", help="The Python file that defines your critic and generator."),
    critic: Optional[str] = typer.Option(None, "--critic", help="Name of the critic class or factory (default: guessed)."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Name of the generator (default: guessed)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the config to PATH (default: stdout)."),
    force: bool = typer.Option(False, "--force", help="Overwrite PATH if it exists."),
) -> None:
    """Find the critic and generator in MODELS (a dry forward on synthetic input) and write a commented config."""
    if output is not None and output.exists() and not force:
        _fail(f"{output} exists; pass --force to overwrite it")
    if output is not None and not output.parent.is_dir():
        _fail(f"-o: folder {output.parent} does not exist")
    if output is not None and output.resolve() == models.resolve():
        _fail(f"-o: {output} is the models file itself; write the config to a .yaml file")
    try:
        from nanprobe.scaffold import scaffold

        result = scaffold(models, critic=critic, generator=generator, config_path=output)
    except NanprobeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("nanprobe: interrupted", err=True)
        raise typer.Exit(130)
    if output is None:
        typer.echo(result.text, nl=False)
        return
    try:
        output.write_text(result.text, encoding="utf-8")
    except OSError as exc:
        _fail(f"-o: cannot write {output}: {exc.strerror or exc}")
    g = result.generator
    found = f"critic {result.critic.name}" + (f", generator {g.name}" if g else ", no generator")
    shape = "x".join(map(str, (g or result.critic).shape))
    typer.echo(f"nanprobe: wrote {output} ({found}, samples {shape}); run: nanprobe diagnose {output}", err=True)


def main() -> None:
    app(prog_name="nanprobe")


if __name__ == "__main__":
    main()
