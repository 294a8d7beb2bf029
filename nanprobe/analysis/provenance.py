"""Root cause by provenance: walk back from what went wrong, through the ops that produced its inputs.

When a run goes non-finite, the walk starts at the first op that made a non-finite value from finite
inputs. At each op it follows the input that departs from fp32 the most (non-finite first, then the
share of values zeroed, then the relative error; see alignment.OpDelta.departs), looking through casts
and views (they carry their input's values). It stops at the earliest op whose inputs agree with fp32
but whose output does not: the origin. The path from the origin to the non-finite op is the chain.

The culprit is the origin when it lost values to the dtype's range (zeros where fp32 has values). An
origin that only carries rounding error (weights that drifted from fp32's over several steps) leaves the
culprit at the op that made the value non-finite. When the path crosses an add of an eps that rounds to 0
in its dtype, the eps was there to keep the op at the end of the chain finite whatever its input, so the
flush before it is not the cause: in the user's code (a norm's `mean(x*x) + 1e-8` or a minibatch stddev
in a .half() model, F.normalize's clamp_min) the culprit is that add, an underflow; in the optimizer
(Adam's `sqrt(v) + eps`) it is the update that divides by it (`addcdiv_`), the op a user knows.

A non-finite value that nothing training sees inherits (the loss, the penalty, the gradients and the
updates all stay finite: a 0/0 inside a norm's backward that the next op masks) is not a finding.

When the run stays finite, the walk starts at the gradient of the parameter whose gradient is most off
(the effect, see effect.py) and the culprit is the first underflow candidate on the path. Underflow
candidates not on any path are secondary: notes, never the headline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanprobe import thresholds as th
from nanprobe.analysis.alignment import ADDITIVE, Alignment, base, input_max, live
from nanprobe.analysis.effect import Effect, ParamEffect
from nanprobe.engine import stats as st
from nanprobe.engine.probe import OpEvent
from nanprobe.enums import FindingKind, Phase

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_EPS_ADDS = frozenset({"add", "add_", "sub", "sub_", "clamp", "clamp_", "clamp_min", "clamp_min_"})


@dataclass(frozen=True)
class RootCause:
    """Where a precision's problem starts, and the path from there to what training sees."""

    culprit: int
    """The op the headline names (event index)."""
    kind: FindingKind
    """underflow | overflow | nan at the culprit."""
    origin: int
    """The earliest op on the path whose inputs agree with fp32 but whose output does not."""
    path: tuple[int, ...]
    """Event indices from the origin to the end (the first non-finite op, or the gradient that is off)."""
    nonfinite: int | None = None
    """The first op that made inf or NaN from finite inputs (None when the run stayed finite)."""
    guard: int | None = None
    """An op on the path that adds an eps which rounds to 0 in its dtype (None when none)."""
    eps: float | None = None
    """That eps, as written."""
    secondary: tuple[int, ...] = ()
    """Underflow candidates not on the path (notes)."""


def has_nonfinite(e: OpEvent) -> bool:
    return e.row is not None and (e.row[st.NAN] + e.row[st.POSINF] + e.row[st.NEGINF]) > 0


def inputs_nonfinite(e: OpEvent, events: list[OpEvent]) -> tuple[bool, bool]:
    """(any input holds NaN, any input holds inf)."""
    nan = inf = False
    for p in e.producers:
        row = events[p].row
        if row is not None:
            nan |= row[st.NAN] > 0
            inf |= row[st.POSINF] + row[st.NEGINF] > 0
    return nan, inf


def makes_nonfinite(e: OpEvent, events: list[OpEvent]) -> FindingKind | None:
    """NAN or OVERFLOW when this op made a NaN or inf its inputs did not hold; else None."""
    if e.row is None:
        return None
    in_nan, in_inf = inputs_nonfinite(e, events)
    if e.row[st.NAN] > 0 and not in_nan:
        return FindingKind.NAN
    if e.row[st.POSINF] + e.row[st.NEGINF] > 0 and not (in_nan or in_inf):
        return FindingKind.OVERFLOW
    return None


def first_nonfinite_made(events: list[OpEvent]) -> OpEvent | None:
    """The first op (attempts that count) that made inf or NaN from finite inputs."""
    return next((e for e in live(events) if makes_nonfinite(e, events) is not None), None)


