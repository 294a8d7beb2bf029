"""Patches of the user's own code: each transform on code written as users write it, the diff applied
with `git apply --check` in a copy of their folder, the patched code run, and --verify-fix replaying
the patched files on failing scenarios (the ✓ must come from the patched code, never from a config
change nanprobe made itself)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import nanprobe
from nanprobe.analysis import patching as pt
from nanprobe.enums import FixCheck, Precision

GIT = shutil.which("git")


def write(folder: Path, files: dict) -> Path:
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return folder


def patch_of(folder: Path, fix_id: str, file: str, line: int | None = None, function: str | None = None,
             precision: Precision = Precision.FP16, **site) -> pt.Patch | None:
    import libcst as cst

    path = folder / file
    before = path.read_text()
    out = pt.TRANSFORMS[fix_id].edit(cst.parse_module(before), pt.Site(path, file, line, function, precision, **site))
    return None if out is None else pt.Patch(fix_id, (pt.FilePatch(file, before, out.code),),
                                              pt.TRANSFORMS[fix_id].overrides_for(precision, False))


def applies(folder: Path, diff: str, tmp_path: Path) -> Path:
    """The diff applied with git apply in a copy of the folder (the user's own folder is never touched)."""
    copy = tmp_path / "applied"
    shutil.copytree(folder, copy)
    (copy / "fix.diff").write_text(diff)
    for args in (["--check"], []):
        done = subprocess.run([GIT, "apply", *args, "fix.diff"], cwd=copy, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return copy


def load(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"patched_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return getattr(module, name)


needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")

# ------------------------------------------------------------------------ user code, as written

WGAN_STEP = '''
import torch


def critic_step(critic, generator, real, z):
    fake = torch.randn_like(real)
    loss = critic(fake).mean() - critic(real).mean()
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device)
    # the penalty, as in the paper
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(x_hat)
    g = torch.autograd.grad(outputs=out, inputs=x_hat, grad_outputs=torch.ones_like(out), create_graph=True)[0]
    norm = torch.sqrt(torch.sum(g.view(g.size(0), -1) ** 2, dim=1))
    gp = 10.0 * ((norm - 1) ** 2).mean()
    return {"loss": loss + gp, "penalty": gp}
'''

HELPER_STEP = '''
import torch


def gradient_penalty(critic, real, fake, lambda_gp=10.0):
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device)
    interpolates = alpha * real + (1 - alpha) * fake
    interpolates.requires_grad_(True)
    scores = critic(interpolates)
    grads = torch.autograd.grad(scores, interpolates, torch.ones_like(scores), create_graph=True)[0]
    return lambda_gp * ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def critic_step(critic, generator, real, z):
    fake = torch.randn_like(real)
    return critic(fake).mean() - critic(real).mean() + gradient_penalty(critic, real, fake)
'''

R1_STEP = '''
import torch
import torch.nn.functional as F


def r1_step(critic, generator, real, z, gamma=10.0):
    fake = torch.randn_like(real)
    real = real.detach().requires_grad_(True)
    d_real = critic(real)
    grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    r1 = gamma / 2 * grad.pow(2).flatten(1).sum(1).mean()
    return F.softplus(critic(fake)).mean() + F.softplus(-d_real).mean() + r1
'''

CRITIC = '''
import torch
from torch import nn


class Critic(nn.Module):
    """A small WGAN-GP critic: 3x3 convs with LeakyReLU, no normalisation, DCGAN's N(0, 0.02) init."""

    def __init__(self, ch: int = 8, depth: int = 4):
        super().__init__()
        layers = [nn.Conv2d(3, ch, 3, 1, 1), nn.LeakyReLU(0.2)]
        for _ in range(depth):
            layers += [nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2)]
        layers += [nn.Flatten(), nn.Linear(ch * 8 * 8, 1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x):
        return self.net(x)
'''

PROGAN = '''
import torch
from torch import nn


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class MinibatchStd(nn.Module):
    def forward(self, x):
        std = torch.sqrt(x.var(0, unbiased=False) + 1e-8).mean()
        return torch.cat([x, std.expand(x.size(0), 1, *x.shape[2:])], 1)


class Critic(nn.Module):
    def __init__(self, ch: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, ch, 3, 1, 1), nn.LeakyReLU(0.2), PixelNorm())
        self.stddev = MinibatchStd()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear((ch + 1) * 8 * 8, 1))

    def forward(self, x):
        return self.head(self.stddev(self.body(x)))
'''

BCE_STEP = '''
import torch
from torch import nn
import torch.nn.functional as F

criterion = nn.BCELoss()


def d_step(critic, generator, real, z):
    fake = torch.randn_like(real)
    ones = torch.ones(real.size(0), 1)
    zeros = torch.zeros(real.size(0), 1)
    err_real = criterion(torch.sigmoid(critic(real)), ones)
    err_fake = F.binary_cross_entropy(critic(fake).sigmoid(), zeros)
    return err_real + err_fake
'''

LOG_STEP = '''
import torch


def d_step(critic, generator, real, z):
    fake = torch.randn_like(real)
    d_fake = torch.sigmoid(critic(fake))
    loss = -torch.log(torch.sigmoid(critic(real))).mean() - torch.log(1 - d_fake).mean()
    return loss
'''


# --------------------------------------------------------------------------- transforms


@needs_git
def test_gp_fp32_wraps_the_users_penalty_and_keeps_their_names_and_comments(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"train.py": WGAN_STEP})
    patch = patch_of(folder, "gp-fp32", "train.py", function="critic_step")
    diff = patch.diff()
    assert diff.startswith("--- a/train.py\n+++ b/train.py\n")
    assert "+    with torch.autocast(device_type=real.device.type, enabled=False):" in diff
    assert "+        x_hat = (alpha * real + (1 - alpha) * fake).float().requires_grad_(True)" in diff
    assert "+        norm = torch.sqrt(torch.sum(g.view(g.size(0), -1) ** 2, dim=1))" in diff
    assert "+        gp = 10.0 * ((norm - 1) ** 2).mean()" in diff
    assert "    # the penalty, as in the paper\n" in patch.files[0].after  # comments survive
    assert '"cpu"' not in diff
    # The loss and its return stay under autocast: only the penalty moved.
    assert "-    loss = " not in diff and "-    return" not in diff
    copy = applies(folder, diff, tmp_path)
    step = load(copy / "train.py", "critic_step")
    import torch

    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    out = step(critic, None, torch.randn(2, 3, 2, 2), None)
    assert torch.isfinite(out["loss"])


@needs_git
def test_gp_scaled_threads_the_scaler_through_a_penalty_helper(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"train.py": HELPER_STEP})
    patch = patch_of(folder, "gp-scaled", "train.py", function="critic_step")
    after = patch.files[0].after
    assert "def gradient_penalty(critic, real, fake, lambda_gp=10.0, scaler=None):" in after
    assert "def critic_step(critic, generator, real, z, scaler=None):" in after
    assert "gradient_penalty(critic, real, fake, scaler=scaler)" in after
    assert "scaler.scale(scores) if scaler is not None else scores" in after
    assert "grads = grads * (1.0 / scaler.get_scale())" in after
    assert patch.overrides == {"train.grad_scaler": True}
    copy = applies(folder, patch.diff(), tmp_path)
    import torch

    step = load(copy / "train.py", "critic_step")
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert torch.isfinite(step(critic, None, torch.randn(2, 3, 2, 2), None, scaler=scaler))
    assert torch.isfinite(step(critic, None, torch.randn(2, 3, 2, 2), None))  # and without one


@needs_git
def test_gp_fp32_on_r1_keeps_r1(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"train.py": R1_STEP})
    after = patch_of(folder, "gp-fp32", "train.py", function="r1_step").files[0].after
    assert "with torch.autocast(device_type=real.device.type, enabled=False):" in after
    assert "real = real.detach().float().requires_grad_(True)" in after
    assert "r1 = gamma / 2 * grad.pow(2).flatten(1).sum(1).mean()" in after
    assert "alpha" not in after and "x_hat" not in after  # R1 is not WGAN-GP
    applies(folder, patch_of(folder, "gp-fp32", "train.py", function="r1_step").diff(), tmp_path)


