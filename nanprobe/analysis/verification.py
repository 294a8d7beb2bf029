"""Fixes proven by replay (`--verify-fix`).

For each failing low-precision run, the suggested fixes that a config change applies are replayed:
the same steps, seed, data, precision and mode with only the fix's overrides changed, under the
probe, and judged against an fp32 replay under the same change (the diagnosis's own fp32 trace when
the change cannot affect fp32, e.g. loss.gp_precision). A fix is verified when fp32 stays ok and the
run is now ok, or no longer fails `--fail-on` and is milder than it was (a NaN cured, an underflow
of another cause left: the line says which). Replays are cached by what they ran, so a fix that only
narrows the precisions to one already replayed (bf16) costs nothing.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable

import torch

from nanprobe.io import config as cfg
from nanprobe.engine import replay as rp
from nanprobe.analysis.diagnosis import Analysis, Measured, analyse_trace, replay_measured, unmeasured
from nanprobe.enums import FailOn, Precision, Status
from nanprobe.errors import ConfigError, DeviceError, UserCodeError
from nanprobe.analysis.fixes import REGISTRY
from nanprobe.io.loading import Loaded
from nanprobe.thresholds import MAX_VERIFIED
from nanprobe.model.report import FixSuggestion, RunReport


# Settings an fp32 replay does not depend on: under a fix that changes only these, fp32 is not replayed again.
_FP32_NEUTRAL = {"precision": ("mode", "fp32_modules"), "loss": ("gp_precision",)}
_ORDER = {True: 0, None: 1, False: 2}


def _key(config: cfg.Config, precision: Precision) -> str:
    d = cfg.to_dict(config)
    d["precision"].pop("dtypes")  # which precisions are requested does not change any one replay
    if precision is Precision.FP32:
        for section, keys in _FP32_NEUTRAL.items():
            for k in keys:
                d[section].pop(k, None)
    return json.dumps([precision.value, d], sort_keys=True, default=str)


class _Replays:
    """Replays keyed by config and precision, seeded with the diagnosis's traces."""

    def __init__(self, config: cfg.Config, loaded: Loaded, device: torch.device, traces: dict, progress):
        self.loaded, self.device, self.progress = loaded, device, progress
        self.cache: dict[str, Measured] = {
            _key(config, p): (t if isinstance(t, Measured) else unmeasured(t)) for p, t in traces.items()}

    def get(self, config: cfg.Config, precision: Precision, label: str) -> Measured:
        """The replay measured against the fp32 replay of the same config (the pipeline diagnose uses)."""
        k = _key(config, precision)
        if k not in self.cache:
            ref = self.get(config, Precision.FP32, label) if precision.is_low else None
            progress = self.progress
            on_step = None if progress is None else (
                lambda p, step, steps: progress(f"{p.value} + {label}", step, steps))
            self.cache[k] = replay_measured(config, self.loaded, precision, self.device, on_step, ref)
        return self.cache[k]

    def cached(self, config: cfg.Config, precision: Precision) -> bool:
        """Both replays a fix needs (fp32 and its precision) were made already: verifying it is free."""
        return _key(config, precision) in self.cache and _key(config, Precision.FP32) in self.cache


def rank(fixes) -> tuple[FixSuggestion, ...]:
    """Verified fixes first, then those not replayed, then those that failed; the catalogue's order within each."""
    return tuple(sorted(fixes, key=lambda f: _ORDER[f.verified]))


def _issue(found: Analysis) -> str:
    e = found.issue
    if e is None or e.kind is None:
        return "no single op"
    where = e.module or e.op.removeprefix("aten.").split(".")[0]
    return f"{e.kind.value} in {e.phase.value} at {where}, step {e.step}"


def _why_not(fix: FixSuggestion, config: cfg.Config) -> str:
    entry = REGISTRY.get(fix.id)
    if entry is not None and entry.apply is not None and config.loss.step:
        return ("not replayed: loss.step is your own code, which a config change to the loss cannot reach; "
                "apply the snippet there")
    return "not replayed: this fix is a code change (see the snippet), not a config change nanprobe can apply"


