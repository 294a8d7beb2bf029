"""The user's AMP training step: GradScaler for the loss, the WGAN-GP penalty inside autocast on
raw outputs, hand-written sqrt norm; a small-init critic with extra 3x3 convs per stage."""
import torch
from torch import nn


class Critic(nn.Module):
    def __init__(self, ch=4, extra=1, init_std=0.01):
        super().__init__()
        layers, c = [], 3
        for _ in range(2):
            layers += [nn.Conv2d(c, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
            layers += [m for _ in range(extra) for m in (nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2))]
            c = ch
        layers += [nn.Conv2d(ch, 1, 4)]
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=init_std)

    def forward(self, x):
        return self.net(x).flatten()


class Generator(nn.Module):
    def __init__(self, z_dim=16):
        super().__init__()
        self.fc = nn.Linear(z_dim, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(z.shape[0], 3, 16, 16)


def critic_step(critic, generator, real, z, scaler=None):
    fake = generator(z).detach()
    eps = torch.rand(real.size(0), 1, 1, 1)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = critic(x_hat)
    grad = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)[0]
    gp = 10 * ((grad.flatten(1).pow(2).sum(1).sqrt() - 1) ** 2).mean()
    return {"loss": critic(fake).mean() - critic(real).mean() + gp, "penalty": gp}
