"""Fixes proven by replay (`--verify-fix`).

For each failing low-precision run, the suggested fixes are replayed: the same steps, seed, data,
precision and mode, under the probe, with only the fix changed, and judged against an fp32 replay
under the same change (the diagnosis's own fp32 trace when the change cannot affect fp32, e.g.
loss.gp_precision). A fix with a patch of the user's own code (analysis.patching) is replayed on
patched copies of their files; otherwise its config change is. Verdicts are strict: ok (verified)
only when fp32 stays ok and the run is now ok; improves when the run is milder than it was (what
remains is named); fails otherwise. Replays are cached by what they ran, so a fix that only narrows
the precisions to one already replayed (bf16) costs nothing.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import torch

from nanprobe.analysis.diagnosis import Analysis, Measured, analyse_trace, replay_measured, unmeasured
from nanprobe.analysis.fixes import REGISTRY, describe
from nanprobe.engine import replay as rp
from nanprobe.enums import FailOn, FixCheck, Precision, Status
from nanprobe.errors import ConfigError, DeviceError, UserCodeError
from nanprobe.io import config as cfg
from nanprobe.io.loading import Loaded
from nanprobe.model.report import FixSuggestion, RunReport
from nanprobe.thresholds import MAX_VERIFIED

# Settings an fp32 replay does not depend on: under a fix that changes only these, fp32 is not replayed again.
_FP32_NEUTRAL = {"precision": ("mode", "fp32_modules"), "loss": ("gp_precision",)}
_ORDER = {FixCheck.OK: 0, FixCheck.IMPROVES: 1, FixCheck.UNTRIED: 2, None: 2, FixCheck.FAILS: 3}


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
    """Verified fixes first, then those that improve, then those not replayed, then those that failed;
    the diagnosis's order within each."""
    return tuple(sorted(fixes, key=lambda f: _ORDER[f.check]))


def _untried(fix: FixSuggestion, why: str) -> FixSuggestion:
    return replace(fix, verified=None, check=FixCheck.UNTRIED, verification=why, remaining=None)


def _against(device: torch.device, config: cfg.Config, target: Precision, trace: Measured) -> str:
    """What a replay ran on, so a verdict from a CPU replay reads as one."""
    steps = len(trace.trace.metrics)
    mode = config.precision.mode.value
    policy = " with CUDA's autocast lists" if device.type == "cpu" and target.is_low and mode == "amp" and \
        config.precision.policy.value == "cuda" else ""
    return f"{device.type}, {target.value} {mode}{policy}, {steps} step{'' if steps == 1 else 's'}, seed {config.seed}"


def _judge(fix: FixSuggestion, run: RunReport, line: str, ref: Measured, trace: Measured, target: Precision,
           against: str, fail_on: Status) -> FixSuggestion:
    for t in (ref.trace, trace.trace):
        if t.error is not None:  # the step raises under the fix: it is no fix
            left = f"the {t.precision.value} replay raised {t.error.line}"
            return replace(fix, verified=False, check=FixCheck.FAILS, verification=f"{line}: {left}",
                           remaining=left, verified_against=against)
    ref_found, found = analyse_trace(ref, None), analyse_trace(trace, ref)
    status, p = found.status, target.value
    if ref_found.status is not Status.OK:
        left = f"fp32 now fails ({ref_found.status.value}): {_issue(ref_found)}"
        return replace(fix, verified=False, check=FixCheck.FAILS, verification=f"{line}: {left}", remaining=left,
                       verified_against=against)
    if status is Status.OK:
        return replace(fix, verified=True, check=FixCheck.OK, verification=f"{line}: {p} is now ok ({against})",
                       remaining=None, verified_against=against)
    left = f"{status.value}: {_issue(found)}"
    if status.severity < run.status.severity:
        below = " and no longer fails --fail-on " + fail_on.value if status.severity < fail_on.severity else ""
        return replace(fix, verified=False, check=FixCheck.IMPROVES, remaining=left, verified_against=against,
                       verification=f"{line}: improves: {p} was {run.status.value}{below}; {left} remains")
    return replace(fix, verified=False, check=FixCheck.FAILS, remaining=left, verified_against=against,
                   verification=f"{line}: {p} still fails ({left})")


def _issue(found: Analysis) -> str:
    e = found.issue
    if e is None or e.kind is None:
        return "no single op"
    where = e.module or e.op.removeprefix("aten.").split(".")[0]
    return f"{e.kind.value} in {e.phase.value} at {where}, step {e.step}"