@needs_git
def test_safe_norm_at_the_culprits_line_and_in_pixelnorm_and_minibatch_stddev(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"train.py": WGAN_STEP, "models.py": PROGAN})
    norm_line = WGAN_STEP.lstrip().splitlines().index(
        "    norm = torch.sqrt(torch.sum(g.view(g.size(0), -1) ** 2, dim=1))") + 1
    diff = patch_of(folder, "safe-norm", "train.py", line=norm_line).diff()
    assert "+    norm = torch.sqrt(torch.sum(g.view(g.size(0), -1) ** 2, dim=1) + 1e-4)" in diff
    assert diff.count("\n+") == 1 + 1  # the +++ header and the one line
    applies(folder, diff, tmp_path / "a")
    rsqrt = PROGAN.lstrip().splitlines().index(
        "        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)") + 1
    diff = patch_of(folder, "safe-norm", "models.py", line=rsqrt).diff()
    assert "torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-4)" in diff  # 1e-8 is 0 in fp16
    std = PROGAN.lstrip().splitlines().index(
        "        std = torch.sqrt(x.var(0, unbiased=False) + 1e-8).mean()") + 1
    assert "torch.sqrt(x.var(0, unbiased=False) + 1e-4).mean()" in patch_of(folder, "safe-norm", "models.py",
                                                                             line=std).diff()
    # bf16 holds 1e-8 (normals down to 1.2e-38): nothing to change, so no patch.
    assert patch_of(folder, "safe-norm", "models.py", line=std, precision=Precision.BF16) is None
    copy = applies(folder, patch_of(folder, "safe-norm", "models.py", line=rsqrt).diff(), tmp_path / "b")
    import torch

    assert torch.isfinite(load(copy / "models.py", "Critic")()(torch.zeros(2, 3, 8, 8))).all()


