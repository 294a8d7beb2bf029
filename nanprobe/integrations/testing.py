"""Helpers for users' own test suites: fail a test when a config is not safe in a low precision."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from nanprobe.enums import FailOn
from nanprobe.errors import ConfigError
from nanprobe.model.verdict import failing, message

if TYPE_CHECKING:
    from nanprobe.io.config import Config
    from nanprobe.model.report import Report


def assert_precision_safe(config: Config | str | Path, dtypes: Iterable[str] = ("fp16", "bf16"),
                          fail_on: str = "overflow", **overrides) -> Report:
    """Diagnose config in dtypes (fp32 is the reference) and return the Report.

    Raises AssertionError with each failing precision's verdict, culprit and top fix when a status
    reaches fail_on (nan | overflow, which also counts nan | underflow). Overrides are those of
    nanprobe.diagnose (steps=2, device="cpu", "data.batch_size"=4 via **{...}).
    Bad input raises nanprobe.ConfigError (or UserCodeError, DeviceError), not AssertionError.
    """
    from nanprobe.api import diagnose

    try:
        threshold = FailOn(fail_on)
    except ValueError:
        raise ConfigError(f"fail_on: must be one of nan, overflow, underflow, got {fail_on!r}") from None
    report = diagnose(config, dtypes=list(dtypes), **overrides)
    bad = failing(report, threshold)
    if bad:
        name = report.config or "the config"
        raise AssertionError(f"nanprobe: {name} is not safe at --fail-on {threshold.value}\n"
                             + "\n\n".join(message(run) for run in bad))
    return report
