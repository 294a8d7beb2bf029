"""The Python API: the same core the CLI calls."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from nanprobe import config as cfg
from nanprobe import diagnosis, loading, replay
from nanprobe.enums import Precision
from nanprobe.errors import ConfigError
from nanprobe.initialisation import he_ratios
from nanprobe.report import Report


def _config(config_or_path, overrides: dict) -> cfg.Config:
    if isinstance(config_or_path, cfg.Config):
        config = cfg.check(config_or_path)  # built in Python: the same checks as a YAML file
    elif isinstance(config_or_path, (str, Path)):
        config = cfg.load(Path(config_or_path))
    else:
        raise ConfigError(f"expected a nanprobe Config or the path of a YAML config, got {type(config_or_path).__name__}")
    return cfg.with_overrides(config, **overrides) if overrides else config


def diagnose(config_or_path: "cfg.Config | str | Path", progress: Callable | None = None, **overrides) -> Report:
    """Replay the config in each precision under the probe and diagnose it.

    Overrides take dotted or short keys: dtypes=["fp16"], steps=3, device="cpu", mode="half".
    Raises nanprobe.ConfigError (or UserCodeError, DeviceError) on bad input.
    """
    config = _config(config_or_path, overrides)
    device = replay.resolve_device(config.device)
    requested = tuple(config.precision.dtypes)
    order = (Precision.FP32,) + tuple(p for p in requested if p is not Precision.FP32)
    for p in order:
        replay.check_dtype(device, p, config.precision.mode)
    loaded = loading.load(config)
    traces = {p: replay.replay(config, loaded, p, device, probe=True, progress=progress) for p in order}
    runs = diagnosis.analyse(config, traces, requested, he_ratios(loaded.critic), device.type)
    return Report(config=str(config.source) if config.source else None, device=_device_name(device),
                  torch=torch.__version__, runs=runs, settings=cfg.to_dict(config))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
