"""Terminal rendering of a Comparison with rich: the summary, the per-module table, the range view."""
from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nanprobe.enums import Phase, Precision
from nanprobe.formats._style import STYLE, file_line, kernels_note, num
from nanprobe.model.comparison import Comparison, Departure, DtypeRange, ModuleDivergence
from nanprobe.thresholds import EFFECT_TOLERANCE_EPS

RANGE_ROWS = 32
"""Rows of the range view; when there are more, those whose largest values are nearest fp16's edges."""
_RANGE_PHASES = (Phase.FORWARD, Phase.INPUT_GRAD, Phase.BACKWARD)
# One glyph per class, so the view reads without colour too.
_CELLS = {"normal": ("█", "green"), "subnormal": ("▓", "yellow"), "outside": ("░", "red")}


def _eps(p: Precision) -> float:
    import torch

    return torch.finfo(p.torch_dtype).eps


def _err(x) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if 0 < x < 0.01:
        return f"{x:.0e}"
    return f"{x:.2g}" if x < 100 else f"{x:.3g}"


def _pct(x) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else (f"{x:.0%}" if x >= 0.01 else "<1%")


def _room(x) -> str:
    return "-" if x is None else f"{x:+.1f}"


def _steps(values) -> str:
    shown = [num(v) for v in values[:4]]
    return ", ".join(shown) + (", …" if len(values) > 4 else "")


def _op(op: str) -> str:
    return op.removeprefix("aten.").rsplit(".", 1)[0]


def _departs(d: Departure | None) -> str:
    if d is None:
        return "stays close"
    return f"{d.module} · {d.phase.value} (step {d.step})"


def summary_table(c: Comparison) -> Table:
    t = Table(header_style="bold", box=box.SIMPLE_HEAD, title="per precision (fp32 is the reference)",
              title_justify="left")
    t.add_column("")
    for s in c.summaries:
        t.add_column(f"{s.precision.value} ({s.mode.value})" if s.precision.is_low else s.precision.value,
                     justify="right")

    def row(name, fn):
        t.add_row(name, *(fn(s) for s in c.summaries))

    row("status", lambda s: Text(s.status.value, style=STYLE[s.status]))
    row("loss per step", lambda s: _steps([m.loss for m in s.metrics]))
    if any(m.penalty is not None for s in c.summaries for m in s.metrics):
        row("penalty per step", lambda s: _steps([m.penalty for m in s.metrics]))
    row("grad norm per step", lambda s: _steps([m.grad_norm for m in s.metrics]))
    row("loss rel. error", lambda s: _err(s.loss_rel_error))
    row("param-grad rel. error", lambda s: _err(s.grad_rel_error))
    row("ops over/underflow/nan", lambda s: f"{s.overflow_ops}/{s.underflow_ops}/{s.nan_ops}")
    row("headroom to max (2^k)", lambda s: _room(s.headroom_max))
    row("headroom to min normal", lambda s: _room(s.headroom_normal))
    row("departs from fp32 at", lambda s: "-" if not s.precision.is_low else
        f"raised {s.error.exception} at {file_line(s.error.source)}" if s.error is not None else _departs(s.departs_at))
    return t


def module_table(c: Comparison, top: int) -> Table:
    low = [s.precision for s in c.summaries if s.precision.is_low]
    t = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
              title=f"per module: top {min(top, len(c.modules))} "
              f"of {len(c.modules)} by error added there", title_justify="left",
              caption="headroom: powers of two left to the dtype's max / above its smallest normal (< 0: subnormal); "
              "◀: where the dtype departs from fp32",
              caption_justify="left")
    t.add_column("module · phase", no_wrap=True)
    t.add_column("dtype", no_wrap=True)
    t.add_column("rel.err", justify="right", no_wrap=True)
    t.add_column("flushed", justify="right", no_wrap=True)
    t.add_column("headroom", justify="right", no_wrap=True)
    departed = {(s.departs_at.module, s.departs_at.phase, s.precision) for s in c.summaries if s.departs_at is not None}
    for m in c.modules[:top]:
        for i, p in enumerate(low):
            s = m.span(p)
            if s is None:
                continue
            mark = " ◀" if (m.module, m.phase, p) in departed else ""
            t.add_row(f"{m.module} {m.phase.value}" if i == 0 else "", p.value + mark, _err(s.rel_error),
                      _pct(s.flushed),
                      f"{_room0(s.headroom_max)} / {_room0(s.headroom_normal)}",
                      style="bold" if mark else None)
    return t


def _room0(x) -> str:
    return "-" if x is None else f"{x:+.0f}"


def _class(x: float, fp16: DtypeRange) -> str:
    if x < fp16.log2_min_subnormal or x > fp16.log2_max:
        return "outside"
    return "subnormal" if x < fp16.log2_min_normal else "normal"


def _range_rows(c: Comparison, fp16: DtypeRange) -> tuple[list[ModuleDivergence], int]:
    rows = [m for m in c.modules if m.phase in _RANGE_PHASES and (s := m.span(Precision.FP32)) is not None
            and s.log2_min is not None]
    if len(rows) > RANGE_ROWS:
        def edge(m):
            # Nearness of the bulk (the largest values), not of the smallest: a tensor that crosses 0
            # always has some tiny values, one whose largest values are near the edge is at risk.
            s = m.span(Precision.FP32)
            return min(s.log2_max - fp16.log2_min_normal, fp16.log2_max - s.log2_max)

        keep = sorted(rows, key=edge)[:RANGE_ROWS]
        return sorted(keep, key=lambda m: m.order), len(rows) - RANGE_ROWS
    return sorted(rows, key=lambda m: m.order), 0


