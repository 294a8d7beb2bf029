"""Terminal rendering of a Report with rich (the CLI's side; the core never imports this)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from nanprobe.enums import FixCheck, Status
from nanprobe.formats._style import STYLE, file_line, kernels_note, num
from nanprobe.model.report import Finding, FixSuggestion, Report, RunReport


@contextmanager
def progress(enabled: bool = True) -> Iterator[Callable | None]:
    """A progress bar on stderr; yields the callback the core calls per replayed step."""
    console = Console(stderr=True)
    # Only on a terminal: piped stderr must carry nothing but the one-line errors.
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]replaying[/] {task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total} steps"),
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
    param = f" on {f.param}" if f.param else ""
    return f"{f.module or '(outside modules)'} · {op}{node}{param}"


_BARS = "▁▂▃▄▅▆▇█"
_MIN_SPAN = 0.3  # log10(2)


def _spark(values: list) -> str:
    """A sparkline of a per-step series (log scale, so a blow-up by orders of magnitude shows)."""
    import math

    logs = [math.log10(abs(v)) if v is not None and math.isfinite(v) and v != 0 else None for v in values]
    known = [x for x in logs if x is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    span = max(hi - lo, _MIN_SPAN)  # changes under 2x stay low bars: the eye should catch blow-ups only
    return "".join("·" if x is None else _BARS[round((x - lo) / span * (len(_BARS) - 1))] for x in logs)


def _trend(values: list) -> str:
    if not values:
        return "-"
    return f"{_spark(values)} {num(values[0])} → {num(values[-1])}" if len(values) > 1 else num(values[0])


def _scales(run: RunReport) -> str:
    scales = [m.scale for m in run.metrics if m.scale is not None]
    if not scales:
        return "-"
    skipped = len(run.skipped) + sum(1 for m in run.metrics if m.skipped)
    return f"{scales[0]:.6g} → {scales[-1]:.6g}" + (f" ({skipped} skipped)" if skipped else "")


def _trend_table(report: Report) -> Table:
    t = Table(title="per step (weights the step ran with; sparklines on a log scale)", header_style="bold",
              title_justify="left")
    for col in ("precision", "fails at", "weight norm", "grad norm", "loss", "loss scale"):
        t.add_column(col)
    for run in report.runs:
        m = run.metrics
        t.add_row(run.precision.value, "-" if run.failed_step is None else f"step {run.failed_step}",
                  _trend([x.weight_norm for x in m]), _trend([x.grad_norm for x in m]), _trend([x.loss for x in m]),
                  _scales(run))
    return t


def _summary_table(report: Report) -> Table:
    t = Table(title=None, show_lines=False, header_style="bold")
    for col in ("precision", "mode", "status", "first issue", "loss", "penalty", "grad norm"):
        t.add_column(col, justify="right" if col in ("loss", "penalty", "grad norm") else "left")
    for run in report.runs:
        last = run.metrics[-1] if run.metrics else None
        issue = "-"
        if run.first_issue is not None:
            f = run.first_issue
            issue = (f"{f.kind.value} in {f.phase.value} at "  # type: ignore[union-attr]  # not None on this path
                     f"{f.module or f.op.removeprefix('aten.').split('.')[0]} (step {f.step})")
        elif run.error is not None:
            e = run.error
            issue = f"{e.exception} in {e.phase.value} at {file_line(e.source)} (step {e.step})"
        t.add_row(run.precision.value, run.mode.value, Text(run.status.value, style=STYLE[run.status]), issue,
                  num(last.loss if last else None), num(last.penalty if last else None),
                  num(last.grad_norm if last else None))
    return t


def _numbers(f: Finding) -> str | None:
    obs, ref = f.numbers.get("observed"), f.numbers.get("reference")
    if not obs:
        return None

    def line(name, s):
        return (f"{name}: max |x| {num(s['max_abs'])}, min non-zero {num(s['min_nonzero'])}, "
                f"zeros {s['zeros']}, subnormals {s['subnormal']}, inf {s['posinf'] + s['neginf']}, nan {s['nan']}")

    lines = []
    if ref:
        lines.append(line("fp32", ref))
    lines.append(line(f.dtype, obs))
    return "\n".join(lines)


_MARKS = {FixCheck.OK: ("✓ ", "bold green"), FixCheck.IMPROVES: ("~ improves ", "bold yellow"),
          FixCheck.FAILS: ("✗ ", "bold red"), FixCheck.UNTRIED: ("? ", "dim")}


def _mark(fix: FixSuggestion) -> tuple:
    """--verify-fix's marker before a fix id (nothing when verification was not asked for)."""
    return (_MARKS[fix.check],) if fix.check is not None else ()


def _code(text: str, lexer: str) -> Syntax:
    # word_wrap: a long line wraps at any width, piped or not, instead of being cut mid-token.
    return Syntax(text, lexer, theme="ansi_dark", background_color="default", word_wrap=True)


