"""pytest plugin: `pytest --nanprobe configs/*.yaml` runs each config as one test item per precision.

Registered by the `pytest11` entry point, so it is loaded in every pytest run wherever nanprobe is
installed: without --nanprobe it only adds its options, and it imports torch only when an item runs.
"""
from __future__ import annotations

import warnings

import pytest

_SUFFIXES = (".yaml", ".yml")
_FAIL_ON = ("nan", "overflow", "underflow")


class NanprobeWarning(UserWarning):
    """A precision with a finding below --nanprobe-fail-on (e.g. an underflow that does not fail)."""


class NanprobeFailure(Exception):
    """A precision failed; the message is the verdict, culprit and fix."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nanprobe", "nanprobe: mixed-precision checks of GAN critic configs")
    group.addoption("--nanprobe", action="store_true", default=False,
                    help="Collect the YAML configs given on the command line (files, or folders of them) "
                         "and run each as one test per precision.")
    group.addoption("--nanprobe-fail-on", choices=_FAIL_ON, default="overflow",
                    help="Fail a precision at this status or worse (overflow also counts nan; default overflow).")
    group.addoption("--nanprobe-dtypes", default=None, metavar="LIST",
                    help="Precisions to test, e.g. fp16,bf16 (default: each config's precision.dtypes).")
    group.addoption("--nanprobe-steps", type=int, default=None, metavar="N",
                    help="Critic steps replayed per precision (default: each config's train.steps).")
    group.addoption("--nanprobe-device", choices=("auto", "cpu", "cuda"), default=None,
                    help="Device for the replays (default: each config's device).")


def pytest_collect_file(file_path, parent):
    config = parent.config
    if not config.getoption("nanprobe") or file_path.suffix not in _SUFFIXES:
        return None
    session = parent.session
    # Only configs the user named: a file given on the command line, or one inside a folder given there
    # (not every YAML under testpaths, which may be anything).
    named = session.isinitpath(file_path) or (
        config.args_source is pytest.Config.ArgsSource.ARGS
        and any(session.isinitpath(p) for p in file_path.parents))
    return ConfigFile.from_parent(parent, path=file_path) if named else None


def _dtypes(text: str) -> list[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names:
        raise pytest.UsageError("--nanprobe-dtypes: give one or more of fp32, fp16, bf16, separated by commas")
    for name in names:
        if name not in ("fp32", "fp16", "bf16"):
            raise pytest.UsageError(f"--nanprobe-dtypes: unknown precision '{name}'; use fp32, fp16 or bf16")
    return names


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("nanprobe") and config.getoption("nanprobe_dtypes") is not None:
        _dtypes(config.getoption("nanprobe_dtypes"))  # a bad list is a usage error before collection


class ConfigFile(pytest.File):
    """A nanprobe config: diagnosed once, on its first item, for all its selected precisions."""

    def collect(self):
        from nanprobe.errors import NanprobeError
        from nanprobe.io.config import load

        option = self.config.getoption("nanprobe_dtypes")
        if option is not None:
            names = _dtypes(option)
        else:
            try:
                names = [p.value for p in load(self.path).precision.dtypes]
            except NanprobeError as exc:
                yield PrecisionItem.from_parent(self, name="config", dtype=None, error=str(exc))
                return
        self._names = list(dict.fromkeys(names))
        for name in self._names:
            yield PrecisionItem.from_parent(self, name=name, dtype=name)

    def diagnosis(self):
        """The Report (or the NanprobeError) of this config, computed once."""
        if not hasattr(self, "_outcome"):
            from nanprobe.errors import NanprobeError

            # Only the precisions left after -k / deselection.
            selected = [i.dtype for i in self.session.items if i.parent is self and i.dtype] or self._names
            opt = self.config.getoption
            overrides = {"dtypes": selected, "steps": opt("nanprobe_steps"), "device": opt("nanprobe_device")}
            try:
                from nanprobe.api import diagnose

                self._outcome = diagnose(self.path, **overrides)
            except NanprobeError as exc:
                self._outcome = exc
        return self._outcome


class PrecisionItem(pytest.Item):
    """One precision of one config; fails with the verdict, culprit and top fix."""

    def __init__(self, *, dtype: str | None, error: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype
        self.error = error

    def runtest(self) -> None:
        from nanprobe.enums import FailOn, Status
        from nanprobe.errors import NanprobeError
        from nanprobe.model.verdict import headline, message

        if self.error is not None:
            raise NanprobeError(self.error)
        outcome = self.parent.diagnosis()  # type: ignore[union-attr]  # not None on this path
        if isinstance(outcome, BaseException):
            raise outcome
        run = next((r for r in outcome.runs if r.precision.value == self.dtype), None)
        if run is None:
            raise NanprobeError(f"no {self.dtype} replay in the report")
        self.user_properties.append(("nanprobe_status", run.status.value))
        if FailOn(self.config.getoption("nanprobe_fail_on")).fails(run.status):
            raise NanprobeFailure(message(run))
        if run.status is not Status.OK:
            warnings.warn(NanprobeWarning(f"{self.path.name}: {headline(run)}"), stacklevel=2)

    def repr_failure(self, excinfo, style=None):
        from nanprobe.errors import NanprobeError

        if excinfo.errisinstance(NanprobeFailure):
            return str(excinfo.value)
        if excinfo.errisinstance(NanprobeError):
            return f"nanprobe: error: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        # Not "name.yaml::fp16": pytest -v would turn a domain that ends the node id into name::yaml::fp16.
        return self.path, None, f"{self.path.name} {self.name}"
