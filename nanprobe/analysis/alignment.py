"""Alignment: each low-precision op paired with its fp32 op, and how far its output departs from fp32's.

Computed once per low-precision replay and shared by `diagnose`, `compare-precisions`, `--verify-fix`
and `watch`. Ops are paired on (step, phase, module, source line, op, occurrence), not on their index,
because autocast adds casts that fp32 does not have. A cast with no fp32 counterpart is compared with
its input's fp32 op (casts and views carry their input's values), so a flush made by the cast itself is
seen at the cast.

An op departs from fp32 when its output holds inf or NaN where fp32's is finite, holds zeros where
fp32's values are non-zero, or has a relative error above DEPARTURE of its dtype. Sums and
differences that cancel in fp32 (result below one low-precision eps of their inputs) depart only by
their zeros or non-finite values: their large relative error is the inputs' rounding.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from nanprobe import thresholds as th
from nanprobe.engine import stats as st
from nanprobe.engine.probe import OpEvent
from nanprobe.enums import Phase

_LOW = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_CASTS = frozenset({"_to_copy", "clone", "copy_", "to", "contiguous", "_unsafe_view", "view", "reshape", "expand",
                    "_reshape_alias", "t", "transpose", "permute", "squeeze", "unsqueeze", "flatten"})
ADDITIVE = frozenset({"add", "add_", "sub", "sub_", "rsub", "sum", "mean", "addcmul", "addcmul_", "lerp", "lerp_"})


def base(op: str) -> str:
    """'aten.add_.Tensor' -> 'add_'."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 3 or (len(parts) == 2 and parts[0] == "aten") else parts[0]


def is_cast(e: OpEvent) -> bool:
    """A cast, copy or reshape: it carries its input's values (the rules and the walk look through it)."""
    return base(e.op) in _CASTS


