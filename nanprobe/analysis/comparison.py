"""The comparison: low-precision replays lined up op by op against fp32, with errors, headroom and ranges.

Each precision replays the same steps (same seed, same data) under the probe, and its ops are
aligned with fp32's by the diagnosis's key (step, phase, module, source line, op, occurrence), so
the casts autocast inserts do not shift the pairing. The probe keeps statistics only; for the
element-wise error a fixed sample of each op's first floating output (SAMPLE values at a fixed
stride, as float32) is kept too, and so is a sample of each parameter's gradient per step.

Relative error is norm-wise over the sample: ||x - x_ref||_2 / ||x_ref||_2. A tensor flushed to
zero gives exactly 1.0 (a per-element ratio would blow up on its smallest values instead), a
non-finite value where fp32 is finite gives inf, and positions where fp32 itself is non-finite are
left out.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from nanprobe.analysis import diagnosis

from nanprobe.engine import replay
from nanprobe.engine import stats as st
from nanprobe.io.config import Config, to_dict
from nanprobe.enums import FindingKind, Phase, Precision, Status
from nanprobe.io.loading import Loaded
from nanprobe.engine.probe import OpEvent
from nanprobe.thresholds import DEPARTURE
from nanprobe.model.comparison import (OUTSIDE, DtypeRange, RangeSpan, ModuleDivergence, Departure, PrecisionSummary, Recommendation, Comparison)

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


def sample(t: torch.Tensor) -> torch.Tensor:
    """SAMPLE values of t at a fixed stride, as a float32 copy (the same positions for the same shape)."""
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    return flat[::stride][:SAMPLE].to(torch.float32, copy=True)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float | None:
    """||x - ref|| / ||ref|| over the positions where ref is finite; inf when x is not finite there,
    None when ref is all zero (or nowhere finite)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    keep = torch.isfinite(ref)
    x, ref = x[keep], ref[keep]
    if ref.numel() == 0:
        return None
    if not bool(torch.isfinite(x).all()):
        return math.inf
    den = float(torch.linalg.vector_norm(ref))
    if den == 0.0:
        return None  # fp32 is exactly 0 there: no scale to be relative to
    return float(torch.linalg.vector_norm(x - ref)) / den


def flushed_share(x: torch.Tensor, ref: torch.Tensor, tiny: float) -> float:
    """Share of values that are 0 in x where ref is non-zero and below tiny (the low dtype's smallest normal).

    A zero where fp32 holds a larger value is rounding noise (a cancellation), not a flush.
    """
    x, ref = x.cpu(), ref.cpu()
    a = ref.abs()
    lost = (x == 0) & (a > 0) & (a < tiny)
    return float(lost.sum()) / max(x.numel(), 1)


class Recorder:
    """Keeps a sample of each recorded op's output and of each step's parameter gradients."""

    def __init__(self):
        self.samples: dict[int, torch.Tensor] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def on_record(self, event: OpEvent, outs: list[torch.Tensor]) -> None:
        self.samples[event.index] = sample(outs[0])

    def on_grads(self, step: int, grads: dict[str, torch.Tensor]) -> None:
        self.grads[step] = {name: sample(g) for name, g in grads.items()}


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
    to_max = 0.0 if e.has_inf else (math.log2(info.max / r[st.MAX_ABS]) if r[st.MAX_ABS] > 0 else None)
    mn = r[st.MIN_NONZERO]
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


def _deltas(low: list[OpEvent], events: list[OpEvent], aligned: dict[int, OpEvent], precision: Precision,
            rec: Recorder, ref: Recorder) -> dict[int, _OpDelta]:
    """Each aligned op's error against fp32, and the part of it the op adds to its inputs' error.

    Ops that fp32 does not have (autocast's casts) pass their inputs' error on. Sums and differences
    that cancel in fp32 are left out: their large relative error is rounding noise of the inputs.
    """
    info = torch.finfo(precision.torch_dtype)
    eps, tiny = info.eps, info.smallest_normal
    out: dict[int, _OpDelta] = {}
    carried: dict[int, float] = {}
    for e in low:
        inherited = max((carried.get(p, 0.0) for p in e.producers), default=0.0)
        r = aligned.get(e.index)
        x, y = rec.samples.get(e.index), (ref.samples.get(r.index) if r is not None else None)
        if x is None or y is None or x.shape != y.shape:
            carried[e.index] = inherited
            continue
        rel = relative_error(x, y)
        carried[e.index] = inherited if rel is None else max(rel, inherited)
        if diagnosis.cancelled(e, r, events, eps):
            continue  # its error flows on, but is not blamed on it
        added = 0.0 if rel is None or inherited == math.inf else max(0.0, rel - inherited)
        out[e.index] = _OpDelta(rel, added, flushed_share(x, y, tiny))
    return out


def _grad_error(rec: Recorder, ref: Recorder) -> float | None:
    worst = None
    for step, grads in rec.grads.items():
        ref_grads = ref.grads.get(step, {})
        names = [n for n in grads if n in ref_grads and grads[n].shape == ref_grads[n].shape]
        if not names:
            continue
        err = relative_error(torch.cat([grads[n] for n in names]), torch.cat([ref_grads[n] for n in names]))
        if err is not None:
            worst = err if worst is None else max(worst, err)
    return worst


