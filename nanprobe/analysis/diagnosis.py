"""From replay traces to verdicts: one typed pipeline for diagnose, compare-precisions, --verify-fix and watch.

    replay_measured  -> Measured   (a replay, its alignment with fp32 and its effect; alignment.py, effect.py)
    analyse_trace    -> Analysis   (root cause by provenance, status, notes; provenance.py)
    build_run        -> RunReport  (with the fixes ranked on the root cause's chain; fixes.py)

A low-precision op departs from fp32 when its output is non-finite, zero where fp32's is not, or off
by more than thresholds.DEPARTURE. A non-finite run is explained by walking back from the first
op that made inf or NaN from finite inputs (provenance.py). An underflow that leaves the run finite is a
finding only when it changes what training sees (effect.py); subnormals with no measurable effect are
notes and never raise the status.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nanprobe import thresholds as th
from nanprobe.analysis import alignment as al
from nanprobe.analysis import fixes as fx
from nanprobe.analysis import raised
from nanprobe.analysis.alignment import Alignment, Recorder
from nanprobe.analysis.effect import Effect, measure, within_cancellation
from nanprobe.analysis.provenance import (
    RootCause,
    cancelling_sum,
    inputs_nonfinite,
    lost_eps,
    makes_nonfinite,
    nonfinite_cause,
    surviving_eps,
    underflow_cause,
)
from nanprobe.engine import stats as st
from nanprobe.engine.probe import OpEvent
from nanprobe.engine.replay import Trace
from nanprobe.engine.stats import TensorStats
from nanprobe.enums import FindingKind, Framework, Phase, Precision, Status
from nanprobe.io.config import Config
from nanprobe.model.report import ChainLink, Finding, LostUpdates, RunReport, SkippedAttempt

_LOW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Why some backward nodes make inf or NaN from finite inputs.
_NODE_WHY = {
    "SqrtBackward0": "d sqrt(x)/dx = 1 / (2 sqrt(x)) is infinite at x = 0",
    "LogBackward0": "d log(x)/dx = 1/x is infinite at x = 0",
    "RsqrtBackward0": "d rsqrt(x)/dx is infinite at x = 0",
    "DivBackward0": "the denominator is 0",
    "PowBackward0": "a fractional power has an infinite derivative at 0",
    "ReciprocalBackward0": "d (1/x)/dx is infinite at x = 0",
}
_DIVIDING = frozenset({"div", "div_", "addcdiv", "addcdiv_"})
NOTES_MAX = 3
"""Underflow candidates with no effect listed by name in a run's notes (the rest are counted)."""


@dataclass(frozen=True)
class Measured:
    """One precision's replay with what was measured against fp32 (both None for fp32 itself)."""

    trace: Trace
    """The replay."""
    alignment: Alignment | None = None
    """Its ops lined up with fp32's, with each op's departure."""
    effect: Effect | None = None
    """What training sees against fp32."""
    recorder: Recorder | None = None
    """fp32's samples, kept to measure the other precisions against (None for a low precision once measured)."""
    grad_ops: dict = field(default_factory=dict)
    """step -> parameter -> index of the op that produced its gradient (where the effect walk starts)."""
    independence: Callable[[list[str]], frozenset[str]] | None = field(default=None, compare=False, repr=False)
    """fp32's: which parameters the critic does not depend on, remembered across the precisions measured
    against it (independence_test)."""

    @property
    def precision(self) -> Precision:
        return self.trace.precision


@dataclass(frozen=True)
class Analysis:
    """The verdict of one replay before its fixes are ranked."""

    precision: Precision
    """The replay's precision."""
    status: Status
    """ok | underflow | overflow | nan."""
    cause: RootCause | None
    """Root cause (None when nothing changes what training sees)."""
    issue: Finding | None
    """The culprit as the report shows it (the root cause, or the scale collapse)."""
    nonfinite: Finding | None
    """The first op whose output holds inf or NaN."""
    chain: tuple[ChainLink, ...]
    """The root cause's path, shortened to CHAIN_MAX links."""
    kinds: dict
    """FindingKind -> ops with that finding (non-finite made from finite inputs; underflows on the cause's path)."""
    ops: int
    """Ops recorded (attempts that count)."""
    aligned: int
    """Ops paired with an fp32 op."""
    collapse: Finding | None
    """GradScaler's scale collapse, if any."""
    notes: tuple[str, ...] = ()
    """Underflows with no measurable effect, and the effect measured."""
    measured: Measured | None = None
    """The replay and its measurements."""

    @property
    def count(self) -> int:
        return sum(self.kinds.values())


