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
