"""Replays are reproducible: every global generator a user's step draws from is seeded and restored.

The step here is written as PyTorch-GAN writes WGAN-GP: alpha from `np.random.uniform`, and a random
flip from Python's `random`. Every precision must see the same draws, two runs must give the same
JSON byte for byte, and the caller's own generators must be left as they were.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import nanprobe
from tests.conftest import FIXTURES, line_of

GAN = FIXTURES / "numpy_random_gan.py"


def _config(tmp_path: Path, dtypes=("fp16", "bf16"), steps: int = 2) -> Path:
    doc = {
        "model": {"critic": f"{GAN}:Discriminator", "generator": f"{GAN}:Generator", "latent_dim": 8},
        "data": {"shape": [3, 8, 8], "batch_size": 4},
        "loss": {"step": f"{GAN}:critic_step"},
        "train": {"steps": steps},
        "precision": {"dtypes": list(dtypes)},
        "device": "cpu",
        "seed": 0,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return _config(tmp_path_factory.mktemp("seed"))


@pytest.fixture(scope="module")
def first(config):
    return nanprobe.diagnose(config)


def test_same_seed_gives_byte_identical_json_when_the_step_draws_from_numpy_and_random(config, first):
    again = nanprobe.diagnose(config)
    assert again.to_json() == first.to_json()


def test_every_precision_sees_the_same_alpha_and_flip(first):
    # With the same draws, bf16 and fp16 move the penalty by rounding only (~1e-5 here); with fresh
    # draws per precision it moved by ~1e-2, far more than any rounding.
    fp32 = {m.step: m.penalty for m in first.runs[0].metrics}
    for run in first.runs[1:]:
        for m in run.metrics:
            assert m.penalty == pytest.approx(fp32[m.step], rel=2e-3), (run.precision, m.step)


def test_the_callers_generators_are_left_as_they_were(config):
    torch.manual_seed(1234)
    np.random.seed(4321)
    random.seed(99)
    expected = (torch.rand(3).tolist(), np.random.uniform(size=3).tolist(), [random.random() for _ in range(3)])
    torch.manual_seed(1234)
    np.random.seed(4321)
    random.seed(99)
    nanprobe.diagnose(config, dtypes=["bf16"], steps=1)
    got = (torch.rand(3).tolist(), np.random.uniform(size=3).tolist(), [random.random() for _ in range(3)])
    assert got == expected


def test_compare_precisions_does_not_depart_at_the_numpy_draw(config):
    comparison = nanprobe.compare_precisions(config, steps=1)
    draw = f"numpy_random_gan.py:{line_of(GAN, 'np.random.uniform')}"
    for s in comparison.summaries[1:]:
        assert s.departs_at is None or not (s.departs_at.source or "").endswith(draw), s.departs_at
    assert comparison.summaries[1].loss_rel_error < 1e-3  # was ~1e-2 with fresh draws per precision
