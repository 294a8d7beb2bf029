"""Golden files for what users read: the terminal report, the JSON, the GitHub annotations and the JUnit
XML of three shipped examples (one that underflows into a NaN, one that overflows, one that is healthy).

A change to any of them shows up as a diff of the file under tests/formats/golden/. When the change is
intended, regenerate them with `python -m pytest tests/formats/test_golden.py --update-golden` and review
the diff. The device, the torch version and absolute paths are normalised so that the files do not
depend on the machine.
"""
from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from nanprobe.formats import table
from nanprobe.formats.github import annotations
from nanprobe.formats.junit import junit_xml

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
CONFIGS = ("wgan_gp_fp16_underflow", "fp16_activation_overflow", "healthy_dcgan")
WIDTH = 100


def normalise(text: str, report) -> str:
    text = text.replace(str(ROOT), "<root>")
    text = text.replace(report.torch, "<torch>")
    return re.sub(rf'(?<=[">\s]){re.escape(report.device)}(?=["<\s,]|$)', "<device>", text, flags=re.M)


@pytest.fixture(scope="module", params=CONFIGS)
def diagnosed(request):
    from nanprobe.api import diagnose

    return request.param, diagnose(ROOT / "configs" / f"{request.param}.yaml")


def _terminal(report) -> str:
    # The header wraps at WIDTH, so the clone's path must be replaced before rendering, not after:
    # otherwise the golden file depends on how long the checkout's path is.
    report = dataclasses.replace(report, config=report.config.replace(str(ROOT), "<root>"),
                                 torch="<torch>")
    out = io.StringIO()
    table.report(report, Console(file=out, width=WIDTH, color_system=None, force_terminal=False, legacy_windows=False))
    return out.getvalue()


RENDERERS = {
    "txt": _terminal,
    "json": lambda report: report.to_json() + "\n",
    "github": lambda report: "\n".join(annotations(report, "overflow", root=ROOT)) + "\n",
    "xml": lambda report: junit_xml(report, "overflow"),
}


@pytest.mark.parametrize("fmt", sorted(RENDERERS))
def test_rendered_output_matches_the_golden_file(diagnosed, fmt, request):
    name, report = diagnosed
    got = normalise(RENDERERS[fmt](report), report)
    path = GOLDEN / f"{name}.{fmt}"
    if request.config.getoption("--update-golden"):
        path.write_text(got, encoding="utf-8")
        pytest.skip(f"wrote {path.relative_to(ROOT)}")
    assert path.exists(), f"no golden file {path.relative_to(ROOT)}: run pytest {__file__} --update-golden"
    want = path.read_text(encoding="utf-8")
    assert got == want, (f"{path.relative_to(ROOT)} changed; if intended, regenerate with --update-golden "
                         "and review the diff")