def _scalar_error(metrics, ref_metrics, attr: str) -> float | None:
    worst = None
    ref_by_step = {m.step: getattr(m, attr) for m in ref_metrics}
    for m in metrics:
        v, r = getattr(m, attr), ref_by_step.get(m.step)
        if v is None or r is None or not math.isfinite(r):
            continue
        err = math.inf if not math.isfinite(v) else (abs(v - r) / abs(r) if r != 0 else (0.0 if v == 0 else math.inf))
        worst = err if worst is None else max(worst, err)
    return worst


def _row_key(e: OpEvent) -> tuple[str, Phase]:
    return (e.module or OUTSIDE, e.phase)


def _spans(precision: Precision, events: list[OpEvent], deltas: dict[int, _OpDelta] | None) -> dict[tuple, RangeSpan]:
    groups: dict[tuple, list[OpEvent]] = defaultdict(list)
    for e in events:
        groups[_row_key(e)].append(e)
    out = {}
    for key, evs in groups.items():
        heads = [_headroom(e) for e in evs]
        hi = _max(e.row[st.MAX_ABS] for e in evs if e.row[st.MAX_ABS] > 0)
        lo = _min(e.row[st.MIN_NONZERO] for e in evs if 0 < e.row[st.MIN_NONZERO] < math.inf)
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


def _departure(low: list[OpEvent], deltas: dict[int, _OpDelta], eps: float) -> Departure | None:
    for e in low:
        d = deltas.get(e.index)
        if d is not None and d.added > DEPARTURE * eps and e.phase is not Phase.DATA:
            return Departure(e.module or OUTSIDE, e.phase, e.step, e.op, e.source, d.rel, d.added, d.flushed)
    return None


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
    safe = sorted((s for s in low if s.status is Status.OK),
                  key=lambda s: (s.grad_rel_error is None, s.grad_rel_error or 0.0, s.precision.value))
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
        parts.append(f"use {use.value}: it is safe as configured"
                     + (f" and closest to fp32 ({', '.join(others)} is safe too)" if others else ""))
    else:
        parts.append("no low precision is safe as configured")
    for s in low:
        if s.status is not Status.OK:
            i = s.first_issue
            first = f"; first issue: {i.kind.value} in {i.phase.value} at {i.module or OUTSIDE}" if i and i.kind else ""
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

    Only fp32's samples and one low precision's are held at a time.
    """
    low = tuple(p for p in precisions if p.is_low)
    ref_rec = Recorder()
    traces = {Precision.FP32: replay.replay(config, loaded, Precision.FP32, device, probe=True, progress=progress,
                                            on_record=ref_rec.on_record, on_grads=ref_rec.on_grads)}
    ref_live = _live(traces[Precision.FP32].events)
    order: dict[tuple, int] = {}
    for e in ref_live:
        order.setdefault(_row_key(e), e.index)
    spans = {Precision.FP32: _spans(Precision.FP32, ref_live, None)}
    measured = {}
    for p in low:
        replay_rec = Recorder()
        trace = replay.replay(config, loaded, p, device, probe=True, progress=progress,
                              on_record=replay_rec.on_record, on_grads=replay_rec.on_grads)
        traces[p] = trace
        live = _live(trace.events)
        aligned = diagnosis.align(trace.events, traces[Precision.FP32].events)
        eps = torch.finfo(p.torch_dtype).eps
        deltas = _deltas(live, trace.events, aligned, p, replay_rec, ref_rec)
        spans[p] = _spans(p, live, deltas)
        measured[p] = {"departs_at": _departure(live, deltas, eps), "aligned": len(aligned),
                       "grad_rel_error": _grad_error(replay_rec, ref_rec)}
        del replay_rec  # this precision's samples are no longer needed
    ref = traces[Precision.FP32]
    found = {p: diagnosis.analyse_trace(t, ref) for p, t in traces.items()}
    context = {"fp32_status": found[Precision.FP32]["status"], "statuses": {p: f["status"] for p, f in found.items()},
               "fix_settings": diagnosis.fix_settings(config, init_ratios, device.type)}
    summaries = []
    for p, trace in traces.items():
        run = diagnosis.build_run(trace, found[p], context)
        live = _live(trace.events)
        heads = [_headroom(e) for e in live]
        kinds = found[p]["kinds"]
        m = measured.get(p, {})
        summaries.append(PrecisionSummary(
            precision=p, mode=trace.mode, status=run.status, first_issue=run.first_issue, metrics=run.metrics,
            loss_rel_error=_scalar_error(trace.metrics, ref.metrics, "loss") if p.is_low else None,
            penalty_rel_error=_scalar_error(trace.metrics, ref.metrics, "penalty") if p.is_low else None,
            grad_rel_error=m.get("grad_rel_error"),
            overflow_ops=kinds.get(FindingKind.OVERFLOW, 0), underflow_ops=kinds.get(FindingKind.UNDERFLOW, 0),
            nan_ops=kinds.get(FindingKind.NAN, 0),
            headroom_max=_min(h[0] for h in heads), headroom_normal=_min(h[1] for h in heads),
            departs_at=m.get("departs_at"), ops=len(live), aligned=m.get("aligned", len(live)), fixes=run.fixes,
            kernels=trace.kernels))
    summaries = tuple(summaries)
    return Comparison(
        config=str(config.source) if config.source else None, device=device_name, torch=torch.__version__,
        steps=config.train.steps, sample=SAMPLE, summaries=summaries, modules=_modules(order, spans),
        dtype_ranges=tuple(dtype_range(p) for p in (Precision.FP16, Precision.BF16)),
        recommendation=recommend(summaries), settings=to_dict(config))