def sample(t: torch.Tensor) -> torch.Tensor:
    """th.SAMPLE values of t at a fixed stride, as a float32 copy (the same positions for the same shape)."""
    n = t.numel()
    stride = max(1, n // th.SAMPLE)
    t = t.detach()
    if t.is_contiguous():
        # A strided view of the values and one copy; copy=True because a float32 view would otherwise be
        # kept as it is, and change with the tensor.
        return t.reshape(-1)[:stride * th.SAMPLE:stride].to(torch.float32, copy=True)
    # take() reads only the sampled positions (row-major, as reshape(-1) would number them); reshape copies
    # the whole tensor when it is not contiguous (a permuted or channels-last output).
    return torch.take(t, _positions(min(n, stride * th.SAMPLE), stride, t.device)).to(torch.float32)


@functools.lru_cache(maxsize=64)
def _positions(end: int, stride: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, end, stride, device=device)


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


def zeroed_where(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Where x is exactly 0 and ref is finite and non-zero (both on the CPU)."""
    x, ref = x.cpu(), ref.cpu()
    return (x == 0) & (ref != 0) & torch.isfinite(ref)


def zeroed_share(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of values exactly 0 in x where ref is non-zero."""
    return float(zeroed_where(x, ref).sum()) / max(x.numel(), 1)


_BATCH = 256
"""Samples compared at once: 256 rows of 4096 float64 values, 8 MiB a side, whatever the model's size."""


def compare_samples(items: list[tuple[torch.Tensor, torch.Tensor, float]]) -> list[tuple[float | None, float, float]]:
    """(relative_error, zeroed_share, flushed_share) of each (x, ref, tiny), computed a batch at a time.

    Samples of one length are stacked and reduced along their rows: a row of a stacked batch sums in
    the same order as the row alone, so the numbers are those of one call each, bit for bit, for a
    fraction of the calls. A pair whose fp32 sample holds inf or NaN goes on its own, because
    relative_error leaves those positions out.
    """
    out: list = [None] * len(items)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (x, _, _) in enumerate(items):
        by_length[x.numel()].append(i)
    batches = [same[i:i + _BATCH] for same in by_length.values() for i in range(0, len(same), _BATCH)]
    for idx in batches:
        xs = torch.stack([items[i][0].reshape(-1) for i in idx]).cpu()
        refs = torch.stack([items[i][1].reshape(-1) for i in idx]).cpu()
        tiny = torch.tensor([items[i][2] for i in idx], dtype=torch.float64).unsqueeze(1)
        x, ref = xs.double(), refs.double()
        ref_finite = torch.isfinite(ref)
        zero = x == 0
        a = ref.abs()
        zeroed = (zero & (ref != 0) & ref_finite).sum(1).tolist()
        flushed = (zero & (a > 0) & (a < tiny)).sum(1).tolist()
        whole = ref_finite.all(1).tolist()
        x_finite = torch.isfinite(x).all(1).tolist()
        den = torch.linalg.vector_norm(ref, dim=1).tolist()
        num = torch.linalg.vector_norm(x - ref, dim=1).tolist()
        n = max(x.shape[1], 1)
        for row, i in enumerate(idx):
            if not whole[row]:
                rel = relative_error(items[i][0], items[i][1])
            elif not x_finite[row]:
                rel = math.inf
            else:
                rel = None if den[row] == 0.0 else num[row] / den[row]
            out[i] = (rel, zeroed[row] / n, flushed[row] / n)
    return out


class Recorder:
    """Keeps a sample of each recorded op's output and of each step's parameter gradients, and which op
    produced each gradient."""

    def __init__(self) -> None:
        from torch.utils.weak import WeakTensorKeyDictionary

        self.samples: dict[int, torch.Tensor] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.grad_ops: dict[int, dict[str, int]] = {}
        """step -> parameter -> index of the op whose output is that parameter's gradient."""
        self._made = WeakTensorKeyDictionary()
        self._last: dict[tuple, int] = {}

    def on_record(self, event: OpEvent, outs: list[torch.Tensor]) -> None:
        self.samples[event.index] = sample(outs[0])
        for t in outs:
            self._made[t] = event.index
        if event.phase is Phase.BACKWARD:
            self._last[(event.module, event.shape)] = event.index

    def on_grads(self, step: int, grads: dict[str, torch.Tensor]) -> None:
        self.grads[step] = {name: sample(g) for name, g in grads.items()}
        made = {}
        for name, g in grads.items():
            # A gradient the autograd engine copied on its way into .grad (a transposed Linear weight's is) is not
            # an op's output: the module's last backward op of the gradient's shape made it.
            i = self._made.get(g, self._last.get((name.rsplit(".", 1)[0], tuple(g.shape))))
            if i is not None:
                made[name] = i
        self.grad_ops[step] = made


@dataclass(frozen=True)
class OpDelta:
    """One low-precision op against its fp32 op."""

    index: int
    """The low-precision op (position in its replay)."""
    ref: int
    """The fp32 op it is compared with (its own pair, or its input's for a cast fp32 does not have)."""
    rel_error: float | None
    """||x - x_fp32|| / ||x_fp32|| over the sampled values (None without samples or where fp32 is all 0)."""
    added: float
    """The part of rel_error this op adds to the largest error its inputs carry."""
    zeroed: float
    """Share of its values exactly 0 where fp32's are non-zero."""
    flushed: float
    """Share of its values 0 where fp32's are non-zero and below the dtype's smallest normal."""
    lost: float
    """Share of its values 0 or subnormal where fp32's are non-zero (whole tensor, from the statistics)."""
    nonfinite: bool
    """inf or NaN where fp32 is finite."""
    cancelled: bool
    """A sum or difference that cancels in fp32: its error is its inputs' rounding."""
    candidate: bool
    """An underflow candidate: lost >= UNDERFLOW_SHARE and fp32's values reach into the dtype's subnormal range."""
    departs: bool
    """Its output departs from fp32 (non-finite, zeros where fp32 is non-zero, or rel_error above tolerance)."""


@dataclass(frozen=True)
class Alignment:
    """A low-precision replay lined up with fp32's."""

    dtype_eps: float
    """eps of the low dtype."""
    tolerance: float
    """Relative error above which an op departs (DEPARTURE eps, plus fp32 noise)."""
    pairs: dict = field(default_factory=dict)
    """Low op index -> fp32 op index (ops fp32 also ran)."""
    deltas: dict = field(default_factory=dict)
    """Low op index -> OpDelta (aligned ops and the casts compared through their input)."""

    def delta(self, index: int) -> OpDelta | None:
        return self.deltas.get(index)


def live(events: list[OpEvent]) -> list[OpEvent]:
    """Ops of the attempts that count (skipped attempts left out) whose statistics were taken."""
    return [e for e in events if not e.skipped and e.row is not None]


def _keys(events: list[OpEvent]):
    seen: dict[tuple, int] = defaultdict(int)
    for e in events:
        k = (e.step, e.phase, e.module, e.source, e.op)
        yield e, k + (seen[k],)
        seen[k] += 1


def pair(events: list[OpEvent], ref_events: list[OpEvent]) -> dict[int, int]:
    """The fp32 op each recorded low-precision op lines up with (by index), skipped attempts left out."""
    ref = {k: e for e, k in _keys(live(ref_events))}
    out = {}
    for e, k in _keys(live(events)):
        hit = ref.get(k)
        if hit is not None and hit.shape == e.shape:
            out[e.index] = hit.index
    return out


def input_max(e: OpEvent, events: list[OpEvent]) -> float:
    return max((events[p].row[st.MAX_ABS] for p in e.producers if events[p].row is not None), default=0.0)


def cancelled(e: OpEvent, ref: OpEvent, events: list[OpEvent], eps: float) -> bool:
    """A sum or difference whose fp32 result is below eps times its inputs: cancellation, not precision loss."""
    return base(e.op) in ADDITIVE and ref.row[st.MAX_ABS] < eps * input_max(e, events)  # type: ignore[index]  # rows are fetched before analysis


def _finite(row) -> bool:
    return row[st.NAN] + row[st.POSINF] + row[st.NEGINF] == 0


def _tiny(e: OpEvent) -> float:
    """The smallest normal of the op's low dtype (fp32's for an op autocast left in fp32)."""
    return torch.finfo(_LOW.get(e.dtype, torch.float32)).smallest_normal


def _sample_measures(events: list[OpEvent], refs: dict[int, int], rec: Recorder | None, ref_rec: Recorder | None,
                     ratios: dict) -> dict[int, tuple]:
    """Low op index -> (rel_error, zeroed, flushed) from the samples, for the paired ops whose samples match."""
    if rec is None or ref_rec is None:
        return {}
    keys, items = [], []
    for i, r_idx in refs.items():
        x, y = rec.samples.get(i), ref_rec.samples.get(r_idx)
        if x is None or y is None or x.shape != y.shape:
            continue
        e = events[i]
        f = ratios.get((e.step, e.phase), 1.0)
        keys.append(i)
        items.append((x / f if f != 1.0 else x, y, _tiny(e)))
    return dict(zip(keys, compare_samples(items)))


def scale_ratios(metrics, ref_metrics, penalty_scaled: bool) -> dict:
    """(step, phase) -> this replay's GradScaler scale over fp32's, for the phases whose values carry the scale.

    A low precision that skipped a step retries it at a lower scale than fp32's replay ran at, so its backward
    values are smaller by that ratio without being wrong. The input gradient carries the scale only when the
    penalty follows the AMP recipe (its outputs scaled before autograd.grad).
    """
    ref = {m.step: m.scale for m in ref_metrics}
    out = {}
    for m in metrics:
        r = ref.get(m.step)
        if m.scale and r:
            out[(m.step, Phase.BACKWARD)] = m.scale / r
            if penalty_scaled:
                out[(m.step, Phase.INPUT_GRAD)] = m.scale / r
    return out


def align(events: list[OpEvent], ref_events: list[OpEvent], rec: Recorder | None = None,
          ref_rec: Recorder | None = None, ratios: dict | None = None) -> Alignment:
    """Pair the ops and measure each one's departure from fp32 (samples when recorded, else the statistics).

    `ratios` (scale_ratios) brings values that carry a different loss scale than fp32's to fp32's scale.
    """
    low_dtype = next((_LOW[e.dtype] for e in events if e.dtype in _LOW), torch.float16)
    info = torch.finfo(low_dtype)
    tol = th.tolerance(info.eps, th.DEPARTURE)
    pairs = pair(events, ref_events)
    refs: dict[int, int] = {}
    for e in live(events):
        r_idx = pairs.get(e.index)
        if r_idx is None and is_cast(e) and e.producers:
            r_idx = refs.get(e.producers[0])  # a cast fp32 does not have: compare with its input's fp32 values
        if r_idx is not None:
            refs[e.index] = r_idx
    measured = _sample_measures(events, refs, rec, ref_rec, ratios or {})
    deltas: dict[int, OpDelta] = {}
    carried: dict[int, float] = {}
    for e in live(events):
        inherited = max((carried.get(p, 0.0) for p in e.producers), default=0.0)
        r_idx = refs.get(e.index)
        if r_idx is None:
            carried[e.index] = inherited
            continue
        r = ref_events[r_idx]
        lo, hi = e.row, r.row
        n = max(lo[st.NUMEL], 1.0)  # type: ignore[index]  # rows are fetched before analysis
        dt = _LOW.get(e.dtype)
        tiny = _tiny(e)
        nonfinite = not _finite(lo) and _finite(hi)
        f = (ratios or {}).get((e.step, e.phase), 1.0)
        if e.index in measured:
            rel, zeroed, flushed = measured[e.index]
        else:
            rel = None
            if _finite(lo) and _finite(hi) and hi[st.MAX_ABS] > 0:  # type: ignore[index]  # rows are fetched before analysis
                rel = abs(lo[st.MAX_ABS] / f - hi[st.MAX_ABS]) / hi[st.MAX_ABS]  # type: ignore[index]  # rows are fetched before analysis
            zeroed = max(0.0, lo[st.ZEROS] - hi[st.ZEROS]) / n  # type: ignore[index]  # rows are fetched before analysis
            flushed = zeroed if hi[st.MIN_NONZERO] < tiny else 0.0  # type: ignore[index]  # rows are fetched before analysis
        lost = (max(0.0, lo[st.ZEROS] - hi[st.ZEROS]) + lo[st.SUBNORMAL]) / n if dt is not None else 0.0  # type: ignore[index]  # rows are fetched before analysis
        if e.index in measured:
            # A zero where fp32's value is a normal number of the low dtype is not this op's range: rounding it
            # would give that number or a subnormal. It is a sum of rounded inputs cancelling, or a zero passed on
            # from an op upstream, which is judged at that op.
            lost = max(0.0, lost - max(0.0, zeroed - flushed))
        canc = cancelled(e, r, events, eps=info.eps)
        candidate = (dt is not None and _finite(lo) and lost >= th.UNDERFLOW_SHARE
                     and hi[st.MIN_NONZERO] < th.UNDERFLOW_RANGE * tiny and not canc)  # type: ignore[index]  # rows are fetched before analysis
        carried[e.index] = inherited if rel is None else max(rel, inherited)
        added = 0.0 if rel is None or inherited == math.inf else max(0.0, rel - inherited)
        departs = nonfinite or zeroed > 0 or (not canc and rel is not None and rel > tol)
        deltas[e.index] = OpDelta(e.index, r_idx, rel, added, zeroed, flushed, lost, nonfinite, canc, candidate,
                                  departs)
    return Alignment(info.eps, tol, pairs, deltas)