def measure_against(trace: Trace, rec: Recorder | None, ref: Measured | None,
                    independent: Callable[[list[str]], frozenset[str]] | None = None) -> Measured:
    """A replay lined up with fp32's and its effect measured: the one place both are computed.

    `independent` is effect.measure's: which parameters the critic does not depend on."""
    if ref is None or not trace.precision.is_low:
        return Measured(trace, recorder=rec)
    ratios = al.scale_ratios(trace.metrics, ref.trace.metrics, penalty_scaled=not trace.unscaled_grads)
    alignment = al.align(trace.events, ref.trace.events, rec, ref.recorder, ratios)
    effect = measure(trace.precision, trace.metrics, ref.trace.metrics, rec, ref.recorder, trace.lost, independent)
    grad_ops = dict(rec.grad_ops) if rec is not None else {}
    factors = {}
    for p in effect.off_params:
        if p.rel_error is None or not math.isfinite(p.rel_error):
            continue  # inf or NaN, or no fp32 value to be a share of: no sum's rounding explains it
        found = cancelling_sum(p, trace.events, ref.trace.events, alignment, grad_ops)
        if found is not None:
            factors[p.param] = found.factor
    return Measured(trace, alignment, within_cancellation(effect, factors, rec, ref.recorder), grad_ops=grad_ops)


def independence_test(config: Config, loaded) -> Callable[[list[str]], frozenset[str]] | None:
    """analysis.invariance on the critic as the replays build it and on the first real batch (PyTorch models)."""
    from nanprobe.analysis import invariance
    from nanprobe.engine import precisions
    from nanprobe.engine import replay as rp

    strategy = precisions.for_loaded(loaded)
    if strategy.framework is not Framework.TORCH:
        return None

    known: dict[str, bool] = {}

    def test(names: list[str]) -> frozenset[str]:
        # The answer is the fp32 critic's, the same for every precision: each parameter is tested once.
        new = [n for n in names if n not in known]
        if new:
            critic, _ = strategy.models(Precision.FP32, config.precision.mode, (), config.model.init, config.seed)
            found = invariance.independent(critic, rp.first_batch(config, loaded), new)
            known.update((n, n in found) for n in new)
        return frozenset(n for n in names if known[n])

    return test


def replay_measured(config: Config, loaded, precision: Precision, device: torch.device,
                    progress: Callable | None = None, ref: Measured | None = None) -> Measured:
    """Replay one precision under the probe, with the samples the alignment and effect need."""
    from nanprobe.engine import replay as rp

    rec = Recorder()
    trace = rp.replay(config, loaded, precision, device, probe=True, progress=progress,
                      on_record=rec.on_record, on_grads=rec.on_grads)
    if ref is None:
        return replace(measure_against(trace, rec, None), independence=independence_test(config, loaded))
    return measure_against(trace, rec, ref, ref.independence or independence_test(config, loaded))


def unmeasured(trace: Trace) -> Measured:
    """A replay with nothing measured (an interrupted one): judged on its statistics only."""
    return Measured(trace)


def align(events: list[OpEvent], ref_events: list[OpEvent]) -> dict[int, OpEvent]:
    """The fp32 op each recorded low-precision op lines up with, by the low op's index (skipped attempts left out)."""
    return {i: ref_events[j] for i, j in al.pair(events, ref_events).items()}


def cancelled(e: OpEvent, ref: OpEvent, events: list[OpEvent], eps: float) -> bool:
    """A sum or difference whose fp32 result is below eps times its inputs: cancellation, not precision loss."""
    return al.cancelled(e, ref, events, eps)


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.3g}"


def _underflow_detail(e: OpEvent, r: OpEvent | None, lost: float) -> str:
    dt = _LOW_DTYPES.get(e.dtype)
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dt, e.dtype)  # type: ignore[arg-type]  # not None on this path
    tiny = torch.finfo(dt).smallest_normal if dt is not None else 0.0
    lo = e.row
    ref = (f"fp32 |x| from {_fmt(r.row[st.MIN_NONZERO])} to {_fmt(r.row[st.MAX_ABS])}; " if r is not None else "")  # type: ignore[index]  # rows are fetched before analysis
    return (f"{lost:.0%} of its {int(lo[st.NUMEL])} values are 0 or subnormal in {name} but non-zero in fp32 "  # type: ignore[index]  # rows are fetched before analysis
            f"({ref}{name}: {int(lo[st.ZEROS])} zeros, {int(lo[st.SUBNORMAL])} subnormals, smallest normal {tiny:.3g})")  # type: ignore[index]  # rows are fetched before analysis


