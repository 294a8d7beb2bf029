"""Terminal rendering of a Report with rich (the CLI's side; the core never imports this)."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from nanprobe.enums import Status
from nanprobe.report import Finding, FixSuggestion, Report, RunReport

_STYLE = {Status.OK: "bold green", Status.UNDERFLOW: "bold yellow", Status.OVERFLOW: "bold red", Status.NAN: "bold red"}


def _num(x) -> str:
    if x is None:
        return "-"
    if x != x:
        return "nan"
    return f"{x:.4g}"


@contextmanager
def progress(enabled: bool = True):
    """A progress bar on stderr; yields the callback the core calls per replayed step."""
    console = Console(stderr=True)
    # Only on a terminal: piped stderr must carry nothing but the one-line errors.
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]replaying[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                   TimeElapsedColumn(), console=console, transient=True)
    tasks: dict = {}

    def on_step(precision, step: int, steps: int) -> None:
        key = getattr(precision, "value", precision)  # a verification replay passes "fp16 + gp-fp32"
        if key not in tasks:
            tasks[key] = bar.add_task(key, total=steps)
        bar.update(tasks[key], completed=step + 1)

    with bar:
        yield on_step


def _where(f: Finding) -> str:
    op = f.op.removeprefix("aten.").rsplit(".", 1)[0]
    node = f" ({f.node})" if f.node else ""
    return f"{f.module or '(outside modules)'} · {op}{node}"


def _summary_table(report: Report) -> Table:
    t = Table(title=None, show_lines=False, header_style="bold")
    for col in ("precision", "mode", "status", "first issue", "loss", "penalty", "grad norm"):
        t.add_column(col, justify="right" if col in ("loss", "penalty", "grad norm") else "left")
    for run in report.runs:
        last = run.metrics[-1] if run.metrics else None
        issue = "-"
        if run.first_issue is not None:
            f = run.first_issue
            issue = f"{f.kind.value} in {f.phase.value} at {f.module or f.op.removeprefix('aten.').split('.')[0]} (step {f.step})"
        t.add_row(run.precision.value, run.mode.value, Text(run.status.value, style=_STYLE[run.status]), issue,
                  _num(last.loss if last else None), _num(last.penalty if last else None),
                  _num(last.grad_norm if last else None))
    return t


def _numbers(f: Finding) -> str | None:
    obs, ref = f.numbers.get("observed"), f.numbers.get("reference")
    if not obs:
        return None

    def line(name, s):
        return (f"{name}: max |x| {_num(s['max_abs'])}, min non-zero {_num(s['min_nonzero'])}, "
                f"zeros {s['zeros']}, subnormals {s['subnormal']}, inf {s['posinf'] + s['neginf']}, nan {s['nan']}")

    lines = []
    if ref:
        lines.append(line("fp32", ref))
    lines.append(line(f.dtype, obs))
    return "\n".join(lines)


_MARKS = {True: ("✓ ", "bold green"), False: ("✗ ", "bold red"), None: ("? ", "dim")}


def _mark(fix: FixSuggestion) -> tuple:
    """--verify-fix's marker before a fix id (nothing when verification was not asked for)."""
    return (_MARKS[fix.verified],) if fix.verification else ()


def _run_panel(run: RunReport) -> Panel:
    parts = []
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    f = run.first_issue
    if f is not None:
        grid.add_row("first issue", Text.assemble((f"{f.kind.value}", _STYLE[Status(f.kind.value)]),
                                                  f" · {f.phase.value} · step {f.step} · {_where(f)}"))
        grid.add_row("source", f.source or "-")
        grid.add_row("numbers", f.detail)
        nums = _numbers(f)
        if nums:
            grid.add_row("", Text(nums, style="dim"))
    n = run.first_nonfinite
    if n is not None and (f is None or n.index != f.index):
        grid.add_row("first non-finite", f"{n.phase.value} · step {n.step} · {_where(n)} · {n.source or '-'}")
        grid.add_row("", n.detail)
    if run.chain and len(run.chain) > 1:
        hops = " → ".join(("…" if c.index < 0 else f"{c.module + ':' if c.module else ''}{c.op.removeprefix('aten.').split('.')[0]}")
                          for c in run.chain)
        grid.add_row("chain", hops)
    for note in run.notes:
        grid.add_row("note", note)
    if run.skipped:
        grid.add_row("loss scaling", f"{len(run.skipped)} step(s) skipped and retried at a lower scale (normal)")
    parts.append(grid)
    if run.fixes:
        top = run.fixes[0]
        parts.append(Text.assemble(("\nfix: ", "bold"), *_mark(top), (top.id, "bold cyan"), f"  {top.title}"))
        parts.append(Text(top.why, style="italic"))
        parts.append(Syntax(top.snippet, "python", theme="ansi_dark", background_color="default"))
        if top.apply:
            parts.append(Text.assemble(("in the config: ", "dim"), top.apply))
        if top.verification:
            parts.append(Text.assemble(("replay: ", "dim"), top.verification))
        checked = any(f.verification for f in run.fixes)
        for other in run.fixes[1:] if checked else run.fixes[1:3]:
            parts.append(Text.assemble(("also: ", "dim"), *_mark(other), (other.id, "cyan"), f"  {other.title}"))
            if other.verification:
                parts.append(Text.assemble("      ", (other.verification, "dim")))
    title = f"{run.precision.value} ({run.mode.value}): {run.status.value}"
    return Panel(Group(*parts), title=title, title_align="left", border_style=_STYLE[run.status].split()[-1])


def report(rep: Report, console: Console | None = None) -> None:
    """Print the verdicts first, then a panel per precision with a finding."""
    console = console or Console()
    console.print(Text.assemble(("nanprobe diagnose ", "bold"), rep.config or "", (f"  ({rep.device}, torch {rep.torch})", "dim")))
    console.print(_summary_table(rep))
    if rep.interrupted:
        console.print(Text(rep.interrupted, style="bold yellow"))
    bad = [r for r in rep.runs if r.status is not Status.OK]
    for run in bad:
        console.print(_run_panel(run))
    if not bad:
        console.print(Text("No underflow, overflow or NaN in any precision.", style="bold green"))
    from nanprobe import render_checks

    render_checks.data_note(rep.data, console)
    render_checks.init_table(rep.init, console)
