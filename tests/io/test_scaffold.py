"""`nanprobe init`: finds critic and generator, writes a commented config that diagnoses unchanged."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import nanprobe
from nanprobe.cli import app
from tests.conftest import FIXTURES, TINY, checksums

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "configs" / "models.py"
runner = CliRunner()

# DCGAN's original shapes: z [B, nz, 1, 1] through transposed convs; constructors without defaults.
ARGS_MODELS = '''
import torch
from torch import nn


class Disc(nn.Module):
    def __init__(self, img_size, channels):
        super().__init__()
        self.fc = nn.Linear(channels * img_size * img_size, 1)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Gen(nn.Module):
    def __init__(self, nz):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(nz, 8, 4, 1, 0), nn.ReLU(), nn.ConvTranspose2d(8, 1, 4, 4, 0), nn.Tanh())

    def forward(self, z):
        return self.net(z)
'''  # noqa: E501 (model source written to disk for the test: kept verbatim)


def _init(*args: str):
    return runner.invoke(app, ["init", *map(str, args)])


def test_example_models_give_a_config_that_diagnoses(tmp_path, monkeypatch):
    out_dir = tmp_path / "ci"
    out_dir.mkdir()
    monkeypatch.chdir(tmp_path)  # the paths in the config must not depend on where it is run from
    result = _init(MODELS, "-o", out_dir / "gan.yaml")
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"nanprobe: wrote {out_dir / 'gan.yaml'} (critic DCGANCritic, generator DCGANGenerator, "
                             f"samples 3x32x32); run: nanprobe diagnose {out_dir / 'gan.yaml'}\n")
    text = (out_dir / "gan.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    critic_file, _, critic_name = doc["model"]["critic"].rpartition(":")
    assert (out_dir / critic_file).resolve() == MODELS and critic_name == "DCGANCritic"
    assert doc["model"]["generator"].endswith("models.py:DCGANGenerator")
    assert (doc["model"]["latent_dim"], doc["data"]["shape"]) == (64, [3, 32, 32])
    assert "# The critic, guessed from its name and a dry forward: it maps a batch [B, 3, 32, 32] to scores" in text
    assert "shape: [3, 32, 32]        # guessed: what DCGANGenerator produces and DCGANCritic takes" in text
    monkeypatch.chdir(ROOT)
    diagnosed = runner.invoke(app, ["diagnose", str(out_dir / "gan.yaml"), "--dtype", "bf16", "--quiet"])
    assert diagnosed.exit_code == 0, diagnosed.output


def test_stdout_config_is_relative_to_the_working_directory(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = _init("configs/models.py")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    doc = yaml.safe_load(result.stdout)
    assert doc["model"]["critic"] == "configs/models.py:DCGANCritic"
    assert "# Paths are relative to the folder it is run from" in result.stdout


def test_tiny_fixture_models_pick_the_pair_that_fits(tmp_path):
    out = tmp_path / "tiny.yaml"
    result = _init(TINY, "-o", out)
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text(encoding="utf-8"))
    # WrongShapeGenerator's 3x4x4 samples fit no critic here; the broken classes are passed over.
    assert doc["model"]["critic"].endswith("tiny_models.py:TinyCritic")
    assert doc["model"]["generator"].endswith("tiny_models.py:TinyGenerator")
    assert (doc["model"]["latent_dim"], doc["data"]["shape"]) == (8, [3, 8, 8])
    report = nanprobe.diagnose(out, dtypes=["fp16", "bf16"], **{"data.batch_size": 4})
    assert [r.precision.value for r in report.runs] == ["fp16", "bf16"]


def test_named_factory_and_generator(tmp_path):
    out = tmp_path / "named.yaml"
    result = _init(TINY, "--critic", "make_critic", "--generator", "TinyGenerator", "-o", out)
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert yaml.safe_load(text)["model"]["critic"].endswith("tiny_models.py:make_critic")
    assert "# The critic, named with --critic" in text
    assert "# The generator, named with --generator" in text


def test_constructor_arguments_are_guessed_from_their_names(tmp_path):
    models = tmp_path / "args_models.py"
    models.write_text(ARGS_MODELS, encoding="utf-8")
    out = tmp_path / "args.yaml"
    result = _init(models, "-o", out)
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    assert doc["model"]["critic"] == "args_models.py:Disc"
    assert doc["model"]["critic_args"] == {"img_size": 16, "channels": 1}
    assert doc["model"]["generator_args"] == {"nz": 128}
    assert (doc["model"]["latent_dim"], doc["data"]["shape"]) == ([128, 1, 1], [1, 16, 16])
    assert "critic_args: {img_size: 16, channels: 1}  # guessed from the argument names: check them" in text
    report = nanprobe.diagnose(out, dtypes=["bf16"], **{"data.batch_size": 4})
    assert report.runs[0].status.value == "ok"


def test_critic_only_file_uses_noise_fakes(tmp_path):
    models = tmp_path / "only_critic.py"
    models.write_text(ARGS_MODELS.split("class Gen")[0], encoding="utf-8")
    result = _init(models, "-o", tmp_path / "c.yaml")
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load((tmp_path / "c.yaml").read_text(encoding="utf-8"))
    assert "generator" not in doc["model"] and doc["data"]["shape"] == [3, 32, 32]
    assert "no generator" in result.stderr


def test_never_overwrites_without_force(tmp_path):
    out = tmp_path / "mine.yaml"
    out.write_text("# my own config\n", encoding="utf-8")
    result = _init(MODELS, "-o", out)
    assert result.exit_code == 2
    assert result.stderr == f"nanprobe: error: {out} exists; pass --force to overwrite it\n"
    assert out.read_text(encoding="utf-8") == "# my own config\n"
    assert _init(MODELS, "-o", out, "--force").exit_code == 0
    assert "critic: " in out.read_text(encoding="utf-8")


def test_writes_nothing_next_to_the_models(tmp_path):
    folder = tmp_path / "user"
    shutil.copytree(FIXTURES, folder)
    before = checksums(folder)
    assert _init(folder / "tiny_models.py").exit_code == 0
    assert checksums(folder) == before  # no __pycache__, no config


NEEDS_ARGS = '''
from torch import nn


class Critic(nn.Module):
    def __init__(self, depth, norm):
        super().__init__()
'''


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nothere.py"], "{tmp}/nothere.py: file not found"),
    (["{tmp}/models.txt"], "{tmp}/models.txt: give the Python file that defines your models (a .py file)"),
    (["{fixtures}/broken_import.py"],
     "importing broken_import.py raised ImportError: broken_import needs a package that is not installed "
     "({fixtures}/broken_import.py:9)"),
    (["{root}/configs/train.py"],
     "no nn.Module in train.py maps an image batch (3x32x32, 3x64x64, 1x28x28, 1x32x32, 3x128x128, 3x16x16, 3x8x8) "
     "to scores [B] or [B, 1]; name it with --critic NAME"),
    (["{tmp}/needs_args.py"],
     "no nn.Module in needs_args.py maps an image batch (3x32x32, 3x64x64, 1x28x28, 1x32x32, 3x128x128, 3x16x16, "
     "3x8x8) to scores [B] or [B, 1] (Critic(depth, norm) needs arguments nanprobe cannot guess); "
     "name it with --critic NAME"),
    (["{tiny}", "--critic", "Nope"],
     "--critic: tiny_models.py has no 'Nope'; it defines TinyCritic, TinyGenerator, WrongShapeGenerator, make_critic, "
     "RaisingCritic, raising_factory, TypeErrorCritic, NoScoreCritic"),
    (["{tiny}", "--critic", "NOT_CALLABLE"],
     "--critic: NOT_CALLABLE in tiny_models.py is a int, not a class or factory"),
    (["{tiny}", "--critic", "NoScoreCritic"],
     "--critic NoScoreCritic: NoScoreCritic maps no batch of shape 3x32x32, 3x64x64, 1x28x28, 1x32x32, 3x128x128, "
     "3x16x16, 3x8x8 to scores [B] or [B, 1]"),
    (["{tiny}", "--critic", "RaisingCritic"],
     "--critic RaisingCritic: building RaisingCritic raised RuntimeError: RaisingCritic refuses to build "
     "({fixtures}/tiny_models.py:{raise_line})"),
    (["{tiny}", "-o", "{tmp}/no/such/dir/x.yaml"], "-o: folder {tmp}/no/such/dir does not exist"),
    (["{tmp}/needs_args.py", "-o", "{tmp}/needs_args.py", "--force"],
     "-o: {tmp}/needs_args.py is the models file itself; write the config to a .yaml file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    from tests.conftest import line_of

    (tmp_path / "models.txt").write_text("", encoding="utf-8")
    (tmp_path / "needs_args.py").write_text(NEEDS_ARGS, encoding="utf-8")
    fill = {"tmp": tmp_path, "fixtures": FIXTURES, "root": ROOT, "tiny": TINY,
            "raise_line": line_of(TINY, "RAISE-IN-INIT")}
    result = _init(*(a.format(**fill) for a in args))
    assert result.exit_code == 2, result.output
    assert result.stderr == f"nanprobe: error: {message.format(**fill)}\n"
    assert result.stdout == ""