def _inputs(e: OpEvent, by_index: list[OpEvent]) -> tuple[bool, bool, float]:
    nan, inf = inputs_nonfinite(e, by_index)
    return nan, inf, al.input_max(e, by_index)


def _describe_nonfinite(e: OpEvent, in_nan: bool, in_inf: bool, in_max: float) -> str:
    r = e.row
    parts = []
    if r[st.NAN]:  # type: ignore[index]  # rows are fetched before analysis
        parts.append(f"{int(r[st.NAN])} NaN")  # type: ignore[index]  # rows are fetched before analysis
    if r[st.POSINF]:  # type: ignore[index]  # rows are fetched before analysis
        parts.append(f"{int(r[st.POSINF])} +inf")  # type: ignore[index]  # rows are fetched before analysis
    if r[st.NEGINF]:  # type: ignore[index]  # rows are fetched before analysis
        parts.append(f"{int(r[st.NEGINF])} -inf")  # type: ignore[index]  # rows are fetched before analysis
    made = " and ".join(parts) + f" of {int(r[st.NUMEL])} values"  # type: ignore[index]  # rows are fetched before analysis
    if in_nan or in_inf:
        src = "inputs already holding " + ("NaN" if in_nan else "inf")
    elif e.producers:
        src = f"finite inputs (max |x| {in_max:.3g})"
    elif e.param is not None:
        src = f"casting the weight {e.param} to {e.dtype}"
    else:
        src = "the data as loaded" if e.phase is Phase.DATA else "no recorded inputs"
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(e.dtype)
    why = _NODE_WHY.get(e.node or "")
    if why is None and e.phase is Phase.OPTIMIZER and al.base(e.op) in _DIVIDING and not (in_nan or in_inf):
        why = "the optimizer divides by sqrt(v) + eps, which is 0 where v is 0 unless eps survives " + e.dtype
    if why is None and dt is not None and (r[st.POSINF] or r[st.NEGINF]) and not (in_nan or in_inf):  # type: ignore[index]  # rows are fetched before analysis
        why = f"{e.dtype} max is {torch.finfo(dt).max:.6g}"
    node = f" in {e.node}" if e.node else ""
    return f"{made} from {src}{node}" + (f": {why}" if why else "")


def _numbers(e: OpEvent, ref: OpEvent | None, by_index: list[OpEvent], m: Measured | None = None) -> dict:
    d: dict[str, Any] = {"observed": TensorStats.of(e.row).__dict__ if e.row else None,
                         "reference": TensorStats.of(ref.row).__dict__ if ref is not None and ref.row else None,
                         "producer_ops": [by_index[p].op for p in e.producers]}
    delta = m.alignment.delta(e.index) if m is not None and m.alignment is not None else None
    if delta is not None:
        d["lost_share"] = round(delta.lost, 4)
        d["zeroed"] = round(delta.zeroed, 4)
        d["rel_error"] = delta.rel_error
    if e.info:
        d.update(e.info)
    return d


def _finding(e: OpEvent, kind: FindingKind | None, detail: str, numbers: dict) -> Finding:
    return Finding(kind, e.op, e.module, e.phase, e.step, e.source, detail, e.node, e.dtype, numbers, e.index, e.param)


def _lost_update_detail(e: OpEvent) -> str | None:
    lost = (e.info or {}).get("lost_updates")
    if lost is None or e.dtype not in _LOW_DTYPES:
        return None
    eps = torch.finfo(_LOW_DTYPES[e.dtype]).eps
    return (f"the update of {lost['lost']} of {lost['elements']} elements of {lost['param']} ({lost['share']:.0%}) "
            f"was lost: below half an ulp of the {e.dtype} weight ({eps / 4:.2g} to {eps / 2:.2g} of |w|), "
            f"so w + update == w")


def _link(e: OpEvent) -> ChainLink:
    r = e.row
    summary = (f"max |x| {r[st.MAX_ABS]:.3g}, zeros {int(r[st.ZEROS])}/{int(r[st.NUMEL])}, "  # type: ignore[index]  # rows are fetched before analysis
               f"inf {int(r[st.POSINF] + r[st.NEGINF])}, nan {int(r[st.NAN])}")  # type: ignore[index]  # rows are fetched before analysis
    return ChainLink(e.op, e.module, e.phase, e.step, summary, e.index)


