"""The comparison: low-precision replays lined up op by op against fp32, with errors, headroom and ranges.

Each precision replays the same steps (same seed, same data) under the probe, and its ops are
aligned with fp32's by the diagnosis's key (step, phase, module, source line, op, occurrence), so
the casts autocast inserts do not shift the pairing. The replays, their alignment with fp32 and
their effect come from the same pipeline as `diagnose` (diagnosis.replay_measured); "departs at" is
the op diagnose names as the first issue, and the recommendation ranks the safe precisions by their
measured error on the loss, the penalty and the parameter gradients.

Relative error is norm-wise over the sample: ||x - x_ref||_2 / ||x_ref||_2. A tensor flushed to
zero gives exactly 1.0 (a per-element ratio would blow up on its smallest values instead), a
non-finite value where fp32 is finite gives inf, and positions where fp32 itself is non-finite are
left out.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanprobe.analysis import diagnosis
from nanprobe.analysis.alignment import Alignment, Recorder, flushed_share, relative_error, sample  # noqa: F401
from nanprobe.engine import stats as st
from nanprobe.engine.probe import OpEvent
from nanprobe.enums import FindingKind, Phase, Precision, Status
from nanprobe.io.config import Config, to_dict
from nanprobe.io.loading import Loaded
from nanprobe.model.comparison import (
    OUTSIDE,
    Comparison,
    Departure,
    DtypeRange,
    ModuleDivergence,
    PrecisionSummary,
    RangeSpan,
    Recommendation,
)
from nanprobe.model.report import Finding
from nanprobe.thresholds import SAMPLE

_VALUES = {Phase.DATA: "data", Phase.FORWARD: "outputs", Phase.INPUT_GRAD: "gradients",
           Phase.BACKWARD: "gradients", Phase.OPTIMIZER: "updates"}
_FINFO = {str(dt).replace("torch.", ""): torch.finfo(dt)
          for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def dtype_range(precision: Precision) -> DtypeRange:
    info = torch.finfo(precision.torch_dtype)
    # The smallest subnormal is the smallest normal times eps (one unit in the last mantissa place).
    return DtypeRange(precision, math.log2(info.max), math.log2(info.smallest_normal),
                      math.log2(info.smallest_normal) + math.log2(info.eps))


@dataclass
class _OpDelta:
    rel: float | None
    added: float
    flushed: float


def _headroom(e: OpEvent) -> tuple[float | None, float | None]:
    info = _FINFO.get(e.dtype)
    if info is None:
        return None, None
    r = e.row
    to_max = 0.0 if e.has_inf else (math.log2(info.max / r[st.MAX_ABS]) if r[st.MAX_ABS] > 0 else None)  # type: ignore[index]  # rows are fetched before analysis
    mn = r[st.MIN_NONZERO]  # type: ignore[index]  # rows are fetched before analysis
    to_normal = math.log2(mn / info.smallest_normal) if 0 < mn < math.inf else None
    return to_max, to_normal


def _min(values) -> float | None:
    vals = [v for v in values if v is not None]
    return min(vals) if vals else None


def _max(values) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _live(events: list[OpEvent]) -> list[OpEvent]:
    return [e for e in events if not e.skipped and e.row is not None]


def _deltas(alignment: Alignment) -> dict[int, _OpDelta]:
    """Each compared op's error against fp32 and the part it adds, from the alignment (cancelling sums left out)."""
    return {i: _OpDelta(d.rel_error, d.added, d.flushed) for i, d in alignment.deltas.items() if not d.cancelled}


def _row_key(e: OpEvent) -> tuple[str, Phase]:
    return (e.module or OUTSIDE, e.phase)


