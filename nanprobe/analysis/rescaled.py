"""Whether an underflow is what moves a gradient, tested by replaying with the loss scaled by a power of two.

A GradScaler multiplies the loss by 2^16, and so every value of the backward by 2^16, exactly: in fp16
and bf16 that changes no rounding of a value in the normal range, only which values fall below the
smallest normal. A replay with a GradScaler is therefore the same computation with the underflow taken
out. When a run's only finding is an underflow judged by its effect (a gradient, the loss or the
penalty off from fp32, nothing non-finite, nothing zeroed), that replay is made: what is as far from
fp32 there as before is off by rounding, which the underflow does not explain, and is not judged
against it; what comes back within tolerance was the underflow's doing, and the verdict stands.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from nanprobe import thresholds as th
from nanprobe.analysis.diagnosis import Measured, analyse_trace, replay_measured
from nanprobe.analysis.effect import Effect
from nanprobe.engine import precisions
from nanprobe.enums import Framework, Mode, Precision, Status
from nanprobe.io import config as cfg


def rescaled(config: cfg.Config, loaded, measured: dict, device: torch.device,
             progress: Callable | None = None) -> dict:
    """`measured` with the effect of each low precision whose underflow finding the scaled replay does not
    confirm cleared of what stays as far from fp32 without the underflow (Effect.rounding)."""
    ref = measured.get(Precision.FP32)
    if (ref is None or config.train.grad_scaler or config.precision.mode is not Mode.AMP
            or precisions.for_loaded(loaded).framework is not Framework.TORCH):
        return measured
    out = dict(measured)
    for p, m in measured.items():
        if p.is_low and _judged_by_effect(m, ref):
            out[p] = _against_scaled(config, loaded, m, ref, device, progress)
    return out


def _judged_by_effect(m: Measured, ref: Measured) -> bool:
    """An underflow finding that rests only on relative errors: finite, nothing zeroed, no lost updates."""
    if m.trace.error is not None or m.effect is None or m.effect.lost_updates:
        return False
    a = analyse_trace(m, ref)
    return (a.status is Status.UNDERFLOW and a.cause is not None and a.cause.nonfinite is None
            and a.collapse is None and all(q.zeroed <= th.ZEROED_SHARE for q in m.effect.off_params))


def _against_scaled(config: cfg.Config, loaded, m: Measured, ref: Measured, device: torch.device,
                    progress: Callable | None) -> Measured:
    scaled_config = cfg.with_overrides(config, **{"train.grad_scaler": True})
    on_step = None if progress is None else (
        lambda p, step, steps: progress(f"{p.value} + loss scaled", step, steps))
    try:
        scaled = replay_measured(scaled_config, loaded, m.precision, device, on_step, ref)
    except Exception:  # the scaled replay is a check, not the diagnosis: without it the verdict stands
        return m
    if scaled.trace.error is not None or scaled.effect is None or analyse_trace(scaled, ref).status is not Status.OK:
        return m  # the scaled replay still finds something: no claim that the underflow is harmless
    return replace(m, effect=_cleared(m.effect, scaled.effect))  # type: ignore[arg-type]  # checked above


def _cleared(effect: Effect, scaled: Effect) -> Effect:
    """The effect with what keeps ROUNDING_SHARE of its error in the scaled replay no longer off."""
    again = {q.param: q for q in scaled.params}
    rounding = []
    params = []
    for q in effect.params:
        s = again.get(q.param)
        if q.off and s is not None and _persists(q.rel_error, s.rel_error):
            q = replace(q, off=False)
            rounding.append(q.param)
        params.append(q)
    scalars = {}
    for name in ("loss", "penalty"):
        v, s = getattr(effect, name), getattr(scaled, name)
        if v is not None and v.off and s is not None and _persists(v.rel_error, s.rel_error):
            scalars[name] = replace(v, off=False)
            rounding.append(name)
    return replace(effect, params=tuple(params), rounding=tuple(rounding), **scalars)


def _persists(error: float | None, scaled_error: float | None) -> bool:
    return error is not None and scaled_error is not None and scaled_error >= th.ROUNDING_SHARE * error