def _why_not(fix: FixSuggestion, config: cfg.Config) -> str:
    entry = REGISTRY.get(fix.id)
    if entry is not None and entry.apply is not None and config.loss.step:
        return ("not replayed: loss.step is your own code, which a config change to the loss cannot reach, and "
                "nothing in it has the shape this fix's patch knows; apply the snippet there")
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
        return _untried(fix, f"not replayed: it cannot be applied to this config ({exc})")
    except UserCodeError as exc:
        return replace(fix, verified=False, check=FixCheck.FAILS, verification=f"{line}: the replay failed: {exc}",
                       remaining=f"the replay raised: {exc}")
    return _judge(fix, run, line, ref, trace, target, _against(device, fixed, target, trace), fail_on)


def _patched(config: cfg.Config, run: RunReport, fix: FixSuggestion, loaded: Loaded, device: torch.device,
             fail_on: Status, progress) -> FixSuggestion:
    """The fix's patch applied to copies of the user's files, and the failing precision replayed on them."""
    from nanprobe.analysis import patching
    from nanprobe.io import loading

    patch = patching.for_fix(config, loaded.critic, run, fix.id)
    if patch is None:
        return _untried(fix, "not replayed: the patch could not be rebuilt from your files")
    files = ", ".join(f.rel for f in patch.files)
    line = f"with the patch to {files}" + (f" and {describe(patch.overrides)}" if patch.overrides else "")
    code = patching.user_code(config)
    if not patching.reaches(config, code, patch):
        return _untried(fix, "not replayed: the patched file is passed in from Python as a live object, which a "
                             "patch of its source cannot change; apply the patch and run again")
    target = run.precision
    on_step = None if progress is None else (
        lambda p, step, steps: progress(f"{p.value} + {fix.id} (patched)", step, steps))
    try:
        with patching.patched_code(code, patch) as mapping:
            fixed = patching.patched_config(config, code, mapping)
            if patch.overrides:
                fixed = cfg.with_overrides(fixed, **patch.overrides)
            rp.check_dtype(device, target, fixed.precision.mode)
            patched = loading.load(fixed)
            ref = replay_measured(fixed, patched, Precision.FP32, device, on_step)
            trace = replay_measured(fixed, patched, target, device, on_step, ref)
    except (ConfigError, DeviceError) as exc:
        return _untried(fix, f"not replayed: the patched code cannot be replayed ({exc})")
    except UserCodeError as exc:
        return replace(fix, verified=False, check=FixCheck.FAILS, remaining=f"the patched code raised: {exc}",
                       verification=f"{line}: the patched code raised: {exc}")
    return _judge(fix, run, line, ref, trace, target, _against(device, fixed, target, trace), fail_on)


def _verify_run(config: cfg.Config, run: RunReport, replays: _Replays, device: torch.device, top: int,
                fail_on: Status, progress=None) -> RunReport:
    out, tried = [], 0
    for fix in run.fixes:
        if fix.patch is not None or fix.overrides:
            free = fix.patch is None and _free(config, run, fix, replays)
            if not free and tried >= top:
                out.append(_untried(fix, f"not replayed: only the first {top} fixes that need a new replay are "
                                         "replayed (--verify-top)"))
                continue
            if not free:  # its replays exist already (bf16): no cost, no count
                tried += 1
            if fix.patch is not None:
                out.append(_patched(config, run, fix, replays.loaded, device, fail_on, progress))
            else:
                out.append(_replayed(config, run, fix, replays, device, fail_on))
        else:
            out.append(_untried(fix, _why_not(fix, config)))
    return replace(run, fixes=rank(out))


def verify(config: cfg.Config, loaded: Loaded, traces: dict, runs: tuple[RunReport, ...], device: torch.device,
           progress: Callable | None = None, top: int = MAX_VERIFIED,
           fail_on: FailOn = FailOn.OVERFLOW) -> tuple[RunReport, ...]:
    """The runs with each failing low-precision run's fixes replayed, marked verified or not, and re-ranked.

    A fix is verified (check ok) only when fp32 stays ok and the run is ok with it; a milder run is
    check improves, with `remaining` naming what is left; `fail_on` only words the line.
    """
    replays = _Replays(config, loaded, device, traces, progress)
    bar = Status(FailOn(fail_on).value)
    return tuple(_verify_run(config, run, replays, device, top, bar, progress)
                 if run.precision.is_low and run.status is not Status.OK else run for run in runs)
