"""Errors nanprobe reports to the user as one line and exit code 2."""
from __future__ import annotations


class NanprobeError(Exception):
    """Base class: a problem with what the user gave nanprobe, never a bug in nanprobe."""

    exit_code = 2


class ConfigError(NanprobeError):
    """The config, a file it names, or an override is wrong; the message says how to fix it."""


class UserCodeError(NanprobeError):
    """The user's model, factory or step raised; the message names their file and line."""


class DeviceError(NanprobeError):
    """The requested device or dtype is not available here."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a replay; `report` holds what was found so far (None before fp32 finished)."""

    def __init__(self, report=None):
        super().__init__("interrupted")
        self.report = report


class NonFiniteError(FloatingPointError):
    """A step watched by nanprobe.watch turned non-finite (on_nan="raise"); the message is the verdict."""

    def __init__(self, message: str, failure=None):
        super().__init__(message)
        self.failure = failure
        """The nanprobe.integrations.watch.Failure: step, reason, report (the diagnosis) and dump folder."""

    @property
    def report(self):
        return self.failure.report if self.failure is not None else None


class NonFiniteWarning(RuntimeWarning):
    """A step watched by nanprobe.watch turned non-finite (on_nan="warn" or "dump"); training went on."""