def _shorten(links: list[ChainLink]) -> tuple[ChainLink, ...]:
    if len(links) <= th.CHAIN_MAX:
        return tuple(links)
    gap = len(links) - 7
    marker = ChainLink("...", "", links[3].phase, links[3].step, f"{gap} ops left out", -1)
    return tuple(links[:3] + [marker] + links[-4:])


def _short(e: OpEvent) -> str:
    return f"{e.module or '(outside modules)'} {e.phase.value} {al.base(e.op)}" + (f" ({e.node})" if e.node else "")


def _cause_finding(cause: RootCause, m: Measured, ref: Trace | None) -> Finding:
    events = m.trace.events
    e = events[cause.culprit]
    a = m.alignment
    r = ref.events[a.delta(e.index).ref] if a is not None and ref is not None and a.delta(e.index) else None  # type: ignore[union-attr]  # an aligned op has a delta
    numbers = _numbers(e, r, events, m)
    if cause.nonfinite is not None and cause.culprit == cause.nonfinite:
        in_nan, in_inf, in_max = _inputs(e, events)
        detail = _describe_nonfinite(e, in_nan, in_inf, in_max)
    elif cause.guard is not None and cause.culprit == cause.guard:
        f = events[cause.nonfinite]  # type: ignore[index]  # not None on this path
        in_nan, in_inf, in_max = _inputs(f, events)
        low = f" (fp32 |x| down to {_fmt(r.row[st.MIN_NONZERO])})" if r is not None else ""  # type: ignore[index]  # rows are fetched before analysis
        detail = (f"the eps {cause.eps:g} it adds rounds to 0 in {e.dtype}, so its output is 0 where fp32's is "
                  f"not{low}; then {_short(f)}: "
                  f"{_describe_nonfinite(f, in_nan, in_inf, in_max)}")
    elif cause.kind is FindingKind.UNDERFLOW and _lost_update_detail(e) is not None:
        detail = _lost_update_detail(e)  # type: ignore[assignment]  # not None on this path
    else:
        d = a.delta(e.index) if a is not None else None
        detail = _underflow_detail(e, r, max(d.lost, d.zeroed) if d is not None else 0.0)
        if cause.nonfinite is not None:
            f = events[cause.nonfinite]
            detail += f"; it leads to the non-finite value at {_short(f)}"
    if cause.guard is not None:
        g, o = events[cause.guard], events[cause.origin]
        if cause.culprit != cause.guard:
            detail += (f"; eps={cause.eps:g} added at {_short(g)} rounds to 0 in {g.dtype}, so nothing keeps the "
                       f"input away from 0")
        if cause.origin != cause.guard:
            detail += f" (the zeros come from {_short(o)}, which flushed)"
        numbers["eps"] = cause.eps
        numbers["eps_in_dtype"] = 0.0
    if m.effect is not None and cause.nonfinite is None:
        detail += f"; effect: {m.effect.summary()}"
    if m.effect is not None:
        numbers["effect"] = {"loss": m.effect.loss.rel_error if m.effect.loss else None,
                             "penalty": m.effect.penalty.rel_error if m.effect.penalty else None,
                             "grad": m.effect.grad_rel_error, "tolerance": m.effect.tolerance,
                             "params_off": [p.param for p in m.effect.off_params]}
    return _finding(e, cause.kind, detail, numbers)


def _rounding_note(eff: Effect) -> str:
    """What training sees is off with no underflow, overflow or NaN on its path and no cancelling sum to explain
    it: the dtype's rounding, accumulated."""
    return (f"differs from fp32 beyond tolerance with no underflow, overflow or NaN on its path: the dtype's "
            f"rounding, not its range (a loss scale does not change it); {eff.summary()}")


def _notes(m: Measured, cause: RootCause | None) -> list[str]:
    a, eff = m.alignment, m.effect
    if a is None or eff is None:
        return []
    notes = []
    if cause is None and eff.any_off:
        notes.append(_rounding_note(eff))
    on_path = set(cause.path) if cause is not None else set()
    quiet = [i for i, d in sorted(a.deltas.items()) if d.candidate and i not in on_path]
    if not quiet:
        return notes
    events = m.trace.events
    named = ", ".join(f"{_short(events[i])} ({a.delta(i).lost:.0%} 0 or subnormal)" for i in quiet[:NOTES_MAX])  # type: ignore[union-attr]  # an aligned op has a delta
    more = f" and {len(quiet) - NOTES_MAX} more" if len(quiet) > NOTES_MAX else ""
    if cause is not None:
        return notes + [f"subnormals not on the path to the root cause: {named}{more}; {eff.summary()}"]
    if eff.any_off:
        return notes + [f"subnormals that do not explain the difference from fp32: {named}{more}"]
    return notes + [f"subnormals with no measurable effect: {named}{more}; {eff.summary()}"]


