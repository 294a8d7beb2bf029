"""A replay that raises is a finding: nn.BCELoss on sigmoid outputs under the (default) cuda policy.

CUDA autocast refuses binary_cross_entropy on probabilities, so fp16 and bf16 raise while fp32 runs.
Those two precisions are `error`, with the exception, the user's file and line, the op and the
catalogue's fix (logits-loss); fp32 is still reported, and the exit code is 1 at every --fail-on.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from nanprobe.cli import app
from tests.conftest import BCE_GAN, TINY, base_doc, bce_gan_doc, line_of, merge, ref

runner = CliRunner()
REFUSED = f"bce_gan.py:{line_of(BCE_GAN, 'real_loss = adversarial_loss')}"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bce") / "config.yaml"
    path.write_text(yaml.safe_dump(bce_gan_doc(), sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def diagnosed(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "report.json"
    # --fail-on nan: an error counts even at the most lenient level.
    result = runner.invoke(app, ["diagnose", str(config), "--json", str(out), "--fail-on", "nan", "--verify-fix"],
                           env={"COLUMNS": "200"})
    return result, json.loads(out.read_text(encoding="utf-8"))


def test_the_table_shows_error_with_the_users_line_and_the_fix(diagnosed):
    result, _ = diagnosed
    assert result.exit_code == 1, (result.output, result.exception)
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line[:1] in "│|" and " amp " in line}
    assert " ok " in rows["fp32"]
    for p in ("fp16", "bf16"):
        assert " error " in rows[p] and REFUSED in rows[p], rows[p]
    text = result.stdout
    assert "fp16 (amp): error" in text and "bf16 (amp): error" in text
    assert "RuntimeError: torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast" in text
    assert "torch.nn.functional.binary_cross_entropy · forward · step 0" in text
    assert "fix: ✗ logits-loss" in text or "fix: ? logits-loss" in text
    assert "nn.BCEWithLogitsLoss()" in text


def test_the_json_has_each_precisions_status_error_and_fix(diagnosed):
    _, report = diagnosed
    runs = {r["precision"]: r for r in report["runs"]}
    assert [r["status"] for r in report["runs"]] == ["ok", "error", "error"]
    assert runs["fp32"]["error"] is None and runs["fp32"]["metrics"][0]["loss"] is not None
    for p in ("fp16", "bf16"):
        run = runs[p]
        e = run["error"]
        assert e["exception"] == "RuntimeError" and "unsafe to autocast" in e["message"]
        assert e["source"].endswith(REFUSED) and e["op"] == "torch.nn.functional.binary_cross_entropy"
        assert (e["phase"], e["step"]) == ("forward", 0)
        assert run["fixes"][0]["id"] == "logits-loss"
        # A code change: --verify-fix says so instead of replaying it.
        assert run["fixes"][0]["verified"] is None and "code change" in run["fixes"][0]["verification"]
        assert run["precision_problem"] is True and run["metrics"] == []


@pytest.mark.parametrize("fail_on", ["underflow", "overflow"])
def test_an_error_fails_at_every_level_and_json_to_stdout_is_only_json(config, fail_on):
    result = runner.invoke(app, ["diagnose", str(config), "--dtype", "bf16", "--fail-on", fail_on, "--json", "-"])
    assert result.exit_code == 1, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert [(r["precision"], r["status"]) for r in report["runs"]] == [("bf16", "error")]


def test_native_policy_runs_bce_in_fp32_so_nothing_raises(config):
    # The CPU's own autocast runs the losses in fp32 instead of refusing them: no error, exit 0.
    result = runner.invoke(app, ["diagnose", str(config), "--dtype", "fp16", "--policy", "native", "--json", "-"])
    assert result.exit_code == 0, (result.output, result.exception)
    (run,) = json.loads(result.stdout)["runs"]
    assert run["status"] != "error" and run["error"] is None and run["metrics"][0]["loss"] is not None


def test_compare_precisions_reports_the_error_and_recommends_the_fix(config):
    result = runner.invoke(app, ["compare-precisions", str(config), "--json", "-"])
    assert result.exit_code == 1, (result.output, result.exception)
    c = json.loads(result.stdout)
    by = {s["precision"]: s for s in c["summaries"]}
    assert by["fp32"]["status"] == "ok" and by["fp16"]["status"] == by["bf16"]["status"] == "error"
    assert by["fp16"]["error"]["source"].endswith(REFUSED) and by["fp16"]["departs_at"] is None
    assert c["recommendation"]["use"] is None and c["recommendation"]["fp16_fix"]["id"] == "logits-loss"
    assert ("fp16 is not (error: RuntimeError at torch.nn.functional.binary_cross_entropy)"
            in c["recommendation"]["line"])


def test_compare_precisions_table_shows_the_error(config):
    result = runner.invoke(app, ["compare-precisions", str(config), "--dtypes", "fp16"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, (result.output, result.exception)
    assert "error" in result.stdout and "raised RuntimeError at" in result.stdout and REFUSED in result.stdout


def test_a_step_that_raises_in_every_precision_is_exit_2_with_one_line(tmp_path):
    doc = merge(base_doc(), {"loss": {"step": ref("raising_step")}, "precision": {"dtypes": ["fp16", "bf16"]}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    result = runner.invoke(app, ["diagnose", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("nanprobe: error: the fp32 replay (step 0, forward) raised NameError")
    assert f"tiny_models.py:{line_of(TINY, 'RAISE-IN-STEP')})" in lines[0]
