"""A JUnit XML report: one testcase per precision, the verdict, culprit and fix as the failure message."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from nanprobe.enums import FailOn, Status
from nanprobe.model.report import Report
from nanprobe.model.verdict import headline, message

# Characters XML 1.0 cannot carry at all, even escaped.
_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    return _INVALID.sub("?", text)


def junit_xml(report: Report, fail_on: FailOn | str = FailOn.OVERFLOW, seconds: float | None = None) -> str:
    """The report as a JUnit XML document (a <testsuites> with one <testsuite> for the config)."""
    threshold = FailOn(fail_on)
    name = Path(report.config).name if report.config else "nanprobe"
    failures = sum(threshold.fails(r.status) for r in report.runs)
    suites = ET.Element("testsuites", name="nanprobe", tests=str(len(report.runs)), failures=str(failures), errors="0")
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(report.runs)), failures=str(failures),
                          errors="0", skipped="0")
    if seconds is not None:
        suites.set("time", f"{seconds:.3f}")
        suite.set("time", f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for key, value in (("config", report.config or ""), ("device", report.device), ("torch", report.torch),
                       ("fail_on", threshold.value)):
        ET.SubElement(props, "property", name=key, value=_clean(value))
    classname = f"nanprobe.{Path(report.config).stem}" if report.config else "nanprobe"
    for run in report.runs:
        case = ET.SubElement(suite, "testcase", classname=classname, name=run.precision.value)
        if report.config:
            case.set("file", report.config)
        if threshold.fails(run.status):
            failure = ET.SubElement(case, "failure", message=_clean(headline(run)), type=run.status.value)
            failure.text = _clean(message(run))
        elif run.status is not Status.OK:
            # Below --fail-on: passes, but the finding is kept where a CI viewer shows test output.
            ET.SubElement(case, "system-out").text = _clean(message(run))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