def masked(trace: Trace) -> bool:
    """Every step's loss, penalty and gradient norm is finite and no optimizer op made inf or NaN: a non-finite
    value made along the way was masked before training saw it."""
    if not trace.metrics or trace.stopped:
        return False
    for m in trace.metrics:
        if m.skipped or any(v is not None and not math.isfinite(v) for v in (m.loss, m.penalty, m.grad_norm)):
            return False
    return not any(e.phase is Phase.OPTIMIZER and (e.has_nan or e.has_inf) for e in al.live(trace.events))


def analyse_trace(m: Measured | Trace, ref: Measured | Trace | None = None) -> Analysis:
    """The verdict of one replay (fp32, or a low precision measured against fp32)."""
    if isinstance(m, Trace):
        m = unmeasured(m)
    ref_trace = ref.trace if isinstance(ref, Measured) else ref
    trace = m.trace
    events = trace.events
    live = al.live(events)
    kinds: dict[FindingKind, int] = defaultdict(int)
    for e in live:
        k = makes_nonfinite(e, events)
        if k is not None:
            kinds[k] += 1
    cause = nonfinite_cause(events, m.alignment)
    masked_note = None
    if cause is not None and masked(trace):
        f = events[cause.nonfinite]  # type: ignore[index]  # not None on this path
        masked_note = (f"{_short(f)} made a non-finite value that nothing training sees inherits (the loss, "
                       f"the penalty, the gradients and the updates stay finite): masked by a later op, no effect")
        cause = None
        kinds.pop(FindingKind.NAN, None)
        kinds.pop(FindingKind.OVERFLOW, None)
    if cause is None:
        cause = underflow_cause(events, m.alignment, m.effect, m.grad_ops)
    if cause is not None and m.alignment is not None:
        under = sum(1 for i in cause.path if m.alignment.delta(i) is not None and m.alignment.delta(i).candidate)  # type: ignore[misc, union-attr]  # an aligned op has a delta
        if cause.kind is FindingKind.UNDERFLOW:
            under = max(under, 1)
        if under:
            kinds[FindingKind.UNDERFLOW] += under
    worst = Status.OK
    for k in kinds:
        if Status.of(k).severity > worst.severity:
            worst = Status.of(k)
    collapse = scale_collapse(trace)
    if collapse is not None and Status.of(collapse.kind).severity > worst.severity:
        worst = Status.of(collapse.kind)
    issue = _cause_finding(cause, m, ref_trace) if cause is not None else collapse
    first_nf = None if masked_note else next((e for e in live if e.has_nan or e.has_inf), None)
    nonfinite = None
    if first_nf is not None:
        in_nan, in_inf, in_max = _inputs(first_nf, events)
        r = None
        if m.alignment is not None and ref_trace is not None and m.alignment.delta(first_nf.index) is not None:
            r = ref_trace.events[m.alignment.delta(first_nf.index).ref]  # type: ignore[union-attr]  # an aligned op has a delta
        nonfinite = _finding(first_nf, makes_nonfinite(first_nf, events),
                             _describe_nonfinite(first_nf, in_nan, in_inf, in_max), _numbers(first_nf, r, events, m))
    chain: tuple[ChainLink, ...] = ()
    if cause is not None and len(cause.path) > 1:
        start = cause.path.index(cause.origin) if cause.origin in cause.path else 0
        chain = _shorten([_link(events[i]) for i in cause.path[start:]])
    aligned = len(m.alignment.pairs) if m.alignment is not None else len(live)
    notes = ([masked_note] if masked_note else []) + _notes(m, cause)
    return Analysis(trace.precision, worst, cause, issue, nonfinite, chain, dict(kinds), len(live), aligned, collapse,
                    tuple(notes), m)


def _chain_ops(cause: RootCause | None, m: Measured) -> tuple[fx.ChainOp, ...]:
    if cause is None:
        return ()
    events = m.trace.events
    out = []
    for i in cause.path:
        e = events[i]
        d = m.alignment.delta(i) if m.alignment is not None else None
        out.append(fx.ChainOp(al.base(e.op), e.node, e.dtype, e.phase, e.module, e.scalars,
                              zeroed=bool(d is not None and (d.zeroed > 0 or d.flushed > 0)) or e.row[st.ZEROS] > 0,  # type: ignore[index]  # rows are fetched before analysis
                              nonfinite=e.has_nan or e.has_inf, cast=al.is_cast(e), lost_eps=lost_eps(e),
                              kept_eps=surviving_eps(e), index=i))
    return tuple(out)