def _fixed(config: cfg.Config, run: RunReport, fix: FixSuggestion) -> tuple[cfg.Config, Precision]:
    """The config with the fix applied, and the precision to replay (bf16 for the bf16 fix)."""
    fixed = cfg.with_overrides(config, **fix.overrides)
    dtypes = fixed.precision.dtypes
    return fixed, run.precision if run.precision in dtypes else next((p for p in dtypes if p.is_low), run.precision)


def _free(config: cfg.Config, run: RunReport, fix: FixSuggestion, replays: _Replays) -> bool:
    try:
        return replays.cached(*_fixed(config, run, fix))
    except ConfigError:
        return True  # it will not be replayed at all


def _replayed(config: cfg.Config, run: RunReport, fix: FixSuggestion, replays: _Replays,
              device: torch.device, fail_on: Status) -> FixSuggestion:
    line = f"with {fix.apply}"
    try:
        fixed, target = _fixed(config, run, fix)
        rp.check_dtype(device, target, fixed.precision.mode)
        ref = replays.get(fixed, Precision.FP32, fix.id)
        trace = replays.get(fixed, target, fix.id)
    except (ConfigError, DeviceError) as exc:
        return replace(fix, verified=None, verification=f"not replayed: it cannot be applied to this config ({exc})")
    except UserCodeError as exc:
        return replace(fix, verified=False, verification=f"{line}: the replay failed: {exc}")
    for t in (ref, trace):
        if t.error is not None:  # the step raises under the fix: it is no fix
            return replace(fix, verified=False, verification=(
                f"{line}: the {t.precision.value} replay raised {t.error.line}"))
    ref_found, found = analyse_trace(ref, None), analyse_trace(trace, ref)
    status, p = found.status, target.value
    if ref_found.status is not Status.OK:
        return replace(fix, verified=False, verification=(
            f"{line}: fp32 now fails ({ref_found.status.value}): {_issue(ref_found)}"))
    if status is Status.OK:
        steps = len(trace.trace.metrics)
        plural = "" if steps == 1 else "s"
        return replace(fix, verified=True, verification=f"{line}: {p} is now ok ({steps} step{plural} replayed)")
    # A run that fails the user's --fail-on passes with a fix that leaves only a milder finding below it.
    if status.severity < min(run.status.severity, fail_on.severity):
        return replace(fix, verified=True, verification=(
            f"{line}: {p} no longer fails --fail-on {fail_on.value} (was {run.status.value}); "
            f"{status.value} remains: {_issue(found)}"))
    return replace(fix, verified=False, verification=f"{line}: {p} still fails ({status.value}): {_issue(found)}")


def _verify_run(config: cfg.Config, run: RunReport, replays: _Replays, device: torch.device, top: int,
                fail_on: Status) -> RunReport:
    out, tried = [], 0
    for fix in run.fixes:
        if not fix.overrides:
            out.append(replace(fix, verification=_why_not(fix, config)))
        elif _free(config, run, fix, replays):  # its replays exist already (bf16): no cost, no count
            out.append(_replayed(config, run, fix, replays, device, fail_on))
        elif tried >= top:
            out.append(replace(fix, verification=f"not replayed: only the first {top} fixes that need a new "
                                                  "replay are replayed (--verify-top)"))
        else:
            tried += 1
            out.append(_replayed(config, run, fix, replays, device, fail_on))
    return replace(run, fixes=rank(out))


def verify(config: cfg.Config, loaded: Loaded, traces: dict, runs: tuple[RunReport, ...], device: torch.device,
           progress: Callable | None = None, top: int = MAX_VERIFIED,
           fail_on: FailOn = FailOn.OVERFLOW) -> tuple[RunReport, ...]:
    """The runs with each failing low-precision run's fixes replayed, marked verified or not, and re-ranked.

    A fix is verified when fp32 stays ok and the run is ok with it, or (for a run at or above
    `fail_on`) only a finding below `fail_on` and below the run's own status remains.
    """
    replays = _Replays(config, loaded, device, traces, progress)
    bar = Status(FailOn(fail_on).value)
    return tuple(_verify_run(config, run, replays, device, top, bar)
                 if run.precision.is_low and run.status is not Status.OK else run for run in runs)
