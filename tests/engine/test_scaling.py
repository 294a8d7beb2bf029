"""Loss scaling: the scale per step, a scale that collapses, and the penalty's AMP recipe in a custom step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nanprobe
from nanprobe.cli import app
from nanprobe.errors import UserCodeError
from nanprobe.io import config as cfg
from tests.conftest import FIXTURES, base_doc, line_of, merge, ref

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = FIXTURES / "scaled_steps.py"
runner = CliRunner()


@pytest.fixture(scope="module")
def collapse(tmp_path_factory):
    out = tmp_path_factory.mktemp("collapse") / "report.json"
    result = runner.invoke(app, ["diagnose", str(CONFIGS / "scaler_collapse.yaml"), "--json", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    runs = {r["precision"]: r for r in json.loads(out.read_text())["runs"]}
    return result.output, runs


def _scaled_config(step: str, **patch) -> cfg.Config:
    doc = merge(base_doc(), {"loss": {"step": ref(step, STEPS)}, "train": {"grad_scaler": True, "steps": 1},
                             "precision": {"dtypes": ["fp16"]}, **patch})
    return cfg.from_dict(doc, base_dir=Path.cwd())


def test_collapse_names_the_op_that_keeps_making_inf(collapse):
    _, runs = collapse
    assert runs["fp32"]["status"] == "ok" and runs["bf16"]["status"] == "ok"
    fp16 = runs["fp16"]
    assert fp16["status"] == "nan"
    c = fp16["scale_collapse"]
    assert c["kind"] in ("overflow", "nan") and c["node"] == "SqrtBackward0" and c["source"] == "train.py:24"
    assert c["numbers"]["never_recovered"] == [0, 1]
    assert c["numbers"]["scale_lowest"] < c["numbers"]["scale_start"] / 16
    assert "loss scaling cannot fix" in c["detail"]
    # The scale per step falls, and every step is marked skipped.
    scales = [m["scale"] for m in fp16["metrics"]]
    assert len(scales) == 2 and scales[1] < scales[0] < 65536 and all(m["skipped"] for m in fp16["metrics"])
    ids = [f["id"] for f in fp16["fixes"]]
    assert "scale-collapse" in ids


def test_custom_step_without_the_recipe_is_told_to_scale_its_penalty(collapse):
    text, runs = collapse
    fp16 = runs["fp16"]
    unscaled = fp16["unscaled_penalty"]
    assert unscaled["op"] == "torch.autograd.grad" and unscaled["source"] == "train.py:17"
    top = fp16["fixes"][0]
    assert top["id"] == "gp-scaled" and top["apply"] is None  # a custom step needs the code change
    assert "scaler=None" in top["snippet"]
    assert runs["bf16"]["unscaled_penalty"] is None  # bf16 needs no loss scaling
    assert "scale collapse" in text and "penalty recipe" in text and "scale per step" in text


def test_custom_step_following_the_recipe_gets_the_scaler_and_passes():
    report = nanprobe.diagnose(_scaled_config("recipe_step"))
    (fp16,) = report.runs
    assert fp16.unscaled_penalty is None


def test_custom_step_calling_grad_on_raw_outputs_is_found():
    report = nanprobe.diagnose(_scaled_config("unscaled_step"))
    (fp16,) = report.runs
    assert fp16.unscaled_penalty is not None
    assert fp16.unscaled_penalty.source.endswith(f"scaled_steps.py:{line_of(STEPS, 'UNSCALED-GRAD')}")


def test_builtin_penalty_follows_the_recipe():
    doc = merge(base_doc(), {"loss": {"kind": "wgan-gp"}, "train": {"grad_scaler": True, "steps": 1},
                             "precision": {"dtypes": ["fp16"]}})
    (fp16,) = nanprobe.diagnose(cfg.from_dict(doc, base_dir=Path.cwd())).runs
    assert fp16.unscaled_penalty is None


def test_a_step_may_require_the_scaler_and_gets_none_without_one():
    off = nanprobe.diagnose(_scaled_config("needs_scaler_step", train={"grad_scaler": False, "steps": 1}))
    on = nanprobe.diagnose(_scaled_config("needs_scaler_step"))
    assert off.runs[0].metrics[0].extra["scaler_on"] == 0.0
    assert on.runs[0].metrics[0].extra["scaler_on"] == 1.0


def test_autograd_grad_and_scaler_are_restored_even_when_the_step_fails():
    grad, scale = torch.autograd.grad, torch.amp.GradScaler.scale
    with pytest.raises(UserCodeError, match="the step broke"):
        nanprobe.diagnose(_scaled_config("raising_step"))
    assert torch.autograd.grad is grad and torch.amp.GradScaler.scale is scale
