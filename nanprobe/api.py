"""The Python API: the same core the CLI calls."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanprobe.analysis import datacheck, diagnosis, initialisation, patching, verification
from nanprobe.analysis.initialisation import he_ratios
from nanprobe.engine import precisions, replay
from nanprobe.enums import FailOn, Precision
from nanprobe.errors import ConfigError, Interrupted
from nanprobe.io import config as cfg
from nanprobe.io import loading
from nanprobe.model.report import Report
from nanprobe.thresholds import MAX_VERIFIED

if TYPE_CHECKING:
    from nanprobe.model.comparison import Comparison

check_data = datacheck.check_data  # the whole data file, chunk by chunk (also nanprobe.check_data)

def _config(config_or_path, overrides: dict) -> cfg.Config:
    if isinstance(config_or_path, cfg.Config):
        config = cfg.check(config_or_path)  # built in Python: the same checks as a YAML file
    elif isinstance(config_or_path, (str, Path)):
        config = cfg.load(Path(config_or_path))
    else:
        raise ConfigError("expected a nanprobe Config or the path of a YAML config, "
                          f"got {type(config_or_path).__name__}")
    return cfg.with_overrides(config, **overrides) if overrides else config


def diagnose(config_or_path: cfg.Config | str | Path, progress: Callable | None = None, verify_fix: bool = False,
             verify_top: int | None = None, fail_on: FailOn | str = "overflow", **overrides) -> Report:
    """Replay the config in each precision under the probe and diagnose it.

    Overrides take dotted or short keys: dtypes=["fp16"], steps=3, device="cpu", mode="half".
    verify_fix=True replays the first `verify_top` (default MAX_VERIFIED) fixes of each failing
    run that a config change applies and marks each FixSuggestion verified (True / False / None, with why);
    fail_on (nan | overflow | underflow, as --fail-on) words the verification lines; a fix is verified only
    when its run is then ok (`check` says ok / improves / fails / untried, `remaining` what is left).
    A fix local to the user's own files carries `patch`, a unified diff of them (relative to the config's
    folder); verify_fix replays it on patched copies. `nanprobe.analysis.patching.chosen(report.runs)` is
    what `diagnose --patch` writes.
    Raises nanprobe.ConfigError (or UserCodeError, DeviceError) on bad input.
    """
    config = _config(config_or_path, overrides)
    try:
        fail_on = FailOn(fail_on)
    except ValueError:
        raise cfg.ConfigError(f"fail_on: must be one of nan, overflow, underflow, got {fail_on!r}") from None
    with replay.caller_random_state():  # the replays seed every generator; the caller's are left as they were
        return _diagnose(config, progress, verify_fix, verify_top, fail_on)


def _diagnose(config: cfg.Config, progress: Callable | None, verify_fix: bool, verify_top: int | None,
              fail_on: FailOn) -> Report:
    device = replay.resolve_device(config.device)
    requested = tuple(config.precision.dtypes)
    order = (Precision.FP32,) + tuple(p for p in requested if p is not Precision.FP32)
    for p in order:
        replay.check_dtype(device, p, config.precision.mode)
    loaded = loading.load(config)
    strategy = precisions.for_loaded(loaded)
    critic, _ = strategy.models(Precision.FP32, config.precision.mode, (), config.model.init, config.seed)
    init = initialisation.check(critic, replay.first_batch(config, loaded),  # the critic as the replays see it
                                framework=strategy.framework)
    data = datacheck.check_replayed(config, loaded.data)
    problems = tuple(p.value for p in data.problems) if data is not None else ()
    ratios = he_ratios(critic, checks=init)
    traces: dict[Precision, diagnosis.Measured] = {}
    try:
        for p in order:
            traces[p] = diagnosis.replay_measured(config, loaded, p, device, progress, traces.get(Precision.FP32))
            if p is Precision.FP32:
                traces[p].trace.raise_error()  # it fails without any low precision: the step's bug, exit 2
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "trace", None)
        if partial is not None and partial.precision not in traces:
            traces[partial.precision] = diagnosis.unmeasured(partial)
        left = [p.value for p in order if p not in traces]
        where = f"during the {partial.precision.value} replay" if partial is not None else "before the replays"
        note = f"interrupted (Ctrl-C) {where}" + (f"; not replayed: {', '.join(left)}" if left else "")
        report = None
        if Precision.FP32 in traces:
            done = tuple(p for p in requested if p in traces)
            runs = diagnosis.analyse(config, traces, done, ratios, device.type, init, problems)
            report = _report(config, device, runs, data=data, init=init, interrupted=note)
        raise Interrupted(report) from None
    runs = diagnosis.analyse(config, traces, requested, ratios, device.type, init, problems)
    runs = patching.attach(config, loaded.critic, runs)
    if verify_fix:
        try:
            runs = verification.verify(config, loaded, traces, runs, device, progress,
                                       verify_top or MAX_VERIFIED, fail_on)
        except KeyboardInterrupt:
            note = "interrupted (Ctrl-C) while verifying fixes; the fixes are not verified"
            raise Interrupted(_report(config, device, runs, data=data, init=init, interrupted=note)) from None
    return _report(config, device, runs, data=data, init=init)


def _report(config: cfg.Config, device: torch.device, runs: tuple, **extra) -> Report:
    return Report(config=str(config.source) if config.source else None, device=_device_name(device),
                  torch=torch.__version__, runs=runs, settings=cfg.to_dict(config), **extra)


def compare_precisions(config_or_path: cfg.Config | str | Path, progress: Callable | None = None,
                       **overrides) -> Comparison:
    """Replay fp32 and the low precisions on the same steps and compare them op by op, per module.

    The low precisions are those in precision.dtypes (fp16 and bf16 when it lists none); overrides
    as for `diagnose`, e.g. dtypes=["fp16"], steps=2. Raises nanprobe.ConfigError (or UserCodeError,
    DeviceError) on bad input.
    """
    from nanprobe.analysis.comparison import compare

    config = _config(config_or_path, overrides)
    low = tuple(p for p in config.precision.dtypes if p.is_low) or (Precision.FP16, Precision.BF16)
    device = replay.resolve_device(config.device)
    for p in low:
        replay.check_dtype(device, p, config.precision.mode)
    with replay.caller_random_state():
        loaded = loading.load(config)
        framework = precisions.for_loaded(loaded).framework
        ratios = he_ratios(loaded.critic, checks=initialisation.check(loaded.critic, None, framework=framework))
        return compare(config, loaded, device, (Precision.FP32,) + low, ratios, _device_name(device),
                       progress=progress)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
