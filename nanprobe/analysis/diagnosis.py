"""From replay traces to verdicts: the first op that underflows or overflows, the first non-finite
value, the chain between them, and the fixes.

Underflow is judged against the fp32 replay of the same step. Ops are aligned on
(step, phase, module, source line, op, occurrence), not on their index, because autocast adds
casts that fp32 does not have. An op underflows when at least UNDERFLOW_SHARE of its values are
non-zero in fp32 but zero or subnormal in the low precision, and the fp32 values reach down into
the low dtype's subnormal range. A sum or difference whose fp32 result is below one low-precision
ulp of its inputs has cancelled, not underflowed (D(fake) - D(real) of a critic at init), and is
not a finding.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from nanprobe.analysis import fixes as fx
from nanprobe.engine import stats as st
from nanprobe.io.config import Config
from nanprobe.enums import FindingKind, Phase, Precision, Status
from nanprobe.engine.probe import OpEvent
from nanprobe.engine.replay import Trace
from nanprobe.model.report import ChainLink, Finding, LostUpdates, RunReport, SkippedAttempt
from nanprobe.engine.stats import TensorStats

UNDERFLOW_SHARE = 0.05
"""Share of an op's values lost to zero or subnormals that makes an underflow finding."""
UNDERFLOW_RANGE = 2.0
"""The fp32 reference's smallest non-zero |x| must be below this many smallest normals of the low dtype."""
CHAIN_MAX = 8
"""Longer chains keep their first three and last four links."""
LOST_UPDATE_SHARE = 0.25
"""Share of a parameter's moving elements left unchanged by the optimizer step that makes an underflow finding."""
SCALE_FLOOR = 1.0
"""A GradScaler scale below this shrinks gradients instead of protecting them: the scale has collapsed."""

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
_ADDITIVE = frozenset({"add", "add_", "sub", "sub_", "rsub", "sum", "mean", "addcmul", "addcmul_", "lerp", "lerp_"})


def _key_events(events: list[OpEvent]) -> dict[tuple, OpEvent]:
    seen: dict[tuple, int] = defaultdict(int)
    keyed = {}
    for e in events:
        base = (e.step, e.phase, e.module, e.source, e.op)
        keyed[base + (seen[base],)] = e
        seen[base] += 1
    return keyed


def _aligned(events: list[OpEvent], ref: dict[tuple, OpEvent]) -> dict[int, OpEvent]:
    seen: dict[tuple, int] = defaultdict(int)
    out = {}
    for e in events:
        base = (e.step, e.phase, e.module, e.source, e.op)
        hit = ref.get(base + (seen[base],))
        seen[base] += 1
        if hit is not None and hit.shape == e.shape:
            out[e.index] = hit
    return out


def align(events: list[OpEvent], ref_events: list[OpEvent]) -> dict[int, OpEvent]:
    """The fp32 op each recorded low-precision op lines up with, by the low op's index (skipped attempts left out)."""
    def live(evs):
        return [e for e in evs if not e.skipped and e.row is not None]

    return _aligned(live(events), _key_events(live(ref_events)))


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.3g}"


def _underflow(e: OpEvent, r: OpEvent, in_max: float) -> tuple[float, str] | None:
    dt = _LOW_DTYPES.get(e.dtype)
    if dt is None or r.row is None:
        return None
    lo, hi = e.row, r.row
    lost = max(0.0, lo[st.ZEROS] - hi[st.ZEROS]) + lo[st.SUBNORMAL]
    share = lost / max(lo[st.NUMEL], 1.0)
    info = torch.finfo(dt)
    tiny = info.smallest_normal
    if share < UNDERFLOW_SHARE or hi[st.MIN_NONZERO] >= UNDERFLOW_RANGE * tiny:
        return None
    if e.op.split(".")[1] in _ADDITIVE and hi[st.MAX_ABS] < info.eps * in_max:
        return None
    name = "fp16" if dt is torch.float16 else "bf16"
    detail = (f"{share:.0%} of its {int(lo[st.NUMEL])} values are 0 or subnormal in {name} but non-zero in fp32 "
              f"(fp32 |x| from {_fmt(hi[st.MIN_NONZERO])} to {_fmt(hi[st.MAX_ABS])}; {name}: {int(lo[st.ZEROS])} zeros, "
              f"{int(lo[st.SUBNORMAL])} subnormals, smallest normal {tiny:.3g})")
    return share, detail