def _after(cause: RootCause | None, m: Measured, limit: int = 4) -> tuple[fx.ChainOp, ...]:
    """The ops fed by the culprit's output, nearest first (a forward chain, following the first consumer)."""
    if cause is None:
        return ()
    events = m.trace.events
    out: list[fx.ChainOp] = []
    cur = cause.culprit
    for e in events[cause.culprit + 1:]:
        if len(out) >= limit:
            break
        if cur in e.producers and not e.skipped and e.row is not None:
            out.append(fx.ChainOp(al.base(e.op), e.node, e.dtype, e.phase, e.module, e.scalars,
                                  nonfinite=e.has_nan or e.has_inf, cast=al.is_cast(e), index=e.index))
            cur = e.index
    return tuple(out)


def _feeds(cause: RootCause | None, m: Measured) -> tuple[fx.ChainOp, ...]:
    """The origin's inputs' producers, looking through casts (a sigmoid behind autocast's cast)."""
    if cause is None:
        return ()
    events = m.trace.events
    out: list[fx.ChainOp] = []
    todo, seen = list(events[cause.origin].producers), set()
    while todo and len(out) < 8:
        i = todo.pop(0)
        if i in seen:
            continue
        seen.add(i)
        e = events[i]
        if al.is_cast(e):
            todo.extend(e.producers)
            continue
        out.append(fx.ChainOp(al.base(e.op), e.node, e.dtype, e.phase, e.module, e.scalars,
                              zeroed=e.row is not None and e.row[st.ZEROS] > 0, index=i))
    return tuple(out)


def penalty_in_fp32(trace: Trace) -> bool:
    """The penalty's input gradient was computed in fp32 (outside autocast): scaling it would change nothing."""
    grads = [e for e in al.live(trace.events) if e.phase is Phase.INPUT_GRAD and e.dtype in ("float16", "bfloat16",
                                                                                               "float32")]
    return bool(grads) and all(e.dtype == "float32" for e in grads)


def _first_bad(trace: Trace, step: int, attempt: int | None) -> OpEvent | None:
    """The first op making inf or NaN in a skipped attempt, or (attempt None) in the step's final attempt."""
    for e in trace.events:
        if e.step != step or e.row is None or not (e.has_inf or e.has_nan):
            continue
        if (e.skipped and e.attempt == attempt) if attempt is not None else (not e.skipped and e.attempt >= 0):
            return e
    return None


def _cause(e: OpEvent, events: list[OpEvent]) -> Finding:
    in_nan, in_inf, in_max = _inputs(e, events)
    kind = FindingKind.OVERFLOW if e.has_inf else FindingKind.NAN
    return _finding(e, kind, _describe_nonfinite(e, in_nan, in_inf, in_max), {})


def _skips(trace: Trace) -> tuple[SkippedAttempt, ...]:
    out = []
    for step, attempt, scale in trace.skipped:
        e = _first_bad(trace, step, attempt)
        out.append(SkippedAttempt(step, scale, _cause(e, trace.events) if e is not None else None))
    return tuple(out)


