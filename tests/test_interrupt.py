"""Ctrl-C during a replay: exit 130 with what was found so far."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nanprobe.cli import app
from nanprobe.enums import Precision
from tests.conftest import base_doc, merge


@pytest.fixture
def interrupt_at(monkeypatch):
    """interrupt_at(precision): Ctrl-C arrives at the start of that precision's first step."""
    from nanprobe.engine import replay
    def arm(precision: Precision):
        real_step = replay._Replay._step

        def step(self, k):
            if self.precision is precision:
                raise KeyboardInterrupt
            return real_step(self, k)

        monkeypatch.setattr(replay._Replay, "_step", step)

    return arm


def test_cli_reports_finished_precisions_and_exits_130(write_config, interrupt_at):
    interrupt_at(Precision.BF16)
    path = write_config(merge(base_doc(), {"precision": {"dtypes": ["fp32", "bf16"]}}))
    result = CliRunner().invoke(app, ["diagnose", str(path), "--json", "-"])
    assert result.exit_code == 130
    report = json.loads(result.stdout)
    assert [r["precision"] for r in report["runs"]] == ["fp32", "bf16"]
    assert report["runs"][0]["status"] == "ok"
    assert report["interrupted"] == "interrupted (Ctrl-C) during the bf16 replay"
    assert report["runs"][1]["notes"] == ["interrupted (Ctrl-C) during step 0"]
    assert "interrupted; reporting what was found so far" in result.stderr


def test_cli_interrupted_during_fp32_reports_its_partial_run(write_config, interrupt_at):
    interrupt_at(Precision.FP32)
    path = write_config(merge(base_doc(), {"precision": {"dtypes": ["fp32", "fp16"]}}))
    result = CliRunner().invoke(app, ["diagnose", str(path), "--json", "-"])
    assert result.exit_code == 130
    report = json.loads(result.stdout)
    assert report["interrupted"] == "interrupted (Ctrl-C) during the fp32 replay; not replayed: fp16"
    assert [r["precision"] for r in report["runs"]] == ["fp32"]


def test_cli_interrupted_while_loading(write_config, monkeypatch):
    from nanprobe.io import loading
    def load(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load", load)
    result = CliRunner().invoke(app, ["diagnose", str(write_config())])
    assert result.exit_code == 130
    assert result.stderr.strip() == "nanprobe: interrupted"
    assert "Traceback" not in result.output


def test_api_raises_interrupted_with_the_partial_report(write_config, interrupt_at):
    import nanprobe

    interrupt_at(Precision.BF16)
    path = write_config(merge(base_doc(), {"precision": {"dtypes": ["fp32", "bf16"]}}))
    with pytest.raises(nanprobe.Interrupted) as info:
        nanprobe.diagnose(path)
    assert info.value.report.runs[0].precision is Precision.FP32
    assert isinstance(info.value, KeyboardInterrupt)  # code that catches Ctrl-C still sees one
