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


def test_a_models_file_that_reads_its_settings_in_a_with_block_imports_as_it_is(tmp_path):
    # No loop and no parse_args: a plain module, run whole, `with` block included.
    models = "import json\nwith open(__file__.replace('models.py', 'cfg.json')) as f:\n    CFG = json.load(f)\n"
    assert not scripts.is_script(ast.parse(models))
    # In a script, a `with` block that binds what a definition reads runs; one that trains does not.
    source = textwrap.dedent('''
        import json
        with open("cfg.json") as f:
            CFG = json.load(f)
        def width():
            return CFG["width"]
        with open("log.txt", "w") as log:
            for step in range(10):
                log.write(str(step))
    ''')
    assert scripts.is_script(ast.parse(source))  # its training loop sits in a `with` block
    kept = _kept(source)
    assert "CFG = json.load(f)" in kept and "log.txt" not in kept


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


# PyTorch's DCGAN example, shrunk: a required option, widths read from the options into module globals, models
# that take the number of GPUs, and the weight init applied at module level.
DCGAN_EXAMPLE = '''
import argparse
import os
import torch
import torch.nn as nn

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", required=True, help="cifar10 | lsun | mnist | fake")
parser.add_argument("--ndf", type=int, default=8)
parser.add_argument("--outf", default=".", help="folder to output images and model checkpoints")
opt = parser.parse_args()

try:
    os.makedirs(opt.outf + "/samples")
except OSError:
    pass

if opt.dataset == "mnist":
    nc = 1
else:
    nc = 3
ndf = int(opt.ndf)


def weights_init(m):
    if m.__class__.__name__.find("Conv") != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)


class Discriminator(nn.Module):
    def __init__(self, ngpu):
        super().__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Conv2d(ndf, 1, 16, 1, 0, bias=False))

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


netD = Discriminator(1)
netD.apply(weights_init)
for epoch in range(25):
    raise RuntimeError("the training loop ran")
'''


def test_a_script_s_required_options_are_given_as_script_args(tmp_path, monkeypatch):
    (tmp_path / "main.py").write_text(DCGAN_EXAMPLE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init", "main.py", "-o", "gan.yaml"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("main.py is a training script and its parse_args() exited with no options: the following arguments "
            "are required: --dataset; give its command line as model.script_args") in result.stderr
    result = runner.invoke(app, ["init", "main.py", "-o", "gan.yaml", "--script-args", "--dataset mnist --ndf 4"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "gan.yaml").read_text(encoding="utf-8")
    assert "script_args: [--dataset, mnist, --ndf, '4']" in text and "critic_args: {ngpu: 1}" in text
    assert "apply: main.py:weights_init" in text and "samples 1x32x32" in result.stderr  # mnist: one channel
    result = runner.invoke(app, ["diagnose", "gan.yaml", "--format", "json", "--dtypes", "bf16"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)["init"][0]
    assert first["module"] == "critic.main.0" and first["fan_out"] == 4 * 16  # --ndf 4 reached the model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gan.yaml", "main.py"]  # no samples folder


def test_script_args_take_a_list_or_one_string():
    from nanprobe.errors import ConfigError
    from nanprobe.io import config as cfg

    assert cfg.check_argv("--dataset 'my data' --ndf 4", "model.script_args") == ("--dataset", "my data", "--ndf", "4")
    assert cfg.check_argv(["--ndf", 4], "model.script_args") == ("--ndf", "4")
    try:
        cfg.check_argv({"ndf": 4}, "model.script_args")
    except ConfigError as exc:
        assert str(exc).startswith("model.script_args: expected a command line")
    else:
        raise AssertionError("a mapping is not a command line")
