"""Training scripts as model files: their definitions run, their training does not."""
from __future__ import annotations

import ast
import json
import textwrap

from typer.testing import CliRunner

from nanprobe.cli import app
from nanprobe.io import scripts

runner = CliRunner()

# Written the way flat GAN scripts are (eriklindernoren/PyTorch-GAN's wgan_gp.py): argparse and the
# models' sizes at module level, a folder made for samples, a dataset that is not on this machine, a
# module nobody installed, and the training loop, all outside any `if __name__ == "__main__":`.
SCRIPT = '''
import argparse
import os
import numpy as np
import torch
import torch.nn as nn
import not_installed_logger as logger
from torch.autograd import Variable

os.makedirs("images", exist_ok=True)

parser = argparse.ArgumentParser()
parser.add_argument("--latent_dim", type=int, default=100, help="dimensionality of the latent space")
parser.add_argument("--img_size", type=int, default=28)
parser.add_argument("--channels", type=int, default=1)
opt = parser.parse_args()
print(opt)

img_shape = (opt.channels, opt.img_size, opt.img_size)
cuda = True if torch.cuda.is_available() else False


class Generator(nn.Module):
    def __init__(self):
        super(Generator, self).__init__()
        self.model = nn.Sequential(nn.Linear(opt.latent_dim, 64), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(64, int(np.prod(img_shape))), nn.Tanh())

    def forward(self, z):
        img = self.model(z)
        return img.view(img.shape[0], *img_shape)


class Discriminator(nn.Module):
    def __init__(self):
        super(Discriminator, self).__init__()
        self.model = nn.Sequential(nn.Linear(int(np.prod(img_shape)), 32), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(32, 1))

    def forward(self, img):
        return self.model(img.view(img.shape[0], -1))


Tensor = torch.cuda.FloatTensor if cuda else torch.FloatTensor


def compute_gradient_penalty(D, real_samples, fake_samples):
    alpha = Tensor(np.random.random((real_samples.size(0), 1, 1, 1)))
    return alpha


def weights_init_normal(m):
    classname = m.__class__.__name__
    if classname.find("Linear") != -1:
        torch.nn.init.normal_(m.weight.data, 0.0, 0.02)
        torch.nn.init.constant_(m.bias.data, 0.0)


generator = Generator()
discriminator = Discriminator()
generator.apply(weights_init_normal)
discriminator.apply(weights_init_normal)
dataloader = torch.utils.data.DataLoader(torch.load("/nonexistent/mnist.pt"), batch_size=64)
optimizer_D = torch.optim.Adam(discriminator.parameters(), lr=2e-4)

for epoch in range(200):
    for i, (imgs, _) in enumerate(dataloader):
        raise RuntimeError("the training loop ran")
'''


def _kept(source: str) -> str:
    tree = ast.parse(source)
    return ast.unparse(scripts.definitions(tree, source, "script.py"))


def test_a_flat_training_script_is_a_script_and_a_models_file_is_not():
    assert scripts.is_script(ast.parse(SCRIPT))
    assert scripts.is_script(ast.parse("import argparse\nopt = argparse.ArgumentParser().parse_args()\n"))
    models = ("import torch\nclass D(torch.nn.Module):\n    pass\n"
              "if __name__ == '__main__':\n    for i in range(3):\n        pass\n")
    assert not scripts.is_script(ast.parse(models))


def test_only_what_the_definitions_need_runs():
    kept = _kept(SCRIPT)
    # argparse with its options, the sizes, the penalty's Tensor and what it reads: kept.
    for line in ('parser.add_argument("--latent_dim"', "opt = parser.parse_args()", "img_shape = (opt.channels",
                 "cuda = True if", "Tensor = torch.cuda.FloatTensor", "import numpy as np", "class Discriminator",
                 "def compute_gradient_penalty"):
        assert line.replace('"', "'") in kept, line
    # Side effects nothing reads, the data, the models built for training, the loop and an unused import: not run.
    for line in ("os.makedirs", "print(opt)", "import os", "not_installed_logger", "Variable", "dataloader",
                 "optimizer_D", "generator = Generator()", "for epoch"):
        assert line not in kept, line


def test_a_name_is_followed_through_every_statement_that_makes_it():
    source = textwrap.dedent('''
        import torch
        cfg = {}
        cfg["width"] = 16
        if torch.cuda.is_available():
            act = torch.nn.ReLU
        else:
            act = torch.nn.LeakyReLU
        unused = {}
        unused["x"] = open("/nonexistent")
        def net():
            return torch.nn.Sequential(torch.nn.Linear(4, cfg["width"]), act())
        for step in range(10):
            cfg["width"] = step
    ''')
    kept = _kept(source)
    assert "cfg['width'] = 16" in kept and "act = torch.nn.LeakyReLU" in kept
    assert "unused" not in kept and "for step" not in kept


def test_nanprobe_init_and_diagnose_on_a_flat_script(tmp_path, monkeypatch):
    folder = tmp_path / "implementations" / "wgan_gp"
    folder.mkdir(parents=True)
    (folder / "wgan_gp.py").write_text(SCRIPT, encoding="utf-8")
    monkeypatch.chdir(folder)
    result = runner.invoke(app, ["init", "wgan_gp.py", "-o", str(tmp_path / "gan.yaml")])
    assert result.exit_code == 0, result.output
    assert "critic Discriminator, generator Generator, samples 1x28x28" in result.stderr  # argparse's defaults
    assert "latent_dim: 100" in (tmp_path / "gan.yaml").read_text(encoding="utf-8")
    result = runner.invoke(app, ["diagnose", str(tmp_path / "gan.yaml"), "--format", "json", "--dtypes", "fp16"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["status"] for r in report["runs"]] == ["ok"]
    # The script's own weight init, found by init and run by the replay: N(0, 0.02), not the constructors' draw.
    assert report["settings"]["model"]["apply"] == "implementations/wgan_gp/wgan_gp.py:weights_init_normal"
    stds = [layer["std"] for layer in report["init"]]
    assert stds and all(0.015 < std < 0.025 for std in stds), stds
    # Nothing the script would have written: no sample folder, only the config nanprobe was asked to write.
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["gan.yaml", "implementations", "wgan_gp", "wgan_gp.py"]


def test_a_definition_that_needs_the_training_loop_gets_one_line(tmp_path):
    # `device` is set only inside the loop, which never runs: the build fails in the user's class, and says where.
    source = SCRIPT.replace("nn.Linear(32, 1))", "nn.Linear(32, 1)).to(device)").replace(
        "for epoch in range(200):", "for epoch in range(200):\n    device = 'cpu'")
    (tmp_path / "script.py").write_text(source, encoding="utf-8")
    result = runner.invoke(app, ["init", str(tmp_path / "script.py"), "-o", str(tmp_path / "gan.yaml")])
    assert result.exit_code == 2
    assert "NameError" in result.stderr and "device" in result.stderr and "Traceback" not in result.output