def scale_collapse(trace: Trace) -> Finding | None:
    """The op that keeps making inf while GradScaler's scale falls (apex#654), or None when scaling recovers.

    One skipped first step is the scaler finding its level. It has collapsed when a step is still skipped
    after every retry, when every replayed step (two or more) needed a skip, or when the scale fell below
    th.SCALE_FLOOR.
    """
    metrics = trace.metrics
    if not metrics or metrics[0].scale is None:
        return None
    persistent = [m.step for m in metrics if m.skipped]
    skip_steps = {s for s, _, _ in trace.skipped} | set(persistent)
    tried = [sc for _, _, sc in trace.skipped] + [m.scale for m in metrics]
    every = len(metrics) >= 2 and len(skip_steps) == len(metrics)
    if not (persistent or every or min(tried) < th.SCALE_FLOOR):  # type: ignore[operator, type-var]  # metrics[0].scale is set: a scaler ran
        return None
    bad = [_first_bad(trace, s, a) for s, a, _ in trace.skipped] + [_first_bad(trace, s, None) for s in persistent]
    bad = [e for e in bad if e is not None]
    if not bad:
        return None
    counts: dict[tuple, list[OpEvent]] = defaultdict(list)
    for e in bad:
        counts[(e.phase, e.module, e.source, e.op, e.node)].append(e)  # type: ignore[arg-type, union-attr]  # not None on this path
    events = max(counts.values(), key=len)
    e = events[0]
    if e.phase is Phase.DATA:
        return None  # bad data makes every step non-finite: the data finding says it, not the scaler
    cause = _cause(e, trace.events)
    start = trace.skipped[0][2] if trace.skipped else metrics[0].scale
    never = f"; step(s) {', '.join(map(str, persistent))} never recovered" if persistent else ""
    what = "NaN" if cause.kind is FindingKind.NAN else "inf"
    detail = (f"GradScaler skipped {len(bad)} attempt(s) in {len(skip_steps)} of {len(metrics)} step(s){never}; "
              f"the scale fell from {start:g} to {min(tried):g}. {len(events)} of the {len(bad)} skips came from "  # type: ignore[type-var]  # scales are set: a scaler ran
              f"{e.op.removeprefix('aten.').rsplit('.', 1)[0]}{f' ({e.node})' if e.node else ''} in "
              f"{e.module or '(outside modules)'} making {what} ({cause.detail}): loss scaling cannot fix an op "
              f"that overflows at every scale")
    return Finding(cause.kind, e.op, e.module, e.phase, e.step, e.source, detail, e.node, e.dtype,
                   {"skipped_attempts": len(bad), "skipped_steps": sorted(skip_steps), "never_recovered": persistent,
                    "scale_start": start, "scale_lowest": min(tried), "cause_count": len(events)}, e.index, e.param)  # type: ignore[type-var]  # scales are set: a scaler ran


def unscaled_penalty(trace: Trace) -> Finding | None:
    """A torch.autograd.grad call on outputs the GradScaler did not scale, in an fp16 run (bf16 needs no scaling)."""
    if not trace.precision.needs_loss_scaling or not trace.unscaled_grads or penalty_in_fp32(trace):
        return None  # a penalty computed in fp32 outside autocast needs no scaling
    step, source = trace.unscaled_grads[0]
    calls = sum(1 for s, src in trace.unscaled_grads if src == source)
    detail = (f"torch.autograd.grad at {source or 'an unknown line'} takes outputs that scaler.scale did not scale "
              f"({calls} call(s) over the replay): the penalty's input gradient gets no loss scaling, so under fp16 "
              f"it can flush to zero while the rest of the backward is scaled. Scale the outputs before "
              f"autograd.grad and multiply the gradients by 1/scale (a custom step receives the scaler as `scaler=`)")
    return Finding(None, "torch.autograd.grad", "", Phase.INPUT_GRAD, step, source, detail, numbers={"calls": calls})


def lost_updates(trace: Trace) -> tuple[LostUpdates, ...]:
    """Per module, the weights whose update was rounded away, summed over the steps, worst first."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for counts in trace.lost.values():
        for name, (moving, unchanged) in counts.items():
            t = totals[name.rsplit(".", 1)[0]]
            t[0] += moving
            t[1] += unchanged
    dtype = str(trace.precision.torch_dtype).replace("torch.", "")
    out = [LostUpdates(m, n, k, round(k / n, 4), dtype) for m, (n, k) in totals.items() if k]
    return tuple(sorted(out, key=lambda x: (-x.share, x.module)))


def _growth(metrics: tuple, step: int) -> float:
    """Weight norm at `step` over the first step's: how far the updates have moved the weights."""
    norms = {m.step: m.weight_norm for m in metrics if m.weight_norm}
    return norms[step] / norms[0] if step in norms and 0 in norms else 1.0


