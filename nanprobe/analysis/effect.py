"""Effect: what training sees in a low precision against fp32, each against a documented tolerance.

What training sees is the loss, the penalty, each parameter's gradient (after unscaling, before
clipping) and whether the weights move. An underflow is a finding only when one of these is off
(thresholds.EFFECT_TOLERANCE_EPS, ZEROED_SHARE, LOST_UPDATE_SHARE) or when it leads to a non-finite
value; subnormals with no measurable effect are notes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from nanprobe import thresholds as th
from nanprobe.analysis.alignment import Recorder, relative_error, zeroed_share, zeroed_where
from nanprobe.enums import Precision


@dataclass(frozen=True)
class ScalarEffect:
    """The loss or the penalty against fp32, at its worst step."""

    name: str
    """loss | penalty."""
    step: int
    """Critic step of the worst error."""
    value: float | None
    """This precision's value."""
    reference: float | None
    """fp32's value."""
    rel_error: float
    """|value - reference| / |reference| (inf when the value is not finite)."""
    off: bool
    """rel_error above the tolerance."""


@dataclass(frozen=True)
class ParamEffect:
    """One parameter's gradient against fp32, at its worst step."""

    param: str
    """Parameter name (critic.net.0.weight)."""
    step: int
    """Critic step of the worst error."""
    rel_error: float | None
    """Norm-wise relative error of its sampled gradient (None where fp32's is all 0)."""
    zeroed: float
    """Share of its sampled gradient exactly 0 where fp32's is non-zero."""
    off: bool
    """rel_error above the tolerance, or zeroed above ZEROED_SHARE."""


@dataclass(frozen=True)
class Effect:
    """What training sees in one low precision, against fp32."""

    precision: Precision
    """The low precision."""
    tolerance: float
    """Relative error allowed on the loss, the penalty and each gradient (EFFECT_TOLERANCE_EPS eps + fp32 noise)."""
    loss: ScalarEffect | None
    """The loss at its worst step (None when no step has both values)."""
    penalty: ScalarEffect | None
    """The penalty at its worst step (None without one)."""
    params: tuple[ParamEffect, ...]
    """Each parameter's gradient, worst first."""
    grad_rel_error: float | None
    """All parameters' gradient samples together, worst step (the comparison's one number)."""
    lost_updates: tuple[tuple[str, float], ...] = ()
    """(parameter, share of its moving elements left unchanged) at or above LOST_UPDATE_SHARE."""
    independent: tuple[str, ...] = ()
    """Parameters the critic does not depend on (analysis.invariance): their gradients are rounding noise in every
    precision, so they are never off."""
    cancelling: tuple[tuple[str, float], ...] = ()
    """(parameter, factor) whose gradient is a sum with terms `factor` times its size in fp32 and whose error is
    within the dtype's rounding of those terms (EFFECT_TOLERANCE_EPS times factor): rounding, not off."""

    @property
    def off_params(self) -> tuple[ParamEffect, ...]:
        return tuple(p for p in self.params if p.off)

    @property
    def any_off(self) -> bool:
        return bool(self.off_params or self.lost_updates
                    or (self.loss is not None and self.loss.off) or (self.penalty is not None and self.penalty.off))

    def summary(self) -> str:
        """The measured effect in one line ('loss off 2e-06, penalty 6e-04, parameter gradients <= 0.8%; ...')."""
        parts = []
        for s in (self.loss, self.penalty):
            if s is not None:
                parts.append(f"{s.name} {_num(s.rel_error)}")
        # Parameters not judged, or within the rounding of a cancelling sum, are named after the figures, not in them.
        excused = set(self.independent) | {n for n, _ in self.cancelling}
        judged = [p for p in self.params if p.param not in excused]
        errs = [p.rel_error for p in judged if p.rel_error is not None]
        if errs:
            worst = max(judged, key=lambda p: (p.rel_error is not None, p.rel_error or 0.0))
            parts.append(f"parameter gradients up to {_num(max(errs))} ({worst.param})")
        zeroed = [p for p in judged if p.zeroed >= th.ZEROED_SHARE / 10]  # below 0.1%: a value or two
        if zeroed:
            z = max(zeroed, key=lambda p: p.zeroed)
            parts.append(f"{z.zeroed:.1%} of {z.param}'s gradient zeroed")
        for name, share in self.lost_updates:
            parts.append(f"{share:.0%} of {name}'s updates lost")
        text = ("relative error against fp32: " + ", ".join(parts) if parts else "no effect measured") + \
            f" (tolerance {self.tolerance:.2g})"
        if self.independent:
            text += (f"; not judged: {_listed(self.independent)}, which the critic's output does not depend on "
                     "(a bias before a normalization that removes it): their gradients are rounding noise")
        if self.cancelling:
            shown = _listed(tuple(f"{n} (1/{k:.2g})" for n, k in self.cancelling))
            text += (f"; within rounding: {shown}, whose gradients are sums that cancel to that share of their "
                     "terms in fp32, so the dtype keeps that much less of their precision (a loss scale does not "
                     "change it)")
        return text


def _listed(names: tuple[str, ...], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.2g}"