def _inputs(e: OpEvent, by_index: list[OpEvent]) -> tuple[bool, bool, float]:
    nan = inf = False
    mx = 0.0
    for p in e.producers:
        row = by_index[p].row
        if row is None:
            continue
        nan |= row[st.NAN] > 0
        inf |= row[st.POSINF] + row[st.NEGINF] > 0
        mx = max(mx, row[st.MAX_ABS])
    return nan, inf, mx


def cancelled(e: OpEvent, ref: OpEvent, events: list[OpEvent], eps: float) -> bool:
    """A sum or difference whose fp32 result is below eps times its inputs: cancellation, not precision loss."""
    return e.op.split(".")[1] in _ADDITIVE and ref.row[st.MAX_ABS] < eps * _inputs(e, events)[2]


def _describe_nonfinite(e: OpEvent, in_nan: bool, in_inf: bool, in_max: float) -> str:
    r = e.row
    parts = []
    if r[st.NAN]:
        parts.append(f"{int(r[st.NAN])} NaN")
    if r[st.POSINF]:
        parts.append(f"{int(r[st.POSINF])} +inf")
    if r[st.NEGINF]:
        parts.append(f"{int(r[st.NEGINF])} -inf")
    made = " and ".join(parts) + f" of {int(r[st.NUMEL])} values"
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
    if why is None and e.phase is Phase.OPTIMIZER and e.op.split(".")[1] in _DIVIDING and not (in_nan or in_inf):
        why = "the optimizer divides by sqrt(v) + eps, which is 0 where v is 0 unless eps survives " + e.dtype
    if why is None and dt is not None and (r[st.POSINF] or r[st.NEGINF]) and not (in_nan or in_inf):
        why = f"{e.dtype} max is {torch.finfo(dt).max:.6g}"
    node = f" in {e.node}" if e.node else ""
    return f"{made} from {src}{node}" + (f": {why}" if why else "")


def _numbers(e: OpEvent, ref: OpEvent | None, by_index: list[OpEvent], share: float | None = None) -> dict:
    d = {"observed": TensorStats.of(e.row).__dict__ if e.row else None,
         "reference": TensorStats.of(ref.row).__dict__ if ref is not None and ref.row else None,
         "producer_ops": [by_index[p].op for p in e.producers]}
    if share is not None:
        d["lost_share"] = round(share, 4)
    if e.info:
        d.update(e.info)
    return d


def _finding(e: OpEvent, kind: FindingKind | None, detail: str, numbers: dict) -> Finding:
    return Finding(kind, e.op, e.module, e.phase, e.step, e.source, detail, e.node, e.dtype, numbers, e.index, e.param)


def _lost_update(e: OpEvent) -> tuple[float, str] | None:
    """An optimizer write that left too many of its weights unchanged (the update was rounded away)."""
    lost = (e.info or {}).get("lost_updates")
    if lost is None or e.dtype not in _LOW_DTYPES or lost["share"] < LOST_UPDATE_SHARE:
        return None
    eps = torch.finfo(_LOW_DTYPES[e.dtype]).eps
    detail = (f"the update of {lost['lost']} of {lost['elements']} elements of {lost['param']} ({lost['share']:.0%}) "
              f"was lost: below half an ulp of the {e.dtype} weight ({eps / 4:.2g} to {eps / 2:.2g} of |w|), "
              f"so w + update == w")
    return lost["share"], detail


def _chain(first: OpEvent, last: OpEvent, by_index: list[OpEvent]) -> list[OpEvent]:
    """The data path from `first` to `last` through producer links (both ends when unlinked)."""
    if first.index == last.index:
        return [first]
    parent: dict[int, int] = {}
    stack = [last.index]
    seen = {last.index}
    while stack:
        i = stack.pop()
        if i == first.index:
            path = [i]
            while path[-1] != last.index:
                path.append(parent[path[-1]])
            return [by_index[j] for j in path]
        for p in by_index[i].producers:
            if p >= first.index and p not in seen:
                seen.add(p)
                parent[p] = i
                stack.append(p)
    return [first, last]


def _link(e: OpEvent) -> ChainLink:
    r = e.row
    summary = (f"max |x| {r[st.MAX_ABS]:.3g}, zeros {int(r[st.ZEROS])}/{int(r[st.NUMEL])}, "
               f"inf {int(r[st.POSINF] + r[st.NEGINF])}, nan {int(r[st.NAN])}")
    return ChainLink(e.op, e.module, e.phase, e.step, summary, e.index)


