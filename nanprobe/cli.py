"""The command line: parse, call the core, render. No torch import until a command runs."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, Optional

import typer

from nanprobe.enums import Device, FailOn, Mode, OutputFormat
from nanprobe.errors import Interrupted, NanprobeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Find the first op that underflows or overflows when a GAN critic goes NaN, and the fix.",
)

_CONFIG_HELP = "YAML config (see the config reference in the docs)."
_FAIL_ON_HELP = "Exit 1 at this status or worse (overflow also counts nan; error always counts)."
_POLICY_HELP = "cuda (default: a CPU replay casts each op as CUDA autocast would) or native."
_KERNELS_HELP = ("emulated (default on the CPU: fp16/bf16 ops computed in fp32, each output rounded, as a GPU does) "
                 "or native (the CPU's own fp16/bf16 kernels, ~20x slower); a CUDA replay runs its own.")


def _fail(message: str) -> NoReturn:
    typer.echo(f"nanprobe: error: {message}", err=True)
    raise typer.Exit(2)


@contextmanager
def _user_errors(on_error: Optional[Callable[[NanprobeError], None]] = None, partial: bool = False) -> Iterator[None]:
    """The one place where the core's errors become the CLI's: one line and exit 2, Ctrl-C exit 130."""
    try:
        yield
    except NanprobeError as exc:
        if on_error is not None:
            on_error(exc)
        _fail(str(exc))
    except Interrupted:
        if partial:
            raise  # carries the report of what was found so far: the command prints it
        typer.echo("nanprobe: interrupted", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        typer.echo("nanprobe: interrupted", err=True)
        raise typer.Exit(130) from None


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


def _dtypes(value: Optional[str], alias: Optional[str] = None) -> Optional[list[str]]:
    if value is not None and alias is not None:
        _fail("--dtypes and --dtype are the same option; give it once")
    value = value if value is not None else alias
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        _fail("--dtypes: give one or more of fp32, fp16, bf16, separated by commas")
    return names


def _exit_code(statuses, fail_on: FailOn) -> int:
    return 1 if any(fail_on.fails(s) for s in statuses) else 0


@app.callback()
def _root() -> None:
    """nanprobe: diagnose NaNs in GAN critics trained under mixed precision."""


@app.command()
def diagnose(
    config: Path = typer.Argument(..., metavar="CONFIG", help=_CONFIG_HELP),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON report to PATH ('-' for stdout)."),
    fail_on: FailOn = typer.Option(FailOn.OVERFLOW, "--fail-on", help=_FAIL_ON_HELP),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Precisions to replay, e.g. fp16,bf16."),
    dtype_alias: Optional[str] = typer.Option(None, "--dtype", "--precision", hidden=True),
    mode: Optional[Mode] = typer.Option(None, "--mode", help="amp (autocast) or half (model cast)."),
    device: Optional[Device] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    # A plain string, checked by the config, so a bad value is one line naming precision.policy.
    policy: Optional[str] = typer.Option(None, "--policy", help=_POLICY_HELP),
    kernels: Optional[str] = typer.Option(None, "--kernels", help=_KERNELS_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Critic steps replayed per precision."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no terminal report (exit code only)."),
    verify_fix: bool = typer.Option(False, "--verify-fix",
                                    help="Replay each failing run with each suggested fix applied; mark it verified."),
    verify_top: Optional[int] = typer.Option(None, "--verify-top", min=1,
                                             help="With --verify-fix: fixes replayed per failing run (default 3)."),
    output_format: OutputFormat = typer.Option(OutputFormat.TABLE, "--format",
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

    from nanprobe.formats import table

    if json_out == "-" and output_format is not OutputFormat.TABLE:
        _fail(f"--json -: stdout already carries --format {output_format.value}; give --json a file path")
    if patch == "-" and (json_out == "-" or output_format is not OutputFormat.TABLE):
        _fail("--patch -: stdout already carries the "
              + ("JSON" if json_out == "-" else f"--format {output_format.value}")
              + " output; give --patch a file path")
    if patch is not None and patch != "-" and not Path(patch).parent.is_dir():
        _fail(f"--patch: folder {Path(patch).parent} does not exist")
    started = time.perf_counter()
    overrides = {"dtypes": _dtypes(dtypes, dtype_alias), "mode": mode.value if mode else None,
                 "device": device.value if device else None, "steps": steps, "policy": policy,
                 "kernels": kernels}

    def annotate(exc: NanprobeError) -> None:
        if output_format is OutputFormat.GITHUB:
            from nanprobe.formats.github import error

            typer.echo(error(str(exc), str(config)))

    try:
        with _user_errors(annotate, partial=True), table.progress(enabled=not quiet) as on_progress:
            from nanprobe.api import diagnose as run_diagnose

            report = run_diagnose(config, progress=on_progress, verify_fix=verify_fix, verify_top=verify_top,
                                  fail_on=fail_on.value, **overrides)
    except Interrupted as exc:
        if exc.report is None:
            typer.echo("nanprobe: interrupted before the fp32 replay finished; nothing to report", err=True)
            raise typer.Exit(130) from None
        typer.echo("nanprobe: interrupted; reporting what was found so far", err=True)
        report = exc.report
    _write_json(report.to_json(), json_out)
    if patch is not None:
        _write_patch(report, patch)
    if junit is not None:
        from nanprobe.formats.junit import junit_xml

        try:
            junit.write_text(junit_xml(report, fail_on.value, time.perf_counter() - started), encoding="utf-8")
        except OSError as exc:
            _fail(f"--junit: cannot write {junit}: {exc.strerror or exc}")
    if output_format is OutputFormat.JSON:
        typer.echo(report.to_json())
    elif output_format is OutputFormat.GITHUB:
        from nanprobe.formats import github

        for line in github.annotations(report, fail_on.value):  # type: ignore[operator]  # mypy reads it as __future__.annotations
            typer.echo(line)
    elif not quiet and json_out != "-" and patch != "-":
        table.report(report)
    if report.interrupted:
        raise typer.Exit(130)
    raise typer.Exit(_exit_code((r.status for r in report.runs), fail_on))


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
    config: Path = typer.Argument(..., metavar="CONFIG", help=_CONFIG_HELP),
    dtypes: Optional[str] = typer.Option(None, "--dtypes", help="Low precisions to compare with fp32, e.g. fp16,bf16."),
    dtype_alias: Optional[str] = typer.Option(None, "--dtype", "--precision", hidden=True),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Critic steps replayed per precision."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON comparison to PATH ('-' for stdout)."),
    top: int = typer.Option(10, "--top", min=1, help="Rows of the per-module table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the range view to PATH.png (needs matplotlib)."),
    fail_on: FailOn = typer.Option(FailOn.OVERFLOW, "--fail-on", help=_FAIL_ON_HELP),
    mode: Optional[Mode] = typer.Option(None, "--mode", help="amp (autocast) or half (model cast)."),
    device: Optional[Device] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    policy: Optional[str] = typer.Option(None, "--policy", help=_POLICY_HELP),
    kernels: Optional[str] = typer.Option(None, "--kernels", help=_KERNELS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no terminal report (exit code only)."),
) -> None:
    """Replay the same steps in fp32, fp16 and bf16 and show, per module, where each departs from fp32."""
    names = _dtypes(dtypes, dtype_alias)
    if plot is not None:
        if plot.suffix.lower() != ".png":
            _fail(f"--plot: {plot} is not a .png path; give e.g. --plot ranges.png")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail('--plot needs matplotlib, which is not installed: pip install "nanprobe[plot]"')
    from nanprobe.formats import compare, table

    low = None if names is None else [n for n in names if n != "fp32"]
    if low == []:  # fp32 is the reference, not a precision to compare
        _fail("--dtypes: give fp16, bf16 or both (fp32 is always replayed as the reference)")
    overrides = {"dtypes": low, "mode": mode.value if mode else None,
                 "device": device.value if device else None, "steps": steps, "policy": policy,
                 "kernels": kernels}
    with _user_errors(), table.progress(enabled=not quiet) as on_progress:
        from nanprobe.api import compare_precisions as run_compare

        result = run_compare(config, progress=on_progress, **overrides)
    _write_json(result.to_json(), json_out)
    if plot is not None:
        from nanprobe.formats.plot import plot_ranges

        try:
            plot_ranges(result, plot)
        except OSError as exc:
            _fail(f"--plot: cannot write {plot}: {exc.strerror or exc}")
    if not quiet and json_out != "-":
        compare.comparison(result, top=top)
    raise typer.Exit(_exit_code((s.status for s in result.summaries), fail_on))


@app.command("check-data")
def check_data(
    config: Path = typer.Argument(..., metavar="CONFIG",
                                  help="YAML config whose data.path (data.source: file) is scanned."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON result to PATH ('-' for stdout)."),
    chunk_mb: float = typer.Option(64.0, "--chunk-mb", min=0.001, help="Megabytes read per chunk (bounds memory)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no terminal report (exit code only)."),
) -> None:
    """Scan the whole data file for NaN/Inf samples, constant images and values outside data.range."""
    from nanprobe.analysis.datacheck import check_data as run_check
    from nanprobe.formats import checks

    with _user_errors(), checks.scan_progress(enabled=not quiet) as on_chunk:
        rep = run_check(config, progress=on_chunk, chunk_mb=chunk_mb)
    _write_json(rep.to_json(), json_out)
    if not quiet and json_out != "-":
        checks.data_report(rep)
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
def init(
    models: Path = typer.Argument(..., metavar="MODELS",
                                  help="The Python file that defines your critic and generator."),
    critic: Optional[str] = typer.Option(None, "--critic",
                                         help="Name of the critic class or factory (default: guessed)."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Name of the generator (default: guessed)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the config to PATH (default: stdout)."),
    force: bool = typer.Option(False, "--force", help="Overwrite PATH if it exists."),
    script_args: Optional[str] = typer.Option(
        None, "--script-args", help="For a training script: the options its parse_args() needs, as you run it "
        "(\"--dataset fake --ngf 32\"); written to the config as model.script_args."),
) -> None:
    """Find the critic and generator in MODELS (a dry forward on synthetic input) and write a commented config."""
    if output is not None and output.exists() and not force:
        _fail(f"{output} exists; pass --force to overwrite it")
    if output is not None and not output.parent.is_dir():
        _fail(f"-o: folder {output.parent} does not exist")
    if output is not None and output.resolve() == models.resolve():
        _fail(f"-o: {output} is the models file itself; write the config to a .yaml file")
    with _user_errors():
        from nanprobe.io.config import check_argv
        from nanprobe.io.scaffold import scaffold

        argv = check_argv(script_args, "--script-args")
        result = scaffold(models, critic=critic, generator=generator, config_path=output, script_args=argv)
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
    for line in result.rejected if g is None else ():  # why no candidate was taken as the generator
        typer.echo(f"  not the generator: {line}", err=True)


def main() -> None:
    app(prog_name="nanprobe")


if __name__ == "__main__":
    main()
