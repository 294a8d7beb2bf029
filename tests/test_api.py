"""The Python API: configs built in Python with modules, functions and tensors, checked as YAML ones are."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import nanprobe
from nanprobe import ConfigError
from nanprobe.io.config import Config, DataConfig, LossConfig, ModelConfig, PrecisionConfig, TrainConfig
from tests.conftest import FIXTURES, base_doc, line_of, load_fixture_module

STEPS_FILE = FIXTURES / "watch_steps.py"
steps = load_fixture_module(STEPS_FILE)


def python_config(tiny, **sections) -> Config:
    """The conftest base document, built in Python: the models are modules made from the same seed."""
    torch.manual_seed(0)
    critic, generator = tiny.TinyCritic(), tiny.TinyGenerator()
    parts = {"model": ModelConfig(critic=critic, generator=generator, latent_dim=(8,)),
             "data": DataConfig(shape=(3, 8, 8), batch_size=2), "loss": LossConfig(kind="wgan-gp"),
             "train": TrainConfig(steps=1), "precision": PrecisionConfig(dtypes=("fp32",))}
    parts.update(sections)
    return Config(**parts, device="cpu", seed=0)


def runs(report) -> list:
    out = report.to_dict()["runs"]
    for run in out:
        run.pop("timing", None)
    return out


def test_a_python_config_gives_the_report_its_yaml_twin_gives(tiny, write_config):
    from_yaml = nanprobe.diagnose(write_config(base_doc()))
    from_python = nanprobe.diagnose(python_config(tiny))
    assert runs(from_python) == runs(from_yaml)
    assert from_python.settings["model"]["critic"] == "<TinyCritic>"
    json.loads(from_python.to_json())


def test_modules_passed_in_are_never_changed(tiny):
    """A checkpoint is loaded and a half-mode replay casts the model: both happen to copies."""
    config = python_config(tiny, precision=PrecisionConfig(mode="half", dtypes=("fp32", "bf16")))
    critic = config.model.critic
    critic.eval()
    checkpoint = {"critic": {k: torch.full_like(v, 0.01) for k, v in critic.state_dict().items()}}
    config = replace(config, model=replace(config.model, checkpoint=checkpoint))
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    report = nanprobe.diagnose(config)
    assert [r.precision.value for r in report.runs] == ["fp32", "bf16"]
    after = critic.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)
    assert not critic.training


def test_a_step_function_and_a_tensor_batch(tiny):
    data = torch.rand(4, 3, 8, 8) * 2 - 1
    config = python_config(tiny, data=DataConfig(source="file", path=data, batch_size=2),
                           loss=LossConfig(step=steps.zero_norm_step), train=TrainConfig(steps=2))
    (run,) = nanprobe.diagnose(config).runs
    assert run.status.value == "nan" and run.first_nonfinite.node == "SqrtBackward0"
    assert run.first_nonfinite.source.endswith(f"watch_steps.py:{line_of(STEPS_FILE, 'ZERO-NORM')}")


def test_overrides_apply_to_python_configs(tiny):
    report = nanprobe.diagnose(python_config(tiny), dtypes=["fp32", "bf16"], steps=2)
    assert [r.precision.value for r in report.runs] == ["fp32", "bf16"]
    assert len(report.runs[0].metrics) == 2


@pytest.mark.parametrize("change, message", [
    ({"model": ModelConfig(critic=42)},
     "model.critic: expected 'file.py:Name' or (from Python) an nn.Module, class or function, got 42 (int)"),
    ({"model": ModelConfig(critic=None)}, "model.critic is missing"),
    ({"data": DataConfig(batch_size=0)}, "data.batch_size: must be >= 1, got 0"),
    ({"data": DataConfig(source="file", path=[1, 2])}, "data.path: expected a non-empty string, got [1, 2] (list)"),
    ({"data": DataConfig(source="file", path=torch.zeros(3, 8, 8))},
     "data.path: the tensor passed has shape [3, 8, 8]; expected [N, C, H, W]"),
    ({"loss": LossConfig(step=lambda critic, real: 0)},
     "loss.step: <lambda>(critic, real) must take (critic, generator, real, z)"),
    ({"loss": LossConfig(kind="wgan")}, "loss.kind: must be one of wgan-gp, r1, hinge, non-saturating, got 'wgan'"),
    ({"train": TrainConfig(lr=-1.0)}, "train.lr: must be > 0.0, got -1.0"),
    ({"precision": PrecisionConfig(dtypes=())}, "precision.dtypes: expected a non-empty list"),
    ({"train": "fast"}, "train: expected a TrainConfig, got 'fast' (str)"),
])
def test_python_configs_are_checked_like_yaml(tiny, change, message):
    with pytest.raises(ConfigError) as info:
        nanprobe.diagnose(python_config(tiny, **change))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_diagnose_rejects_what_is_not_a_config():
    with pytest.raises(ConfigError, match="expected a nanprobe Config or the path of a YAML config, got int"):
        nanprobe.diagnose(42)


def test_documented_exports():
    from nanprobe import errors

    for name in ("ConfigError", "UserCodeError", "DeviceError", "NanprobeError", "NonFiniteError",
                 "NonFiniteWarning", "diagnose", "watch", "Config", "Report"):
        assert name in nanprobe.__all__ and getattr(nanprobe, name) is not None
    assert nanprobe.ConfigError is errors.ConfigError
    assert issubclass(nanprobe.NonFiniteError, FloatingPointError)
    assert callable(nanprobe.watch)