def _scalar(name: str, metrics, ref_metrics, tol: float) -> ScalarEffect | None:
    ref = {m.step: getattr(m, name) for m in ref_metrics}
    worst = None
    for m in metrics:
        v, r = getattr(m, name), ref.get(m.step)
        if v is None or r is None or not math.isfinite(r):
            continue
        err = math.inf if not math.isfinite(v) else (abs(v - r) / abs(r) if r != 0 else (0.0 if v == 0 else math.inf))
        if worst is None or err > worst.rel_error:
            worst = ScalarEffect(name, m.step, v, r, err, err > tol)
    return worst


def _ranked(params) -> tuple[ParamEffect, ...]:
    return tuple(sorted(params, key=lambda p: (not p.off, -(p.rel_error or 0.0), -p.zeroed, p.param)))


def _zeros_within(g: torch.Tensor, r: torch.Tensor, factor: float, eps: float) -> bool:
    """Every value zeroed in `g` where fp32's `r` is not is within CANCEL_ROUNDINGS roundings of the sum's terms,
    which are at most `factor` times fp32's largest value."""
    lost, r = zeroed_where(g, r), r.cpu()
    if not bool(lost.any()):
        return True
    return bool((r[lost].abs() <= th.CANCEL_ROUNDINGS * eps * factor * r.abs().max()).all())


def within_cancellation(effect: Effect, factors: dict[str, float], rec: Recorder | None = None,
                        ref: Recorder | None = None) -> Effect:
    """`effect` with the off parameters whose error a cancelling sum explains no longer off.

    `factors` gives, per parameter, how many times the terms of the most cancelling sum on its gradient's path
    are larger than the sum in fp32 (provenance.cancelling_sum). Rounding each term costs eps/2 of the term, so
    the sum is good to `factor` times that: an error within `factor` times the tolerance is rounding. An error
    of the order of `factor` itself (a term lost to underflow) stays off, and so does a gradient with zeros
    (above ZEROED_SHARE) the terms' rounding cannot make (CANCEL_ROUNDINGS; checked on the samples in `rec` and
    `ref`, and never excused without them).
    """
    eps = torch.finfo(effect.precision.torch_dtype).eps
    excused: dict[str, float] = {}
    params = []
    for p in effect.params:
        k = factors.get(p.param)
        if p.off and k is not None and p.rel_error is not None and p.rel_error <= k * effect.tolerance:
            if p.zeroed > th.ZEROED_SHARE:
                g = rec.grads.get(p.step, {}).get(p.param) if rec is not None else None
                r = ref.grads.get(p.step, {}).get(p.param) if ref is not None else None
                if g is None or r is None or not _zeros_within(g, r, k, eps):
                    params.append(p)
                    continue
            excused[p.param] = k
            p = replace(p, off=False)
        params.append(p)
    if not excused:
        return effect
    return replace(effect, params=_ranked(params), cancelling=tuple(sorted(excused.items())))


def grad_error(rec: Recorder, ref: Recorder) -> float | None:
    """Norm-wise relative error of all parameters' gradient samples together, worst over the steps."""
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


def measure(precision: Precision, metrics, ref_metrics, rec: Recorder | None, ref_rec: Recorder | None,
            lost: dict | None = None, independent: Callable[[list[str]], frozenset[str]] | None = None) -> Effect:
    """The effect of running in `precision`, from the replays' metrics and gradient samples.

    `independent` names, of the parameters it is given, those the critic does not depend on
    (analysis.invariance); it is asked only about parameters that would be off with an error larger than
    fp32's gradient itself (an independent parameter's always is: its fp32 gradient is rounding noise).
    """
    eps = torch.finfo(precision.torch_dtype).eps
    tol = th.tolerance(eps, th.EFFECT_TOLERANCE_EPS)
    per: dict[str, ParamEffect] = {}
    if rec is not None and ref_rec is not None:
        for step, grads in rec.grads.items():
            ref_grads = ref_rec.grads.get(step, {})
            for name, g in grads.items():
                r = ref_grads.get(name)
                if r is None or r.shape != g.shape:
                    continue
                rel = relative_error(g, r)
                z = zeroed_share(g, r)
                off = (rel is not None and rel > tol) or z > th.ZEROED_SHARE
                old = per.get(name)
                if old is None or (off, rel or 0.0, z) > (old.off, old.rel_error or 0.0, old.zeroed):
                    per[name] = ParamEffect(name, step, rel, z, off)
    # Worst first, and only so many: each costs two fp64 forwards of the critic.
    suspects = [p.param for p in sorted(per.values(), key=lambda p: -(p.rel_error or 0.0))
                if p.off and (p.rel_error is None or p.rel_error > 1.0)][:th.INDEPENDENT_TESTED]
    free = sorted(independent(suspects)) if suspects and independent is not None else []
    for name in free:
        per[name] = replace(per[name], off=False)
    params = _ranked(per.values())
    lost_shares: dict[str, float] = {}
    for counts in (lost or {}).values():
        for name, (moving, unchanged) in counts.items():
            if moving:
                lost_shares[name] = max(lost_shares.get(name, 0.0), unchanged / moving)
    lost_updates = tuple(sorted(((n, round(s, 4)) for n, s in lost_shares.items() if s >= th.LOST_UPDATE_SHARE),
                                key=lambda x: (-x[1], x[0])))
    return Effect(precision, tol, _scalar("loss", metrics, ref_metrics, tol),
                  _scalar("penalty", metrics, ref_metrics, tol),
                  params, grad_error(rec, ref_rec) if rec is not None and ref_rec is not None else None, lost_updates,
                  tuple(free))
