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
from tests.conftest import FIXTURES, line_of, load_fixture_module

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


def test_init_finds_a_stylegan2_generator_and_writes_generator_call(tmp_path):
    from nanprobe.io.scaffold import scaffold

    result = scaffold(MODELS, config_path=tmp_path / "c.yaml")
    assert (result.critic.name, result.generator.name, result.generator.call) == (
        "SmallCritic", "MappedGenerator", "[z]")
    assert 'generator_call: "[z]"' in result.text
    (tmp_path / "c.yaml").write_text(result.text)
    out = runner.invoke(app, ["diagnose", str(tmp_path / "c.yaml"), "--dtypes", "fp32", "-q"])
    assert out.exit_code == 0, out.output


def test_init_lists_each_rejected_generator_with_its_reason(tmp_path):
    models = tmp_path / "models.py"
    models.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Critic(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(3 * 8 * 8, 1)\n\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1))\n\n\n"
        "class Generator(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(128, 3 * 8 * 8)\n\n"
        "    def forward(self, z):\n        return self.fc(z).view(-1, 3, 8, 8) + undefined_name  # BUG\n\n\n"
        "class Flat(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(128, 16)\n\n"
        "    def forward(self, z):\n        return self.fc(z)\n")
    out = runner.invoke(app, ["init", str(models), "-o", str(tmp_path / "c.yaml")])
    assert out.exit_code == 0, out.output
    assert "no generator" in out.output
    bug = line_of(models, "# BUG")
    assert "not the generator: Generator: Generator(z) with z [2, 128] raised NameError: name 'undefined_name' " \
           f"is not defined ({models}:{bug})" in out.output
    assert "not the generator: Flat: Flat(z) with z [2, 128] returns [2, 16], not an image batch [B, C, H, W]" \
        in out.output