def _spans(precision: Precision, events: list[OpEvent], deltas: dict[int, _OpDelta] | None) -> dict[tuple, RangeSpan]:
    groups: dict[tuple, list[OpEvent]] = defaultdict(list)
    for e in events:
        groups[_row_key(e)].append(e)
    out = {}
    for key, evs in groups.items():
        heads = [_headroom(e) for e in evs]
        hi = _max(e.row[st.MAX_ABS] for e in evs if e.row[st.MAX_ABS] > 0)  # type: ignore[index]  # rows are fetched before analysis
        lo = _min(e.row[st.MIN_NONZERO] for e in evs if 0 < e.row[st.MIN_NONZERO] < math.inf)  # type: ignore[index]  # rows are fetched before analysis
        ds = [deltas[e.index] for e in evs if e.index in deltas] if deltas is not None else []
        out[key] = RangeSpan(
            precision=precision,
            rel_error=_max(d.rel for d in ds) if deltas is not None else None,
            added_error=_max(d.added for d in ds) if deltas is not None else None,
            flushed=_max(d.flushed for d in ds) if deltas is not None else None,
            headroom_max=_min(h[0] for h in heads), headroom_normal=_min(h[1] for h in heads),
            log2_min=math.log2(lo) if lo else None, log2_max=math.log2(hi) if hi else None,
            nonfinite_ops=sum(1 for e in evs if e.has_inf or e.has_nan), ops=len(evs))
    return out


def _departure(issue: Finding | None, deltas: dict[int, _OpDelta]) -> Departure | None:
    """Where the precision departs: the op diagnose names as the first issue (None when nothing has an effect)."""
    if issue is None or issue.kind is None or issue.phase is Phase.DATA:
        return None
    d = deltas.get(issue.index)
    return Departure(issue.module or OUTSIDE, issue.phase, issue.step, issue.op, issue.source,
                     d.rel if d is not None and d.rel is not None else math.nan,
                     d.added if d is not None else math.nan, d.flushed if d is not None else 0.0)


def measured_error(s: PrecisionSummary) -> float:
    """The worst measured error on what training sees: loss, penalty and parameter gradients (None counts as 0)."""
    return max((v for v in (s.loss_rel_error, s.penalty_rel_error, s.grad_rel_error) if v is not None), default=0.0)


def _modules(order: dict[tuple, int], spans: dict[Precision, dict[tuple, RangeSpan]]) -> tuple[ModuleDivergence, ...]:
    keys = set().union(*(s.keys() for s in spans.values()))
    rows = []
    for key in keys:
        per = tuple(spans[p][key] for p in spans if key in spans[p])
        div = _max(s.added_error / torch.finfo(s.precision.torch_dtype).eps
                   for s in per if s.precision.is_low and s.added_error is not None)
        rows.append(ModuleDivergence(key[0], key[1], _VALUES[key[1]], order.get(key, 1 << 30), div, per))
    # Most divergent first (inf above finite, unknown last); ties in execution order.
    rows.sort(key=lambda m: (m.divergence is None, -(m.divergence or 0.0), m.order))
    return tuple(rows)


def recommend(summaries: tuple[PrecisionSummary, ...]) -> Recommendation:
    """Which low precision to use as configured, and the catalogue's top fix that would make fp16 safe."""
    by = {s.precision: s for s in summaries}
    fp32 = by.get(Precision.FP32)
    low = [s for s in summaries if s.precision.is_low]
    # Ranked by measured error on the loss, the penalty and the parameter gradients, never by habit.
    safe = sorted((s for s in low if s.status is Status.OK), key=lambda s: (measured_error(s), s.precision.value))
    use = safe[0].precision if safe else None
    fp16 = by.get(Precision.FP16)
    fix = None
    if fp16 is not None and fp16.status is not Status.OK:
        fix = next((f for f in fp16.fixes if f.id != "bf16"), None)
    if fp32 is not None and fp32.status is not Status.OK:
        top = fp32.fixes[0] if fp32.fixes else None
        line = f"fp32 fails too ({fp32.status.value}): this is not a precision problem"
        line += f"; fix it first: {top.id} ({top.title})" if top else ""
        return Recommendation((), None, None, line)
    parts = []
    if safe:
        others = [s.precision.value for s in safe[1:]]
        parts.append(f"use {use.value}: it is safe as configured"  # type: ignore[union-attr]  # not None on this path
                     + (f" and closest to fp32 ({', '.join(others)} is safe too)" if others else ""))
    else:
        parts.append("no low precision is safe as configured")
    for s in low:
        if s.status is not Status.OK:
            i, e = s.first_issue, s.error
            first = f"; first issue: {i.kind.value} in {i.phase.value} at {i.module or OUTSIDE}" if i and i.kind else ""
            if e is not None:
                first = f": {e.exception} at {e.op or e.source or 'its step'}"
            parts.append(f"{s.precision.value} is not ({s.status.value}{first})")
    if fix is not None:
        how = f" [{fix.apply}]" if fix.apply else ""
        parts.append(f"to make fp16 safe: {fix.id}, {fix.title[0].lower()}{fix.title[1:]}{how}")
    elif fp16 is not None and fp16.status is not Status.OK and fp16.fixes:
        parts.append(f"to make fp16 safe: {fp16.fixes[0].id}, {fp16.fixes[0].title}")
    return Recommendation(tuple(s.precision for s in safe), use, fix, "; ".join(parts) + ".")