def _run_panel(run: RunReport) -> Panel:
    parts: list[RenderableType] = []
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    f = run.first_issue
    e = run.error
    if e is not None:
        grid.add_row("error", Text.assemble((e.exception, STYLE[Status.ERROR]), f": {e.message}"))
        grid.add_row("source", e.source or "-")
        grid.add_row("op", f"{e.op or '-'} · {e.phase.value} · step {e.step}")
    if f is not None:
        grid.add_row("first issue", Text.assemble((f"{f.kind.value}", STYLE[Status(f.kind.value)]),  # type: ignore[union-attr]  # not None on this path
                                                  f" · {f.phase.value} · step {f.step} · {_where(f)}"))
        grid.add_row("source", f.source or (f"optimizer step on {f.param}" if f.param else "-"))
        grid.add_row("numbers", f.detail)
        nums = _numbers(f)
        if nums:
            grid.add_row("", Text(nums, style="dim"))
    n = run.first_nonfinite
    if n is not None and (f is None or n.index != f.index):
        grid.add_row("first non-finite", f"{n.phase.value} · step {n.step} · {_where(n)} · {n.source or '-'}")
        grid.add_row("", n.detail)
    if run.chain and len(run.chain) > 1:
        hops = " → ".join(("…" if c.index < 0
                           else f"{c.module + ':' if c.module else ''}{c.op.removeprefix('aten.').split('.')[0]}")
                          for c in run.chain)
        grid.add_row("chain", hops)
    for note in run.notes:
        grid.add_row("note", note)
    if run.lost_updates:
        grid.add_row("lost updates",
                     ", ".join(f"{u.module} {u.share:.0%} of {u.elements}" for u in run.lost_updates[:6])
                     + (f" (+{len(run.lost_updates) - 6} modules)" if len(run.lost_updates) > 6 else ""))
    if run.scale_collapse is not None and run.scale_collapse is not f:
        grid.add_row("scale collapse", f"{run.scale_collapse.phase.value} · step {run.scale_collapse.step} · "
                                       f"{_where(run.scale_collapse)} · {run.scale_collapse.source or '-'}")
        grid.add_row("", run.scale_collapse.detail)
    elif run.skipped and run.scale_collapse is None:
        grid.add_row("loss scaling", f"{len(run.skipped)} step(s) skipped and retried at a lower scale (normal)")
    if any(m.scale is not None for m in run.metrics):
        grid.add_row("scale per step", "  ".join(f"{m.step}: {m.scale:.6g}{' skipped' if m.skipped else ''}"
                                                 for m in run.metrics))
    for s in run.skipped[:3]:
        cause = s.cause
        grid.add_row("", f"step {s.step} skipped at scale {s.scale:.6g}"
                         + (f": {_where(cause)} made inf ({cause.source or '-'})" if cause is not None else ""))
    if len(run.skipped) > 3:
        grid.add_row("", f"... {len(run.skipped) - 3} more skipped attempt(s) (all in the JSON)")
    if run.unscaled_penalty is not None:
        grid.add_row("penalty recipe", run.unscaled_penalty.detail)
    parts.append(grid)
    if run.fixes:
        top = run.fixes[0]
        parts.append(Text.assemble(("\nfix: ", "bold"), *_mark(top), (top.id, "bold cyan"), f"  {top.title}"))
        parts.append(Text(top.why, style="italic"))
        if top.patch:
            parts.append(Text("patch of your code (nanprobe diagnose --patch - prints it):", style="dim"))
            parts.append(_code(top.patch.rstrip("\n"), "diff"))
        else:
            parts.append(_code(top.snippet, "python"))
        if top.apply:
            parts.append(Text.assemble(("in the config: ", "dim"), top.apply))
        if top.verification:
            parts.append(Text.assemble(("replay: ", "dim"), top.verification))
        checked = any(f.verification for f in run.fixes)
        for other in run.fixes[1:] if checked else run.fixes[1:3]:
            parts.append(Text.assemble(("also: ", "dim"), *_mark(other), (other.id, "cyan"), f"  {other.title}",
                                       (" (patch: --patch)" if other.patch and other.check is FixCheck.OK else "",
                                        "dim")))
            if other.verification:
                parts.append(Text.assemble("      ", (other.verification, "dim")))
    title = f"{run.precision.value} ({run.mode.value}): {run.status.value}"
    return Panel(Group(*parts), title=title, title_align="left", border_style=STYLE[run.status].split()[-1])


def report(rep: Report, console: Console | None = None) -> None:
    """Print the verdicts first, then a panel per precision with a finding."""
    console = console or Console()
    console.print(Text.assemble(("nanprobe diagnose ", "bold"), rep.config or "",
                                (f"  ({rep.device}, torch {rep.torch}{kernels_note(rep.runs)})", "dim")))
    console.print(_summary_table(rep))
    if rep.interrupted:
        console.print(Text(rep.interrupted, style="bold yellow"))
    if any(len(r.metrics) > 1 or r.skipped for r in rep.runs):
        console.print(_trend_table(rep))
    for run in rep.runs:
        if run.status is Status.OK and run.unscaled_penalty is not None:
            console.print(Text.assemble((f"{run.precision.value}: ", "bold yellow"), run.unscaled_penalty.detail))
        if run.status is Status.OK:
            for note in run.notes:  # subnormals with no measurable effect: they do not raise the status
                console.print(Text.assemble((f"{run.precision.value} note: ", "dim"), note))
    bad = [r for r in rep.runs if r.status is not Status.OK]
    for run in bad:
        console.print(_run_panel(run))
    if not bad:
        console.print(Text("No underflow, overflow or NaN in any precision.", style="bold green"))
    from nanprobe.formats import checks as render_checks
    render_checks.data_note(rep.data, console)
    render_checks.init_table(rep.init, console)
