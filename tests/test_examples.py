"""Each shipped example reproduces its failure and is diagnosed with the right phase, module and fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import nanprobe
from nanprobe.cli import app
from nanprobe.formats import table as render

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# config: {precision: (status, first-issue kind, phase, module prefix, a fix expected in the first three)}
EXPECTED = {
    "wgan_gp_fp16_underflow": {
        "fp32": ("ok",), "bf16": ("ok",),
        "fp16": ("nan", "underflow", "input-grad", "critic.net.", {"gp-fp32", "gp-scaled"}),
    },
    "custom_step": {
        "fp32": ("ok",), "bf16": ("ok",),
        "fp16": ("nan", "underflow", "input-grad", "critic.net.", {"gp-fp32", "gp-scaled"}),
    },
    "amp_no_loss_scaling": {
        "fp32": ("ok",), "bf16": ("ok",),
        "fp16": ("underflow", "underflow", "backward", "critic.net.", {"grad-scaler"}),
    },
    "fp16_activation_overflow": {
        "fp32": ("ok",), "bf16": ("ok",),
        "fp16": ("overflow", "overflow", "forward", "critic.net.6", {"fp32-module", "bf16"}),
    },
    "bad_init": {
        "fp32": ("ok",), "bf16": ("ok",),
        "fp16": ("nan", "overflow", "forward", "critic.net.", {"init"}),
    },
    "corrupt_data": {
        p: ("nan", "nan", "data", "data", {"data"}) for p in ("fp32", "fp16", "bf16")
    },
    "healthy_dcgan": {p: ("ok",) for p in ("fp32", "fp16", "bf16")},
}

_reports: dict = {}


def report_for(name: str):
    if name not in _reports:
        _reports[name] = nanprobe.diagnose(CONFIGS / f"{name}.yaml")
    return _reports[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_diagnosis(name):
    report = report_for(name)
    runs = {r.precision.value: r for r in report.runs}
    assert set(runs) == set(EXPECTED[name])
    for precision, expected in EXPECTED[name].items():
        run = runs[precision]
        assert run.status.value == expected[0], (precision, run.first_issue)
        if expected[0] == "ok":
            assert run.first_issue is None and run.fixes == ()
            continue
        status, kind, phase, module, fixes = expected
        issue = run.first_issue
        assert (issue.kind.value, issue.phase.value) == (kind, phase), issue
        assert issue.module.startswith(module), issue.module
        top3 = {f.id for f in run.fixes[:3]}
        assert top3 & fixes, (precision, [f.id for f in run.fixes])


def test_native_policy_reaches_the_same_penalty_verdict():
    """The examples' verdicts were first taken with the CPU's own autocast lists; this one still holds there."""
    report = nanprobe.diagnose(CONFIGS / "wgan_gp_fp16_underflow.yaml", policy="native", dtypes=["fp16"])
    assert report.settings["precision"]["policy"] == "native"
    (run,) = report.runs
    issue = run.first_issue
    assert (run.status.value, issue.kind.value, issue.phase.value) == ("nan", "underflow", "input-grad")
    assert run.fixes[0].id == "gp-fp32"


def test_penalty_underflow_points_at_the_penalty_chain():
    run = next(r for r in report_for("wgan_gp_fp16_underflow").runs if r.precision.value == "fp16")
    assert run.fixes[0].id == "gp-fp32"
    assert run.fixes[0].apply == "loss.gp_precision: fp32"
    nonfinite = run.first_nonfinite
    assert nonfinite.node == "SqrtBackward0" and nonfinite.phase.value == "backward"
    assert (nonfinite.source == "nanprobe/engine/losses.py:45"
            or nonfinite.source.startswith("nanprobe/engine/losses.py:"))
    ops = [c.op for c in run.chain]
    assert run.chain[0].module == run.first_issue.module and ops[-1] == nonfinite.op
    assert run.first_issue.numbers["reference"]["zeros"] == 0
    assert run.first_issue.numbers["lost_share"] >= 0.05
    assert run.precision_problem


def test_custom_step_points_at_the_users_lines():
    run = next(r for r in report_for("custom_step").runs if r.precision.value == "fp16")
    assert run.first_nonfinite.source == "train.py:24"  # the hand-written sqrt
    assert run.first_issue.source == "models.py:34"
    # A custom step is not changed by the built-in loss's settings.
    assert all(f.apply is None for f in run.fixes if f.id in ("gp-fp32", "gp-scaled"))
    metrics = run.metrics[0]
    assert metrics.penalty == pytest.approx(10.0, rel=1e-3)
    assert "wasserstein" in metrics.extra


def test_corrupt_data_names_the_sample_and_is_not_a_precision_problem():
    for run in report_for("corrupt_data").runs:
        assert run.first_issue.source == "data/corrupt_batch.npy[5]"
        assert run.first_issue.numbers["bad_samples"] == [5]
        assert run.fixes[0].id == "data"
        assert not run.precision_problem
    fp16 = next(r for r in report_for("corrupt_data").runs if r.precision.value == "fp16")
    assert "not a precision problem" in " ".join(fp16.notes)


def test_drifted_output_names_the_weight_cast():
    run = next(r for r in report_for("fp16_activation_overflow").runs if r.precision.value == "fp16")
    assert "critic.net.6.bias" in run.first_issue.detail and "65504" in run.first_issue.detail
    fix = next(f for f in run.fixes if f.id == "fp32-module")
    # The layer is built in the user's models.py: the patch wraps it where it is built, keeping its weights' names.
    assert "+        layers += [_nanprobe_fp32(nn.Conv2d(c_in, 1, 4, 1, 0)), nn.Flatten()]" in fix.patch


def test_healthy_run_skips_first_scaled_step_without_failing():
    fp16 = next(r for r in report_for("healthy_dcgan").runs if r.precision.value == "fp16")
    assert fp16.status.value == "ok"
    assert len(fp16.skipped) >= 1 and fp16.skipped[0].cause is not None  # inf at scale 65536, then fine
    assert all(m.scale < 65536 for m in fp16.metrics)


runner = CliRunner()


def test_cli_healthy_exits_0_and_prints_verdicts():
    result = runner.invoke(app, ["diagnose", str(CONFIGS / "healthy_dcgan.yaml"), "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "No underflow, overflow or NaN" in result.output
    for p in ("fp32", "fp16", "bf16"):
        assert p in result.output


def test_cli_fail_on_threshold_and_json_stdout():
    cfg = str(CONFIGS / "amp_no_loss_scaling.yaml")
    result = runner.invoke(app, ["diagnose", cfg, "--dtypes", "fp16", "--json", "-", "-q"])
    assert result.exit_code == 0  # underflow is below the default --fail-on overflow
    doc = json.loads(result.stdout)
    assert doc["schema"] == 1 and doc["torch"] and doc["device"] == "cpu"
    (run,) = doc["runs"]
    assert run["precision"] == "fp16" and run["status"] == "underflow"
    assert set(run["first_issue"]) >= {"kind", "op", "module", "phase", "step", "source", "detail"}
    assert run["first_issue"]["phase"] == "backward"
    assert run["fixes"][0]["id"] == "grad-scaler" and run["fixes"][0]["snippet"]
    assert {"loss", "penalty", "grad_norm"} <= set(run["metrics"][0])
    strict = runner.invoke(app, ["diagnose", cfg, "--dtypes", "fp16", "--fail-on", "underflow", "-q"])
    assert strict.exit_code == 1


def test_cli_terminal_report_shows_culprit_and_fix(tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["diagnose", str(CONFIGS / "fp16_activation_overflow.yaml"), "--json", str(out)])
    assert result.exit_code == 1
    text = result.output
    assert "overflow" in text and "critic.net.6" in text and "fix: fp32-module" in text
    assert json.loads(out.read_text())["runs"][1]["first_issue"]["module"] == "critic.net.6"


def test_bad_init_names_the_layers_off_the_he_scale_and_the_init_call():
    report = report_for("bad_init")
    flagged = [c.module for c in report.init if c.flagged]
    assert flagged[:2] == ["critic.net.2", "critic.net.4"] and "critic.net.6" in flagged
    layer = next(c for c in report.init if c.module == "critic.net.6")
    assert layer.ratio > 8 and layer.nonlinearity == "leaky_relu(0.2)" and layer.output_std > 1e4  # near fp16's max
    fp16 = next(r for r in report.runs if r.precision.value == "fp16")
    fix = fp16.fixes[0]
    assert fix.id == "init" and fp16.first_issue.module == "critic.net.6"
    assert "nn.init.kaiming_normal_(critic.net[6].weight, a=0.2)" in fix.snippet
    assert f"critic.net.6: weight std {layer.std:.3g}, He value {layer.he:.3g} ({layer.ratio:.3g}x)" in fix.snippet
    doc = json.loads(report.to_json())
    assert [c["module"] for c in doc["init"] if c["flagged"]] == flagged
    assert {"std", "he", "glorot", "ratio", "output_std", "call"} <= set(doc["init"][0])
    console = Console(record=True, width=100)
    render.report(report, console)
    text = console.export_text()
    assert "initialisation: weight std against He" in text and "critic.net.12" in text


def test_healthy_and_corrupt_examples_data_and_init_checks():
    healthy = report_for("healthy_dcgan")
    assert healthy.data is None and healthy.init and not any(c.flagged for c in healthy.init)
    corrupt = report_for("corrupt_data")
    assert corrupt.data.nonfinite.indices == (5,) and corrupt.data.scope == "replayed"
    assert json.loads(corrupt.to_json())["data"]["problems"] == ["non-finite"]