def compare(config: Config, loaded: Loaded, device: torch.device, precisions: tuple[Precision, ...],
            init_ratios: dict, device_name: str, progress: Callable | None = None) -> Comparison:
    """Replay fp32 and each low precision, line them up, and measure how far each departs from fp32.

    The same pipeline as `diagnose` (diagnosis.replay_measured, analyse_trace, build_run); only fp32's samples
    are held across precisions.
    """
    low = tuple(p for p in precisions if p.is_low)
    ref = diagnosis.replay_measured(config, loaded, Precision.FP32, device, progress)
    ref.trace.raise_error()  # the step fails without any low precision: exit 2
    measured = {Precision.FP32: ref}
    ref_live = _live(ref.trace.events)
    order: dict[tuple, int] = {}
    for e in ref_live:
        order.setdefault(_row_key(e), e.index)
    for p in low:
        measured[p] = diagnosis.replay_measured(config, loaded, p, device, progress, ref)
    analyses = diagnosis.analyse_all(measured)
    ctx = diagnosis.shared_context(config, measured, analyses, init_ratios, device.type)
    spans = {Precision.FP32: _spans(Precision.FP32, ref_live, None)}
    summary_list: list[PrecisionSummary] = []
    for p, m in measured.items():
        trace = m.trace
        a = analyses.get(p)
        run = diagnosis.run_report(m, a, ctx)  # a replay that raised: no departure to measure
        live = _live(trace.events)
        deltas = _deltas(m.alignment) if m.alignment is not None else {}
        if p.is_low:
            spans[p] = _spans(p, live, deltas)
        heads = [_headroom(e) for e in live]
        kinds = a.kinds if a is not None else {}
        eff = m.effect if a is not None else None
        summary_list.append(PrecisionSummary(
            precision=p, mode=trace.mode, status=run.status, first_issue=run.first_issue, metrics=run.metrics,
            loss_rel_error=eff.loss.rel_error if eff is not None and eff.loss is not None else None,
            penalty_rel_error=eff.penalty.rel_error if eff is not None and eff.penalty is not None else None,
            grad_rel_error=eff.grad_rel_error if eff is not None else None,
            overflow_ops=kinds.get(FindingKind.OVERFLOW, 0), underflow_ops=kinds.get(FindingKind.UNDERFLOW, 0),
            nan_ops=kinds.get(FindingKind.NAN, 0),
            headroom_max=_min(h[0] for h in heads), headroom_normal=_min(h[1] for h in heads),
            departs_at=_departure(run.first_issue, deltas) if p.is_low and a is not None else None, ops=len(live),
            aligned=a.aligned if a is not None else len(live), fixes=run.fixes, kernels=trace.kernels,
            error=run.error))
    summaries = tuple(summary_list)
    return Comparison(
        config=str(config.source) if config.source else None, device=device_name, torch=torch.__version__,
        steps=config.train.steps, sample=SAMPLE, summaries=summaries, modules=_modules(order, spans),
        dtype_ranges=tuple(dtype_range(p) for p in (Precision.FP16, Precision.BF16)),
        recommendation=recommend(summaries), settings=to_dict(config))
