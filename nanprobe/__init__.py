"""nanprobe: find the first op that underflows or overflows in a GAN critic step, and the fix.

Importing nanprobe does not import torch; the API below loads it on first use.
"""
from __future__ import annotations

from nanprobe.errors import (
    ConfigError,
    DeviceError,
    Interrupted,
    NanprobeError,
    NonFiniteError,
    NonFiniteWarning,
    UserCodeError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DeviceError", "Interrupted", "NanprobeError", "UserCodeError",
    "Config", "Report", "OpProbe", "diagnose", "load_config", "check_data", "DataReport", "__version__",
    "Comparison", "compare_precisions",
    "cuda_autocast",
    "NonFiniteError", "NonFiniteWarning", "watch", "Watch", "assert_precision_safe",
]

_LAZY = {
    "Config": ("nanprobe.io.config", "Config"),
    "load_config": ("nanprobe.io.config", "load"),
    "Report": ("nanprobe.model.report", "Report"),
    "OpProbe": ("nanprobe.engine.probe", "OpProbe"),
    "diagnose": ("nanprobe.api", "diagnose"),
    # From datacheck, not api: scanning a .npy file needs no torch import (and no torch memory).
    "check_data": ("nanprobe.analysis.datacheck", "check_data"),
    "DataReport": ("nanprobe.model.checks", "DataReport"),
    "Comparison": ("nanprobe.model.comparison", "Comparison"),
    "compare_precisions": ("nanprobe.api", "compare_precisions"),
    "cuda_autocast": ("nanprobe.engine.autocast_policy", "cuda_autocast"),
    "watch": ("nanprobe.integrations.watch", "watch"),
    "assert_precision_safe": ("nanprobe.integrations.testing", "assert_precision_safe"),
    "Watch": ("nanprobe.integrations.watch", "Watch"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'nanprobe' has no attribute {name!r}")
