"""Terminal rendering of the data and initialisation checks with rich (the CLI's side)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from nanprobe.enums import DataProblem

SHOWN_INDICES = 8
"""Sample indices shown per problem in the terminal (the JSON lists up to datacheck.MAX_INDICES)."""
INIT_ROWS = 24
"""Init table rows shown in the terminal (flagged layers first); the JSON has every layer."""


@contextmanager
def scan_progress(enabled: bool = True) -> Iterator[Callable | None]:
    """A progress bar on stderr; yields the callback the scan calls per chunk: (done_bytes, total_bytes)."""
    console = Console(stderr=True)
    # Only on a terminal: piped stderr must carry nothing but the one-line errors.
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("[bold]scanning[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=console, transient=True)
    task = bar.add_task("scan", total=None)

    def on_chunk(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield on_chunk


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return ""


def _indices(indices: tuple, count: int) -> str:
    if not indices:
        return "-"
    more = f" … ({count} in all)" if count > SHOWN_INDICES else ""
    return ", ".join(map(str, indices[:SHOWN_INDICES])) + more


def _rows(rep) -> list[tuple]:
    n = max(rep.samples, 1)
    rows = []
    if rep.nonfinite.count:
        c = rep.nonfinite.counts
        rows.append((DataProblem.NONFINITE, rep.nonfinite.count, rep.nonfinite.count / n,
                     _indices(rep.nonfinite.indices, rep.nonfinite.count),
                     f"{c['samples_with_nan']} with NaN, {c['samples_with_inf']} with Inf "
                     f"({c['nan_values']} NaN, {c['posinf_values']} +inf, {c['neginf_values']} -inf values)"))
    if rep.constant.count:
        vals = ", ".join(f"{v:g}" for v in rep.constant.counts.get("values", []))
        more = ", …" if rep.constant.count > 5 else ""
        rows.append((DataProblem.CONSTANT, rep.constant.count, rep.constant.count / n,
                     _indices(rep.constant.indices, rep.constant.count),
                     f"zero variance: per-image normalisation divides by 0 (values {vals}{more})"))
    r = rep.range
    if not r.ok:
        lo, hi = r.expected
        detail = f"observed {r.observed_min:.4g} .. {r.observed_max:.4g}, data.range [{lo:g}, {hi:g}]"
        if r.cause:
            detail += f"; likely {r.cause}"
        if r.transform:
            detail += f"; use x = {r.transform}"
        rows.append((DataProblem.RANGE, r.out_of_range, r.share, _indices(r.indices, r.out_of_range), detail))
    return rows


def data_report(rep, console: Console | None = None, title: str = "nanprobe check-data") -> None:
    """The check-data result: a table of problems and the fix, or one green line."""
    console = console or Console()
    rate = f", {_size(rep.nbytes / rep.seconds)}/s" if rep.seconds > 0 and rep.scope == "file" else ""
    mapped = "memory-mapped" if rep.memory_mapped else "read whole (not memory-mapped)"
    console.print(Text.assemble((f"{title} ", "bold"), rep.path, (
        f"  ({rep.format} {rep.dtype} {list(rep.shape)}, {_size(rep.nbytes)}, {mapped}, {rep.seconds:.2f} s{rate})",
        "dim")))
    for note in rep.notes:
        console.print(Text.assemble(("note: ", "bold yellow"), note))
    if rep.ok:
        r = rep.range
        seen = f" (observed {r.observed_min:.4g} .. {r.observed_max:.4g})" if r.observed_min is not None else ""
        console.print(Text(f"{rep.samples} samples: no NaN or Inf, no constant image, values within data.range "
                           f"[{r.expected[0]:g}, {r.expected[1]:g}]{seen}.", style="bold green"))
        return
    t = Table(header_style="bold")
    for col, justify in (("problem", "left"), ("samples", "right"), ("share", "right"), ("indices", "left"),
                         ("detail", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]  # "left"/"right" literals above
    for problem, count, share, idx, detail in _rows(rep):
        t.add_row(Text(problem.value, style="bold red"), str(count), f"{share:.2%}", idx, detail)
    console.print(t)
    if rep.fix is not None:
        console.print(_fix(rep.fix))


def _fix(fix) -> Group:
    return Group(Text.assemble(("fix: ", "bold"), (fix.id, "bold cyan"), f"  {fix.title}"),
                 Text(fix.why, style="italic"),
                 Syntax(fix.snippet, "python", theme="ansi_dark", background_color="default", word_wrap=True))


def data_note(rep, console: Console) -> None:
    """diagnose's data check of the replayed samples: a panel when it found something."""
    if rep is None or rep.ok:
        return
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    for problem, count, _, idx, detail in _rows(rep):
        t.add_row(problem.value, f"{count} of the {rep.samples} replayed samples ({idx}): {detail}")
    for note in rep.notes:
        t.add_row("note", note)
    console.print(Panel(t, title="data", title_align="left", border_style="yellow"))


def init_table(checks, console: Console) -> None:
    """The initialisation table, when a layer is flagged: weight std against Glorot and He, output scale."""
    flagged = [c for c in checks if c.flagged]
    if not flagged:
        return
    shown = flagged + [c for c in checks if not c.flagged][:max(0, INIT_ROWS - len(flagged))]
    shown.sort(key=lambda c: checks.index(c))
    t = Table(title="initialisation: weight std against He (for the activation after) and Glorot; "
                    "output std on the first batch",
              title_justify="left", header_style="bold")
    for col in ("module", "std", "He", "× He", "Glorot", "out std", "after"):
        t.add_column(col, justify="left" if col in ("module", "after") else "right", no_wrap=col == "module")
    for c in shown:
        t.add_row(c.module, f"{c.std:.3g}", f"{c.he:.3g}",
                  Text(f"{c.ratio:.3g}", style="bold red" if c.flagged else ""),
                  f"{c.glorot:.3g}", "-" if c.output_std is None else f"{c.output_std:.3g}",
                  c.nonlinearity.replace("leaky_relu", "leaky") + (" (assumed)" if c.assumed else ""))
    console.print(t)
    if len(checks) > len(shown):
        console.print(Text(f"{len(checks) - len(shown)} more layers at a normal scale in the JSON report", style="dim"))
