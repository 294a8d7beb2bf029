"""The cases issue 11 reports, replayed end to end on small models written as users write them."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

import nanprobe
from nanprobe.io.config import Config, DataConfig, LossConfig, ModelConfig, PrecisionConfig, TrainConfig


class DCGANCritic(nn.Module):
    """Strided 4x4 convs with LeakyReLU(0.2), `extra` 3x3 convs per stage, no normalisation, N(0, std) init."""

    def __init__(self, ch: int = 16, std: float | None = 0.02, extra: int = 0):
        super().__init__()
        layers, c = [], 3
        for _ in range(3):
            layers += [nn.Conv2d(c, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
            for _ in range(extra):
                layers += [nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2)]
            c = ch
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * 4, 1))
        if std is not None:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.normal_(m.weight, 0.0, std)

    def forward(self, x):
        return self.net(x)


class Generator(nn.Module):
    def __init__(self, zdim: int = 8):
        super().__init__()
        self.fc = nn.Linear(zdim, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)


def wgan_gp_step(critic, generator, real, z):
    """WGAN-GP with the norm written by hand, as in the question nanprobe grew from."""
    with torch.no_grad():
        fake = generator(z)
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    alpha = torch.rand(real.size(0), 1, 1, 1)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(x_hat)
    grads = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)[0].view(real.size(0), -1)
    norm = torch.sqrt(torch.sum(grads ** 2, dim=1))
    gp = 10.0 * ((norm - 1) ** 2).mean()
    return {"loss": d_fake - d_real + gp, "penalty": gp}


class MinibatchStd(nn.Module):
    def forward(self, x):
        s = torch.sqrt(x.var(0, unbiased=False) + 1e-8).mean().view(1, 1, 1, 1)
        return torch.cat([x, s.expand(x.size(0), 1, *x.shape[2:])], 1)


class StyleLikeCritic(nn.Module):
    """A StyleGAN2-like discriminator in miniature: conv block, minibatch stddev, conv, linear."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 16, 4, 2, 1),
                                nn.LeakyReLU(0.2))
        self.mbstd = MinibatchStd()
        self.out = nn.Sequential(nn.Conv2d(17, 16, 3, 1, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(16 * 64, 1))

    def forward(self, x):
        return self.out(self.mbstd(self.b1(x)))


def logistic_r1_step(critic, generator, real, z):
    with torch.no_grad():
        fake = generator(z)
    real = real.detach().requires_grad_(True)
    d_real = critic(real)
    loss = F.softplus(critic(fake)).mean() + F.softplus(-d_real).mean()
    (g,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    r1 = g.pow(2).flatten(1).sum(1).mean()
    return {"loss": loss + 5.0 * r1, "penalty": r1}


class LinearCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 1)
        nn.init.constant_(self.fc.weight, 0.02)  # D(x) ~ 15 on the all-ones images below
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x.flatten(1))


class SaturatedGenerator(Generator):
    def __init__(self):
        super().__init__()
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, 3.0)


def softplus_by_hand_step(critic, generator, real, z):
    """The logistic loss written as log(1 + exp(x)): exp(-15) underflows on the real branch, exp(15) overflows."""
    with torch.no_grad():
        fake = generator(z)
    loss_real = torch.log(1 + torch.exp(-critic(real))).mean()
    loss_fake = torch.log(1 + torch.exp(critic(fake))).mean()
    return loss_real + loss_fake


def _config(critic, step, real, generator=None, **precision) -> Config:
    return Config(model=ModelConfig(critic=critic, generator=generator or Generator(), latent_dim=(8,)),
                  data=DataConfig(source="file", path=real, batch_size=8), loss=LossConfig(step=step),
                  train=TrainConfig(steps=1, **precision.pop("train", {})),
                  precision=PrecisionConfig(dtypes=("fp16",), **precision), device="cpu")


def _real() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(8, 3, 16, 16) * 2 - 1


def _fp16(report):
    return next(r for r in report.runs if r.precision.value == "fp16")


def test_sqrt_penalty_at_small_init_blames_the_input_grad_flush_then_sqrt_backward():
    torch.manual_seed(0)
    run = _fp16(nanprobe.diagnose(_config(DCGANCritic(ch=4, std=0.01, extra=1), wgan_gp_step, _real())))
    assert run.status.value == "nan"
    issue = run.first_issue
    assert ((issue.kind.value, issue.phase.value) == ("underflow", "input-grad")
            and issue.module.startswith("critic.net."))
    assert run.first_nonfinite.node == "SqrtBackward0"
    assert run.chain[-1].op == run.first_nonfinite.op and any("sqrt" in c.op for c in run.chain)
    assert {f.id for f in run.fixes[:2]} & {"gp-fp32", "safe-norm"}


def test_half_stylegan_like_critic_with_adam_eps_1e8_names_addcdiv():
    torch.manual_seed(0)
    config = _config(StyleLikeCritic(), logistic_r1_step, _real(), mode="half",
                     train={"lr": 2e-3, "betas": (0.0, 0.99), "eps": 1e-8})
    run = _fp16(nanprobe.diagnose(config))
    issue = run.first_issue
    assert (issue.phase.value, issue.op) == ("optimizer", "aten.addcdiv_.default")
    assert issue.numbers["eps"] == 1e-8 and "rounds to 0 in float16" in issue.detail
    assert {f.id for f in run.fixes[:2]} == {"adam-eps", "master-weights"}


def test_log_one_plus_exp_under_native_autocast_names_the_overflow_on_the_fake_branch():
    config = _config(LinearCritic(), softplus_by_hand_step, torch.ones(8, 3, 16, 16), SaturatedGenerator(),
                     policy="native")
    report = nanprobe.diagnose(config)
    run = _fp16(report)
    issue = run.first_issue
    assert (issue.kind.value, issue.phase.value, issue.op) == ("overflow", "forward", "aten.exp.default")
    assert issue.source.endswith(f":{softplus_by_hand_step.__code__.co_firstlineno + 5}")  # loss_fake's line
    assert [f.id for f in run.fixes[:2]] == ["logits-loss", "fp32-op"]


def test_penalty_critic_whose_penalty_and_gradients_barely_move_is_ok_with_notes():
    torch.manual_seed(0)
    report = nanprobe.diagnose(_config(DCGANCritic(std=None), wgan_gp_step, _real()))
    run = _fp16(report)
    assert run.status.value == "ok" and run.first_issue is None and run.fixes == ()
    assert run.notes and "no measurable effect" in run.notes[0] and "penalty" in run.notes[0]
    doc = json.loads(report.to_json())
    assert doc["runs"][-1]["notes"] == list(run.notes)
    fail_on_underflow = [r for r in report.runs if r.status.severity >= 1]
    assert fail_on_underflow == []