def lost_eps(e: OpEvent) -> float | None:
    """The eps this op adds when it rounds to 0 in the op's dtype (1e-8 in fp16), else None."""
    if base(e.op) not in _EPS_ADDS:
        return None
    dt = _DTYPES.get(e.dtype)
    if dt is None or dt is torch.float32 or dt is torch.float64:
        return None
    for s in e.scalars:
        if s != 0 and abs(s) < 1 and float(torch.tensor(s, dtype=dt)) == 0.0:
            return s
    return None


def surviving_eps(e: OpEvent) -> float | None:
    """The eps this op adds when it survives its dtype (an eps already in place), else None."""
    if base(e.op) not in _EPS_ADDS:
        return None
    dt = _DTYPES.get(e.dtype)
    if dt is None:
        return None
    for s in e.scalars:
        if 0 < abs(s) <= 1e-2 and float(torch.tensor(s, dtype=dt)) != 0.0:
            return s
    return None


def walk(start: int, events: list[OpEvent], alignment: Alignment | None) -> tuple[int, ...]:
    """Indices from the origin to `start`, following the most departing input at each op."""
    if alignment is None:
        return (start,)
    memo: dict[int, tuple | None] = {}

    def score(i: int, depth: int = 0) -> tuple | None:
        if i in memo:
            return memo[i]
        memo[i] = None
        d = alignment.delta(i)
        if d is not None:
            s = (d.nonfinite, d.zeroed, d.rel_error or 0.0) if d.departs else None
        elif depth < 64:
            # No fp32 counterpart (an op autocast adds): it passes on whatever its inputs carry.
            ups = [score(p, depth + 1) for p in events[i].producers]
            s = max((u for u in ups if u is not None), default=None)
            s = (False, 0.0, 0.0) if s is not None else None
        else:
            s = None
        memo[i] = s
        return s

    path = [start]
    seen = {start}
    cur = start
    while True:
        best, best_s = None, None
        for p in events[cur].producers:
            if p in seen:
                continue
            s = score(p)
            if s is not None and (best_s is None or s > best_s):
                best, best_s = p, s
        if best is None:
            break
        path.append(best)
        seen.add(best)
        cur = best
    return tuple(reversed(path))


def _guard(path: tuple[int, ...], events: list[OpEvent],
           alignment: Alignment | None) -> tuple[int | None, float | None]:
    for i in path:
        eps = lost_eps(events[i])
        d = alignment.delta(i) if alignment is not None else None
        if eps is not None and (d is None or d.zeroed > 0 or d.nonfinite or events[i].row[st.ZEROS] > 0):  # type: ignore[index]  # rows are fetched before analysis
            return i, eps
    return None, None


def _secondary(path: tuple[int, ...], alignment: Alignment | None) -> tuple[int, ...]:
    if alignment is None:
        return ()
    on = set(path)
    return tuple(i for i, d in sorted(alignment.deltas.items()) if d.candidate and i not in on)


def _grad_start(param: str, step: int, events: list[OpEvent]) -> int | None:
    """The last backward op of the parameter's module in that step: the one that produced its gradient."""
    module = param.rsplit(".", 1)[0]
    hit = None
    for e in live(events):
        if e.step == step and e.phase is Phase.BACKWARD and e.module == module:
            hit = e.index
    return hit


def gradient_path(p: ParamEffect, events: list[OpEvent], alignment: Alignment,
                  grad_ops: dict | None = None) -> tuple[int, ...] | None:
    """The walk back from the op that made `p`'s gradient (the recorder's, else its module's last backward op)."""
    start = (grad_ops or {}).get(p.step, {}).get(p.param)
    if start is None:
        start = _grad_start(p.param, p.step, events)
    return None if start is None else walk(start, events, alignment)


def nonfinite_cause(events: list[OpEvent], alignment: Alignment | None) -> RootCause | None:
    """The root cause of the first non-finite value, or None when the run stayed finite."""
    f = first_nonfinite_made(events)
    if f is None:
        return None
    kind_f = makes_nonfinite(f, events)
    path = walk(f.index, events, alignment)
    origin = path[0]
    guard, eps = _guard(path, events, alignment)
    d = alignment.delta(origin) if alignment is not None else None
    lost_range = d is not None and (d.zeroed > 0 or d.flushed > 0)
    if guard is not None and events[guard].phase is not Phase.OPTIMIZER:
        # The user's own `+ eps` (a norm, a minibatch stddev, F.normalize's clamp): the add that rounds it away.
        culprit, kind = guard, FindingKind.UNDERFLOW
    elif guard is not None or origin == f.index or not lost_range:
        # An origin that only carries rounding error (weights that drifted from fp32's over the steps, a long
        # chain of roundings) did not make the value non-finite by itself: the op that did is the culprit.
        culprit, kind = f.index, kind_f  # type: ignore[assignment]  # not None on this path
    else:
        culprit, kind = origin, FindingKind.UNDERFLOW
    return RootCause(culprit, kind, origin, path, f.index, guard, eps, _secondary(path, alignment))