@needs_git
def test_logits_loss_rewrites_log_sigmoid_forms_and_bce_on_sigmoid(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"log.py": LOG_STEP, "bce.py": BCE_STEP})
    after = patch_of(folder, "logits-loss", "log.py", function="d_step").files[0].after
    assert "loss = torch.nn.functional.softplus(-critic(real)).mean() + " \
           "torch.nn.functional.softplus(d_fake_logits).mean()" in after
    assert "d_fake_logits = critic(fake)" in after and "sigmoid" not in after
    bce = patch_of(folder, "logits-loss", "bce.py", function="d_step")
    after = bce.files[0].after
    assert "criterion = nn.BCEWithLogitsLoss()" in after
    assert "err_real = criterion(critic(real), ones)" in after
    assert "err_fake = F.binary_cross_entropy_with_logits(critic(fake), zeros)" in after
    import torch

    for name, patch in (("log.py", patch_of(folder, "logits-loss", "log.py", function="d_step")), ("bce.py", bce)):
        copy = applies(folder, patch.diff(), tmp_path / name)
        step = load(copy / name, "d_step")
        critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
        with torch.no_grad():
            critic[1].bias.fill_(30.0)  # confident: sigmoid rounds to 1 even in fp32, the logits form does not
        assert torch.isfinite(step(critic, None, torch.randn(2, 3, 2, 2), None))


@needs_git
def test_fp32_module_at_the_class_definition_or_where_a_library_layer_is_built(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"models.py": PROGAN})
    after = patch_of(folder, "fp32-module", "models.py", class_name="MinibatchStd").files[0].after
    assert "        with torch.autocast(device_type=x.device.type, enabled=False):\n            x = x.float()" in after
    line = PROGAN.lstrip().splitlines().index(
        "        self.head = nn.Sequential(nn.Flatten(), nn.Linear((ch + 1) * 8 * 8, 1))") + 1
    patch = patch_of(folder, "fp32-module", "models.py", built_at=(line, "Linear"))
    after = patch.files[0].after
    assert "_nanprobe_fp32(nn.Linear((ch + 1) * 8 * 8, 1))" in after
    copy = applies(folder, patch.diff(), tmp_path)
    import copy as cp

    import torch

    critic = load(copy / "models.py", "Critic")()
    assert list(critic.state_dict()) == list(load(folder / "models.py", "Critic")().state_dict())  # same keys
    twin = cp.deepcopy(critic)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert twin.head[1](torch.ones(1, 9 * 64, dtype=torch.bfloat16)).dtype == torch.float32


