"""nanprobe: find the first op that underflows or overflows in a GAN critic step, and the fix.

Importing nanprobe does not import torch; the API below loads it on first use.
"""
from __future__ import annotations

from nanprobe.errors import ConfigError, DeviceError, NanprobeError, NonFiniteError, NonFiniteWarning, UserCodeError

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DeviceError", "NanprobeError", "UserCodeError",
    "Config", "Report", "OpProbe", "diagnose", "load_config", "__version__",
    "NonFiniteError", "NonFiniteWarning", "watch", "Watch",
]

_LAZY = {
    "Config": ("nanprobe.config", "Config"),
    "load_config": ("nanprobe.config", "load"),
    "Report": ("nanprobe.report", "Report"),
    "OpProbe": ("nanprobe.probe", "OpProbe"),
    "diagnose": ("nanprobe.api", "diagnose"),
    "watch": ("nanprobe", "watch"),  # the module nanprobe.watch, itself callable as the function
    "Watch": ("nanprobe.watch", "Watch"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        if (module, attr) == ("nanprobe", "watch"):
            return importlib.import_module("nanprobe.watch")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'nanprobe' has no attribute {name!r}")
