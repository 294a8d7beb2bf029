"""CI outputs: GitHub Actions annotations (`--format github`), JUnit XML (`--junit`), `--format json`."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import nanprobe
from nanprobe.cli import app
from nanprobe.enums import Status
from nanprobe.formats.github import annotations, command, escape_data, escape_property, location
from nanprobe.formats.junit import junit_xml
from nanprobe.model.verdict import message
from tests.conftest import FIXTURES, base_doc, line_of, merge, ref

ROOT = Path(__file__).resolve().parents[2]
LOUD = FIXTURES / "loud_models.py"
runner = CliRunner()


def _unescape(text: str) -> str:
    return text.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":").replace("%2C", ",").replace("%25", "%")


@pytest.fixture(scope="module")
def loud(tmp_path_factory) -> Path:
    """A config whose critic's scores overflow fp16 at a known line; bf16 holds them."""
    doc = merge(base_doc(), {"model": {"critic": ref("LoudCritic", LOUD)}, "precision": {"dtypes": ["fp16", "bf16"]}})
    path = tmp_path_factory.mktemp("loud") / "loud.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def report(loud):
    return nanprobe.diagnose(loud)


def test_escaping_follows_githubs_rules():
    assert escape_data("50% a\r\nb: c, d") == "50%25 a%0D%0Ab: c, d"
    assert escape_property("50% a\r\nb: c, d") == "50%25 a%0D%0Ab%3A c%2C d"
    assert command("error", "line 1\nline 2", file="dir/a,b.py", line=3, title="x: y") == \
        "::error file=dir/a%2Cb.py,line=3,title=x%3A y::line 1%0Aline 2"
    assert command("warning", "just text", file=None, line=None) == "::warning::just text"


def test_error_at_the_users_source_line(report):
    fp16, bf16 = report.runs
    assert (fp16.status.value, bf16.status.value) == ("nan", "ok")
    lines = annotations(report, "overflow", root=ROOT)
    assert len(lines) == 1  # bf16 is ok: no annotation
    head, sep, text = lines[0].partition("::fp16 (amp): nan%0A")
    assert head == (f"::error file=tests/fixtures/loud_models.py,line={line_of(LOUD, 'LOUD-HEAD')},"
                    "title=nanprobe fp16 (amp)%3A nan")
    assert sep and "\n" not in lines[0] and "\r" not in lines[0]
    assert _unescape(lines[0].split("::", 2)[2]) == message(fp16)
    assert "first issue: overflow in forward at critic · mul, step 0" in message(fp16)
    assert "fix: fp32-module" in message(fp16)


def test_below_fail_on_is_a_warning(report):
    fp16 = report.runs[0]
    overflow_only = replace(report, runs=(replace(fp16, status=Status.OVERFLOW),) + report.runs[1:])
    assert annotations(overflow_only, "nan", root=ROOT)[0].startswith("::warning file=tests/fixtures/loud_models.py,")
    assert annotations(overflow_only, "overflow", root=ROOT)[0].startswith(
        "::error file=tests/fixtures/loud_models.py,")


def test_source_outside_the_workspace_or_in_nanprobe_points_at_the_config(report, loud):
    fp16 = report.runs[0]
    # The built-in losses report their lines as nanprobe/engine/losses.py: not a file of the user's repository.
    ours = replace(fp16.first_issue, source="nanprobe/engine/losses.py:45")
    assert location(ours, str(loud), loud.parent) == ("loud.yaml", None)
    assert location(fp16.first_issue, str(loud), loud.parent) == ("loud.yaml", None)  # models outside root
    assert location(None, None, ROOT) == (None, None)


def test_junit_xml_has_one_testcase_per_precision_and_the_verdict(report):
    root = ET.fromstring(junit_xml(report, "overflow", seconds=1.5))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("time")) == ("2", "1", "1.500")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["fp16", "bf16"]
    assert {c.get("classname") for c in cases} == {"nanprobe.loud"}
    failure = cases[0].find("failure")
    assert failure.get("type") == "nan"
    assert failure.get("message").startswith("fp16 (amp): nan, overflow in forward at critic · mul, step 0, ")
    assert failure.text == message(report.runs[0])
    assert cases[1].find("failure") is None


def test_junit_below_fail_on_passes_and_keeps_the_finding_as_output(report):
    fp16 = report.runs[0]
    overflow_only = replace(report, runs=(replace(fp16, status=Status.OVERFLOW),))
    case = ET.fromstring(junit_xml(overflow_only, "nan")).find("testsuite/testcase")
    assert case.find("failure") is None
    assert case.find("system-out").text == message(overflow_only.runs[0])


def test_junit_strips_characters_xml_cannot_hold(report):
    fp16 = report.runs[0]
    odd = replace(report, runs=(replace(fp16, notes=("bell \x07 and \x1b[1m escape",)),))
    text = junit_xml(odd)
    assert "note: bell ? and ?[1m escape" in ET.fromstring(text).find("testsuite/testcase/failure").text


def test_cli_format_github_and_junit(loud, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("GITHUB_WORKSPACE", raising=False)
    junit = tmp_path / "nanprobe.xml"
    result = runner.invoke(app, ["diagnose", str(loud), "--format", "github", "--junit", str(junit)])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"::error file=tests/fixtures/loud_models.py,line={line_of(LOUD, 'LOUD-HEAD')},"
        "title=nanprobe fp16 (amp)%3A nan::")
    cases = ET.parse(junit).getroot().findall("testsuite/testcase")
    assert [(c.get("name"), c.find("failure") is not None) for c in cases] == [("fp16", True), ("bf16", False)]


def test_cli_format_json_prints_the_report_only(loud):
    result = runner.invoke(app, ["diagnose", str(loud), "--format", "json", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in json.loads(result.stdout)["runs"]] == ["ok"]


def test_cli_json_to_stdout_conflicts_with_another_stdout_format(loud):
    result = runner.invoke(app, ["diagnose", str(loud), "--format", "github", "--json", "-"])
    assert result.exit_code == 2
    assert result.stderr == ("nanprobe: error: --json -: stdout already carries --format github; "
                             "give --json a file path\n")


def test_cli_config_error_with_format_github_is_an_annotation_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_WORKSPACE", raising=False)
    (tmp_path / "typo.yaml").write_text("model:\n  critc: models.py:Critic\n", encoding="utf-8")
    result = runner.invoke(app, ["diagnose", "typo.yaml", "--format", "github"])
    assert result.exit_code == 2
    assert result.stdout == ("::error file=typo.yaml,title=nanprobe%3A error::"
                             "unknown key 'model.critc'; did you mean 'critic'?\n")
    assert result.stderr == "nanprobe: error: unknown key 'model.critc'; did you mean 'critic'?\n"


def test_cli_junit_unwritable_is_one_line(loud, tmp_path):
    result = runner.invoke(app, ["diagnose", str(loud), "--dtype", "bf16", "--junit", str(tmp_path / "no" / "x.xml")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"nanprobe: error: --junit: cannot write {tmp_path / 'no' / 'x.xml'}: ")