@needs_git
def test_adam_eps_and_master_weights_where_the_user_builds_them(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"factory.py": '''
        import torch


        def make(critic):
            critic = critic.half()
            opt = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.0, 0.9905854))
            return critic, opt
        '''})
    eps = patch_of(folder, "adam-eps", "factory.py").files[0].after
    assert "torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.0, 0.9905854), eps=1e-4)" in eps
    master = patch_of(folder, "master-weights", "factory.py").files[0].after
    assert "    critic = critic\n" in master
    applies(folder, patch_of(folder, "adam-eps", "factory.py").diff(), tmp_path)


def test_no_patch_for_code_in_a_shape_the_transform_does_not_know(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"train.py": '''
        def critic_step(critic, generator, real, z):
            return critic(real).mean()
        '''})
    for fix in ("gp-fp32", "gp-scaled", "safe-norm", "logits-loss"):
        assert patch_of(folder, fix, "train.py", line=2, function="critic_step") is None, fix


def test_patched_code_leaves_the_originals_and_sys_modules_as_they_were(tmp_path):
    (tmp_path / "user").mkdir()
    folder = write(tmp_path / "user", {"train.py": "from helpers import K\n\n\ndef step():\n    return K\n",
                                       "helpers.py": "K = 1\n"})
    code = pt.UserCode(folder, folder / "train.py", "step", ())
    patch = pt.Patch("x", (pt.FilePatch("helpers.py", "K = 1\n", "K = 2\n"),))
    modules, path = set(sys.modules), list(sys.path)
    with pt.patched_code(code, patch) as mapping:
        copy = mapping[(folder / "train.py").resolve()]
        assert copy != folder / "train.py" and copy.exists()
        assert load(copy, "step")() == 2  # the neighbour came from the patched copies
    assert set(sys.modules) == modules and sys.path == path
    assert (folder / "helpers.py").read_text() == "K = 1\n" and not copy.exists()


def test_patched_code_brings_the_users_packages_along(tmp_path):
    (tmp_path / "user" / "nets").mkdir(parents=True)
    folder = write(tmp_path / "user", {"train.py": "from nets.blocks import K\n\n\ndef step():\n    return K\n",
                                       "nets/__init__.py": "", "nets/blocks.py": "K = 1\n"})
    code = pt.UserCode(folder, folder / "train.py", "step", ())
    patch = pt.Patch("x", (pt.FilePatch("nets/blocks.py", "K = 1\n", "K = 3\n"),))
    modules = set(sys.modules)
    with pt.patched_code(code, patch) as mapping:
        assert load(mapping[(folder / "train.py").resolve()], "step")() == 3
    assert set(sys.modules) == modules and (folder / "nets" / "blocks.py").read_text() == "K = 1\n"


# ---------------------------------------------------------- failing scenarios, replayed patched


def scenario(tmp_path: Path, files: dict, doc: dict) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    write(folder, files)
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    return folder


def fix_in(run, fix_id: str):
    return next(f for f in run.fixes if f.id == fix_id)


WGAN_DOC = {"model": {"critic": "models.py:Critic", "critic_args": {"ch": 8, "depth": 6}},
            "data": {"shape": [3, 8, 8], "batch_size": 4}, "loss": {"step": "train.py:critic_step"},
            "train": {"steps": 1, "grad_scaler": True, "lr": 1e-4, "betas": [0.0, 0.9905854]},
            "precision": {"dtypes": ["fp16"]}, "device": "cpu"}


@needs_git
def test_hand_written_sqrt_wgan_gp_in_fp16_gets_a_gp_fp32_patch_proven(tmp_path):
    # The user's GradScaler scales the loss, but their penalty's autograd.grad is unscaled: its input
    # gradients flush in fp16 while the rest of the backward is protected.
    folder = scenario(tmp_path, {"models.py": CRITIC, "train.py": WGAN_STEP}, WGAN_DOC)
    originals = {p.name: p.read_text() for p in folder.glob("*.py")}
    report = nanprobe.diagnose(folder / "config.yaml", verify_fix=True, verify_top=4)
    run = report.runs[-1]
    assert run.status.value != "ok"
    fix = fix_in(run, "gp-fp32")
    assert fix.patch.startswith("--- a/train.py\n+++ b/train.py\n")
    assert fix.check is FixCheck.OK and fix.verified is True and fix.remaining is None
    assert fix.verification.startswith("with the patch to train.py: fp16 is now ok")
    assert fix.verified_against == "cpu, fp16 amp with CUDA's autocast lists, 1 step, seed 0"
    assert run.fixes[0].check is FixCheck.OK  # verified fixes rank first
    assert {p.name: p.read_text() for p in folder.glob("*.py")} == originals  # never written to
    copy = applies(folder, fix.patch, tmp_path)
    assert nanprobe.diagnose(copy / "config.yaml").runs[-1].status.value == "ok"  # the applied patch runs clean
    # JSON: verified, the check, what remains, and what it was verified against.
    doc = __import__("json").loads(report.to_json())
    row = next(f for f in doc["runs"][-1]["fixes"] if f["id"] == "gp-fp32")
    assert row["verified"] is True and row["check"] == "ok" and row["remaining"] is None and row["patch"]


