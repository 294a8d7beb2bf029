"""A pytest plugin for benchmarks/suite_time.py only: every CPU replay runs the CPU's native fp16/bf16
kernels, as before `precision.kernels` existed, so the suite's time can be read before and after.

Tests that assert the emulated kernels fail under it; suite_time.py counts time, not results.
"""
from __future__ import annotations

from nanprobe.engine import replay
from nanprobe.enums import Kernels


def _native(config, precision, device) -> Kernels:
    return Kernels.NATIVE


replay.kernels_for = _native