def build_run(a: Analysis, context: dict) -> RunReport:
    """One precision's RunReport from its analysis and the context shared by all runs."""
    m = a.measured
    trace = m.trace  # type: ignore[union-attr]  # not None on this path
    by_index = trace.events
    status, issue, nonfinite, collapse = a.status, a.issue, a.nonfinite, a.collapse
    unscaled = unscaled_penalty(trace)
    first = issue or nonfinite
    fp32_ok = context["fp32_status"] is Status.OK
    chain_ops = _chain_ops(a.cause, m)  # type: ignore[arg-type]  # not None on this path
    culprit = next((c for c in chain_ops if a.cause is not None and c.index == a.cause.culprit), None)
    chain_nodes = tuple(x.node for x in (by_index[c.index] for c in a.chain if c.index >= 0) if x.node)
    ctx = fx.FixContext(
        precision=trace.precision, mode=trace.mode, status=status, issue=issue, nonfinite=nonfinite,
        chain_nodes=chain_nodes, chain=chain_ops, culprit=culprit, after=_after(a.cause, m), feeds=_feeds(a.cause, m),  # type: ignore[arg-type]  # not None on this path
        fp32_ok=fp32_ok or not trace.precision.is_low,
        collapse=collapse, unscaled_penalty=unscaled is not None, penalty_fp32=penalty_in_fp32(trace),
        weight_growth=_growth(tuple(trace.metrics), first.step) if first is not None else 1.0,
        other={p: s for p, s in context["statuses"].items() if p is not trace.precision}, framework=trace.framework,
        **context["fix_settings"])
    notes = list(a.notes)
    if trace.precision.is_low and not fp32_ok and status is not Status.OK:
        notes.append("fp32 fails too: this is not a precision problem")
    if trace.stopped:
        notes.append(trace.stopped)
    return RunReport(
        precision=trace.precision, mode=trace.mode, status=status,
        precision_problem=trace.precision.is_low and fp32_ok and status is not Status.OK,
        first_issue=issue, first_nonfinite=nonfinite, chain=a.chain, fixes=fx.rank(ctx),
        metrics=tuple(trace.metrics), skipped=_skips(trace), ops=a.ops, findings=a.count,
        notes=tuple(notes), failed_step=first.step if first is not None else None,
        lost_updates=lost_updates(trace), scale_collapse=collapse, unscaled_penalty=unscaled,
        kernels=trace.kernels)


def fix_settings(config: Config, init_ratios: dict, device: str, init_checks: tuple = (),
                 data_problems: tuple = ()) -> dict:
    t, loss = config.train, config.loss
    return {"loss_kind": "custom" if loss.step else loss.kind, "gp_fp32": loss.gp_precision == "fp32",
            "grad_scaler": t.grad_scaler, "grad_clip": t.grad_clip, "optimizer": t.optimizer, "eps": t.eps,
            "lr": t.lr, "init_ratios": init_ratios, "device": device, "init_checks": init_checks,
            "fp32_modules": tuple(config.precision.fp32_modules), "betas": tuple(t.betas),
            "weight_decay": t.weight_decay, "gp_weight": loss.gp_weight, "step_name": _step_name(loss.step),
            "data_problems": data_problems}


def _step_name(step) -> str | None:
    """The user's critic step function's name ("train.py:critic_step" or the function itself)."""
    if step is None:
        return None
    return step.rpartition(":")[2] or None if isinstance(step, str) else getattr(step, "__name__", None)


def analyse_all(measured: dict) -> dict:
    """Analysis per precision (fp32 is the reference); a replay that raised has none: its finding is the error."""
    ref = measured[Precision.FP32]
    return {p: analyse_trace(m, ref) for p, m in measured.items() if m.trace.error is None}


def shared_context(config: Config, measured: dict, analyses: dict, init_ratios: dict, device: str,
                   init_checks: tuple = (), data_problems: tuple = ()) -> dict[str, Any]:
    """What every run's fix ranking shares: fp32's status, each precision's status (error for a replay that
    raised), the config's settings."""
    status_of = raised.statuses({p: m.trace for p, m in measured.items()}, {p: x.status for p, x in analyses.items()})
    return {"fp32_status": status_of[Precision.FP32], "statuses": status_of,
            "fix_settings": fix_settings(config, init_ratios, device, init_checks, data_problems)}


def run_report(m: Measured, analysis: Analysis | None, ctx: dict[str, Any]) -> RunReport:
    """One precision's RunReport: from its analysis, or from the error its replay raised."""
    if analysis is None:
        return raised.errored_run(m.trace, ctx["statuses"], ctx["fix_settings"])
    return build_run(analysis, ctx)


def analyse(config: Config, measured: dict, requested: tuple[Precision, ...],
            init_ratios: dict, device: str, init_checks: tuple = (),
            data_problems: tuple = ()) -> tuple[RunReport, ...]:
    """RunReports for the requested precisions (fp32 is the reference whether requested or not).

    `measured` maps each precision to its Measured replay (a bare Trace is judged on its statistics only).
    A precision whose replay raised gets status `error` (analysis.raised); the others are analysed as usual.
    """
    measured = {p: (m if isinstance(m, Measured) else unmeasured(m)) for p, m in measured.items()}
    analyses = analyse_all(measured)
    ctx = shared_context(config, measured, analyses, init_ratios, device, init_checks, data_problems)
    return tuple(run_report(measured[p], analyses.get(p), ctx) for p in requested)