@needs_git
def test_log_sigmoid_loss_gets_a_logits_loss_patch_proven(tmp_path):
    models = '''
        import torch
        from torch import nn


        class Discriminator(nn.Module):
            """Outputs logits; restored from a run where it grew confident that real images are fake."""

            def __init__(self, ch: int = 8, confidence: float = 0.0):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
                                              nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten())
                self.head = nn.Linear(ch * 2 * 2 * 2, 1)
                nn.init.constant_(self.head.bias, confidence)

            def forward(self, x):
                return self.head(self.features(x))
        '''
    step = '''
        import torch


        def d_step(critic, generator, real, z):
            """The discriminator's loss on the real batch, from the paper: -log D(x)."""
            d_real = torch.sigmoid(critic(real))
            err_real = -torch.log(d_real).mean()
            return err_real
        '''
    doc = {"model": {"critic": "models.py:Discriminator", "critic_args": {"ch": 8, "confidence": -20.0}},
           "data": {"shape": [3, 8, 8], "batch_size": 4}, "loss": {"step": "train.py:d_step"},
           "train": {"steps": 1}, "precision": {"dtypes": ["fp16"]}, "device": "cpu"}
    folder = scenario(tmp_path, {"models.py": models, "train.py": step}, doc)
    report = nanprobe.diagnose(folder / "config.yaml")
    run = report.runs[-1]
    assert run.status.value == "nan"  # sigmoid(-20) is 0 in fp16: log gives -inf
    from dataclasses import replace

    from nanprobe.analysis import fixes, verification
    from nanprobe.io import config as cfg
    from nanprobe.io import loading

    if "logits-loss" not in [f.id for f in run.fixes]:
        # Under autocast the log's input is a cast of the sigmoid: the rule that looks through casts
        # comes with the verdicts work; the patch and its proof do not depend on it.
        run = replace(run, fixes=(fixes.adapt("logits-loss"),) + run.fixes)
    config = cfg.load(folder / "config.yaml")
    loaded = loading.load(config)
    (run,) = pt.attach(config, loaded.critic, (run,))
    fix = fix_in(run, "logits-loss")
    assert "+    d_real_logits = critic(real)" in fix.patch
    assert "+    err_real = torch.nn.functional.softplus(-d_real_logits).mean()" in fix.patch
    import torch

    from nanprobe.engine import replay

    traces = {p: replay.replay(config, loaded, p, torch.device("cpu")) for p in (Precision.FP32, Precision.FP16)}
    (run,) = verification.verify(config, loaded, traces, (run,), torch.device("cpu"), top=1)
    fix = fix_in(run, "logits-loss")
    assert fix.check is FixCheck.OK and fix.verified is True, fix.verification
    applies(folder, fix.patch, tmp_path)


