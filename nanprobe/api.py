"""The Python API: the same core the CLI calls."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from nanprobe import config as cfg
from nanprobe import diagnosis, loading, replay, verification
from nanprobe.enums import FailOn, Precision
from nanprobe.initialisation import he_ratios, reinitialise
from nanprobe.report import Report


def _config(config_or_path, overrides: dict) -> cfg.Config:
    config = config_or_path if isinstance(config_or_path, cfg.Config) else cfg.load(Path(config_or_path))
    return cfg.with_overrides(config, **overrides) if overrides else config


def diagnose(config_or_path: "cfg.Config | str | Path", progress: Callable | None = None, verify_fix: bool = False,
             verify_top: int | None = None, fail_on: "FailOn | str" = "overflow", **overrides) -> Report:
    """Replay the config in each precision under the probe and diagnose it.

    Overrides take dotted or short keys: dtypes=["fp16"], steps=3, device="cpu", mode="half".
    verify_fix=True replays the first `verify_top` (default verification.MAX_VERIFIED) fixes of each failing
    run that a config change applies and marks each FixSuggestion verified (True / False / None, with why);
    fail_on (nan | overflow | underflow, as --fail-on) is the status a fixed run must get below.
    Raises nanprobe.ConfigError (or UserCodeError, DeviceError) on bad input.
    """
    config = _config(config_or_path, overrides)
    try:
        fail_on = FailOn(fail_on)
    except ValueError:
        raise cfg.ConfigError(f"fail_on: must be one of nan, overflow, underflow, got {fail_on!r}") from None
    device = replay.resolve_device(config.device)
    requested = tuple(config.precision.dtypes)
    order = (Precision.FP32,) + tuple(p for p in requested if p is not Precision.FP32)
    for p in order:
        replay.check_dtype(device, p, config.precision.mode)
    loaded = loading.load(config)
    traces = {p: replay.replay(config, loaded, p, device, probe=True, progress=progress) for p in order}
    critic = loaded.critic if config.model.init == "default" else \
        reinitialise(copy.deepcopy(loaded.critic), config.model.init, config.seed)
    runs = diagnosis.analyse(config, traces, requested, he_ratios(critic), device.type)
    if verify_fix:
        runs = verification.verify(config, loaded, traces, runs, device, progress,
                                   verify_top or verification.MAX_VERIFIED, fail_on)
    return Report(config=str(config.source) if config.source else None, device=_device_name(device),
                  torch=torch.__version__, runs=runs, settings=cfg.to_dict(config))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
