"""Keras 3 critics, diagnosed on Keras's torch backend: the TensorFlow question's three suspects as
Keras examples, Keras files and checkpoints, dtype policies, layer names and fixes in Keras terms.
Skipped when keras is not installed (pip install 'nanprobe[keras]')."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanprobe.io.keras import select_backend

select_backend()  # before keras is imported: its torch backend, as nanprobe uses it
keras = pytest.importorskip("keras")

from typer.testing import CliRunner  # noqa: E402

import nanprobe  # noqa: E402
from nanprobe.cli import app  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
runner = CliRunner()
_reports: dict = {}


def report_for(name: str, **overrides):
    key = (name, tuple(sorted((k, str(v)) for k, v in overrides.items())))
    if key not in _reports:
        _reports[key] = nanprobe.diagnose(CONFIGS / f"{name}.yaml", **overrides)
    return {r.precision.value: r for r in _reports[key].runs}


def _models():
    sys.path.insert(0, str(CONFIGS))
    try:
        import keras_models
    finally:
        sys.path.remove(str(CONFIGS))
    return keras_models


def test_penalty_flushes_under_mixed_float16():
    runs = report_for("keras_wgan_gp_fp16_underflow")
    assert runs["fp32"].status.value == "ok" and runs["bf16"].status.value == "ok"
    fp16 = runs["fp16"]
    assert fp16.status.value == "nan" and fp16.precision_problem
    issue, nonfinite = fp16.first_issue, fp16.first_nonfinite
    # Keras layer paths, and the line of the user's model file that built the layer.
    assert issue.kind.value == "underflow" and issue.module.startswith("critic/")
    assert issue.source.startswith("keras_models.py:")
    assert nonfinite.node == "SqrtBackward0" and nonfinite.phase.value == "backward"
    fix = fp16.fixes[0]
    assert fix.id == "safe-norm" and "keras.ops.sqrt" in fix.snippet and "torch" not in fix.snippet
    # No torch-only fix is offered: the penalty cannot be taken "outside autocast" in Keras.
    assert "gp-fp32" not in {f.id for f in fp16.fixes}


def test_custom_step_with_keras_ops_points_at_its_sqrt():
    runs = report_for("keras_custom_step", dtypes=["fp16"])
    fp16 = runs["fp16"]
    assert fp16.status.value == "nan"
    assert fp16.first_nonfinite.node == "SqrtBackward0"
    assert fp16.first_nonfinite.source == "keras_train.py:19"  # the keras.ops.sqrt line
    assert fp16.metrics[0].penalty == pytest.approx(10.0, rel=1e-3)


def test_too_high_an_adam_learning_rate_fails_a_later_step():
    runs = report_for("keras_high_lr_adam")
    assert runs["fp32"].status.value == "ok" and runs["bf16"].status.value == "ok"
    fp16 = runs["fp16"]
    assert fp16.status.value in ("overflow", "nan")
    assert fp16.first_issue.step >= 1 and fp16.first_issue.module.startswith("critic/")
    assert fp16.metrics[0].loss is not None  # step 0 was fine
    fix = fp16.fixes[0]
    assert fix.id == "lower-lr" and "keras.optimizers.Adam(learning_rate=0.02)" in fix.snippet
    assert fix.apply == "train.lr: 0.02"


def test_non_glorot_init_overflows_and_the_fix_is_a_keras_initializer():
    runs = report_for("keras_bad_init", dtypes=["fp32", "fp16"], verify_fix=True)
    fp16 = runs["fp16"]
    issue = fp16.first_issue
    assert (fp16.status.value, issue.kind.value, issue.phase.value) == ("nan", "overflow", "forward")
    assert issue.module == "critic/conv_out" and issue.source.startswith("keras_models.py:")
    fix = fp16.fixes[0]
    assert fix.id == "init" and "keras.initializers.HeNormal" in fix.snippet
    assert 'critic.get_layer("conv_out").kernel.assign' in fix.snippet
    assert fix.verified is True  # --verify-fix: the He redraw, replayed under mixed_float16, is ok
    module_fix = next(f for f in fp16.fixes if f.id == "fp32-module")
    assert 'critic.get_layer("conv_out").dtype_policy = "float32"' in module_fix.snippet
    assert module_fix.apply == "precision.fp32_modules: [critic/conv_out]"


def test_a_layer_built_in_float32_stays_float32():
    from nanprobe.engine.keras import policy_name
    from nanprobe.enums import Mode, Precision
    from nanprobe.io.keras import KerasModel, from_factory, named_layers

    km = from_factory(_models().dcgan_critic, {"img": 8, "ch": 4}, "critic", ())
    assert isinstance(km, KerasModel)
    model = km.build(policy_name(Precision.FP16, Mode.AMP), keep_fp32=("critic/down8",))
    policies = {path: layer.dtype_policy.name for path, layer in named_layers(model, "critic")}
    assert policies["critic/score"] == "float32"  # dtype="float32" in the model file
    assert policies["critic/down8"] == "float32"  # precision.fp32_modules
    assert policies["critic/conv_out"] == "mixed_float16"
    assert {v.dtype for v in model.weights} == {"float32"}  # mixed: variables stay float32
    half = km.build(policy_name(Precision.BF16, Mode.HALF))
    assert "bfloat16" in {v.dtype for v in half.weights}


def test_a_keras_file_with_a_few_lines_of_config(tmp_path):
    """A .keras file saved under mixed_float16 and a .weights.h5 checkpoint; exit 1 and the layer named."""
    models = _models()
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        critic = models.dcgan_critic(img=16, ch=16, extra=1, init_std=1.0)
    finally:
        keras.config.set_dtype_policy(old)
    critic.save(tmp_path / "critic.keras")
    critic.save_weights(tmp_path / "critic.weights.h5")
    (tmp_path / "config.yaml").write_text(
        "model:\n  critic: critic.keras\n  checkpoint: critic.weights.h5\n"
        "data: {batch_size: 4}\ntrain: {steps: 1}\nprecision: {dtypes: [fp32, fp16]}\n", encoding="utf-8")
    result = runner.invoke(app, ["diagnose", str(tmp_path / "config.yaml"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "critic/conv_out" in result.output and "keras.initializers" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    fp16 = next(r for r in report["runs"] if r["precision"] == "fp16")
    assert fp16["first_issue"]["module"] == "critic/conv_out"
    # compare-precisions works for it too
    result = runner.invoke(app, ["compare-precisions", str(tmp_path / "config.yaml"), "--dtypes", "fp16"])
    assert result.exit_code in (0, 1), (result.output, result.exception)
    assert "critic/conv_out" in result.output


def test_a_legacy_h5_file_and_a_wrong_checkpoint(tmp_path):
    models = _models()
    models.dcgan_critic(img=8, ch=4).save(tmp_path / "critic.h5")
    models.dcgan_critic(img=16, ch=4).save_weights(tmp_path / "other.weights.h5")
    (tmp_path / "config.yaml").write_text(
        "model:\n  critic: critic.h5\n  checkpoint: other.weights.h5\n", encoding="utf-8")
    result = runner.invoke(app, ["diagnose", str(tmp_path / "config.yaml")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("nanprobe: error: model.checkpoint: other.weights.h5")
    assert "Traceback" not in result.output


def test_without_keras_a_keras_file_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "critic.keras").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("model: {critic: critic.keras}\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras now raises ImportError
    result = runner.invoke(app, ["diagnose", str(tmp_path / "config.yaml")])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "pip install 'nanprobe[keras]'" in line and "Traceback" not in result.output


def test_keras_on_another_backend_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    (tmp_path / "config.yaml").write_text(f"model: {{critic: '{CONFIGS / 'keras_models.py'}:dcgan_critic'}}\n",
                                          encoding="utf-8")
    result = runner.invoke(app, ["diagnose", str(tmp_path / "config.yaml")])
    assert result.exit_code == 2
    assert "tensorflow backend" in result.output and "KERAS_BACKEND=torch" in result.output


def test_help_and_pytorch_runs_never_import_keras():
    # and the user's KERAS_BACKEND is theirs again once nanprobe has imported their files
    code = ("import os, sys, nanprobe.cli, nanprobe.api, nanprobe.io.loading\n"
            "from nanprobe.io.keras import torch_backend\n"
            "os.environ['KERAS_BACKEND'] = 'jax'\n"
            "with torch_backend():\n"
            "    inside = os.environ['KERAS_BACKEND']\n"
            "print('keras' in sys.modules, inside, os.environ['KERAS_BACKEND'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False torch jax", out.stdout + out.stderr


def test_a_saved_mixed_model_keeps_its_float32_layer(tmp_path):
    from nanprobe.engine.keras import policy_name
    from nanprobe.enums import Mode, Precision
    from nanprobe.io.keras import load_file, named_layers

    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        _models().dcgan_critic(img=8, ch=4).save(tmp_path / "critic.keras")
    finally:
        keras.config.set_dtype_policy(old)
    km = load_file(tmp_path / "critic.keras", "model.critic", "critic")
    for precision, conv in ((Precision.FP32, "float32"), (Precision.BF16, "mixed_bfloat16")):
        policies = {p: layer.dtype_policy.name for p, layer in named_layers(km.build(policy_name(precision, Mode.AMP)),
                                                                               "critic")}
        assert policies["critic/conv_out"] == conv and policies["critic/score"] == "float32"


def test_a_keras_generator_makes_the_fakes():
    overrides = {"model.critic_args": {"img": 8, "ch": 8}, "model.generator": "keras_models.py:dcgan_generator",
                 "model.generator_args": {"latent_dim": 16, "img": 8}, "model.latent_dim": [16]}
    report = nanprobe.diagnose(CONFIGS / "keras_bad_init.yaml", dtypes=["fp32", "bf16"], **overrides)
    assert [r.status.value for r in report.runs] == ["ok", "ok"]


def test_a_keras_diagnose_gives_the_same_json_in_a_new_process(tmp_path):
    # Keras draws each unseeded initializer's seed from Python's `random` when the layer is built, so
    # the critic's initial weights changed from process to process until loading seeded it: within
    # one process every replay shared one template and nothing showed.
    cmd = [sys.executable, "-m", "nanprobe", "diagnose", str(CONFIGS / "keras_high_lr_adam.yaml"),
           "--dtypes", "fp16", "--steps", "2", "--format", "json"]
    first, second = (subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
                     for _ in range(2))
    assert first.returncode == second.returncode == 1, first.stderr[-2000:]
    assert first.stdout == second.stdout
    assert json.loads(first.stdout)["runs"][0]["status"] == "nan"  # the example still fails