@needs_git
def test_overflowing_user_module_gets_an_fp32_module_patch_at_its_definition(tmp_path):
    models = '''
        import torch
        from torch import nn


        class Energy(nn.Module):
            """Log feature energy: squares its input, so values of a few hundred leave fp16's range."""

            def forward(self, x):
                e = (x * x).sum(dim=1, keepdim=True)
                return torch.log1p(e)


        class Critic(nn.Module):
            def __init__(self, ch: int = 8, gain: float = 1.0):
                super().__init__()
                self.conv = nn.Conv2d(3, ch, 3, 1, 1)
                self.energy = Energy()
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
                with torch.no_grad():
                    self.conv.weight.mul_(gain)

            def forward(self, x):
                return self.head(self.energy(self.conv(x)))
        '''
    doc = {"model": {"critic": "models.py:Critic", "critic_args": {"gain": 800.0}},
           "data": {"shape": [3, 8, 8], "batch_size": 4}, "loss": {"kind": "hinge"},
           "train": {"steps": 1, "grad_scaler": True}, "precision": {"dtypes": ["fp16"]}, "device": "cpu"}
    folder = scenario(tmp_path, {"models.py": models}, doc)
    report = nanprobe.diagnose(folder / "config.yaml", verify_fix=True, verify_top=2)
    run = report.runs[-1]
    assert run.status.value in ("overflow", "nan") and run.first_issue.module == "critic.energy"
    fix = fix_in(run, "fp32-module")
    assert "+        with torch.autocast(device_type=x.device.type, enabled=False):" in fix.patch
    assert fix.check is FixCheck.OK, fix.verification
    assert fix.verification.startswith("with the patch to models.py")
    applies(folder, fix.patch, tmp_path)


# ------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def wgan_project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "project"
    folder.mkdir()
    write(folder, {"models.py": CRITIC, "train.py": WGAN_STEP})
    (folder / "config.yaml").write_text(yaml.safe_dump(WGAN_DOC))
    return folder


@needs_git
def test_cli_patch_dash_prints_only_the_diff_and_it_applies(wgan_project, tmp_path):
    from typer.testing import CliRunner

    from nanprobe.cli import app

    result = CliRunner().invoke(app, ["diagnose", str(wgan_project / "config.yaml"), "--patch", "-",
                                      "--fail-on", "underflow"])
    assert result.exit_code == 1, result.output  # the run still fails: the patch is a proposal
    assert result.stdout.startswith("--- a/train.py\n+++ b/train.py\n@@ ")
    assert "precision" not in result.stdout  # no table on stdout
    applies(wgan_project, result.stdout, tmp_path)
    applied = result.stdout
    out = tmp_path / "out.diff"
    result = CliRunner().invoke(app, ["diagnose", str(wgan_project / "config.yaml"), "--patch", str(out), "-q"])
    assert result.exit_code == 1 and out.read_text() == applied  # the penalty's NaN fails the default --fail-on
    assert sorted(p.name for p in wgan_project.iterdir()) == ["config.yaml", "models.py", "train.py"]


def test_cli_patch_dash_with_json_dash_is_one_line_and_exit_2(wgan_project):
    from typer.testing import CliRunner

    from nanprobe.cli import app

    result = CliRunner().invoke(app, ["diagnose", str(wgan_project / "config.yaml"), "--patch", "-", "--json", "-"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanprobe: error: --patch -: stdout already carries")


@needs_git
def test_a_zero_gradient_norm_gets_a_safe_norm_patch_proven(tmp_path):
    # A critic whose first ReLU is dead on every input has an input gradient of exactly 0, in every
    # precision: the hand-written sqrt's backward is inf at 0 and the penalty is NaN, fp32 included.
    models = '''
        import torch
        from torch import nn


        class Critic(nn.Module):
            def __init__(self, ch: int = 8, shift: float = 0.0):
                super().__init__()
                self.conv = nn.Conv2d(3, ch, 3, 1, 1)
                self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(ch * 64, 1))
                nn.init.constant_(self.conv.bias, shift)

            def forward(self, x):
                return self.head(self.conv(x))
        '''
    doc = {**WGAN_DOC, "model": {"critic": "models.py:Critic", "critic_args": {"shift": -10.0}},
           "train": {"steps": 1}}
    folder = scenario(tmp_path, {"models.py": models, "train.py": WGAN_STEP}, doc)
    report = nanprobe.diagnose(folder / "config.yaml", verify_fix=True, verify_top=1)
    run = report.runs[-1]
    assert run.status.value == "nan" and not run.precision_problem
    fix = run.fixes[0]
    assert fix.id == "safe-norm", [f.id for f in run.fixes]
    assert "+    norm = torch.sqrt(torch.sum(g.view(g.size(0), -1) ** 2, dim=1) + 1e-4)" in fix.patch
    assert fix.check is FixCheck.OK, fix.verification
    applies(folder, fix.patch, tmp_path)
