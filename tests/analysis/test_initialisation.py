"""Initialisation check: weight std against Glorot/He per layer, the output scale, and the flags."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import nanprobe
from nanprobe.analysis.initialisation import check, he_ratios
from nanprobe.formats import table as render
from nanprobe.thresholds import INIT_FACTOR


def critic(scale: float | None = None, layer: int = 2) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 4 * 4, 1))
    if scale is not None:
        nn.init.normal_(net[layer].weight, 0.0, scale * math.sqrt(2.0) / math.sqrt(net[layer].weight[0].numel()))
    return net


def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(8, 3, 8, 8) * 2 - 1


def test_default_init_is_not_flagged_and_values_are_he_and_glorot():
    checks = check(critic(), batch(), root="critic")
    assert [c.module for c in checks] == ["critic.0", "critic.2", "critic.5"]
    assert not any(c.flagged for c in checks)
    first, second, last = checks
    assert (first.fan_in, first.fan_out) == (27, 144)
    assert first.nonlinearity == "leaky_relu(0.2)" and not first.assumed
    assert first.he == pytest.approx(math.sqrt(2 / (1 + 0.2**2)) / math.sqrt(27))
    assert first.glorot == pytest.approx(math.sqrt(2 / (27 + 144)))
    assert second.nonlinearity == "relu" and second.he == pytest.approx(math.sqrt(2 / 256))
    assert last.nonlinearity == "linear" and last.he == pytest.approx(1 / math.sqrt(512))
    # PyTorch's default init, kaiming_uniform(a=sqrt(5)): std 1/sqrt(3 fan_in), about 0.4-0.6 of He.
    assert all(0.3 < c.ratio < 0.8 for c in checks), [c.ratio for c in checks]


def test_a_badly_scaled_layer_is_flagged_with_its_output_scale():
    good, bad = check(critic(), batch()), check(critic(scale=20.0), batch())
    flags = {c.module: c.flagged for c in bad}
    assert flags == {"critic.0": False, "critic.2": True, "critic.5": False}
    layer = bad[1]
    assert layer.ratio == pytest.approx(20.0, rel=0.1) and layer.ratio >= INIT_FACTOR
    # Its output scale grows with its weights: ~20x the He-scaled layer's gain on the same input.
    assert layer.input_std == pytest.approx(good[1].input_std)
    assert layer.output_std / layer.input_std > 10 * good[1].output_std / good[1].input_std
    assert layer.call == 'nn.init.kaiming_normal_(critic[2].weight, nonlinearity="relu")'


def test_a_tiny_init_is_flagged_and_he_ratios_agree():
    checks = check(critic(scale=0.01, layer=0), batch())
    assert checks[0].flagged and checks[0].ratio < 0.02
    assert he_ratios(critic(scale=0.01, layer=0)) == pytest.approx({c.module: c.ratio for c in checks})


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.b(F.leaky_relu(self.bn(self.a(x)), 0.2))


def test_functional_activation_is_assumed_and_state_is_restored():
    model = Functional().eval()
    hooks_before = len(model.a._forward_hooks)
    running = model.bn.running_mean.clone()
    checks = check(model, torch.randn(16, 4))
    assert checks[0].nonlinearity == "leaky_relu(0.2)" and checks[0].assumed
    assert checks[1].nonlinearity == "linear" and not checks[1].assumed
    assert checks[0].output_std is not None and checks[1].output_std is not None
    assert not model.training and len(model.a._forward_hooks) == hooks_before
    assert torch.equal(model.bn.running_mean, running)  # the train-mode forward did not move batch norm's stats


def test_without_a_batch_the_weights_are_still_checked():
    checks = check(critic(scale=20.0))
    assert [c.flagged for c in checks] == [False, True, False] and all(c.output_std is None for c in checks)


def test_a_forward_that_fails_still_gives_the_weight_check():
    checks = check(critic(), torch.zeros(2, 5, 8, 8))  # wrong channels
    assert len(checks) == 3 and all(c.output_std is None for c in checks)


def test_diagnose_reports_init_and_the_data_it_replays(write_config, tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(6, 3, 8, 8)).astype(np.uint8)
    np.save(tmp_path / "images.npy", x)
    cfg = write_config(data={"source": "file", "path": "images.npy", "batch_size": 2, "shape": [3, 8, 8]},
                       train={"steps": 2})
    report = nanprobe.diagnose(cfg)
    assert report.data.scope == "replayed" and report.data.samples == 4
    assert not report.data.range.ok and report.data.range.transform == "x / 127.5 - 1"
    assert [c.module for c in report.init] == ["critic.net.0", "critic.net.2"]
    assert report.init[0].output_std is not None
    doc = report.to_dict()
    assert doc["data"]["problems"] == ["range"] and doc["init"][0]["module"] == "critic.net.0"
    console = Console(record=True, width=120)
    render.report(report, console)
    text = console.export_text()
    assert "range  4 of the 4 replayed samples" in text and "use x = x / 127.5 - 1" in text
    assert "nanprobe check-data" in text
    assert "initialisation" not in text  # nothing flagged: no init table


def test_diagnose_with_synthetic_data_has_no_data_check(write_config):
    report = nanprobe.diagnose(write_config())
    assert report.data is None and report.to_dict()["data"] is None