def _shorten(links: list[ChainLink]) -> tuple[ChainLink, ...]:
    if len(links) <= CHAIN_MAX:
        return tuple(links)
    gap = len(links) - 7
    marker = ChainLink("...", "", links[3].phase, links[3].step, f"{gap} ops left out", -1)
    return tuple(links[:3] + [marker] + links[-4:])


def analyse_trace(trace: Trace, ref: Trace | None) -> dict:
    """Findings of one trace (fp32 or low, against fp32)."""
    by_index = trace.events
    live = [e for e in by_index if not e.skipped and e.row is not None]
    aligned = _aligned(live, _key_events([e for e in ref.events if not e.skipped and e.row is not None])) \
        if ref is not None and trace.precision.is_low else {}
    first_issue = first_nonfinite = None
    worst = Status.OK
    count = 0
    kinds: dict[FindingKind, int] = defaultdict(int)
    for e in live:
        in_nan, in_inf, in_max = _inputs(e, by_index)
        kind, detail, share = None, "", None
        if e.has_nan and not in_nan:
            kind = FindingKind.NAN
        elif e.has_inf and not in_inf and not in_nan:
            kind = FindingKind.OVERFLOW
        elif e.phase is Phase.OPTIMIZER and not (e.has_nan or e.has_inf) and _lost_update(e) is not None:
            kind = FindingKind.UNDERFLOW
            share, detail = _lost_update(e)
        elif e.index in aligned and not (e.has_nan or e.has_inf):
            hit = _underflow(e, aligned[e.index], in_max)
            if hit is not None:
                kind = FindingKind.UNDERFLOW
                share, detail = hit
        if kind is not None and kind is not FindingKind.UNDERFLOW:
            detail = _describe_nonfinite(e, in_nan, in_inf, in_max)
        if kind is not None:
            count += 1
            kinds[kind] += 1
            if Status.of(kind).severity > worst.severity:
                worst = Status.of(kind)
            if first_issue is None:
                first_issue = (e, kind, detail, share)
        if first_nonfinite is None and (e.has_nan or e.has_inf):
            first_nonfinite = (e, in_nan, in_inf, in_max)
    collapse = scale_collapse(trace)
    if collapse is not None and Status.of(collapse.kind).severity > worst.severity:
        worst = Status.of(collapse.kind)
    return {"issue": first_issue, "nonfinite": first_nonfinite, "status": worst, "count": count,
            "kinds": dict(kinds), "aligned": aligned, "ops": len(live), "collapse": collapse}


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
    SCALE_FLOOR.
    """
    metrics = trace.metrics
    if not metrics or metrics[0].scale is None:
        return None
    persistent = [m.step for m in metrics if m.skipped]
    skip_steps = {s for s, _, _ in trace.skipped} | set(persistent)
    tried = [sc for _, _, sc in trace.skipped] + [m.scale for m in metrics]
    every = len(metrics) >= 2 and len(skip_steps) == len(metrics)
    if not (persistent or every or min(tried) < SCALE_FLOOR):
        return None
    bad = [_first_bad(trace, s, a) for s, a, _ in trace.skipped] + [_first_bad(trace, s, None) for s in persistent]
    bad = [e for e in bad if e is not None]
    if not bad:
        return None
    counts: dict[tuple, list[OpEvent]] = defaultdict(list)
    for e in bad:
        counts[(e.phase, e.module, e.source, e.op, e.node)].append(e)
    events = max(counts.values(), key=len)
    e = events[0]
    if e.phase is Phase.DATA:
        return None  # bad data makes every step non-finite: the data finding says it, not the scaler
    cause = _cause(e, trace.events)
    start = trace.skipped[0][2] if trace.skipped else metrics[0].scale
    never = f"; step(s) {', '.join(map(str, persistent))} never recovered" if persistent else ""
    what = "NaN" if cause.kind is FindingKind.NAN else "inf"
    detail = (f"GradScaler skipped {len(bad)} attempt(s) in {len(skip_steps)} of {len(metrics)} step(s){never}; "
              f"the scale fell from {start:g} to {min(tried):g}. {len(events)} of the {len(bad)} skips came from "
              f"{e.op.removeprefix('aten.').rsplit('.', 1)[0]}{f' ({e.node})' if e.node else ''} in "
              f"{e.module or '(outside modules)'} making {what} ({cause.detail}): loss scaling cannot fix an op "
              f"that overflows at every scale")
    return Finding(cause.kind, e.op, e.module, e.phase, e.step, e.source, detail, e.node, e.dtype,
                   {"skipped_attempts": len(bad), "skipped_steps": sorted(skip_steps), "never_recovered": persistent,
                    "scale_start": start, "scale_lowest": min(tried), "cause_count": len(events)}, e.index, e.param)


def unscaled_penalty(trace: Trace) -> Finding | None:
    """A torch.autograd.grad call on outputs the GradScaler did not scale, in an fp16 run (bf16 needs no scaling)."""
    if trace.precision is not Precision.FP16 or not trace.unscaled_grads:
        return None
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


def build_run(trace: Trace, found: dict, context: dict) -> RunReport:
    """One precision's RunReport from its findings and the context shared by all runs."""
    by_index = trace.events
    issue = nonfinite = None
    chain: tuple[ChainLink, ...] = ()
    if found["issue"] is not None:
        e, kind, detail, share = found["issue"]
        issue = _finding(e, kind, detail, _numbers(e, found["aligned"].get(e.index), by_index, share))
    if found["nonfinite"] is not None:
        e, in_nan, in_inf, in_max = found["nonfinite"]
        kind = FindingKind.NAN if e.has_nan and not in_nan else (FindingKind.OVERFLOW if not (in_inf or in_nan) else None)
        nonfinite = _finding(e, kind, _describe_nonfinite(e, in_nan, in_inf, in_max),
                             _numbers(e, found["aligned"].get(e.index), by_index))
        if found["issue"] is not None:
            path = _chain(found["issue"][0], e, by_index)
            chain = _shorten([_link(x) for x in path])
    status = found["status"]
    collapse = found["collapse"]
    issue = issue or collapse
    unscaled = unscaled_penalty(trace)
    first = issue or nonfinite
    fp32_ok = context["fp32_status"] is Status.OK
    chain_nodes = tuple(x.node for x in (by_index[c.index] for c in chain if c.index >= 0) if x.node)
    ctx = fx.FixContext(
        precision=trace.precision, mode=trace.mode, status=status, issue=issue, nonfinite=nonfinite,
        chain_nodes=chain_nodes, fp32_ok=fp32_ok or not trace.precision.is_low, collapse=collapse,
        unscaled_penalty=unscaled is not None,
        weight_growth=_growth(tuple(trace.metrics), first.step) if first is not None else 1.0,
        other={p: s for p, s in context["statuses"].items() if p is not trace.precision}, framework=trace.framework,
        **context["fix_settings"])
    notes = []
    if trace.precision.is_low and not fp32_ok and status is not Status.OK:
        notes.append("fp32 fails too: this is not a precision problem")
    if trace.stopped:
        notes.append(trace.stopped)
    return RunReport(
        precision=trace.precision, mode=trace.mode, status=status,
        precision_problem=trace.precision.is_low and fp32_ok and status is not Status.OK,
        first_issue=issue, first_nonfinite=nonfinite, chain=chain, fixes=fx.rank(ctx),
        metrics=tuple(trace.metrics), skipped=_skips(trace), ops=found["ops"], findings=found["count"],
        notes=tuple(notes), failed_step=first.step if first is not None else None,
        lost_updates=lost_updates(trace), scale_collapse=collapse, unscaled_penalty=unscaled,
        kernels=trace.kernels)


def fix_settings(config: Config, init_ratios: dict, device: str, init_checks: tuple = ()) -> dict:
    t, loss = config.train, config.loss
    return {"loss_kind": "custom" if loss.step else loss.kind, "gp_fp32": loss.gp_precision == "fp32",
            "grad_scaler": t.grad_scaler, "grad_clip": t.grad_clip, "optimizer": t.optimizer, "eps": t.eps,
            "lr": t.lr, "init_ratios": init_ratios, "device": device, "init_checks": init_checks,
            "fp32_modules": tuple(config.precision.fp32_modules)}


def analyse(config: Config, traces: dict[Precision, Trace], requested: tuple[Precision, ...],
            init_ratios: dict, device: str, init_checks: tuple = ()) -> tuple[RunReport, ...]:
    """RunReports for the requested precisions (fp32 is the reference whether requested or not)."""
    ref = traces[Precision.FP32]
    found = {p: analyse_trace(t, ref) for p, t in traces.items()}
    context = {"fp32_status": found[Precision.FP32]["status"],
               "statuses": {p: f["status"] for p, f in found.items()},
               "fix_settings": fix_settings(config, init_ratios, device, init_checks)}
    return tuple(build_run(traces[p], found[p], context) for p in requested)