def underflow_cause(events: list[OpEvent], alignment: Alignment | None, effect: Effect | None,
                    grad_ops: dict | None = None) -> RootCause | None:
    """For a finite run: the underflow that changes what training sees (effect.any_off), or None."""
    if alignment is None or effect is None or not effect.any_off:
        return None
    candidates = [i for i, d in sorted(alignment.deltas.items()) if d.candidate]
    lost_params = {name for name, _ in effect.lost_updates}
    hit = _lost_write(lost_params, events) if lost_params else None
    if hit is not None:
        return RootCause(hit, FindingKind.UNDERFLOW, hit, (hit,), secondary=tuple(candidates))
    for p in effect.off_params:
        path = gradient_path(p, events, alignment, grad_ops)
        if path is None:
            continue
        # A candidate explains the gradient's error only if it loses values itself (zeros where fp32 has values) or
        # adds error beyond tolerance; one that passes on error carried from weights that drifted over the steps
        # is on the path by chance.
        on = [i for i in path if (d := alignment.delta(i)) is not None and d.candidate
              and (d.zeroed > 0 or d.added > alignment.tolerance)]
        end = alignment.delta(path[0])
        # The walk ended where values below the smallest normal start to flush: an underflow when most of that
        # op's zeros are such values. Zeros where fp32's values are well inside the range are a sum cancelling.
        if not on and end is not None and end.flushed > 0 and 2 * end.flushed > end.zeroed:
            on = [path[0]]
        if on:
            culprit = on[0]
            return RootCause(culprit, FindingKind.UNDERFLOW, path[0], tuple(i for i in path if i >= culprit),
                             secondary=tuple(i for i in candidates if i not in set(path)))
    scalars_off = any(s is not None and s.off for s in (effect.loss, effect.penalty))
    if scalars_off and candidates:
        culprit = max(candidates, key=lambda i: (alignment.delta(i).lost, -i))  # type: ignore[union-attr]  # an aligned op has a delta
        return RootCause(culprit, FindingKind.UNDERFLOW, culprit, (culprit,),
                         secondary=tuple(i for i in candidates if i != culprit))
    return None


@dataclass(frozen=True)
class CancellingSum:
    """The sum on a parameter's gradient path whose fp32 result is much smaller than its terms."""

    op: int
    """Index of the sum among the low precision's events."""
    factor: float
    """Its largest input over its fp32 result: how many times the terms' relative rounding grows in the sum."""


def cancelling_sum(p: ParamEffect, events: list[OpEvent], ref_events: list[OpEvent], alignment: Alignment,
                   grad_ops: dict | None = None) -> CancellingSum | None:
    """The most cancelling sum on the path of `p`'s gradient, or None where no sum there cancels.

    A sum whose result is k times smaller than its terms keeps k times less of the dtype's precision: terms
    rounded to eps/2 give a result good to k eps/2. The autograd engine adds a parameter's gradients from each
    use in the low dtype (the real and the fake half of a WGAN loss), so where those nearly cancel, as at a
    critic's initialisation, the low precision's gradient is rounding noise without any value leaving the range.
    """
    path = gradient_path(p, events, alignment, grad_ops)
    if path is None:
        return None
    # The walk follows inputs that depart from fp32, and a sum that cancels does not (its error is its terms'
    # rounding), so the sums feeding the path are looked at too.
    best = None
    for i in sorted(set(path).union(*(events[j].producers for j in path))):
        d = alignment.delta(i)
        if d is None or base(events[i].op) not in ADDITIVE:
            continue
        r = ref_events[d.ref]
        out, terms = r.row[st.MAX_ABS], input_max(r, ref_events)  # type: ignore[index]  # rows are fetched before analysis
        if out > 0 and terms > out and (best is None or terms / out > best.factor):
            best = CancellingSum(i, terms / out)
    return best


def _lost_write(params: set, events: list[OpEvent]) -> int | None:
    """The first optimizer write (execution order) that left too many of its parameter's weights unchanged."""
    for e in live(events):
        lost = (e.info or {}).get("lost_updates")
        if lost is not None and lost["param"] in params and lost["share"] >= th.LOST_UPDATE_SHARE:
            return e.index
    return None