def range_view(c: Comparison, width: int = 80) -> list[Text]:
    """Per module and phase, the span of log2|x| in fp32 drawn against fp16's and bf16's ranges."""
    ranges = {r.precision: r for r in c.dtype_ranges}
    fp16, bf16 = ranges[Precision.FP16], ranges[Precision.BF16]
    rows, hidden = _range_rows(c, fp16)
    if not rows:
        return [Text("range view: no non-zero values recorded", style="dim")]
    spans = [m.span(Precision.FP32) for m in rows]
    lo = math.floor(min(min(s.log2_min for s in spans), fp16.log2_min_subnormal)) - 2  # type: ignore[arg-type, type-var, union-attr]  # only spans with values get here
    hi = math.ceil(max(max(s.log2_max for s in spans), fp16.log2_max)) + 2  # type: ignore[arg-type, type-var, union-attr]  # only spans with values get here
    labels = [f"{m.module} {m.phase.value}" for m in rows]
    label_w = min(max(len(x) for x in labels + ["bf16"]), 30)
    bar_w = max(20, width - label_w - 16)
    unit = (hi - lo) / bar_w

    def col(x: float) -> int:
        return min(bar_w - 1, max(0, int((x - lo) / unit)))

    def band(r: DtypeRange) -> Text:
        t = Text()
        for i in range(bar_w):
            x = lo + (i + 0.5) * unit
            if r.log2_min_normal <= x <= r.log2_max:
                t.append("█", style="green")
            elif r.log2_min_subnormal <= x < r.log2_min_normal:
                t.append("▓", style="yellow")
            else:
                t.append("░", style="red")
        return t

    step = next(s for s in (2, 4, 8, 16, 32, 64, 128) if s / unit >= 6)
    axis = [" "] * bar_w
    first = math.ceil(lo / step) * step
    for v in range(first, hi + 1, step):
        tick = str(v)
        i = col(v)
        if i + len(tick) <= bar_w and all(ch == " " for ch in axis[max(0, i - 1):i + len(tick)]):
            axis[i:i + len(tick)] = tick
    out = [Text("dynamic range: log2|x| in fp32 (smallest non-zero..largest) vs fp16 and bf16", style="bold"),
           Text(f"{'log2|x|':<{label_w}} ", style="dim") + Text("".join(axis), style="dim"),
           Text(f"{'fp16':<{label_w}} ") + band(fp16),
           Text(f"{'bf16':<{label_w}} ") + band(bf16)]
    for label, s in zip(labels, spans):
        t = Text(f"{label[:label_w]:<{label_w}} ")
        a, b = col(s.log2_min), col(s.log2_max)  # type: ignore[arg-type, union-attr]  # only spans with values get here
        for i in range(bar_w):
            if a <= i <= b:
                x = min(max(lo + (i + 0.5) * unit, s.log2_min), s.log2_max)  # type: ignore[union-attr]  # only spans with values get here
                glyph, style = _CELLS[_class(x, fp16)]
                t.append(glyph, style=style)
            else:
                t.append("·", style="dim")
        t.append(f" {s.log2_min:.0f}..{s.log2_max:.0f}", style="dim")  # type: ignore[union-attr]  # only spans with values get here
        out.append(t)
    out.append(Text("█ fp16 normal  ▓ fp16 subnormal (precision lost)  ░ beyond fp16 (0 or inf)", style="dim"))
    if hidden:
        out.append(Text(f"{hidden} more rows, farther from fp16's edges, in --json (modules[].spans) and --plot",
                        style="dim"))
    return out


def _departure_lines(c: Comparison) -> list[Text]:
    out = []
    for s in c.summaries:
        if not s.precision.is_low:
            continue
        d, e = s.departs_at, s.error
        if e is not None:
            out.append(Text.assemble((f"{s.precision.value}", "bold"), " raised ", (e.exception, STYLE[s.status]),
                                     f" at {e.op or '-'} ({e.source or 'no source'}, {e.phase.value}, step {e.step}): "
                                     f"{e.message} Only the ops before it are compared."))
            continue
        if d is None:
            out.append(Text.assemble((f"{s.precision.value}", "bold"), " stays close to fp32: nothing training sees "
                                     "(loss, penalty, parameter gradients) is off by more than "
                                     f"{EFFECT_TOLERANCE_EPS:g} eps of {s.precision.value} "
                                     f"({_err(EFFECT_TOLERANCE_EPS * _eps(s.precision))}) through an underflow, "
                                     "and nothing goes non-finite"))
            continue
        out.append(Text.assemble(
            (f"{s.precision.value}", "bold"), " departs from fp32 at ", (f"{d.module} · {d.phase.value}", "bold"),
            f" (step {d.step}, {_op(d.op)}{', ' + d.source if d.source else ''}), "
            "the op diagnose names: relative error "
            f"{_err(d.rel_error)}, {_err(d.added_error)} of it added there, {_pct(d.flushed)} of values flushed to 0"))
    return out


def comparison(c: Comparison, console: Console | None = None, top: int = 10) -> None:
    """Print the summary, the departures, the per-module table, the range view and the recommendation."""
    console = console or Console()
    console.print(Text.assemble(("nanprobe compare-precisions ", "bold"), c.config or "",
                                (f"  ({c.device}, torch {c.torch}, {c.steps} step{'s' if c.steps != 1 else ''}"
                                 f"{kernels_note(c.summaries)})", "dim")))
    console.print(summary_table(c))
    for line in _departure_lines(c):
        console.print(line)
    console.print(module_table(c, top))
    for line in range_view(c, console.width):
        console.print(line, no_wrap=True, overflow="crop")
    console.print(Text.assemble(("recommendation: ", "bold"), c.recommendation.line))
