"""Any generator: a StyleGAN2-style one (a list of latents in, a tuple out) needs no wrapper."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import nanprobe
from nanprobe import ConfigError
from nanprobe.cli import app
from nanprobe.io import config as cfg
from tests.conftest import FIXTURES, load_fixture_module

MODELS = FIXTURES / "stylegan_models.py"
sg = load_fixture_module(MODELS)
runner = CliRunner()


def write_config(tmp_path, loss: dict | None = None, **model) -> str:
    import yaml

    doc = {"model": {"critic": f"{MODELS}:SmallCritic", "generator": f"{MODELS}:MappedGenerator",
                     "latent_dim": 8, **model},
           "data": {"source": "synthetic", "shape": [3, 8, 8], "batch_size": 2},
           "loss": loss or {"kind": "wgan-gp"}, "train": {"steps": 1}, "precision": {"dtypes": ["fp32"]},
           "device": "cpu", "seed": 0}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


def test_a_list_in_tuple_out_generator_runs_with_generator_call(tmp_path):
    result = runner.invoke(app, ["diagnose", write_config(tmp_path, generator_call="[z]"), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert run["status"] == "ok" and run["metrics"][0]["penalty"] is not None


def test_without_generator_call_the_error_says_which_key_fixes_it(tmp_path):
    result = runner.invoke(app, ["diagnose", write_config(tmp_path), "-q"])
    assert result.exit_code == 2
    assert "styles must be a list of latent tensors" in result.output
    assert "stylegan_models.py" in result.output


def test_the_dry_run_skips_the_generator_when_the_step_draws_its_own_fakes(tmp_path):
    # No generator_call: only the user's step calls the generator, and it knows how.
    path = write_config(tmp_path, loss={"step": f"{MODELS}:own_fakes_step"})
    result = runner.invoke(app, ["diagnose", path, "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["status"] == "ok"


def test_a_bad_generator_call_is_one_line():
    with pytest.raises(ConfigError, match=r"model.generator_call: must be one of z, \[z\], got 'list'"):
        cfg.check(cfg.Config(model=cfg.ModelConfig(critic=sg.SmallCritic(), generator_call="list")))


def test_watch_replays_a_stylegan2_generator_without_a_wrapper():
    torch.manual_seed(0)
    critic, generator = sg.SmallCritic(), sg.MappedGenerator()
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.9))
    w = nanprobe.watch(critic, generator, opt, loss="wgan-gp", generator_call="[z]")
    real, z = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 8)
    with w.step(real, z) as s:
        opt.zero_grad()
        fake, _ = generator([z])
        s.loss = critic(fake.detach()).mean() - critic(real).mean()
        s.loss.backward()
        opt.step()
    (run,) = nanprobe.diagnose(w.config()).runs
    assert run.status.value == "ok" and run.metrics[0].penalty is not None


def test_watch_takes_any_callable_as_the_generator():
    torch.manual_seed(0)
    critic, net = sg.SmallCritic(), sg.MappedGenerator()
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    w = nanprobe.watch(critic, lambda z: net([z])[0], opt, loss="wgan-gp")
    real, z = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 8)
    with w.step(real, z):
        opt.zero_grad()
        critic(real).mean().backward()
        opt.step()
    (run,) = nanprobe.diagnose(w.config()).runs
    assert run.status.value == "ok"
